//! Block-wide barriers.
//!
//! `bar.sync` must be reached by every thread of the block at the same program point. rustc's
//! MIR JumpThreading pass can duplicate a call into divergent branches (rust-lang/rust#137086),
//! so `cargo xtask build-kernels` always builds with `-Zmir-enable-passes=-JumpThreading`, and
//! the barrier is LLVM's convergent `llvm.nvvm.barrier0`, which LLVM itself never duplicates.

/// `__syncthreads()`: waits for every thread of the block and orders their shared and global
/// memory accesses.
#[inline(always)]
pub fn sync_threads() {
    // SAFETY: every caller places the barrier where all threads of the block reach it.
    unsafe { core::arch::nvptx::_syncthreads() }
}

/// `__syncwarp()`: waits for every lane of the warp and orders their memory accesses. All 32
/// lanes must reach it.
#[inline(always)]
pub fn sync_warp() {
    // SAFETY: every caller places it where the whole warp arrives.
    unsafe { core::arch::asm!("bar.warp.sync 0xffffffff;", options(nostack, preserves_flags)) }
}

/// `__threadfence()`: this thread's earlier writes are visible to the whole device before its
/// later ones (and, on the reading side, later reads see what a fenced writer published).
#[inline(always)]
pub fn fence_device() {
    // SAFETY: a memory fence; no operands.
    unsafe { core::arch::asm!("fence.acq_rel.gpu;", options(nostack, preserves_flags)) }
}

/// Atomically adds `value` to `*counter` (device scope) and returns the previous value.
///
/// # Safety
/// `counter` is an aligned global address.
#[inline(always)]
pub unsafe fn atomic_add(counter: *mut u32, value: u32) -> u32 {
    let old: u32;
    core::arch::asm!("atom.global.add.u32 {old}, [{p}], {v};", old = out(reg32) old, p = in(reg64) counter,
                     v = in(reg32) value, options(nostack, preserves_flags));
    old
}

/// `griddepcontrol.wait`: waits until the grids this one depends on programmatically (a launch
/// with programmatic stream serialization) have completed and their writes are visible; returns
/// at once without such a dependency. Nothing before sm_90, where the host never launches so.
#[inline(always)]
pub fn wait_for_prerequisite_grids() {
    #[cfg(target_feature = "sm_90")]
    // SAFETY: a wait on the launch's dependencies; no operands. Not `nomem`: memory accesses
    // stay on their side of it.
    unsafe {
        core::arch::asm!("griddepcontrol.wait;", options(nostack, preserves_flags))
    }
}

/// `griddepcontrol.launch_dependents`: this block no longer holds back a grid launched after
/// this one with programmatic stream serialization (its blocks may become resident and wait in
/// [`wait_for_prerequisite_grids`]). Nothing before sm_90.
#[inline(always)]
pub fn allow_dependent_grids() {
    #[cfg(target_feature = "sm_90")]
    // SAFETY: a scheduling hint without operands.
    unsafe {
        core::arch::asm!("griddepcontrol.launch_dependents;", options(nostack, preserves_flags))
    }
}
