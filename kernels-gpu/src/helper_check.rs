//! A kernel that runs each device helper once per thread, so the GPU tests can check the
//! helpers against the host before any attention kernel depends on them.
use crate::abi::{HelperCheckParams, HELPER_OUTPUTS};
use crate::gpu::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use crate::gpu::index::{block_dim_x, block_x, lane, thread_x};
use crate::gpu::math::{exp2, log2, rcp};
use crate::gpu::shared::dynamic_smem;
use crate::gpu::sync::sync_threads;
use crate::gpu::warp::{reduce_max_f32, reduce_sum_f32, shfl_idx_u32};

/// Grid: one thread per input, in blocks of 32 (whole warps, for the warp collectives).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn helper_check(p: HelperCheckParams) {
    let i = block_x() * block_dim_x() + thread_x();
    let x = *(p.input as *const f32).add(i as usize);
    let (q, r) = p.divisor.divmod(i * 7919);
    let smem = dynamic_smem::<f32>();
    *smem.add(thread_x() as usize) = x;
    sync_threads();
    let neighbour = *smem.add((thread_x() ^ 1) as usize);
    let results = [
        exp2(x),
        log2(x.abs() + 1.0),
        rcp(x),
        f16_to_f32(f32_to_f16(x)),
        bf16_to_f32(f32_to_bf16(x)),
        reduce_sum_f32(x),
        reduce_max_f32(x),
        f32::from_bits(shfl_idx_u32(x.to_bits(), lane() ^ 5)),
        q as f32,
        r as f32,
        neighbour,
    ];
    let out = (p.output as *mut f32).add(i as usize * HELPER_OUTPUTS);
    for (k, v) in results.into_iter().enumerate() {
        *out.add(k) = v;
    }
}
