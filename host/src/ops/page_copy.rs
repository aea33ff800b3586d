//! Copies between the paged cache and contiguous ragged K/V (`[token][head][dim]`, FlashInfer's
//! ragged KV layout): gather (pages → ragged), scatter (ragged → pages) and append (FlashInfer's
//! `append_paged_kv_cache`: a ragged batch of new tokens written after each sequence's earlier
//! tokens). Planning validates and uploads the metadata asynchronously; running only launches.
//!
//! Between an 8-bit cache ([`E4m3`](crate::E4m3), [`E5m2`](crate::E5m2)) and f16/bf16 ragged
//! K/V the copies convert with the cache layer's [`KvScales`]: scatter and append store
//! `x · (1 / scale)` rounded to nearest even, saturating to the largest finite value (±∞ too;
//! NaN becomes the positive NaN code), exactly as [`E4m3::quantise`](crate::E4m3::quantise) (on sm_89+
//! by `cvt.rn.satfinite`, on sm_80 by the same integer arithmetic as the host); gather writes each
//! value times its scale, rounded to nearest even in the ragged type. With the layer's
//! per-KV-head scales ([`PagedKvCache::set_head_scales`]) a value of KV head `h` is stored as
//! `x · ((1 / scale) · (1 / head_scale[h]))` ([`E4m3::quantise_head`](crate::E4m3::quantise_head))
//! and gathered as its value times `scale · head_scale[h]`.
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice};

use crate::cache::layout::CacheShape;
use crate::cache::mla::{MlaCacheShape, MlaKvCache};
use crate::cache::page_table::{validate_indptr, PageTable};
use crate::cache::paged::{KvScales, PagedKvCache};
use crate::error::{Error, Result};
use crate::plan::{as_bytes, check_lengths, head_scales_on, PlanCore, ScratchLayout};
use crate::runtime::abi::{FastDiv, PagedCopyParams};
use crate::runtime::device::{launch_config, Device, LaunchStream};
use crate::runtime::dtype::KvDType;
use crate::runtime::raw::RawSlice;

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

/// Per ragged row, its token's element offset in a page pool: sequence `i`'s positions
/// `first_pos[i]..kv_len(i)`, in order. `table` is already validated for `shape`.
pub(crate) fn row_offsets(shape: &CacheShape, table: &PageTable, first_pos: &[usize]) -> Vec<u64> {
    let mut offsets = Vec::new();
    for (seq, (kv_len, &first)) in table.kv_lens(shape.page_size).into_iter().zip(first_pos).enumerate() {
        for pos in first..kv_len {
            let (page, slot) = table.locate(seq, pos, shape.page_size);
            offsets.push(shape.element_index(page, slot, 0, 0) as u64);
        }
    }
    offsets
}

/// Validates an append (FlashInfer's `append_paged_kv_cache`) of rows
/// `append_indptr[i]..append_indptr[i + 1]` to sequence `i` of `table` (which describes the
/// sequences after it) and returns each sequence's first appended position,
/// `kv_len(i) − append_len(i)`. Two appended tokens never share a slot.
pub(crate) fn append_first_positions(
    shape: &CacheShape,
    table: &PageTable,
    append_indptr: &[u32],
) -> Result<Vec<usize>> {
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
    Ok(first_pos)
}

/// Which way a copy goes, and the kernel that does it.
#[derive(Clone, Copy)]
enum Direction {
    /// Pages → ragged.
    Gather,
    /// Ragged → pages.
    Scatter,
}

impl Direction {
    fn kernel(self) -> &'static str {
        match self {
            Direction::Gather => "paged_kv_gather",
            Direction::Scatter => "paged_kv_scatter",
        }
    }
}

/// The parameter block and grid of a copy of `total_rows` ragged rows to (`scatter`) or from a
/// pool of `pool`'s shape holding `C` (its row offsets `offset_shift` narrower than the
/// planned ones: an MLA kpe pool), `pools` of them (K and V: 2; `blockIdx.y`): what a plan's
/// launch passes (and, through `internals`, what the CPU emulator's launches pass). The
/// kernels run `THREADS` threads and `rows_per_block × 8` bytes of shared memory.
#[allow(clippy::too_many_arguments)]
pub fn copy_params<C: KvDType>(
    (pool, offset_shift): (&CacheShape, u32),
    scatter: bool,
    total_rows: u32,
    pools: u32,
    [k_pages, v_pages, k_ragged, v_ragged]: [u64; 4],
    row_offsets: u64,
    scales: KvScales,
    head_scales: u64,
) -> (PagedCopyParams, (u32, u32)) {
    // Vectors of the pool: sixteen values of an 8-bit cache (two ragged vectors each).
    let layout = pool.token_layout(C::DTYPE);
    let row_vecs = pool.num_kv_heads as u32 * layout.head_vecs.divisor;
    let rows_per_block = rows_per_block(total_rows, row_vecs);
    // Quantising multiplies by the reciprocal (`E4m3::quantise`), dequantising by the scale.
    let factor = |scale: f32| if scatter { 1.0 / scale } else { scale };
    let params = PagedCopyParams {
        k_pages,
        v_pages,
        k_ragged,
        v_ragged,
        row_offsets,
        vec_shift: (16 / C::DTYPE.size_bytes()).trailing_zeros() + offset_shift,
        layout,
        row_vecs: FastDiv::new(row_vecs),
        total_rows,
        rows_per_block,
        k_factor: factor(scales.k),
        v_factor: factor(scales.v),
        kv_head_scales: head_scales,
    };
    (params, (total_rows.div_ceil(rows_per_block), pools))
}

/// The row offsets of an append ([`ScatterPlan::append`], [`MlaAppendPlan`]): validated, each
/// appended row's element offset in a pool of `shape`.
pub fn append_row_offsets(shape: &CacheShape, table: &PageTable, append_indptr: &[u32]) -> Result<Vec<u64>> {
    Ok(row_offsets(shape, table, &append_first_positions(shape, table, append_indptr)?))
}

/// What gather and scatter plans share: where each ragged row's token lives in the pool.
struct CopyPlan {
    core: PlanCore,
    shape: CacheShape,
    total_rows: u32,
    direction: Direction,
    /// Pools a launch copies: 2 (K and V, `blockIdx.y`), or 1 (K only: an MLA pool).
    pools: u32,
}

impl CopyPlan {
    /// Ragged row `r` copies to or from the pool's element offset `row_offsets[r]` (of a
    /// validated table: [`row_offsets`], [`append_row_offsets`]).
    fn new(device: &Device, shape: &CacheShape, row_offsets: Vec<u64>, direction: Direction) -> Result<Self> {
        let mut core = PlanCore::new(device)?;
        core.replan(&[as_bytes(&row_offsets)], ScratchLayout::default())?;
        Ok(CopyPlan { core, shape: *shape, total_rows: row_offsets.len() as u32, direction, pools: 2 })
    }

    fn ragged_elems(&self) -> usize {
        self.total_rows as usize * self.shape.token_elems()
    }

    /// Checks a run's stream and ragged buffers: the plan's context, and the planned lengths
    /// (the pools are checked by the cache).
    fn check_run<T>(&self, stream: &CudaStream, k: &impl DeviceSlice<T>, v: &impl DeviceSlice<T>) -> Result<()> {
        let device = self.core.device();
        device.check_stream(stream)?;
        device.check_buffer("ragged K", k)?;
        device.check_buffer("ragged V", v)?;
        self.check_ragged(k.len(), v.len())
    }

    /// Checks the ragged buffers' lengths (the pools are checked by the cache).
    fn check_ragged(&self, k: usize, v: usize) -> Result<()> {
        let rows = self.ragged_elems();
        check_lengths(&[("ragged K", k, rows), ("ragged V", v, rows)])
    }

    /// The kernel for ragged K/V of `T` and a cache of `C`, checked before any buffer is
    /// touched: a plain copy for one type, a converting one between an 8-bit cache and
    /// f16/bf16; any other pair is an error.
    fn kernel<T: KvDType, C: KvDType>(&self) -> Result<&cudarc::driver::CudaFunction> {
        let kernels = self.core.device().kernels();
        if T::DTYPE == C::DTYPE {
            return Ok(&kernels.single(self.direction.kernel()).function);
        }
        if !C::DTYPE.is_fp8() {
            return Err(Error::UnsupportedDType {
                what: "copies between a cache and ragged K/V of another type (only an fp8 cache converts)",
                dtype: C::DTYPE.name(),
            });
        }
        Ok(&kernels.paged_copy_fp8(matches!(self.direction, Direction::Gather), T::DTYPE, C::DTYPE)?.function)
    }

    /// Launches the plan's kernel for `[k_pages, v_pages, k_ragged, v_ragged]`, which the caller
    /// checked against the plan and keeps alive, with the row offsets at `row_offsets`; an
    /// 8-bit cache's values are converted with `scales` and the per-KV-head scales at
    /// `head_scales` (0 for none). The pools are the plan's shape's, or (an MLA append's kpe
    /// pool) a narrower one-head `pool` whose token rows are `2^offset_shift` times shorter,
    /// so that the plan's row offsets shifted by that address its rows.
    ///
    /// # Safety
    /// Every address is a live allocation of the plan's device with the lengths the plan
    /// expects (the pools `pool.pool_elems()` elements of `C`, the ragged buffers
    /// `total_rows × pool.token_elems()` of `T`), and a raw stream belongs to the device's
    /// context.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch<T: KvDType, C: KvDType>(
        &self,
        (pool, offset_shift): (&CacheShape, u32),
        stream: LaunchStream,
        buffers: [u64; 4],
        row_offsets: u64,
        scales: KvScales,
        head_scales: u64,
    ) -> Result<()> {
        let kernel = self.kernel::<T, C>()?;
        if self.total_rows == 0 {
            return Ok(());
        }
        let scatter = matches!(self.direction, Direction::Scatter);
        let (params, grid) = copy_params::<C>(
            (pool, offset_shift),
            scatter,
            self.total_rows,
            self.pools,
            buffers,
            row_offsets,
            scales,
            head_scales,
        );
        let cfg = launch_config(grid, THREADS, params.rows_per_block * 8);
        let device = self.core.device();
        // SAFETY: the table was validated against this shape (and, for writes, found disjoint)
        // when planning, so every row offset lies inside a pool; the caller vouches for the
        // buffers.
        device.launch(kernel, cfg, stream, &params, "launching a paged K/V copy")
    }

    /// The raw runs: raw pools (`shape.pool_elems()` each) and ragged buffers, checked against
    /// the plan, on a raw stream made to wait for the plan's upload.
    ///
    /// # Safety
    /// As the public `run_raw`s.
    unsafe fn run_raw<T: KvDType>(
        &self,
        stream: CUstream,
        pools: [RawSlice<T>; 2],
        ragged: [RawSlice<T>; 2],
    ) -> Result<()> {
        self.core.device().check_raw_stream(stream)?;
        let pool = self.shape.pool_elems();
        check_lengths(&[("k_pages", pools[0].len(), pool), ("v_pages", pools[1].len(), pool)])?;
        self.check_ragged(ragged[0].len(), ragged[1].len())?;
        let row_offsets = self.core.raw_parts()?[0];
        self.core.order_after_upload(stream)?;
        let buffers = [pools[0].ptr(), pools[1].ptr(), ragged[0].ptr(), ragged[1].ptr()];
        self.launch::<T, T>((&self.shape, 0), LaunchStream::Raw(stream), buffers, row_offsets, KvScales::default(), 0)
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
/// plan.run(dev.stream(), &cache, 0, &mut k, &mut v)?; // 10 tokens × 2 heads × 64
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct GatherPlan(CopyPlan);

impl GatherPlan {
    /// Validates `table` against `shape` and uploads where each of the batch's tokens lies in the pool.
    pub fn new(device: &Device, shape: &CacheShape, table: &PageTable) -> Result<Self> {
        table.validate(shape.page_size, shape.num_pages)?;
        let offsets = row_offsets(shape, table, &vec![0; table.batch_size()]);
        Ok(GatherPlan(CopyPlan::new(device, shape, offsets, Direction::Gather)?))
    }

    /// Elements of each ragged output: `total tokens × num_kv_heads × head_dim`.
    pub fn ragged_elems(&self) -> usize {
        self.0.ragged_elems()
    }

    /// Gathers layer `layer` of `cache` into `k_out` and `v_out` (cudarc slices or views) on
    /// `stream` (a stream of the plan's device). From an 8-bit cache into f16/bf16 the values
    /// are dequantised with the layer's scales (module documentation).
    pub fn run<T: KvDType, C: KvDType>(
        &self,
        stream: &CudaStream,
        cache: &PagedKvCache<C>,
        layer: usize,
        k_out: &mut impl DevicePtrMut<T>,
        v_out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let plan = &self.0;
        plan.check_run(stream, &*k_out, &*v_out)?;
        let (k_pool, v_pool, dequant) = cache.pools_for(plan.core.device(), &plan.shape, layer)?;
        let (k_pages, _g0) = k_pool.device_ptr(stream);
        let (v_pages, _g1) = v_pool.device_ptr(stream);
        let (k_ragged, _g2) = k_out.device_ptr_mut(stream);
        let (v_ragged, _g3) = v_out.device_ptr_mut(stream);
        let (parts, _g4) = plan.core.metadata_on(stream)?;
        let (head_scales, _g5) = head_scales_on(dequant.heads, stream);
        let buffers = [k_pages, v_pages, k_ragged, v_ragged];
        // SAFETY: the pools and ragged buffers were checked against the plan and live in its
        // context, the head scales are the cache's (one per KV head); every buffer outlives the
        // launch's enqueueing (guards above).
        unsafe {
            let pool = (&plan.shape, 0);
            plan.launch::<T, C>(pool, LaunchStream::Cudarc(stream), buffers, parts[0], dequant.scales, head_scales)
        }
    }

    /// [`run`](Self::run) for stacks not on cudarc: one layer's pools (`shape.pool_elems()`
    /// elements each) into ragged `k_out` and `v_out`, on the raw stream `stream` of the plan's
    /// device (made to wait for the plan's upload).
    ///
    /// # Safety
    /// Every slice satisfies [`RawSlice::new`]'s contract; nothing writes the pools while the
    /// launch runs, nothing reads or writes `k_out` and `v_out` until it has completed, and the
    /// plan is not dropped before then.
    pub unsafe fn run_raw<T: KvDType>(
        &self,
        stream: CUstream,
        pools: [RawSlice<T>; 2],
        k_out: RawSlice<T>,
        v_out: RawSlice<T>,
    ) -> Result<()> {
        self.0.run_raw(stream, pools, [k_out, v_out])
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
        let offsets = row_offsets(shape, table, &first_pos);
        Ok(ScatterPlan(CopyPlan::new(device, shape, offsets, Direction::Scatter)?))
    }

    /// FlashInfer's `append_paged_kv_cache`: sequence `i` appends rows
    /// `append_indptr[i]..append_indptr[i + 1]` of the ragged input as its last tokens. `table`
    /// describes the sequences after the append (pages already reserved), so the new tokens
    /// take positions `kv_len(i) − append_len(i)..kv_len(i)`.
    pub fn append(device: &Device, shape: &CacheShape, table: &PageTable, append_indptr: &[u32]) -> Result<Self> {
        let offsets = append_row_offsets(shape, table, append_indptr)?;
        Ok(ScatterPlan(CopyPlan::new(device, shape, offsets, Direction::Scatter)?))
    }

    /// Elements of each ragged input: `tokens written × num_kv_heads × head_dim`.
    pub fn ragged_elems(&self) -> usize {
        self.0.ragged_elems()
    }

    /// Writes `k_in` and `v_in` (cudarc slices or views) into layer `layer` of `cache` on
    /// `stream` (a stream of the plan's device). From f16/bf16 into an 8-bit cache the values
    /// are quantised with the layer's scales (module documentation).
    pub fn run<T: KvDType, C: KvDType>(
        &self,
        stream: &CudaStream,
        cache: &mut PagedKvCache<C>,
        layer: usize,
        k_in: &impl DevicePtr<T>,
        v_in: &impl DevicePtr<T>,
    ) -> Result<()> {
        let plan = &self.0;
        plan.check_run(stream, k_in, v_in)?;
        let (k_pool, v_pool, dequant) = cache.pools_for_mut(plan.core.device(), &plan.shape, layer)?;
        let (k_pages, _g0) = k_pool.device_ptr_mut(stream);
        let (v_pages, _g1) = v_pool.device_ptr_mut(stream);
        let (k_ragged, _g2) = k_in.device_ptr(stream);
        let (v_ragged, _g3) = v_in.device_ptr(stream);
        let (parts, _g4) = plan.core.metadata_on(stream)?;
        let (head_scales, _g5) = head_scales_on(dequant.heads, stream);
        let buffers = [k_pages, v_pages, k_ragged, v_ragged];
        // SAFETY: the pools and ragged buffers were checked against the plan and live in its
        // context, the head scales are the cache's (one per KV head); its writes were found
        // disjoint when planning; every buffer outlives the launch's enqueueing (guards above).
        unsafe {
            let pool = (&plan.shape, 0);
            plan.launch::<T, C>(pool, LaunchStream::Cudarc(stream), buffers, parts[0], dequant.scales, head_scales)
        }
    }

    /// [`run`](Self::run) for stacks not on cudarc: ragged `k_in` and `v_in` into one layer's
    /// pools (`shape.pool_elems()` elements each), on the raw stream `stream` of the plan's
    /// device (made to wait for the plan's upload).
    ///
    /// # Safety
    /// Every slice satisfies [`RawSlice::new`]'s contract; nothing writes `k_in` and `v_in`
    /// while the launch runs, nothing reads or writes the pools until it has completed, and the
    /// plan is not dropped before then.
    pub unsafe fn run_raw<T: KvDType>(
        &self,
        stream: CUstream,
        pools: [RawSlice<T>; 2],
        k_in: RawSlice<T>,
        v_in: RawSlice<T>,
    ) -> Result<()> {
        self.0.run_raw(stream, pools, [k_in, v_in])
    }
}

/// FlashInfer's `append_paged_mla_kv_cache`: sequence `i` appends rows
/// `append_indptr[i]..append_indptr[i + 1]` of ragged ckv (`[rows][512]`) and kpe
/// (`[rows][64]`) as its last tokens to an [`MlaKvCache`]. `table` describes the sequences
/// after the append (pages already reserved), as for [`ScatterPlan::append`]; planning rejects
/// any batch in which two tokens would land in one slot.
///
/// ```no_run
/// use ferrinfer::{bf16, Device, MlaAppendPlan, MlaCacheShape, MlaKvCache, PageTable};
///
/// let dev = Device::new(0)?;
/// let shape = MlaCacheShape { num_pages: 16, page_size: 64 };
/// let mut cache = MlaKvCache::<bf16>::new(&dev, shape, 1)?;
/// // One sequence of 70 tokens after appending its last 6.
/// let table = PageTable { kv_indptr: vec![0, 2], kv_indices: vec![3, 8], kv_last_page_len: vec![6] };
/// let plan = MlaAppendPlan::new(&dev, &shape, &table, &[0, 6])?;
/// let ckv = dev.alloc_zeros::<bf16>(plan.ckv_elems())?; // [6][512]
/// let kpe = dev.alloc_zeros::<bf16>(plan.kpe_elems())?; // [6][64]
/// plan.run(dev.stream(), &mut cache, 0, &ckv, &kpe)?;
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct MlaAppendPlan {
    shape: MlaCacheShape,
    /// The new tokens' places, as element offsets in a ckv pool; the kpe pool's are the same
    /// token rows, [`KPE_OFFSET_SHIFT`] narrower.
    plan: CopyPlan,
}

/// log2 of how much shorter a kpe row is than a ckv row (512 / 64).
pub const KPE_OFFSET_SHIFT: u32 = (MlaCacheShape::CKV_DIM / MlaCacheShape::KPE_DIM).trailing_zeros();
const _: () = assert!(MlaCacheShape::KPE_DIM << KPE_OFFSET_SHIFT == MlaCacheShape::CKV_DIM);

impl MlaAppendPlan {
    /// Validates the append against `shape` and uploads where each new token goes.
    pub fn new(device: &Device, shape: &MlaCacheShape, table: &PageTable, append_indptr: &[u32]) -> Result<Self> {
        shape.validate()?;
        let offsets = append_row_offsets(&shape.ckv(), table, append_indptr)?;
        let plan = CopyPlan { pools: 1, ..CopyPlan::new(device, &shape.ckv(), offsets, Direction::Scatter)? };
        Ok(MlaAppendPlan { shape: *shape, plan })
    }

    /// Elements of the ragged ckv input: `tokens written × 512`.
    pub fn ckv_elems(&self) -> usize {
        self.plan.total_rows as usize * MlaCacheShape::CKV_DIM
    }

    /// Elements of the ragged kpe input: `tokens written × 64`.
    pub fn kpe_elems(&self) -> usize {
        self.plan.total_rows as usize * MlaCacheShape::KPE_DIM
    }

    /// Writes `ckv_in` and `kpe_in` (cudarc slices or views) into layer `layer` of `cache` on
    /// `stream` (a stream of the plan's device). From f16/bf16 into an 8-bit cache the values are
    /// quantised with the layer's scale (as [`ScatterPlan::run`] does K's with K's scale).
    pub fn run<T: KvDType, C: KvDType>(
        &self,
        stream: &CudaStream,
        cache: &mut MlaKvCache<C>,
        layer: usize,
        ckv_in: &impl DevicePtr<T>,
        kpe_in: &impl DevicePtr<T>,
    ) -> Result<()> {
        let device = self.plan.core.device();
        device.check_stream(stream)?;
        device.check_buffer("ragged ckv", ckv_in)?;
        device.check_buffer("ragged kpe", kpe_in)?;
        check_lengths(&[
            ("ragged ckv", ckv_in.len(), self.ckv_elems()),
            ("ragged kpe", kpe_in.len(), self.kpe_elems()),
        ])?;
        // The pair of types has a kernel (checked before any buffer is touched).
        self.plan.kernel::<T, C>()?;
        let (ckv_pool, kpe_pool, scale) = cache.pools_for_mut(device, &self.shape, layer)?;
        let scales = KvScales { k: scale, v: scale };
        let (ckv, kpe) = (self.shape.ckv(), self.shape.kpe());
        let pools = [((&ckv, 0), ckv_pool, ckv_in as &dyn DevicePtr<T>), ((&kpe, KPE_OFFSET_SHIFT), kpe_pool, kpe_in)];
        let (parts, _g0) = self.plan.core.metadata_on(stream)?;
        for (pool, pages, ragged) in pools {
            let (pages, _g1) = pages.device_ptr_mut(stream);
            let (ragged, _g2) = ragged.device_ptr(stream);
            // SAFETY: the pool is the cache's, checked against the plan's shape (its pool's
            // length) and context, the ragged input was checked to have the planned length and
            // context; the writes were found disjoint when planning; the row offsets, ckv
            // element offsets, shifted address the kpe pool's rows alike; every buffer outlives
            // the launch's enqueueing (guards above). The launch copies K only (`pools` 1).
            unsafe {
                self.plan.launch::<T, C>(
                    pool,
                    LaunchStream::Cudarc(stream),
                    [pages, 0, ragged, 0],
                    parts[0],
                    scales,
                    0,
                )?
            };
        }
        Ok(())
    }
}
