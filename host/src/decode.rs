//! Batch decode attention over the paged cache, plan-then-run like FlashInfer's
//! `BatchDecodeWithPagedKVCacheWrapper`: request `i` has one query token per query head and
//! attends over its `kv_len(i)` cached tokens, `out = softmax(sm_scale · q·Kᵀ) · V`, accumulated
//! in f32. `plan` validates, splits long sequences across blocks when the batch alone cannot
//! fill the GPU (flash-decoding; a merge kernel combines the parts by their LSE) and uploads
//! everything; `run` only launches, so it can be captured in a CUDA graph.
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use crate::abi::{
    decode_smem_bytes, decode_threads, DecodeParams, DecodeWorkItem, SplitScratch, DECODE_ROWS, DECODE_TILE_TOKENS,
    NO_PARTIAL,
};
use crate::attention::{
    check_heads_and_options, check_lengths, check_operands, kernel_head_dim, paged_cache_params, split_chunk,
    Addresses, Operands, SplitBuffers,
};
use crate::cache::PagedKvCache;
use crate::device::{launch_config, Device, LaunchStream, RawSlice};
use crate::dtype::KvDType;
use crate::error::{Error, Result};
use crate::layout::CacheShape;
use crate::page_table::PageTable;

// SAFETY: plain `#[repr(C)]` data shared with the kernel crate.
unsafe impl DeviceRepr for DecodeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for DecodeWorkItem {}

pub use crate::attention::HEAD_DIMS;

/// Run-time options, as FlashInfer's `plan` takes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions {
    /// Multiplies `q · k`; `None` means `1 / √head_dim`.
    pub sm_scale: Option<f32>,
    /// `cap` in `cap · tanh(s / cap)` applied to the scaled logits; 0 for none.
    pub logits_soft_cap: f32,
    /// Keys at positions `≥ kv_len − 1 − window_left` only; −1 for no window.
    pub window_left: i32,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { sm_scale: None, logits_soft_cap: 0.0, window_left: -1 }
    }
}

/// A validated decode batch with its work split and metadata on the device.
///
/// The plan owns the split's scratch space (partial outputs and merge counters), so runs of one
/// plan must not overlap on the GPU: use one stream per plan or order the streams (cudarc's
/// event tracking, on by default, does that for you). Plan per stream for concurrent batches.
///
/// ```no_run
/// use ferrinfer::{f16, BatchDecodePlan, CacheShape, DecodeOptions, Device, KvLayout, PagedKvCache, PageTable};
///
/// let dev = Device::new(0)?;
/// let shape = CacheShape { num_pages: 1024, page_size: 16, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
/// let cache = PagedKvCache::<f16>::new(&dev, shape, 1)?;
/// let table = PageTable { kv_indptr: vec![0, 3], kv_indices: vec![5, 9, 2], kv_last_page_len: vec![7] };
/// // Plan once per batch (validates, splits, uploads), run once per layer.
/// let plan = BatchDecodePlan::new(&dev, &shape, 32, &table, DecodeOptions::default())?;
/// let q = dev.alloc_zeros::<f16>(plan.qo_elems())?; // [batch][32 heads][128]
/// let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
/// plan.run(&dev, dev.stream(), &q, &cache, 0, &mut out, None)?;
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct BatchDecodePlan {
    shape: CacheShape,
    batch_size: usize,
    num_qo_heads: usize,
    sm_scale: f32,
    logits_soft_cap: f32,
    /// Blocks: work items × KV heads × row tiles (16 query heads each).
    grid: (u32, u32, u32),
    /// Requests split across several work items.
    split_requests: usize,
    /// Read-only metadata, uploaded and synchronised in `new`; `run` passes their addresses
    /// (`metadata`) without a driver call per buffer.
    kv_indices: CudaSlice<u32>,
    work: CudaSlice<DecodeWorkItem>,
    metadata: (u64, u64),
    /// Scratch of split requests: partial outputs, their LSEs, and merge counters.
    scratch: SplitBuffers,
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
        split_chunk(lens, DECODE_TILE_TOKENS, blocks_per_item, sms * blocks_per_sm, max_parts)
    }
}

/// A decode batch's work split: what `BatchDecodePlan::new` uploads.
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

impl BatchDecodePlan {
    /// The work split `new` uploads, worked out without a GPU for a device of `sms`
    /// multiprocessors holding `blocks_per_sm` decode blocks each: the validation and every
    /// work item (for inspection, and for fuzzing the planner against a bounds model).
    pub fn split(
        shape: &CacheShape,
        num_qo_heads: usize,
        table: &PageTable,
        options: DecodeOptions,
        sms: usize,
        blocks_per_sm: usize,
    ) -> Result<DecodeSplit> {
        let (group_size, sm_scale) = check_heads_and_options(
            shape,
            num_qo_heads,
            options.sm_scale,
            options.logits_soft_cap,
            options.window_left,
        )?;
        table.validate(shape.page_size, shape.num_pages)?;
        let row_tiles = group_size.div_ceil(DECODE_ROWS as usize);

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
        let staging = decode_smem_bytes(dim) as usize / 4 - 1 - 8 * decode_threads(dim) as usize;
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

    /// Plans decode for the batch in `table` over a cache of `shape`, with `num_qo_heads` query
    /// heads (a multiple of `shape.num_kv_heads`).
    pub fn new(
        device: &Device,
        shape: &CacheShape,
        num_qo_heads: usize,
        table: &PageTable,
        options: DecodeOptions,
    ) -> Result<Self> {
        let (sms, blocks_per_sm) = (device.multiprocessor_count()?, device.decode_blocks_per_sm(shape.head_dim)?);
        let DecodeSplit { work, slots, split_requests, group_size: _, row_tiles, sm_scale } =
            Self::split(shape, num_qo_heads, table, options, sms, blocks_per_sm)?;
        let heads_blocks = shape.num_kv_heads * row_tiles;
        let nonempty = |v: &[u32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        let plan = BatchDecodePlan {
            shape: *shape,
            batch_size: table.batch_size(),
            num_qo_heads,
            sm_scale,
            logits_soft_cap: options.logits_soft_cap,
            grid: (work.len() as u32, shape.num_kv_heads as u32, row_tiles as u32),
            split_requests,
            kv_indices: device.upload(&nonempty(&table.kv_indices))?,
            work: device.upload(&if work.is_empty() { vec![DecodeWorkItem::default()] } else { work })?,
            scratch: SplitBuffers::new(device, slots * num_qo_heads, shape.head_dim, split_requests * heads_blocks)?,
            metadata: (0, 0),
        };
        // `run` may launch on any stream: the uploads must be complete before it reads them.
        device.synchronize()?;
        let stream = device.stream();
        let metadata = (plan.kv_indices.device_ptr(stream).0, plan.work.device_ptr(stream).0);
        Ok(BatchDecodePlan { metadata, ..plan })
    }

    /// Elements of `q` and `out`: `batch × num_qo_heads × head_dim`.
    pub fn qo_elems(&self) -> usize {
        self.batch_size * self.num_qo_heads * self.shape.head_dim
    }

    /// Blocks of the decode launch (work items, KV heads, row tiles) and the number of
    /// requests split across several items (their parts are merged in the same launch).
    pub fn launch_shape(&self) -> ((u32, u32, u32), usize) {
        (self.grid, self.split_requests)
    }

    /// Attention of `q` (`[batch][num_qo_heads][head_dim]`) over layer `layer` of `cache`, into
    /// `out` (same shape) and, if given, the base-2 LSE `log2 Σ exp(s)` per (request, head) into
    /// `lse` (`[batch][num_qo_heads]`, −∞ for an empty sequence). Only launches, on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: KvDType>(
        &self,
        device: &Device,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        cache: &PagedKvCache<T>,
        layer: usize,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        if *cache.shape() != self.shape {
            return Err(Error::ShapeMismatch { planned: self.shape, got: *cache.shape() });
        }
        let dtype = self.check::<T>(q.len(), out.len(), lse.as_ref().map(|l| l.len()))?;
        let pools = cache.layer(layer)?;
        let ops = Operands::new(stream, q, &pools.k, &pools.v, out, lse);
        let (scratch, _guards) = self.scratch.on(stream);
        // SAFETY: the cache's pools have the planned shape; q, out and lse were checked; every
        // buffer lives until after the launch (guards above, plan borrowed).
        unsafe { self.launch(device, LaunchStream::Cudarc(stream), dtype, &ops.addresses, scratch) }
    }

    /// [`run`](Self::run) for stacks not on cudarc: `q` and `out` as in `run`, `k_pages` and
    /// `v_pages` one layer's pools (`shape.pool_elems()` elements each, laid out as the plan's
    /// shape says), on the raw stream `stream`. Lengths are checked as in `run`.
    ///
    /// # Safety
    /// Every slice satisfies [`RawSlice::new`]'s contract; `stream` is a live stream of
    /// `device`'s context; nothing else writes `q`, the pools or `lse` while the launch runs, and
    /// nothing reads or writes `out` and `lse` until it has completed; runs of this plan are
    /// ordered on the GPU (its scratch is reused by each).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_raw<T: KvDType>(
        &self,
        device: &Device,
        stream: CUstream,
        q: RawSlice<T>,
        k_pages: RawSlice<T>,
        v_pages: RawSlice<T>,
        out: RawSlice<T>,
        lse: Option<RawSlice<f32>>,
    ) -> Result<()> {
        let dtype = self.check::<T>(q.len(), out.len(), lse.map(|l| l.len()))?;
        let pool = self.shape.pool_elems();
        check_lengths(&[("k_pages", k_pages.len(), pool), ("v_pages", v_pages.len(), pool)])?;
        let ops = Addresses::raw(q, k_pages, v_pages, out, lse);
        self.launch(device, LaunchStream::Raw(stream), dtype, &ops, self.scratch.raw())
    }

    /// Checks the element type and the lengths of q, out and lse; returns the dtype's kernel index.
    fn check<T: KvDType>(&self, q: usize, out: usize, lse: Option<usize>) -> Result<usize> {
        let rows = self.batch_size * self.num_qo_heads;
        check_operands::<T>("decode attention", rows, self.shape.head_dim, q, out, lse)
    }

    /// # Safety
    /// `ops` passed the plan's checks and are live until the launch completes; `scratch` is
    /// the plan's.
    unsafe fn launch(
        &self,
        device: &Device,
        stream: LaunchStream,
        dtype: usize,
        ops: &Addresses,
        scratch: SplitScratch,
    ) -> Result<()> {
        if self.grid.0 == 0 {
            return Ok(());
        }
        let s = &self.shape;
        let params = DecodeParams {
            q: ops.q,
            cache: paged_cache_params(s, ops, self.metadata.0),
            work: self.metadata.1,
            out: ops.out,
            lse: ops.lse,
            split: scratch,
            num_qo_heads: self.num_qo_heads as u32,
            num_items: self.grid.0,
            group_size: (self.num_qo_heads / s.num_kv_heads) as u32,
            sm_scale: self.sm_scale,
            logits_soft_cap: self.logits_soft_cap,
        };
        let head_dim = s.head_dim as u32;
        let blocks = self.grid.0 * self.grid.1 * self.grid.2;
        let cfg = launch_config((blocks, 1), decode_threads(head_dim), decode_smem_bytes(head_dim));
        // SAFETY: the table was validated against this shape when planning; the work items
        // address only positions below each request's kv_len; partial slots and merge counters
        // were sized by the plan; the caller vouches for the operands.
        device.launch(
            &device.kernels.decode[dtype][kernel_head_dim(s.head_dim)],
            cfg,
            stream,
            &params,
            "launching batch decode",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
