//! `cp.async` (performed when the thread waits for it), `ldmatrix` and `mma.sync` m16n8k16 on
//! the emulated warp.
use super::mem::Vec16;
use crate::sim::{block, collective, Op, Reply};

pub use super::plain::pipelined;

/// # Safety
/// As the GPU's (checked here).
pub unsafe fn copy_async_or_zero(dst: u32, src: *const Vec16, valid: bool) {
    block().copy_async(dst, src as u64, valid);
}
/// # Safety
/// As the GPU's (checked here).
pub unsafe fn copy_async(dst: u32, src: *const Vec16) {
    block().copy_async(dst, src as u64, true);
}
pub fn commit_async_copies() {
    block().commit_copies();
}
pub fn wait_async_copies(pending: u32) {
    block().wait_copies(pending.min(2));
}

fn quad(r: Reply) -> [u32; 4] {
    match r {
        Reply::Quad(q) => q,
        r => unreachable!("{r:?}"),
    }
}

/// # Safety
/// As the GPU's (checked here).
pub unsafe fn load_matrix_x4(addr: u32) -> [u32; 4] {
    quad(collective(Op::LoadMatrix { addr, trans: false }))
}
/// # Safety
/// As the GPU's (checked here).
pub unsafe fn load_matrix_x4_trans(addr: u32) -> [u32; 4] {
    quad(collective(Op::LoadMatrix { addr, trans: true }))
}

fn mma(acc: &mut [f32; 4], a: [u32; 4], b: [u32; 2], bf16: bool) {
    match collective(Op::Mma { acc: *acc, a, b, bf16 }) {
        Reply::Acc(d) => *acc = d,
        r => unreachable!("{r:?}"),
    }
}
pub fn mma_f16(acc: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
    mma(acc, a, b, false)
}
pub fn mma_bf16(acc: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
    mma(acc, a, b, true)
}
