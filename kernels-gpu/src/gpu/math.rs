//! Fast transcendentals from the special-function unit (core has none for this target).
//! Flush-to-zero approximations, ~2 ulp: the online softmax accumulates in f32 and tolerates it.
//! And a fused multiply-add (rustc does not contract `a * b + c` by itself), rounding to an
//! integer, and sine and cosine (absolute error at most 2^-20.5 on [-100π, 100π], PTX ISA).
use core::arch::asm;

/// 2^x.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure register arithmetic.
    unsafe { asm!("ex2.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// log2(x).
#[inline(always)]
pub fn log2(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure register arithmetic.
    unsafe { asm!("lg2.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// 1/x.
#[inline(always)]
pub fn rcp(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure register arithmetic.
    unsafe { asm!("rcp.approx.ftz.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// `a · b + c`, rounded once.
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    let r: f32;
    // SAFETY: pure register arithmetic.
    unsafe {
        asm!("fma.rn.f32 {r}, {a}, {b}, {c};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, c = in(reg32) c,
             options(pure, nomem, nostack))
    }
    r
}

/// `x` rounded to the nearest integer, ties to even (`round_ties_even`).
#[inline(always)]
pub fn rint(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure register arithmetic.
    unsafe { asm!("cvt.rni.f32.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// sin(x), for |x| up to a few π (RoPE's reduced angles).
#[inline(always)]
pub fn sin(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure register arithmetic.
    unsafe { asm!("sin.approx.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// cos(x), for |x| up to a few π (RoPE's reduced angles).
#[inline(always)]
pub fn cos(x: f32) -> f32 {
    let r: f32;
    // SAFETY: pure register arithmetic.
    unsafe { asm!("cos.approx.f32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// `x` unchanged, through an `asm` statement with effects: the compiler computes `x` before
/// this point and cannot sink that computation past a branch that alone uses it (the Hopper
/// prefill's probabilities, packed before the test that keeps them:
/// `softmax::RowState::update_speculating`).
#[inline(always)]
pub fn computed_here(x: [u32; 4]) -> [u32; 4] {
    let [mut a, mut b, mut c, mut d] = x;
    // SAFETY: an empty statement; the operands only tie the values to it.
    unsafe {
        asm!("// computed here: {a} {b} {c} {d}", a = inout(reg32) a, b = inout(reg32) b, c = inout(reg32) c,
             d = inout(reg32) d, options(nomem, nostack, preserves_flags))
    }
    [a, b, c, d]
}
