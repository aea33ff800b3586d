//! Batch prefill attention over the paged cache, plan-then-run like FlashInfer's
//! `BatchPrefillWithPagedKVCacheWrapper`: request `i` has `qo_len(i)` new query tokens (rows
//! `qo_indptr[i]..qo_indptr[i + 1]` of `q`) attending over its `kv_len(i)` cached tokens (the new
//! ones included, at the end), `out = softmax(sm_scale · q·Kᵀ) · V` in f32. With `causal`, query
//! `j` sees keys up to its own position `kv_len − qo_len + j`; causal and windowed batches need
//! `kv_len ≥ qo_len`, others take any number of queries (cascade's shared level). Prefill, chunked
//! prefill and append-attention are all this. `plan` validates and cuts the work into blocks of
//! 64 or 128 query rows (by the batch's query lengths), longest key range first, and uploads it
//! asynchronously; `run` only launches, so it can be captured in a CUDA graph.
//!
//! Two kernels run the same work items: the portable one (`mma.sync`, every GPU) and, on
//! compute capability 9.0 (H100, H200), the Hopper one (`wgmma`, warp-specialised, 128-row
//! tiles, persistent blocks that each run a list of them, dealt by `plan` longest first to the
//! least loaded), which `plan` picks for batches of long queries, over 16-bit caches at
//! head_dim 64, 128 and 256 and over 8-bit ones at 64 and 128; see [`PrefillKernel`]. A plan
//! with a custom mask ([`CustomMask`]: `new_masked` and kin) always runs the portable kernel in 64-row
//! blocks, the only one that reads a mask.
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::decode::{DecodeOptions, DecodeWork};
use super::{check_head_dim, check_heads_and_options, split_chunk};
use crate::cache::layout::{CacheShape, KvLayout, MAX_INDEX};
use crate::cache::page_table::{validate_indptr, PageTable};
use crate::cache::paged::PagedKvCache;
use crate::error::{Error, Result};
use crate::plan::{as_bytes, paged_cache_params, Addresses, AttentionLaunch, PlanCore, ScratchLayout};
use crate::runtime::abi::{
    hopper_prefill_bars_offset, hopper_prefill_ping_pong, hopper_prefill_tile_tokens, prefill_smem_bytes,
    prefill_threads, FastDiv, PrefillParams, PrefillWorkItem, SplitScratch, DECODE_ROWS, DECODE_TILE_TOKENS,
    HOPPER_PREFILL_ROWS, HOPPER_PREFILL_THREADS, HOPPER_PRODUCER_THREADS, NO_PARTIAL, PREFILL_TILE_TOKENS,
};
use crate::runtime::device::Device;
use crate::runtime::dtype::{DType, KvDType};
use crate::runtime::kernels::{prefill_block_rows, qk_vo_head_dims, qk_vo_prefill_kernels, Kernel, Kernels};
use crate::runtime::raw::RawSlice;

/// Run-time options, as FlashInfer's `plan` takes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefillOptions {
    /// Query `j` of a request sees keys up to its position `kv_len − qo_len + j` only.
    pub causal: bool,
    /// Multiplies `q · k`; `None` means `1 / √head_dim`.
    pub sm_scale: Option<f32>,
    /// `cap` in `cap · tanh(s / cap)` applied to the scaled logits; 0 for none.
    pub logits_soft_cap: f32,
    /// Query `j` sees keys at positions `≥ kv_len − qo_len + j − window_left` only; −1 for no
    /// window.
    pub window_left: i32,
    /// The element type of the cache the plan runs over (FlashInfer's `kv_data_type`):
    /// `None` for the queries' own type; [`DType::E4M3`] or [`DType::E5M2`] for an 8-bit cache.
    /// A run over a cache of another type is an error.
    pub kv_dtype: Option<DType>,
    /// The head dim of values and outputs where it differs from queries' and keys' (FlashInfer's
    /// `head_dim_vo`; `None`: the same): ragged plans only, 16-bit K/V, the pairs
    /// [`qk_vo_head_dims`](crate::qk_vo_head_dims) lists (DeepSeek-style prefill's 192 and 128).
    pub head_dim_vo: Option<usize>,
}

impl Default for PrefillOptions {
    fn default() -> Self {
        PrefillOptions::DEFAULT
    }
}

impl PrefillOptions {
    /// The defaults (`Default::default()` in a `const`): no causal mask, `1/√head_dim`, no soft
    /// cap, no window, the query's own KV type, values as wide as the keys.
    pub const DEFAULT: PrefillOptions = PrefillOptions {
        causal: false,
        sm_scale: None,
        logits_soft_cap: 0.0,
        window_left: -1,
        kv_dtype: None,
        head_dim_vo: None,
    };
    /// [`DEFAULT`](Self::DEFAULT) with the causal mask (a prompt's usual prefill).
    pub const CAUSAL: PrefillOptions = PrefillOptions { causal: true, ..PrefillOptions::DEFAULT };

    /// Values' and outputs' head dim for queries and keys of `head_dim`.
    fn vo_dim(&self, head_dim: usize) -> usize {
        self.head_dim_vo.unwrap_or(head_dim)
    }
}

/// A custom attention mask for batch prefill (FlashInfer's `custom_mask` and
/// `packed_custom_mask`): request `i` has a `qo_len(i) × kv_len(i)` boolean mask, query after
/// query; entry `(j, key)` true keeps query `j`'s logit of `key`, false sets it to −∞ before the
/// softmax (after the scale and soft cap). A query whose keys are all masked gets zeros and an
/// LSE of −∞, as over an empty sequence. This is how a speculative-decoding token tree is
/// verified in one call: each draft token sees the prefix and its ancestors.
///
/// With a mask, `causal` is ignored (FlashInfer's rule); a window (`window_left`) still
/// applies, on top of the mask. Masked plans run the portable kernel in 64-row blocks
/// ([`PrefillKernel::Portable`]) on every GPU.
#[derive(Clone, Copy, Debug)]
pub enum CustomMask<'a> {
    /// The requests' masks flattened, request after request (FlashInfer's `custom_mask`):
    /// `Σ qo_len · kv_len` entries. The plan packs them.
    Flat(&'a [bool]),
    /// Bit-packed (FlashInfer's `packed_custom_mask` and `mask_indptr`, as
    /// `flashinfer.segment_packbits` makes them): request `i`'s mask is bytes
    /// `indptr[i]..indptr[i + 1]` of `bits`, `⌈qo_len · kv_len / 8⌉` of them, entry `e` of its
    /// flattened mask in bit `e % 8` (little-endian bit order) of byte `e / 8`.
    Packed {
        /// The packed masks, `indptr`'s last entry bytes.
        bits: &'a [u8],
        /// `batch_size + 1` byte offsets, from 0.
        indptr: &'a [u32],
    },
}

/// Zero bytes after a mask as the plan uploads it: the kernel reads three 32-bit words from
/// the word holding a row's first bit, which starts at most 7 bits past a request's last bit.
const MASK_PADDING: usize = 16;

/// Most bits of one request's mask (`qo_len × kv_len`): the kernel indexes them in 32 bits.
const MAX_REQUEST_MASK_BITS: usize = u32::MAX as usize - 64;

/// One byte of a flattened mask's entries: entry `i` in bit `i` (little-endian bit order).
fn pack_byte(entries: &[bool]) -> u8 {
    entries.iter().rev().fold(0, |byte, &keep| byte << 1 | keep as u8)
}

impl CustomMask<'_> {
    /// Validates the mask against the batch (`qo_indptr` and `kv_lens` valid, of one length
    /// less and equal) and lays it out for the kernel: each request's bits from a fresh 32-bit
    /// word, [`MASK_PADDING`] zero bytes after the last. Returns the bytes and each request's
    /// first word.
    fn packed_for(&self, qo_indptr: &[u32], kv_lens: &[usize]) -> Result<(Vec<u8>, Vec<u32>)> {
        let bits: Vec<usize> =
            kv_lens.iter().enumerate().map(|(i, &kv)| (qo_indptr[i + 1] - qo_indptr[i]) as usize * kv).collect();
        match *self {
            CustomMask::Flat(mask) => {
                let expected = bits.iter().sum();
                if mask.len() != expected {
                    return Err(Error::MaskLength { what: "custom_mask", got: mask.len(), expected });
                }
            }
            CustomMask::Packed { bits: bytes, indptr } => {
                validate_indptr("mask_indptr", indptr, kv_lens.len())?;
                for (seq, (&n, w)) in bits.iter().zip(indptr.windows(2)).enumerate() {
                    let (got, expected) = ((w[1] - w[0]) as usize, n.div_ceil(8));
                    if got != expected {
                        let (qo_len, kv_len) = ((qo_indptr[seq + 1] - qo_indptr[seq]) as usize, kv_lens[seq]);
                        return Err(Error::MaskSegment { seq, got, expected, qo_len, kv_len });
                    }
                }
                let expected = indptr[indptr.len() - 1] as usize;
                if bytes.len() != expected {
                    return Err(Error::MaskLength { what: "packed_custom_mask", got: bytes.len(), expected });
                }
            }
        }
        if let Some(&value) = bits.iter().find(|&&n| n > MAX_REQUEST_MASK_BITS) {
            let what = "custom mask bits of one request (qo_len × kv_len)";
            return Err(Error::TooLarge { what, value, max: MAX_REQUEST_MASK_BITS });
        }
        let (mut packed, mut words, mut entry) = (Vec::new(), Vec::with_capacity(bits.len()), 0);
        for (seq, &n) in bits.iter().enumerate() {
            words.push(packed.len() / 4);
            match *self {
                CustomMask::Flat(mask) => packed.extend(mask[entry..entry + n].chunks(8).map(pack_byte)),
                CustomMask::Packed { bits: bytes, indptr } => {
                    packed.extend_from_slice(&bytes[indptr[seq] as usize..indptr[seq + 1] as usize])
                }
            }
            entry += n;
            packed.resize(packed.len().next_multiple_of(4), 0);
        }
        if packed.len() / 4 > u32::MAX as usize {
            return Err(Error::TooLarge { what: "custom mask words", value: packed.len() / 4, max: u32::MAX as usize });
        }
        packed.resize(packed.len() + MASK_PADDING, 0);
        Ok((packed, words.into_iter().map(|w| w as u32).collect()))
    }
}

/// Sets each work item's `mask_word` to its request's first mask word (`words[request]`) past
/// `first_word`, where the mask starts. Items exist only for requests with queries, and such a
/// request is the last whose `qo_indptr` entry is at most its first query token.
/// The work part of a prefill plan with a custom mask: its work items, then the mask packed
/// right after them (each item told where its request's bits start, by their offset in 32-bit
/// words from the first item); `None` without a mask (the items alone are the part). The batch
/// (`qo_indptr`, `kv_lens`) is already valid; the mask is checked against it here.
pub fn prefill_work_bytes(
    work: &mut [PrefillWorkItem],
    mask: Option<&CustomMask>,
    qo_indptr: &[u32],
    kv_lens: &[usize],
) -> Result<Option<Vec<u8>>> {
    let Some(mask) = mask else { return Ok(None) };
    let (packed, words) = mask.packed_for(qo_indptr, kv_lens)?;
    let first_word = std::mem::size_of_val(work) / 4;
    let last_word = first_word + packed.len() / 4;
    if last_word > u32::MAX as usize {
        let what = "custom mask and work items (32-bit words)";
        return Err(Error::TooLarge { what, value: last_word, max: u32::MAX as usize });
    }
    set_mask_words(work, qo_indptr, &words, first_word as u32);
    Ok(Some([as_bytes(work), &packed].concat()))
}

fn set_mask_words(work: &mut [PrefillWorkItem], qo_indptr: &[u32], words: &[u32], first_word: u32) {
    for item in work {
        let request = qo_indptr.partition_point(|&q| q <= item.q_start) - 1;
        item.mask_word = first_word + words[request];
    }
}

/// The prefill kernel a plan launches; both take the same work items and parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// `mma.sync` (sm_80+), blocks of 64 or 128 packed query rows.
    Portable {
        /// Packed query rows of a block.
        block_rows: u32,
    },
    /// Hopper's `wgmma` with a producer warpgroup and two consumer warpgroups (compute
    /// capability 9.0 only), blocks of 128 packed query rows.
    Hopper,
    /// The decode kernel (every GPU), for a batch of draft tokens: every request with the same
    /// few query tokens, a KV head's `tokens × group` packed rows in one 16-row tile
    /// ([`BatchPrefillPlan`] says when).
    Decode,
}

impl std::fmt::Display for PrefillKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefillKernel::Portable { block_rows } => write!(f, "portable {block_rows}"),
            PrefillKernel::Hopper => write!(f, "hopper"),
            PrefillKernel::Decode => write!(f, "decode"),
        }
    }
}

impl PrefillKernel {
    /// Packed query rows of a block.
    pub fn block_rows(self) -> u32 {
        match self {
            PrefillKernel::Portable { block_rows } => block_rows,
            PrefillKernel::Hopper => HOPPER_PREFILL_ROWS,
            PrefillKernel::Decode => DECODE_ROWS,
        }
    }

    /// Keys a block stages at a time (splits are cut in whole tiles of them).
    fn tile_tokens(self, head_dim: u32) -> u32 {
        match self {
            PrefillKernel::Portable { .. } => PREFILL_TILE_TOKENS,
            PrefillKernel::Decode => DECODE_TILE_TOKENS,
            // The 16-bit cache's tile, a multiple of the 8-bit one's.
            PrefillKernel::Hopper => hopper_prefill_tile_tokens(head_dim, 2),
        }
    }

    /// Most parts a split row tile may have: the merging block stages 8 sums per thread,
    /// (parts + 1) weights per row and a flag in its shared memory (the Hopper kernel's
    /// below its mbarriers, with its consumer threads).
    /// Values (and outputs) have `head_dim_vo` dims, queries and keys `head_dim`.
    fn max_parts(self, head_dim: u32, head_dim_vo: u32) -> usize {
        let words = match self {
            // Whatever the cache's element type: the smaller block's shared memory.
            PrefillKernel::Portable { block_rows } => {
                let smem = |kv_bytes| prefill_smem_bytes(head_dim, head_dim_vo, block_rows / 64, kv_bytes);
                smem(1).min(smem(2)) / 4 - 1 - 8 * prefill_threads(head_dim_vo)
            }
            // Below the mbarriers, whatever the cache's element type.
            PrefillKernel::Hopper => {
                hopper_prefill_bars_offset(head_dim, 1).min(hopper_prefill_bars_offset(head_dim, 2)) / 4
                    - 8 * (HOPPER_PREFILL_THREADS - HOPPER_PRODUCER_THREADS)
            }
            // Planned by decode's own split (`decode_split_tokens`), never by prefill's.
            PrefillKernel::Decode => return 1,
        };
        words as usize / self.block_rows() as usize - 1
    }
}

/// A validated prefill batch with its work items on the device.
///
/// When the batch's row tiles alone cannot fill the GPU (one long request among short ones),
/// `plan` splits the keys of the long tiles over several blocks and the last of them merges
/// the parts by their LSE in the same launch. The plan holds that scratch and its [`Device`];
/// `run` takes `&mut self` and the scratch is tracked as written, so runs of one plan on
/// different streams are ordered by cudarc's event tracking. `replan` re-plans the next batch
/// into the same buffers without waiting for the GPU.
///
/// ```no_run
/// use ferrinfer::{f16, BatchPrefillPlan, CacheShape, Device, KvLayout, PagedKvCache, PageTable, PrefillOptions};
///
/// let dev = Device::new(0)?;
/// let shape = CacheShape { num_pages: 1024, page_size: 16, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
/// let cache = PagedKvCache::<f16>::new(&dev, shape, 1)?;
/// // One request of 39 cached tokens whose last 10 are new: a chunk of a prompt.
/// let table = PageTable { kv_indptr: vec![0, 3], kv_indices: vec![5, 9, 2], kv_last_page_len: vec![7] };
/// let causal = PrefillOptions { causal: true, ..Default::default() };
/// let mut plan = BatchPrefillPlan::new(&dev, &shape, 32, &[0, 10], &table, causal)?;
/// let q = dev.alloc_zeros::<f16>(plan.qo_elems())?; // [10 tokens][32 heads][128]
/// let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
/// plan.run(dev.stream(), &q, &cache, 0, &mut out, None)?;
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct BatchPrefillPlan {
    core: PlanCore,
    work: PrefillWork,
    /// A batch of draft tokens planned on the decode kernel ([`PrefillKernel::Decode`]); `work`
    /// then describes the batch for the plan's accessors.
    decode: Option<DecodeWork>,
}

/// The query tokens a request of a batch whose shape decode computes, or `None` for the
/// prefill kernels, from its shape alone (`group` query heads a KV head). Speculative decoding
/// verifies the same few draft tokens for every request: their `tokens × group` packed rows fit
/// one 16-row tile of decode's `mma`, which reads each K/V byte once for them, where a 64- or
/// 128-row prefill block computes mostly padding beside the same bytes (measured: the decode
/// kernel at one-token decode's time, 1–3% ahead of both prefill kernels; docs/perf.md). Only
/// what decode computes: the same count for every request, no custom mask, window or narrower
/// values, K/V as the cache's pools (or ragged rows) lay them out.
fn draft_tokens(
    shape: &CacheShape,
    group: usize,
    qo_indptr: &[u32],
    options: &PrefillOptions,
    masked: bool,
    kv_elems: usize,
) -> Option<usize> {
    let tokens = qo_indptr.get(1)?.checked_sub(qo_indptr[0])? as usize;
    let uniform = qo_indptr.windows(2).all(|w| w[1].wrapping_sub(w[0]) as usize == tokens);
    let computes = !masked && options.window_left < 0 && options.vo_dim(shape.head_dim) == shape.head_dim;
    let fits = tokens >= 1 && tokens * group <= DECODE_ROWS as usize;
    (uniform && computes && fits && kv_elems == shape.pool_elems()).then_some(tokens)
}

/// Whether `device` runs `tokens` draft tokens a request ([`draft_tokens`]) on decode: a
/// handle that picks its kernels ([`Device::with_portable_kernels`] and
/// [`Device::with_hopper_prefill`] keep to theirs), with a decode kernel for the cache's type
/// (over an 8-bit cache, one token a request).
fn decode_runs_drafts(device: &Device, shape: &CacheShape, tokens: usize, options: &PrefillOptions) -> bool {
    let kv_dtype = options.kv_dtype.unwrap_or(DType::F16);
    let kernel = if tokens == 1 {
        device.kernels().decode(if kv_dtype.is_fp8() { DType::F16 } else { kv_dtype }, kv_dtype, shape.head_dim)
    } else {
        device.kernels().decode_multi_token(kv_dtype, kv_dtype, shape.head_dim)
    };
    device.chooses_prefill_kernel() && kernel.is_ok()
}

/// The row tiles of a batch: each request's packed rows (`token · group + head`) in runs of
/// `tile_rows`, each with the key range its rows may see.
pub(crate) fn row_tiles(
    qo_indptr: &[u32],
    kv_lens: &[usize],
    kv_indptr: &[u32],
    group: usize,
    tile_rows: usize,
    options: &PrefillOptions,
) -> Vec<PrefillWorkItem> {
    let mut work = Vec::new();
    for (request, &kv_len) in kv_lens.iter().enumerate() {
        let qo_len = (qo_indptr[request + 1] - qo_indptr[request]) as usize;
        // Only causal and windowed plans use positions, and those have kv_len ≥ qo_len.
        let (diag, rows) = (kv_len.saturating_sub(qo_len), qo_len * group);
        for first_row in (0..rows).step_by(tile_rows) {
            let (first_token, last_token) = (first_row / group, ((first_row + tile_rows).min(rows) - 1) / group);
            let kv_end = if options.causal { diag + last_token + 1 } else { kv_len };
            let kv_start = match options.window_left {
                -1 => 0,
                w => (diag + first_token).saturating_sub(w as usize),
            };
            work.push(PrefillWorkItem {
                pages: kv_indptr[request],
                q_start: qo_indptr[request],
                qo_len: qo_len as u32,
                kv_len: kv_len as u32,
                first_row: first_row as u32,
                kv_start: kv_start as u32,
                kv_end: kv_end as u32,
                slot: NO_PARTIAL,
                parts: 1,
                ..Default::default()
            });
        }
    }
    work
}

/// The blocks of a batch: its row tiles, the keys of those longer than `chunk` (when given)
/// split into parts with consecutive partial slots and one merge counter per KV head, longest
/// key range first so the slowest blocks start in the first wave. Returns the items, the
/// slots and the split tiles.
pub(crate) fn split_tiles(
    tiles: Vec<PrefillWorkItem>,
    chunk: Option<usize>,
    num_kv_heads: usize,
) -> (Vec<PrefillWorkItem>, usize, usize) {
    let (mut work, mut slots, mut split) = (Vec::new(), 0u32, 0u32);
    for tile in tiles {
        let span = (tile.kv_end - tile.kv_start) as usize;
        let parts = chunk.map_or(1, |c| span.div_ceil(c).max(1));
        if parts == 1 {
            work.push(tile);
            continue;
        }
        for part in 0..parts {
            work.push(PrefillWorkItem {
                kv_start: tile.kv_start + (part * span / parts) as u32,
                kv_end: tile.kv_start + ((part + 1) * span / parts) as u32,
                slot: slots + part as u32,
                first_slot: slots,
                parts: parts as u32,
                counters: split * num_kv_heads as u32,
                ..tile
            });
        }
        slots += parts as u32;
        split += 1;
    }
    work.sort_by_key(|w| std::cmp::Reverse(w.kv_end - w.kv_start));
    (work, slots as usize, split as usize)
}

/// A Hopper block's time for one unit (item, KV head), in eighths of a key tile: each key tile,
/// less [`HOPPER_HALVED_TILE_SAVING`] for a last tile run at half width, plus
/// [`HOPPER_UNIT_OVERHEAD`] (the queries' load, the diagonal tile's mask, the output). Fitted to
/// the H200's times at 8 × 1024 and 8 × 4096 tokens (docs/perf.md, nineteenth session): about
/// 2 µs a tile, a halved one about two thirds of that, 3.5 µs a unit beyond its tiles.
const HOPPER_UNIT_OVERHEAD: u64 = 14;
const HOPPER_HALVED_TILE_SAVING: u64 = 3;

/// [`persistent_schedule`]'s cost of a unit of `w`: see [`HOPPER_UNIT_OVERHEAD`]. The kernel runs
/// the last of its `tile_tokens`-key tiles at half width when it holds at most half a tile of
/// keys, with ping-pong (`halves`): the key range's end is already the last row's (causal,
/// window) or the item's.
fn hopper_unit_cost(w: &PrefillWorkItem, tile_tokens: u32, halves: bool) -> u64 {
    let span = w.kv_end - w.kv_start;
    let tiles = span.div_ceil(tile_tokens);
    let halved = halves && tiles > 0 && span - (tiles - 1) * tile_tokens <= tile_tokens / 2;
    8 * tiles as u64 - if halved { HOPPER_HALVED_TILE_SAVING } else { 0 } + HOPPER_UNIT_OVERHEAD
}

/// The Hopper kernel's persistent schedule ([`PrefillParams::schedule`]) for `work`: its units
/// (item, KV head), costed by [`hopper_unit_cost`], dealt to at most `ctas` blocks longest first,
/// each to the block with the least work so far (FlashInfer's Hopper planner does the same).
/// Each block runs its units longest first. (Evening out the deal afterwards by moves and swaps
/// between the most and the least loaded blocks was tried: it doubled the planning time and
/// took the longest block from 1.3% to 1.0% above the mean at 8 × 1024.) A split item's last
/// part merges in the ring's shared memory, so with split items every unit gets a block of its
/// own. Returns the schedule and its blocks.
pub fn persistent_schedule(
    work: &[PrefillWorkItem],
    num_kv_heads: usize,
    tile_tokens: u32,
    halves: bool,
    ctas: usize,
) -> (Vec<u32>, usize) {
    use std::cmp::Reverse;
    let units = work.len() * num_kv_heads;
    let split = work.iter().any(|w| w.slot != NO_PARTIAL);
    let ctas = if split { units } else { ctas.max(1).min(units) };
    let item_costs: Vec<u64> = work.iter().map(|w| hopper_unit_cost(w, tile_tokens, halves)).collect();
    let cost = |unit: u32| item_costs[unit as usize / num_kv_heads.max(1)];
    // Costliest first: the items in that order, each with its KV heads (so each block's list
    // comes out longest first too).
    let mut items: Vec<usize> = (0..work.len()).collect();
    items.sort_by_key(|&i| Reverse(item_costs[i]));
    let order = items.into_iter().flat_map(|i| (0..num_kv_heads).map(move |h| (i * num_kv_heads + h) as u32));
    let mut lists = vec![Vec::new(); ctas];
    let mut least_loaded: std::collections::BinaryHeap<Reverse<(u64, usize)>> =
        (0..ctas).map(|cta| Reverse((0, cta))).collect();
    for unit in order {
        let Some(Reverse((load, cta))) = least_loaded.pop() else { break };
        lists[cta].push(unit);
        least_loaded.push(Reverse((load + cost(unit), cta)));
    }
    let mut schedule = Vec::with_capacity(ctas + 1 + units);
    let mut at = (ctas + 1) as u32;
    for list in &lists {
        schedule.push(at);
        at += list.len() as u32;
    }
    schedule.push(at);
    schedule.extend(lists.into_iter().flatten());
    (schedule, ctas)
}

/// A prefill batch's work split: what a plan uploads.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefillSplit {
    /// One per work item (a row tile, or a part of a split one); each runs for every KV head.
    pub work: Vec<PrefillWorkItem>,
    /// Partial slots of split row tiles.
    pub slots: usize,
    /// Row tiles split over several items.
    pub split_tiles: usize,
    /// Query heads per KV head.
    pub group_size: usize,
    /// The kernel, and so the packed query rows of each item's tile.
    pub kernel: PrefillKernel,
    /// Query tokens of the batch.
    pub total_q: usize,
    /// The resolved `sm_scale`.
    pub sm_scale: f32,
}

/// Which batches a plan may give the Hopper (`wgmma`) kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopperPrefill {
    /// None: the GPU has no Hopper kernel for the batch's types and head_dim, or the device
    /// handle keeps to the portable kernels (`Device::with_portable_kernels`).
    Never,
    /// Batches of long queries ([`long_queries`]): the plan's own choice.
    LongQueries,
    /// Every batch it can run, whatever its queries' length (`Device::with_hopper_prefill`).
    Always,
}

/// Whether a batch's requests average more than 64 packed query rows: then each K/V row a
/// block loads serves 128 rows, where shorter requests would mostly fill a 128-row block with
/// padding.
fn long_queries(num_qo_heads: usize, num_kv_heads: usize, qo_indptr: &[u32]) -> bool {
    let (requests, tokens) = (qo_indptr.len().saturating_sub(1), *qo_indptr.last().unwrap_or(&0) as usize);
    tokens * (num_qo_heads / num_kv_heads.max(1)) > 64 * requests
}

/// The block height a batch prefers on the portable kernel: 128 rows for long queries
/// ([`long_queries`]: each K/V fragment a warp loads then serves twice the tensor-core ops),
/// else 64. The tallest of `heights` (the kernels built for the head_dim) that is not taller
/// than wanted.
pub fn preferred_block_rows(heights: &[u32], num_qo_heads: usize, num_kv_heads: usize, qo_indptr: &[u32]) -> u32 {
    let wanted = if long_queries(num_qo_heads, num_kv_heads, qo_indptr) { 128 } else { 64 };
    heights.iter().copied().filter(|&h| h <= wanted).max().or(heights.first().copied()).unwrap_or(64)
}

/// The work split for a prefill batch on `kernel` (its blocks of packed query rows), worked out
/// without a GPU for a device of `sms` multiprocessors holding `blocks_per_sm` of those blocks
/// each: the validation and every work item (for plans, and for fuzzing the planner against a
/// bounds model).
#[allow(clippy::too_many_arguments)]
pub fn prefill_split(
    shape: &CacheShape,
    num_qo_heads: usize,
    qo_indptr: &[u32],
    table: &PageTable,
    options: PrefillOptions,
    kernel: PrefillKernel,
    sms: usize,
    blocks_per_sm: usize,
) -> Result<PrefillSplit> {
    check_prefill_head_dims(shape.head_dim, &options)?;
    let (group_size, sm_scale) =
        check_heads_and_options(shape, num_qo_heads, options.sm_scale, options.logits_soft_cap, options.window_left)?;
    table.validate(shape.page_size, shape.num_pages)?;
    let positioned = options.causal || options.window_left >= 0;
    let (kv_lens, total_q) = check_queries(table, shape.page_size, qo_indptr, num_qo_heads, positioned)?;
    // Split the keys of long row tiles only when the tiles alone cannot fill the GPU.
    let tile_rows = kernel.block_rows() as usize;
    let tiles = row_tiles(qo_indptr, &kv_lens, &table.kv_indptr, group_size, tile_rows, &options);
    let spans: Vec<usize> = tiles.iter().map(|t| (t.kv_end - t.kv_start) as usize).collect();
    let capacity = sms * blocks_per_sm;
    let dim = shape.head_dim as u32;
    let vo = options.vo_dim(shape.head_dim) as u32;
    let chunk = split_chunk(&spans, kernel.tile_tokens(dim), shape.num_kv_heads, capacity, kernel.max_parts(dim, vo));
    let (work, slots, split) = split_tiles(tiles, chunk, shape.num_kv_heads);
    let blocks = work.len() * shape.num_kv_heads;
    if blocks > i32::MAX as usize {
        return Err(Error::TooLarge {
            what: "prefill blocks (row tiles × KV heads)",
            value: blocks,
            max: i32::MAX as usize,
        });
    }
    Ok(PrefillSplit { work, slots, split_tiles: split, group_size, kernel, total_q, sm_scale })
}

/// Checks a batch's queries against its page table (valid for pages of `page_size`):
/// `qo_indptr` describes the table's requests; with `positioned` (a causal mask or a window)
/// query `j` sits at key position `kv_len − qo_len + j`, so the queries must be among the keys
/// (without, any number of queries may attend: the multi-query form cascade attention's shared
/// level uses); the packed rows (tokens × heads) stay within the kernels' 32-bit indexing.
/// Returns each request's kv_len and the batch's query tokens.
pub(crate) fn check_queries(
    table: &PageTable,
    page_size: usize,
    qo_indptr: &[u32],
    num_qo_heads: usize,
    positioned: bool,
) -> Result<(Vec<usize>, usize)> {
    let batch = table.batch_size();
    validate_indptr("qo_indptr", qo_indptr, batch)?;
    let kv_lens = table.kv_lens(page_size);
    for (seq, &kv_len) in kv_lens.iter().enumerate() {
        let qo_len = (qo_indptr[seq + 1] - qo_indptr[seq]) as usize;
        if qo_len > kv_len && positioned {
            return Err(Error::QueryLongerThanKeys { seq, qo_len, kv_len });
        }
    }
    let total_q = qo_indptr[batch] as usize;
    let rows = total_q * num_qo_heads;
    if rows > MAX_INDEX {
        return Err(Error::TooLarge { what: "query rows (tokens × query heads)", value: rows, max: MAX_INDEX });
    }
    Ok((kv_lens, total_q))
}

/// Checks that prefill kernels exist for queries and keys of `head_dim` and the values of
/// `options.head_dim_vo`: one head dim of `attention_head_dims`, or a pair of
/// [`qk_vo_head_dims`] over 16-bit K/V.
fn check_prefill_head_dims(head_dim: usize, options: &PrefillOptions) -> Result<()> {
    let head_dim_vo = options.vo_dim(head_dim);
    if head_dim_vo == head_dim {
        return check_head_dim(head_dim);
    }
    if !qk_vo_head_dims().contains(&(head_dim, head_dim_vo)) {
        return Err(Error::UnsupportedHeadDims { head_dim_qk: head_dim, head_dim_vo, supported: qk_vo_head_dims() });
    }
    match options.kv_dtype {
        Some(dtype) if dtype.size_bytes() == 1 => Err(Error::UnsupportedDType {
            what: "prefill with head_dim_vo other than head_dim (16-bit K/V only)",
            dtype: dtype.name(),
        }),
        _ => Ok(()),
    }
}

/// The split `plan` uploads. Where `hopper` allows the Hopper kernel, batches of long queries
/// ([`long_queries`]), or with [`HopperPrefill::Always`] every batch, take it, split or not
/// (values as wide as the keys only). Otherwise the portable kernel at the
/// preferred block height, unless that height leaves the batch too few row tiles to fill the
/// GPU: a split tile's last part merges all its parts' rows alone, after the others, so when
/// keys must be split the shortest blocks win (more tiles, fewer parts each, smaller merges:
/// cascade's shared level is such a batch). `blocks_per_sm(kernel)` is its occupancy.
#[allow(clippy::too_many_arguments)]
pub fn plan_prefill_split(
    shape: &CacheShape,
    num_qo_heads: usize,
    qo_indptr: &[u32],
    table: &PageTable,
    options: PrefillOptions,
    hopper: HopperPrefill,
    sms: usize,
    blocks_per_sm: impl Fn(PrefillKernel) -> usize,
) -> Result<PrefillSplit> {
    let split_on =
        |kernel| prefill_split(shape, num_qo_heads, qo_indptr, table, options, kernel, sms, blocks_per_sm(kernel));
    let head_dim_vo = options.vo_dim(shape.head_dim);
    let take_hopper = match hopper {
        HopperPrefill::Never => false,
        HopperPrefill::LongQueries => long_queries(num_qo_heads, shape.num_kv_heads, qo_indptr),
        HopperPrefill::Always => true,
    };
    if take_hopper && head_dim_vo == shape.head_dim {
        return split_on(PrefillKernel::Hopper);
    }
    let heights: Vec<u32> = if head_dim_vo == shape.head_dim {
        prefill_block_rows(shape.head_dim)
    } else {
        let pair = |&(qk, vo, _): &(usize, usize, u32)| (qk, vo) == (shape.head_dim, head_dim_vo);
        qk_vo_prefill_kernels().iter().filter(|k| pair(k)).map(|&(_, _, rows)| rows).collect()
    };
    let preferred = preferred_block_rows(&heights, num_qo_heads, shape.num_kv_heads, qo_indptr);
    let split = split_on(PrefillKernel::Portable { block_rows: preferred })?;
    match heights.first() {
        Some(&lowest) if split.split_tiles > 0 && lowest < preferred => {
            split_on(PrefillKernel::Portable { block_rows: lowest })
        }
        _ => Ok(split),
    }
}

/// What a prefill launch needs besides its operands (the plan's host side).
struct PrefillWork {
    shape: CacheShape,
    num_qo_heads: usize,
    total_q: usize,
    options: PrefillOptions,
    sm_scale: f32,
    group_size: usize,
    /// The kernel, and so the packed query rows of a block.
    kernel: PrefillKernel,
    /// Blocks of the launch: items × KV heads, or the Hopper kernel's persistent blocks.
    blocks: usize,
    /// Elements of each of K and V the launch addresses (a paged plan: the pools'; a ragged
    /// one: the batch's rows).
    kv_elems: usize,
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    split_tiles: usize,
    /// The work items carry a custom mask: the 64-row kernel that reads one runs.
    custom_mask: bool,
}

impl AttentionLaunch for PrefillWork {
    type Params = PrefillParams;
    const WHAT: &'static str = "prefill attention";

    fn rows(&self) -> usize {
        self.total_q * self.num_qo_heads
    }
    fn num_qo_heads(&self) -> usize {
        self.num_qo_heads
    }
    fn head_dim(&self) -> usize {
        self.shape.head_dim
    }
    fn kv_elems(&self) -> usize {
        self.kv_elems
    }
    fn kv_dtype(&self) -> Option<DType> {
        self.options.kv_dtype
    }
    fn head_dim_vo(&self) -> usize {
        self.options.vo_dim(self.shape.head_dim)
    }
    fn v_elems(&self) -> usize {
        self.kv_elems / self.shape.head_dim * self.head_dim_vo()
    }
    fn kernel<'k>(&self, kernels: &'k Kernels, dtype: DType, kv_dtype: DType) -> Result<&'k Kernel> {
        let (head_dim, head_dim_vo) = (self.shape.head_dim, self.head_dim_vo());
        match self.kernel {
            PrefillKernel::Portable { block_rows } if head_dim_vo != head_dim => {
                if kv_dtype != dtype {
                    return Err(Error::UnsupportedDType {
                        what: "prefill with head_dim_vo other than head_dim (K/V of the queries' type only)",
                        dtype: kv_dtype.name(),
                    });
                }
                kernels.prefill_qk_vo(dtype, head_dim, head_dim_vo, block_rows)
            }
            PrefillKernel::Portable { .. } if self.custom_mask => kernels.prefill_masked(dtype, kv_dtype, head_dim),
            PrefillKernel::Portable { block_rows } => kernels.prefill(dtype, kv_dtype, self.shape.head_dim, block_rows),
            PrefillKernel::Hopper => kernels
                .prefill_hopper(dtype, kv_dtype, self.shape.head_dim)
                .ok_or(Error::UnsupportedDType { what: "prefill attention on Hopper", dtype: dtype.name() }),
            PrefillKernel::Decode => unreachable!("a plan on the decode kernel launches its `DecodeWork`"),
        }
    }
    fn blocks(&self) -> u32 {
        self.blocks as u32
    }
    fn params(&self, ops: &Addresses, parts: &[u64], split: SplitScratch) -> PrefillParams {
        let planned = (self.num_qo_heads, self.group_size, self.sm_scale);
        prefill_params(&self.shape, planned, &self.options, ops, parts, split)
    }
}

/// The parameter block of a prefill launch over a cache of `shape` with `(num_qo_heads,
/// group_size, sm_scale)` as planned ([`PrefillSplit`]), operands at `ops`, and the page
/// table's indices, the work items and the persistent schedule at `parts`: what a plan's run
/// passes (and, through `internals`, what the CPU emulator's launches pass).
pub fn prefill_params(
    shape: &CacheShape,
    (num_qo_heads, group_size, sm_scale): (usize, usize, f32),
    options: &PrefillOptions,
    ops: &Addresses,
    parts: &[u64],
    split: SplitScratch,
) -> PrefillParams {
    PrefillParams {
        q: ops.q,
        cache: paged_cache_params(shape, ops.k, ops.v, parts[0]),
        work: parts[1],
        schedule: parts[2],
        out: ops.out,
        lse: ops.lse,
        sinks: ops.sinks,
        split,
        num_qo_heads: num_qo_heads as u32,
        num_kv_heads: shape.num_kv_heads as u32,
        group_size: FastDiv::new(group_size as u32),
        sm_scale: sm_scale * ops.scales.k,
        v_scale: ops.scales.v,
        kv_head_scales: ops.head_scales,
        logits_soft_cap: options.logits_soft_cap,
        window_left: options.window_left,
        causal: options.causal as u32,
    }
}

impl BatchPrefillPlan {
    /// A plan on `device` with no work yet, for the constructors to replan.
    fn unplanned(device: &Device, shape: &CacheShape, num_qo_heads: usize) -> Result<Self> {
        Ok(BatchPrefillPlan {
            core: PlanCore::new(device)?,
            work: PrefillWork::empty(shape, num_qo_heads),
            decode: None,
        })
    }

    /// Plans prefill for the batch in `table` over a cache of `shape`: request `i`'s query
    /// tokens are rows `qo_indptr[i]..qo_indptr[i + 1]` of `q`, with `num_qo_heads` query heads
    /// (a multiple of `shape.num_kv_heads`), on `device`.
    pub fn new(
        device: &Device,
        shape: &CacheShape,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        table: &PageTable,
        options: PrefillOptions,
    ) -> Result<Self> {
        let mut plan = Self::unplanned(device, shape, num_qo_heads)?;
        plan.replan(shape, num_qo_heads, qo_indptr, table, options)?;
        Ok(plan)
    }

    /// Plans the next batch into this plan's buffers: validates and splits on the host, then
    /// enqueues the metadata's upload on the device's stream without waiting for the GPU. On an
    /// invalid batch nothing changes and the plan stays usable.
    pub fn replan(
        &mut self,
        shape: &CacheShape,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        table: &PageTable,
        options: PrefillOptions,
    ) -> Result<()> {
        if options.vo_dim(shape.head_dim) != shape.head_dim {
            return Err(Error::BadOption { what: "head_dim_vo other than head_dim needs a ragged plan" });
        }
        self.replan_with(shape, num_qo_heads, qo_indptr, table, None, options, shape.pool_elems())
    }

    /// [`new`](Self::new) with a custom mask (see [`CustomMask`]: `options.causal` is ignored,
    /// and the plan runs the portable kernel).
    pub fn new_masked(
        device: &Device,
        shape: &CacheShape,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        table: &PageTable,
        mask: CustomMask,
        options: PrefillOptions,
    ) -> Result<Self> {
        let mut plan = Self::unplanned(device, shape, num_qo_heads)?;
        plan.replan_masked(shape, num_qo_heads, qo_indptr, table, mask, options)?;
        Ok(plan)
    }

    /// [`replan`](Self::replan) with a custom mask, validated against the batch and uploaded
    /// with the plan's metadata.
    pub fn replan_masked(
        &mut self,
        shape: &CacheShape,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        table: &PageTable,
        mask: CustomMask,
        options: PrefillOptions,
    ) -> Result<()> {
        self.replan_with(shape, num_qo_heads, qo_indptr, table, Some(mask), options, shape.pool_elems())
    }

    /// Plans prefill over contiguous ("ragged") K and V, FlashInfer's
    /// `BatchPrefillWithRaggedKVCacheWrapper`: request `i`'s keys are rows
    /// `kv_indptr[i]..kv_indptr[i + 1]` of `k` and `v` (`[total_kv][num_kv_heads][head_dim]`),
    /// its queries rows `qo_indptr[i]..qo_indptr[i + 1]` of `q`. The paged kernel runs it: the
    /// rows are pages of one token each, listed in order.
    pub fn ragged(
        device: &Device,
        num_kv_heads: usize,
        head_dim: usize,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        kv_indptr: &[u32],
        options: PrefillOptions,
    ) -> Result<Self> {
        let empty = CacheShape { num_pages: 1, page_size: 1, num_kv_heads, head_dim, layout: KvLayout::Nhd };
        let mut plan = Self::unplanned(device, &empty, num_qo_heads)?;
        plan.replan_ragged(num_kv_heads, head_dim, num_qo_heads, qo_indptr, kv_indptr, options)?;
        Ok(plan)
    }

    /// [`ragged`](Self::ragged) with a custom mask (see [`CustomMask`]).
    #[allow(clippy::too_many_arguments)]
    pub fn ragged_masked(
        device: &Device,
        num_kv_heads: usize,
        head_dim: usize,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        kv_indptr: &[u32],
        mask: CustomMask,
        options: PrefillOptions,
    ) -> Result<Self> {
        let empty = CacheShape { num_pages: 1, page_size: 1, num_kv_heads, head_dim, layout: KvLayout::Nhd };
        let mut plan = Self::unplanned(device, &empty, num_qo_heads)?;
        plan.replan_ragged_masked(num_kv_heads, head_dim, num_qo_heads, qo_indptr, kv_indptr, mask, options)?;
        Ok(plan)
    }

    /// [`replan`](Self::replan) for a [`ragged`](Self::ragged) plan.
    pub fn replan_ragged(
        &mut self,
        num_kv_heads: usize,
        head_dim: usize,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        kv_indptr: &[u32],
        options: PrefillOptions,
    ) -> Result<()> {
        self.replan_ragged_with(num_kv_heads, head_dim, num_qo_heads, qo_indptr, kv_indptr, None, options)
    }

    /// [`replan_ragged`](Self::replan_ragged) with a custom mask (see [`CustomMask`]).
    #[allow(clippy::too_many_arguments)]
    pub fn replan_ragged_masked(
        &mut self,
        num_kv_heads: usize,
        head_dim: usize,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        kv_indptr: &[u32],
        mask: CustomMask,
        options: PrefillOptions,
    ) -> Result<()> {
        self.replan_ragged_with(num_kv_heads, head_dim, num_qo_heads, qo_indptr, kv_indptr, Some(mask), options)
    }

    #[allow(clippy::too_many_arguments)]
    fn replan_ragged_with(
        &mut self,
        num_kv_heads: usize,
        head_dim: usize,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        kv_indptr: &[u32],
        mask: Option<CustomMask>,
        options: PrefillOptions,
    ) -> Result<()> {
        validate_indptr("kv_indptr", kv_indptr, qo_indptr.len().saturating_sub(1))?;
        let total_kv = kv_indptr[kv_indptr.len() - 1] as usize;
        let shape =
            CacheShape { num_pages: total_kv.max(1), page_size: 1, num_kv_heads, head_dim, layout: KvLayout::Nhd };
        let table = PageTable {
            kv_indptr: kv_indptr.to_vec(),
            kv_indices: (0..total_kv as u32).collect(),
            kv_last_page_len: kv_indptr.windows(2).map(|w| (w[1] > w[0]) as u32).collect(),
        };
        // K's elements; V's follow from `options.head_dim_vo` (`PrefillWork::v_elems`).
        self.replan_with(&shape, num_qo_heads, qo_indptr, &table, mask, options, total_kv * num_kv_heads * head_dim)
    }

    #[allow(clippy::too_many_arguments)]
    fn replan_with(
        &mut self,
        shape: &CacheShape,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        table: &PageTable,
        mask: Option<CustomMask>,
        options: PrefillOptions,
        kv_elems: usize,
    ) -> Result<()> {
        // A mask replaces the causal one (FlashInfer's rule), so the key ranges are not cut.
        let options = PrefillOptions { causal: options.causal && mask.is_none(), ..options };
        if mask.is_some() && options.vo_dim(shape.head_dim) != shape.head_dim {
            return Err(Error::BadOption { what: "a custom mask with head_dim_vo other than head_dim" });
        }
        if let Some(tokens) =
            self.decode_route(shape, num_qo_heads, qo_indptr, table, mask.is_some(), &options, kv_elems)?
        {
            return self.replan_decode(shape, num_qo_heads, table, options, tokens, kv_elems);
        }
        let device = self.core.device();
        let kernels = device.kernels();
        // The kernels of a 16-bit cache take queries of its own type, so its type stands for
        // the run's (f16 when the plan does not say); an 8-bit cache's kernels exist for both
        // query types alike, so f16 stands for them.
        let kv_dtype = options.kv_dtype.unwrap_or(DType::F16);
        let q_dtype = if kv_dtype.is_fp8() { DType::F16 } else { kv_dtype };
        let hopper = match device.prefill_hopper(q_dtype, kv_dtype, shape.head_dim) {
            None => HopperPrefill::Never,
            Some(_) if device.hopper_prefill_always() => HopperPrefill::Always,
            Some(_) => HopperPrefill::LongQueries,
        };
        let head_dim_vo = options.vo_dim(shape.head_dim);
        let blocks_per_sm = |kernel| {
            match kernel {
                PrefillKernel::Portable { block_rows } if head_dim_vo != shape.head_dim => {
                    kernels.prefill_qk_vo(kv_dtype, shape.head_dim, head_dim_vo, block_rows).ok()
                }
                PrefillKernel::Portable { block_rows } => {
                    kernels.prefill(DType::F16, kv_dtype, shape.head_dim, block_rows).ok()
                }
                PrefillKernel::Hopper => device.prefill_hopper(q_dtype, kv_dtype, shape.head_dim),
                PrefillKernel::Decode => None,
            }
            .map_or(1, |k| k.blocks_per_sm)
        };
        // Only the portable kernel's 64-row blocks read a mask (the Hopper kernel reads none,
        // the 128-row ones have no registers to spare for it).
        let sms = device.multiprocessor_count();
        let split = match mask {
            Some(_) => {
                let kernel = PrefillKernel::Portable { block_rows: 64 };
                let blocks_per_sm =
                    kernels.prefill_masked(DType::F16, kv_dtype, shape.head_dim).map_or(1, |k| k.blocks_per_sm);
                prefill_split(shape, num_qo_heads, qo_indptr, table, options, kernel, sms, blocks_per_sm)?
            }
            None => plan_prefill_split(shape, num_qo_heads, qo_indptr, table, options, hopper, sms, blocks_per_sm)?,
        };
        let PrefillSplit { mut work, slots, split_tiles, group_size, kernel, total_q, sm_scale } = split;
        let scratch = ScratchLayout {
            counters: split_tiles * shape.num_kv_heads,
            partial_rows: slots * shape.num_kv_heads * kernel.block_rows() as usize,
            // Partial outputs are rows of values.
            head_dim: head_dim_vo,
        };
        // The batch is valid (planned above), so the mask can be checked against it.
        let masked = prefill_work_bytes(&mut work, mask.as_ref(), qo_indptr, &table.kv_lens(shape.page_size))?;
        let work_part: &[u8] = masked.as_deref().unwrap_or(as_bytes(&work));
        let (schedule, blocks) = match kernel {
            PrefillKernel::Hopper => {
                let head_dim = shape.head_dim as u32;
                let tile_tokens = hopper_prefill_tile_tokens(head_dim, kv_dtype.size_bytes() as u32);
                let halves = hopper_prefill_ping_pong(head_dim);
                persistent_schedule(&work, shape.num_kv_heads, tile_tokens, halves, sms * blocks_per_sm(kernel))
            }
            PrefillKernel::Portable { .. } | PrefillKernel::Decode => (Vec::new(), work.len() * shape.num_kv_heads),
        };
        self.core.replan(&[as_bytes(&table.kv_indices), work_part, as_bytes(&schedule)], scratch)?;
        self.decode = None;
        self.work = PrefillWork {
            shape: *shape,
            num_qo_heads,
            total_q,
            options,
            sm_scale,
            group_size,
            kernel,
            blocks,
            kv_elems,
            split_tiles,
            custom_mask: mask.is_some(),
        };
        Ok(())
    }

    /// Whether the batch runs on the decode kernel ([`draft_tokens`], [`decode_runs_drafts`])
    /// and with how many query tokens a request; such a batch is validated here as the prefill
    /// kernels' would be (others are left to their planner, so that their validation is not
    /// done twice).
    #[allow(clippy::too_many_arguments)]
    fn decode_route(
        &self,
        shape: &CacheShape,
        num_qo_heads: usize,
        qo_indptr: &[u32],
        table: &PageTable,
        masked: bool,
        options: &PrefillOptions,
        kv_elems: usize,
    ) -> Result<Option<usize>> {
        // The shape first, on the group the heads would give (checked below).
        let group = (num_qo_heads / shape.num_kv_heads.max(1)).max(1);
        let Some(tokens) = draft_tokens(shape, group, qo_indptr, options, masked, kv_elems) else {
            return Ok(None);
        };
        check_prefill_head_dims(shape.head_dim, options)?;
        check_heads_and_options(shape, num_qo_heads, options.sm_scale, options.logits_soft_cap, options.window_left)?;
        table.validate(shape.page_size, shape.num_pages)?;
        check_queries(table, shape.page_size, qo_indptr, num_qo_heads, options.causal || options.window_left >= 0)?;
        Ok(decode_runs_drafts(self.core.device(), shape, tokens, options).then_some(tokens))
    }

    /// Plans a batch of `tokens` query tokens a request on the decode kernel.
    fn replan_decode(
        &mut self,
        shape: &CacheShape,
        num_qo_heads: usize,
        table: &PageTable,
        options: PrefillOptions,
        tokens: usize,
        kv_elems: usize,
    ) -> Result<()> {
        let decode_options = DecodeOptions {
            sm_scale: options.sm_scale,
            logits_soft_cap: options.logits_soft_cap,
            window_left: -1,
            kv_dtype: options.kv_dtype,
        };
        let (launch, work, scratch) =
            DecodeWork::plan(self.core.device(), shape, num_qo_heads, table, decode_options, (tokens, options.causal))?;
        self.core.replan(&[as_bytes(&table.kv_indices), as_bytes(&work)], scratch)?;
        self.work = PrefillWork {
            shape: *shape,
            num_qo_heads,
            total_q: table.batch_size() * tokens,
            options,
            sm_scale: 0.0,
            group_size: num_qo_heads / shape.num_kv_heads,
            kernel: PrefillKernel::Decode,
            blocks: launch.num_blocks(),
            kv_elems,
            split_tiles: launch.split_requests(),
            custom_mask: false,
        };
        self.decode = Some(launch);
        Ok(())
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        self.core.device()
    }

    /// Elements of `q` (and of `out`, unless values are narrower: [`out_elems`](Self::out_elems)):
    /// `total_q × num_qo_heads × head_dim`.
    pub fn qo_elems(&self) -> usize {
        self.work.rows() * self.work.shape.head_dim
    }

    /// Elements of `out`: `total_q × num_qo_heads × head_dim_vo`.
    pub fn out_elems(&self) -> usize {
        self.work.rows() * self.work.head_dim_vo()
    }

    /// Blocks of the launch: work items (row tiles, or parts of split ones) × KV heads, or the
    /// Hopper kernel's persistent blocks (at most one an SM's worth).
    #[cfg(feature = "internals")]
    pub fn num_blocks(&self) -> usize {
        self.work.blocks() as usize
    }

    /// The kernel the plan launches (for a masked plan always the portable one, 64-row blocks).
    pub fn kernel(&self) -> PrefillKernel {
        self.work.kernel
    }

    /// Row tiles whose keys are split across several blocks (merged in the same launch), and
    /// the block height chosen.
    #[cfg(feature = "internals")]
    pub fn split_tiles(&self) -> (usize, u32) {
        (self.work.split_tiles, self.work.kernel.block_rows())
    }

    /// Attention of `q` (`[total_q][num_qo_heads][head_dim]`) over layer `layer` of `cache`,
    /// into `out` (same shape) and, if given, the base-2 LSE `log2 Σ exp(s)` per (token, head)
    /// into `lse` (`[total_q][num_qo_heads]`). Only launches, on `stream` (a stream of the
    /// plan's device); every buffer is checked against the plan first.
    ///
    /// The cache holds the queries' type `T`, or, for a plan made with `kv_dtype` 8-bit, that
    /// type (`C`), read as its values times the layer's [`KvScales`](crate::KvScales).
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

    /// [`run`](Self::run) with attention sinks, one logit per query head (`[num_qo_heads]`),
    /// as [`BatchDecodePlan::run_with_sinks`](crate::BatchDecodePlan::run_with_sinks) defines
    /// them: every query row's softmax denominator gains `e^{sink}`, and the LSE with it.
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
        match &self.decode {
            Some(decode) => self.core.run_attention(decode, stream, q, k, v, dequant, sinks, out, lse),
            None => self.core.run_attention(&self.work, stream, q, k, v, dequant, sinks, out, lse),
        }
    }

    /// [`run`](Self::run) for a [`ragged`](Self::ragged) plan: `k` and `v` hold the batch's
    /// keys and values, `[total_kv][num_kv_heads][head_dim]`.
    pub fn run_ragged<T: KvDType>(
        &mut self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        self.run_ragged_with_sinks(stream, q, k, v, None, out, lse)
    }

    /// [`run_ragged`](Self::run_ragged) with attention sinks, as
    /// [`run_with_sinks`](Self::run_with_sinks).
    #[allow(clippy::too_many_arguments)]
    pub fn run_ragged_with_sinks<T: KvDType>(
        &mut self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        sinks: Option<&dyn DevicePtr<f32>>,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        match &self.decode {
            Some(decode) => self.core.run_attention(decode, stream, q, k, v, Default::default(), sinks, out, lse),
            None => self.core.run_attention(&self.work, stream, q, k, v, Default::default(), sinks, out, lse),
        }
    }

    /// [`run`](Self::run) for stacks not on cudarc: `q` and `out` as in `run`, `k` and `v` one
    /// layer's pools (`shape.pool_elems()` elements each, laid out as the plan's shape says) or,
    /// for a [`ragged`](Self::ragged) plan, the contiguous rows, on the raw stream `stream` of
    /// the plan's device. Lengths are checked as in `run`; the stream is made to wait for the
    /// plan's upload.
    ///
    /// # Safety
    /// Every slice satisfies [`RawSlice::new`]'s contract; nothing else writes `q`, `k` or `v`
    /// while the launch runs, and nothing reads or writes `out` and `lse` until it has
    /// completed; runs of this plan are ordered on the GPU (its scratch is reused by each), and
    /// the plan is neither replanned nor dropped until the launch has completed.
    pub unsafe fn run_raw<T: KvDType>(
        &mut self,
        stream: CUstream,
        q: RawSlice<T>,
        k: RawSlice<T>,
        v: RawSlice<T>,
        out: RawSlice<T>,
        lse: Option<RawSlice<f32>>,
    ) -> Result<()> {
        match &self.decode {
            Some(decode) => self.core.run_attention_raw(decode, stream, q, k, v, out, lse),
            None => self.core.run_attention_raw(&self.work, stream, q, k, v, out, lse),
        }
    }
}

impl PrefillWork {
    /// No work yet (a plan before its first `replan`).
    fn empty(shape: &CacheShape, num_qo_heads: usize) -> Self {
        PrefillWork {
            shape: *shape,
            num_qo_heads,
            total_q: 0,
            options: PrefillOptions::default(),
            sm_scale: 1.0,
            group_size: 1,
            kernel: PrefillKernel::Portable { block_rows: 64 },
            blocks: 0,
            kv_elems: 0,
            split_tiles: 0,
            custom_mask: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(qo: &[u32], kv: &[usize], group: usize, options: PrefillOptions) -> Vec<PrefillWorkItem> {
        let kv_indptr: Vec<u32> = (0..=kv.len() as u32).collect();
        split_tiles(row_tiles(qo, kv, &kv_indptr, group, 64, &options), None, 2).0
    }

    #[test]
    fn rows_are_cut_into_tiles_of_64_with_their_causal_key_ranges() {
        // One request: 100 new tokens at the end of 300 keys, group 2: 200 rows, 4 tiles.
        let causal = PrefillOptions { causal: true, ..Default::default() };
        let mut work = items(&[0, 100], &[300], 2, causal);
        work.sort_by_key(|w| w.first_row);
        let rows: Vec<u32> = work.iter().map(|w| w.first_row).collect();
        assert_eq!(rows, [0, 64, 128, 192]);
        // Tile 1 holds tokens 32..=63: keys up to 200 + 63.
        assert_eq!((work[1].kv_start, work[1].kv_end), (0, 264));
        // The last tile (rows 192..200, tokens 96..=99) sees every key.
        assert_eq!((work[3].kv_start, work[3].kv_end), (0, 300));
        assert!(work.iter().all(|w| w.qo_len == 100 && w.kv_len == 300));
    }

    #[test]
    fn the_window_bounds_the_first_key_and_longest_ranges_come_first() {
        let opts = PrefillOptions { causal: true, window_left: 10, ..Default::default() };
        let work = items(&[0, 64, 65], &[1000, 5], 1, opts);
        // Request 0: tokens 0..64 at positions 936..1000: keys 926..1000.
        assert_eq!((work[0].kv_start, work[0].kv_end), (926, 1000));
        // Request 1: one token at position 4: keys 0..5.
        assert_eq!((work[1].q_start, work[1].kv_start, work[1].kv_end), (64, 0, 5));
        // Without causality the window still starts at the first row's position.
        let opts = PrefillOptions { window_left: 10, ..Default::default() };
        assert_eq!((items(&[0, 64], &[1000], 1, opts)[0].kv_end), 1000);
    }

    #[test]
    fn long_tiles_split_into_parts_with_consecutive_slots() {
        let kv_indptr = [0, 1, 2];
        let tiles = row_tiles(&[0, 1, 3], &[1000, 64], &kv_indptr, 1, 64, &PrefillOptions::default());
        let (work, slots, split) = split_tiles(tiles, Some(256), 8);
        assert_eq!((work.len(), slots, split), (5, 4, 1));
        let parts: Vec<_> = work.iter().filter(|w| w.slot != NO_PARTIAL).collect();
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|w| w.first_slot == 0 && w.parts == 4 && w.counters == 0 && w.qo_len == 1));
        let mut ranges: Vec<(u32, u32, u32)> = parts.iter().map(|w| (w.slot, w.kv_start, w.kv_end)).collect();
        ranges.sort();
        assert_eq!(ranges, [(0, 0, 250), (1, 250, 500), (2, 500, 750), (3, 750, 1000)]);
        let short = work.iter().find(|w| w.slot == NO_PARTIAL).unwrap();
        assert_eq!((short.parts, short.kv_end, short.q_start), (1, 64, 1));
    }

    #[test]
    fn long_query_batches_take_128_row_blocks_below_head_dim_256() {
        // 8 × 1024 tokens, group 4: the tiles hold 128 rows where such a kernel exists.
        let prompts: Vec<u32> = (0..=8).map(|i| i * 1024).collect();
        assert_eq!(preferred_block_rows(&prefill_block_rows(128), 32, 8, &prompts), 128);
        assert_eq!(preferred_block_rows(&prefill_block_rows(256), 32, 8, &prompts), 64);
        // 64 requests of one token each, group 4: 4 rows per request on average.
        let decode_like: Vec<u32> = (0..=64).collect();
        assert_eq!(preferred_block_rows(&prefill_block_rows(128), 32, 8, &decode_like), 64);
        let kv_indptr = [0, 1];
        let tiles = row_tiles(&[0, 100], &[300], &kv_indptr, 2, 128, &PrefillOptions::default());
        assert_eq!(tiles.iter().map(|w| w.first_row).collect::<Vec<_>>(), [0, 128]);
    }

    #[test]
    fn batches_whose_keys_must_be_split_take_64_row_blocks() {
        // Cascade's shared level: one request of 64 queries over 8192 keys, group 4, 8 KV heads,
        // non-causal. 128-row tiles (2 per KV head) would need 16 parts each to fill 132 SMs.
        let shape = CacheShape { num_pages: 512, page_size: 16, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
        let table = PageTable { kv_indptr: vec![0, 512], kv_indices: (0..512).collect(), kv_last_page_len: vec![16] };
        let split = plan_prefill_split(
            &shape,
            32,
            &[0, 64],
            &table,
            PrefillOptions::default(),
            HopperPrefill::Never,
            132,
            |_| 2,
        )
        .unwrap();
        assert_eq!(split.kernel, PrefillKernel::Portable { block_rows: 64 });
        assert!(
            split.split_tiles == 4 && split.work.len() <= 33,
            "{} tiles, {} items",
            split.split_tiles,
            split.work.len()
        );
        // A batch that fills the GPU unsplit keeps its 128-row blocks.
        let shape = CacheShape { num_pages: 8 * 64, ..shape };
        let table = PageTable {
            kv_indptr: (0..=8).map(|i| i * 64).collect(),
            kv_indices: (0..512).collect(),
            kv_last_page_len: vec![16; 8],
        };
        let qo: Vec<u32> = (0..=8).map(|i| i * 1024).collect();
        let causal = PrefillOptions { causal: true, ..Default::default() };
        let split = plan_prefill_split(&shape, 32, &qo, &table, causal, HopperPrefill::Never, 132, |_| 2).unwrap();
        assert_eq!((split.kernel, split.split_tiles), (PrefillKernel::Portable { block_rows: 128 }, 0));
    }

    #[test]
    fn on_hopper_long_queries_take_the_hopper_kernel_split_or_not_and_short_ones_do_not() {
        let shape = CacheShape { num_pages: 512, page_size: 16, num_kv_heads: 8, head_dim: 256, layout: KvLayout::Nhd };
        let table = PageTable { kv_indptr: vec![0, 512], kv_indices: (0..512).collect(), kv_last_page_len: vec![16] };
        let plan = |qo: &[u32], hopper| {
            plan_prefill_split(&shape, 32, qo, &table, PrefillOptions::default(), hopper, 132, |_| 1).unwrap()
        };
        // 64 queries over 8192 keys, group 4: 256 rows, two 128-row tiles split over many parts.
        let split = plan(&[0, 64], HopperPrefill::LongQueries);
        assert_eq!(split.kernel, PrefillKernel::Hopper);
        assert!(
            split.split_tiles > 0 && split.work.iter().all(|w| (w.kv_end - w.kv_start) % 64 == 0 || w.kv_end == 8192)
        );
        assert_eq!(plan(&[0, 64], HopperPrefill::Never).kernel, PrefillKernel::Portable { block_rows: 64 });
        // 16 queries, group 4: 64 rows, not more: the portable kernel's 64-row blocks, unless
        // the handle asks for the Hopper kernel everywhere.
        assert_eq!(plan(&[0, 16], HopperPrefill::LongQueries).kernel, PrefillKernel::Portable { block_rows: 64 });
        let split = plan(&[0, 16], HopperPrefill::Always);
        assert_eq!(split.kernel, PrefillKernel::Hopper);
        assert!(split.split_tiles > 0, "one 64-row tile over 8192 keys is split to fill the GPU");
    }

    #[test]
    fn draft_tokens_take_the_hopper_kernel_only_where_the_handle_asks() {
        // Speculative decoding: 64 requests of 4 draft tokens at the end of 4096 keys, group 4
        // (16 rows a request).
        let shape =
            CacheShape { num_pages: 64 * 256, page_size: 16, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
        let table = PageTable {
            kv_indptr: (0..=64).map(|i| i * 256).collect(),
            kv_indices: (0..64 * 256).collect(),
            kv_last_page_len: vec![16; 64],
        };
        let qo: Vec<u32> = (0..=64).map(|i| i * 4).collect();
        let causal = PrefillOptions { causal: true, ..Default::default() };
        let plan = |hopper| plan_prefill_split(&shape, 32, &qo, &table, causal, hopper, 132, |_| 1).unwrap();
        assert_eq!(plan(HopperPrefill::LongQueries).kernel, PrefillKernel::Portable { block_rows: 64 });
        let split = plan(HopperPrefill::Always);
        assert_eq!(split.kernel, PrefillKernel::Hopper);
        // One item a request, each its 16 rows over the request's 4096 keys (the causal diagonal
        // at the end): 512 units for 132 blocks, unsplit.
        assert_eq!((split.work.len(), split.split_tiles), (64, 0));
        assert!(split.work.iter().all(|w| w.qo_len == 4 && w.kv_end - w.kv_start == 4096));
    }

    #[test]
    fn the_same_few_draft_tokens_a_request_have_the_shape_decode_computes() {
        let shape = CacheShape { num_pages: 100, page_size: 16, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
        let pool = shape.pool_elems();
        let causal = PrefillOptions::CAUSAL;
        let drafts =
            |qo: &[u32], group, options: &PrefillOptions| draft_tokens(&shape, group, qo, options, false, pool);
        // 4 tokens a request at group 4: 16 rows a KV head, one tile.
        assert_eq!(drafts(&[0, 4, 8, 12], 4, &causal), Some(4));
        assert_eq!(drafts(&[0, 1, 2], 16, &causal), Some(1));
        assert_eq!(drafts(&[0, 16], 1, &PrefillOptions::DEFAULT), Some(16));
        // More than 16 rows, different counts, requests without queries, an empty batch.
        assert_eq!(drafts(&[0, 5, 10], 4, &causal), None);
        assert_eq!(drafts(&[0, 4, 7], 4, &causal), None);
        assert_eq!(drafts(&[0, 0, 0], 4, &causal), None);
        assert_eq!(drafts(&[0], 4, &causal), None);
        // A window, a mask, narrower values, K/V that are not the plan's pools.
        assert_eq!(drafts(&[0, 2, 4], 4, &PrefillOptions { window_left: 100, ..causal }), None);
        assert_eq!(draft_tokens(&shape, 4, &[0, 2, 4], &causal, true, pool), None);
        assert_eq!(drafts(&[0, 2, 4], 4, &PrefillOptions { head_dim_vo: Some(64), ..causal }), None);
        assert_eq!(draft_tokens(&shape, 4, &[0, 2, 4], &causal, false, pool - 1), None);
    }

    /// The blocks' unit lists of a persistent schedule, checked to cover `units` once each.
    fn schedule_lists(schedule: &[u32], blocks: usize, units: usize) -> Vec<Vec<u32>> {
        assert_eq!(schedule[0] as usize, blocks + 1);
        assert_eq!(schedule[blocks] as usize, schedule.len());
        let lists: Vec<Vec<u32>> =
            (0..blocks).map(|b| schedule[schedule[b] as usize..schedule[b + 1] as usize].to_vec()).collect();
        let mut all: Vec<u32> = lists.concat();
        all.sort();
        assert_eq!(all, (0..units as u32).collect::<Vec<_>>());
        lists
    }

    #[test]
    fn a_causal_batch_is_dealt_to_one_block_an_sm_longest_first_and_balanced() {
        let shape = CacheShape { num_pages: 8192, page_size: 1, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
        let table = PageTable {
            kv_indptr: (0..=8).map(|r| r * 1024).collect(),
            kv_indices: (0..8192).rev().collect(),
            kv_last_page_len: vec![1; 8],
        };
        let qo: Vec<u32> = (0..=8).map(|r| r * 1024).collect();
        let opts = PrefillOptions { causal: true, ..Default::default() };
        let split = plan_prefill_split(&shape, 32, &qo, &table, opts, HopperPrefill::LongQueries, 132, |_| 1).unwrap();
        assert_eq!((split.kernel, split.split_tiles), (PrefillKernel::Hopper, 0));
        let units = split.work.len() * 8;
        let (schedule, blocks) = persistent_schedule(&split.work, 8, 128, true, 132);
        assert_eq!((units, blocks), (2048, 132));
        let cost = |u: u32| hopper_unit_cost(&split.work[u as usize / 8], 128, true);
        let loads: Vec<u64> = schedule_lists(&schedule, blocks, units)
            .iter()
            .map(|list| {
                // Each block runs its units longest first.
                assert!(list.windows(2).all(|p| cost(p[0]) >= cost(p[1])));
                list.iter().map(|&u| cost(u)).sum()
            })
            .collect();
        // Dealt costliest first to the least loaded: the longest block within 1.5% of the mean
        // (1.3% here: the last units dealt, of one tile and the overhead, are the coarse grain).
        let (mean, hi) = (loads.iter().sum::<u64>() as f64 / 132.0, *loads.iter().max().unwrap() as f64);
        assert!(hi <= 1.015 * mean, "{hi} against a mean of {mean}");
    }

    #[test]
    fn a_unit_costs_its_tiles_less_a_halved_last_one_plus_its_overhead() {
        let item = |kv_start, kv_end| PrefillWorkItem { kv_start, kv_end, parts: 1, ..Default::default() };
        let full = 8 * 3 + HOPPER_UNIT_OVERHEAD;
        // 257..=320 keys: a last tile of 1..=64 keys, halved with ping-pong.
        assert_eq!(hopper_unit_cost(&item(0, 320), 128, true), full - HOPPER_HALVED_TILE_SAVING);
        assert_eq!(hopper_unit_cost(&item(0, 257), 128, true), full - HOPPER_HALVED_TILE_SAVING);
        assert_eq!(hopper_unit_cost(&item(0, 321), 128, true), full);
        assert_eq!(hopper_unit_cost(&item(0, 384), 128, true), full);
        assert_eq!(hopper_unit_cost(&item(0, 320), 128, false), full);
        // The key range, wherever it starts (a window), and 64-key tiles (fp8 at head_dim 128).
        assert_eq!(hopper_unit_cost(&item(100, 420), 128, true), full - HOPPER_HALVED_TILE_SAVING);
        assert_eq!(hopper_unit_cost(&item(0, 160), 64, true), full - HOPPER_HALVED_TILE_SAVING);
        assert_eq!(hopper_unit_cost(&item(7, 7), 128, true), HOPPER_UNIT_OVERHEAD);
    }

    #[test]
    fn a_schedule_with_split_items_gives_every_unit_its_own_block_and_fewer_units_than_sms_too() {
        let tile = |kv_end, slot| PrefillWorkItem { kv_end, slot, parts: 1, ..Default::default() };
        let work = [tile(4096, 0), tile(4096, 1), tile(300, NO_PARTIAL)];
        let (schedule, blocks) = persistent_schedule(&work, 2, 128, true, 4);
        assert_eq!(blocks, 6);
        assert!(schedule_lists(&schedule, blocks, 6).iter().enumerate().all(|(b, l)| l == &[b as u32]));
        let work = [tile(4096, NO_PARTIAL), tile(128, NO_PARTIAL)];
        let (schedule, blocks) = persistent_schedule(&work, 2, 128, true, 132);
        assert_eq!(blocks, 4);
        assert!(schedule_lists(&schedule, blocks, 4).iter().all(|l| l.len() == 1));
        let (schedule, blocks) = persistent_schedule(&[], 8, 128, true, 132);
        assert_eq!((schedule, blocks), (vec![1], 0));
    }

    #[test]
    fn a_flat_mask_packs_each_request_from_a_fresh_word_little_endian_and_padded() {
        // Requests of 2 × 5 (10 bits: 2 bytes), 0 × 3 (none) and 1 × 3 (3 bits: 1 byte).
        let qo_indptr = [0, 2, 2, 3];
        let mut mask = vec![false; 13];
        for e in [0, 3, 8, 9, 10, 12] {
            mask[e] = true;
        }
        let (packed, words) = CustomMask::Flat(&mask).packed_for(&qo_indptr, &[5, 3, 3]).unwrap();
        assert_eq!(words, [0, 1, 1]);
        assert_eq!(packed[..8], [0b0000_1001, 0b0000_0011, 0, 0, 0b0000_0101, 0, 0, 0]);
        assert!(packed.len() == 8 + MASK_PADDING && packed[8..].iter().all(|&b| b == 0));
        // The same bits handed over packed (FlashInfer's byte segments) give the same upload.
        let bits = [0b0000_1001, 0b0000_0011, 0b0000_0101];
        let packed_too =
            CustomMask::Packed { bits: &bits, indptr: &[0, 2, 2, 3] }.packed_for(&qo_indptr, &[5, 3, 3]).unwrap();
        assert_eq!(packed_too, (packed, words));
    }

    #[test]
    fn a_mask_of_the_wrong_length_or_segments_is_an_error_naming_it() {
        let (qo_indptr, kv_lens) = ([0, 2, 3], [5, 9]);
        let e = CustomMask::Flat(&[true; 18]).packed_for(&qo_indptr, &kv_lens).unwrap_err();
        assert!(matches!(e, Error::MaskLength { what: "custom_mask", got: 18, expected: 19 }), "{e}");
        let packed = |bits: &'static [u8], indptr: &'static [u32]| {
            CustomMask::Packed { bits, indptr }.packed_for(&qo_indptr, &kv_lens).unwrap_err()
        };
        let e = packed(&[0; 3], &[0, 2, 4]);
        assert!(matches!(e, Error::MaskLength { what: "packed_custom_mask", got: 3, expected: 4 }), "{e}");
        let e = packed(&[0; 4], &[0, 1, 4]);
        assert!(matches!(e, Error::MaskSegment { seq: 0, got: 1, expected: 2, qo_len: 2, kv_len: 5 }), "{e}");
        let e = packed(&[0; 4], &[0, 2]);
        assert!(matches!(e, Error::IndptrLength { what: "mask_indptr", got: 2, batch: 2 }), "{e}");
        let e = packed(&[0; 4], &[1, 2, 4]);
        assert!(matches!(e, Error::IndptrStart { what: "mask_indptr", first: 1 }), "{e}");
    }

    #[test]
    fn work_items_find_their_requests_mask_past_requests_without_queries() {
        let qo_indptr = [0, 0, 100, 100, 101];
        let mut work = items(&qo_indptr, &[4, 200, 7, 9], 1, PrefillOptions::default());
        set_mask_words(&mut work, &qo_indptr, &[0, 0, 625, 625], 36);
        for w in &work {
            assert_eq!(w.mask_word, if w.q_start == 100 { 661 } else { 36 }, "{w:?}");
        }
        assert_eq!(work.len(), 3);
    }

    #[test]
    fn requests_without_queries_take_no_block() {
        assert!(items(&[0, 0, 0], &[5, 0], 4, PrefillOptions::default()).is_empty());
    }
}
