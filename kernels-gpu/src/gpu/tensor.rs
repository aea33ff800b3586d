//! The tensor-core path: asynchronous global → shared copies (`cp.async`), `ldmatrix` fragment
//! loads and `mma.sync` m16n8k16 with f32 accumulators (sm_80+).
//!
//! Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with `g = lane / 4` and
//! `t = lane % 4`: A (16 × 16, row-major) is four `u32` pairs at (g, 2t), (g + 8, 2t), (g, 2t + 8),
//! (g + 8, 2t + 8); B (16 × 8) two pairs at (k 2t, n g) and (k 2t + 8, n g); C/D four f32 at
//! (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
//!
//! `ldmatrix` and `mma.sync` are warp collectives, so like the shuffles their `asm!` is not
//! `pure` (a pure block may be sunk into a branch that only some lanes take).
use core::arch::asm;

use super::mem::Vec16;
pub use super::plain::pipelined;

/// Starts copying 16 bytes from global `src` to shared address `dst`; writes 16 zero bytes and
/// reads nothing when `!valid`. Completes at a later [`wait_async_copies`].
///
/// # Safety
/// `dst` is a 16-byte aligned shared address of the block; when `valid`, `src` is a 16-byte
/// aligned global address that nothing writes during the kernel.
#[inline(always)]
pub unsafe fn copy_async_or_zero(dst: u32, src: *const Vec16, valid: bool) {
    asm!("cp.async.cg.shared.global [{d}], [{s}], 16, {n};",
         d = in(reg32) dst, s = in(reg64) src, n = in(reg32) if valid { 16u32 } else { 0 },
         options(nostack, preserves_flags));
}

/// Starts an asynchronous 16-byte copy from global `src` to shared `dst` (bypassing L1). The
/// unconditional form: no source size to turn into a zero-fill, so no address fix-up either.
///
/// # Safety
/// `dst` is a 16-byte aligned shared address of the block; `src` is a 16-byte aligned global
/// address that nothing writes during the kernel.
#[inline(always)]
pub unsafe fn copy_async(dst: u32, src: *const Vec16) {
    asm!("cp.async.cg.shared.global [{d}], [{s}], 16;",
         d = in(reg32) dst, s = in(reg64) src, options(nostack, preserves_flags));
}

/// Closes the group of copies this thread started since the last commit.
#[inline(always)]
pub fn commit_async_copies() {
    // SAFETY: no operands.
    unsafe { asm!("cp.async.commit_group;", options(nostack, preserves_flags)) }
}

/// Waits until at most `pending` (0, 1 or 2; larger values wait for 2) of this thread's
/// committed groups are still in flight. Other threads' copies need a barrier as well.
#[inline(always)]
pub fn wait_async_copies(pending: u32) {
    // SAFETY: no operands; `pending` is a constant after inlining, so one instruction remains.
    unsafe {
        match pending {
            0 => asm!("cp.async.wait_group 0;", options(nostack, preserves_flags)),
            1 => asm!("cp.async.wait_group 1;", options(nostack, preserves_flags)),
            _ => asm!("cp.async.wait_group 2;", options(nostack, preserves_flags)),
        }
    }
}

/// Four 8 × 8 b16 matrices from shared memory: lanes `8i..8i + 8` give the row addresses of
/// matrix `i`, and each lane receives element pair (lane / 4, 2 · (lane % 4)) of each matrix.
///
/// # Safety
/// Every lane passes a 16-byte aligned shared address of the block.
#[inline(always)]
pub unsafe fn load_matrix_x4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, p = in(reg32) addr,
         options(nostack, readonly, preserves_flags));
    [a, b, c, d]
}

/// As [`load_matrix_x4`], transposed: each lane receives rows 2 · (lane % 4) and + 1 of column
/// lane / 4, the B fragment of a row-major `[k][n]` tile.
///
/// # Safety
/// As [`load_matrix_x4`].
#[inline(always)]
pub unsafe fn load_matrix_x4_trans(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{a}, {b}, {c}, {d}}}, [{p}];",
         a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, p = in(reg32) addr,
         options(nostack, readonly, preserves_flags));
    [a, b, c, d]
}

macro_rules! mma_16816 {
    ($name:ident, $ty:literal) => {
        /// `acc += a · b` on one m16n8k16 tile (f32 accumulate).
        #[inline(always)]
        pub fn $name(acc: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
            // SAFETY: register-only warp collective, executed by the whole warp (module note).
            unsafe {
                asm!(concat!("mma.sync.aligned.m16n8k16.row.col.f32.", $ty, ".", $ty, ".f32 ",
                             "{{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, ",
                             "{{{d0}, {d1}, {d2}, {d3}}};"),
                     d0 = inout(reg32) acc[0], d1 = inout(reg32) acc[1],
                     d2 = inout(reg32) acc[2], d3 = inout(reg32) acc[3],
                     a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                     b0 = in(reg32) b[0], b1 = in(reg32) b[1], options(nostack, nomem, preserves_flags));
            }
        }
    };
}

mma_16816!(mma_f16, "f16");
mma_16816!(mma_bf16, "bf16");
