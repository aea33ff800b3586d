//! The named barriers of `kernels-gpu/src/gpu/hopper.rs` (the portable MLA kernel uses them);
//! the Hopper-only instructions are not emulated.
use crate::sim::{collective, Op};

pub fn named_barrier(id: u32, threads: u32) {
    collective(Op::Barrier { id, threads, wait: true });
}

pub fn named_barrier_arrive(id: u32, threads: u32) {
    collective(Op::Barrier { id, threads, wait: false });
}
