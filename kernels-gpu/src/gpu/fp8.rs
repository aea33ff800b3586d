//! 8-bit float KV elements (E4M3 and E5M2): widening to f16/bf16 for the attention kernels,
//! and the per-value conversions of the copy kernels.
//!
//! The sm_90 module widens with `cvt.rn.f16x2.e4m3x2` / `e5m2x2` (sm_89 and newer); the sm_80
//! module, which has no fp8 instructions, with an exact bit-level conversion: E5M2 is the top
//! byte of the f16 of the same value, and an E4M3 byte placed in an f16's exponent and
//! mantissa fields (`(b & 0x7F) << 7`) is its value times 2^-8, normals and subnormals alike,
//! so one f16 multiply by 256 finishes it (exact: a power of two, far from overflow); only the
//! NaN code (`S.1111.111`, which would read 480) is patched.
use super::half::Half;

/// A KV cache element type as the attention kernels read it.
pub trait KvElem {
    /// Bytes per value.
    const BYTES: u32;
    /// Eight stored values (in two `u32`, the first in the low byte) as eight values of `H`,
    /// in four packed pairs. Only 8-bit types are widened.
    fn widen8<H: Half>(v: [u32; 2]) -> [u32; 4];
    /// Four stored values (the first in the low byte) as two packed pairs of `H`: values 0, 1
    /// and 2, 3. Only 8-bit types are converted.
    fn widen4<H: Half>(v: u32) -> [u32; 2];
}

/// An 8-bit float element type.
pub trait Fp8: KvElem {
    /// Two values (the low 16 bits of `pair`, the first in the low byte) as an f16x2, exactly.
    fn pair_to_f16x2(pair: u32) -> u32;
    /// Four values (the first in the low byte) as two f16x2, values 0, 1 and 2, 3, exactly.
    /// On sm_89 and newer one conversion takes each 16-bit half of the register as it is,
    /// where converting pair by pair shifted the high pair down first (docs/perf.md).
    #[inline(always)]
    fn quad_to_f16x2(quad: u32) -> [u32; 2] {
        [Self::pair_to_f16x2(quad), Self::pair_to_f16x2(quad >> 16)]
    }
    /// `lo` and `hi` rounded to nearest even, saturating (±∞ to ±max, NaN to the positive NaN
    /// code), `lo` in the low byte: the host's quantiser (`abi::f32_to_fp8`) on the sm_80
    /// module, `cvt.rn.satfinite` (the same results) on sm_89 and newer.
    fn pack2(lo: f32, hi: f32) -> u32;
}

pub struct E4m3;
pub struct E5m2;

/// Both 16-bit halves of a `u32` (four 8-bit values) through `cvt.rn.f16x2.<$ty>` (sm_89+): the
/// f16x2 of values 0, 1 and of values 2, 3.
#[cfg(target_feature = "sm_89")]
macro_rules! cvt_halves {
    ($quad:expr, $ty:literal) => {{
        let (r0, r1): (u32, u32);
        // SAFETY: pure register conversions (sm_89+, PTX 7.8).
        unsafe {
            core::arch::asm!(
                concat!("{{ .reg .b16 lo, hi; mov.b32 {{lo, hi}}, {q}; cvt.rn.f16x2.", $ty, " {r0}, lo; \
                         cvt.rn.f16x2.", $ty, " {r1}, hi; }}"),
                r0 = out(reg32) r0, r1 = out(reg32) r1, q = in(reg32) $quad, options(pure, nomem, nostack))
        }
        [r0, r1]
    }};
}

macro_rules! fp8_kv_elem {
    ($($fp8:ident)*) => {$(
        impl KvElem for $fp8 {
            const BYTES: u32 = 1;
            #[inline(always)]
            fn widen8<H: Half>(v: [u32; 2]) -> [u32; 4] {
                let ([a, b], [c, d]) = (Self::widen4::<H>(v[0]), Self::widen4::<H>(v[1]));
                [a, b, c, d]
            }
            #[inline(always)]
            fn widen4<H: Half>(v: u32) -> [u32; 2] {
                Self::quad_to_f16x2(v).map(H::from_f16x2)
            }
        }
    )*};
}
fp8_kv_elem!(E4m3 E5m2);

impl Fp8 for E4m3 {
    #[cfg(target_feature = "sm_89")]
    #[inline(always)]
    fn pair_to_f16x2(pair: u32) -> u32 {
        let r: u32;
        // SAFETY: pure register conversion (sm_89+, PTX 7.8).
        unsafe {
            core::arch::asm!("{{ .reg .b16 lo, hi; mov.b32 {{lo, hi}}, {p}; cvt.rn.f16x2.e4m3x2 {r}, lo; }}",
                 r = out(reg32) r, p = in(reg32) pair, options(pure, nomem, nostack))
        }
        r
    }
    #[cfg(target_feature = "sm_89")]
    #[inline(always)]
    fn quad_to_f16x2(quad: u32) -> [u32; 2] {
        cvt_halves!(quad, "e4m3x2")
    }
    #[cfg(not(target_feature = "sm_89"))]
    #[inline(always)]
    fn pair_to_f16x2(pair: u32) -> u32 {
        // Each byte's sign to bit 15 of its half, exponent and mantissa to bits 7..=13.
        let spread = ((pair & 0x7F) << 7) | ((pair & 0x80) << 8) | ((pair & 0x7F00) << 15) | ((pair & 0x8000) << 16);
        // 0x5C00 is 256 in f16 (f16 arithmetic keeps subnormals).
        let r = super::convert::mul_f16x2(spread, 0x5C00_5C00);
        let lo_nan = if pair & 0x7F == 0x7F { 0x7FFF } else { 0 };
        let hi_nan = if pair & 0x7F00 == 0x7F00 { 0x7FFF_0000 } else { 0 };
        r | lo_nan | hi_nan
    }
    #[cfg(target_feature = "sm_89")]
    #[inline(always)]
    fn pack2(lo: f32, hi: f32) -> u32 {
        let r: u16;
        // SAFETY: pure register conversion (sm_89+, PTX 7.8).
        unsafe {
            core::arch::asm!("cvt.rn.satfinite.e4m3x2.f32 {r}, {h}, {l};", r = out(reg16) r, h = in(reg32) hi,
                 l = in(reg32) lo, options(pure, nomem, nostack))
        }
        r as u32
    }
    #[cfg(not(target_feature = "sm_89"))]
    #[inline(always)]
    fn pack2(lo: f32, hi: f32) -> u32 {
        crate::abi::f32_to_e4m3(lo) as u32 | (crate::abi::f32_to_e4m3(hi) as u32) << 8
    }
}

impl Fp8 for E5m2 {
    #[cfg(target_feature = "sm_89")]
    #[inline(always)]
    fn pair_to_f16x2(pair: u32) -> u32 {
        let r: u32;
        // SAFETY: pure register conversion (sm_89+, PTX 7.8).
        unsafe {
            core::arch::asm!("{{ .reg .b16 lo, hi; mov.b32 {{lo, hi}}, {p}; cvt.rn.f16x2.e5m2x2 {r}, lo; }}",
                 r = out(reg32) r, p = in(reg32) pair, options(pure, nomem, nostack))
        }
        r
    }
    #[cfg(target_feature = "sm_89")]
    #[inline(always)]
    fn quad_to_f16x2(quad: u32) -> [u32; 2] {
        cvt_halves!(quad, "e5m2x2")
    }
    #[cfg(not(target_feature = "sm_89"))]
    #[inline(always)]
    fn pair_to_f16x2(pair: u32) -> u32 {
        ((pair & 0xFF) << 8) | ((pair & 0xFF00) << 16)
    }
    #[cfg(target_feature = "sm_89")]
    #[inline(always)]
    fn pack2(lo: f32, hi: f32) -> u32 {
        let r: u16;
        // SAFETY: pure register conversion (sm_89+, PTX 7.8).
        unsafe {
            core::arch::asm!("cvt.rn.satfinite.e5m2x2.f32 {r}, {h}, {l};", r = out(reg16) r, h = in(reg32) hi,
                 l = in(reg32) lo, options(pure, nomem, nostack))
        }
        r as u32
    }
    #[cfg(not(target_feature = "sm_89"))]
    #[inline(always)]
    fn pack2(lo: f32, hi: f32) -> u32 {
        crate::abi::f32_to_e5m2(lo) as u32 | (crate::abi::f32_to_e5m2(hi) as u32) << 8
    }
}

/// One stored value (the low byte of `b`) as an f32, exactly.
#[inline(always)]
pub fn to_f32<F: Fp8>(b: u32) -> f32 {
    super::convert::f16_to_f32(F::pair_to_f16x2(b & 0xFF) as u16)
}
