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
