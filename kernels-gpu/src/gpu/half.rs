//! The 16-bit float types kernels are generic over, and 16-byte vectors of eight of them.
use super::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use super::mem::Vec16;

pub trait Half {
    fn to_f32(bits: u16) -> f32;
    fn from_f32(x: f32) -> u16;
}

pub struct F16;
pub struct Bf16;

impl Half for F16 {
    #[inline(always)]
    fn to_f32(bits: u16) -> f32 {
        f16_to_f32(bits)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> u16 {
        f32_to_f16(x)
    }
}

impl Half for Bf16 {
    #[inline(always)]
    fn to_f32(bits: u16) -> f32 {
        bf16_to_f32(bits)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> u16 {
        f32_to_bf16(x)
    }
}

/// The eight values of a vector, widened.
#[inline(always)]
pub fn unpack<H: Half>(v: Vec16) -> [f32; 8] {
    let mut out = [0.0; 8];
    for i in 0..4 {
        out[2 * i] = H::to_f32(v.0[i] as u16);
        out[2 * i + 1] = H::to_f32((v.0[i] >> 16) as u16);
    }
    out
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
