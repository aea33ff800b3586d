//! The runtime layer: what launching any kernel needs and nothing about what the kernels
//! compute. The ABI shared with the kernel crate (parameter blocks, launch geometry, and the
//! one table of kernel variants and PTX modules), the embedded modules, the device (context,
//! streams, function table, launches, checks that operands belong to it), element types, raw
//! buffers, and uploads through pinned staging. It imports nothing from the layers above.
// Shared with the kernel crate and xtask: each uses a different part of it (and, through
// `internals`, with the CPU emulator of the kernels).
#[cfg(feature = "internals")]
#[macro_use]
#[allow(dead_code)]
pub mod abi;
#[cfg(not(feature = "internals"))]
#[macro_use]
#[allow(dead_code)]
pub(crate) mod abi;
pub(crate) mod device;
pub(crate) mod dtype;
pub(crate) mod kernels;
#[cfg(feature = "internals")]
pub(crate) mod probe;
pub(crate) mod ptx;
pub(crate) mod raw;
#[cfg(feature = "internals")]
pub(crate) mod selftest;
pub(crate) mod staging;
pub(crate) mod tma;

use cudarc::driver::DeviceRepr;

// SAFETY (all below): plain `#[repr(C)]` data whose layout the kernel crate shares (the same
// source file), passed by value as a launch's one parameter.
unsafe impl DeviceRepr for abi::PagedCopyParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::DecodeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::DecodeWorkItem {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::PrefillParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::PrefillWorkItem {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::MergeStatesParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::MlaParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::MlaMergeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::ReadStreamParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::HelperCheckParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for abi::RopeParams {}
// SAFETY: plain `#[repr(C)]` f32s without padding, read by the kernels from a device buffer
// (a cache's per-KV-head scales).
unsafe impl DeviceRepr for abi::KvHeadScale {}
