//! Barriers, fences and atomics of the emulated block.
use crate::sim::{block, check_global, collective, Op};

pub fn sync_threads() {
    collective(Op::Barrier { id: 0, threads: block().threads, wait: true });
}

pub fn sync_warp() {
    collective(Op::SyncWarp);
}

/// Memory is sequentially consistent here: nothing to order.
pub fn fence_device() {}

/// # Safety
/// `counter` is an aligned address in a buffer.
pub unsafe fn atomic_add(counter: *mut u32, value: u32) -> u32 {
    check_global(counter as u64, 4, 4, "atomic add");
    let old = *counter;
    *counter = old.wrapping_add(value);
    old
}

/// Grids run one after another here: nothing to wait for.
pub fn wait_for_prerequisite_grids() {}

/// Grids run one after another here: nothing to allow.
pub fn allow_dependent_grids() {}
