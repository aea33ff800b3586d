//! Thread, block and warp coordinates.
use core::arch::nvptx;

pub const WARP_SIZE: u32 = 32;

#[inline(always)]
pub fn thread_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_thread_idx_x() as u32 }
}
#[inline(always)]
pub fn block_dim_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_dim_x() as u32 }
}
#[inline(always)]
pub fn block_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_x() as u32 }
}
#[inline(always)]
pub fn block_y() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_y() as u32 }
}
#[inline(always)]
pub fn grid_dim_x() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_grid_dim_x() as u32 }
}
/// Lane within the warp (0..32).
#[inline(always)]
pub fn lane() -> u32 {
    thread_x() % WARP_SIZE
}
/// Warp within the block.
#[inline(always)]
pub fn warp() -> u32 {
    thread_x() / WARP_SIZE
}

/// `thread_x()` read afresh at this point: the compiler may not hoist it out of a loop, so the
/// addresses a loop derives from it are recomputed (a few integer ops) instead of holding one
/// register each across the loop, which is what pushes an attention kernel into spills.
#[inline(always)]
pub fn thread_x_here() -> u32 {
    let r: u32;
    // SAFETY: reads a special register; deliberately not `pure` (see above).
    unsafe { core::arch::asm!("mov.u32 {r}, %tid.x;", r = out(reg32) r, options(nomem, nostack, preserves_flags)) }
    r
}
