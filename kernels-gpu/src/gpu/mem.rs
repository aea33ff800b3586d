//! 16-byte global memory access: one `ld/st.global.v4.u32` per thread, so a warp moves 512
//! contiguous bytes per instruction when its addresses are consecutive.
use core::arch::asm;

/// Sixteen bytes in four 32-bit registers; element type is the kernel's business.
#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
pub struct Vec16(pub [u32; 4]);

/// Loads 16 bytes through the read-only (non-coherent) path.
///
/// # Safety
/// `ptr` is 16-byte aligned, points into global memory and is not written during the kernel.
#[inline(always)]
pub unsafe fn load_readonly(ptr: *const Vec16) -> Vec16 {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.global.nc.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         p = in(reg64) ptr, options(readonly, nostack, preserves_flags));
    Vec16([a, b, c, d])
}

/// Loads 16 bytes through the coherent path: memory this kernel may also write (in place).
///
/// # Safety
/// `ptr` is 16-byte aligned and points into global memory.
#[inline(always)]
pub unsafe fn load(ptr: *const Vec16) -> Vec16 {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.global.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         p = in(reg64) ptr, options(readonly, nostack, preserves_flags));
    Vec16([a, b, c, d])
}

/// Stores 16 bytes.
///
/// # Safety
/// `ptr` is 16-byte aligned and points into writable global memory.
#[inline(always)]
pub unsafe fn store(ptr: *mut Vec16, v: Vec16) {
    let [a, b, c, d] = v.0;
    asm!("st.global.v4.u32 [{p}], {{{a}, {b}, {c}, {d}}};",
         p = in(reg64) ptr, a = in(reg32) a, b = in(reg32) b, c = in(reg32) c, d = in(reg32) d,
         options(nostack, preserves_flags));
}

/// Loads 16 bytes through the L2 only (`ld.global.cg`): data other blocks of this launch
/// wrote, which a stale L1 line must not hide.
///
/// # Safety
/// `ptr` is 16-byte aligned and points into global memory.
#[inline(always)]
pub unsafe fn load_l2(ptr: *const Vec16) -> Vec16 {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.global.cg.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d,
         p = in(reg64) ptr, options(readonly, nostack, preserves_flags));
    Vec16([a, b, c, d])
}

/// As [`load_l2`], one f32.
///
/// # Safety
/// `ptr` is aligned and points into global memory.
#[inline(always)]
pub unsafe fn load_l2_f32(ptr: *const f32) -> f32 {
    let r: f32;
    asm!("ld.global.cg.f32 {r}, [{p}];", r = out(reg32) r, p = in(reg64) ptr, options(readonly, nostack, preserves_flags));
    r
}

/// Asks the L2 for the 128-byte line holding `ptr`, without waiting: a later load of it (by
/// another warp) finds it there.
///
/// # Safety
/// `ptr` points into global memory.
#[inline(always)]
pub unsafe fn prefetch_l2(ptr: *const u8) {
    asm!("prefetch.global.L2 [{p}];", p = in(reg64) ptr, options(nostack, preserves_flags));
}
