//! Element types of K/V, queries and outputs.
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use super::abi::{f32_to_e4m3, f32_to_e5m2};

/// An element type, as a run-time value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// IEEE 754 half precision (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
    /// IEEE 754 single precision.
    F32,
    /// 8-bit float, 4 exponent and 3 mantissa bits, no infinities (PyTorch's
    /// `float8_e4m3fn`): a KV cache element type ([`E4m3`]).
    E4M3,
    /// 8-bit float, 5 exponent and 2 mantissa bits (PyTorch's `float8_e5m2`): a KV cache
    /// element type ([`E5m2`]).
    E5M2,
}

impl DType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::E4M3 | DType::E5M2 => 1,
        }
    }
    /// The type named `name` (`"f16"`, `"bf16"`, `"f32"`, `"e4m3"` or `"e5m2"`).
    pub fn from_name(name: &str) -> Option<Self> {
        [DType::F16, DType::BF16, DType::F32, DType::E4M3, DType::E5M2].into_iter().find(|d| d.name() == name)
    }

    /// The type's name: `"f16"`, `"bf16"`, `"f32"`, `"e4m3"` or `"e5m2"`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::E4M3 => "e4m3",
            DType::E5M2 => "e5m2",
        }
    }

    /// Whether this is an 8-bit float type, stored quantised with a scale.
    pub const fn is_fp8(self) -> bool {
        matches!(self, DType::E4M3 | DType::E5M2)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
    impl Sealed for super::E4m3 {}
    impl Sealed for super::E5m2 {}
}

/// An element type the kernels handle: f16, bf16 or f32 everywhere; [`E4m3`] and [`E5m2`] as
/// the element type of a KV cache only (queries and outputs are then f16 or bf16).
pub trait KvDType:
    DeviceRepr + ValidAsZeroBits + Copy + Default + PartialEq + std::fmt::Debug + Send + Sync + sealed::Sealed + 'static
{
    /// This type as a run-time value.
    const DTYPE: DType;
    /// The value as an `f64` (exact).
    fn to_f64(self) -> f64;
    /// `x` rounded to the nearest value of this type.
    fn from_f64(x: f64) -> Self;
}

impl KvDType for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}
impl KvDType for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}
impl KvDType for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

/// The value of an 8-bit float code with `MANT` mantissa bits and exponent bias `BIAS`,
/// normals and subnormals only (callers handle the special codes).
fn fp8_finite_to_f64<const MANT: u32, const BIAS: i32>(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((code & 0x7F) >> MANT) as i32;
    let mant = (code & ((1 << MANT) - 1)) as f64;
    let scale = (1u64 << MANT) as f64;
    if exp == 0 {
        sign * mant / scale * 2f64.powi(1 - BIAS)
    } else {
        sign * (1.0 + mant / scale) * 2f64.powi(exp - BIAS)
    }
}

macro_rules! fp8_type {
    ($(#[$doc:meta])* $name:ident, $dtype:ident, $quantise:ident, max $max:literal, nan $nan:literal) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name(pub u8);

        impl $name {
            /// The largest finite value's code (positive).
            pub const MAX_CODE: u8 = $max;
            /// The NaN code quantising gives NaN (positive, whatever the input's sign).
            pub const NAN_CODE: u8 = $nan;

            /// `x` quantised: round to nearest even, saturating to the largest finite value
            /// (±∞ too); NaN of either sign becomes [`NAN_CODE`](Self::NAN_CODE) (positive, as
            /// the hardware's `cvt.rn.satfinite` gives it).
            pub const fn from_f32(x: f32) -> Self {
                $name($quantise(x))
            }

            /// What the cache stores for input `x` under `scale`: `x · (1 / scale)` (the
            /// reciprocal rounded to f32 once, then one f32 product), then
            /// [`from_f32`](Self::from_f32). The append and scatter kernels compute exactly this.
            pub fn quantise(x: f32, scale: f32) -> Self {
                Self::from_f32(x * (1.0 / scale))
            }

            /// What the cache stores for input `x` of a KV head with scale `head_scale` (see
            /// [`PagedKvCache::set_head_scales`](crate::PagedKvCache::set_head_scales)) under
            /// the layer's `scale`: `x · ((1 / scale) · (1 / head_scale))` (each reciprocal
            /// rounded to f32, then two f32 products in that order), then
            /// [`from_f32`](Self::from_f32), as the append and scatter kernels compute it. With
            /// `head_scale` 1 it is [`quantise`](Self::quantise).
            pub fn quantise_head(x: f32, scale: f32, head_scale: f32) -> Self {
                Self::from_f32(x * ((1.0 / scale) * (1.0 / head_scale)))
            }

            /// The exact value (`f32` holds every 8-bit float exactly).
            pub fn to_f32(self) -> f32 {
                KvDType::to_f64(self) as f32
            }
        }

        // SAFETY: a plain byte, valid for every bit pattern.
        unsafe impl DeviceRepr for $name {}
        // SAFETY: zero bits are +0.
        unsafe impl ValidAsZeroBits for $name {}

        impl KvDType for $name {
            const DTYPE: DType = DType::$dtype;
            fn to_f64(self) -> f64 {
                $name::to_f64_exact(self.0)
            }
            fn from_f64(x: f64) -> Self {
                // Via f32 is exact rounding here: f32 has far more precision and range than 8 bits,
                // and a tie in f64 stays a tie in f32 (it has few significant bits).
                $name::from_f32(x as f32)
            }
        }
    };
}

fp8_type!(
    /// An FP8 E4M3 value (PyTorch's `torch.float8_e4m3fn`, FlashInfer's fp8 KV type): sign, 4
    /// exponent bits (bias 7), 3 mantissa bits; no infinities, NaN is `S.1111.111`; largest
    /// finite ±448, smallest subnormal 2^-9. Stored as its bits.
    E4m3, E4M3, f32_to_e4m3, max 0x7E, nan 0x7F
);
fp8_type!(
    /// An FP8 E5M2 value (PyTorch's `torch.float8_e5m2`): sign, 5 exponent bits (bias 15), 2
    /// mantissa bits, IEEE-style infinities and NaNs; largest finite ±57344, smallest subnormal
    /// 2^-16. Stored as its bits (the top byte of the f16 of the same value).
    E5m2, E5M2, f32_to_e5m2, max 0x7B, nan 0x7F
);

impl E4m3 {
    fn to_f64_exact(code: u8) -> f64 {
        if code & 0x7F == 0x7F {
            f64::NAN
        } else {
            fp8_finite_to_f64::<3, 7>(code)
        }
    }
}

impl E5m2 {
    fn to_f64_exact(code: u8) -> f64 {
        match code & 0x7F {
            0x7C => {
                if code & 0x80 != 0 {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                }
            }
            0x7D..=0x7F => f64::NAN,
            _ => fp8_finite_to_f64::<2, 15>(code),
        }
    }
}

/// Checks a dequantisation scale of layer `layer` (and KV head `kv_head`, for a head's):
/// finite and positive.
pub(crate) fn check_scale(
    what: &'static str,
    layer: usize,
    kv_head: Option<usize>,
    value: f32,
) -> crate::error::Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(crate::error::Error::BadScale { what, layer, kv_head, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest code by brute force over every finite code (ties to the even code), as an
    /// independent model of rounding; saturating.
    fn nearest<T: KvDType + Copy>(x: f64, codes: impl Fn(u8) -> T, max_code: u8) -> u8 {
        let max = codes(max_code).to_f64();
        let x = x.clamp(-max, max);
        let mut best: Option<(f64, u8)> = None;
        for c in 0..=255u8 {
            let v = codes(c).to_f64();
            if !v.is_finite() {
                continue;
            }
            let err = (v - x).abs();
            let better = match best {
                None => true,
                Some((e, b)) => err < e || (err == e && (c & 1 == 0) && (b & 1 == 1)),
            };
            // -0 and +0 tie: keep the one of x's sign.
            let zero_sign_fix =
                v == 0.0 && err == best.map_or(f64::INFINITY, |b| b.0) && (c & 0x80 != 0) == x.is_sign_negative();
            if better || zero_sign_fix {
                best = Some((err, c));
            }
        }
        best.unwrap().1
    }

    fn check_all_f16<T: KvDType + Copy>(
        quant: impl Fn(f32) -> u8,
        codes: impl Fn(u8) -> T + Copy,
        max_code: u8,
        nan: u8,
    ) {
        for bits in 0..=u16::MAX {
            let x = f16::from_bits(bits).to_f32();
            let got = quant(x);
            if x.is_nan() {
                assert_eq!(got, nan, "NaN {bits:#06x}");
                continue;
            }
            let want = nearest(x as f64, codes, max_code);
            assert_eq!(
                got,
                want,
                "f16 {x} ({bits:#06x}): got {got:#04x} = {}, want {want:#04x} = {}",
                codes(got).to_f64(),
                codes(want).to_f64()
            );
        }
    }

    #[test]
    fn e4m3_quantisation_of_every_f16_is_round_to_nearest_even_saturating() {
        check_all_f16(|x| E4m3::from_f32(x).0, E4m3, E4m3::MAX_CODE, E4m3::NAN_CODE);
    }

    #[test]
    fn e5m2_quantisation_of_every_f16_is_round_to_nearest_even_saturating() {
        check_all_f16(|x| E5m2::from_f32(x).0, E5m2, E5m2::MAX_CODE, E5m2::NAN_CODE);
    }

    #[test]
    fn quantisation_of_bf16_and_f32_values_matches_the_nearest_code() {
        // Every bf16 (a wider range than f16: tiny and huge values), then random f32s.
        let mut xs: Vec<f32> = (0..=u16::MAX).map(|b| bf16::from_bits(b).to_f32()).filter(|x| !x.is_nan()).collect();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = f32::from_bits(state as u32);
            if !x.is_nan() {
                xs.push(x);
            }
        }
        for x in xs {
            assert_eq!(E4m3::from_f32(x).0, nearest(x as f64, E4m3, E4m3::MAX_CODE), "e4m3 of {x:e}");
            assert_eq!(E5m2::from_f32(x).0, nearest(x as f64, E5m2, E5m2::MAX_CODE), "e5m2 of {x:e}");
        }
    }

    #[test]
    fn fp8_special_values() {
        // Ties to even at the midpoints, saturation (±∞ too), NaN to the positive NaN code.
        assert_eq!(E4m3::from_f32(448.0).0, 0x7E);
        assert_eq!(E4m3::from_f32(464.0).0, 0x7E); // halfway to 480 (which is NaN): saturates
        assert_eq!(E4m3::from_f32(1e30).0, 0x7E);
        assert_eq!(E4m3::from_f32(f32::INFINITY).0, 0x7E);
        assert_eq!(E4m3::from_f32(f32::NEG_INFINITY).0, 0xFE);
        assert_eq!(E4m3::from_f32(f32::NAN).0, 0x7F);
        assert_eq!(E4m3::from_f32(-f32::NAN).0, 0x7F); // the sign of a NaN is not kept
        assert_eq!(E5m2::from_f32(-f32::NAN).0, 0x7F);
        assert_eq!(E4m3::from_f32(-0.0).0, 0x80);
        assert_eq!(E4m3::from_f32(1.0625).0, 0x38); // 1 + 1/16: tie between 1 and 1.125, to even 1
        assert_eq!(E4m3::from_f32(1.1875).0, 0x3A); // 1.125 + 1/16: tie, to even 1.25
        assert_eq!(E4m3::from_f32(2f32.powi(-10)).0, 0x00); // half the smallest subnormal: to even 0
        assert_eq!(E4m3::from_f32(3.0 * 2f32.powi(-10)).0, 0x02); // 1.5 subnormals: to even 2
        assert_eq!(E4m3(0x01).to_f32(), 2f32.powi(-9));
        assert!(E4m3(0x7F).to_f32().is_nan() && E4m3(0xFF).to_f32().is_nan());
        assert_eq!(E5m2::from_f32(57344.0).0, 0x7B);
        assert_eq!(E5m2::from_f32(61440.0).0, 0x7B); // halfway to 65536: saturates, never ∞
        assert_eq!(E5m2::from_f32(f32::INFINITY).0, 0x7B);
        assert_eq!(E5m2::from_f32(f32::NEG_INFINITY).0, 0xFB);
        assert_eq!(E5m2::from_f32(f32::NAN).0, 0x7F);
        assert_eq!(E5m2::from_f32(2f32.powi(-17)).0, 0x00);
        assert_eq!(E5m2(0x7C).to_f32(), f32::INFINITY);
        // E5M2 is the top byte of f16: every code decodes to that f16.
        for c in 0..=255u8 {
            let via_f16 = f16::from_bits((c as u16) << 8).to_f64();
            let v = E5m2(c).to_f64();
            assert!(v == via_f16 || (v.is_nan() && via_f16.is_nan()), "{c:#04x}");
        }
    }

    #[test]
    fn quantise_multiplies_by_the_f32_reciprocal_of_the_scale() {
        assert_eq!(E4m3::quantise(3.0, 0.5), E4m3::from_f32(6.0));
        assert_eq!(E4m3::quantise(1000.0, 0.5), E4m3(0x7E)); // 2000 saturates
        assert_eq!(E5m2::quantise(f32::INFINITY, 2.0), E5m2(0x7B));
        let x = 0.1f32;
        assert_eq!(E5m2::quantise(x, 3.0), E5m2::from_f32(x * (1.0 / 3.0f32)));
    }
}
