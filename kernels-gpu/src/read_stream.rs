//! A pure read stream: 16-byte loads over a buffer, grid-stride, `UNROLL` in flight per thread.
//! Decode attention only reads K/V, so this is its practical bandwidth ceiling; benchmarks also
//! use it to leave the L2 full of clean lines before a timed call.
use crate::abi::ReadStreamParams;
use crate::gpu::index::{block_dim_x, block_x, grid_dim_x, lane, thread_x};
use crate::gpu::mem::{load_readonly, Vec16};
use crate::gpu::warp::shfl_xor_u32;

const UNROLL: u64 = 4;

/// Grid: any; each warp's XOR of its loads lands in `sink[global warp index]`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn read_stream(p: ReadStreamParams) {
    let data = p.data as *const Vec16;
    let stride = grid_dim_x() as u64 * block_dim_x() as u64;
    let mut i = block_x() as u64 * block_dim_x() as u64 + thread_x() as u64;
    let mut acc = 0u32;
    while i < p.vecs {
        let mut vals = [Vec16::default(); UNROLL as usize];
        for u in 0..UNROLL {
            if i + u * stride < p.vecs {
                vals[u as usize] = load_readonly(data.add((i + u * stride) as usize));
            }
        }
        for v in &vals {
            acc ^= v.0[0] ^ v.0[1] ^ v.0[2] ^ v.0[3];
        }
        i += UNROLL * stride;
    }
    let mut mask = 16;
    while mask > 0 {
        acc ^= shfl_xor_u32(acc, mask);
        mask /= 2;
    }
    // One word per warp keeps every load live.
    if lane() == 0 {
        let warp = (block_x() as u64 * block_dim_x() as u64 + thread_x() as u64) / 32;
        *(p.sink as *mut u32).add(warp as usize) = acc;
    }
}
