//! Split-KV in one launch, shared by decode and prefill: when a sequence's keys are split over
//! several blocks, each writes its rows' normalised f32 partial outputs and base-2 LSEs to its
//! slot; the last block to finish (an atomic counter per split unit, which that block resets)
//! merges the slots into the output. No second kernel, so `run` stays one launch. Also the
//! standalone kernel that merges attention states (FlashInfer's `merge_state(s)`).
use crate::abi::{merge_rows_per_warp, MergeStatesParams, SplitScratch, MERGE_THREADS};
use crate::gpu::half::{pack, Half};
use crate::gpu::index::{block_x, thread_x};
use crate::gpu::math::{exp2, log2};
use crate::gpu::mem::{load_l2, load_l2_f32, store, Vec16};
use crate::gpu::shared::dynamic_smem;
use crate::gpu::sync::{atomic_add, fence_device, sync_threads, sync_warp};

/// The threads that finish a split unit together: the whole block, or the consumer
/// warpgroups of a warp-specialised kernel (whose producer has left).
pub trait Team {
    /// Threads in the team.
    const THREADS: u32;
    /// This thread's index in the team.
    fn thread() -> u32;
    /// A barrier of the team's threads.
    fn sync();
    /// The start of the team's own shared memory (a merge's staging): the block's, unless
    /// several teams share the block.
    #[inline(always)]
    fn smem() -> *mut f32 {
        dynamic_smem()
    }
}

/// Every thread of the block.
pub struct Block<const THREADS: u32>;

impl<const THREADS: u32> Team for Block<THREADS> {
    const THREADS: u32 = THREADS;
    #[inline(always)]
    fn thread() -> u32 {
        thread_x()
    }
    #[inline(always)]
    fn sync() {
        sync_threads()
    }
}

/// Writes 8 output dims (`chunk`) of row `out_row` of `out` (`[rows][HEAD_DIM]` of `H`) and, from
/// the first chunk, the row's LSE into `lse` (when not 0).
#[inline(always)]
pub unsafe fn store_output<H: Half, const HEAD_DIM: u32>(
    out: u64,
    lse: u64,
    out_row: usize,
    chunk: u32,
    o: &[f32; 8],
    lse_value: f32,
) {
    store((out as *mut Vec16).add(out_row * (HEAD_DIM / 8) as usize + chunk as usize), pack::<H>(o));
    if lse != 0 && chunk == 0 {
        *(lse as *mut f32).add(out_row) = lse_value;
    }
}

/// Writes 8 dims (`chunk`) of a normalised partial row `prow` (f32) and, from the first chunk,
/// its LSE.
#[inline(always)]
pub unsafe fn store_partial<const HEAD_DIM: u32>(
    split: &SplitScratch,
    prow: usize,
    chunk: u32,
    o: &[f32; 8],
    lse: f32,
) {
    let dst = (split.partial_out as *mut Vec16).add((prow * HEAD_DIM as usize + 8 * chunk as usize) / 4);
    store(dst, Vec16([o[0].to_bits(), o[1].to_bits(), o[2].to_bits(), o[3].to_bits()]));
    store(dst.add(1), Vec16([o[4].to_bits(), o[5].to_bits(), o[6].to_bits(), o[7].to_bits()]));
    if chunk == 0 {
        *(split.partial_lse as *mut f32).add(prow) = lse;
    }
}

/// Counts this block's part of a split unit in at `counter` (of `parts`) once all its partial
/// writes are visible, and returns whether it was the last; the last resets the counter for
/// the next launch (stream order makes that visible) and fences before reading the others'
/// partials. Every thread calls it (it holds barriers); `flag` is a shared word no other live
/// data uses.
#[inline(always)]
pub unsafe fn last_to_finish<T: Team>(counter: *mut u32, parts: u32, flag: *mut u32) -> bool {
    // Writers fence before counting.
    fence_device();
    T::sync();
    if T::thread() == 0 {
        let last = atomic_add(counter, 1) == parts - 1;
        if last {
            *counter = 0;
        }
        *flag = last as u32;
    }
    T::sync();
    let last = *flag != 0;
    if last {
        fence_device();
    }
    last
}

/// Combines `parts` partial states of `rows` rows (`partial_row(part, row)`: the row's index
/// in `split`'s partial outputs and LSEs) and hands each merged 8-dim slice with its row's LSE to
/// `write(row, chunk, slice, lse)`. The LSEs are staged in shared memory in parallel and turned
/// into weights `2^(lse_part − lse)` per row; then each slice is summed over the parts by as
/// many thread groups as the block has room for, eight parts' loads in flight per thread. This
/// block runs after every other part has finished, alone on the critical path of a split
/// launch: its loads' round trips, not its bytes, set its time. Shared memory: `8 · THREADS`
/// sums, `parts · rows` weights and `rows` LSEs from its start (the plan bounds `parts`).
#[inline(always)]
pub unsafe fn merge<T: Team, const HEAD_DIM: u32>(
    split: &SplitScratch,
    parts: u32,
    rows: u32,
    partial_row: impl Fn(u32, u32) -> usize,
    mut write: impl FnMut(u32, u32, &[f32; 8], f32),
) {
    let (tid, chunks) = (T::thread(), HEAD_DIM / 8);
    let threads = T::THREADS;
    let sums = T::smem();
    let weights = sums.add(8 * threads as usize);
    let row_lse = weights.add((parts * rows) as usize);
    let mut i = tid;
    while i < parts * rows {
        *weights.add(i as usize) = load_l2_f32((split.partial_lse as *const f32).add(partial_row(i / rows, i % rows)));
        i += threads;
    }
    T::sync();
    let mut r = tid;
    while r < rows {
        let mut m = f32::NEG_INFINITY;
        for part in 0..parts {
            m = m.max(*weights.add((part * rows + r) as usize));
        }
        let m_ref = if m == f32::NEG_INFINITY { 0.0 } else { m };
        let mut total = 0.0;
        for part in 0..parts {
            total += exp2(*weights.add((part * rows + r) as usize) - m_ref);
        }
        let lse = if total > 0.0 { m_ref + log2(total) } else { f32::NEG_INFINITY };
        for part in 0..parts {
            let w = weights.add((part * rows + r) as usize);
            *w = if total > 0.0 { exp2(*w - lse) } else { 0.0 };
        }
        *row_lse.add(r as usize) = lse;
        r += threads;
    }
    T::sync();
    // Slice `i % slices` is summed by group `i / slices` over parts group, group + groups, ….
    let slices = rows * chunks;
    let groups = (threads / slices).max(1);
    let mut i = tid;
    while i < slices * groups {
        let (slice, group) = (i % slices, i / slices);
        let (row, chunk) = (slice / chunks, slice % chunks);
        let src = |part: u32| {
            (split.partial_out as *const Vec16)
                .add((partial_row(part, row) * HEAD_DIM as usize + 8 * chunk as usize) / 4)
        };
        let mut o = [0.0f32; 8];
        let mut add = |part: u32, lo: Vec16, hi: Vec16| {
            let w = *weights.add((part * rows + row) as usize);
            for e in 0..4 {
                o[e] += w * f32::from_bits(lo.0[e]);
                o[4 + e] += w * f32::from_bits(hi.0[e]);
            }
        };
        let mut part = group;
        while part + 7 * groups < parts {
            let mut v = [(Vec16::default(), Vec16::default()); 8];
            crate::unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
                let at = src(part + u as u32 * groups);
                v[u] = (load_l2(at), load_l2(at.add(1)));
            });
            crate::unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
                add(part + u as u32 * groups, v[u].0, v[u].1);
            });
            part += 8 * groups;
        }
        while part < parts {
            add(part, load_l2(src(part)), load_l2(src(part).add(1)));
            part += groups;
        }
        if groups == 1 {
            write(row, chunk, &o, *row_lse.add(row as usize));
        } else {
            for e in 0..8 {
                *sums.add(8 * i as usize + e) = o[e];
            }
        }
        i += threads;
    }
    if groups > 1 {
        // Each thread held at most one (slice, group): the barrier is reached by all.
        T::sync();
        if tid < slices {
            let (row, chunk) = (tid / chunks, tid % chunks);
            let mut o = [0.0f32; 8];
            for group in 0..groups {
                for e in 0..8 {
                    o[e] += *sums.add(8 * (group * slices + tid) as usize + e);
                }
            }
            write(row, chunk, &o, *row_lse.add(row as usize));
        }
    }
}

/// FlashInfer's `merge_states` (see [`MergeStatesParams`]). A warp takes
/// `merge_rows_per_warp(head_dim)` rows (`row = token · heads + head`), each over its own group
/// of lanes, so short rows keep every lane busy; a lane sums 8-dim slices `sub, sub +
/// lanes_per_row, …` of its row over the states. Up to [`FAST_STATES`] states (cascade's and
/// the usual two) load every LSE and the lane's first slices before any arithmetic, so one
/// memory round trip serves the row; more states take a loop.
#[inline(always)]
pub unsafe fn merge_states<H: Half>(p: &MergeStatesParams) {
    let rows_per_warp = merge_rows_per_warp(p.head_dim);
    let lanes_per_row = 32 / rows_per_warp;
    let lane = thread_x() % 32;
    let row = (block_x() * (MERGE_THREADS / 32) + thread_x() / 32) * rows_per_warp + lane / lanes_per_row;
    let sub = lane % lanes_per_row;
    // Every lane reaches the warp barrier below, so rows past the end only skip memory.
    let live = row < p.tokens * p.heads;
    let (token, head) = ((row / p.heads) as i64, (row % p.heads) as i64);
    let lse_at =
        |k: u32| (p.s as *const f32).offset((token * p.s_token_stride + k as i64 * p.s_state_stride + head) as isize);
    let slice_at = |k: u32, chunk: u32| {
        let elem = token * p.token_stride + k as i64 * p.state_stride + head * p.head_dim as i64 + 8 * chunk as i64;
        (p.v as *const u16).offset(elem as isize) as *const Vec16
    };
    let chunks = p.head_dim / 8;
    let out_at = |chunk: u32| (p.v_out as *mut Vec16).add((row * chunks + chunk) as usize);
    let mut lse = f32::NEG_INFINITY;
    if live && p.num_states <= FAST_STATES {
        let n = p.num_states as usize;
        let mut s = [f32::NEG_INFINITY; FAST_STATES as usize];
        let mut v = [Vec16::default(); FAST_STATES as usize];
        crate::unroll!(k in [0, 1, 2, 3] {
            if k < n {
                s[k] = load_l2_f32(lse_at(k as u32));
                if sub < chunks {
                    v[k] = load_l2(slice_at(k as u32, sub));
                }
            }
        });
        let w = weights(&mut s, n, &mut lse);
        let mut chunk = sub;
        while chunk < chunks {
            if chunk != sub {
                crate::unroll!(k in [0, 1, 2, 3] {
                    if k < n {
                        v[k] = load_l2(slice_at(k as u32, chunk));
                    }
                });
            }
            let mut o = [0.0f32; 8];
            crate::unroll!(k in [0, 1, 2, 3] {
                if k < n {
                    accumulate::<H>(&mut o, w[k], &v[k]);
                }
            });
            store(out_at(chunk), pack::<H>(&o));
            chunk += lanes_per_row;
        }
    } else if live {
        // Many states: the row's LSE first, then each slice summed state by state.
        let mut m = f32::NEG_INFINITY;
        for k in 0..p.num_states {
            m = m.max(load_l2_f32(lse_at(k)));
        }
        let m_ref = if m == f32::NEG_INFINITY { 0.0 } else { m };
        let mut total = 0.0;
        for k in 0..p.num_states {
            total += exp2(load_l2_f32(lse_at(k)) - m_ref);
        }
        lse = if total > 0.0 { m_ref + log2(total) } else { f32::NEG_INFINITY };
        let mut chunk = sub;
        while chunk < chunks {
            let mut o = [0.0f32; 8];
            for k in 0..p.num_states {
                let w = if total > 0.0 { exp2(load_l2_f32(lse_at(k)) - lse) } else { 0.0 };
                accumulate::<H>(&mut o, w, &load_l2(slice_at(k, chunk)));
            }
            store(out_at(chunk), pack::<H>(&o));
            chunk += lanes_per_row;
        }
    }
    // In place, a row's first lane must not overwrite state 0's LSE before every lane of the
    // row (all in this warp) has read it.
    sync_warp();
    if live && sub == 0 && p.s_out != 0 {
        *(p.s_out as *mut f32).add(row as usize) = lse;
    }
}

/// States merged with every load issued up front.
const FAST_STATES: u32 = 4;

/// The merge weights `2^(s_k − lse)` of the first `n` LSEs `s` (all zero when every state is
/// empty), and the merged LSE into `lse`.
#[inline(always)]
fn weights(s: &mut [f32; FAST_STATES as usize], n: usize, lse: &mut f32) -> [f32; FAST_STATES as usize] {
    let mut m = f32::NEG_INFINITY;
    crate::unroll!(k in [0, 1, 2, 3] {
        if k < n {
            m = m.max(s[k]);
        }
    });
    let m_ref = if m == f32::NEG_INFINITY { 0.0 } else { m };
    let mut total = 0.0;
    crate::unroll!(k in [0, 1, 2, 3] {
        if k < n {
            s[k] = exp2(s[k] - m_ref);
            total += s[k];
        }
    });
    *lse = if total > 0.0 { m_ref + log2(total) } else { f32::NEG_INFINITY };
    let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
    let mut w = [0.0; FAST_STATES as usize];
    crate::unroll!(k in [0, 1, 2, 3] {
        w[k] = s[k] * scale;
    });
    w
}

/// `o += w · v` for the 8 halves of `v`.
#[inline(always)]
pub(crate) fn accumulate<H: Half>(o: &mut [f32; 8], w: f32, v: &Vec16) {
    for e in 0..4 {
        o[2 * e] += w * H::to_f32(v.0[e] as u16);
        o[2 * e + 1] += w * H::to_f32((v.0[e] >> 16) as u16);
    }
}
