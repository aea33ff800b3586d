//! The CPU emulator's implementation of the kernels' `gpu` module: the same functions as
//! `kernels-gpu/src/gpu` (those the portable kernels use), each doing on the emulated machine
//! (`crate::sim`) what its PTX does on a GPU. The plain-Rust helpers (`half`, `fp8`, `plain`)
//! are the kernels' own files; on the host the sm_80 forms of their conversions compile.

#[allow(clippy::all)]
#[path = "../../../kernels-gpu/src/gpu/fp8.rs"]
pub mod fp8;
#[allow(clippy::all)]
#[path = "../../../kernels-gpu/src/gpu/half.rs"]
pub mod half;
#[allow(clippy::all)]
#[path = "../../../kernels-gpu/src/gpu/plain.rs"]
pub mod plain;

pub mod convert;
pub mod hopper;
pub mod index;
pub mod math;
pub mod mem;
pub mod shared;
pub mod sync;
pub mod tensor;
pub mod warp;

pub use crate::abi::FastDiv;

/// `trap`: the kernel found what the host checks should have caught.
pub fn trap() -> ! {
    panic!("trap: the kernel aborted the grid")
}

#[cfg(test)]
mod tests {
    use super::fp8::{E4m3, E5m2, KvElem};
    use super::half::{Bf16, Half, F16};
    use ferrinfer::KvDType;

    /// Every byte in every place of a word, widened by the kernels' `widen4` (the sm_80 module's
    /// bit-level forms, which the host compiles) to `H`, read by `value`, against the host's
    /// exact value of the code (NaN as any NaN: every 8-bit value is exact in f16 and bf16).
    fn widening_is_exact<K: KvElem, H: Half, C: KvDType>(code: fn(u8) -> C, value: fn(u16) -> f64) {
        for byte in 0..=255u8 {
            for place in 0..4 {
                // The other bytes vary with the byte, so neighbours of every kind are seen.
                let word =
                    (0x5A_C3_3C_A5u32.rotate_left(byte as u32) & !(0xFF << (8 * place))) | (byte as u32) << (8 * place);
                let halves = K::widen4::<H>(word);
                let bits = (halves[place / 2] >> (16 * (place % 2))) as u16;
                let (got, want) = (value(bits), code(byte).to_f64());
                assert!(
                    got == want || (got.is_nan() && want.is_nan()),
                    "code {byte:#04x} in byte {place} of {word:#010x}: {got} (bits {bits:#06x}), want {want}"
                );
            }
        }
    }

    fn f16_value(bits: u16) -> f64 {
        half::f16::from_bits(bits).to_f64()
    }

    fn bf16_value(bits: u16) -> f64 {
        half::bf16::from_bits(bits).to_f64()
    }

    #[test]
    fn e4m3_widening_of_every_code_in_every_byte_is_exact_f16_and_bf16() {
        widening_is_exact::<E4m3, F16, _>(ferrinfer::E4m3, f16_value);
        widening_is_exact::<E4m3, Bf16, _>(ferrinfer::E4m3, bf16_value);
    }

    #[test]
    fn e5m2_widening_of_every_code_in_every_byte_is_exact_f16_and_bf16() {
        widening_is_exact::<E5m2, F16, _>(ferrinfer::E5m2, f16_value);
        widening_is_exact::<E5m2, Bf16, _>(ferrinfer::E5m2, bf16_value);
    }
}
