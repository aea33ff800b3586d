//! Dynamic shared memory of the emulated block, by window address (checked) or by pointer.
use crate::sim::{block, SHARED_BASE};

pub fn dynamic_smem<T>() -> *mut T {
    block().smem_base() as *mut T
}

pub fn dynamic_smem_addr() -> u32 {
    SHARED_BASE
}

fn words<const N: usize>(addr: u32) -> *mut u32 {
    block().shared(addr, 4 * N as u32, 4 * N as u32) as *mut u32
}

/// # Safety
/// As the GPU's: an aligned address in the launch's shared memory (checked here).
pub unsafe fn load_shared_u32x4(addr: u32) -> [u32; 4] {
    *(words::<4>(addr) as *const [u32; 4])
}
/// # Safety
/// As [`load_shared_u32x4`].
pub unsafe fn store_shared_u32(addr: u32, v: u32) {
    *words::<1>(addr) = v;
}
/// # Safety
/// As [`load_shared_u32x4`].
pub unsafe fn load_shared_u32x2(addr: u32) -> [u32; 2] {
    *(words::<2>(addr) as *const [u32; 2])
}
/// # Safety
/// As [`load_shared_u32x4`].
pub unsafe fn load_shared_u32(addr: u32) -> u32 {
    *words::<1>(addr)
}
/// # Safety
/// As [`load_shared_u32x4`].
pub unsafe fn store_shared_u32x4(addr: u32, v: [u32; 4]) {
    *(words::<4>(addr) as *mut [u32; 4]) = v;
}
