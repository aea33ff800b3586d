//! Batch prefill attention over the paged cache (FlashInfer's `BatchPrefillWithPagedKVCache`),
//! FlashAttention-2 style on tensor cores: each request's new query tokens attend over its
//! cached keys, found through the page table with a run-time `page_size`, with an optional
//! causal mask aligned to the end and a sliding window.
//!
//! A block takes 64 or 128 query rows of one request and one KV head (`ROW_FRAGS` 16-row
//! fragments per warp, chosen by `plan` from the batch's query lengths); rows are packed
//! (token, head of the group) pairs, so the group's heads share every K/V tile. Each of four
//! warps owns 16 or 32 rows and computes S = Q·Kᵀ for them, the online softmax in registers
//! and O += P·V; tiles stream through a `cp.async` ring as in decode (`paged_tile`). Every K or
//! V fragment a warp reads from shared memory feeds one mma per row fragment, so 32 rows a warp
//! need about a third fewer shared-memory reads and instructions per mma. S covers the whole
//! 64-key tile at once, as in FlashInfer: each k-step's mma go to eight accumulators per row
//! fragment, and the softmax runs once per tile.
//! Only the tiles a mask cuts pay for masking: whether a tile does is uniform across the block.
//! A custom mask (bit-packed, per request `qo_len × kv_len` bits; 64-row blocks only) may cut
//! any tile: each thread then reads, per row and tile, the 64 bits of its row's keys as three
//! words (`MaskBits`).
//! When the batch is too small to fill the GPU, `plan` splits long row tiles' keys over several
//! blocks, merged by the last of them (`merge`).
use crate::abi::{
    kv_table_bytes, prefill_rows, prefill_smem_bytes, prefill_stages, prefill_threads, tile_dim, widened_tiles_bytes,
    PrefillParams, PrefillWorkItem, NO_PARTIAL, PREFILL_TILE_TOKENS, PREFILL_WARP_DIMS,
};
use crate::gpu::fp8::KvElem;
use crate::gpu::half::Half;
use crate::gpu::index::{block_x, thread_x, thread_x_here};
use crate::gpu::mem::Vec16;
use crate::gpu::shared::{dynamic_smem, dynamic_smem_addr};
use crate::gpu::tensor::{copy_async_or_zero, load_matrix_x4, load_matrix_x4_trans, pipelined};
use crate::merge::{last_to_finish, merge, store_output, Block};
use crate::paged_tile::{kv_head_scale, swizzled, KvRing, PagedKv};
use crate::softmax::{finish_row, fold_sink, sink_logit, LogitScale, RowState};

/// Which keys the block's rows may see (causal and window bounds), and whether a tile of `TILE`
/// keys starting at `first_key` has any key some row of the block may not see. Row warps are
/// the block's warps from `FIRST_WARP` on, `ROW_WARPS` of them (warps past those repeat them).
pub(crate) struct Visibility<'a, const TILE: u32, const FIRST_WARP: u32, const ROW_WARPS: u32> {
    pub p: &'a PrefillParams,
    /// Key position of the request's first query token (`kv_len − qo_len`).
    pub diag: u32,
    /// The block's first packed row, and the rows each warp owns.
    pub block_first_row: u32,
    pub warp_rows: u32,
    /// The bounds of the block's whole row range: a tile inside `all_lo..=all_hi` (and below
    /// the item's end) is unmasked for every row.
    pub all_lo: u32,
    pub all_hi: u32,
    pub end: u32,
}

impl<const TILE: u32, const FIRST_WARP: u32, const ROW_WARPS: u32> Visibility<'_, TILE, FIRST_WARP, ROW_WARPS> {
    /// Key positions `lo..=hi` packed row `row` may see.
    #[inline(always)]
    pub fn bounds(&self, row: u32) -> (u32, u32) {
        let position = self.diag + self.p.group_size.div(row);
        let lo = if self.p.window_left >= 0 { position.saturating_sub(self.p.window_left as u32) } else { 0 };
        (lo, if self.p.causal != 0 { position } else { u32::MAX })
    }

    #[inline(always)]
    pub fn masks(&self, first_key: u32) -> bool {
        first_key < self.all_lo || first_key + TILE - 1 > self.all_hi || first_key + TILE > self.end
    }

    /// Thread `tid`'s packed row `g` of its warp's first row fragment (its rows are that and
    /// `+ 8` of each 16-row fragment).
    #[inline(always)]
    pub fn thread_first_row(&self, tid: u32) -> u32 {
        self.block_first_row + self.warp_rows * ((tid / 32 - FIRST_WARP) % ROW_WARPS) + (tid % 32) / 4
    }

    /// Packed rows `g` and `g + 8` of the thread's row fragment `f`.
    #[inline(always)]
    fn rows(&self, f: usize) -> [u32; 2] {
        let first_row = self.thread_first_row(thread_x_here());
        [0, 1].map(|h| first_row + 16 * f as u32 + 8 * h)
    }

    /// Sets the logits of keys row `g + 8h` of row fragment `f` may not see to −∞ (`s[n]`:
    /// keys `first_key + 8n..`). Only tiles a mask cuts come here, so the bounds are worked
    /// out here from the thread index read afresh: derived from values the loop keeps anyway,
    /// the compiler would hoist them, holding eight registers through every tile. The bounds
    /// are offsets from the thread's first key (the item's end folded into the upper one): two
    /// compares with constants a logit.
    #[inline(always)]
    pub fn apply<const N: usize>(&self, f: usize, s: &mut [[f32; 4]; N], first_key: u32, t: u32) {
        let first_row = self.thread_first_row(thread_x_here());
        let thread_key = (first_key + 2 * t) as i32;
        crate::unroll!(h in [0, 1] {
            let (lo, hi) = self.bounds(first_row + 16 * f as u32 + 8 * h as u32);
            // The item ends after its first key, so `end - 1` does not wrap.
            let (lo, hi) = (lo as i32 - thread_key, hi.min(self.end - 1) as i32 - thread_key);
            crate::unroll_to!(n < N, {
                crate::unroll!(c in [0, 1] {
                    let offset = (8 * n + c) as i32;
                    if offset > hi || offset < lo {
                        s[n][2 * h + c] = f32::NEG_INFINITY;
                    }
                });
            });
        });
    }

    /// [`apply`](Self::apply) comparing key positions (three compares a logit): the Hopper
    /// kernel at head_dim 256 keeps it, where `apply`'s form made ptxas spill (docs/perf.md).
    #[inline(always)]
    pub fn apply_positions<const N: usize>(&self, f: usize, s: &mut [[f32; 4]; N], first_key: u32, t: u32) {
        let first_row = self.thread_first_row(thread_x_here());
        let bounds = [0, 1].map(|h| self.bounds(first_row + 16 * f as u32 + 8 * h));
        crate::unroll_to!(n < N, {
            crate::unroll!(c in [0, 1, 2, 3] {
                let key = first_key + 8 * n as u32 + 2 * t + (c % 2) as u32;
                let (lo, hi) = bounds[c / 2];
                if !(key < self.end && key >= lo && key <= hi) {
                    s[n][c] = f32::NEG_INFINITY;
                }
            });
        });
    }

    /// After [`apply`](Self::apply), a custom mask's: `bits(token)` gives query token `token`'s
    /// mask bits of keys `first_key + 2t..` (bit `8n + c`: key `first_key + 8n + 2t + c`, the
    /// thread's keys of `s[n]`), and a key whose bit is clear is masked too. (A pass of its own,
    /// so that the kernels without masks keep `apply`'s code as it was: folded into it, the
    /// 128-row kernels' code moved and spilled more.)
    #[inline(always)]
    pub fn apply_custom<const N: usize>(&self, f: usize, s: &mut [[f32; 4]; N], bits: impl Fn(u32) -> u64) {
        const { assert!(N <= 8) };
        let keep = self.rows(f).map(|row| bits(self.p.group_size.div(row)));
        crate::unroll_to!(n < N, {
            crate::unroll!(c in [0, 1, 2, 3] {
                if keep[c / 2].wrapping_shr((8 * n + c % 2) as u32) & 1 == 0 {
                    s[n][c] = f32::NEG_INFINITY;
                }
            });
        });
    }
}

/// A request's custom mask (`PrefillWorkItem::mask_word`), read 64 bits of a row at a time: three
/// word loads and two funnel shifts, where a byte per logit would take sixteen loads a row.
struct MaskBits {
    /// The request's first word.
    words: *const u32,
    kv_len: u32,
    last_token: u32,
}

impl MaskBits {
    /// The block's request's mask, if it has one, from its work item read afresh: the tile
    /// loop's closure captures nothing new for it (the 128-row kernels' code, which has no mask
    /// path, moved and spilled more when it did).
    #[inline(always)]
    unsafe fn of_block(p: &PrefillParams) -> Option<Self> {
        let work = &*(p.work as *const PrefillWorkItem).add((block_x() / p.num_kv_heads) as usize);
        (work.mask_word != 0).then(|| MaskBits {
            words: (p.work as *const u32).add(work.mask_word as usize),
            kv_len: work.kv_len,
            last_token: work.qo_len - 1,
        })
    }

    /// Bits of keys `key..key + 64` of query token `token` (bit `i`: key `key + i`). Rows past
    /// the request (a block's padding, never stored) read its last row instead, so every read
    /// starts at most a few bits past the request's last one (`key` is below `kv_len` plus the
    /// thread's `2t`); the plan pads the mask with the words that follow.
    ///
    /// # Safety
    /// `key < kv_len + 8`, and the plan laid out and padded the mask as
    /// `PrefillWorkItem::mask_word` says.
    #[inline(always)]
    unsafe fn row(&self, token: u32, key: u32) -> u64 {
        let bit = token.min(self.last_token) * self.kv_len + key;
        let w = self.words.add((bit / 32) as usize);
        let (a, b, c, shift) = (*w as u64, *w.add(1) as u64, *w.add(2) as u64, bit % 32);
        let lo = ((b << 32 | a) >> shift) as u32 as u64;
        let hi = ((c << 32 | b) >> shift) as u32 as u64;
        hi << 32 | lo
    }
}

/// n-fragments of 8 keys in a tile's S, and 16-key A fragments of its P.
const S_FRAGS: usize = PREFILL_TILE_TOKENS as usize / 8;
const P_FRAGS: usize = S_FRAGS / 2;

/// The kernel for `ROW_FRAGS` row fragments per warp; queries and keys of `HEAD_DIM` dims,
/// values and outputs of `VO_DIM` (the same, or fewer: DeepSeek-style prefill's 192 and 128).
/// With `CUSTOM_MASK` (64-row blocks: their own entry points, `prefill_masked`) it reads the
/// work items' custom masks; without, the code is that of a kernel with no mask path at all
/// (the 128-row kernels spill more when it is merely folded away).
#[inline(always)]
pub unsafe fn prefill<
    H: Half,
    K: KvElem,
    const HEAD_DIM: u32,
    const VO_DIM: u32,
    const ROW_FRAGS: usize,
    const THREADS: u32,
    const STAGES: u32,
    const CUSTOM_MASK: bool,
>(
    p: &PrefillParams,
) {
    const {
        assert!(THREADS == prefill_threads(VO_DIM) && STAGES == prefill_stages(HEAD_DIM, ROW_FRAGS as u32));
        assert!(!CUSTOM_MASK || ROW_FRAGS == 1);
    };
    let out_dims = const {
        if VO_DIM < PREFILL_WARP_DIMS {
            VO_DIM
        } else {
            PREFILL_WARP_DIMS
        }
    };
    let block_rows = const { prefill_rows(ROW_FRAGS as u32) };
    let warp_rows = 16 * ROW_FRAGS as u32;
    let chunks = HEAD_DIM / 8;
    // Shared rows are `tile_dim` wide (the next power of two: 128 for head dims 80 and 96).
    let row_bytes = const { tile_dim(HEAD_DIM) * 2 };
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    // Warp `warp` owns rows `warp_rows · row_warp..` of the block and output dims
    // `dim_base..+ out_dims`.
    let (row_warp, dim_base) = (warp % 4, (warp / 4) * out_dims);
    let t = lane % 4;
    let (item, kv_head) = (block_x() / p.num_kv_heads, block_x() % p.num_kv_heads);
    let work = *(p.work as *const PrefillWorkItem).add(item as usize);
    let group = p.group_size.divisor;
    let rows = work.qo_len * group;
    // Query token j of the request sits at key position `diag + j` (used only with a causal
    // mask or a window, where the plan guarantees kv_len ≥ qo_len).
    let diag = work.kv_len.saturating_sub(work.qo_len);

    let smem = dynamic_smem_addr();
    let q_smem = smem;
    let kv_row_bytes = const { tile_dim(HEAD_DIM) * K::BYTES };
    // V's shared rows (of the query's type once widened), `VO_DIM` wide.
    let v_row_bytes = const { tile_dim(VO_DIM) * 2 };
    let k_smem = q_smem + block_rows * row_bytes;
    let v_smem = k_smem + STAGES * PREFILL_TILE_TOKENS * kv_row_bytes;
    let wide_smem = v_smem + STAGES * PREFILL_TILE_TOKENS * tile_dim(VO_DIM) * K::BYTES;
    let table_smem = wide_smem + widened_tiles_bytes(PREFILL_TILE_TOKENS, HEAD_DIM, K::BYTES);
    let smem_bytes = const { prefill_smem_bytes(HEAD_DIM, VO_DIM, ROW_FRAGS as u32, K::BYTES) };
    const {
        assert!(
            prefill_smem_bytes(HEAD_DIM, VO_DIM, ROW_FRAGS as u32, K::BYTES)
                == prefill_rows(ROW_FRAGS as u32) * tile_dim(HEAD_DIM) * 2
                    + STAGES * PREFILL_TILE_TOKENS * (tile_dim(HEAD_DIM) + tile_dim(VO_DIM)) * K::BYTES
                    + widened_tiles_bytes(PREFILL_TILE_TOKENS, HEAD_DIM, K::BYTES)
                    + kv_table_bytes(STAGES, PREFILL_TILE_TOKENS)
        )
    };

    // The query rows (zeros past the request's last row) go with the first tile's copies.
    let q = p.q as *const Vec16;
    let mut i = tid;
    while i < block_rows * chunks {
        let (row, chunk) = (i / chunks, i % chunks);
        let packed = work.first_row + row;
        let valid = packed < rows;
        let (token, head) = p.group_size.divmod(packed);
        let src = ((work.q_start + token) * p.num_qo_heads + kv_head * group + head) as usize * chunks as usize
            + chunk as usize;
        copy_async_or_zero(q_smem + swizzled::<HEAD_DIM>(row, chunk), q.add(if valid { src } else { 0 }), valid);
        i += THREADS;
    }

    let kv = PagedKv::new(&p.cache, work.pages, kv_head);
    let (start, end) = (work.kv_start, work.kv_end);
    let mut ring = KvRing::<H, K, HEAD_DIM, VO_DIM, PREFILL_TILE_TOKENS, THREADS, STAGES, true, false>::start(
        kv, start, end, tid, k_smem, v_smem, table_smem, wide_smem,
    );

    let mut visibility = Visibility::<PREFILL_TILE_TOKENS, 0, 4> {
        p,
        diag,
        block_first_row: work.first_row,
        warp_rows,
        all_lo: 0,
        all_hi: 0,
        end,
    };
    let my_first_row = visibility.thread_first_row(tid);
    let last_row = (work.first_row + block_rows).min(rows) - 1;
    (visibility.all_lo, visibility.all_hi) = (visibility.bounds(last_row).0, visibility.bounds(work.first_row).1);

    // `acc[f][n / 2][n % 2]` holds row fragment f's output tile of dims dim_base + 8n.. + 8.
    // Over an 8-bit cache the block's KV head's K scale joins the logit scale (its V scale the
    // normalisation, read after the tile loop: no register held through it); 16-bit kernels
    // have none.
    let sm_scale =
        if K::BYTES == 1 { p.sm_scale * kv_head_scale::<false>(p.kv_head_scales, kv_head) } else { p.sm_scale };
    let scale = LogitScale::new(sm_scale, p.logits_soft_cap);
    let mut state = [const { RowState::new() }; ROW_FRAGS];
    let mut acc = [[[[0.0f32; 4]; 2]; 16]; ROW_FRAGS];
    let tiles = ring.tiles();
    // One tile of keys; `masked` is a constant in each of its two copies below, so the tiles no
    // mask cuts (nearly all of them) run without a test or branch per row fragment.
    let mut step = crate::inline_always!(|tile: u32, masked: bool| {
        let (k_tile, v_tile) = ring.wait(tile);

        // Fragment addresses: each lane's first, then whole 16-key blocks (multiples of a row)
        // and one xor per step along the row (see `swizzled`).
        let lane = thread_x_here() % 32;
        let q_lane = q_smem + swizzled::<HEAD_DIM>(warp_rows * row_warp + lane % 16, lane / 16);
        let k_lane = k_tile + swizzled::<HEAD_DIM>((lane / 16) * 8 + lane % 8, (lane / 8) % 2);
        let v_lane = v_tile + swizzled::<VO_DIM>(((lane / 8) % 2) * 8 + lane % 8, lane / 16);
        let first_key = start + tile * PREFILL_TILE_TOKENS;
        // S = Q·Kᵀ for the warp's rows and the tile's keys, each K fragment feeding every row
        // fragment.
        let mut s = [[[0.0f32; 4]; S_FRAGS]; ROW_FRAGS];
        // Steps of two K fragments (16 keys each) at one 16-dim slice; a slice's Q fragments
        // are loaded at its first step.
        let mut q = [[0u32; 4]; ROW_FRAGS];
        pipelined(
            HEAD_DIM as usize / 16 * P_FRAGS / 2,
            |i| {
                let (kk, nb) = ((i / (P_FRAGS / 2)) as u32, 2 * (i % (P_FRAGS / 2)) as u32);
                let k = (k_lane ^ (32 * kk)) + nb * 16 * row_bytes;
                [load_matrix_x4(k), load_matrix_x4(k + 16 * row_bytes)]
            },
            |i, k| {
                let (kk, nb) = (i / (P_FRAGS / 2), 2 * (i % (P_FRAGS / 2)));
                crate::unroll_to!(f < ROW_FRAGS, {
                    if nb == 0 {
                        q[f] = load_matrix_x4((q_lane ^ (32 * kk as u32)) + 16 * f as u32 * row_bytes);
                    }
                    crate::unroll!(j in [0, 1] {
                        H::mma(&mut s[f][2 * (nb + j)], q[f], [k[j][0], k[j][1]]);
                        H::mma(&mut s[f][2 * (nb + j) + 1], q[f], [k[j][2], k[j][3]]);
                    });
                });
            },
        );
        let mut probs = [[[0u32; 4]; P_FRAGS]; ROW_FRAGS];
        crate::unroll_to!(f < ROW_FRAGS, {
            let factor = scale.apply(&mut s[f]);
            if masked {
                // Custom masks run in 64-row blocks only, in kernels of their own (the plan's
                // choice): the 128-row kernels have no registers to spare for reading one.
                visibility.apply(f, &mut s[f], first_key, t);
                if CUSTOM_MASK {
                    if let Some(mask) = MaskBits::of_block(visibility.p) {
                        visibility.apply_custom(f, &mut s[f], |token| mask.row(token, first_key + 2 * t));
                    }
                }
            }
            probs[f] = state[f].update::<H, S_FRAGS, P_FRAGS>(&s[f], factor, &mut acc[f], out_dims / 8);
        });
        // O += P·V: V's B fragments come transposed from its row-major [key][dim] tile. Keys
        // outermost, so the mma on one accumulator are a whole row of dims apart and do not
        // wait for each other.
        let dim_steps = out_dims as usize / 16;
        pipelined(
            P_FRAGS * dim_steps,
            |i| {
                let (kb, dp) = ((i / dim_steps) as u32, (i % dim_steps) as u32);
                load_matrix_x4_trans((v_lane ^ (16 * (dim_base / 8 + 2 * dp))) + kb * 16 * v_row_bytes)
            },
            |i, v| {
                let (kb, dp) = (i / dim_steps, i % dim_steps);
                crate::unroll_to!(f < ROW_FRAGS, {
                    H::mma(&mut acc[f][dp][0], probs[f][kb], [v[0], v[1]]);
                    H::mma(&mut acc[f][dp][1], probs[f][kb], [v[2], v[3]]);
                });
            },
        );
    });
    for tile in 0..tiles {
        // A custom mask may cut any tile (the masked kernels run only for masked plans).
        if CUSTOM_MASK || visibility.masks(start + tile * PREFILL_TILE_TOKENS) {
            step(tile, true);
        } else {
            step(tile, false);
        }
    }
    ring.drain();

    // Each warp finishes its own rows: no state to merge across warps. A split row tile's part
    // writes f32 partial rows (slot, KV head, row of the tile) instead.
    let split = work.slot != NO_PARTIAL;
    // 8-bit caches: the block's KV head's V scale, read once, after the tile loop.
    let v_head = if K::BYTES == 1 { kv_head_scale::<true>(p.kv_head_scales, kv_head) } else { 1.0 };
    crate::unroll_to!(f < ROW_FRAGS, {
        crate::unroll!(h in [0, 1] {
            let (state, acc) = (&state[f], &acc[f]);
            let d = state.row_sum(h);
            let row = my_first_row + 16 * f as u32 + 8 * h as u32;
            if row < rows {
                let (token, head) = p.group_size.divmod(row);
                // A split tile's sink waits for the merge (partials are sink-free).
                let sink = if split { f32::NEG_INFINITY } else { sink_logit(p.sinks, kv_head * group + head) };
                let (inv, lse) = finish_row(state.m[h], d, sink);
                // V's dequantisation scales go with the normalisation (merging is linear).
                let inv = if K::BYTES == 1 { inv * (p.v_scale * v_head) } else { inv * p.v_scale };
                let first_dim = (dim_base + 2 * t) as usize;
                if split {
                    let prow = ((work.slot * p.num_kv_heads + kv_head) * block_rows + row - work.first_row) as usize;
                    let dst = (p.split.partial_out as *mut f32).add(prow * VO_DIM as usize + first_dim);
                    crate::unroll_to!(n < out_dims / 8, {
                        *dst.add(8 * n) = acc[n / 2][n % 2][2 * h] * inv;
                        *dst.add(8 * n + 1) = acc[n / 2][n % 2][2 * h + 1] * inv;
                    });
                    if t == 0 && dim_base == 0 {
                        *(p.split.partial_lse as *mut f32).add(prow) = lse;
                    }
                } else {
                    let out_row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
                    let out = (p.out as *mut u32).add((out_row as usize * VO_DIM as usize + first_dim) / 2);
                    crate::unroll_to!(n < out_dims / 8, {
                        *out.add(4 * n) =
                            H::pack2(acc[n / 2][n % 2][2 * h] * inv, acc[n / 2][n % 2][2 * h + 1] * inv);
                    });
                    if p.lse != 0 && t == 0 && dim_base == 0 {
                        *(p.lse as *mut f32).add(out_row as usize) = lse;
                    }
                }
            }
        });
    });
    if !split {
        return;
    }
    // The last part of the row tile to finish (for this KV head) merges all of them. The flag
    // lives past the merge's staging; the K/V ring is free by now.
    let last_flag = dynamic_smem::<u32>().add((smem_bytes / 4 - 1) as usize);
    let counter = (p.split.merge_counters as *mut u32).add((work.counters + kv_head) as usize);
    if !last_to_finish::<Block<THREADS>>(counter, work.parts, last_flag) {
        return;
    }
    let partial_row = |part: u32, row: u32| {
        ((work.first_slot + part) * p.num_kv_heads + kv_head) as usize * block_rows as usize + row as usize
    };
    let tile_rows = (rows - work.first_row).min(block_rows);
    merge::<Block<THREADS>, VO_DIM>(&p.split, work.parts, tile_rows, partial_row, |row, chunk, o, lse| {
        let (token, head) = p.group_size.divmod(work.first_row + row);
        let out_row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
        let (o, lse) = fold_sink(o, lse, sink_logit(p.sinks, kv_head * group + head));
        store_output::<H, VO_DIM>(p.out, p.lse, out_row as usize, chunk, &o, lse)
    });
}
