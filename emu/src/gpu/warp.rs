//! Warp shuffles and votes: collectives of the emulated warp.
use crate::sim::{collective, Op, Reply};

pub use super::plain::{reduce_max_f32, reduce_sum_f32};

fn word(r: Reply) -> u32 {
    match r {
        Reply::Word(w) => w,
        r => unreachable!("{r:?}"),
    }
}

pub fn shfl_xor_f32(x: f32, mask: u32) -> f32 {
    f32::from_bits(shfl_xor_u32(x.to_bits(), mask))
}

pub fn shfl_xor_u32(x: u32, mask: u32) -> u32 {
    word(collective(Op::ShuffleXor { value: x, mask }))
}

pub fn shfl_idx_u32(x: u32, src: u32) -> u32 {
    word(collective(Op::ShuffleIdx { value: x, src }))
}

/// `x` as lane 0's (on the GPU a hint that it is warp-uniform).
pub fn warp_uniform(x: u32) -> u32 {
    shfl_idx_u32(x, 0)
}

pub fn any(pred: bool) -> bool {
    word(collective(Op::Vote { pred })) != 0
}
