//! The CPU emulator's implementation of the kernels' `gpu` module: the same functions as
//! `kernels-gpu/src/gpu` (those the portable kernels use), each doing on the emulated machine
//! (`crate::sim`) what its PTX does on a GPU. The plain-Rust helpers (`half`, `fp8`, `plain`)
//! are the kernels' own files; on the host the sm_80 forms of their conversions compile.

#[allow(clippy::all)]
#[path = "../../../kernels-gpu/src/gpu/fp8.rs"]
pub mod fp8;
#[allow(clippy::all)]
#[path = "../../../kernels-gpu/src/gpu/half.rs"]
pub mod half;
#[allow(clippy::all)]
#[path = "../../../kernels-gpu/src/gpu/plain.rs"]
pub mod plain;

pub mod convert;
pub mod hopper;
pub mod index;
pub mod math;
pub mod mem;
pub mod shared;
pub mod sync;
pub mod tensor;
pub mod warp;

pub use crate::abi::FastDiv;

/// `trap`: the kernel found what the host checks should have caught.
pub fn trap() -> ! {
    panic!("trap: the kernel aborted the grid")
}
