//! Copies between the paged cache and contiguous ragged K/V (`[token][head][dim]`, FlashInfer's
//! ragged KV layout): the raw launch of the `paged_kv_*` kernels, and plan-then-run.
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg};

use crate::abi::{FastDiv, PagedCopyParams};
use crate::cache::PagedKvCache;
use crate::device::{launch_config, Device};
use crate::dtype::KvDType;
use crate::error::{Error, Result};
use crate::layout::CacheShape;
use crate::page_table::PageTable;

// SAFETY: plain `#[repr(C)]` data, laid out identically in the kernel crate (shared source).
unsafe impl DeviceRepr for PagedCopyParams {}

const THREADS: u32 = 256;
/// 16-byte vectors a block moves: 8 per thread, so each thread has several loads in flight.
const VECS_PER_BLOCK: u32 = 2048;

/// Launches a paged copy kernel over `params.total_rows` rows.
///
/// # Safety
/// Every pointer in `params` is a live device allocation on `stream`'s context, and the page
/// table, ragged offsets and first positions address only inside those allocations (what
/// [`PageTable::validate`] and the callers' length checks establish).
pub(crate) unsafe fn launch_paged_copy(
    stream: &CudaStream,
    function: &CudaFunction,
    mut params: PagedCopyParams,
) -> Result<()> {
    if params.total_rows == 0 {
        return Ok(());
    }
    params.rows_per_block = (VECS_PER_BLOCK / params.row_vecs.divisor).clamp(1, 256);
    let blocks = params.total_rows.div_ceil(params.rows_per_block);
    let cfg = launch_config((blocks, 2), THREADS, params.rows_per_block * 8);
    stream
        .launch_builder(function)
        .arg(&params)
        .launch(cfg)
        .map(|_| ())
        .map_err(Error::driver("launching a paged K/V copy"))
}

/// A validated batch, its metadata on the device, ready to copy tokens between a cache of
/// `shape` and ragged K/V buffers. Planning validates and uploads; running only launches.
pub struct PagedCopyPlan {
    shape: CacheShape,
    batch_size: u32,
    total_rows: u32,
    kv_indptr: CudaSlice<u32>,
    kv_indices: CudaSlice<u32>,
    ragged_indptr: CudaSlice<u32>,
    first_pos: CudaSlice<u32>,
}

impl PagedCopyPlan {
    /// Plans copying every token of every sequence of `table` (gather, or its reverse).
    pub fn whole_sequences(device: &Device, shape: &CacheShape, table: &PageTable) -> Result<Self> {
        table.validate(shape.page_size, shape.num_pages)?;
        let ragged_indptr = table.token_indptr(shape.page_size);
        let first_pos = vec![0u32; table.batch_size()];
        Self::upload(device, shape, table, &ragged_indptr, &first_pos)
    }

    fn upload(
        device: &Device,
        shape: &CacheShape,
        table: &PageTable,
        ragged_indptr: &[u32],
        first_pos: &[u32],
    ) -> Result<Self> {
        // cudarc cannot allocate zero elements; an empty list still needs a valid pointer.
        let nonempty = |v: &[u32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        Ok(PagedCopyPlan {
            shape: *shape,
            batch_size: table.batch_size() as u32,
            total_rows: ragged_indptr.last().copied().unwrap_or(0),
            kv_indptr: device.upload(&table.kv_indptr)?,
            kv_indices: device.upload(&nonempty(&table.kv_indices))?,
            ragged_indptr: device.upload(ragged_indptr)?,
            first_pos: device.upload(&nonempty(first_pos))?,
        })
    }

    /// Tokens the plan copies.
    pub fn total_rows(&self) -> usize {
        self.total_rows as usize
    }

    /// Elements of one ragged K (or V) buffer: `total_rows × num_kv_heads × head_dim`.
    pub fn ragged_elems(&self) -> usize {
        self.total_rows() * self.shape.token_elems()
    }

    fn check<T: KvDType>(&self, cache: &PagedKvCache<T>, k: usize, v: usize) -> Result<()> {
        if *cache.shape() != self.shape {
            return Err(Error::ShapeMismatch { planned: self.shape, got: *cache.shape() });
        }
        for (what, got) in [("ragged K", k), ("ragged V", v)] {
            if got != self.ragged_elems() {
                return Err(Error::BufferLength { what, got, expected: self.ragged_elems() });
            }
        }
        Ok(())
    }

    /// Copies the planned tokens out of `cache` into `k_out` and `v_out` on `stream`.
    pub fn gather<T: KvDType>(
        &self,
        device: &Device,
        stream: &CudaStream,
        cache: &PagedKvCache<T>,
        k_out: &mut CudaSlice<T>,
        v_out: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.check(cache, k_out.len(), v_out.len())?;
        let (k_pages, _g0) = cache.k().device_ptr(stream);
        let (v_pages, _g1) = cache.v().device_ptr(stream);
        let (k_ragged, _g2) = k_out.device_ptr_mut(stream);
        let (v_ragged, _g3) = v_out.device_ptr_mut(stream);
        self.launch::<T>(stream, &device.kernels.paged_kv_gather, [k_pages, v_pages, k_ragged, v_ragged])
    }

    /// Launches `function` over the planned rows for pools and ragged buffers
    /// `[k_pages, v_pages, k_ragged, v_ragged]`, which the caller checked and keeps alive.
    fn launch<T: KvDType>(
        &self,
        stream: &CudaStream,
        function: &CudaFunction,
        [k_pages, v_pages, k_ragged, v_ragged]: [u64; 4],
    ) -> Result<()> {
        let layout = self.shape.page_layout(T::DTYPE);
        let (kv_indptr, _g0) = self.kv_indptr.device_ptr(stream);
        let (kv_indices, _g1) = self.kv_indices.device_ptr(stream);
        let (ragged_indptr, _g2) = self.ragged_indptr.device_ptr(stream);
        let (first_pos, _g3) = self.first_pos.device_ptr(stream);
        let params = PagedCopyParams {
            k_pages,
            v_pages,
            k_ragged,
            v_ragged,
            kv_indptr,
            kv_indices,
            ragged_indptr,
            first_pos,
            layout,
            row_vecs: FastDiv::new(self.shape.num_kv_heads as u32 * layout.head_vecs.divisor),
            batch_size: self.batch_size,
            total_rows: self.total_rows,
            rows_per_block: 0,
        };
        // SAFETY: the table was validated against this shape when planning, the caller checked
        // the buffers against the plan, and every buffer outlives the launch (guards above).
        unsafe { launch_paged_copy(stream, function, params) }
    }
}

impl<T: KvDType> PagedKvCache<T> {
    /// Copies every token of the batch in `table` out of the cache into `k_out` and `v_out`,
    /// sequence after sequence (`[token][head][dim]`, rows at `table.token_indptr(page_size)`),
    /// on the device's stream. Plans and runs in one call; keep a [`PagedCopyPlan`] to repeat it.
    pub fn gather(
        &self,
        device: &Device,
        table: &PageTable,
        k_out: &mut CudaSlice<T>,
        v_out: &mut CudaSlice<T>,
    ) -> Result<()> {
        PagedCopyPlan::whole_sequences(device, self.shape(), table)?.gather(device, device.stream(), self, k_out, v_out)
    }
}
