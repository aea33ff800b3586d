//! 16-byte global memory access, checked against the launch's buffers.
use crate::sim::check_global;

#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
pub struct Vec16(pub [u32; 4]);

/// # Safety
/// As the GPU's: an aligned address in a buffer (checked here).
pub unsafe fn load_readonly(ptr: *const Vec16) -> Vec16 {
    check_global(ptr as u64, 16, 16, "global load");
    *ptr
}
/// # Safety
/// As [`load_readonly`].
pub unsafe fn load(ptr: *const Vec16) -> Vec16 {
    check_global(ptr as u64, 16, 16, "global load");
    *ptr
}
/// # Safety
/// As [`load_readonly`].
pub unsafe fn store(ptr: *mut Vec16, v: Vec16) {
    check_global(ptr as u64, 16, 16, "global store");
    *ptr = v;
}
/// # Safety
/// As [`load_readonly`].
pub unsafe fn load_l2(ptr: *const Vec16) -> Vec16 {
    check_global(ptr as u64, 16, 16, "global load");
    *ptr
}
/// # Safety
/// As [`load_readonly`].
pub unsafe fn load_l2_f32(ptr: *const f32) -> f32 {
    check_global(ptr as u64, 4, 4, "global load");
    *ptr
}
/// A hint: nothing to do.
///
/// # Safety
/// None needed here.
pub unsafe fn prefetch_l2(_: *const u8) {}
