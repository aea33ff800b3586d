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
pub fn block_z() -> u32 {
    // SAFETY: reads a special register.
    unsafe { nvptx::_block_idx_z() as u32 }
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
