//! Copies between the paged cache and contiguous ragged K/V (`[token][head][dim]`, FlashInfer's
//! ragged KV layout): gather (pages → ragged), scatter (ragged → pages) and append (FlashInfer's
//! `append_paged_kv_cache`: a ragged batch of new tokens written after each sequence's earlier
//! tokens). Planning validates and uploads the metadata; running only launches.
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use crate::abi::{FastDiv, PagedCopyParams};
use crate::attention::check_lengths;
use crate::cache::PagedKvCache;
use crate::device::{launch_config, Device, LaunchStream, RawSlice};
use crate::dtype::KvDType;
use crate::error::{Error, Result};
use crate::layout::CacheShape;
use crate::page_table::{validate_indptr, PageTable};

// SAFETY: plain `#[repr(C)]` data, laid out identically in the kernel crate (shared source).
unsafe impl DeviceRepr for PagedCopyParams {}

const THREADS: u32 = 256;
/// 16-byte vectors a block moves at most: 8 per thread, several loads in flight each.
const VECS_PER_BLOCK: u32 = 2048;
/// Blocks to aim for when a batch is small (about two per SM of a large GPU), so a short
/// append spreads over the chip instead of queueing behind a few blocks.
const MIN_BLOCKS: u32 = 256;

/// Rows per block: as many as fill `VECS_PER_BLOCK`, fewer when that would leave SMs idle.
fn rows_per_block(total_rows: u32, row_vecs: u32) -> u32 {
    let full = (VECS_PER_BLOCK / row_vecs).clamp(1, 256);
    full.min(total_rows.div_ceil(MIN_BLOCKS)).max(1)
}

/// Launches a paged copy kernel over `params.total_rows` rows, K and V.
///
/// # Safety
/// Every pointer in `params` is a live device allocation of `device`'s context, and the page
/// table, ragged offsets and first positions address only inside those allocations (what
/// [`PageTable::validate`] and the plans' length checks establish).
unsafe fn launch_paged_copy(
    device: &Device,
    stream: LaunchStream,
    function: &CudaFunction,
    mut params: PagedCopyParams,
) -> Result<()> {
    if params.total_rows == 0 {
        return Ok(());
    }
    params.rows_per_block = rows_per_block(params.total_rows, params.row_vecs.divisor);
    let blocks = params.total_rows.div_ceil(params.rows_per_block);
    let cfg = launch_config((blocks, 2), THREADS, params.rows_per_block * 8);
    device.launch(function, cfg, stream, &params, "launching a paged K/V copy")
}

/// What gather and scatter plans share: where each ragged row's token lives in the pool.
struct CopyPlan {
    shape: CacheShape,
    total_rows: u32,
    /// Per ragged row, its token's vector offset in a page pool.
    row_offsets: CudaSlice<u64>,
    /// Its address, for the raw runs.
    row_offsets_address: u64,
}

impl CopyPlan {
    /// Sequence `i` copies its positions `first_pos[i]..kv_len(i)`, in order, to or from the
    /// next ragged rows. `table` is already validated for `shape`.
    fn new(device: &Device, shape: &CacheShape, table: &PageTable, first_pos: &[usize]) -> Result<Self> {
        let mut row_offsets = Vec::new();
        for (seq, (kv_len, &first)) in table.kv_lens(shape.page_size).into_iter().zip(first_pos).enumerate() {
            for pos in first..kv_len {
                let (page, slot) = table.locate(seq, pos, shape.page_size);
                row_offsets.push(shape.element_index(page, slot, 0, 0) as u64);
            }
        }
        let total_rows = row_offsets.len() as u32;
        // cudarc cannot allocate zero elements; an empty batch still gets a valid pointer.
        if row_offsets.is_empty() {
            row_offsets.push(0);
        }
        let row_offsets = device.upload(&row_offsets)?;
        let row_offsets_address = row_offsets.device_ptr(device.stream()).0;
        Ok(CopyPlan { shape: *shape, total_rows, row_offsets, row_offsets_address })
    }
    fn ragged_elems(&self) -> usize {
        self.total_rows as usize * self.shape.token_elems()
    }

    fn check<T: KvDType>(&self, cache: &PagedKvCache<T>, layer: usize, k: usize, v: usize) -> Result<()> {
        if *cache.shape() != self.shape {
            return Err(Error::ShapeMismatch { planned: self.shape, got: *cache.shape() });
        }
        cache.layer(layer)?;
        for (what, got) in [("ragged K", k), ("ragged V", v)] {
            if got != self.ragged_elems() {
                return Err(Error::BufferLength { what, got, expected: self.ragged_elems() });
            }
        }
        Ok(())
    }

    /// The raw runs: raw pools (`shape.pool_elems()` each) and ragged buffers, checked against
    /// the plan, on a raw stream.
    ///
    /// # Safety
    /// As the public `run_raw`s.
    unsafe fn run_raw<T: KvDType>(
        &self,
        device: &Device,
        stream: CUstream,
        function: &CudaFunction,
        pools: [RawSlice<T>; 2],
        ragged: [RawSlice<T>; 2],
    ) -> Result<()> {
        let (pool, rows) = (self.shape.pool_elems(), self.ragged_elems());
        check_lengths(&[
            ("k_pages", pools[0].len(), pool),
            ("v_pages", pools[1].len(), pool),
            ("ragged K", ragged[0].len(), rows),
            ("ragged V", ragged[1].len(), rows),
        ])?;
        let buffers = [pools[0].ptr(), pools[1].ptr(), ragged[0].ptr(), ragged[1].ptr()];
        self.launch::<T>(device, LaunchStream::Raw(stream), function, buffers, self.row_offsets_address)
    }

    /// Launches `function` for pools and ragged buffers `[k_pages, v_pages, k_ragged, v_ragged]`,
    /// which the caller checked against the plan and keeps alive; `row_offsets` is the plan's
    /// (tracked by the caller on a cudarc stream).
    ///
    /// # Safety
    /// As [`launch_paged_copy`].
    unsafe fn launch<T: KvDType>(
        &self,
        device: &Device,
        stream: LaunchStream,
        function: &CudaFunction,
        buffers: [u64; 4],
        row_offsets: u64,
    ) -> Result<()> {
        let [k_pages, v_pages, k_ragged, v_ragged] = buffers;
        let layout = self.shape.token_layout(T::DTYPE);
        let params = PagedCopyParams {
            k_pages,
            v_pages,
            k_ragged,
            v_ragged,
            row_offsets,
            vec_shift: (16 / T::DTYPE.size_bytes()).trailing_zeros(),
            layout,
            row_vecs: FastDiv::new(self.shape.num_kv_heads as u32 * layout.head_vecs.divisor),
            total_rows: self.total_rows,
            rows_per_block: 0,
        };
        launch_paged_copy(device, stream, function, params)
    }
}

/// Copies every token of a batch out of the cache into ragged `[token][head][dim]` buffers,
/// sequence after sequence (rows at `table.token_indptr(page_size)`).
///
/// ```no_run
/// use ferrinfer::{f16, CacheShape, Device, GatherPlan, KvLayout, PagedKvCache, PageTable};
///
/// let dev = Device::new(0)?;
/// let shape = CacheShape { num_pages: 16, page_size: 7, num_kv_heads: 2, head_dim: 64, layout: KvLayout::Hnd };
/// let cache = PagedKvCache::<f16>::new(&dev, shape, 1)?;
/// let table = PageTable { kv_indptr: vec![0, 2], kv_indices: vec![4, 1], kv_last_page_len: vec![3] };
/// let plan = GatherPlan::new(&dev, &shape, &table)?;
/// let (mut k, mut v) = (dev.alloc_zeros::<f16>(plan.ragged_elems())?, dev.alloc_zeros::<f16>(plan.ragged_elems())?);
/// plan.run(&dev, dev.stream(), &cache, 0, &mut k, &mut v)?; // 10 tokens × 2 heads × 64
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct GatherPlan(CopyPlan);

impl GatherPlan {
    /// Validates `table` against `shape` and uploads where each of the batch's tokens lies in the pool.
    pub fn new(device: &Device, shape: &CacheShape, table: &PageTable) -> Result<Self> {
        table.validate(shape.page_size, shape.num_pages)?;
        Ok(GatherPlan(CopyPlan::new(device, shape, table, &vec![0; table.batch_size()])?))
    }

    /// Elements of each ragged output: `total tokens × num_kv_heads × head_dim`.
    pub fn ragged_elems(&self) -> usize {
        self.0.ragged_elems()
    }

    /// Gathers layer `layer` of `cache` into `k_out` and `v_out` (cudarc slices or views) on
    /// `stream`.
    pub fn run<T: KvDType>(
        &self,
        device: &Device,
        stream: &CudaStream,
        cache: &PagedKvCache<T>,
        layer: usize,
        k_out: &mut impl DevicePtrMut<T>,
        v_out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.0.check(cache, layer, k_out.len(), v_out.len())?;
        let pools = cache.layer(layer)?;
        let (k_pages, _g0) = pools.k.device_ptr(stream);
        let (v_pages, _g1) = pools.v.device_ptr(stream);
        let (k_ragged, _g2) = k_out.device_ptr_mut(stream);
        let (v_ragged, _g3) = v_out.device_ptr_mut(stream);
        let (row_offsets, _g4) = self.0.row_offsets.device_ptr(stream);
        let function = &device.kernels.paged_kv_gather;
        // SAFETY: the table was validated against this shape when planning, the buffers were
        // checked against the plan, and every buffer outlives the launch (guards above).
        unsafe {
            let buffers = [k_pages, v_pages, k_ragged, v_ragged];
            self.0.launch::<T>(device, LaunchStream::Cudarc(stream), function, buffers, row_offsets)
        }
    }

    /// [`run`](Self::run) for stacks not on cudarc: one layer's pools (`shape.pool_elems()`
    /// elements each) into ragged `k_out` and `v_out`, on the raw stream `stream`.
    ///
    /// # Safety
    /// Every slice satisfies [`RawSlice::new`]'s contract; `stream` is a live stream of
    /// `device`'s context, ordered after the plan's upload on `device.stream()` (synchronize the
    /// device once after planning); nothing writes the pools while the launch runs, and nothing
    /// reads or writes `k_out` and `v_out` until it has completed.
    pub unsafe fn run_raw<T: KvDType>(
        &self,
        device: &Device,
        stream: CUstream,
        pools: [RawSlice<T>; 2],
        k_out: RawSlice<T>,
        v_out: RawSlice<T>,
    ) -> Result<()> {
        self.0.run_raw(device, stream, &device.kernels.paged_kv_gather, pools, [k_out, v_out])
    }
}

/// Writes ragged `[token][head][dim]` K/V into the cache: whole sequences (the reverse of
/// gather) or appended tokens. Planning rejects any batch in which two tokens would land in
/// one slot.
pub struct ScatterPlan(CopyPlan);

impl ScatterPlan {
    /// Every token of every sequence, rows at `table.token_indptr(page_size)`.
    pub fn whole_sequences(device: &Device, shape: &CacheShape, table: &PageTable) -> Result<Self> {
        table.validate(shape.page_size, shape.num_pages)?;
        let first_pos = vec![0; table.batch_size()];
        table.validate_disjoint_writes(shape.page_size, &first_pos)?;
        Ok(ScatterPlan(CopyPlan::new(device, shape, table, &first_pos)?))
    }

    /// FlashInfer's `append_paged_kv_cache`: sequence `i` appends rows
    /// `append_indptr[i]..append_indptr[i + 1]` of the ragged input as its last tokens. `table`
    /// describes the sequences after the append (pages already reserved), so the new tokens
    /// take positions `kv_len(i) − append_len(i)..kv_len(i)`.
    pub fn append(device: &Device, shape: &CacheShape, table: &PageTable, append_indptr: &[u32]) -> Result<Self> {
        table.validate(shape.page_size, shape.num_pages)?;
        validate_indptr("append_indptr", append_indptr, table.batch_size())?;
        let kv_lens = table.kv_lens(shape.page_size);
        let mut first_pos = Vec::with_capacity(kv_lens.len());
        for (seq, (w, &kv_len)) in append_indptr.windows(2).zip(&kv_lens).enumerate() {
            let append_len = (w[1] - w[0]) as usize;
            if append_len > kv_len {
                return Err(Error::AppendLongerThanSequence { seq, append_len, kv_len });
            }
            first_pos.push(kv_len - append_len);
        }
        table.validate_disjoint_writes(shape.page_size, &first_pos)?;
        Ok(ScatterPlan(CopyPlan::new(device, shape, table, &first_pos)?))
    }

    /// Elements of each ragged input: `tokens written × num_kv_heads × head_dim`.
    pub fn ragged_elems(&self) -> usize {
        self.0.ragged_elems()
    }

    /// Writes `k_in` and `v_in` (cudarc slices or views) into layer `layer` of `cache` on
    /// `stream`.
    pub fn run<T: KvDType>(
        &self,
        device: &Device,
        stream: &CudaStream,
        cache: &mut PagedKvCache<T>,
        layer: usize,
        k_in: &impl DevicePtr<T>,
        v_in: &impl DevicePtr<T>,
    ) -> Result<()> {
        self.0.check(cache, layer, k_in.len(), v_in.len())?;
        let pools = cache.layer_mut(layer)?;
        let (k_pages, _g0) = pools.k.device_ptr_mut(stream);
        let (v_pages, _g1) = pools.v.device_ptr_mut(stream);
        let (k_ragged, _g2) = k_in.device_ptr(stream);
        let (v_ragged, _g3) = v_in.device_ptr(stream);
        let (row_offsets, _g4) = self.0.row_offsets.device_ptr(stream);
        let function = &device.kernels.paged_kv_scatter;
        // SAFETY: the table was validated against this shape and its writes found disjoint when
        // planning, the buffers were checked against the plan, and every buffer outlives the
        // launch (guards above).
        unsafe {
            let buffers = [k_pages, v_pages, k_ragged, v_ragged];
            self.0.launch::<T>(device, LaunchStream::Cudarc(stream), function, buffers, row_offsets)
        }
    }

    /// [`run`](Self::run) for stacks not on cudarc: ragged `k_in` and `v_in` into one layer's
    /// pools (`shape.pool_elems()` elements each), on the raw stream `stream`.
    ///
    /// # Safety
    /// Every slice satisfies [`RawSlice::new`]'s contract; `stream` is a live stream of
    /// `device`'s context, ordered after the plan's upload on `device.stream()` (synchronize the
    /// device once after planning); nothing writes `k_in` and `v_in` while the launch runs, and
    /// nothing reads or writes the pools until it has completed.
    pub unsafe fn run_raw<T: KvDType>(
        &self,
        device: &Device,
        stream: CUstream,
        pools: [RawSlice<T>; 2],
        k_in: RawSlice<T>,
        v_in: RawSlice<T>,
    ) -> Result<()> {
        self.0.run_raw(device, stream, &device.kernels.paged_kv_scatter, pools, [k_in, v_in])
    }
}
