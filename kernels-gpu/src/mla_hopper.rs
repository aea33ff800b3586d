//! MLA on Hopper (sm_90a, 16-bit latent caches): the semantics of `mla` (`abi::MlaParams`) on
//! `wgmma`, for the 128-head rows that are compute-bound (`abi::MLA_HOPPER_TILE_TOKENS`).
//!
//! A block is three warpgroups over 64 packed query rows. The producer resolves each 64-key
//! tile's tokens through the page table (one key a thread, into a row table in shared memory)
//! and gathers their ckv rows (eight 64-dim slabs) and kpe rows (a ninth) with `cp.async` into
//! one of two stages, arriving on the stage's "full" mbarrier as the copies land. Where the
//! host passes the pools' TMA maps (`MlaParams::tensor_maps`: page sizes of whole tiles, where
//! a tile is one box a slab) one producer thread issues TMA boxes instead (`produce_tma`),
//! which land in the same swizzled layout and complete the stage's transaction bytes. `wgmma` reads
//! its A operand from shared memory afresh for every instruction, so S wants 64-key tiles (at
//! m64n64 Q's and K's bytes balance the tensor work) and a 64 × 512 O takes two warpgroups'
//! registers: consumer warpgroup `c` owns O's dims `256 c..` and the S of the tiles
//! `t ≡ c (mod 2)`. For its tile the owner computes S = Q·Kᵀ over all 576 dims, the online
//! softmax (`softmax::RowState`, from the reference maximum the other warpgroup handed over
//! with the tile before), and hands the tile's P fragments and new reference maximum to the
//! other warpgroup through shared memory (named barriers `HANDOFF + t mod 2`: the owner arrives,
//! the other waits); each warpgroup then adds the tile's P · V into its half of O, V being the
//! stage's first eight slabs (the ckv rows) read MN-major. While one warpgroup runs its tile's
//! softmax, the other's P · V of the tile before runs on the tensor cores.
//!
//! A handed-over value is read and rewritten at the same place by the same thread of the other
//! warpgroup (each thread's P fragments, each quad's maxima), so one buffer serves every tile:
//! a warpgroup writes tile `t + 1`'s hand-over only after reading tile `t`'s.
//!
//! At the end the finished rows leave through the K stages, free by then: each thread stages
//! its fragments, and the block's rows go out in 16-byte stores of whole rows. A split tile's
//! partial rows are 16-bit like its output (FlashInfer's too), merged by `mla::mla_merge`.
use crate::abi::{
    mla_hopper_smem_bytes, register_split_fits, MlaParams, PrefillWorkItem, HOPPER_PRODUCER_THREADS, MLA_CKV_DIM,
    MLA_HOPPER_THREADS, MLA_HOPPER_TILE_TOKENS, MLA_KPE_DIM, MLA_ROWS, NO_PARTIAL,
};
use crate::gpu::hopper::{
    claim_registers, descriptor_plus, fence_proxy_async, mbarrier_arrive, mbarrier_arrive_expect_tx,
    mbarrier_arrive_on_async_copies, mbarrier_init, mbarrier_wait, named_barrier, named_barrier_arrive,
    release_registers, smem_descriptor, tma_load_2d, wgmma_commit, wgmma_fence, wgmma_wait_frags, Wgmma,
};
use crate::gpu::index::{block_x, thread_x};
use crate::gpu::mem::{store, Vec16};
use crate::gpu::shared::{dynamic_smem_addr, load_shared_u32, load_shared_u32x4, store_shared_u32, store_shared_u32x4};
use crate::gpu::sync::{allow_dependent_grids, sync_threads, sync_warp};
use crate::gpu::tensor::{copy_async, copy_async_or_zero, wait_async_copies};
use crate::gpu::warp::{any, warp_uniform};
use crate::softmax::{finish_row, LogitScale, RowState};

const TILE: u32 = MLA_HOPPER_TILE_TOKENS;
const CKV: u32 = MLA_CKV_DIM;
const KPE: u32 = MLA_KPE_DIM;
/// 16-byte chunks of a token's row: 64 of ckv, then 8 of kpe.
const CHUNKS: u32 = (CKV + KPE) / 8;
const SLAB_ROW_BYTES: u32 = 128;
/// Bytes of a 64-row slab, and of a 64-row tile of nine slabs (Q, or a K stage).
const SLAB_BYTES: u32 = 64 * SLAB_ROW_BYTES;
const TILE_BYTES: u32 = CHUNKS / 8 * SLAB_BYTES;
const CONSUMER_THREADS: u32 = MLA_HOPPER_THREADS - HOPPER_PRODUCER_THREADS;
/// Named barriers: 0 is `bar.sync`'s; the consumers share 1, the hand-overs alternate 2 and 3,
/// the producer has 4.
const BARRIER_CONSUMERS: u32 = 1;
const BARRIER_HANDOFF: u32 = 2;
const BARRIER_PRODUCER: u32 = 4;
/// Registers a producer thread keeps and a consumer thread takes (`setmaxnreg`): the producer
/// only resolves keys and issues copies; a consumer holds O's half (128 f32), S (32) and P.
/// 128 · 24 + 256 · 240 is the block's whole pool (`abi::register_split_fits`).
const PRODUCER_REGISTERS: u32 = 24;
const CONSUMER_REGISTERS: u32 = 240;
const _: () = assert!(register_split_fits(MLA_HOPPER_THREADS, PRODUCER_REGISTERS, CONSUMER_REGISTERS));

/// Shared-memory offsets: Q, the two K stages, the P hand-over, the maxima hand-over, the two
/// warpgroups' row sums, the producer's row tables (a stage each), the mbarriers (full 0, 1,
/// empty 0, 1).
const K_STAGES: u32 = TILE_BYTES;
const P_HANDOFF: u32 = K_STAGES + 2 * TILE_BYTES;
const M_HANDOFF: u32 = P_HANDOFF + MLA_ROWS * TILE * 2;
const ROW_SUMS: u32 = M_HANDOFF + MLA_ROWS * 4;
const ROW_TABLES: u32 = ROW_SUMS + 2 * MLA_ROWS * 4;
const BARS: u32 = ROW_TABLES + 2 * TILE * 4;
const _: () = {
    assert!(BARS + 4 * 8 == mla_hopper_smem_bytes());
    assert!(HOPPER_PRODUCER_THREADS == 8 * 16 && KPE / 8 == 8);
    assert!(TILE == 64 && MLA_ROWS == 64 && MLA_HOPPER_THREADS == 3 * 128 && CHUNKS == 72);
};

/// Byte offset of 16-byte chunk `chunk` of row `row` in a 64-row tile of 64-dim slabs with the
/// 128-byte swizzle (`wgmma`'s layout; `prefill_hopper`'s `slab_offset` at 64 rows).
#[inline(always)]
fn slab_offset(row: u32, chunk: u32) -> u32 {
    (chunk / 8) * SLAB_BYTES + row * SLAB_ROW_BYTES + (((chunk % 8) ^ (row % 8)) * 16)
}

/// The kernel (module documentation). Grid: one block per work item.
#[inline(always)]
pub unsafe fn mla_hopper<H: Wgmma>(p: &MlaParams) {
    // The merge of split tiles may become resident as this grid's blocks leave (it waits for
    // the whole grid before reading a partial).
    allow_dependent_grids();
    let a = &p.attention;
    let tid = thread_x();
    let work = *(a.work as *const PrefillWorkItem).add(block_x() as usize);
    let smem = dynamic_smem_addr();
    let tiles = (work.kv_end - work.kv_start).div_ceil(TILE);
    // The pools' TMA maps where the host made them: one producer thread arms each stage.
    let tma = p.tensor_maps != 0;
    if tid == 0 {
        crate::unroll!(stage in [0, 1] {
            mbarrier_init(full(smem, stage as u32), if tma { 1 } else { HOPPER_PRODUCER_THREADS });
            mbarrier_init(empty(smem, stage as u32), CONSUMER_THREADS);
        });
    }
    sync_threads();
    if tid < HOPPER_PRODUCER_THREADS {
        release_registers::<PRODUCER_REGISTERS>();
        if tma {
            if tid == 0 {
                produce_tma(a.cache.kv_indices, a.cache.page_size, p.tensor_maps, p.pool_rows, &work, tiles, smem);
            }
            return;
        }
        produce(a.cache.kv_indices, a.cache.page_size, a.cache.k_pages, a.cache.v_pages, &work, tiles, smem, tid);
        // Leave only once this thread's copies have landed.
        wait_async_copies(0);
    } else {
        claim_registers::<CONSUMER_REGISTERS>();
        consume::<H>(p, &work, tiles, smem, tid);
    }
}

/// The producer warpgroup: every tile of the item into stage `tile % 2`, round `tile / 2`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn produce(
    kv_indices: u64,
    page_size: crate::abi::FastDiv,
    ckv: u64,
    kpe: u64,
    work: &PrefillWorkItem,
    tiles: u32,
    smem: u32,
    tid: u32,
) {
    let pages = (kv_indices as *const u32).add(work.pages as usize);
    // Keys past the item's end copy its last key again: their logits are masked.
    let last = work.kv_end.max(work.kv_start + 1) - 1;
    let mut tile = 0;
    while tile < tiles {
        let stage = tile % 2;
        let table = smem + ROW_TABLES + stage * TILE * 4;
        // One key a thread of the first 64: its token's row in the pools (page · page_size +
        // slot), loaded while the stage drains.
        let row = if tid < TILE {
            let position = (work.kv_start + tile * TILE + tid).min(last);
            let (page, slot) = page_size.divmod(position);
            *pages.add(page as usize) * page_size.divisor + slot
        } else {
            0
        };
        if tile >= 2 {
            mbarrier_wait(empty(smem, stage), (tile / 2 + 1) % 2);
        }
        if tid < TILE {
            store_shared_u32(table + 4 * tid, row);
        }
        // Every producer thread is past its copies of the tile before (which read the other
        // table) and this table is written.
        named_barrier(BARRIER_PRODUCER, HOPPER_PRODUCER_THREADS);
        // Thread `tid` copies chunk `tid % 8` of each 128-byte line of keys `tid / 8 + 16 k`
        // (k < 4): their eight ckv lines and their kpe line, 36 copies at fixed offsets from
        // four row offsets read up front (a warp: four whole lines a copy). The swizzle's chunk
        // is the same for all four keys (they are 16 apart).
        let dst = smem + K_STAGES + stage * TILE_BYTES;
        let (chunk, first_key) = (tid % 8, tid / 8);
        let line = first_key * SLAB_ROW_BYTES + ((chunk ^ (first_key % 8)) * 16);
        let rows = [0u32, 1, 2, 3].map(|k| load_shared_u32(table + 4 * (first_key + 16 * k)) as usize);
        crate::unroll!(k in [0, 1, 2, 3] {
            let at = dst + line + 16 * k as u32 * SLAB_ROW_BYTES;
            let ckv_row = (ckv as *const Vec16).add(rows[k] * (CKV / 8) as usize + chunk as usize);
            crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
                copy_async(at + j as u32 * SLAB_BYTES, ckv_row.add(8 * j));
            });
            let kpe_row = (kpe as *const Vec16).add(rows[k] * (KPE / 8) as usize + chunk as usize);
            copy_async(at + 8 * SLAB_BYTES, kpe_row);
        });
        mbarrier_arrive_on_async_copies(full(smem, stage));
        tile += 1;
    }
}

/// Issues the nine boxes (eight ckv slabs, the kpe slab) of rows `row..row + h` of the pools
/// (`h` a power of two up to 64) into the tile's rows from `at` on (the first slab's address),
/// completing on `bar`. Map `2 i` (ckv) and `2 i + 1` (kpe) move boxes of `64 >> i` rows
/// (`abi::MLA_TMA_MAPS`).
#[inline(always)]
unsafe fn tma_rows(maps: u64, at: u32, row: u32, h: u32, bar: u32) {
    let map = maps + 256 * (6 - (31 - h.leading_zeros())) as u64;
    crate::unroll!(s in [0, 1, 2, 3, 4, 5, 6, 7] {
        tma_load_2d(at + s as u32 * SLAB_BYTES, map, 64 * s as u32, row, bar);
    });
    tma_load_2d(at + 8 * SLAB_BYTES, map + 128, 0, row, bar);
}

/// Rows `row..row + len` of the pools into tile rows from `at` on, as boxes of powers of two;
/// returns where the next row goes.
#[inline(always)]
unsafe fn tma_run(maps: u64, mut at: u32, mut row: u32, mut len: u32, bar: u32) -> u32 {
    while len > 0 {
        let h = 1u32 << (31 - len.min(TILE).leading_zeros());
        tma_rows(maps, at, row, h, bar);
        at += h * SLAB_ROW_BYTES;
        row += h;
        len -= h;
    }
    at
}

/// The producer through TMA (`p.tensor_maps`; one thread): each run of a tile's keys in one
/// page goes as boxes of powers of two (one 64-row box a slab where a tile lies in a page), the
/// rows past the item's end as boxes wholly below the pools' last row, which TMA fills with
/// zeros (finite V for the masked keys). The stage's "full" expects the whole tile's bytes.
#[inline(always)]
unsafe fn produce_tma(
    kv_indices: u64,
    page_size: crate::abi::FastDiv,
    maps: u64,
    pool_rows: u32,
    work: &PrefillWorkItem,
    tiles: u32,
    smem: u32,
) {
    let pages = (kv_indices as *const u32).add(work.pages as usize);
    let mut tile = 0;
    while tile < tiles {
        let stage = tile % 2;
        if tile >= 2 {
            mbarrier_wait(empty(smem, stage), (tile / 2 + 1) % 2);
        }
        let bar = full(smem, stage);
        mbarrier_arrive_expect_tx(bar, TILE_BYTES);
        let first = work.kv_start + tile * TILE;
        let end = work.kv_end.min(first + TILE);
        let (mut key, mut at) = (first, smem + K_STAGES + stage * TILE_BYTES);
        while key < end {
            let (page, slot) = page_size.divmod(key);
            let len = (end - key).min(page_size.divisor - slot);
            at = tma_run(maps, at, *pages.add(page as usize) * page_size.divisor + slot, len, bar);
            key += len;
        }
        tma_run(maps, at, pool_rows, TILE - (end - first), bar);
        tile += 1;
    }
}

/// The "full" and "empty" mbarriers of `stage`.
#[inline(always)]
fn full(smem: u32, stage: u32) -> u32 {
    smem + BARS + 8 * stage
}
#[inline(always)]
fn empty(smem: u32, stage: u32) -> u32 {
    smem + BARS + 8 * (2 + stage)
}

/// A consumer warpgroup (module documentation), then its half of the output.
#[inline(always)]
unsafe fn consume<H: Wgmma>(p: &MlaParams, work: &PrefillWorkItem, tiles: u32, smem: u32, tid: u32) {
    let a = &p.attention;
    let ctid = tid - HOPPER_PRODUCER_THREADS;
    // Warp-uniform, as the tile's stage below: the `wgmma` descriptors then live in uniform registers.
    let warpgroup = warp_uniform(ctid / 128);
    let (warp, lane) = ((ctid / 32) % 4, tid % 32);
    let t = lane % 4;
    let heads = a.group_size.divisor;
    let rows = work.qo_len * heads;

    // The block's 64 query rows, shared by both warpgroups: each copies half.
    let mut i = ctid;
    while i < MLA_ROWS * CHUNKS {
        let (row, chunk) = (i / CHUNKS, i % CHUNKS);
        let packed = work.first_row + row;
        let valid = packed < rows;
        let q_row = if valid { (work.q_start * heads + packed) as usize } else { 0 };
        let src = if chunk < CKV / 8 {
            (a.q as *const Vec16).add(q_row * (CKV / 8) as usize + chunk as usize)
        } else {
            (p.q_pe as *const Vec16).add(q_row * (KPE / 8) as usize + (chunk - CKV / 8) as usize)
        };
        copy_async_or_zero(smem + slab_offset(row, chunk), src, valid);
        i += CONSUMER_THREADS;
    }
    crate::gpu::tensor::commit_async_copies();
    wait_async_copies(0);
    fence_proxy_async();
    named_barrier(BARRIER_CONSUMERS, CONSUMER_THREADS);

    // The thread's rows g and g + 8 within the block.
    let my_row = 16 * warp + lane / 4;
    // The last key each of the thread's two rows sees (MLA has no window: every key before it
    // too): its causal position, and the item's last key; and the block's first row's, below
    // which no row of the block masks. (Three registers: the prefill kernels' `Visibility`
    // held through the tile loop made ptxas spill here.)
    let (end, diag) = (work.kv_end, work.kv_len.saturating_sub(work.qo_len));
    let last_seen = |row: u32| {
        let causal = if a.causal != 0 { diag + a.group_size.div(row) } else { u32::MAX };
        causal.min(end.max(1) - 1)
    };
    let my_last = [0, 8].map(|h| last_seen(work.first_row + my_row + h));
    let block_last = last_seen(work.first_row);
    let scale = LogitScale::new(a.sm_scale, 0.0);
    let mut state = RowState::new();
    let mut o = [[0.0f32; 4]; 32];
    let p_slot = |kb: u32| smem + P_HANDOFF + ((warp * 4 + kb) * 32 + lane) * 16;
    let land = |tile: u32| {
        mbarrier_wait(full(smem, tile % 2), (tile / 2) % 2);
        fence_proxy_async();
    };
    // O += P · V of `tile` for this warpgroup's 256 dims: four k-steps of 16 keys, V's slabs
    // `4 · warpgroup..` of the tile's stage, MN-major (its 8-row groups 1 KiB apart).
    let issue_pv = |o: &mut [[f32; 4]; 32], probs: &[[u32; 4]; 4], tile: u32| {
        wgmma_fence();
        let v = smem + K_STAGES + warp_uniform(tile % 2) * TILE_BYTES + 4 * warpgroup * SLAB_BYTES;
        let v0 = smem_descriptor(v, SLAB_BYTES, 1024);
        crate::unroll!(kb in [0, 1, 2, 3] {
            H::mma_rs(o, probs[kb], descriptor_plus(v0, kb as u32 * 2048));
        });
        wgmma_commit();
    };

    let mut tile = 0;
    while tile < tiles {
        if tile % 2 == warpgroup {
            // This warpgroup's tile: S over all 576 dims (nine slabs, four k-steps each).
            land(tile);
            let k = smem + K_STAGES + warp_uniform(tile % 2) * TILE_BYTES;
            let (q0, k0) = (smem_descriptor(smem, 16, 1024), smem_descriptor(k, 16, 1024));
            let mut s = [[0.0f32; 4]; 8];
            wgmma_fence();
            // 36 k-steps: past `unroll_to!`'s 16, and nothing indexes registers by the step.
            for kk in 0..CHUNKS / 2 {
                let (slab, step) = (kk / 4, (kk % 4) * 32);
                let qd = descriptor_plus(q0, slab * SLAB_BYTES + step);
                let kd = descriptor_plus(k0, slab * SLAB_BYTES + step);
                H::mma_ss(&mut s, qd, kd, (kk > 0) as u32);
            }
            wgmma_commit();
            wgmma_wait_frags::<0, 8>(&mut s);
            let first_key = work.kv_start + tile * TILE;
            let factor = scale.apply(&mut s);
            // Keys past a row's last are masked: only in tiles past the block's first row's last
            // key (a suffix of the item's tiles).
            if first_key + TILE - 1 > block_last {
                crate::unroll_to!(n < 8, {
                    crate::unroll!(c in [0, 1, 2, 3] {
                        if first_key + 8 * n as u32 + 2 * t + (c % 2) as u32 > my_last[c / 2] {
                            s[n][c] = f32::NEG_INFINITY;
                        }
                    });
                });
            }
            // The other warpgroup waits for this softmax (its P · V half and its own next S
            // follow the hand-over): the tile's maxima only where the reference ones no longer
            // hold (2% faster on the long rows, docs/perf.md, twenty-eighth session).
            let probs = state.update_speculating::<H, 8, 4>(&s, 8, factor, |h, rescale| {
                crate::unroll_32!(n, {
                    o[n][2 * h] *= rescale;
                    o[n][2 * h + 1] *= rescale;
                });
            });
            // Hand the tile over: the reference maxima (a quad's first lane writes its rows; the
            // warp's lanes are past their reads of the last hand-over) and P.
            sync_warp();
            if t == 0 {
                store_shared_u32(smem + M_HANDOFF + 4 * my_row, state.m[0].to_bits());
                store_shared_u32(smem + M_HANDOFF + 4 * (my_row + 8), state.m[1].to_bits());
            }
            crate::unroll!(kb in [0, 1, 2, 3] {
                store_shared_u32x4(p_slot(kb as u32), probs[kb]);
            });
            named_barrier_arrive(BARRIER_HANDOFF + tile % 2, CONSUMER_THREADS);
            issue_pv(&mut o, &probs, tile);
            // Retired at once and the stage handed back: the producer refills it while the
            // other warpgroup runs the next tile (arriving only at that tile's hand-over, as
            // before, left the refill's whole latency between two tiles).
            wgmma_wait_frags::<0, 32>(&mut o);
            mbarrier_arrive(empty(smem, tile % 2));
        } else {
            // The other warpgroup's tile: its maxima and P, then this warpgroup's half of P · V.
            named_barrier(BARRIER_HANDOFF + tile % 2, CONSUMER_THREADS);
            // The tile has landed (its owner waited for it; this wait returns at once, and the
            // stage cannot be refilled before this warpgroup arrives on "empty").
            land(tile);
            let m = [0, 8].map(|h| f32::from_bits(load_shared_u32(smem + M_HANDOFF + 4 * (my_row + h))));
            let probs = [0, 1, 2, 3].map(|kb| load_shared_u32x4(p_slot(kb)));
            // Move O and the sums to the other's reference maximum, where it moved.
            if any(m[0] != state.m[0] || m[1] != state.m[1]) {
                state.adopt_max(m, |h, rescale| {
                    crate::unroll_32!(n, {
                        o[n][2 * h] *= rescale;
                        o[n][2 * h + 1] *= rescale;
                    });
                });
            }
            issue_pv(&mut o, &probs, tile);
            // Waited for at once: P's registers, which the `wgmma` reads until it retires, are
            // free again before the next tile's S (kept in flight, they made ptxas spill).
            wgmma_wait_frags::<0, 32>(&mut o);
            mbarrier_arrive(empty(smem, tile % 2));
        }
        tile += 1;
    }

    // Each warpgroup summed the probabilities of its own tiles, relative to the common
    // reference maximum: trade the row sums.
    let own = [state.row_sum(0), state.row_sum(1)];
    let sums = smem + ROW_SUMS + warpgroup * MLA_ROWS * 4;
    let other_sums = smem + ROW_SUMS + (1 - warpgroup) * MLA_ROWS * 4;
    if t == 0 {
        store_shared_u32(sums + 4 * my_row, own[0].to_bits());
        store_shared_u32(sums + 4 * (my_row + 8), own[1].to_bits());
    }
    named_barrier(BARRIER_CONSUMERS, CONSUMER_THREADS);
    let other = [0, 8].map(|h| f32::from_bits(load_shared_u32(other_sums + 4 * (my_row + h))));
    // The rows leave through the K stages, free now (each warpgroup retired its last `wgmma`
    // before the barrier above), as whole rows in 16-byte stores: a fragment's scattered
    // 4-byte stores were 64 a thread (128 for f32 partials), queued in the load/store unit at
    // the very end of the block (docs/perf.md, twenty-fourth session). A split tile's partial
    // rows are the output's 16-bit type as FlashInfer's (half the bytes to write and merge).
    let staged = smem + K_STAGES;
    let split = work.slot != NO_PARTIAL;
    let valid_rows = rows.saturating_sub(work.first_row).min(MLA_ROWS);
    crate::unroll!(h in [0, 1] {
        let row = my_row + 8 * h as u32;
        let (inv, lse) = finish_row(state.m[h], own[h] + other[h], f32::NEG_INFINITY);
        let at = staged + row * OUT_ROW_STRIDE + 2 * (256 * warpgroup + 2 * t);
        crate::unroll_32!(n, {
            store_shared_u32(at + 16 * n as u32, H::pack2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv));
        });
        if row < valid_rows && t == 0 && warpgroup == 0 {
            if split {
                *(a.split.partial_lse as *mut f32).add((work.slot * MLA_ROWS + row) as usize) = lse;
            } else if a.lse != 0 {
                *(a.lse as *mut f32).add((work.q_start * heads + work.first_row + row) as usize) = lse;
            }
        }
    });
    named_barrier(BARRIER_CONSUMERS, CONSUMER_THREADS);
    if split {
        copy_rows_out(
            staged,
            (a.split.partial_out as *mut Vec16).add((work.slot * MLA_ROWS * (CKV / 8)) as usize),
            valid_rows,
            ctid,
        );
    } else {
        let first = (work.q_start * heads + work.first_row) as usize;
        copy_rows_out(staged, (a.out as *mut Vec16).add(first * (CKV / 8) as usize), valid_rows, ctid);
    }
}

/// Copies the first `rows` staged rows (`OUT_ROW_STRIDE` bytes apart from `staged`) to
/// consecutive rows at `dst`, the consumer threads taking consecutive 16-byte chunks.
#[inline(always)]
unsafe fn copy_rows_out(staged: u32, dst: *mut Vec16, rows: u32, ctid: u32) {
    let mut i = ctid;
    while i < rows * (CKV / 8) {
        let (row, chunk) = (i / (CKV / 8), i % (CKV / 8));
        store(dst.add(i as usize), Vec16(load_shared_u32x4(staged + row * OUT_ROW_STRIDE + 16 * chunk)));
        i += CONSUMER_THREADS;
    }
}

/// Staged output rows (or a split tile's partial rows, also 16-bit) in the K stages: 16 bytes
/// past a multiple of 128 apart, so that a warp's fragment stores (eight rows, four threads a
/// row) fall on distinct banks.
const OUT_ROW_STRIDE: u32 = CKV * 2 + 16;
const _: () = assert!(MLA_ROWS * OUT_ROW_STRIDE <= 2 * TILE_BYTES);
