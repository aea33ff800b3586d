//! Multi-head latent attention (DeepSeek's MLA, weights absorbed; FlashInfer's
//! `BatchMLAPagedAttentionWrapper`) over a paged latent cache, on `mma.sync` (`abi::MlaParams`).
//!
//! Every query head reads the same keys, so a block takes 64 packed rows (`token · heads +
//! head`) of one request and streams its keys once: 32-key tiles of the ckv (512 dims) and kpe
//! (64 dims) pools, through the page table with prefill's ring (`paged_tile`; the kpe rows ride
//! on the ckv rows' copies as a narrower "V"; an 8-bit cache's stages are widened into 16-bit
//! tiles as prefill's are, its one scale folded into the logits and the output). With 576 query-key dims and 512 output dims a
//! warp cannot hold a 16-row slice of O alone (256 f32 a thread), so the eight warps split both
//! products: warp `w` computes S for rows `16 (w mod 4)..` and the tile's keys `16 (w / 4)..`,
//! and O for the same rows and output dims `256 (w / 4)..`. The two warps of a row range (a
//! "pair") trade their row maxima before the exponentials (so both keep the same reference
//! maximum, `RowState::update_sharing_max`) and their P fragments after, each behind a named
//! barrier of the pair; at the end they add their row sums the same way. V is the ckv tile
//! itself: each key is read from memory once for both products.
//!
//! Split row tiles (long keys, few requests) write 16-bit partials that `mla_merge` combines, a
//! thread per 8 dims of a row: a tile's parts hold 64 × 512 values each, too much for one block
//! to merge after the others as prefill's last part does (measured in the Hopper kernel: a
//! four-part tile's last part took as long as the merge kernel, an eight-part one 12 µs
//! longer; docs/perf.md, thirtieth session).
use crate::abi::{
    kv_table_bytes, mla_smem_bytes, mla_widened_bytes, MlaMergeParams, MlaParams, PrefillWorkItem, MLA_CKV_DIM,
    MLA_KPE_DIM, MLA_MERGE_ROWS, MLA_ROWS, MLA_STAGES, MLA_THREADS, MLA_TILE_TOKENS, NO_PARTIAL,
};
use crate::gpu::fp8::KvElem;
use crate::gpu::half::Half;
use crate::gpu::hopper::named_barrier;
use crate::gpu::index::{block_x, block_y, thread_x};
use crate::gpu::math::{exp2, log2};
use crate::gpu::mem::{load_l2, load_l2_f32, Vec16};
use crate::gpu::shared::{dynamic_smem_addr, load_shared_u32, load_shared_u32x4, store_shared_u32, store_shared_u32x4};
use crate::gpu::sync::{allow_dependent_grids, wait_for_prerequisite_grids};
use crate::gpu::tensor::{copy_async_or_zero, load_matrix_x4, load_matrix_x4_trans, pipelined};
use crate::merge::{accumulate, store_output};
use crate::paged_tile::{swizzled, KvRing, PagedKv};
use crate::prefill::Visibility;
use crate::softmax::{finish_row, LogitScale, RowState};

const CKV: u32 = MLA_CKV_DIM;
const KPE: u32 = MLA_KPE_DIM;
/// Output dims of a warp: half a row.
const WARP_DIMS: u32 = CKV / 2;

/// Shared-memory offsets from the block's base over a cache of `kv_bytes`-byte elements: the
/// query tiles, the rings, an 8-bit cache's widened tiles, the row table, P and the pairs' row
/// statistics (`[q_pe, ckv ring, kpe ring, widened tiles, table, P, statistics]`).
const fn layout(kv_bytes: u32) -> [u32; 7] {
    let q_pe = MLA_ROWS * CKV * 2;
    let ckv_ring = q_pe + MLA_ROWS * KPE * 2;
    let kpe_ring = ckv_ring + MLA_STAGES * MLA_TILE_TOKENS * CKV * kv_bytes;
    let wide = kpe_ring + MLA_STAGES * MLA_TILE_TOKENS * KPE * kv_bytes;
    let table = wide + mla_widened_bytes(kv_bytes);
    let p = table + kv_table_bytes(MLA_STAGES, MLA_TILE_TOKENS);
    [q_pe, ckv_ring, kpe_ring, wide, table, p, p + MLA_ROWS * MLA_TILE_TOKENS * 2]
}

const _: () = {
    // `unroll_32!` walks a warp's output tiles.
    assert!(WARP_DIMS / 8 == 32);
    let mut kv_bytes = 1;
    while kv_bytes <= 2 {
        let [q_pe, ckv_ring, kpe_ring, wide, _, _, stats] = layout(kv_bytes);
        assert!(stats + 2 * MLA_ROWS * 4 == mla_smem_bytes(kv_bytes));
        // Swizzled tiles step along their rows by XOR: each starts at a multiple of its row
        // bytes (a 16-bit ring's stages, and the widened ckv tile with its kpe tile after it).
        assert!(q_pe % (KPE * 2) == 0 && ckv_ring % (CKV * 2) == 0 && kpe_ring % (KPE * 2) == 0);
        assert!(wide % (CKV * 2) == 0 && (MLA_TILE_TOKENS * CKV * 2) % (KPE * 2) == 0);
        kv_bytes += 1;
    }
    // Eight warps: four row ranges of 16 (the block's rows) × two halves of a tile's keys.
    assert!(MLA_THREADS == 256 && MLA_ROWS == 64 && MLA_TILE_TOKENS == 32);
};

/// The MLA kernel (module documentation). Grid: one block per work item.
#[inline(always)]
pub unsafe fn mla<H: Half + KvElem, K: KvElem>(p: &MlaParams) {
    // The merge of split tiles may become resident as this grid's blocks leave (it waits for
    // the whole grid before reading a partial).
    allow_dependent_grids();
    let a = &p.attention;
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    // The warp's row range (16 rows) and half (of each tile's keys for S, of the dims for O).
    let (row_warp, half) = (warp % 4, warp / 4);
    let t = lane % 4;
    let work = *(a.work as *const PrefillWorkItem).add(block_x() as usize);
    let heads = a.group_size.divisor;
    let rows = work.qo_len * heads;
    // Query token j sits at key position `diag + j` (causal plans have kv_len ≥ qo_len).
    let diag = work.kv_len.saturating_sub(work.qo_len);

    let smem = dynamic_smem_addr();
    let [q_pe, ckv_ring, kpe_ring, wide, table, p_frags, stats] = const { layout(K::BYTES) };
    let (q_nope_smem, q_pe_smem) = (smem, smem + q_pe);
    let (p_smem, stats_smem) = (smem + p_frags, smem + stats);

    // The queries (zeros past the request's last row) go with the first tile's copies.
    let (nope_chunks, pe_chunks) = (CKV / 8, KPE / 8);
    let chunks = nope_chunks + pe_chunks;
    let mut i = tid;
    while i < MLA_ROWS * chunks {
        let (row, chunk) = (i / chunks, i % chunks);
        let packed = work.first_row + row;
        let valid = packed < rows;
        // Row `(q_start + token) · heads + head` of q_nope and q_pe is `q_start · heads + packed`.
        let q_row = if valid { (work.q_start * heads + packed) as usize } else { 0 };
        if chunk < nope_chunks {
            let src = (a.q as *const Vec16).add(q_row * nope_chunks as usize + chunk as usize);
            copy_async_or_zero(q_nope_smem + swizzled::<CKV>(row, chunk), src, valid);
        } else {
            let pe_chunk = chunk - nope_chunks;
            let src = (p.q_pe as *const Vec16).add(q_row * pe_chunks as usize + pe_chunk as usize);
            copy_async_or_zero(q_pe_smem + swizzled::<KPE>(row, pe_chunk), src, valid);
        }
        i += MLA_THREADS;
    }

    let kv = PagedKv::new(&a.cache, work.pages, 0);
    let (start, end) = (work.kv_start, work.kv_end);
    // An 8-bit cache's stages are widened into 16-bit ckv and kpe tiles (`WIDEN_8BIT`): the
    // fragment loads and mma below are the same code for every cache type.
    let mut ring = KvRing::<H, K, CKV, KPE, MLA_TILE_TOKENS, MLA_THREADS, MLA_STAGES, true, false>::start(
        kv,
        start,
        end,
        tid,
        smem + ckv_ring,
        smem + kpe_ring,
        smem + table,
        smem + wide,
    );

    let mut visibility = Visibility::<MLA_TILE_TOKENS, 0, 4> {
        p: a,
        diag,
        block_first_row: work.first_row,
        warp_rows: 16,
        all_lo: 0,
        all_hi: 0,
        end,
    };
    let last_row = (work.first_row + MLA_ROWS).min(rows) - 1;
    (visibility.all_lo, visibility.all_hi) = (visibility.bounds(last_row).0, visibility.bounds(work.first_row).1);

    let scale = LogitScale::new(a.sm_scale, 0.0);
    let mut state = RowState::new();
    // `acc[n / 2][n % 2]`: the output tile of dims `WARP_DIMS · half + 8n..`, rows g and g + 8.
    let mut acc = [[[0.0f32; 4]; 2]; 16];
    // Named barrier 1 + row range: the pair's two warps (id 0 is the block's).
    let pair = 1 + row_warp;
    // The thread's rows g and g + 8 within the block, and their entries of the pair's
    // statistics (`[half][row]` f32).
    let my_row = 16 * row_warp + lane / 4;
    let stat = |of_half: u32, h: u32| stats_smem + 4 * (of_half * MLA_ROWS + my_row + 8 * h);
    // Publishes this warp's value of the thread's two rows, waits for the pair, and returns the
    // other warp's. Quad lanes hold the same values; the first writes.
    let trade = |own: [f32; 2]| {
        if t == 0 {
            store_shared_u32(stat(half, 0), own[0].to_bits());
            store_shared_u32(stat(half, 1), own[1].to_bits());
        }
        named_barrier(pair, 64);
        [f32::from_bits(load_shared_u32(stat(1 - half, 0))), f32::from_bits(load_shared_u32(stat(1 - half, 1)))]
    };
    // A lane's P fragment of a 16-key half of the tile: `[row range][half][lane]`, 16 bytes.
    let p_frag = |of_half: u32| p_smem + ((row_warp * 2 + of_half) * 32 + lane) * 16;

    for tile in 0..ring.tiles() {
        let masked = visibility.masks(start + tile * MLA_TILE_TOKENS);
        let (ckv_tile, kpe_tile) = ring.wait(tile);
        let first_key = start + tile * MLA_TILE_TOKENS + 16 * half;

        // S = q_nope·ckvᵀ + q_pe·kpeᵀ for the warp's 16 rows and 16 keys: 36 k-steps, over two
        // independent accumulator pairs so that consecutive mma do not wait for each other (four
        // spill inside the tile loop beside the 128 output accumulators).
        let mut parts = [[[0.0f32; 4]; 2]; 2];
        let lane_addr = |tile: u32, row_base: u32, row: u32, chunk: u32, wide: bool| {
            if wide {
                tile + swizzled::<CKV>(row_base + row, chunk)
            } else {
                tile + swizzled::<KPE>(row_base + row, chunk)
            }
        };
        let q_lane = lane_addr(q_nope_smem, 16 * row_warp, lane % 16, lane / 16, true);
        let k_lane = lane_addr(ckv_tile, 16 * half, (lane / 16) * 8 + lane % 8, (lane / 8) % 2, true);
        let qp_lane = lane_addr(q_pe_smem, 16 * row_warp, lane % 16, lane / 16, false);
        let kp_lane = lane_addr(kpe_tile, 16 * half, (lane / 16) * 8 + lane % 8, (lane / 8) % 2, false);
        // `steps` k-steps of 16 dims from the Q and K fragment addresses `q` and `k`.
        let mut product = |q: u32, k: u32, steps: u32| {
            pipelined(
                steps as usize,
                |kk| [load_matrix_x4(q ^ (32 * kk as u32)), load_matrix_x4(k ^ (32 * kk as u32))],
                |kk, [qf, kf]: [[u32; 4]; 2]| {
                    H::mma(&mut parts[kk % 2][0], qf, [kf[0], kf[1]]);
                    H::mma(&mut parts[kk % 2][1], qf, [kf[2], kf[3]]);
                },
            )
        };
        product(q_lane, k_lane, CKV / 16);
        product(qp_lane, kp_lane, KPE / 16);
        let mut s = [[0.0f32; 4]; 2];
        crate::unroll!(n in [0, 1] {
            crate::unroll!(c in [0, 1, 2, 3] {
                s[n][c] = parts[0][n][c] + parts[1][n][c];
            });
        });

        let factor = scale.apply(&mut s);
        if masked {
            visibility.apply(0, &mut s, first_key, t);
        }
        let probs = state.update_sharing_max::<H, 2, 1>(
            &s,
            2,
            factor,
            |own| {
                let other = trade(own);
                [own[0].max(other[0]), own[1].max(other[1])]
            },
            |h, rescale| {
                crate::unroll_32!(n, {
                    acc[n / 2][n % 2][2 * h] *= rescale;
                    acc[n / 2][n % 2][2 * h + 1] *= rescale;
                });
            },
        );
        // P of the whole tile: this warp's 16 keys, then both halves' back.
        store_shared_u32x4(p_frag(half), probs[0]);
        named_barrier(pair, 64);
        let p = [load_shared_u32x4(p_frag(0)), load_shared_u32x4(p_frag(1))];

        // O += P·ckv for the warp's 256 dims: ckv's B fragments come transposed from its
        // row-major [key][dim] tile. Keys outermost, so consecutive mma hit different
        // accumulators.
        let v_lane = ckv_tile + swizzled::<CKV>(((lane / 8) % 2) * 8 + lane % 8, lane / 16);
        let dim_steps = (WARP_DIMS / 16) as usize;
        pipelined(
            2 * dim_steps,
            |i| {
                let (kb, dp) = ((i / dim_steps) as u32, (i % dim_steps) as u32);
                load_matrix_x4_trans((v_lane ^ (16 * (WARP_DIMS / 8 * half + 2 * dp))) + kb * 16 * CKV * 2)
            },
            |i, v| {
                let (kb, dp) = (i / dim_steps, i % dim_steps);
                H::mma(&mut acc[dp][0], p[kb], [v[0], v[1]]);
                H::mma(&mut acc[dp][1], p[kb], [v[2], v[3]]);
            },
        );
    }
    ring.drain();

    // Each warp summed its half of every tile's keys, relative to the pair's common maximum.
    // (Both warps of the pair are past their last reads of the statistics: the P barrier.)
    let own = [state.row_sum(0), state.row_sum(1)];
    let other = trade(own);
    let split = work.slot != NO_PARTIAL;
    crate::unroll!(h in [0, 1] {
        let row = work.first_row + my_row + 8 * h as u32;
        if row < rows {
            let (inv, lse) = finish_row(state.m[h], own[h] + other[h], f32::NEG_INFINITY);
            // An 8-bit cache's scale (1 for a 16-bit one) goes with the normalisation.
            let inv = inv * a.v_scale;
            let first_dim = (WARP_DIMS * half + 2 * t) as usize;
            // A split tile's partial rows are 16-bit too (`mla_merge`), at its slot's rows.
            let (dst, dst_row, lse_at) = if split {
                let prow = (work.slot * MLA_ROWS + row - work.first_row) as usize;
                (a.split.partial_out, prow, a.split.partial_lse)
            } else {
                (a.out, (work.q_start * heads + row) as usize, a.lse)
            };
            let out = (dst as *mut u32).add((dst_row * CKV as usize + first_dim) / 2);
            crate::unroll_32!(n, {
                *out.add(4 * n) = H::pack2(acc[n / 2][n % 2][2 * h] * inv, acc[n / 2][n % 2][2 * h + 1] * inv);
            });
            if lse_at != 0 && t == 0 && half == 0 {
                *(lse_at as *mut f32).add(dst_row) = lse;
            }
        }
    });
}

/// Merges the split MLA row tiles (`abi::MlaMergeParams`): thread `t` of block `(x, y)` takes
/// 8-dim slice `t mod 64` of row `MLA_MERGE_ROWS · y + t / 64` of split tile `x`; rows past
/// the request leave at once. No shared memory and no barrier: each thread loads the LSEs and
/// its slices of [`MERGE_PARTS_AT_ONCE`] parts together, so that one memory round trip serves
/// a tile of that many parts (the merge of a 16-request decode batch, whose partials were just
/// written, waited on a chain of dependent loads before: docs/perf.md, thirtieth session), and
/// merges further groups of parts into the running state as the online softmax does.
#[inline(always)]
pub unsafe fn mla_merge<H: Half>(p: &MlaMergeParams) {
    let tile = *(p.tiles as *const PrefillWorkItem).add(block_x() as usize);
    const SLICES: u32 = CKV / 8;
    let (row, slice) = (block_y() * MLA_MERGE_ROWS + thread_x() / SLICES, thread_x() % SLICES);
    // Launched programmatically dependent on the attention (sm_90+): its partials are complete
    // and visible only past this wait. Every thread waits, rows or not, so this grid never
    // completes before the attention's: what the stream runs next (an ordinary launch, which
    // waits for this grid only) sees the attention's writes too.
    wait_for_prerequisite_grids();
    if tile.first_row + row >= tile.qo_len * p.heads {
        return;
    }
    let partial_row = |part: u32| ((tile.first_slot + part) * MLA_ROWS + row) as usize;
    let (mut m, mut total, mut o) = (f32::NEG_INFINITY, 0.0f32, [0.0f32; 8]);
    let mut first = 0;
    while first < tile.parts {
        let n = (tile.parts - first).min(MERGE_PARTS_AT_ONCE as u32) as usize;
        let mut s = [f32::NEG_INFINITY; MERGE_PARTS_AT_ONCE];
        let mut v = [Vec16::default(); MERGE_PARTS_AT_ONCE];
        crate::unroll!(k in [0, 1, 2, 3, 4, 5, 6, 7] {
            if k < n {
                let prow = partial_row(first + k as u32);
                s[k] = load_l2_f32((p.split.partial_lse as *const f32).add(prow));
                v[k] = load_l2((p.split.partial_out as *const Vec16).add(prow * SLICES as usize + slice as usize));
            }
        });
        let mut new_m = m;
        crate::unroll!(k in [0, 1, 2, 3, 4, 5, 6, 7] {
            new_m = new_m.max(s[k]);
        });
        // Weights against a finite reference (0 while no part has keys: every weight is then 0).
        let m_ref = if new_m == f32::NEG_INFINITY { 0.0 } else { new_m };
        let rescale = exp2(m - m_ref);
        total *= rescale;
        for x in o.iter_mut() {
            *x *= rescale;
        }
        crate::unroll!(k in [0, 1, 2, 3, 4, 5, 6, 7] {
            if k < n {
                let w = exp2(s[k] - m_ref);
                total += w;
                accumulate::<H>(&mut o, w, &v[k]);
            }
        });
        m = new_m;
        first += MERGE_PARTS_AT_ONCE as u32;
    }
    // Some part had keys (a total above 0) only with a finite maximum.
    let (inv, lse) = if total > 0.0 { (1.0 / total, m + log2(total)) } else { (0.0, f32::NEG_INFINITY) };
    for x in o.iter_mut() {
        *x *= inv;
    }
    let out_row = (tile.q_start * p.heads + tile.first_row + row) as usize;
    store_output::<H, CKV>(p.out, p.lse, out_row, slice, &o, lse);
}

/// Parts whose partials a merge thread loads at once (the unrolled loops walk eight).
const MERGE_PARTS_AT_ONCE: usize = 8;
const _: () = assert!(MERGE_PARTS_AT_ONCE == 8);
