//! Batch decode attention over the paged cache, plan-then-run like FlashInfer's
//! `BatchDecodeWithPagedKVCacheWrapper`: request `i` has one query token per query head and
//! attends over its `kv_len(i)` cached tokens, `out = softmax(sm_scale · q·Kᵀ) · V`, accumulated
//! in f32. `plan` validates, splits long sequences across blocks when the batch alone cannot
//! fill the GPU (flash-decoding; a merge kernel combines the parts by their LSE) and uploads
//! everything asynchronously; `run` only launches, so it can be captured in a CUDA graph.
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::{check_head_dim, check_heads_and_options, split_chunk};
use crate::cache::layout::CacheShape;
use crate::cache::page_table::PageTable;
use crate::cache::paged::PagedKvCache;
use crate::error::{Error, Result};
use crate::plan::{as_bytes, paged_cache_params, Addresses, AttentionLaunch, PlanCore, ScratchLayout};
use crate::runtime::abi::{
    decode_heads_per_block, decode_smem_bytes, decode_threads, DecodeParams, DecodeWorkItem, SplitScratch, DECODE_ROWS,
    DECODE_TILE_TOKENS, NO_PARTIAL,
};
use crate::runtime::device::Device;
use crate::runtime::dtype::{DType, KvDType};
use crate::runtime::kernels::{Kernel, Kernels};
use crate::runtime::raw::RawSlice;

/// Run-time options, as FlashInfer's `plan` takes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions {
    /// Multiplies `q · k`; `None` means `1 / √head_dim`.
    pub sm_scale: Option<f32>,
    /// `cap` in `cap · tanh(s / cap)` applied to the scaled logits; 0 for none.
    pub logits_soft_cap: f32,
    /// Keys at positions `≥ kv_len − 1 − window_left` only; −1 for no window.
    pub window_left: i32,
    /// The element type of the cache the plan runs over (FlashInfer's `kv_data_type`):
    /// `None` for the queries' own type; [`DType::E4M3`] or [`DType::E5M2`] for an 8-bit cache.
    /// A run over a cache of another type is an error.
    pub kv_dtype: Option<DType>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { sm_scale: None, logits_soft_cap: 0.0, window_left: -1, kv_dtype: None }
    }
}

/// A validated decode batch with its work split and metadata on the device.
///
/// The plan holds its [`Device`] and its scratch (partial outputs and merge counters of split
/// requests). `run` takes `&mut self` and the scratch is tracked as written, so runs of one plan
/// on different streams are ordered by cudarc's event tracking; plan once per concurrent batch.
/// `replan` re-plans the next step into the same buffers (FlashInfer's workspace model), without
/// waiting for the GPU.
///
/// ```no_run
/// use ferrinfer::{f16, BatchDecodePlan, CacheShape, DecodeOptions, Device, KvLayout, PagedKvCache, PageTable};
///
/// let dev = Device::new(0)?;
/// let shape = CacheShape { num_pages: 1024, page_size: 16, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
/// let cache = PagedKvCache::<f16>::new(&dev, shape, 1)?;
/// let table = PageTable { kv_indptr: vec![0, 3], kv_indices: vec![5, 9, 2], kv_last_page_len: vec![7] };
/// // Plan once per step (validates, splits, uploads), run once per layer.
/// let mut plan = BatchDecodePlan::new(&dev, &shape, 32, &table, DecodeOptions::default())?;
/// let q = dev.alloc_zeros::<f16>(plan.qo_elems())?; // [batch][32 heads][128]
/// let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
/// plan.run(dev.stream(), &q, &cache, 0, &mut out, None)?;
/// // The next step: the same buffers, re-planned.
/// let next = PageTable { kv_last_page_len: vec![8], ..table };
/// plan.replan(&shape, 32, &next, DecodeOptions::default())?;
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct BatchDecodePlan {
    core: PlanCore,
    work: DecodeWork,
}

/// Tiles a block streams below which one block per SM beats filling every block slot: with
/// little to stream, a second block per SM adds parts to merge and fixed costs; with more, its
/// streaming hides each block's pipeline fill and drain (measured on the H200, docs/perf.md,
/// batch decode v4: batch 1–16 × kv 512–32768).
const ONE_BLOCK_PER_SM_TILES: usize = 32;

/// How `plan` cuts sequences into work items: the chunk from [`split_chunk`] for one block
/// per SM when that leaves each block at most [`ONE_BLOCK_PER_SM_TILES`] tiles, else for
/// every block slot (`blocks_per_sm` per SM). `None`: no sequence is split.
fn decode_chunk(
    lens: &[usize],
    blocks_per_item: usize,
    sms: usize,
    blocks_per_sm: usize,
    max_parts: usize,
) -> Option<usize> {
    let one_per_sm = split_chunk(lens, DECODE_TILE_TOKENS, blocks_per_item, sms, max_parts);
    let longest_block = one_per_sm.unwrap_or_else(|| lens.iter().copied().max().unwrap_or(0));
    if longest_block <= ONE_BLOCK_PER_SM_TILES * DECODE_TILE_TOKENS as usize {
        one_per_sm
    } else {
        let slots = sms * blocks_per_sm;
        split_chunk(lens, DECODE_TILE_TOKENS, blocks_per_item, slots, max_parts)
            .or_else(|| fuller_last_wave(lens, blocks_per_item, slots, max_parts))
    }
}

/// Slot-time the blocks of a batch must fill (their count over whole waves of `slots`)
/// before it is run unsplit.
const MIN_WAVE_FILL: f64 = 0.9;

/// A batch with more blocks than slots is not split by [`split_chunk`], but can leave its
/// last wave mostly empty: 64 requests × 8 KV heads are 512 blocks, 1.29 waves of the 396
/// slots of three fp8 decode blocks per SM on an H200, so the second wave runs 116 equal
/// blocks while the rest of the GPU idles. The chunk that cuts the longest sequence into the
/// fewest parts (at most 4) whose blocks fill their waves to [`MIN_WAVE_FILL`], or `None`
/// when the unsplit batch already does (or no split up to 4 parts does).
fn fuller_last_wave(lens: &[usize], blocks_per_item: usize, slots: usize, max_parts: usize) -> Option<usize> {
    let tile = DECODE_TILE_TOKENS as usize;
    let fill = |chunk: usize| {
        let blocks = lens.iter().map(|&len| len.div_ceil(chunk).max(1)).sum::<usize>() * blocks_per_item;
        blocks as f64 / (blocks.div_ceil(slots) * slots) as f64
    };
    let longest_tiles = lens.iter().copied().max()?.div_ceil(tile);
    if longest_tiles < 2 || fill(longest_tiles * tile) >= MIN_WAVE_FILL {
        return None;
    }
    (2..=max_parts.min(4)).map(|parts| longest_tiles.div_ceil(parts) * tile).find(|&chunk| fill(chunk) >= MIN_WAVE_FILL)
}

/// A decode batch's work split: what a plan uploads.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeSplit {
    /// One per (work item); each runs for every KV head and row tile.
    pub work: Vec<DecodeWorkItem>,
    /// Partial slots of split requests.
    pub slots: usize,
    /// Requests split over several items.
    pub split_requests: usize,
    /// Query heads per KV head.
    pub group_size: usize,
    /// Row tiles (of up to 16 query heads) per KV head.
    pub row_tiles: usize,
    /// The resolved `sm_scale`.
    pub sm_scale: f32,
}

/// The work split for a decode batch over a cache of `shape` with `num_qo_heads` query heads,
/// worked out without a GPU for a device of `sms` multiprocessors holding `blocks_per_sm` decode
/// blocks of one KV head each (a block of two heads counts twice): the validation and every
/// work item (for plans, and for fuzzing the planner against a bounds model).
#[cfg_attr(not(feature = "internals"), allow(dead_code))]
pub fn decode_split(
    shape: &CacheShape,
    num_qo_heads: usize,
    table: &PageTable,
    options: DecodeOptions,
    sms: usize,
    blocks_per_sm: usize,
) -> Result<DecodeSplit> {
    decode_split_tokens(shape, num_qo_heads, table, options, 1, sms, blocks_per_sm)
}

/// Most query tokens a request [`decode_split_tokens`] plans: a split request's last part
/// (half a tile at least) then holds every key a causal draft token does not see.
pub const MAX_DECODE_TOKENS: usize = DECODE_TILE_TOKENS as usize / 2;

/// [`decode_split`] for `tokens` query tokens a request (speculative decoding's draft tokens,
/// `1..=`[`MAX_DECODE_TOKENS`]): a KV head's `tokens × group` packed rows in row tiles of 16.
/// A split request's parts are at least half a tile, so the keys that causal draft tokens do
/// not all see (its last `tokens − 1`) lie in its last part, where the kernel masks them.
pub fn decode_split_tokens(
    shape: &CacheShape,
    num_qo_heads: usize,
    table: &PageTable,
    options: DecodeOptions,
    tokens: usize,
    sms: usize,
    blocks_per_sm: usize,
) -> Result<DecodeSplit> {
    let (group_size, sm_scale) = check_head_dim(shape.head_dim).and_then(|_| {
        check_heads_and_options(shape, num_qo_heads, options.sm_scale, options.logits_soft_cap, options.window_left)
    })?;
    if !(1..=MAX_DECODE_TOKENS).contains(&tokens) {
        return Err(Error::TooLarge { what: "decode query tokens a request", value: tokens, max: MAX_DECODE_TOKENS });
    }
    table.validate(shape.page_size, shape.num_pages)?;
    let row_tiles = (tokens * group_size).div_ceil(DECODE_ROWS as usize);

    // Each request's key range, then the split: enough items to fill the SMs (`decode_chunk`).
    let ranges: Vec<(usize, usize)> = table
        .kv_lens(shape.page_size)
        .into_iter()
        .map(|len| match options.window_left {
            -1 => (0, len),
            w => (len.saturating_sub(w as usize + 1), len),
        })
        .collect();
    let lens: Vec<usize> = ranges.iter().map(|(lo, hi)| hi - lo).collect();
    // The merging block keeps 8 sums per thread, (parts + 1) · 16 weights and a flag in its
    // shared memory.
    let dim = shape.head_dim as u32;
    // Whatever the cache's element type: the smaller block's shared memory.
    let smem = decode_smem_bytes(dim, 1).min(decode_smem_bytes(dim, 2));
    let staging = smem as usize / 4 - 1 - 8 * decode_threads(dim) as usize;
    let max_parts = staging / DECODE_ROWS as usize - 1;
    let chunk =
        decode_chunk(&lens, shape.num_kv_heads * row_tiles, sms, blocks_per_sm, max_parts).unwrap_or(usize::MAX);

    let heads_blocks = (shape.num_kv_heads * row_tiles) as u32;
    let (mut work, mut slots, mut split_requests) = (Vec::new(), 0u32, 0usize);
    for (request, &(lo, hi)) in ranges.iter().enumerate() {
        let parts = (hi - lo).div_ceil(chunk).max(1);
        for part in 0..parts {
            work.push(DecodeWorkItem {
                pages: table.kv_indptr[request],
                start: (lo + part * (hi - lo) / parts) as u32,
                end: (lo + (part + 1) * (hi - lo) / parts) as u32,
                request: request as u32,
                slot: if parts == 1 { NO_PARTIAL } else { slots + part as u32 },
                first_slot: slots,
                parts: parts as u32,
                counters: split_requests as u32 * heads_blocks,
            });
        }
        if parts > 1 {
            slots += parts as u32;
            split_requests += 1;
        }
    }
    let blocks = work.len() * heads_blocks as usize;
    if blocks > i32::MAX as usize {
        return Err(Error::TooLarge {
            what: "decode blocks (work items × KV heads × row tiles)",
            value: blocks,
            max: i32::MAX as usize,
        });
    }
    Ok(DecodeSplit { work, slots: slots as usize, split_requests, group_size, row_tiles, sm_scale })
}

/// What a decode launch needs besides its operands (the plan's host side; a prefill plan of
/// draft tokens runs one too).
pub(crate) struct DecodeWork {
    shape: CacheShape,
    batch_size: usize,
    /// Query tokens a request, and whether each sees only the keys up to its position.
    tokens: usize,
    causal: bool,
    num_qo_heads: usize,
    group_size: usize,
    sm_scale: f32,
    logits_soft_cap: f32,
    kv_dtype: Option<DType>,
    /// Blocks: work items × KV heads × row tiles (16 query heads each).
    grid: (u32, u32, u32),
    /// Requests split across several work items.
    split_requests: usize,
}

impl AttentionLaunch for DecodeWork {
    type Params = DecodeParams;
    const WHAT: &'static str = "decode attention";

    fn rows(&self) -> usize {
        self.batch_size * self.tokens * self.num_qo_heads
    }
    fn num_qo_heads(&self) -> usize {
        self.num_qo_heads
    }
    fn head_dim(&self) -> usize {
        self.shape.head_dim
    }
    fn kv_elems(&self) -> usize {
        self.shape.pool_elems()
    }
    fn kernel<'k>(&self, kernels: &'k Kernels, dtype: DType, kv_dtype: DType) -> Result<&'k Kernel> {
        if self.tokens > 1 {
            kernels.decode_multi_token(dtype, kv_dtype, self.shape.head_dim)
        } else {
            kernels.decode(dtype, kv_dtype, self.shape.head_dim)
        }
    }
    fn kv_dtype(&self) -> Option<DType> {
        self.kv_dtype
    }
    fn blocks(&self) -> u32 {
        self.grid.0 * self.grid.1 * self.grid.2
    }
    fn params(&self, ops: &Addresses, parts: &[u64], split: SplitScratch) -> DecodeParams {
        let planned = (self.num_qo_heads, self.group_size, self.sm_scale, self.grid.0);
        let draft = (self.tokens, self.causal);
        decode_params(&self.shape, planned, draft, self.logits_soft_cap, ops, parts, split)
    }
}

impl DecodeWork {
    /// Plans decode of `tokens` query tokens a request (`causal`: each sees the keys up to its
    /// position) on `device`: the launch, its work items and its scratch.
    pub(crate) fn plan(
        device: &Device,
        shape: &CacheShape,
        num_qo_heads: usize,
        table: &PageTable,
        options: DecodeOptions,
        (tokens, causal): (usize, bool),
    ) -> Result<(Self, Vec<DecodeWorkItem>, ScratchLayout)> {
        let kv_dtype = options.kv_dtype.unwrap_or(DType::F16);
        // The planner counts one-head blocks: a block of two heads fills two of its slots.
        let heads_per_block = decode_heads_per_block(shape.head_dim as u32, kv_dtype.size_bytes() as u32) as usize;
        let blocks_per_sm = heads_per_block
            * device.kernels().decode(DType::F16, kv_dtype, shape.head_dim).map_or(1, |k| k.blocks_per_sm);
        let sms = device.multiprocessor_count();
        let DecodeSplit { work, slots, split_requests, group_size, row_tiles, sm_scale } =
            decode_split_tokens(shape, num_qo_heads, table, options, tokens, sms, blocks_per_sm)?;
        let scratch = ScratchLayout {
            counters: split_requests * shape.num_kv_heads * row_tiles,
            partial_rows: slots * tokens * num_qo_heads,
            head_dim: shape.head_dim,
        };
        let launch = DecodeWork {
            shape: *shape,
            batch_size: table.batch_size(),
            tokens,
            causal,
            num_qo_heads,
            group_size,
            sm_scale,
            logits_soft_cap: options.logits_soft_cap,
            kv_dtype: options.kv_dtype,
            grid: (work.len() as u32, shape.num_kv_heads.div_ceil(heads_per_block) as u32, row_tiles as u32),
            split_requests,
        };
        Ok((launch, work, scratch))
    }

    /// Blocks of the launch (work items × blocks of KV heads × row tiles).
    pub(crate) fn num_blocks(&self) -> usize {
        self.blocks() as usize
    }

    /// Requests split across several work items.
    pub(crate) fn split_requests(&self) -> usize {
        self.split_requests
    }
}

/// The parameter block of a decode launch over a cache of `shape` with `(num_qo_heads,
/// group_size, sm_scale, work items)` as planned ([`DecodeSplit`]) for `(tokens, causal)`
/// query tokens a request, operands at `ops`, and the page table's indices and the work items
/// at `parts`: what a plan's run passes (and, through `internals`, what the CPU emulator's
/// launches pass). The grid is the items × blocks of KV heads ([`decode_heads_per_block`]) × row
/// tiles, flat.
pub fn decode_params(
    shape: &CacheShape,
    (num_qo_heads, group_size, sm_scale, num_items): (usize, usize, f32, u32),
    (tokens, causal): (usize, bool),
    logits_soft_cap: f32,
    ops: &Addresses,
    parts: &[u64],
    split: SplitScratch,
) -> DecodeParams {
    DecodeParams {
        q: ops.q,
        cache: paged_cache_params(shape, ops.k, ops.v, parts[0]),
        work: parts[1],
        out: ops.out,
        lse: ops.lse,
        sinks: ops.sinks,
        split,
        num_qo_heads: num_qo_heads as u32,
        num_items,
        group_size: group_size as u32,
        sm_scale: sm_scale * ops.scales.k,
        logits_soft_cap,
        v_scale: ops.scales.v,
        kv_head_scales: ops.head_scales,
        tokens_per_request: tokens as u32,
        causal: causal as u32,
    }
}

impl BatchDecodePlan {
    /// Plans decode for the batch in `table` over a cache of `shape`, with `num_qo_heads` query
    /// heads (a multiple of `shape.num_kv_heads`), on `device`.
    pub fn new(
        device: &Device,
        shape: &CacheShape,
        num_qo_heads: usize,
        table: &PageTable,
        options: DecodeOptions,
    ) -> Result<Self> {
        let empty = DecodeWork {
            shape: *shape,
            batch_size: 0,
            tokens: 1,
            causal: false,
            num_qo_heads,
            group_size: 1,
            sm_scale: 1.0,
            logits_soft_cap: 0.0,
            kv_dtype: None,
            grid: (0, 0, 0),
            split_requests: 0,
        };
        let mut plan = BatchDecodePlan { core: PlanCore::new(device)?, work: empty };
        plan.replan(shape, num_qo_heads, table, options)?;
        Ok(plan)
    }

    /// Plans the next batch into this plan's buffers: validates and splits on the host, then
    /// enqueues the metadata's upload on the device's stream without waiting for the GPU (runs
    /// still queued from the last step keep reading the old metadata; cudarc's tracking orders
    /// the upload after them). On an invalid batch nothing changes and the plan stays usable.
    pub fn replan(
        &mut self,
        shape: &CacheShape,
        num_qo_heads: usize,
        table: &PageTable,
        options: DecodeOptions,
    ) -> Result<()> {
        let (launch, work, scratch) =
            DecodeWork::plan(self.core.device(), shape, num_qo_heads, table, options, (1, false))?;
        self.core.replan(&[as_bytes(&table.kv_indices), as_bytes(&work)], scratch)?;
        self.work = launch;
        Ok(())
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        self.core.device()
    }

    /// Elements of `q` and `out`: `batch × num_qo_heads × head_dim`.
    pub fn qo_elems(&self) -> usize {
        self.work.rows() * self.work.shape.head_dim
    }

    /// Blocks of the decode launch (work items, KV heads, row tiles) and the number of
    /// requests split across several items (their parts are merged in the same launch).
    #[cfg(feature = "internals")]
    pub fn launch_shape(&self) -> ((u32, u32, u32), usize) {
        (self.work.grid, self.work.split_requests)
    }

    /// Attention of `q` (`[batch][num_qo_heads][head_dim]`) over layer `layer` of `cache`, into
    /// `out` (same shape) and, if given, the base-2 LSE `log2 Σ exp(s)` per (request, head) into
    /// `lse` (`[batch][num_qo_heads]`, −∞ for an empty sequence). Only launches, on `stream`
    /// (a stream of the plan's device); every buffer is checked against the plan first.
    ///
    /// The cache holds the queries' type `T`, or, for a plan made with `kv_dtype` 8-bit, that
    /// type (`C`), read as its values times the layer's [`KvScales`](crate::KvScales)
    /// (the LSE is that of the scaled logits).
    pub fn run<T: KvDType, C: KvDType>(
        &mut self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        cache: &PagedKvCache<C>,
        layer: usize,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        self.run_with_sinks(stream, q, cache, layer, None, out, lse)
    }

    /// [`run`](Self::run) with attention sinks (gpt-oss; FlashInfer's
    /// `BatchAttentionWithAttentionSinkWrapper`): `sinks`, if given, holds one logit per query
    /// head (`[num_qo_heads]`, in the units of the scaled and soft-capped logits) that joins
    /// each row's softmax denominator as a key whose value is zero, window or not:
    /// `out = Σ e^{s_i} v_i / (e^{sink} + Σ e^{s_i})`. The LSE is then `log2(e^{sink} + Σ e^{s_i})`,
    /// so the output and LSE are an attention state that merges with sink-free states of other
    /// keys (cascade levels, [`merge_states`](crate::merge_states)) to the attention over all
    /// of them with the sink counted once. An empty sequence gives zeros and the sink's LSE; a
    /// sink of −∞ is no sink.
    #[allow(clippy::too_many_arguments)]
    pub fn run_with_sinks<T: KvDType, C: KvDType>(
        &mut self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        cache: &PagedKvCache<C>,
        layer: usize,
        sinks: Option<&dyn DevicePtr<f32>>,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        let (k, v, dequant) = cache.pools_for(self.core.device(), &self.work.shape, layer)?;
        self.core.run_attention(&self.work, stream, q, k, v, dequant, sinks, out, lse)
    }

    /// [`run`](Self::run) for stacks not on cudarc: `q` and `out` as in `run`, `k_pages` and
    /// `v_pages` one layer's pools (`shape.pool_elems()` elements each, laid out as the plan's
    /// shape says), on the raw stream `stream` of the plan's device. Lengths are checked as in
    /// `run`; the stream is made to wait for the plan's upload.
    ///
    /// # Safety
    /// Every slice satisfies [`RawSlice::new`]'s contract; nothing else writes `q`, the pools or
    /// `lse` while the launch runs, and nothing reads or writes `out` and `lse` until it has
    /// completed; runs of this plan are ordered on the GPU (its scratch is reused by each), and
    /// the plan is neither replanned nor dropped until the launch has completed.
    pub unsafe fn run_raw<T: KvDType>(
        &mut self,
        stream: CUstream,
        q: RawSlice<T>,
        k_pages: RawSlice<T>,
        v_pages: RawSlice<T>,
        out: RawSlice<T>,
        lse: Option<RawSlice<f32>>,
    ) -> Result<()> {
        self.core.run_attention_raw(&self.work, stream, q, k_pages, v_pages, out, lse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_1_29_waves_is_cut_until_its_waves_are_full() {
        let tile = DECODE_TILE_TOKENS as usize;
        // 64 × 4096 at 8 KV heads on 132 SMs × 3 slots: 512 blocks, 1.29 waves → 3 parts
        // (1536 blocks, 97% of 4 waves); at 2 slots a SM (528) it is 0.97 of 2 waves: unsplit.
        assert_eq!(fuller_last_wave(&[4096; 64], 8, 396, 16), Some(4096 / tile / 3 * tile + tile));
        assert_eq!(decode_chunk(&[4096; 64], 8, 132, 2, 16), None);
        assert_eq!(fuller_last_wave(&[4096; 64], 8, 264, 16), None);
        // Never more parts than the merge staging allows.
        assert_eq!(fuller_last_wave(&[4096; 64], 8, 396, 2), None);
    }

    #[test]
    fn split_fills_one_wave_with_whole_tiles() {
        // 8 KV heads, 264 block slots: 33 items fit.
        let chunk = split_chunk(&[32768], DECODE_TILE_TOKENS, 8, 264, 1000).unwrap();
        assert_eq!(chunk, 1024);
        assert!(32768usize.div_ceil(chunk) * 8 <= 264);
        // Already a full wave: no split.
        assert_eq!(split_chunk(&vec![4096; 64], DECODE_TILE_TOKENS, 8, 264, 1000), None);
        // 16 × 4096 over 128 pairs: two items each.
        assert_eq!(split_chunk(&[4096; 16], DECODE_TILE_TOKENS, 8, 264, 1000), Some(2048));
        // Short sequences never split below one tile; empty ones still take an item.
        let chunk = split_chunk(&[0, 10, 64, 1000], DECODE_TILE_TOKENS, 1, 1000, 1000).unwrap();
        assert_eq!(chunk, DECODE_TILE_TOKENS as usize);
        assert_eq!(split_chunk(&[], DECODE_TILE_TOKENS, 8, 264, 1000), None);
        // The merge's staging bounds the parts of one sequence.
        let chunk = split_chunk(&[64 * 100], DECODE_TILE_TOKENS, 1, 1000, 10).unwrap();
        assert!(6400usize.div_ceil(chunk) <= 10 && chunk == 640);
    }

    #[test]
    fn short_work_takes_one_block_per_sm() {
        // 132 SMs, 2 blocks each, 8 KV heads. 1 × 4096: 4 tiles a block over 128 SMs.
        assert_eq!(decode_chunk(&[4096], 8, 132, 2, 1000), Some(256));
        // 1 × 32768: 32 tiles a block is still short.
        assert_eq!(decode_chunk(&[32768], 8, 132, 2, 1000), Some(2048));
        // 16 × 2048 unsplit (32 tiles): one block per SM, no split.
        assert_eq!(decode_chunk(&[2048; 16], 8, 132, 2, 1000), None);
        // 16 × 4096: 64 tiles would be long; split in two to fill both slots of every SM.
        assert_eq!(decode_chunk(&[4096; 16], 8, 132, 2, 1000), Some(2048));
        // Full batches are never split.
        assert_eq!(decode_chunk(&vec![32768; 64], 8, 132, 2, 1000), None);
        assert_eq!(decode_chunk(&[], 8, 132, 2, 1000), None);
    }
}
