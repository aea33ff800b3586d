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
