//! Dynamic shared memory: one `.extern .shared` array per module, sized by the launch.
use core::arch::{asm, global_asm};

// Aligned to 1 KiB so that tiles laid out at multiples of their row size from it can step
// through swizzled rows by xor (`paged_tile::swizzled`).
global_asm!(".extern .shared .align 1024 .b8 ferrinfer_dynamic_smem[];");

/// Generic pointer to the block's dynamic shared memory, viewed as `T`s.
///
/// The caller indexes only within the byte count the host passed at launch.
#[inline(always)]
pub fn dynamic_smem<T>() -> *mut T {
    let p: u64;
    // SAFETY: takes the address of a symbol; no memory is touched.
    unsafe {
        asm!("cvta.shared.u64 {p}, ferrinfer_dynamic_smem;", p = out(reg64) p,
             options(pure, nomem, nostack))
    }
    p as *mut T
}

/// Shared-window address of the block's dynamic shared memory, for `cp.async` and `ldmatrix`.
#[inline(always)]
pub fn dynamic_smem_addr() -> u32 {
    let p: u32;
    // SAFETY: takes the address of a symbol; no memory is touched.
    unsafe { asm!("mov.u32 {p}, ferrinfer_dynamic_smem;", p = out(reg32) p, options(pure, nomem, nostack)) }
    p
}

/// Reads four `u32` at shared-window address `addr`.
///
/// # Safety
/// `addr` is a 16-byte aligned address within the launch's shared memory.
#[inline(always)]
pub unsafe fn load_shared_u32x4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ld.shared.v4.u32 {{{a}, {b}, {c}, {d}}}, [{p}];", a = out(reg32) a, b = out(reg32) b, c = out(reg32) c,
         d = out(reg32) d, p = in(reg32) addr, options(nostack, readonly, preserves_flags));
    [a, b, c, d]
}

/// Writes `v` to shared-window address `addr`.
///
/// # Safety
/// `addr` is a 4-byte aligned address within the launch's shared memory.
#[inline(always)]
pub unsafe fn store_shared_u32(addr: u32, v: u32) {
    asm!("st.shared.u32 [{a}], {v};", a = in(reg32) addr, v = in(reg32) v, options(nostack, preserves_flags));
}

/// Reads two `u32` at shared-window address `addr`.
///
/// # Safety
/// `addr` is an 8-byte aligned address within the launch's shared memory.
#[inline(always)]
pub unsafe fn load_shared_u32x2(addr: u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!("ld.shared.v2.u32 {{{a}, {b}}}, [{p}];", a = out(reg32) a, b = out(reg32) b, p = in(reg32) addr,
         options(nostack, readonly, preserves_flags));
    [a, b]
}

/// Reads one `u32` at shared-window address `addr`.
///
/// # Safety
/// `addr` is a 4-byte aligned address within the launch's shared memory.
#[inline(always)]
pub unsafe fn load_shared_u32(addr: u32) -> u32 {
    let a: u32;
    asm!("ld.shared.u32 {a}, [{p}];", a = out(reg32) a, p = in(reg32) addr, options(nostack, readonly, preserves_flags));
    a
}

/// Writes four `u32` to shared-window address `addr`.
///
/// # Safety
/// `addr` is a 16-byte aligned address within the launch's shared memory.
#[inline(always)]
pub unsafe fn store_shared_u32x4(addr: u32, v: [u32; 4]) {
    asm!("st.shared.v4.u32 [{p}], {{{a}, {b}, {c}, {d}}};", p = in(reg32) addr, a = in(reg32) v[0],
         b = in(reg32) v[1], c = in(reg32) v[2], d = in(reg32) v[3], options(nostack, preserves_flags));
}
