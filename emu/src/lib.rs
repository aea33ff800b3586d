//! A CPU emulator for ferrinfer's kernels, so that their own Rust source runs, and is tested
//! against the f64 reference, on machines without a GPU (CI's among them).
//!
//! The kernels' files are compiled here unchanged against [`gpu`], this crate's version of
//! their device-helper module: every PTX primitive they use (thread coordinates, barriers,
//! named barriers, shuffles, votes, `cp.async`, `ldmatrix`, `mma.sync` m16n8k16, Hopper's
//! `wgmma` and mbarriers, shared and global memory access, conversions, the special-function
//! unit) done in plain Rust on the machine of [`sim`]: a block's threads are coroutines
//! meeting at each collective. fp8 is widened by the host forms of the conversions (the sm_80
//! module's), and it checks what a GPU would not report (see [`sim`]). It is slow (a collective
//! is 32 coroutine switches): tests use small shapes, and the GPU tests stay the measure of the
//! kernels on hardware.
#![allow(clippy::missing_safety_doc, clippy::too_many_arguments)]

/// The kernels' ABI: the host crate's own (`host/src/runtime/abi.rs`), so parameter blocks and
/// work items built by the host planners are the kernels' types.
pub use ferrinfer::internals::abi;

pub mod gpu;
pub mod sim;

// The kernels' own files are linted as kernels (for nvptx, where some of clippy's host advice
// does not apply, and unrolled code trips its range checks): not here.
#[allow(clippy::all)]
#[path = "../../kernels-gpu/src/decode.rs"]
pub mod decode;
#[allow(clippy::all)]
#[path = "../../kernels-gpu/src/merge.rs"]
pub mod merge;
#[allow(clippy::all)]
#[path = "../../kernels-gpu/src/mla.rs"]
pub mod mla;
#[allow(clippy::all)]
#[path = "../../kernels-gpu/src/page_copy.rs"]
pub mod page_copy;
#[allow(clippy::all)]
#[path = "../../kernels-gpu/src/paged_tile.rs"]
pub mod paged_tile;
#[allow(clippy::all)]
#[path = "../../kernels-gpu/src/prefill.rs"]
pub mod prefill;
#[allow(clippy::all)]
#[path = "../../kernels-gpu/src/prefill_hopper.rs"]
pub mod prefill_hopper;
#[allow(clippy::all)]
#[path = "../../kernels-gpu/src/softmax.rs"]
pub mod softmax;

pub use sim::{launch, DeviceBuffer, Fault, LaunchConfig};
