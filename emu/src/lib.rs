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

// The kernels' instantiations (`decode_instance!`, `prefill_instance!`,
// `prefill_hopper_instance!`): the same constant parameters as the PTX's entry points.
#[path = "../../kernels-gpu/src/instances.rs"]
mod instances;

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
#[path = "../../kernels-gpu/src/mla_hopper.rs"]
pub mod mla_hopper;
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

/// A launch's split-KV scratch ([`abi::SplitScratch`]): merge counters (zero, as between
/// launches) and partial rows of `dim` f32 (or `2 · dim` 16-bit values) with their LSEs (NaN:
/// a partial a kernel reads before writing poisons its result).
pub struct SplitBuffers {
    counters: DeviceBuffer<u32>,
    partial_out: DeviceBuffer<f32>,
    partial_lse: DeviceBuffer<f32>,
}

impl SplitBuffers {
    pub fn new(counters: usize, partial_rows: usize, dim: usize) -> Self {
        SplitBuffers {
            counters: DeviceBuffer::filled("merge counters", counters.max(1), 0),
            // All ones: NaN as f32, and as each 16-bit half of one.
            partial_out: DeviceBuffer::filled("partial out", (partial_rows * dim).max(1), f32::from_bits(u32::MAX)),
            partial_lse: DeviceBuffer::filled("partial lse", partial_rows.max(1), f32::NAN),
        }
    }

    /// The addresses a parameter block takes.
    pub fn scratch(&self) -> abi::SplitScratch {
        abi::SplitScratch {
            merge_counters: self.counters.ptr(),
            partial_out: self.partial_out.ptr(),
            partial_lse: self.partial_lse.ptr(),
        }
    }

    /// Whether every merge counter is back at zero (the kernels' promise to the next launch).
    pub fn counters_are_zero(&self) -> bool {
        self.counters.to_vec().iter().all(|&n| n == 0)
    }
}

/// An attention launch's own buffers: its queries, its output rows (poisoned: an element the
/// kernel leaves unwritten fails the comparison), its LSE (NaN) and, optionally, the query
/// heads' sinks; [`addresses`](Self::addresses) makes the plan's `Addresses` of them and the
/// cache's pools.
pub struct AttentionIo<T: Copy> {
    pub q: DeviceBuffer<T>,
    pub out: DeviceBuffer<T>,
    pub lse: DeviceBuffer<f32>,
    pub sinks: Option<DeviceBuffer<f32>>,
}

impl<T: Copy> AttentionIo<T> {
    /// `rows` output rows of `dim` elements filled with `poison`.
    pub fn new(q: &[T], rows: usize, dim: usize, poison: T, sinks: Option<&[f32]>) -> Self {
        AttentionIo {
            q: DeviceBuffer::from_slice("q", q),
            out: DeviceBuffer::filled("out", rows * dim, poison),
            lse: DeviceBuffer::filled("lse", rows, f32::NAN),
            sinks: sinks.map(|s| DeviceBuffer::from_slice("sinks", s)),
        }
    }

    /// The addresses a launch takes, over pools `k` and `v` with `scales` (no per-KV-head ones).
    pub fn addresses(&self, k: u64, v: u64, scales: ferrinfer::KvScales) -> ferrinfer::internals::Addresses {
        ferrinfer::internals::Addresses {
            q: self.q.ptr(),
            k,
            v,
            out: self.out.ptr(),
            lse: self.lse.ptr(),
            sinks: self.sinks.as_ref().map_or(0, |b| b.ptr()),
            scales,
            head_scales: 0,
        }
    }
}
