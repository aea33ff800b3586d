//! ferrinfer's GPU kernels, compiled to PTX for `nvptx64-nvidia-cuda` by `cargo xtask build-kernels`.
//!
//! `gpu` holds the device helpers every kernel shares (the role `cuda_std` plays in rust-cuda);
//! each algorithm has its own file; `abi` (owned by the host crate) defines the parameter
//! blocks both sides agree on and the one table of kernel variants, from which `entries`
//! generates every entry point with variants.
#![no_std]
#![feature(abi_ptx, stdarch_nvptx, asm_experimental_arch, stmt_expr_attributes)]
#![allow(clippy::missing_safety_doc)]

pub mod gpu;

#[path = "../../host/src/runtime/abi.rs"]
#[macro_use]
pub mod abi;

pub mod decode;
mod entries;
#[macro_use]
mod instances;
#[cfg(not(target_feature = "sm_90a"))]
pub mod helper_check;
pub mod merge;
#[cfg(not(target_feature = "sm_90a"))]
pub mod mla;
pub mod mla_hopper;
#[cfg(not(target_feature = "sm_90a"))]
pub mod page_copy;
pub mod paged_tile;
pub mod prefill;
pub mod prefill_hopper;
#[cfg(not(target_feature = "sm_90a"))]
pub mod read_stream;
#[cfg(not(target_feature = "sm_90a"))]
pub mod rope;
pub mod softmax;

/// A kernel that panics has a bug the host checks should have caught: stop the grid loudly
/// (the launch returns an error) instead of writing garbage.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    gpu::trap()
}
