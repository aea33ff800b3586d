//! Device helpers shared by every kernel: indices, barriers, warp collectives, vector memory
//! access, dtype conversion, fast math, dynamic shared memory and division by run-time divisors.
//! Everything PTX-specific lives here so the kernels read like algorithms.

pub mod convert;
pub mod fp8;
pub mod half;
pub mod hopper;
pub mod index;
pub mod math;
pub mod mem;
pub mod plain;
pub mod shared;
pub mod sync;
pub mod tensor;
pub mod warp;

/// Division by a run-time divisor; shared with the host, which precomputes it.
pub use crate::abi::FastDiv;

/// Abort the whole grid; the host sees `CUDA_ERROR_ILLEGAL_INSTRUCTION` on the next sync.
#[inline(always)]
pub fn trap() -> ! {
    // SAFETY: `trap` takes no operands and never returns.
    unsafe { core::arch::asm!("trap;", options(noreturn, nostack)) }
}
