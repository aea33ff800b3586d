//! f16/bf16 ⇄ f32 through PTX `cvt` (core has no half types on this target: values travel as
//! their bit patterns in `u16`), packed pairs, and byte shuffles between registers.
use core::arch::asm;

#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    let r: f32;
    // SAFETY: pure register conversion.
    unsafe { asm!("cvt.f32.f16 {r}, {h};", r = out(reg32) r, h = in(reg16) bits, options(pure, nomem, nostack)) }
    r
}

/// Round to nearest even.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let r: u16;
    // SAFETY: pure register conversion.
    unsafe { asm!("cvt.rn.f16.f32 {r}, {x};", r = out(reg16) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// bf16 is the top half of an f32, so widening is exact and needs no `cvt` (whose bf16 source
/// form requires sm_90).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Round to nearest even (`cvt.rn.bf16.f32`, sm_80+).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let r: u16;
    // SAFETY: pure register conversion.
    unsafe { asm!("cvt.rn.bf16.f32 {r}, {x};", r = out(reg16) r, x = in(reg32) x, options(pure, nomem, nostack)) }
    r
}

/// `lo` and `hi` rounded to nearest even into an f16x2 (`lo` in the low half).
#[inline(always)]
pub fn pack_f16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    // SAFETY: pure register conversion.
    unsafe {
        asm!("cvt.rn.f16x2.f32 {r}, {h}, {l};", r = out(reg32) r, h = in(reg32) hi, l = in(reg32) lo, options(pure, nomem, nostack))
    }
    r
}

/// `lo` and `hi` rounded to nearest even into a bf16x2 (`lo` in the low half; sm_80+).
#[inline(always)]
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    // SAFETY: pure register conversion (sm_80+).
    unsafe {
        asm!("cvt.rn.bf16x2.f32 {r}, {h}, {l};", r = out(reg32) r, h = in(reg32) hi, l = in(reg32) lo, options(pure, nomem, nostack))
    }
    r
}

/// Lane-wise product of two f16x2, rounded to nearest even.
#[inline(always)]
pub fn mul_f16x2(x: u32, y: u32) -> u32 {
    let r: u32;
    // SAFETY: pure register arithmetic.
    unsafe {
        asm!("mul.rn.f16x2 {r}, {x}, {y};", r = out(reg32) r, x = in(reg32) x, y = in(reg32) y, options(pure, nomem, nostack))
    }
    r
}

/// `prmt.b32`: byte `i` of the result is byte `(SELECTOR >> 4i) & 7` of the eight bytes `a`
/// (0–3) then `b` (4–7). Decode gathers the bytes of two keys' rows into one pair this way.
#[inline(always)]
pub fn permute_bytes<const SELECTOR: u32>(a: u32, b: u32) -> u32 {
    let r: u32;
    // SAFETY: pure register operation.
    unsafe {
        asm!("prmt.b32 {r}, {a}, {b}, {s};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b,
             s = const SELECTOR, options(pure, nomem, nostack))
    }
    r
}
