//! Batch decode attention over the paged cache (FlashInfer's `BatchDecodeWithPagedKVCache`) on
//! tensor cores: each query token attends over its request's keys, found through the page
//! table with a run-time `page_size`.
//!
//! A block takes one KV head and up to 16 of its group's query heads as the rows of m16n8k16
//! tiles, so every K/V byte is read from memory once per block whatever the group size. At
//! head_dim 96 (16-bit) a block is two such blocks side by side, for adjacent KV heads, whose
//! shared ring copies a token's rows of both: 384 contiguous bytes in NHD, three whole 128-byte
//! lines, where one head's 192 bytes leave every other line split between two blocks. Keys
//! stream in 64-token tiles through a ring of shared-memory stages filled by `cp.async`, a few
//! tiles ahead of the math: bytes in flight, not arithmetic, set decode's speed. Each of the
//! four warps takes 16 keys of a tile (S = Q·Kᵀ, online softmax, O += P·V, all in registers);
//! the warps merge their states through shared memory at the end. The page of a key is looked
//! up one tile ahead, so that load's latency hides behind the math.
//!
//! Over an 8-bit cache the tile loop is its own: the stages hold bytes, and each lane loads the
//! bytes of its mma B fragments with 16-byte shared loads and converts them in registers (no
//! widened tiles, no second barrier). K's fragments need a permutation of the head dims, which
//! the query rows take too (S does not change); V's run along keys, gathered with `prmt`, and a
//! lane's output dims are 16 apart (8 at head_dim 64), un-permuted when O is parked for the
//! merge. See [`fp8_scores`] and [`fp8_accumulate`].
use crate::abi::{
    decode_block_threads, decode_dense_stages, decode_head_smem_stride, decode_heads_per_block, decode_o_stride,
    decode_smem_bytes, decode_stage_dim, decode_stages, decode_threads, tile_dim, DecodeParams, DecodeWorkItem,
    DECODE_KEY_WARPS, DECODE_ROWS, DECODE_TILE_TOKENS, DECODE_WARP_DIMS, NO_PARTIAL,
};
use crate::gpu::convert::permute_bytes;
use crate::gpu::fp8::KvElem;
use crate::gpu::half::Half;
use crate::gpu::hopper::named_barrier;
use crate::gpu::index::{block_x, thread_x, thread_x_here};
use crate::gpu::math::exp2;
use crate::gpu::mem::{load_readonly, Vec16};
use crate::gpu::shared::{
    dynamic_smem, dynamic_smem_addr, load_shared_u32x2, load_shared_u32x4, store_shared_u32, store_shared_u32x4,
};
use crate::gpu::sync::sync_threads;
use crate::gpu::tensor::{copy_async_or_zero, load_matrix_x4, load_matrix_x4_trans, pipelined};
use crate::merge::{last_to_finish, merge, store_output, store_partial, Team};
use crate::paged_tile::{fp8_swizzled, kv_head_scale, swizzled, KvRing, LaneAddr, PagedKv};
use crate::softmax::{finish_row, fold_sink, sink_logit, LogitScale, RowState};

/// The threads of one KV head of a decode block over a cache of `K` at `HEAD_DIM`
/// ([`decode_heads_per_block`]): [`decode_threads`] of them, in their head's region of shared
/// memory. One head a block: the whole block; two: each head's threads their own named barrier
/// (1 and 2).
struct HeadTeam<K: KvElem, const HEAD_DIM: u32>(core::marker::PhantomData<K>);

impl<K: KvElem, const HEAD_DIM: u32> HeadTeam<K, HEAD_DIM> {
    const ONE_HEAD: bool = decode_heads_per_block(HEAD_DIM, K::BYTES) == 1;
}

impl<K: KvElem, const HEAD_DIM: u32> Team for HeadTeam<K, HEAD_DIM> {
    const THREADS: u32 = decode_threads(HEAD_DIM);
    #[inline(always)]
    fn thread() -> u32 {
        if Self::ONE_HEAD {
            thread_x()
        } else {
            thread_x() % Self::THREADS
        }
    }
    #[inline(always)]
    fn sync() {
        if Self::ONE_HEAD {
            sync_threads()
        } else {
            named_barrier(1 + thread_x() / Self::THREADS, Self::THREADS)
        }
    }
    #[inline(always)]
    fn smem() -> *mut f32 {
        if Self::ONE_HEAD {
            return dynamic_smem();
        }
        let head_smem = (thread_x() / Self::THREADS) * decode_head_smem_stride(HEAD_DIM, K::BYTES);
        dynamic_smem::<u8>().wrapping_add(head_smem as usize).cast()
    }
}

/// Keys of a tile each warp takes.
const WARP_TOKENS: u32 = DECODE_TILE_TOKENS / DECODE_KEY_WARPS;

/// Masks the logits of a warp's keys at or past `end` to −∞; only a sequence's last tile has
/// any, and whether this is it is uniform, so other tiles pay one comparison.
#[inline(always)]
fn mask_end(s: &mut [[f32; 4]; 2], first_key: u32, t: u32, end: u32) {
    if first_key + WARP_TOKENS > end {
        crate::unroll!(n in [0, 1] {
            crate::unroll!(c in [0, 1, 2, 3] {
                if first_key + 8 * n as u32 + 2 * t + (c % 2) as u32 >= end {
                    s[n][c] = f32::NEG_INFINITY;
                }
            });
        });
    }
}

/// [`mask_end`] with an end for each of a lane's two rows (g: `ends[0]`, g + 8: `ends[1]`):
/// causal draft tokens, each of which sees the keys up to its own position. Uniform test first:
/// only the tiles that reach the earliest end pay.
#[inline(always)]
fn mask_row_ends(s: &mut [[f32; 4]; 2], first_key: u32, t: u32, ends: [u32; 2]) {
    if first_key + WARP_TOKENS > ends[0].min(ends[1]) {
        crate::unroll!(n in [0, 1] {
            crate::unroll!(c in [0, 1, 2, 3] {
                if first_key + 8 * n as u32 + 2 * t + (c % 2) as u32 >= ends[c / 2] {
                    s[n][c] = f32::NEG_INFINITY;
                }
            });
        });
    }
}

/// Logical position (in the query's shared rows: the mma k order) of physical head dim `d` over
/// an 8-bit cache. K's B fragment pairs (k 2t, 2t + 1) and (k 2t + 8, 2t + 9) of k-step
/// 4c + j are physical dims 64c + 16t + 4j + {0, 1} and + {2, 3}, so one 16-byte load of a key
/// row at byte 64c + 16t gives a lane all four k-steps of group c; the query takes the same
/// permutation, which leaves S = Q·Kᵀ unchanged. With d = 64c + 16t + 4j + 2h + e that is
/// 64c + 16j + 8h + 2t + e.
#[inline(always)]
fn fp8_q_position(d: u32) -> u32 {
    (d & !63) | ((d & 12) << 2) | ((d & 2) << 2) | ((d >> 3) & 6) | (d & 1)
}

/// S = Q·Kᵀ for a warp's 16 keys over an 8-bit K stage: `q_lane` is the lane's `ldmatrix`
/// address of the (permuted, [`fp8_q_position`]) query tile, `k_lane` that of its 16 bytes at
/// chunk t of key row g (n-tile 0; n-tile 1 is 8 rows on). Per 64-dim group: four A fragments
/// and, per n-tile, one 16-byte load whose words j are k-step 4c + j's B fragments, two
/// conversions each.
#[inline(always)]
unsafe fn fp8_scores<H: Half, K: KvElem, const HEAD_DIM: u32>(q_lane: u32, k_lane: u32) -> [[f32; 4]; 2] {
    let mut s = [[0.0f32; 4]; 2];
    pipelined(
        HEAD_DIM as usize / 64,
        |c| {
            let q = crate::inline_always!(|j: u32| load_matrix_x4(q_lane ^ (32 * (4 * c as u32 + j))));
            let k = crate::inline_always!(|n: u32| load_shared_u32x4((k_lane + 8 * n * HEAD_DIM) ^ (64 * c as u32)));
            ([q(0), q(1), q(2), q(3)], [k(0), k(1)])
        },
        |_, (a, k): ([[u32; 4]; 4], [[u32; 4]; 2])| {
            crate::unroll!(j in [0, 1, 2, 3] {
                crate::unroll!(n in [0, 1] {
                    H::mma(&mut s[n], a[j], K::widen4::<H>(k[n][j]));
                });
            });
        },
    );
    s
}

/// O += P·V for a warp's 16 keys over an 8-bit V stage. `v_rows` are the lane's addresses of
/// its bytes in key rows 2t, 2t + 1, 2t + 8, 2t + 9: `LANE_DIMS` (16, or 8 at head_dim 64)
/// consecutive dims from `dim_base + LANE_DIMS · g`, so that byte n is the B fragment column g
/// of n-tile n; output n-tile n's column c is thus dim `dim_base + LANE_DIMS · c + n`. `prmt`
/// pairs each byte of key 2t's word with key 2t + 1's (and 2t + 8's with 2t + 9's): the low
/// half of [w0.b0, w1.b0, w0.b1, w1.b1] is (k 2t, 2t + 1) of n-tile 4i, the high half of
/// n-tile 4i + 1; bytes 2 and 3 give n-tiles 4i + 2 and 4i + 3.
#[inline(always)]
unsafe fn fp8_accumulate<H: Half, K: KvElem, const LANE_DIMS: u32>(
    v_rows: [u32; 4],
    probs: [u32; 4],
    acc: &mut [[[f32; 4]; 2]; 16],
) {
    let mut w = [[0u32; 4]; 4];
    crate::unroll!(r in [0, 1, 2, 3] {
        if LANE_DIMS == 16 {
            w[r] = load_shared_u32x4(v_rows[r]);
        } else {
            let [a, b] = load_shared_u32x2(v_rows[r]);
            w[r] = [a, b, 0, 0];
        }
    });
    crate::unroll!(i in [0, 1, 2, 3] {
        if i < LANE_DIMS as usize / 4 {
            let low = [permute_bytes::<0x5140>(w[0][i], w[1][i]), permute_bytes::<0x7362>(w[0][i], w[1][i])];
            let high = [permute_bytes::<0x5140>(w[2][i], w[3][i]), permute_bytes::<0x7362>(w[2][i], w[3][i])];
            crate::unroll!(q in [0, 1] {
                // n-tiles 4i + 2q (acc[2i + q][0]) and 4i + 2q + 1 (acc[2i + q][1]).
                let (b_low, b_high) = (K::widen4::<H>(low[q]), K::widen4::<H>(high[q]));
                H::mma(&mut acc[2 * i + q][0], probs, [b_low[0], b_high[0]]);
                H::mma(&mut acc[2 * i + q][1], probs, [b_low[1], b_high[1]]);
            });
        }
    });
}

/// Row `row` of row tile `row_tile` of KV head `kv_head` in a block of draft tokens (packed
/// rows `token · group + head`): its row among the request's `tokens × num_qo_heads` query rows,
/// and its query head.
#[inline(always)]
fn draft_row(p: &DecodeParams, row_tile: u32, kv_head: u32, row: u32) -> (u32, u32) {
    let packed = row_tile * DECODE_ROWS + row;
    let (token, head) = (packed / p.group_size, packed % p.group_size);
    let head = kv_head * p.group_size + head;
    (token * p.num_qo_heads + head, head)
}

/// The key ends of a lane's rows g and g + 8 in a block of draft tokens: causal token `i` of
/// `n` sees the keys below `end − (n − 1 − i)`. Those lie in the request's last part only (plans
/// keep at least its last `n` keys there), so earlier parts, non-causal blocks and padding rows
/// keep the item's `end`.
#[inline(always)]
fn draft_row_ends(p: &DecodeParams, work: &DecodeWorkItem, row_tile: u32, tokens: u32, g: u32) -> [u32; 2] {
    let last_part = work.slot == NO_PARTIAL || work.slot + 1 == work.first_slot + work.parts;
    let row_end = |row: u32| {
        let token = ((row_tile * DECODE_ROWS + row) / p.group_size).min(tokens - 1);
        work.end - (tokens - 1 - token)
    };
    if p.causal != 0 && last_part {
        [row_end(g), row_end(g + 8)]
    } else {
        [work.end, work.end]
    }
}

#[inline(always)]
pub unsafe fn decode<
    H: Half,
    K: KvElem,
    const HEAD_DIM: u32,
    const THREADS: u32,
    const STAGES: u32,
    const DENSE: bool,
    const MULTI: bool,
>(
    p: &DecodeParams,
) {
    const { assert!(THREADS == decode_block_threads(HEAD_DIM, K::BYTES) && STAGES == decode_stages(HEAD_DIM, K::BYTES)) };
    const { assert!(DENSE == decode_dense_stages(HEAD_DIM, K::BYTES)) };
    const { assert!(K::BYTES == 2 || HEAD_DIM % 64 == 0) };
    // Several query tokens a request: 16-bit caches (their query rows load as they are).
    const { assert!(!MULTI || K::BYTES == 2) };
    let smem_bytes = const { decode_smem_bytes(HEAD_DIM, K::BYTES) };
    let out_dims = const {
        if HEAD_DIM < DECODE_WARP_DIMS {
            HEAD_DIM
        } else {
            DECODE_WARP_DIMS
        }
    };
    let chunks = HEAD_DIM / 8;
    // A block of two KV heads (`decode_heads_per_block`) is two of one head's blocks side by
    // side: thread `tid` of head `group`'s threads, in that head's region of shared memory
    // (`head_smem` bytes in), sharing one K/V ring that copies both heads' rows.
    let heads = const { decode_heads_per_block(HEAD_DIM, K::BYTES) };
    let head_threads = const { decode_threads(HEAD_DIM) };
    let head_smem_stride = const { decode_head_smem_stride(HEAD_DIM, K::BYTES) };
    // (One head a block: no arithmetic, so that the one-head kernels' code stays as it was.)
    let block_tid = thread_x();
    let tid = if heads == 1 { block_tid } else { block_tid % head_threads };
    let group = if heads == 1 { 0 } else { block_tid / head_threads };
    let (warp, lane) = (tid / 32, tid % 32);
    // Warp `warp` takes keys `16 · key_warp..` of each tile and output dims `dim_base..+ out_dims`.
    let (key_warp, dim_base) = (warp % DECODE_KEY_WARPS, (warp / DECODE_KEY_WARPS) * out_dims);
    let (g, t) = (lane / 4, lane % 4);
    // Blocks are numbered with the KV head fastest, so a request's heads run side by side and
    // read its pages together (in NHD a token's heads are adjacent): measured 1–2% faster at
    // batch 256 than the work item fastest, the same elsewhere.
    // With `MULTI`, a request's `tokens_per_request` query tokens share its KV head's blocks:
    // packed row `token · group + head` (as prefill packs them), row tiles of 16 of those.
    let tokens = if MULTI { p.tokens_per_request } else { 1 };
    let row_tiles = (tokens * p.group_size).div_ceil(DECODE_ROWS);
    let num_kv_heads = p.num_qo_heads / p.group_size;
    let heads_blocks = num_kv_heads.div_ceil(heads) * row_tiles;
    let (item, head_block) = (block_x() / heads_blocks, block_x() % heads_blocks);
    let (first_kv_head, row_tile) = ((head_block / row_tiles) * heads, head_block % row_tiles);
    let kv_head = first_kv_head + group;
    // The second head of a block past the cache's last (an odd count) computes on whatever its
    // stages hold and writes nothing: no query rows, no output, no merge.
    let head_exists = kv_head < num_kv_heads;
    let work = *(p.work as *const DecodeWorkItem).add(item as usize);
    let (request, start, end) = (work.request, work.start, work.end);
    let first_head = kv_head * p.group_size + row_tile * DECODE_ROWS;
    let rows =
        if heads == 1 || head_exists { (tokens * p.group_size - row_tile * DECODE_ROWS).min(DECODE_ROWS) } else { 0 };
    let request_rows = tokens * p.num_qo_heads;

    let head_smem = group * head_smem_stride;
    let smem = dynamic_smem_addr() + head_smem;
    let q_smem = smem;
    // Shared rows are `tile_dim` wide (the next power of two: 128 for head dims 80 and 96).
    let stage_dim = const { tile_dim(HEAD_DIM) };
    // K/V stages: the same, or dense rows of `HEAD_DIM` (`decode_dense_stages`).
    let kv_dim = const { decode_stage_dim(HEAD_DIM, K::BYTES) };
    let k_smem = q_smem + DECODE_ROWS * stage_dim * 2;
    let v_smem = k_smem + STAGES * DECODE_TILE_TOKENS * kv_dim * K::BYTES;
    let table_smem = v_smem + STAGES * DECODE_TILE_TOKENS * kv_dim * K::BYTES;

    // Over a 16-bit cache the query rows (zeros past the group) go with the first tile's copies.
    let q = p.q as *const Vec16;
    if K::BYTES == 2 {
        let mut i = tid;
        while i < DECODE_ROWS * chunks {
            let (row, chunk) = (i / chunks, i % chunks);
            let valid = row < rows;
            // (One token: the expression as before draft tokens, so that decode's code stays.)
            let src = if valid {
                if MULTI {
                    ((request * request_rows + draft_row(p, row_tile, kv_head, row).0) * chunks + chunk) as usize
                } else {
                    ((request * p.num_qo_heads + first_head + row) * chunks + chunk) as usize
                }
            } else {
                0
            };
            copy_async_or_zero(q_smem + swizzled::<HEAD_DIM>(row, chunk), q.add(src), valid);
            i += head_threads;
        }
    }

    // The ring lives in the first head's region and copies every head's rows into its own.
    let mut kv = PagedKv::new(&p.cache, work.pages, first_kv_head);
    kv.second_head = heads > 1 && first_kv_head + 1 < num_kv_heads;
    let mut ring = KvRing::<H, K, HEAD_DIM, HEAD_DIM, DECODE_TILE_TOKENS, THREADS, STAGES, false, DENSE>::start(
        kv,
        start,
        end,
        block_tid,
        k_smem - head_smem,
        v_smem - head_smem,
        table_smem - head_smem,
        0,
    );
    if K::BYTES == 1 {
        // Over an 8-bit cache the query rows go in permuted (`fp8_q_position`), a pair of dims
        // per store, while the first tiles are in flight; the first `wait`'s barrier publishes
        // them.
        let mut i = tid;
        while i < DECODE_ROWS * chunks {
            let (row, chunk) = (i / chunks, i % chunks);
            let src = ((request * p.num_qo_heads + first_head + row) * chunks + chunk) as usize;
            let v = if row < rows { load_readonly(q.add(src)).0 } else { [0; 4] };
            crate::unroll!(u in [0, 1, 2, 3] {
                let at = fp8_q_position(8 * chunk + 2 * u as u32);
                store_shared_u32(q_smem + swizzled::<HEAD_DIM>(row, at / 8) + (at % 8) * 2, v[u]);
            });
            i += head_threads;
        }
    }

    // Per thread: rows g and g + 8 of the warp's state; `acc[n / 2][n % 2]` holds output
    // n-tile n: over a 16-bit cache dims dim_base + 8n.. + 8, this thread's dims + 2t and
    // + 2t + 1 of each row; over an 8-bit cache dims dim_base + lane_dims · c + n for columns
    // c = 2t and 2t + 1.
    // Over an 8-bit cache the block's KV head's K scale joins the logit scale (its V scale the
    // normalisation, after the tile loop); 16-bit kernels have none.
    let sm_scale =
        if K::BYTES == 1 { p.sm_scale * kv_head_scale::<false>(p.kv_head_scales, kv_head) } else { p.sm_scale };
    let scale = LogitScale::new(sm_scale, p.logits_soft_cap);
    let mut state = RowState::new();
    let mut acc = [[[0.0f32; 4]; 2]; 16];
    let warp_row = key_warp * WARP_TOKENS;
    // Draft tokens: each row's own key end (`draft_row_ends`).
    let row_ends = if MULTI { draft_row_ends(p, &work, row_tile, tokens, g) } else { [end, end] };
    // A lane's output dims over an 8-bit cache: 16 apart (8 at head_dim 64, `fp8_accumulate`).
    let lane_dims = out_dims / 8;
    if K::BYTES == 1 {
        for tile in 0..ring.tiles() {
            // One barrier per tile: the fragments come from the byte stages themselves.
            let (k_tile, v_tile) = ring.wait(tile);
            let (k_tile, v_tile) = (k_tile + head_smem, v_tile + head_smem);
            let lane = thread_x_here() % 32;
            let (g, t) = (lane / 4, lane % 4);
            let q_lane = q_smem + swizzled::<HEAD_DIM>(lane % 16, lane / 16);
            let k_lane = k_tile + fp8_swizzled::<HEAD_DIM>(warp_row + g, t);
            let mut s = fp8_scores::<H, K, HEAD_DIM>(q_lane, k_lane);
            let factor = scale.apply(&mut s);
            mask_end(&mut s, start + tile * DECODE_TILE_TOKENS + warp_row, t, end);
            let [probs] = state.update::<H, 2, 1>(&s, factor, &mut acc, out_dims / 8);
            // Rows 2t and 2t + 8 share their swizzle; 2t + 1 has its own.
            let (first, byte) = (dim_base + lane_dims * g, (dim_base + lane_dims * g) % 16);
            let even = v_tile + fp8_swizzled::<HEAD_DIM>(warp_row + 2 * t, first / 16) + byte;
            let odd = v_tile + fp8_swizzled::<HEAD_DIM>(warp_row + 2 * t + 1, first / 16) + byte;
            let v_rows = [even, odd, even + 8 * HEAD_DIM, odd + 8 * HEAD_DIM];
            if lane_dims == 16 {
                fp8_accumulate::<H, K, 16>(v_rows, probs, &mut acc);
            } else {
                fp8_accumulate::<H, K, 8>(v_rows, probs, &mut acc);
            }
        }
    } else {
        for tile in 0..ring.tiles() {
            let (k_tile, v_tile) = ring.wait(tile);
            let (k_tile, v_tile) = (k_tile + head_smem, v_tile + head_smem);

            // Fragment addresses: each lane's first, then one xor per step along the row (see
            // `swizzled`; the stages are multiples of a row from a 1 KiB-aligned base).
            let lane = thread_x_here() % 32;
            let q_lane = q_smem + swizzled::<HEAD_DIM>(lane % 16, lane / 16);
            let k_lane =
                LaneAddr::new::<HEAD_DIM, DENSE>(k_tile, warp_row + (lane / 16) * 8 + lane % 8, (lane / 8) % 2);
            let v_lane =
                LaneAddr::new::<HEAD_DIM, DENSE>(v_tile, warp_row + ((lane / 8) % 2) * 8 + lane % 8, lane / 16);
            // S = Q·Kᵀ for the warp's 16 keys: two n-tiles of 8 keys.
            let mut s = [[0.0f32; 4]; 2];
            pipelined(
                HEAD_DIM as usize / 16,
                |kk| (load_matrix_x4(q_lane ^ (32 * kk as u32)), load_matrix_x4(k_lane.at(32 * kk as u32))),
                |_, (a, b)| {
                    H::mma(&mut s[0], a, [b[0], b[1]]);
                    H::mma(&mut s[1], a, [b[2], b[3]]);
                },
            );
            let factor = scale.apply(&mut s);
            if MULTI {
                mask_row_ends(&mut s, start + tile * DECODE_TILE_TOKENS + warp_row, t, row_ends);
            } else {
                mask_end(&mut s, start + tile * DECODE_TILE_TOKENS + warp_row, t, end);
            }
            let [probs] = state.update::<H, 2, 1>(&s, factor, &mut acc, out_dims / 8);
            // O += P·V: V's B fragments come transposed from its row-major [key][dim] tile.
            pipelined(
                out_dims as usize / 16,
                |dp| load_matrix_x4_trans(v_lane.at(16 * (dim_base / 8 + 2 * dp as u32))),
                |dp, b| {
                    H::mma(&mut acc[dp][0], probs, [b[0], b[1]]);
                    H::mma(&mut acc[dp][1], probs, [b[2], b[3]]);
                },
            );
        }
    }
    ring.drain();
    sync_threads();

    // Merge the warps: each parks (m, d, O) in shared memory, then every thread finishes
    // 8-dim slices of rows. O rows are padded by 8 floats to spread the stores over the banks
    // (over an 8-bit cache, by 4 floats per 32 dims as well: `decode_o_stride`).
    let o_stride = decode_o_stride(HEAD_DIM, K::BYTES) as usize;
    let o_col = crate::inline_always!(|dim: usize| if K::BYTES == 2 { dim } else { dim + 4 * (dim / 32) });
    let head_base = dynamic_smem::<f32>().add((head_smem / 4) as usize);
    let o_smem = head_base.add((DECODE_ROWS * stage_dim * 2 / 4) as usize);
    let stats = head_base.add((smem_bytes / 4) as usize - (DECODE_KEY_WARPS * DECODE_ROWS * 2) as usize);
    let my_rows = [(key_warp * DECODE_ROWS + g) as usize, (key_warp * DECODE_ROWS + g + 8) as usize];
    crate::unroll!(h in [0, 1] {
        let d_row = state.row_sum(h);
        // The warps splitting the dims of these keys hold the same statistics.
        if t == 0 && dim_base == 0 {
            *stats.add(2 * my_rows[h]) = state.m[h];
            *stats.add(2 * my_rows[h] + 1) = d_row;
        }
        if K::BYTES == 2 {
            crate::unroll_to!(n < out_dims / 8, {
                let o = o_smem.add(my_rows[h] * o_stride + dim_base as usize + 8 * n + 2 * t as usize);
                *o = acc[n / 2][n % 2][2 * h];
                *o.add(1) = acc[n / 2][n % 2][2 * h + 1];
            });
        } else {
            // acc[n][2h + e] is dim dim_base + lane_dims · (2t + e) + n: four n-tiles make four
            // adjacent dims, one 16-byte store.
            let o_addr = smem + DECODE_ROWS * stage_dim * 2;
            crate::unroll!(e in [0, 1] {
                crate::unroll!(quad in [0, 1, 2, 3] {
                    if quad < lane_dims as usize / 4 {
                        let dim = (dim_base + lane_dims * (2 * t + e as u32)) as usize + 4 * quad;
                        let at = (my_rows[h] * o_stride + o_col(dim)) as u32 * 4;
                        let n = crate::inline_always!(
                        |k: usize| acc[2 * quad + k / 2][k % 2][2 * h + e].to_bits());
                        store_shared_u32x4(o_addr + at, [n(0), n(1), n(2), n(3)]);
                    }
                });
            });
        }
    });
    sync_threads();

    // 8-bit caches: the block's KV head's V scale, read once, after the tile loop.
    let v_head = if K::BYTES == 1 { kv_head_scale::<true>(p.kv_head_scales, kv_head) } else { 1.0 };
    let mut i = tid;
    while i < rows * chunks {
        let (row, chunk) = (i / chunks, i % chunks);
        let mut m_all = f32::NEG_INFINITY;
        for w in 0..DECODE_KEY_WARPS {
            m_all = m_all.max(*stats.add(2 * (w * DECODE_ROWS + row) as usize));
        }
        let m_ref = if m_all == f32::NEG_INFINITY { 0.0 } else { m_all };
        let (mut d_all, mut o) = (0.0, [0.0f32; 8]);
        for w in 0..DECODE_KEY_WARPS {
            let r = (w * DECODE_ROWS + row) as usize;
            let weight = exp2(*stats.add(2 * r) - m_ref);
            d_all += weight * *stats.add(2 * r + 1);
            let src = o_smem.add(r * o_stride + o_col(8 * chunk as usize));
            for e in 0..8 {
                o[e] += weight * *src.add(e);
            }
        }
        // A split request's sink waits for the merge (partials are sink-free).
        let sink = if work.slot == NO_PARTIAL {
            sink_logit(p.sinks, if MULTI { draft_row(p, row_tile, kv_head, row).1 } else { first_head + row })
        } else {
            f32::NEG_INFINITY
        };
        let (inv, lse) = finish_row(m_ref, d_all, sink);
        // V's dequantisation scales go with the normalisation: partials and merges are linear.
        let inv = if K::BYTES == 1 { inv * (p.v_scale * v_head) } else { inv * p.v_scale };
        for e in &mut o {
            *e *= inv;
        }
        let out_row = if MULTI {
            (request * request_rows + draft_row(p, row_tile, kv_head, row).0) as usize
        } else {
            (request * p.num_qo_heads + first_head + row) as usize
        };
        if work.slot == NO_PARTIAL {
            store_output::<H, HEAD_DIM>(p.out, p.lse, out_row, chunk, &o, lse);
        } else {
            let prow = if MULTI {
                (work.slot * request_rows + draft_row(p, row_tile, kv_head, row).0) as usize
            } else {
                (work.slot * p.num_qo_heads + first_head + row) as usize
            };
            store_partial::<HEAD_DIM>(&p.split, prow, chunk, &o, lse);
        }
        i += head_threads;
    }
    if work.slot == NO_PARTIAL || (heads > 1 && !head_exists) {
        return;
    }
    // Split request: the last of its items to get here (for this KV head and row tile) merges
    // all the parts. The flag lives past the merge's staging; the K/V ring is free by now.
    let last_flag = head_base.cast::<u32>().add((smem_bytes / 4 - 1) as usize);
    let unit = if heads == 1 { head_block } else { kv_head * row_tiles + row_tile };
    let counter = (p.split.merge_counters as *mut u32).add((work.counters + unit) as usize);
    if !last_to_finish::<HeadTeam<K, HEAD_DIM>>(counter, work.parts, last_flag) {
        return;
    }
    let partial_row = |part: u32, row: u32| {
        if MULTI {
            ((work.first_slot + part) * request_rows + draft_row(p, row_tile, kv_head, row).0) as usize
        } else {
            ((work.first_slot + part) * p.num_qo_heads + first_head + row) as usize
        }
    };
    merge::<HeadTeam<K, HEAD_DIM>, HEAD_DIM>(&p.split, work.parts, rows, partial_row, |row, chunk, o, lse| {
        let out_row = if MULTI {
            (work.request * request_rows + draft_row(p, row_tile, kv_head, row).0) as usize
        } else {
            (work.request * p.num_qo_heads + first_head + row) as usize
        };
        let (o, lse) = fold_sink(
            o,
            lse,
            sink_logit(p.sinks, if MULTI { draft_row(p, row_tile, kv_head, row).1 } else { first_head + row }),
        );
        store_output::<H, HEAD_DIM>(p.out, p.lse, out_row, chunk, &o, lse)
    });
}
