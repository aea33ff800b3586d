//! The 16-bit float types kernels are generic over, and 16-byte vectors of eight of them.
use super::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, pack_bf16x2, pack_f16x2};
use super::mem::Vec16;
use super::tensor::{mma_bf16, mma_f16};

pub trait Half {
    /// Whether this is bf16 (else f16).
    const BF16: bool;
    fn to_f32(bits: u16) -> f32;
    fn from_f32(x: f32) -> u16;
    /// Two values rounded to nearest even into one register, `lo` in the low half.
    fn pack2(lo: f32, hi: f32) -> u32;
    /// Tensor-core `acc += a · b` on an m16n8k16 tile of this type (see `tensor`).
    fn mma(acc: &mut [f32; 4], a: [u32; 4], b: [u32; 2]);
    /// A packed f16 pair as a pair of this type; exact for the values 8-bit floats hold.
    fn from_f16x2(x: u32) -> u32;
}

/// A 16-bit cache of the query's own type is read as it is: nothing to widen.
macro_rules! same_kv_elem {
    ($($half:ident)*) => {$(
        impl super::fp8::KvElem for $half {
            const BYTES: u32 = 2;
            #[inline(always)]
            fn widen8<H: Half>(_: [u32; 2]) -> [u32; 4] {
                super::trap()
            }
            #[inline(always)]
            fn widen4<H: Half>(_: u32) -> [u32; 2] {
                super::trap()
            }
        }
    )*};
}
same_kv_elem!(F16 Bf16);

pub struct F16;
pub struct Bf16;

impl Half for F16 {
    const BF16: bool = false;
    #[inline(always)]
    fn to_f32(bits: u16) -> f32 {
        f16_to_f32(bits)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> u16 {
        f32_to_f16(x)
    }
    #[inline(always)]
    fn pack2(lo: f32, hi: f32) -> u32 {
        pack_f16x2(lo, hi)
    }
    #[inline(always)]
    fn mma(acc: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
        mma_f16(acc, a, b)
    }
    #[inline(always)]
    fn from_f16x2(x: u32) -> u32 {
        x
    }
}

impl Half for Bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn to_f32(bits: u16) -> f32 {
        bf16_to_f32(bits)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> u16 {
        f32_to_bf16(x)
    }
    #[inline(always)]
    fn pack2(lo: f32, hi: f32) -> u32 {
        pack_bf16x2(lo, hi)
    }
    #[inline(always)]
    fn mma(acc: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
        mma_bf16(acc, a, b)
    }
    #[inline(always)]
    fn from_f16x2(x: u32) -> u32 {
        Self::pack2(f16_to_f32(x as u16), f16_to_f32((x >> 16) as u16))
    }
}

/// Eight values rounded to nearest even into one vector.
#[inline(always)]
pub fn pack<H: Half>(x: &[f32; 8]) -> Vec16 {
    let mut v = Vec16::default();
    for i in 0..4 {
        v.0[i] = H::from_f32(x[2 * i]) as u32 | (H::from_f32(x[2 * i + 1]) as u32) << 16;
    }
    v
}
