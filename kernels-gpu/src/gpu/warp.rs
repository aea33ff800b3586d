//! Warp shuffles and reductions over all 32 lanes.
//!
//! A shuffle is a collective: every lane must execute it together. Its `asm!` is therefore
//! deliberately not `pure`: a pure asm block may be sunk into the branch that uses its result
//! (seen: a reduction whose result only lane 0 stores was moved under `if lane == 0`, leaving
//! 31 lanes out of a full-mask shuffle). Side-effecting asm stays where it is written.
use core::arch::asm;

pub use super::plain::{reduce_max_f32, reduce_sum_f32};

const FULL_MASK: u32 = 0xffff_ffff;

/// Value of `x` held by lane `lane ^ mask`.
#[inline(always)]
pub fn shfl_xor_f32(x: f32, mask: u32) -> f32 {
    f32::from_bits(shfl_xor_u32(x.to_bits(), mask))
}

/// Value of `x` held by lane `lane ^ mask`.
#[inline(always)]
pub fn shfl_xor_u32(x: u32, mask: u32) -> u32 {
    let r: u32;
    // SAFETY: all 32 lanes execute the shuffle (full member mask); see the module note.
    unsafe {
        asm!("shfl.sync.bfly.b32 {r}, {x}, {m}, 31, {full};",
             r = out(reg32) r, x = in(reg32) x, m = in(reg32) mask, full = in(reg32) FULL_MASK,
             options(nostack))
    }
    r
}

/// Value of `x` held by lane `src`.
#[inline(always)]
pub fn shfl_idx_u32(x: u32, src: u32) -> u32 {
    let r: u32;
    // SAFETY: all 32 lanes execute the shuffle (full member mask); see the module note.
    unsafe {
        asm!("shfl.sync.idx.b32 {r}, {x}, {s}, 31, {full};",
             r = out(reg32) r, x = in(reg32) x, s = in(reg32) src, full = in(reg32) FULL_MASK,
             options(nostack))
    }
    r
}

/// `x`, the same in every lane of the warp, as lane 0's: ptxas then knows it is warp-uniform
/// and keeps what derives from it in uniform registers (the `wgmma` descriptors of the Hopper
/// kernels, built beside the `wgmma`s instead of in ordinary registers and moved over; CUTLASS
/// broadcasts its warp index for the same reason; docs/perf.md, twenty-eighth session).
#[inline(always)]
pub fn warp_uniform(x: u32) -> u32 {
    shfl_idx_u32(x, 0)
}

/// Whether `pred` holds on any lane (every lane gets the same answer).
#[inline(always)]
pub fn any(pred: bool) -> bool {
    let r: u32;
    // SAFETY: all 32 lanes vote (full member mask); see the module note.
    unsafe {
        asm!("{{ .reg .pred p, q; setp.ne.u32 p, {x}, 0; vote.sync.any.pred q, p, {full}; selp.u32 {r}, 1, 0, q; }}",
             r = out(reg32) r, x = in(reg32) pred as u32, full = in(reg32) FULL_MASK, options(nostack))
    }
    r != 0
}
