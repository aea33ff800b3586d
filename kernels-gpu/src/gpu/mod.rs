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
pub mod shared;
pub mod sync;
pub mod tensor;
pub mod warp;

/// Division by a run-time divisor; shared with the host, which precomputes it.
pub use crate::abi::FastDiv;

/// Repeats `$body` once per listed index, `$i` bound to each as a `usize` constant. Loops over
/// register arrays must be unrolled or LLVM keeps the arrays in local memory; its unroller
/// gives up on bodies with much inline asm, so kernels unroll such loops with this.
#[macro_export]
macro_rules! unroll {
    ($i:ident in [$($n:literal),*] $body:block) => {{
        $( { #[allow(non_upper_case_globals)] const $i: usize = $n; $body } )*
    }};
}

/// [`unroll!`] over `0..$n` for a constant `$n ≤ 16` (a const generic, say): the guard folds
/// away per index, so register arrays sized for the largest case keep only the entries a
/// kernel uses.
#[macro_export]
macro_rules! unroll_to {
    ($i:ident < $n:expr, $body:block) => {
        $crate::unroll!($i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            if $i < $n as usize $body
        })
    };
}

/// Abort the whole grid; the host sees `CUDA_ERROR_ILLEGAL_INSTRUCTION` on the next sync.
#[inline(always)]
pub fn trap() -> ! {
    // SAFETY: `trap` takes no operands and never returns.
    unsafe { core::arch::asm!("trap;", options(noreturn, nostack)) }
}
