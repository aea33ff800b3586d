//! f16/bf16 ⇄ f32 (round to nearest even, as `cvt.rn`), packed pairs and `prmt`.
use half::{bf16, f16};

pub fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}
pub fn f32_to_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}
pub fn pack_f16x2(lo: f32, hi: f32) -> u32 {
    f32_to_f16(lo) as u32 | (f32_to_f16(hi) as u32) << 16
}
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    f32_to_bf16(lo) as u32 | (f32_to_bf16(hi) as u32) << 16
}
/// Exact: an f16 product fits f32's mantissa, so one rounding to f16 is `mul.rn.f16`'s.
pub fn mul_f16x2(x: u32, y: u32) -> u32 {
    let lane = |s: u32| f32_to_f16(f16_to_f32((x >> s) as u16) * f16_to_f32((y >> s) as u16)) as u32;
    lane(0) | lane(16) << 16
}
/// `prmt.b32` in its default mode: selector nibble `i` picks byte `n & 7` of `b:a` for result
/// byte `i`, replicating that byte's sign bit instead when `n & 8`.
pub fn permute_bytes<const SELECTOR: u32>(a: u32, b: u32) -> u32 {
    let bytes = ((b as u64) << 32 | a as u64).to_le_bytes();
    (0..4).fold(0u32, |r, i| {
        let n = (SELECTOR >> (4 * i)) & 0xF;
        let byte = bytes[(n & 7) as usize];
        let byte = if n & 8 != 0 {
            if byte & 0x80 != 0 {
                0xFF
            } else {
                0
            }
        } else {
            byte
        };
        r | (byte as u32) << (8 * i)
    })
}
