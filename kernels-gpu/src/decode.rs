//! Batch decode attention over the paged cache (FlashInfer's `BatchDecodeWithPagedKVCache`),
//! on CUDA cores: each query token attends over its request's keys, which it finds through the
//! page table with a run-time `page_size`.
//!
//! Threads are `(tx, ty, tz)` (see `abi::DecodeParams`): a query head's dot product is split
//! over the `HEAD_DIM / 8` lanes `tx` and reduced by shuffles; the `ty` threads of a group read
//! the same K/V vectors (one DRAM read, the rest from L1); the `tz` streams take interleaved
//! tokens, `TOKENS_IN_FLIGHT` each per step with all their loads issued before the math and the
//! next step's loads issued before this step's math (a two-deep software pipeline), and merge
//! their states through shared memory at the end.
use crate::abi::{DecodeParams, MergeParams, NO_PARTIAL};
use crate::gpu::half::{pack, unpack, Bf16, Half, F16};
use crate::gpu::index::{block_dim_x, block_x, block_y, block_z, thread_x};
use crate::gpu::math::{exp2, rcp};
use crate::gpu::mem::{load_readonly, store, Vec16};
use crate::gpu::shared::dynamic_smem;
use crate::gpu::sync::sync_threads;
use crate::gpu::warp::shfl_xor_f32;
use crate::state::{AttentionState, SLICE};

/// Tokens each thread has in flight per step; `unroll!` below lists their indices.
const TOKENS_IN_FLIGHT: u32 = 4;
const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// Base-2 logit of a raw dot product: scaled, optionally soft-capped (`cap · tanh(s / cap)`).
#[inline(always)]
fn logit(dot: f32, p: &DecodeParams) -> f32 {
    let s = dot * p.sm_scale;
    if p.logits_soft_cap > 0.0 {
        let cap = p.logits_soft_cap;
        // tanh(x) = 1 − 2 / (e^{2x} + 1), with e^y = 2^{y·log2 e}.
        let t = 1.0 - 2.0 * rcp(exp2(2.0 * LOG2_E * s / cap) + 1.0);
        cap * t * LOG2_E
    } else {
        s * LOG2_E
    }
}

/// Sum over the `lanes` consecutive lanes that share a token (a power of two dividing 32).
#[inline(always)]
fn segment_sum(mut x: f32, lanes: u32) -> f32 {
    let mut mask = lanes / 2;
    while mask > 0 {
        x += shfl_xor_f32(x, mask);
        mask /= 2;
    }
    x
}

#[inline(always)]
unsafe fn decode<H: Half, const HEAD_DIM: u32>(p: &DecodeParams) {
    let lanes = HEAD_DIM / SLICE as u32;
    let tid = thread_x();
    let (tx, ty, tz) = (tid % lanes, (tid / lanes) % p.heads_per_block, tid / (lanes * p.heads_per_block));
    let (item, kv_head) = (block_x() as usize, block_y());
    let request = *(p.work_request as *const u32).add(item);
    let (start, end) = (*(p.work_start as *const u32).add(item), *(p.work_end as *const u32).add(item));
    let head_in_group = block_z() * p.heads_per_block + ty;
    let active = head_in_group < p.group_size;
    let qo_head = kv_head * p.group_size + head_in_group.min(p.group_size - 1);
    let row = (request * p.num_qo_heads + qo_head) as usize;

    let q = unpack::<H>(load_readonly((p.q as *const Vec16).add(row * lanes as usize + tx as usize)));
    let page_base = *(p.kv_indptr as *const u32).add(request as usize);
    let kv_indices = p.kv_indices as *const u32;
    let head_offset = (kv_head * p.head_stride + tx * SLICE as u32) as u64;
    let (k_pages, v_pages) = (p.k_pages as *const Vec16, p.v_pages as *const Vec16);

    let mut state = AttentionState::empty();
    let per_step = p.token_lanes * TOKENS_IN_FLIGHT;
    let steps = (end - start).div_ceil(per_step);
    // A step's K/V loads, issued together (positions past `end` load nothing).
    let load_step = |step: u32| {
        let mut k = [Vec16::default(); TOKENS_IN_FLIGHT as usize];
        let mut v = [Vec16::default(); TOKENS_IN_FLIGHT as usize];
        let first = start + step * per_step + tz;
        crate::unroll!(u in [0, 1, 2, 3] {
            let pos = first + u as u32 * p.token_lanes;
            if pos < end {
                let (page_in_seq, slot) = p.page_size.divmod(pos);
                let page = *kv_indices.add((page_base + page_in_seq) as usize);
                let elem = page as u64 * p.page_elems as u64 + (slot * p.slot_stride) as u64 + head_offset;
                k[u] = load_readonly(k_pages.add((elem / SLICE as u64) as usize));
                v[u] = load_readonly(v_pages.add((elem / SLICE as u64) as usize));
            }
        });
        (k, v)
    };
    // Software pipeline: the next step's loads are in flight while this step computes.
    let mut next = load_step(0);
    for step in 0..steps {
        let (k, v) = next;
        if step + 1 < steps {
            next = load_step(step + 1);
        }
        let first = start + step * per_step + tz;
        crate::unroll!(u in [0, 1, 2, 3] {
            let kf = unpack::<H>(k[u]);
            let mut dot = 0.0;
            for i in 0..SLICE {
                dot += q[i] * kf[i];
            }
            // Every lane joins the shuffles, valid token or not.
            let dot = segment_sum(dot, lanes);
            if first + (u as u32) * p.token_lanes < end {
                state.push(logit(dot, p), &unpack::<H>(v[u]));
            }
        });
    }

    // Merge the token streams: every thread parks its state, the tz = 0 threads combine.
    let slots = (p.heads_per_block * p.token_lanes) as usize;
    let smem = dynamic_smem::<f32>();
    let (m_s, d_s, acc_s) = (smem, smem.add(slots), smem.add(2 * slots));
    let me = (tz * p.heads_per_block + ty) as usize;
    if tx == 0 {
        *m_s.add(me) = state.m;
        *d_s.add(me) = state.d;
    }
    for i in 0..SLICE {
        *acc_s.add(me * HEAD_DIM as usize + (tx as usize * SLICE) + i) = state.acc[i];
    }
    sync_threads();
    if tz != 0 || !active {
        return;
    }
    for z in 1..p.token_lanes {
        let other = (z * p.heads_per_block + ty) as usize;
        let mut s = AttentionState { m: *m_s.add(other), d: *d_s.add(other), acc: [0.0; SLICE] };
        for i in 0..SLICE {
            s.acc[i] = *acc_s.add(other * HEAD_DIM as usize + (tx as usize * SLICE) + i);
        }
        state.merge(&s);
    }
    let o = state.output();
    let partial = *(p.work_partial as *const u32).add(item);
    if partial == NO_PARTIAL {
        store((p.out as *mut Vec16).add(row * lanes as usize + tx as usize), pack::<H>(&o));
        if p.lse != 0 && tx == 0 {
            *(p.lse as *mut f32).add(row) = state.lse();
        }
    } else {
        let prow = partial as usize * p.num_qo_heads as usize + qo_head as usize;
        let dst = (p.partial_out as *mut Vec16).add((prow * HEAD_DIM as usize + tx as usize * SLICE) / 4);
        store(dst, Vec16([o[0].to_bits(), o[1].to_bits(), o[2].to_bits(), o[3].to_bits()]));
        store(dst.add(1), Vec16([o[4].to_bits(), o[5].to_bits(), o[6].to_bits(), o[7].to_bits()]));
        if tx == 0 {
            *(p.partial_lse as *mut f32).add(prow) = state.lse();
        }
    }
}

/// Combines a request's partial states (`abi::MergeParams`); thread `i` owns dims `i, i + block, …`.
#[inline(always)]
unsafe fn merge<H: Half>(p: &MergeParams) {
    let (r, head) = (block_x() as usize, block_y() as usize);
    let (first, last) =
        (*(p.merge_indptr as *const u32).add(r) as usize, *(p.merge_indptr as *const u32).add(r + 1) as usize);
    let request = *(p.merge_request as *const u32).add(r) as usize;
    let heads = p.num_qo_heads as usize;
    let lse = p.partial_lse as *const f32;
    let mut m = f32::NEG_INFINITY;
    for s in first..last {
        m = m.max(*lse.add(s * heads + head));
    }
    let mut total = 0.0;
    for s in first..last {
        total += exp2(*lse.add(s * heads + head) - m);
    }
    let inv = if total > 0.0 { rcp(total) } else { 0.0 };
    let dim = p.head_dim as usize;
    let mut d = thread_x() as usize;
    while d < dim {
        let mut acc = 0.0;
        for s in first..last {
            let w = exp2(*lse.add(s * heads + head) - m);
            acc += w * *(p.partial_out as *const f32).add((s * heads + head) * dim + d);
        }
        *(p.out as *mut u16).add((request * heads + head) * dim + d) = H::from_f32(acc * inv);
        d += block_dim_x() as usize;
    }
    if p.lse != 0 && thread_x() == 0 {
        let out = if total > 0.0 { m + crate::gpu::math::log2(total) } else { f32::NEG_INFINITY };
        *(p.lse as *mut f32).add(request * heads + head) = out;
    }
}

macro_rules! decode_kernels {
    ($($name:ident: $half:ty, $dim:literal;)*) => {$(
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: DecodeParams) {
            decode::<$half, $dim>(&p)
        }
    )*};
}

decode_kernels! {
    decode_f16_64: F16, 64;
    decode_f16_128: F16, 128;
    decode_f16_256: F16, 256;
    decode_bf16_64: Bf16, 64;
    decode_bf16_128: Bf16, 128;
    decode_bf16_256: Bf16, 256;
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn merge_states_f16(p: MergeParams) {
    merge::<F16>(&p)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn merge_states_bf16(p: MergeParams) {
    merge::<Bf16>(&p)
}
