//! Helpers written in plain Rust over the PTX primitives of the other modules: the unrolling
//! and inlining macros, the fragment-load pipeline, `wgmma` descriptors and the warp reductions. The CPU emulator
//! (`emu/`) compiles this file and the kernels against its own primitives.
use super::warp::shfl_xor_f32;

/// Repeats `$body` once per listed index, `$i` bound to each as a `usize` constant. Loops over
/// register arrays must be unrolled or LLVM keeps the arrays in local memory; its unroller
/// gives up on bodies with much inline asm, so kernels unroll such loops with this.
#[macro_export]
macro_rules! unroll {
    ($i:ident in [$($n:literal),*] $body:block) => {{
        $( { #[allow(non_upper_case_globals)] const $i: usize = $n; $body } )*
    }};
}

/// [`unroll!`] over `0..32`: the 32 n-tiles of 8 columns of a 256-wide accumulator row (MLA's
/// output halves), past `unroll_to!`'s 16.
#[macro_export]
macro_rules! unroll_32 {
    ($i:ident, $body:block) => {
        $crate::unroll!($i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                              16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31] $body)
    };
}

/// `#[inline(always)] $closure` on the GPU (LLVM might not inline a closure called in several
/// places, leaving its captures in local memory); the closure as it is on the host, where
/// attributes on expressions are unstable.
#[cfg(target_arch = "nvptx64")]
#[macro_export]
macro_rules! inline_always {
    ($closure:expr) => {
        #[inline(always)]
        $closure
    };
}
#[cfg(not(target_arch = "nvptx64"))]
#[macro_export]
macro_rules! inline_always {
    ($closure:expr) => {
        $closure
    };
}

/// [`unroll!`] over `0..$n` for a constant `$n ≤ 16` (a const generic, say): the guard folds
/// away per index, so register arrays sized for the largest case keep only the entries a
/// kernel uses.
#[macro_export]
macro_rules! unroll_to {
    ($i:ident < $n:expr, $body:block) => {
        // Compiled out of the PTX (release); the emulator's test builds check it.
        debug_assert!(($n) as usize <= 16, "unroll_to! covers 0..16 only");
        $crate::unroll!($i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            if $i < $n as usize $body
        })
    };
}

/// Runs `compute(i, load(i))` for `i` in `0..n` (unrolled, `n ≤ 32` a constant), loading step
/// `i + 1`'s fragments before step `i`'s math, so each `ldmatrix` has a step of mma to land
/// behind. The asm keeps this order into the PTX; left to itself, ptxas may reload one
/// fragment register per mma and stall on every load.
#[inline(always)]
#[allow(unused_assignments)] // the last step's `next` (its load is guarded out)
pub fn pipelined<F: Copy>(n: usize, mut load: impl FnMut(usize) -> F, mut compute: impl FnMut(usize, F)) {
    // Compiled out of the PTX (release); the emulator's test builds check it.
    debug_assert!(n <= 32, "pipelined covers 32 steps only");
    let mut next = load(0);
    crate::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                         16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31] {
        if i < n {
            let current = next;
            if i + 1 < n {
                next = load(i + 1);
            }
            compute(i, current);
        }
    });
}

/// A shared-memory matrix descriptor for `wgmma`, 128-byte swizzle: the operand starts at
/// shared address `addr`; `leading_bytes` and `stride_bytes` step between 8 × 128-byte swizzle
/// atoms (PTX ISA "Matrix Descriptor Format": K-major operands step their rows' 8-row groups by
/// the stride and ignore the leading offset; MN-major ones step along MN by the leading offset
/// and along K by the stride). Plain bits, shared with the emulator, which decodes them.
#[inline(always)]
pub fn smem_descriptor(addr: u32, leading_bytes: u32, stride_bytes: u32) -> u64 {
    ((addr as u64 & 0x3_FFFF) >> 4)
        | (((leading_bytes as u64 >> 4) & 0x3FFF) << 16)
        | (((stride_bytes as u64 >> 4) & 0x3FFF) << 32)
        | (1u64 << 62)
}

/// Sum over the warp; every lane gets the result.
#[inline(always)]
pub fn reduce_sum_f32(mut x: f32) -> f32 {
    let mut mask = 16;
    while mask > 0 {
        x += shfl_xor_f32(x, mask);
        mask /= 2;
    }
    x
}

/// Maximum over the warp; every lane gets the result.
#[inline(always)]
pub fn reduce_max_f32(mut x: f32) -> f32 {
    let mut mask = 16;
    while mask > 0 {
        x = x.max(shfl_xor_f32(x, mask));
        mask /= 2;
    }
    x
}
