//! The kernel ABI: parameter blocks passed by value to the PTX entry points, the launch
//! geometry both sides derive from them, and the one table of kernel variants and PTX modules
//! ([`kernel_variants!`], [`ptx_targets!`]).
//!
//! This file is compiled into both crates (`kernels-gpu` includes it by path, and xtask for the
//! module list), so host and device cannot disagree on a field's offset or on which kernels
//! exist. It must stay `no_std`: plain `#[repr(C)]` data, arithmetic on it, and macros.

/// Division by a divisor known only at run time, as a multiply-high, an add and a shift
/// (Granlund–Montgomery). Exact for every divisor ≥ 1 and every dividend below 2^31.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastDiv {
    /// The divisor `d`.
    pub divisor: u32,
    /// `floor(2^32 · (2^shift − d) / d) + 1`.
    pub multiplier: u32,
    /// `ceil(log2 d)`.
    pub shift: u32,
}

impl FastDiv {
    /// Largest dividend `div` is exact for.
    pub const MAX_DIVIDEND: u32 = (1 << 31) - 1;

    /// # Panics
    /// On `divisor == 0` (callers validate first).
    pub const fn new(divisor: u32) -> Self {
        assert!(divisor > 0, "FastDiv by zero");
        // shift = ceil(log2(divisor)); multiplier = floor(2^32 · (2^shift − d) / d) + 1.
        let shift = 32 - (divisor - 1).leading_zeros();
        let multiplier = ((((1u64 << shift) - divisor as u64) << 32) / divisor as u64) as u32 + 1;
        FastDiv { divisor, multiplier, shift }
    }

    /// `n / divisor`, for `n ≤ MAX_DIVIDEND`.
    #[inline(always)]
    pub const fn div(&self, n: u32) -> u32 {
        let hi = ((n as u64 * self.multiplier as u64) >> 32) as u32;
        (hi + n) >> self.shift
    }

    /// `(n / divisor, n % divisor)`.
    #[inline(always)]
    pub const fn divmod(&self, n: u32) -> (u32, u32) {
        let q = self.div(n);
        (q, n - q * self.divisor)
    }
}

/// Where the 16-byte vectors of a token's `[head][dim]` row sit, relative to its first element,
/// in either layout: head `h` starts `h · head_stride` vectors in (NHD: `head_vecs`, the heads
/// are adjacent; HND: `page_size · head_vecs`, the page's other tokens lie between).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenLayout {
    /// 16-byte vectors between the starts of consecutive heads of a token.
    pub head_stride: u32,
    /// 16-byte vectors in one head's row of `head_dim` elements.
    pub head_vecs: FastDiv,
}

impl TokenLayout {
    /// Vector offset of vector `v` of a token's `[head][dim]` row from the token's first element.
    #[inline(always)]
    pub const fn vec_offset(&self, v: u32) -> u32 {
        let (head, d) = self.head_vecs.divmod(v);
        head * self.head_stride + d
    }
}

/// Copy between paged K/V and contiguous ragged K/V (`[row][head][dim]`), in either direction.
///
/// The plan resolved each ragged row to its token's place in the page pool on the host
/// (`row_offsets[r]`: the element index of the token's first element), so a thread's whole
/// address chain is one cached load: no page-table walk, no division by `page_size`.
/// `blockIdx.y` picks K (0) or V (1).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PagedCopyParams {
    /// One layer's K page pool (read by gather, written by scatter).
    pub k_pages: u64,
    /// One layer's V page pool (read by gather, written by scatter).
    pub v_pages: u64,
    /// Ragged K, `[total_rows][num_heads][head_dim]` (written by gather, read by scatter).
    pub k_ragged: u64,
    /// Ragged V, `[total_rows][num_heads][head_dim]` (written by gather, read by scatter).
    pub v_ragged: u64,
    /// `*const u64`, `total_rows` entries, in elements (a multiple of a vector's elements).
    pub row_offsets: u64,
    /// `row_offsets[r] >> vec_shift` is the row's first 16-byte vector of the pool: log2 of the
    /// elements in a vector (3 for f16/bf16, 2 for f32, 4 for 8-bit), plus 3 for an MLA kpe
    /// pool, whose copy reads the ckv pool's offsets (its rows are an eighth as long).
    pub vec_shift: u32,
    /// Where a token's vectors lie relative to its first element.
    pub layout: TokenLayout,
    /// 16-byte vectors per ragged row (`num_heads · head_vecs`).
    pub row_vecs: FastDiv,
    /// Ragged rows to copy (entries of `row_offsets`).
    pub total_rows: u32,
    /// Rows per block.
    pub rows_per_block: u32,
    /// The 8-bit copies (`paged_kv_gather_*_e4m3` and kin) multiply each K value by this on
    /// its way: the dequantisation scale when gathering, its reciprocal when scattering
    /// (quantising). The 16-bit copies move bytes and ignore it.
    pub k_factor: f32,
    /// As `k_factor`, for V.
    pub v_factor: f32,
    /// `*const KvHeadScale`, one per KV head, or 0 for none: the 8-bit copies multiply
    /// `k_factor` (`v_factor`) by each vector's KV head's K (V) scale when gathering, by its
    /// reciprocal when scattering (one f32 product, then the values by it). The 16-bit copies
    /// ignore it.
    pub kv_head_scales: u64,
}

/// One KV head's dequantisation scales of a layer of an 8-bit cache
/// (`PagedKvCache::set_head_scales`), as the kernels read them: a stored value `x` of the head
/// means `x × layer scale × k` (K) or `x × layer scale × v` (V). The reciprocals are the host's
/// f32 `1 / k` and `1 / v`, so that no kernel divides and the host's quantiser reproduces the
/// kernels' products bit for bit.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvHeadScale {
    /// K's scale of the head.
    pub k: f32,
    /// V's scale of the head.
    pub v: f32,
    /// `1 / k`, rounded to f32.
    pub k_rcp: f32,
    /// `1 / v`, rounded to f32.
    pub v_rcp: f32,
}

impl KvHeadScale {
    /// A head's scales `k` and `v`, with their reciprocals.
    pub fn new(k: f32, v: f32) -> Self {
        KvHeadScale { k, v, k_rcp: 1.0 / k, v_rcp: 1.0 / v }
    }
}
// The kernels index an array of them: 16 bytes each, one vector load.
const _: () = assert!(core::mem::size_of::<KvHeadScale>() == 16);

/// Rounds `x` to the nearest value of an 8-bit float with `MANT` mantissa bits, exponent bias
/// `BIAS` and largest finite code `max_code` (positive), ties to even, saturating: every finite
/// value beyond the largest finite one, and ±∞, becomes ± that value; NaN, of either sign,
/// becomes the positive code `nan`. That is what sm_89+'s `cvt.rn.satfinite.e4m3x2.f32` /
/// `e5m2x2` give (and CUDA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, …)`), which the sm_90
/// module's quantiser uses; the sm_80 module runs this (integer arithmetic on the f32 bits), and
/// so does the host's (the host tests check it against a brute-force nearest-code search, the
/// GPU tests both modules' kernels against it bit for bit).
pub const fn f32_to_fp8<const MANT: u32, const BIAS: u32>(x: f32, max_code: u8, nan: u8) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let mag = bits & 0x7FFF_FFFF;
    if mag > 0x7F80_0000 {
        return nan;
    }
    let exp = mag >> 23;
    if exp < 127 + 1 - BIAS {
        // Below the smallest normal 2^(1 − BIAS): a count of subnormal steps 2^(1 − BIAS − MANT).
        // The value is (2^23 + m) · 2^(exp − 150), so the count is that shifted right by
        // 150 + 1 − BIAS − MANT − exp, rounded to even on the bits shifted out.
        if exp == 0 {
            return sign; // zero or an f32 subnormal: far below half a step
        }
        let shift = 150 + 1 - BIAS - MANT - exp;
        if shift > 25 {
            return sign; // below a quarter step
        }
        let full = (1 << 23) | (mag & 0x7F_FFFF);
        let (q, rem, half) = (full >> shift, full & ((1 << shift) - 1), 1u32 << (shift - 1));
        let q = if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q };
        // q = 2^MANT is the smallest normal's code: the encoding carries over by itself.
        return sign | q as u8;
    }
    // Normal: keep MANT mantissa bits, the rest rounded to even; a carry moves the exponent.
    let drop = 23 - MANT;
    let rounded = (mag + ((1 << (drop - 1)) - 1) + ((mag >> drop) & 1)) >> drop;
    let code = rounded - ((127 - BIAS) << MANT);
    if code > max_code as u32 {
        sign | max_code
    } else {
        sign | code as u8
    }
}

/// E4M3 (`float8_e4m3fn`): 3 mantissa bits, bias 7, largest finite code 0x7E (448), NaN 0x7F.
pub const fn f32_to_e4m3(x: f32) -> u8 {
    f32_to_fp8::<3, 7>(x, 0x7E, 0x7F)
}

/// E5M2: 2 mantissa bits, bias 15, largest finite code 0x7B (57344), NaN 0x7F (0x7C is ∞,
/// which quantising never produces: it saturates).
pub const fn f32_to_e5m2(x: f32) -> u8 {
    f32_to_fp8::<2, 15>(x, 0x7B, 0x7F)
}

/// Exercises the device helpers (`kernels-gpu/src/gpu`) so tests can compare them with the
/// host: thread `i` reads `input[i]` and writes `HELPER_OUTPUTS` values at
/// `output[i * HELPER_OUTPUTS..]`. Launched with 32 · 4 bytes of dynamic shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HelperCheckParams {
    /// `*const f32`, one entry per thread.
    pub input: u64,
    /// `*mut f32`, `HELPER_OUTPUTS` entries per thread.
    pub output: u64,
    /// The divisor of the `(i · 7919) / divisor` output.
    pub divisor: FastDiv,
}

/// Per input: exp2, log2(|x| + 1), rcp, f16 round trip, bf16 round trip, warp sum, warp max,
/// the value of lane `lane ^ 5` (by shuffle), `(i · 7919) / divisor` and its remainder, and the
/// value of thread `tid ^ 1` passed through dynamic shared memory across a barrier.
pub const HELPER_OUTPUTS: usize = 11;

/// Reads `vecs` 16-byte vectors from `data` and nothing else of note: the bandwidth of a pure
/// read stream (the ceiling for decode, which only reads K/V), and a clean way to evict the L2.
/// Each warp writes the XOR of what it read to `sink[its global index]`, so the loads stay live.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReadStreamParams {
    /// `*const [u32; 4]`.
    pub data: u64,
    /// `*mut u32`, one entry per warp of the grid.
    pub sink: u64,
    /// 16-byte vectors to read from `data`.
    pub vecs: u64,
}

/// One layer of the paged cache as the attention kernels address it: the pools, the page table's
/// indices and the geometry (in elements).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PagedCacheParams {
    /// `*const`, one layer's K page pool, the query's dtype.
    pub k_pages: u64,
    /// `*const`, one layer's V page pool, the query's dtype.
    pub v_pages: u64,
    /// `*const u32`: the page table's `kv_indices`.
    pub kv_indices: u64,
    /// Tokens per page.
    pub page_size: FastDiv,
    /// Elements per page.
    pub page_elems: u32,
    /// Elements between consecutive tokens (slots) of a page.
    pub slot_stride: u32,
    /// Elements between consecutive heads of a token.
    pub head_stride: u32,
}

/// Scratch of split-KV work (see the kernels' `merge` module): normalised f32 partial outputs
/// with their base-2 LSEs, one slot per part, and merge counters that are zero between launches.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SplitScratch {
    /// `*mut f32`: partial output rows of `head_dim`.
    pub partial_out: u64,
    /// `*mut f32`: one LSE per partial row.
    pub partial_lse: u64,
    /// `*mut u32`: one counter per split unit.
    pub merge_counters: u64,
}

/// Batch decode over the paged cache: one query token per request and query head.
///
/// A block runs one work item (a request's key range) for one KV head and up to
/// [`DECODE_ROWS`] of its group's query heads (a row tile): `blockIdx.x` is
/// `(item · num_kv_heads + kv_head) · row_tiles + row_tile`. It works on tensor cores: the heads
/// are the rows of an m16n8k16 tile, so K and V are read once per
/// block however large the group. [`decode_threads`] threads stream [`DECODE_TILE_TOKENS`]-key
/// tiles through a [`decode_stages`]-deep shared-memory ring.
///
/// A request split over several items (flash-decoding) has each write a normalised f32 partial
/// output and its LSE to its slot; the last of them to finish (counted per request, KV head and
/// row tile in `merge_counters`, which it resets to zero) merges the slots into the output, so
/// one launch does the whole job. LSE is base 2: `log2 Σ exp(s)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DecodeParams {
    /// `[batch][num_qo_heads][head_dim]`.
    pub q: u64,
    /// The paged cache's pools, page table and geometry.
    pub cache: PagedCacheParams,
    /// `*const DecodeWorkItem`, one per `blockIdx.x`.
    pub work: u64,
    /// `[batch][num_qo_heads][head_dim]`, the query's dtype.
    pub out: u64,
    /// `*mut f32`, `[batch][num_qo_heads]`; 0 when not wanted.
    pub lse: u64,
    /// `*const f32`, `[num_qo_heads]`, or 0 for none: attention sinks (gpt-oss; FlashInfer's
    /// `BatchAttentionWithAttentionSinkWrapper`), one logit per query head in the units of the
    /// scaled (and soft-capped) logits, that joins every row's softmax denominator as a key
    /// whose value is zero: `out = Σ e^{s_i} v_i / (e^{sink} + Σ e^{s_i})`, LSE
    /// `log2(e^{sink} + Σ e^{s_i})`. Such a state merges with sink-free states of other keys as
    /// usual, so the sink is folded in once: by an unsplit block, or by the merge of a split
    /// one (partials never carry it). A sink of −∞ is no sink.
    pub sinks: u64,
    /// Split requests' partials (`[slots][num_qo_heads][head_dim]`), and a counter per (split
    /// request, KV head, row tile).
    pub split: SplitScratch,
    /// Query heads per token.
    pub num_qo_heads: u32,
    /// Work items (entries of `work`).
    pub num_items: u32,
    /// Query heads per KV head.
    pub group_size: u32,
    /// Multiplies `q · k` before the soft cap; logits are then kept in base 2.
    pub sm_scale: f32,
    /// `cap` of `cap · tanh(s / cap)`, 0 for none.
    pub logits_soft_cap: f32,
    /// Multiplies the output: the cache's V dequantisation scale (1 for a 16-bit cache). K's
    /// scale is folded into `sm_scale`.
    pub v_scale: f32,
    /// `*const KvHeadScale`, `[num_kv_heads]`, or 0 for none: the cache layer's per-KV-head
    /// scales. An 8-bit kernel reads its block's KV head's once and multiplies K's into
    /// `sm_scale` and V's into `v_scale`; the 16-bit kernels ignore it. (Last in the block, so
    /// that the other fields keep their offsets.)
    pub kv_head_scales: u64,
    /// Query tokens a request (`decode_multi_*` kernels; 1 for the others, which ignore it):
    /// `q`, `out` and `lse` hold `[batch][tokens][num_qo_heads]` rows, and a block's rows are
    /// a KV head's packed `token · group_size + head` rows (speculative decoding's draft tokens).
    pub tokens_per_request: u32,
    /// Whether draft token `i` of `n` sees only the keys below `kv_len − (n − 1 − i)` (prefill's
    /// causal mask; `decode_multi_*` only).
    pub causal: u32,
}

/// One decode block's share of a request, resolved by `plan` (two 16-byte loads).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeWorkItem {
    /// The request's first entry in `kv_indices` (`kv_indptr[request]`).
    pub pages: u32,
    /// Key positions `start..end` of the request.
    pub start: u32,
    /// End (exclusive) of the item's key positions.
    pub end: u32,
    /// The request's index in the batch.
    pub request: u32,
    /// This item's partial slot, or [`NO_PARTIAL`] when the request is not split.
    pub slot: u32,
    /// The request's partial slots are `first_slot..first_slot + parts`.
    pub first_slot: u32,
    /// Items the request is split into; 1 when it is not split.
    pub parts: u32,
    /// The request's first merge counter; one per (KV head, row tile) follows.
    pub counters: u32,
}

/// Warps of a decode block that split a tile's keys, 16 each.
pub const DECODE_KEY_WARPS: u32 = 4;
/// Output dimensions one decode warp accumulates: wider heads split their dims over more
/// warps (which share the tile's keys) so the f32 accumulators stay in registers.
pub const DECODE_WARP_DIMS: u32 = 128;

/// Threads of a decode block: [`DECODE_KEY_WARPS`] warps per 128 output dimensions.
pub const fn decode_threads(head_dim: u32) -> u32 {
    32 * DECODE_KEY_WARPS * head_dim.div_ceil(DECODE_WARP_DIMS)
}
/// Query heads per decode block: the M of the mma tile.
pub const DECODE_ROWS: u32 = 16;
/// Keys per pipeline stage (16 per warp: the K of the P·V mma).
pub const DECODE_TILE_TOKENS: u32 = 64;

/// Pipeline depth of the decode ring over a cache of `kv_bytes`-byte elements: about 64 KiB of
/// 16-bit K/V in flight per block and two blocks per SM where the shared memory allows. Over
/// an 8-bit cache, whose stages are half the bytes and which decode converts straight into mma
/// fragments (no widened tiles), the deepest ring the K/V ring supports, 4 stages: at head_dim
/// 128 a block needs 70 KiB, so the freed shared memory makes three blocks per SM on Hopper
/// (144 KiB in flight, where a 16-bit cache keeps 96 KiB) and two on an A100. At head_dim 256
/// (138 KiB, within the A100's 163) one block per SM: with 3 stages two would fit Hopper's
/// shared memory but not its registers (256 threads at 131–149 registers), so the 4th stage
/// costs nothing there.
///
/// At head_dim 96 the stages are dense ([`decode_dense_stages`]) and a block takes two KV heads
/// ([`decode_heads_per_block`]): three stages of each, as much in flight a SM as three 128-dim
/// stages of two one-head blocks.
pub const fn decode_stages(head_dim: u32, kv_bytes: u32) -> u32 {
    match (head_dim, kv_bytes) {
        (_, 1) => 4,
        (96, 2) => 3,
        (0..=64, _) | (96, _) => 4,
        (65..=128, _) => 3,
        _ => 2,
    }
}

/// Elements of a row of a shared-memory tile of `head_dim`-element rows: the next power of two,
/// so that the XOR swizzle of 16-byte chunks stays within a row and one `xor` steps a fragment
/// load along it (`paged_tile::swizzled`). Head dims 80 and 96 leave the rest of a 128-wide row
/// unused: shared memory as for 128, global traffic and math for their own width.
pub const fn tile_dim(head_dim: u32) -> u32 {
    head_dim.next_power_of_two()
}

/// Whether decode's K/V stages of a 16-bit cache at `head_dim` are dense: rows of exactly
/// `head_dim` elements (192 bytes at 96) swizzled within their 12 chunks
/// (`paged_tile::dense_swizzled`), instead of [`tile_dim`]-wide rows; a padded 96-dim ring would
/// hold a quarter fewer bytes in flight than a 128-dim one in the same shared memory.
pub const fn decode_dense_stages(head_dim: u32, kv_bytes: u32) -> bool {
    head_dim == 96 && kv_bytes == 2
}

/// KV heads a decode block takes: two adjacent ones where the stages are dense (16-bit, 96
/// dims), so that a token's copy reads the pair's 384 contiguous bytes (three whole 128-byte
/// lines in NHD) where one head's 192 share a line with a neighbour's: the lines split between
/// two blocks cost a tenth of the read bandwidth at page size 1. One otherwise. Each head has
/// its own [`decode_threads`] threads and its own [`decode_smem_bytes`] region
/// ([`decode_head_smem_stride`] apart); the K/V ring, in the first, copies both heads' rows.
pub const fn decode_heads_per_block(head_dim: u32, kv_bytes: u32) -> u32 {
    if decode_dense_stages(head_dim, kv_bytes) {
        2
    } else {
        1
    }
}

/// Bytes from one head's shared-memory region of a decode block to the next's (whole KiB:
/// the swizzled query tile's alignment).
pub const fn decode_head_smem_stride(head_dim: u32, kv_bytes: u32) -> u32 {
    decode_smem_bytes(head_dim, kv_bytes).next_multiple_of(1024)
}

/// Threads of a decode block: [`decode_threads`] for each of its heads.
pub const fn decode_block_threads(head_dim: u32, kv_bytes: u32) -> u32 {
    decode_threads(head_dim) * decode_heads_per_block(head_dim, kv_bytes)
}

/// Dynamic shared memory of a decode block: one head's [`decode_smem_bytes`], or a region each.
pub const fn decode_block_smem_bytes(head_dim: u32, kv_bytes: u32) -> u32 {
    match decode_heads_per_block(head_dim, kv_bytes) {
        1 => decode_smem_bytes(head_dim, kv_bytes),
        heads => decode_head_smem_stride(head_dim, kv_bytes) * heads,
    }
}

/// Elements a row of decode's K/V stages takes in shared memory.
pub const fn decode_stage_dim(head_dim: u32, kv_bytes: u32) -> u32 {
    if decode_dense_stages(head_dim, kv_bytes) {
        head_dim
    } else {
        tile_dim(head_dim)
    }
}

/// Bytes of the 16-bit K and V tiles an 8-bit ring widens each arriving stage into (the tiles
/// the fragment loads read); none for a 16-bit cache, whose stages are read as they are.
pub const fn widened_tiles_bytes(tile_tokens: u32, head_dim: u32, kv_bytes: u32) -> u32 {
    if kv_bytes == 2 {
        0
    } else {
        2 * tile_tokens * tile_dim(head_dim) * 2
    }
}

/// Dynamic shared memory of a decode block over a cache of `kv_bytes`-byte elements: the query
/// tile, the K and V rings, their row table, and the key warps' softmax statistics (the rings
/// are reused for the warps' outputs at the end: [`decode_o_stride`] floats a row). An 8-bit
/// ring needs no widened tiles in decode: its bytes go straight into mma fragments.
pub const fn decode_smem_bytes(head_dim: u32, kv_bytes: u32) -> u32 {
    let stages = decode_stages(head_dim, kv_bytes);
    let q = DECODE_ROWS * tile_dim(head_dim) * 2;
    let ring = 2 * stages * DECODE_TILE_TOKENS * decode_stage_dim(head_dim, kv_bytes) * kv_bytes;
    q + ring + kv_table_bytes(stages, DECODE_TILE_TOKENS) + DECODE_KEY_WARPS * DECODE_ROWS * 2 * 4
}

/// Floats per row of the warps' parked outputs in a decode block. A 16-bit cache's rows are
/// padded by 8 floats. Over an 8-bit cache a lane's accumulators hold dims 16 apart (8 at
/// head_dim 64; `decode.rs`), written four adjacent dims at a time: 4 floats of padding after
/// every 32 dims and a row stride ≡ 16 (8) mod 32 floats spread an 8-lane phase of those
/// 16-byte stores over all the banks.
pub const fn decode_o_stride(head_dim: u32, kv_bytes: u32) -> u32 {
    if kv_bytes == 2 {
        return head_dim + 8;
    }
    let (padded, lane_dims) = (head_dim + head_dim / 8, if head_dim < DECODE_WARP_DIMS { head_dim / 8 } else { 16 });
    padded + (lane_dims + 32 - padded % 32) % 32
}

/// Slots of a K/V ring's row table (the kernels' `paged_tile`): one per stage, at least two.
pub const fn kv_table_slots(stages: u32) -> u32 {
    if stages > 2 {
        stages
    } else {
        2
    }
}

/// Bytes of a K/V ring's row table: a `u32` per key of each slot's tile.
pub const fn kv_table_bytes(stages: u32, tile_tokens: u32) -> u32 {
    kv_table_slots(stages) * tile_tokens * 4
}

/// [`DecodeWorkItem::slot`] of an item whose request is not split: it has no partial slot.
pub const NO_PARTIAL: u32 = u32::MAX;

/// Batch prefill over the paged cache: request `i` has `qo_len` query tokens (rows
/// `q_start..` of `q` and `out`) attending over its `kv_len` cached tokens, FlashAttention-2
/// style on tensor cores.
///
/// A block takes [`prefill_rows`] query rows of one request and one KV head. Rows are packed
/// (token, head of the group) pairs, `row = token · group_size + head`, so a group's heads share
/// every K/V tile the block loads whatever the group size. Each of the four row warps owns 16
/// rows per row fragment (one or two; the kernel's name ends in `_rows64` or `_rows128`); K/V
/// stream in [`PREFILL_TILE_TOKENS`]-key tiles through a [`prefill_stages`]-deep
/// ring, with the page-table addressing of decode (`paged_tile`). head_dim 256 adds four warps
/// that take the upper 128 output dims of the same rows. `blockIdx.x` is
/// `item · num_kv_heads + kv_head`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PrefillParams {
    /// `[total_q][num_qo_heads][head_dim]`.
    pub q: u64,
    /// The paged cache's pools, page table and geometry.
    pub cache: PagedCacheParams,
    /// `*const PrefillWorkItem`, one per `blockIdx.x / num_kv_heads` (the portable kernels).
    pub work: u64,
    /// The Hopper kernel's units: `*const u32`, block `b` runs the units at entries
    /// `schedule[b]..schedule[b + 1]` of the same array, in order, unit `u` being work item
    /// `u / num_kv_heads` for KV head `u % num_kv_heads`. A block with a split item runs that
    /// unit alone (its merge uses the ring's shared memory). 0 for the portable kernels.
    pub schedule: u64,
    /// `[total_q][num_qo_heads][head_dim]`, the query's dtype.
    pub out: u64,
    /// `*mut f32`, `[total_q][num_qo_heads]`; 0 when not wanted.
    pub lse: u64,
    /// `*const f32`, `[num_qo_heads]`, or 0 for none: attention sinks, as
    /// [`DecodeParams::sinks`].
    pub sinks: u64,
    /// Split row tiles' partials (`[slots][num_kv_heads][prefill_rows][head_dim]`), and a
    /// counter per (split row tile, KV head).
    pub split: SplitScratch,
    /// Query heads per token.
    pub num_qo_heads: u32,
    /// KV heads per token of the cache.
    pub num_kv_heads: u32,
    /// Query heads per KV head.
    pub group_size: FastDiv,
    /// Multiplies `q · k` before the soft cap; logits are then kept in base 2.
    pub sm_scale: f32,
    /// `cap` of `cap · tanh(s / cap)`, 0 for none.
    pub logits_soft_cap: f32,
    /// Keys at positions below `query position − window_left` are masked; −1 for none.
    pub window_left: i32,
    /// Nonzero: query `j` sees keys up to its own position `kv_len − qo_len + j`.
    pub causal: u32,
    /// Multiplies the output: the cache's V dequantisation scale (1 for a 16-bit cache). K's
    /// scale is folded into `sm_scale`.
    pub v_scale: f32,
    /// Per-KV-head scales, as [`DecodeParams::kv_head_scales`] (the portable 8-bit kernels
    /// read them; the Hopper kernels, over 16-bit caches only, do not).
    pub kv_head_scales: u64,
}

/// One prefill block's rows of a request and keys of them, resolved by `plan` (three 16-byte
/// loads). A row tile whose keys are split (when the batch alone cannot fill the GPU) has one
/// item per part; the last part to finish merges them, as decode does.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillWorkItem {
    /// The request's first entry in `kv_indices` (`kv_indptr[request]`).
    pub pages: u32,
    /// The request's first query token (`qo_indptr[request]`).
    pub q_start: u32,
    /// Query tokens of the request.
    pub qo_len: u32,
    /// Cached tokens (keys) of the request.
    pub kv_len: u32,
    /// The block's first packed row (`token · group_size + head`).
    pub first_row: u32,
    /// Key positions `kv_start..kv_end` cover every key a row of the block may see (the causal
    /// and window bounds of its first and last rows, worked out by `plan`).
    pub kv_start: u32,
    /// End (exclusive) of the block's key positions.
    pub kv_end: u32,
    /// This item's partial slot, or [`NO_PARTIAL`] when its row tile's keys are not split.
    pub slot: u32,
    /// The row tile's partial slots are `first_slot..first_slot + parts`.
    pub first_slot: u32,
    /// Items the row tile's keys are split into (1: not split).
    pub parts: u32,
    /// The row tile's first merge counter; one per KV head follows.
    pub counters: u32,
    /// 0 without a custom mask. With one, the plan uploads it right after the work items, and
    /// the request's mask starts at 32-bit word `mask_word` from `PrefillParams::work`: bit
    /// `j · kv_len + key` (little-endian bit order, as `flashinfer.packbits`; a request has
    /// fewer than 2^32 − 64) set when query `j` may see `key`, padded so that the three words
    /// from any bit of a request may be read. Only the 64-row portable kernels read it (the
    /// plan launches those); `causal` is then 0: a mask replaces it.
    pub mask_word: u32,
}

/// Query rows of a prefill block whose warps take `row_frags` 16-row fragments each (four
/// row warps).
pub const fn prefill_rows(row_frags: u32) -> u32 {
    64 * row_frags
}

/// Row fragments per warp the prefill kernels of `head_dim` come in: 1 and 2 up to head_dim
/// 128; at 256 only 1, since 128 rows of 256 dims and two K/V stages would not fit an A100's
/// shared memory.
pub const fn prefill_max_row_frags(head_dim: u32) -> u32 {
    if head_dim <= 128 {
        2
    } else {
        1
    }
}
/// Keys per prefill pipeline stage.
pub const PREFILL_TILE_TOKENS: u32 = 64;
/// Output dimensions one prefill warp accumulates (as decode: wider heads add warps).
pub const PREFILL_WARP_DIMS: u32 = 128;

/// Threads of a prefill block: four row warps per 128 output dimensions.
pub const fn prefill_threads(head_dim: u32) -> u32 {
    128 * head_dim.div_ceil(PREFILL_WARP_DIMS)
}

/// Pipeline depth of the prefill ring: at least two blocks per SM on Hopper up to head_dim 128.
pub const fn prefill_stages(head_dim: u32, row_frags: u32) -> u32 {
    match (head_dim, row_frags) {
        (0..=64, _) | (65..=128, 1) => 3,
        _ => 2,
    }
}

/// Dynamic shared memory of a prefill block with queries and keys of `head_dim_qk` dims and
/// values of `head_dim_vo` over a cache of `kv_bytes`-byte elements: the query tile, the K and
/// V rings, the widened tiles (8-bit caches) and the ring's row table.
pub const fn prefill_smem_bytes(head_dim_qk: u32, head_dim_vo: u32, row_frags: u32, kv_bytes: u32) -> u32 {
    let head_dim = head_dim_qk;
    let stages = prefill_stages(head_dim, row_frags);
    prefill_rows(row_frags) * tile_dim(head_dim) * 2
        + stages * PREFILL_TILE_TOKENS * (tile_dim(head_dim) + tile_dim(head_dim_vo)) * kv_bytes
        + widened_tiles_bytes(PREFILL_TILE_TOKENS, head_dim, kv_bytes)
        + kv_table_bytes(stages, PREFILL_TILE_TOKENS)
}

/// Batch prefill on Hopper (only in the `sm_90a` module): the parameters and work items of
/// [`PrefillParams`], blocks of [`HOPPER_PREFILL_ROWS`] packed rows. A producer warpgroup
/// gathers K/V tiles of [`hopper_prefill_tile_tokens`] keys through the page table with
/// `cp.async` into a [`hopper_prefill_stages`]-deep shared ring, signalling each stage full on
/// an mbarrier; two consumer warpgroups of 64 rows compute S = Q·Kᵀ and O += P·V with `wgmma`
/// (P from registers) and hand each stage back on an "empty" mbarrier. Shared tiles are laid
/// out for `wgmma`'s 128-byte swizzle: 64-dim slabs of 128-byte rows. Over an 8-bit cache the
/// copies land in byte stages ([`hopper_prefill_byte_stages`]) and the producer widens each
/// tile into the ring before signalling it full: the consumers' code is the same. Blocks are
/// persistent (one an SM): each runs its list of units from [`PrefillParams::schedule`], and
/// the producer gathers the next unit's tiles while the consumers finish the last one.
pub const HOPPER_PREFILL_ROWS: u32 = 128;
/// Threads of a Hopper prefill block: the producer warpgroup, then two consumer warpgroups.
pub const HOPPER_PREFILL_THREADS: u32 = 384;
/// Threads of the producer warpgroup (the block's first).
pub const HOPPER_PRODUCER_THREADS: u32 = 128;
/// Registers a producer thread keeps and a consumer thread takes (`setmaxnreg`): 128 · 56 +
/// 256 · 224 is exactly the block's pool ([`register_split_fits`]). The persistent producer keeps
/// its unit list's place beside a unit's gather state: at 40 the widening producer spilled
/// 280 bytes, at 56 none, and ptxas spills no more consumer registers at 224 than at 232.
/// (24 for the producer, and 240 for the consumers at head_dim 256, was tried: the producer
/// spills more than the consumers gain. Two producer warpgroups over 8-bit caches, at 32
/// registers beside consumers at 224, were no faster: docs/perf.md, Hopper prefill over fp8.)
pub const HOPPER_PRODUCER_REGISTERS: u32 = 56;
/// See [`HOPPER_PRODUCER_REGISTERS`].
pub const HOPPER_CONSUMER_REGISTERS: u32 = 224;
const _: () =
    assert!(register_split_fits(HOPPER_PREFILL_THREADS, HOPPER_PRODUCER_REGISTERS, HOPPER_CONSUMER_REGISTERS));

/// Registers each thread of a block of `threads` starts with, in a kernel that uses as many as
/// it may (ptxas: 64 Ki over the declared threads, in steps of 8, at most 255): times
/// `threads`, the block's pool, which `setmaxnreg` only moves between warpgroups.
pub const fn entry_registers(threads: u32) -> u32 {
    let per_thread = 65536 / threads;
    (if per_thread < 255 { per_thread } else { 255 }) / 8 * 8
}

/// Whether a producer warpgroup at `producer` registers a thread beside the other warpgroups at
/// `consumer` fits the pool of a block of `threads`. `setmaxnreg.inc` waits until the registers
/// it asks for are free in that pool (the entry's plus what the producer gave back): asking for
/// more never returns (a split of 32 / 240 hung the Hopper prefill on the H200, and the same
/// split MLA's rounds of two tiles on the H100, thirty-fourth session).
pub const fn register_split_fits(threads: u32, producer: u32, consumer: u32) -> bool {
    HOPPER_PRODUCER_THREADS * producer + (threads - HOPPER_PRODUCER_THREADS) * consumer
        <= threads * entry_registers(threads)
}

/// Keys per Hopper prefill stage: 128 (S is a 64 × 128 `wgmma` tile) up to head_dim 128, 64
/// above (the O accumulators of 256 dims take the registers), and 64 over an 8-bit cache at
/// head_dim 128: twice the stages in the same shared memory, so the producer can widen a
/// tile well before the consumers reach it (with two 128-key stages it had half a tile's time).
pub const fn hopper_prefill_tile_tokens(head_dim: u32, kv_bytes: u32) -> u32 {
    match (head_dim, kv_bytes) {
        (0..=64, _) | (65..=128, 2) => 128,
        _ => 64,
    }
}

/// Whether the Hopper prefill's two consumer warpgroups take turns at the tensor cores
/// (ping-pong), which at head_dim 256 the 128 O accumulators a thread leave no registers for;
/// with it, a unit whose last tile no row sees past half of runs that tile at half width.
pub const fn hopper_prefill_ping_pong(head_dim: u32) -> bool {
    head_dim <= 128
}

/// Stages of the Hopper prefill ring (16-bit K/V tiles, what the consumers read): as many as
/// the 227 KiB of shared memory hold beside Q, and beside the byte stages of an 8-bit cache.
pub const fn hopper_prefill_stages(head_dim: u32, kv_bytes: u32) -> u32 {
    match (head_dim, kv_bytes) {
        (0..=64, _) | (65..=128, 1) => 4,
        (65..=128, _) => 3,
        _ => 2,
    }
}

/// Byte stages of the Hopper prefill over an 8-bit cache: the producer's copies land there and
/// it widens each tile into a ring stage (none over a 16-bit cache, whose copies land in the
/// ring itself). Four at head_dim 64 and 128 (with Q and four ring stages: 208 and 224 KiB);
/// head_dim 256 would leave room for one only, so 8-bit caches run the portable kernel there.
pub const fn hopper_prefill_byte_stages(head_dim: u32, kv_bytes: u32) -> u32 {
    match (head_dim, kv_bytes) {
        (_, 2) => 0,
        _ => 4,
    }
}

/// Offset of the mbarriers in a Hopper prefill block's shared memory: after Q, the K and V
/// ring stages and the K and V byte stages.
pub const fn hopper_prefill_bars_offset(head_dim: u32, kv_bytes: u32) -> u32 {
    let tile_bytes = hopper_prefill_tile_tokens(head_dim, kv_bytes) * head_dim;
    HOPPER_PREFILL_ROWS * head_dim * 2
        + 2 * tile_bytes
            * (2 * hopper_prefill_stages(head_dim, kv_bytes) + hopper_prefill_byte_stages(head_dim, kv_bytes))
}

/// Dynamic shared memory of a Hopper prefill block over a cache of `kv_bytes`-byte elements:
/// [`hopper_prefill_bars_offset`], then a full and an empty mbarrier per ring stage and a word
/// for the split merge's flag (padded to 16 bytes).
pub const fn hopper_prefill_smem_bytes(head_dim: u32, kv_bytes: u32) -> u32 {
    hopper_prefill_bars_offset(head_dim, kv_bytes) + 16 * hopper_prefill_stages(head_dim, kv_bytes) + 16
}

/// Dynamic shared memory an H100 or H200 gives one block (227 KiB).
pub const HOPPER_MAX_BLOCK_SMEM_BYTES: u32 = 227 * 1024;

/// Multi-head latent attention (DeepSeek's MLA, FlashInfer's `BatchMLAPagedAttentionWrapper`,
/// weights absorbed) over a paged latent cache: per token a compressed latent `ckv` of
/// [`MLA_CKV_DIM`] elements and a rotary part `kpe` of [`MLA_KPE_DIM`], each in its own page
/// pool (`[page][slot][dim]`, one page table for both). Query row `(token, head)` has `q_nope`
/// (`[total_q][heads][512]`) and `q_pe` (`[total_q][heads][64]`); its logits are
/// `sm_scale · (q_nope·ckvᵀ + q_pe·kpeᵀ)` and its output `softmax · ckv` (`[total_q][heads][512]`),
/// with the base-2 LSE.
///
/// Every head attends to the same keys, so MLA is prefill with one KV head and a group of all
/// the heads: the parameter block is a [`PrefillParams`] read that way (`q` is `q_nope`,
/// `cache.k_pages` the ckv pool and `cache.v_pages` the kpe pool, `cache.page_elems` and
/// `cache.slot_stride` counted in ckv elements, `num_kv_heads` 1, `group_size` the heads;
/// no window, sinks, soft cap or per-head scales; over an 8-bit cache its one scale is folded
/// into `sm_scale` and is `v_scale`), its work items are prefill's ([`PrefillWorkItem`], one
/// block each: [`MLA_ROWS`] packed rows `token · heads + head`), plus `q_pe`.
///
/// A block's eight warps split both products: warp `w` computes S for rows `16 (w mod 4)..`
/// and keys `16 (w / 4)..` of each [`MLA_TILE_TOKENS`]-key tile (the two warps of a row range
/// share their row maxima and P through shared memory), and O for the same rows and output dims
/// `256 (w / 4)..`. A split row tile's parts write partials in the queries' 16-bit type
/// (`[slot][MLA_ROWS][512]`, as FlashInfer's; their LSEs f32) that the merge kernel
/// ([`MlaMergeParams`]) combines: with 512 dims a row, one block merging a whole tile would
/// take longer than the parts.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MlaParams {
    /// As described above.
    pub attention: PrefillParams,
    /// `[total_q][heads][MLA_KPE_DIM]`, the queries' type.
    pub q_pe: u64,
    /// The layer's TMA maps for the Hopper kernel ([`MLA_TMA_MAPS`] of 128 bytes in global
    /// memory: for box heights 64, 32, .., 1 rows, the ckv pool's map, then the kpe pool's), or
    /// 0 for `cp.async` copies.
    pub tensor_maps: u64,
    /// Rows of each pool (`num_pages × page_size`, below 2³¹ − 64): the first row a TMA box
    /// reads as zeros.
    pub pool_rows: u32,
    /// Keeps the block a multiple of 8 bytes.
    pub _pad: u32,
}

/// TMA maps an MLA layer has for the Hopper kernel: two pools × seven box heights.
pub const MLA_TMA_MAPS: usize = 14;

/// Elements of the compressed latent (`ckv`) of a token, and of an MLA query's `q_nope` and
/// output row.
pub const MLA_CKV_DIM: u32 = 512;
/// Elements of the rotary part (`kpe`) of a token and of an MLA query's `q_pe` row.
pub const MLA_KPE_DIM: u32 = 64;
/// Packed query rows of an MLA block.
pub const MLA_ROWS: u32 = 64;
/// Keys per MLA pipeline stage.
pub const MLA_TILE_TOKENS: u32 = 32;
/// Threads of an MLA block: four row ranges × two halves (of a tile's keys, of the output dims).
pub const MLA_THREADS: u32 = 256;
/// Depth of the MLA block's K ring (a stage is 36 KiB).
pub const MLA_STAGES: u32 = 2;

/// Dynamic shared memory of an MLA block over a cache of `kv_bytes`-byte elements: the queries
/// (`q_nope`, then `q_pe`, as swizzled tiles), the ckv and kpe rings, an 8-bit cache's widened
/// ckv and kpe tiles, the ring's row table, the warps' P fragments and their row maxima (at the
/// end, row sums). The same for both cache widths: an 8-bit ring's bytes and its widened tiles
/// take what a 16-bit ring does.
pub const fn mla_smem_bytes(kv_bytes: u32) -> u32 {
    let dims = MLA_CKV_DIM + MLA_KPE_DIM;
    MLA_ROWS * dims * 2
        + MLA_STAGES * MLA_TILE_TOKENS * dims * kv_bytes
        + mla_widened_bytes(kv_bytes)
        + kv_table_bytes(MLA_STAGES, MLA_TILE_TOKENS)
        + MLA_ROWS * MLA_TILE_TOKENS * 2
        + 2 * MLA_ROWS * 4
}

/// Bytes of the 16-bit ckv and kpe tiles an 8-bit MLA ring widens each stage into.
pub const fn mla_widened_bytes(kv_bytes: u32) -> u32 {
    if kv_bytes == 2 {
        0
    } else {
        MLA_TILE_TOKENS * (MLA_CKV_DIM + MLA_KPE_DIM) * 2
    }
}

/// MLA on Hopper (only in the `sm_90a` module, 16-bit caches): the parameters, work items and
/// partials of [`MlaParams`], [`MLA_ROWS`] rows a block, keys in [`MLA_HOPPER_TILE_TOKENS`]-key
/// tiles of all 576 dims (nine 64-dim slabs: the ckv rows' eight, then the kpe row's) through a
/// two-stage ring that a producer warpgroup fills by `cp.async` through the page table. The two
/// consumer warpgroups own halves of O (256 dims each, 128 f32 a thread) and take turns at the
/// tiles: warpgroup `c` computes S of the tiles `t ≡ c (mod 2)` (`wgmma` m64n64, Q and K from
/// shared memory), its softmax, and hands the tile's P and reference maximum to the other
/// through shared memory; both multiply each tile's P into their half of O (`wgmma` m64n256, P
/// from registers, the ckv slabs as V). [`mla_hopper_smem_bytes`] of shared memory.
pub const MLA_HOPPER_TILE_TOKENS: u32 = 64;
/// Threads of a Hopper MLA block: the producer warpgroup, then two consumer warpgroups.
pub const MLA_HOPPER_THREADS: u32 = 384;

/// Dynamic shared memory of a Hopper MLA block: Q (64 rows × 576 dims), two K stages (64 keys ×
/// 576), the P handed over (64 × 64 f16), the reference maxima handed over and the row sums
/// traded at the end (f32 a row, three), the producer's row tables (two stages × 64 keys) and
/// the ring's four mbarriers.
pub const fn mla_hopper_smem_bytes() -> u32 {
    let dims = MLA_CKV_DIM + MLA_KPE_DIM;
    (MLA_ROWS + 2 * MLA_HOPPER_TILE_TOKENS) * dims * 2
        + MLA_ROWS * MLA_HOPPER_TILE_TOKENS * 2
        + 3 * MLA_ROWS * 4
        + 2 * MLA_HOPPER_TILE_TOKENS * 4
        + 4 * 8
}

/// The merge of split MLA row tiles: block `(x, y)` merges rows `MLA_MERGE_ROWS · y..` of split
/// tile `x`, whose first part's work item is entry `x` of `tiles`; part `i`'s partial row is
/// `(first_slot + i) · MLA_ROWS + row` of `split` (16-bit, the output's type). Writes the
/// output rows and their LSEs. A thread an 8-dim slice of a row; no shared memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MlaMergeParams {
    /// The MLA launch's partials.
    pub split: SplitScratch,
    /// `*const PrefillWorkItem`, one per split row tile.
    pub tiles: u64,
    /// `[total_q][heads][MLA_CKV_DIM]`, the queries' type.
    pub out: u64,
    /// `*mut f32`, `[total_q][heads]`; 0 when not wanted.
    pub lse: u64,
    /// Query heads per token.
    pub heads: u32,
}

/// Threads of an MLA merge block: the 64 8-dim slices of [`MLA_MERGE_ROWS`] rows.
pub const MLA_MERGE_THREADS: u32 = 128;
/// Rows of a split tile an MLA merge block merges: a grid of (split tiles, `MLA_ROWS /
/// MLA_MERGE_ROWS`) blocks.
pub const MLA_MERGE_ROWS: u32 = MLA_MERGE_THREADS / (MLA_CKV_DIM / 8);
const _: () = assert!(MLA_ROWS.is_multiple_of(MLA_MERGE_ROWS));
/// Parts an MLA row tile's keys are split into at most.
pub const MLA_MAX_PARTS: u32 = 256;

/// Merging attention states (FlashInfer's `merge_state(s)`): for each of `rows` (token, head)
/// rows, `num_states` partial outputs `v_k` with base-2 LSEs `s_k` become
/// `v = Σ 2^(s_k − s) v_k` with `s = log2 Σ 2^(s_k)`. A warp takes [`merge_rows_per_warp`]
/// rows.
///
/// State `k` of row `(t, h)` sits at element `t · token_stride + k · state_stride + h · head_dim`
/// of `v` (and `t · s_token_stride + k · s_state_stride + h` of `s`); strides are signed so two
/// separate buffers are states 0 and 1 of one view. Outputs are `[tokens][heads][head_dim]` and
/// `[tokens][heads]`, and may be state 0's own buffers (in place: each lane reads its slice of
/// every state before writing it, and the LSE is written after the warp has read them all).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MergeStatesParams {
    /// Partial outputs, the element type of `v_out`.
    pub v: u64,
    /// `*const f32`: their base-2 LSEs.
    pub s: u64,
    /// `[tokens][heads][head_dim]`.
    pub v_out: u64,
    /// `*mut f32`, `[tokens][heads]`; 0 when not wanted.
    pub s_out: u64,
    /// Elements of `v` between consecutive tokens.
    pub token_stride: i64,
    /// Elements of `v` between consecutive states of a row.
    pub state_stride: i64,
    /// Entries of `s` between consecutive tokens.
    pub s_token_stride: i64,
    /// Entries of `s` between consecutive states of a row.
    pub s_state_stride: i64,
    /// Tokens (rows are tokens × heads).
    pub tokens: u32,
    /// Heads per token.
    pub heads: u32,
    /// States merged per row.
    pub num_states: u32,
    /// Elements per head: a multiple of 8.
    pub head_dim: u32,
}

/// Threads of a merge-states block: eight warps.
pub const MERGE_THREADS: u32 = 256;

/// Rows a merge-states warp takes: as many as its lanes cover with one 8-dim slice each
/// (head_dim 64: four rows of 8 lanes; 128: two of 16), so short rows leave no lane idle; one
/// row where a row's slices do not divide 32 lanes evenly.
pub const fn merge_rows_per_warp(head_dim: u32) -> u32 {
    let slices = head_dim / 8;
    if slices > 0 && slices < 32 && 32 % slices == 0 {
        32 / slices
    } else {
        1
    }
}

/// Rotary position embeddings (FlashInfer's `apply_rope*`), and RoPE fused into the append of
/// ragged K/V into the paged cache. Up to three tensors of `[token][head][head_dim]` rows are
/// read from `src`: `tensors[0]` (queries) and `tensors[1]` (keys) are rotated, `tensors[2]`
/// (values, fused append only) is copied. Each is written to `dst`, contiguous like `src`
/// (which may be `src` itself: in place) or, with `paged` set, into a page pool: the row of
/// token `t` and head `h` starts at element `row_offsets[t] + h · pool_head_stride`.
///
/// A tensor's heads come in groups of [`ROPE_GROUP_HEADS`]; a thread takes one *unit* (of
/// [`rope_units`] per row: a slice of the rotary pairs, or of the dims past `rotary_dim`) of one
/// token and one head group, computes the unit's angles once and applies them to every head
/// of the group. Thread `e` of the grid takes unit `e mod units` of group `(e / units) mod
/// groups` of token `e / (units · groups)`; the groups of `tensors[i]` are
/// `first_group..first_group + ceil(heads / ROPE_GROUP_HEADS)`.
///
/// Angles: with `cos_sin` 0, pair `i` of a token at position `p` turns by `p · f_i`, `f_i` given
/// by the host as an f32 pair `freqs[i] = (hi, lo)` with `hi + lo` the f64 frequency (see
/// [`rope_angle`] for the reduction); otherwise `cos_sin` is the caller's f32 cache of
/// `[max_position][rotary_dim]`, cos of pair `i` at `i` and its sin at `rotary_dim / 2 + i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RopeTensor {
    /// Element offset `[token][head][head_dim]` rows read (the kernel's element type).
    pub src: u64,
    /// Where the rows are written: contiguous rows like `src`, or a page pool (`paged`).
    pub dst: u64,
    /// Heads per token; 0 for an absent tensor.
    pub heads: u32,
    /// This tensor's first head group among a token's groups.
    pub first_group: u32,
    /// 1: `dst` is a page pool addressed through `row_offsets`.
    pub paged: u32,
    /// 1: rotate (queries, keys); 0: copy (values).
    pub rotate: u32,
    /// 1: write the dims past `rotary_dim` (out of place, or into pages); 0: leave them (in
    /// place, where they already hold their values).
    pub copy_tail: u32,
    /// Padding to 40 bytes; always 0.
    pub _pad: u32,
}

/// See [`RopeTensor`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    /// Queries, keys and values (values only in the fused append; `heads` 0 otherwise).
    pub tensors: [RopeTensor; 3],
    /// `*const u32`: each token's position.
    pub positions: u64,
    /// `*const [f32; 2]`, `rotary_dim / 2` entries: each pair's frequency as `(hi, lo)`; 0 when
    /// `cos_sin` is given.
    pub freqs: u64,
    /// `*const f32`, `[max_position][rotary_dim]`: the caller's cos/sin cache, or 0.
    pub cos_sin: u64,
    /// `*const u64`, one per token: the element index of its first element in a page pool
    /// (paged tensors only; 0 when none is paged).
    pub row_offsets: u64,
    /// Elements between the heads of a token in the page pool.
    pub pool_head_stride: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Leading dims of each head that are rotated (even, at most `head_dim`).
    pub rotary_dim: u32,
    /// Units per row ([`rope_units`]).
    pub units: FastDiv,
    /// Head groups per token, all tensors together.
    pub groups: FastDiv,
    /// Threads with work: `tokens · groups · units`.
    pub total: u32,
}

/// Heads a RoPE thread rotates with the angles it computed once.
pub const ROPE_GROUP_HEADS: u32 = 4;
/// Threads of a RoPE block.
pub const ROPE_THREADS: u32 = 256;
/// NeoX pairs `(i, i + rotary_dim / 2)` in 16-byte vectors: 8 pairs a unit (`rotary_dim` a
/// multiple of 16).
pub const ROPE_NEOX: u32 = 0;
/// NeoX pairs one at a time (`rotary_dim / 2` not a multiple of 8, GPT-NeoX-20B's 24 of 96).
pub const ROPE_NEOX_SCALAR: u32 = 1;
/// GPT-J pairs `(2i, 2i + 1)`: a unit is a 16-byte vector of the row (4 pairs, or dims past
/// `rotary_dim`).
pub const ROPE_GPTJ: u32 = 2;

/// The kernel variant for a rotation: [`ROPE_GPTJ`], [`ROPE_NEOX`] or [`ROPE_NEOX_SCALAR`].
pub const fn rope_mode(interleave: bool, rotary_dim: u32) -> u32 {
    if interleave {
        ROPE_GPTJ
    } else if rotary_dim.is_multiple_of(16) {
        ROPE_NEOX
    } else {
        ROPE_NEOX_SCALAR
    }
}

/// Units per row of a rotation in `mode` (copied rows, values, take their 16-byte vectors
/// `u, u + units, …`): NeoX, `rotary_dim / 16` pair vectors then the `(head_dim − rotary_dim)
/// / 8` vectors past them; scalar NeoX, `rotary_dim / 2` pairs then `head_dim − rotary_dim`
/// single dims; GPT-J, the row's `head_dim / 8` vectors.
pub const fn rope_units(mode: u32, head_dim: u32, rotary_dim: u32) -> u32 {
    match mode {
        ROPE_NEOX => rotary_dim / 16 + (head_dim - rotary_dim) / 8,
        ROPE_NEOX_SCALAR => rotary_dim / 2 + (head_dim - rotary_dim),
        _ => head_dim / 8,
    }
}

/// 2π in two f32 parts (Cody–Waite): `ROPE_TWO_PI[0]` is 2π rounded to f32, `[1]` the rest of
/// the f64 2π rounded to f32. Their sum is 2π within 2⁻⁴⁸ relative.
pub const ROPE_TWO_PI: [f32; 2] =
    [core::f64::consts::TAU as f32, (core::f64::consts::TAU - (core::f64::consts::TAU as f32) as f64) as f32];
/// 1 / 2π rounded to f32.
pub const ROPE_INV_TWO_PI: f32 = (1.0 / core::f64::consts::TAU) as f32;

/// The rotation angle `position · frequency`, reduced to about `[−π, π]`, in f32 arithmetic
/// that keeps the error of the whole product: the frequency is `freq[0] + freq[1]` (the host's
/// f64 value split in two f32s); `p = position · freq[0]` is rounded but its error `e` is
/// recovered exactly with an fma (`position` is an integer below 2²⁴, exact in f32) and
/// `position · freq[1]` added to it; `p` is reduced by `k = rint(p / 2π)` times 2π in two parts
/// (`ROPE_TWO_PI`), each subtraction one fma, and `e` added last. Each of those three steps
/// rounds a value below 4 in magnitude (at most 2⁻²³ each), and the two-part 2π is off by
/// `k · 2π · 2⁻⁴⁸`, so the result is within about 3.6e-7 rad of `position · (freq[0] + freq[1])`
/// mod 2π for positions below 2²⁴ and frequencies up to 1; over every position up to 131072 the
/// host tests find at most 2.4e-7 and hold 2⁻²¹ ≈ 4.8e-7. `fma` and `rint` are the caller's
/// (`fma.rn.f32` and `cvt.rni` on the GPU,
/// `mul_add` and `round_ties_even` on the host: the same IEEE operations, so the host's result
/// is the kernel's bit for bit).
#[inline(always)]
pub fn rope_angle(position: f32, freq: [f32; 2], fma: impl Fn(f32, f32, f32) -> f32, rint: impl Fn(f32) -> f32) -> f32 {
    let p = position * freq[0];
    let e = fma(position, freq[1], fma(position, freq[0], -p));
    let k = rint(p * ROPE_INV_TWO_PI);
    let r = fma(-k, ROPE_TWO_PI[0], p);
    let r = fma(-k, ROPE_TWO_PI[1], r);
    r + e
}

/// The one table of kernel variants. Every entry point of the PTX modules is generated from
/// it (`kernels-gpu/src/entries.rs`), and so is the host's function table
/// (`runtime/kernels.rs`), so the two cannot disagree. Adding an element type, a head_dim or a
/// prefill block height is one line here; what each variant must satisfy is asserted below, at
/// compile time, in both crates.
///
/// `kernel_variants!(each)` calls the macro `each` once per entry point, as one of
/// - `each!(decode $Half $dtype $Kv $kv $head_dim)`,
/// - `each!(decode_multi $Half $dtype $head_dim)` (decode of several query tokens a request,
///   over 16-bit caches: [`DecodeParams::tokens_per_request`]),
/// - `each!(prefill $Half $dtype $Kv $kv $head_dim $rows)` (blocks of `$rows` packed query rows),
/// - `each!(prefill_masked $Half $dtype $Kv $kv $head_dim)` (64-row blocks that read a custom
///   mask: `PrefillWorkItem::mask_word`),
/// - `each!(prefill_qk_vo $Half $dtype $head_dim_qk $head_dim_vo $rows)` (prefill whose values
///   are narrower than its queries and keys, over 16-bit K/V),
/// - `each!(prefill_hopper $Half $dtype $Kv $kv $head_dim)` (the `sm_90a` module's only
///   kernels),
/// - `each!(merge_states $Half $dtype)`,
/// - `each!(mla $Half $dtype $Kv $kv)`, `each!(mla_hopper $Half $dtype)` (the `sm_90a` module's,
///   16-bit caches) and `each!(mla_merge $Half $dtype)` (multi-head latent attention over a
///   latent cache of `$Kv`, and the merge of its split row tiles: [`MlaParams`]),
/// - `each!(rope $Half $dtype $mode)` (`neox`, `neox_scalar` or `gptj`: [`rope_mode`]),
/// - `each!(paged_copy_fp8 $direction $Half $dtype $Kv $kv)` (`gather` or `scatter` between an
///   8-bit cache and 16-bit ragged K/V),
/// - `each!(single $name)` (a kernel without variants, written by name in its own file),
///
/// where `$Half` is the kernel crate's query/output element type and `$dtype` its name in entry
/// points, and `$Kv` the cache's element type with `$kv` its name (`same` for a cache of the
/// query's own type, whose entry points keep the shorter names).
#[allow(unused_macros)]
macro_rules! kernel_variants {
    ($each:ident) => {
        kernel_variants!(@dtypes $each
            // Element types of queries, outputs and merging; each is a KV cache type too.
            [F16 f16] [Bf16 bf16];
            // KV cache element types read as either of them: 8-bit floats, with scales.
            [[E4m3 e4m3] [E5m2 e5m2]];
            // Head dims, each with the prefill block heights (query rows) built for it: over
            // every cache type, and on Hopper's prefill too.
            [[64: 64 128] [128: 64 128] [256: 64]];
            // Head dims over 16-bit caches on the portable kernels only, in shared rows of the
            // next power of two (`tile_dim`).
            [[80: 64 128] [96: 64 128]];
            // Query/key and value head dims of prefill with narrower values (DeepSeek's 192 and
            // 128), over 16-bit K/V, with their block heights.
            [[192 128: 64]];
            // Head dims of Hopper's prefill over 8-bit caches (`hopper_prefill_byte_stages`).
            [64 128]
        );
        $each!(single paged_kv_gather);
        $each!(single paged_kv_scatter);
        $each!(single read_stream);
        $each!(single helper_check);
    };
    (@dtypes $each:ident $([$half:ident $dtype:ident])* ; $fp8s:tt ; $dims:tt ; $portable_dims:tt ; $qk_vo:tt ;
     $hopper_fp8_dims:tt) => {
        $(
            kernel_variants!(@dims $each $half $dtype $half same $dims);
            kernel_variants!(@dims $each $half $dtype $half same $portable_dims);
            kernel_variants!(@multi $each $half $dtype $dims);
            kernel_variants!(@multi $each $half $dtype $portable_dims);
            kernel_variants!(@qk_vo $each $half $dtype $qk_vo);
            kernel_variants!(@hopper $each $half $dtype $half same $dims);
            kernel_variants!(@fp8 $each $half $dtype $fp8s $dims $hopper_fp8_dims);
            $each!(merge_states $half $dtype);
            $each!(mla $half $dtype $half same);
            $each!(mla_hopper $half $dtype);
            $each!(mla_merge $half $dtype);
            $each!(rope $half $dtype neox);
            $each!(rope $half $dtype neox_scalar);
            $each!(rope $half $dtype gptj);
        )*
    };
    (@fp8 $each:ident $half:ident $dtype:ident [$([$kv:ident $kvname:ident])*] $dims:tt $hopper_dims:tt) => {
        $(
            kernel_variants!(@dims $each $half $dtype $kv $kvname $dims);
            kernel_variants!(@hopper_fp8 $each $half $dtype $kv $kvname $hopper_dims);
            $each!(paged_copy_fp8 gather $half $dtype $kv $kvname);
            $each!(paged_copy_fp8 scatter $half $dtype $kv $kvname);
            $each!(mla $half $dtype $kv $kvname);
        )*
    };
    (@multi $each:ident $half:ident $dtype:ident [$([$dim:literal : $($rows:literal)*])*]) => {
        $( $each!(decode_multi $half $dtype $dim); )*
    };
    (@qk_vo $each:ident $half:ident $dtype:ident [$([$qk:literal $vo:literal : $($rows:literal)*])*]) => {
        $( $( $each!(prefill_qk_vo $half $dtype $qk $vo $rows); )* )*
    };
    (@hopper_fp8 $each:ident $half:ident $dtype:ident $kv:ident $kvname:ident [$($dim:literal)*]) => {
        $( $each!(prefill_hopper $half $dtype $kv $kvname $dim); )*
    };
    (@hopper $each:ident $half:ident $dtype:ident $kv:ident $kvname:ident [$([$dim:literal : $($rows:literal)*])*]) => {
        $( $each!(prefill_hopper $half $dtype $kv $kvname $dim); )*
    };
    (@dims $each:ident $half:ident $dtype:ident $kv:ident $kvname:ident [$([$dim:literal : $($rows:literal)*])*]) => {
        $(
            $each!(decode $half $dtype $kv $kvname $dim);
            $( $each!(prefill $half $dtype $kv $kvname $dim $rows); )*
            $each!(prefill_masked $half $dtype $kv $kvname $dim);
        )*
    };
}

/// The entry-point name of a variant of [`kernel_variants!`], as a string literal.
#[allow(unused_macros)]
macro_rules! entry_name {
    (decode $dtype:ident same $dim:literal) => {
        concat!("decode_", stringify!($dtype), "_", stringify!($dim))
    };
    (decode $dtype:ident $kv:ident $dim:literal) => {
        concat!("decode_", stringify!($dtype), "_", stringify!($kv), "_", stringify!($dim))
    };
    (decode_multi $dtype:ident $dim:literal) => {
        concat!("decode_multi_", stringify!($dtype), "_", stringify!($dim))
    };
    (prefill $dtype:ident same $dim:literal $rows:literal) => {
        concat!("prefill_", stringify!($dtype), "_", stringify!($dim), "_rows", stringify!($rows))
    };
    (prefill_hopper $dtype:ident same $dim:literal) => {
        concat!("prefill_hopper_", stringify!($dtype), "_", stringify!($dim))
    };
    (prefill_hopper $dtype:ident $kv:ident $dim:literal) => {
        concat!("prefill_hopper_", stringify!($dtype), "_", stringify!($kv), "_", stringify!($dim))
    };
    (prefill_masked $dtype:ident same $dim:literal) => {
        concat!("prefill_masked_", stringify!($dtype), "_", stringify!($dim), "_rows64")
    };
    (prefill_masked $dtype:ident $kv:ident $dim:literal) => {
        concat!("prefill_masked_", stringify!($dtype), "_", stringify!($kv), "_", stringify!($dim), "_rows64")
    };
    (prefill_qk_vo $dtype:ident $qk:literal $vo:literal $rows:literal) => {
        concat!("prefill_", stringify!($dtype), "_", stringify!($qk), "x", stringify!($vo), "_rows", stringify!($rows))
    };
    (prefill $dtype:ident $kv:ident $dim:literal $rows:literal) => {
        concat!("prefill_", stringify!($dtype), "_", stringify!($kv), "_", stringify!($dim), "_rows", stringify!($rows))
    };
    (merge_states $dtype:ident) => {
        concat!("merge_states_", stringify!($dtype))
    };
    (mla $dtype:ident same) => {
        concat!("mla_", stringify!($dtype))
    };
    (mla $dtype:ident $kv:ident) => {
        concat!("mla_", stringify!($dtype), "_", stringify!($kv))
    };
    (mla_merge $dtype:ident) => {
        concat!("mla_merge_", stringify!($dtype))
    };
    (mla_hopper $dtype:ident) => {
        concat!("mla_hopper_", stringify!($dtype))
    };
    (rope $dtype:ident $mode:ident) => {
        concat!("rope_", stringify!($dtype), "_", stringify!($mode))
    };
    (paged_copy_fp8 $direction:ident $dtype:ident $kv:ident) => {
        concat!("paged_kv_", stringify!($direction), "_", stringify!($dtype), "_", stringify!($kv))
    };
    (single $name:ident) => {
        stringify!($name)
    };
}

/// The [`rope_mode`] constant of a RoPE variant's mode named in [`kernel_variants!`].
#[allow(unused_macros)]
macro_rules! rope_mode_id {
    (neox) => {
        ROPE_NEOX
    };
    (neox_scalar) => {
        ROPE_NEOX_SCALAR
    };
    (gptj) => {
        ROPE_GPTJ
    };
}

/// Bytes per element of a cache element type named in [`kernel_variants!`].
#[allow(unused_macros)]
macro_rules! kv_bytes {
    (same) => {
        2
    };
    ($kv:ident) => {
        1
    };
}

/// The PTX modules: the architecture each is compiled for, its file under `host/ptx/`, the
/// compute capability it is for, and how: `from` (the host loads the `from` module with the
/// highest capability the GPU reaches; it holds every kernel but the Hopper ones) or `exactly`
/// (an architecture-specific module, loaded beside it only on that capability: `sm_90a` code
/// runs on compute capability 9.0 alone). `ptx_targets!(each)` calls `each!` once with every
/// line.
#[allow(unused_macros)]
macro_rules! ptx_targets {
    ($each:ident) => {
        $each! {
            sm_80 "ferrinfer_sm80.ptx" (8, 0) from;
            sm_90 "ferrinfer_sm90.ptx" (9, 0) from;
            sm_90a "ferrinfer_sm90a.ptx" (9, 0) exactly;
        }
    };
}

/// Dynamic shared memory an A100 gives one block (163 KiB), the least of the GPUs the modules
/// serve at compute capability 8.0 and 9.0; every attention variant must fit it.
pub const MAX_BLOCK_SMEM_BYTES: u32 = 163 * 1024;

/// What every variant of [`kernel_variants!`] must satisfy, checked at compile time.
#[allow(unused_macros)]
macro_rules! assert_variant {
    (decode $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
        const _: () = {
            // Rows of whole 16-byte vectors and whole k16 mma steps; wider heads in 128-dim warps.
            assert!($dim % 16 == 0 && ($dim <= DECODE_WARP_DIMS || $dim % DECODE_WARP_DIMS == 0));
            assert!(decode_block_smem_bytes($dim, kv_bytes!($kvname)) <= MAX_BLOCK_SMEM_BYTES);
            // The warps' outputs, parked over the ring at the end, end before the statistics.
            let (q, o_rows) = (DECODE_ROWS * tile_dim($dim) * 2, DECODE_KEY_WARPS * DECODE_ROWS);
            let stats = DECODE_KEY_WARPS * DECODE_ROWS * 2 * 4;
            assert!(
                q + o_rows * decode_o_stride($dim, kv_bytes!($kvname)) * 4 + stats
                    <= decode_smem_bytes($dim, kv_bytes!($kvname))
            );
            // An 8-bit cache's K fragments come in 64-dim groups (`decode.rs`).
            assert!(kv_bytes!($kvname) == 2 || $dim % 64 == 0);
        };
    };
    (decode_multi $half:ident $dtype:ident $dim:literal) => {
        assert_variant!(decode $half $dtype $half same $dim);
    };
    (prefill $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal $rows:literal) => {
        const _: () = {
            assert!($dim % 16 == 0 && ($dim <= PREFILL_WARP_DIMS || $dim % PREFILL_WARP_DIMS == 0));
            assert!($rows % 64 == 0 && $rows / 64 >= 1 && $rows / 64 <= prefill_max_row_frags($dim));
            assert!(prefill_smem_bytes($dim, $dim, $rows / 64, kv_bytes!($kvname)) <= MAX_BLOCK_SMEM_BYTES);
        };
    };
    (prefill_masked $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
        const _: () = {
            assert!(prefill_smem_bytes($dim, $dim, 1, kv_bytes!($kvname)) <= MAX_BLOCK_SMEM_BYTES);
        };
    };
    (prefill_qk_vo $half:ident $dtype:ident $qk:literal $vo:literal $rows:literal) => {
        const _: () = {
            // Values in one warp's 128 dims, no wider than the keys (their copies ride on K's).
            assert!($qk % 16 == 0 && $vo % 16 == 0 && $vo <= PREFILL_WARP_DIMS && $vo <= $qk);
            assert!($rows % 64 == 0 && $rows / 64 >= 1 && $rows / 64 <= prefill_max_row_frags($vo));
            assert!(prefill_smem_bytes($qk, $vo, $rows / 64, 2) <= MAX_BLOCK_SMEM_BYTES);
        };
    };
    (prefill_hopper $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
        const _: () = {
            // Whole 64-dim slabs (the 128-byte swizzle atom), and 64 × N wgmma tiles with N ≤ 256.
            assert!($dim % 64 == 0 && $dim <= 256);
            assert!(hopper_prefill_smem_bytes($dim, kv_bytes!($kvname)) <= HOPPER_MAX_BLOCK_SMEM_BYTES);
            // An 8-bit cache's tiles go through at least two byte stages; plans cut split keys
            // in 16-bit tiles, so those must be whole tiles of every cache type.
            assert!(kv_bytes!($kvname) == 2 || hopper_prefill_byte_stages($dim, kv_bytes!($kvname)) >= 2);
            assert!(hopper_prefill_tile_tokens($dim, 2) % hopper_prefill_tile_tokens($dim, kv_bytes!($kvname)) == 0);
        };
    };
    (merge_states $half:ident $dtype:ident) => {};
    (mla $half:ident $dtype:ident $kv:ident $kvname:ident) => {
        const _: () = assert!(mla_smem_bytes(kv_bytes!($kvname)) <= MAX_BLOCK_SMEM_BYTES);
    };
    (mla_merge $half:ident $dtype:ident) => {};
    (mla_hopper $half:ident $dtype:ident) => {
        const _: () = assert!(mla_hopper_smem_bytes() <= HOPPER_MAX_BLOCK_SMEM_BYTES);
    };
    (rope $half:ident $dtype:ident $mode:ident) => {};
    (paged_copy_fp8 $direction:ident $half:ident $dtype:ident $kv:ident $kvname:ident) => {};
    (single $name:ident) => {};
}
kernel_variants!(assert_variant);
