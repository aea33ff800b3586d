//! Thread, block and warp coordinates of the emulated thread.
use crate::sim::{block, thread};

pub const WARP_SIZE: u32 = 32;

pub fn thread_x() -> u32 {
    thread()
}
pub fn block_dim_x() -> u32 {
    block().threads
}
pub fn block_x() -> u32 {
    block().index.0
}
pub fn block_y() -> u32 {
    block().index.1
}
pub fn grid_dim_x() -> u32 {
    block().grid.0
}
pub fn lane() -> u32 {
    thread_x() % WARP_SIZE
}
pub fn warp() -> u32 {
    thread_x() / WARP_SIZE
}
pub fn thread_x_here() -> u32 {
    thread()
}
