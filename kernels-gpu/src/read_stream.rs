//! A pure read stream: 16-byte loads over a buffer, `UNROLL` in flight per thread. Decode
//! attention only reads K/V, so this is its practical bandwidth ceiling; benchmarks also use it
//! to leave the L2 full of clean lines before a timed call.
use crate::abi::ReadStreamParams;
use crate::gpu::index::{block_dim_x, block_x, grid_dim_x, lane, thread_x};
use crate::gpu::mem::{load_readonly, Vec16};
use crate::gpu::warp::shfl_xor_u32;

/// Loads in flight per thread.
const UNROLL: u64 = 8;

/// Grid: any (one wave is best). A block reads contiguous spans of `UNROLL · blockDim`
/// vectors, spans `gridDim` apart, so each warp's loads of a step fall in one 4 KiB run and DRAM
/// pages are opened once. Each warp's XOR of its loads lands in `sink[global warp index]`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn read_stream(p: ReadStreamParams) {
    let data = p.data as *const Vec16;
    let span = UNROLL * block_dim_x() as u64;
    let mut base = block_x() as u64 * span + thread_x() as u64;
    let mut acc = 0u32;
    while base < p.vecs {
        let mut vals = [Vec16::default(); UNROLL as usize];
        crate::unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
            let i = base + u as u64 * block_dim_x() as u64;
            if i < p.vecs {
                vals[u] = load_readonly(data.add(i as usize));
            }
        });
        for v in &vals {
            acc ^= v.0[0] ^ v.0[1] ^ v.0[2] ^ v.0[3];
        }
        base += span * grid_dim_x() as u64;
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
