//! Batch prefill attention over the paged cache (FlashInfer's `BatchPrefillWithPagedKVCache`),
//! FlashAttention-2 style on tensor cores: each request's new query tokens attend over its
//! cached keys, found through the page table with a run-time `page_size`, with an optional
//! causal mask aligned to the end and a sliding window.
//!
//! A block takes 64 query rows of one request and one KV head; rows are packed (token, head of
//! the group) pairs, so the group's heads share every K/V tile. Each of four warps owns 16 rows
//! and computes S = Q·Kᵀ for them over the whole 64-key tile, the online softmax in registers
//! and O += P·V; tiles stream through a `cp.async` ring as in decode (`paged_tile`). Only the
//! tiles a mask cuts pay for masking: whether a tile does is uniform across the block. When the
//! batch is too small to fill the GPU, `plan` splits long row tiles' keys over several blocks,
//! merged by the last of them (`merge`).
use crate::abi::{
    prefill_smem_bytes, prefill_stages, prefill_threads, PrefillParams, PrefillWorkItem, NO_PARTIAL, PREFILL_ROWS,
    PREFILL_TILE_TOKENS, PREFILL_WARP_DIMS,
};
use crate::gpu::half::{Bf16, Half, F16};
use crate::gpu::index::{block_x, thread_x, thread_x_here};
use crate::gpu::math::{log2, rcp};
use crate::gpu::mem::Vec16;
use crate::gpu::shared::{dynamic_smem, dynamic_smem_addr};
use crate::gpu::tensor::{copy_async_or_zero, load_matrix_x4, load_matrix_x4_trans};
use crate::merge::{last_to_finish, merge, store_output};
use crate::paged_tile::{swizzled, KvRing, PagedKv};
use crate::softmax::{quad_sum, LogitScale, RowState};

/// Key positions `lo..=hi` a row may see (its causal and window bounds), and whether a tile
/// starting at `first_key` has any key some row of the block may not see.
struct Visibility {
    lo: [u32; 2],
    hi: [u32; 2],
    /// The bounds of the block's whole row range: a tile inside `all_lo..=all_hi` (and below
    /// the item's end) is unmasked for every row.
    all_lo: u32,
    all_hi: u32,
    end: u32,
}

impl Visibility {
    #[inline(always)]
    fn masks(&self, first_key: u32) -> bool {
        first_key < self.all_lo
            || first_key + PREFILL_TILE_TOKENS - 1 > self.all_hi
            || first_key + PREFILL_TILE_TOKENS > self.end
    }

    /// Sets the logits of keys row `g + 8h` may not see to −∞ (`s[n]`: keys `first_key + 8n..`).
    #[inline(always)]
    fn apply(&self, s: &mut [[f32; 4]; 8], first_key: u32, t: u32) {
        crate::unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7] {
            crate::unroll!(c in [0, 1, 2, 3] {
                let key = first_key + 8 * n as u32 + 2 * t + (c % 2) as u32;
                let h = c / 2;
                if !(key < self.end && key >= self.lo[h] && key <= self.hi[h]) {
                    s[n][c] = f32::NEG_INFINITY;
                }
            });
        });
    }
}

#[inline(always)]
unsafe fn prefill<H: Half, const HEAD_DIM: u32, const THREADS: u32, const STAGES: u32>(p: &PrefillParams) {
    const { assert!(THREADS == prefill_threads(HEAD_DIM) && STAGES == prefill_stages(HEAD_DIM)) };
    let out_dims = const {
        if HEAD_DIM < PREFILL_WARP_DIMS {
            HEAD_DIM
        } else {
            PREFILL_WARP_DIMS
        }
    };
    let chunks = HEAD_DIM / 8;
    let row_bytes = HEAD_DIM * 2;
    let tid = thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    // Warp `warp` owns rows `16 · row_warp..` of the block and output dims `dim_base..+ out_dims`.
    let (row_warp, dim_base) = (warp % 4, (warp / 4) * out_dims);
    let (g, t) = (lane / 4, lane % 4);
    let (item, kv_head) = (block_x() / p.num_kv_heads, block_x() % p.num_kv_heads);
    let work = *(p.work as *const PrefillWorkItem).add(item as usize);
    let group = p.group_size.divisor;
    let rows = work.qo_len * group;
    // Query token j of the request sits at key position `diag + j` (used only with a causal
    // mask or a window, where the plan guarantees kv_len ≥ qo_len).
    let diag = work.kv_len.saturating_sub(work.qo_len);

    let smem = dynamic_smem_addr();
    let q_smem = smem;
    let k_smem = q_smem + PREFILL_ROWS * row_bytes;
    let v_smem = k_smem + STAGES * PREFILL_TILE_TOKENS * row_bytes;
    const {
        assert!(
            prefill_smem_bytes(HEAD_DIM)
                == (PREFILL_ROWS + 2 * prefill_stages(HEAD_DIM) * PREFILL_TILE_TOKENS) * HEAD_DIM * 2
        )
    };

    // The query rows (zeros past the request's last row) go with the first tile's copies.
    let q = p.q as *const Vec16;
    let mut i = tid;
    while i < PREFILL_ROWS * chunks {
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
    let mut ring = KvRing::<HEAD_DIM, PREFILL_TILE_TOKENS, THREADS, STAGES>::start(kv, start, end, tid, k_smem, v_smem);

    // This thread's rows g and g + 8 of the warp, their query positions and visible keys.
    let my_rows = [work.first_row + 16 * row_warp + g, work.first_row + 16 * row_warp + g + 8];
    let position = |row: u32| diag + p.group_size.div(row);
    let lowest = |pos: u32| if p.window_left >= 0 { pos.saturating_sub(p.window_left as u32) } else { 0 };
    let highest = |pos: u32| if p.causal != 0 { pos } else { u32::MAX };
    let last_row = (work.first_row + PREFILL_ROWS).min(rows) - 1;
    let visibility = Visibility {
        lo: my_rows.map(|r| lowest(position(r))),
        hi: my_rows.map(|r| highest(position(r))),
        all_lo: lowest(position(last_row)),
        all_hi: highest(position(work.first_row)),
        end,
    };

    // `acc[n / 2][n % 2]` holds the output tile of dims dim_base + 8n.. + 8.
    let scale = LogitScale::new(p.sm_scale, p.logits_soft_cap);
    let mut state = RowState::new();
    let mut acc = [[[0.0f32; 4]; 2]; 16];
    for tile in 0..ring.tiles() {
        let (k_tile, v_tile) = ring.wait(tile);

        // Fragment addresses: each lane's first, then whole 16-key blocks (multiples of a row)
        // and one xor per step along the row (see `swizzled`).
        let lane = thread_x_here() % 32;
        let q_lane = q_smem + swizzled::<HEAD_DIM>(16 * row_warp + lane % 16, lane / 16);
        let k_lane = k_tile + swizzled::<HEAD_DIM>((lane / 16) * 8 + lane % 8, (lane / 8) % 2);
        let v_lane = v_tile + swizzled::<HEAD_DIM>(((lane / 8) % 2) * 8 + lane % 8, lane / 16);
        // S = Q·Kᵀ for the warp's 16 rows and the tile's 64 keys: eight n-tiles of 8 keys.
        let mut s = [[0.0f32; 4]; 8];
        crate::unroll_to!(kk < HEAD_DIM / 16, {
            let step = 32 * kk as u32;
            let a = load_matrix_x4(q_lane ^ step);
            crate::unroll!(nb in [0, 1, 2, 3] {
                let b = load_matrix_x4((k_lane + nb as u32 * 16 * row_bytes) ^ step);
                H::mma(&mut s[2 * nb], a, [b[0], b[1]]);
                H::mma(&mut s[2 * nb + 1], a, [b[2], b[3]]);
            });
        });
        scale.apply(&mut s);
        let first_key = start + tile * PREFILL_TILE_TOKENS;
        if visibility.masks(first_key) {
            visibility.apply(&mut s, first_key, t);
        }
        let probs = state.update::<H, 8, 4>(&s, &mut acc, out_dims / 8);
        // O += P·V: V's B fragments come transposed from its row-major [key][dim] tile.
        crate::unroll_to!(dp < out_dims / 16, {
            let step = 16 * (dim_base / 8 + 2 * dp as u32);
            crate::unroll!(kb in [0, 1, 2, 3] {
                let b = load_matrix_x4_trans((v_lane + kb as u32 * 16 * row_bytes) ^ step);
                H::mma(&mut acc[dp][0], probs[kb], [b[0], b[1]]);
                H::mma(&mut acc[dp][1], probs[kb], [b[2], b[3]]);
            });
        });
    }
    ring.drain();

    // Each warp finishes its own rows: no state to merge across warps. A split row tile's part
    // writes f32 partial rows (slot, KV head, row of the tile) instead.
    let split = work.slot != NO_PARTIAL;
    crate::unroll!(h in [0, 1] {
        let d = quad_sum(state.d[h]);
        let row = my_rows[h];
        if row < rows {
            let inv = if d > 0.0 { rcp(d) } else { 0.0 };
            let lse = if d > 0.0 { state.m[h] + log2(d) } else { f32::NEG_INFINITY };
            let first_dim = (dim_base + 2 * t) as usize;
            if split {
                let prow = ((work.slot * p.num_kv_heads + kv_head) * PREFILL_ROWS + 16 * row_warp + g + 8 * h as u32) as usize;
                let dst = (p.split.partial_out as *mut f32).add(prow * HEAD_DIM as usize + first_dim);
                crate::unroll_to!(n < out_dims / 8, {
                    *dst.add(8 * n) = acc[n / 2][n % 2][2 * h] * inv;
                    *dst.add(8 * n + 1) = acc[n / 2][n % 2][2 * h + 1] * inv;
                });
                if t == 0 && dim_base == 0 {
                    *(p.split.partial_lse as *mut f32).add(prow) = lse;
                }
            } else {
                let (token, head) = p.group_size.divmod(row);
                let out_row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
                let out = (p.out as *mut u32).add((out_row as usize * HEAD_DIM as usize + first_dim) / 2);
                crate::unroll_to!(n < out_dims / 8, {
                    *out.add(4 * n) = H::pack2(acc[n / 2][n % 2][2 * h] * inv, acc[n / 2][n % 2][2 * h + 1] * inv);
                });
                if p.lse != 0 && t == 0 && dim_base == 0 {
                    *(p.lse as *mut f32).add(out_row as usize) = lse;
                }
            }
        }
    });
    if !split {
        return;
    }
    // The last part of the row tile to finish (for this KV head) merges all of them. The flag
    // lives past the merge's staging; the K/V ring is free by now.
    let last_flag = dynamic_smem::<u32>().add((prefill_smem_bytes(HEAD_DIM) / 4 - 1) as usize);
    let counter = (p.split.merge_counters as *mut u32).add((work.counters + kv_head) as usize);
    if !last_to_finish(counter, work.parts, last_flag) {
        return;
    }
    let partial_row = |part: u32, row: u32| {
        ((work.first_slot + part) * p.num_kv_heads + kv_head) as usize * PREFILL_ROWS as usize + row as usize
    };
    let tile_rows = (rows - work.first_row).min(PREFILL_ROWS);
    merge::<HEAD_DIM, THREADS>(&p.split, work.parts, tile_rows, partial_row, |row, chunk, o, lse| {
        let (token, head) = p.group_size.divmod(work.first_row + row);
        let out_row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
        store_output::<H, HEAD_DIM>(p.out, p.lse, out_row as usize, chunk, o, lse)
    });
}

macro_rules! prefill_kernels {
    ($($name:ident: $half:ty, $dim:literal;)*) => {$(
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: PrefillParams) {
            prefill::<$half, $dim, { prefill_threads($dim) }, { prefill_stages($dim) }>(&p)
        }
    )*};
}

prefill_kernels! {
    prefill_f16_64: F16, 64;
    prefill_f16_128: F16, 128;
    prefill_f16_256: F16, 256;
    prefill_bf16_64: Bf16, 64;
    prefill_bf16_128: Bf16, 128;
    prefill_bf16_256: Bf16, 256;
}
