//! ferrinfer: FlashInfer-class attention kernels over a paged KV cache, for Rust inference
//! stacks. Kernels are Rust compiled to PTX (embedded in this crate); the host side runs them
//! through the CUDA driver API via cudarc, loaded at run time, so building needs no CUDA.
//!
//! # Quick start
//!
//! ```no_run
//! use ferrinfer::{f16, BatchDecodePlan, CacheShape, DecodeOptions, Device, KvLayout, PagedKvCache, SequenceAllocator};
//!
//! let dev = Device::new(0)?;
//! // Any page size, chosen at run time.
//! let shape = CacheShape { num_pages: 4096, page_size: 7, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
//! let cache = PagedKvCache::<f16>::new(&dev, shape, 32)?; // 32 layers
//! let mut alloc = SequenceAllocator::new(shape.num_pages, shape.page_size)?;
//! let seq = alloc.create();
//! alloc.reserve(seq, 1000)?; // pages for 1000 tokens (written by a ScatterPlan::append)
//! let table = alloc.page_table(&[seq])?;
//! // Plan once per step (validates, uploads without waiting for the GPU), run once per layer.
//! let mut decode = BatchDecodePlan::new(&dev, &shape, 32, &table, DecodeOptions::default())?;
//! let q = dev.alloc_zeros::<f16>(decode.qo_elems())?; // [batch][32 query heads][128]
//! let mut out = dev.alloc_zeros::<f16>(decode.qo_elems())?;
//! for layer in 0..32 {
//!     decode.run(dev.stream(), &q, &cache, layer, &mut out, None)?;
//! }
//! // The next step re-plans into the same buffers.
//! alloc.reserve(seq, 1)?;
//! decode.replan(&shape, 32, &alloc.page_table(&[seq])?, DecodeOptions::default())?;
//! # Ok::<(), ferrinfer::Error>(())
//! ```
//!
//! Every kernel takes `page_size` at run time, any value from 1 up, and every launch is checked
//! on the host first: a malformed page table, a buffer of the wrong length, a stream or buffer
//! of another GPU is an [`Error`], never an out-of-bounds access on the GPU.
//!
//! # Layers
//!
//! The folders are the layers, each importing only from those below it (a test checks this):
//! - `runtime`: the ABI shared with the kernels (parameter blocks and the one table of kernel
//!   variants), the embedded PTX modules, [`Device`] (context, streams, function table,
//!   launches), element types, [`RawSlice`], uploads through pinned staging; no algorithm.
//! - `cache`: [`CacheShape`], [`PageTable`] and its validation, [`SequenceAllocator`],
//!   [`PagedKvCache`], and MLA's latent cache [`MlaKvCache`].
//! - `plan`: the plan core every plan is built on: its device, metadata and scratch, the
//!   checks and tracked operands of a run, the launch.
//! - `attention` ([`BatchDecodePlan`], [`BatchPrefillPlan`], [`CascadeDecodePlan`],
//!   [`BatchMlaPlan`], [`merge_state`] and its kin) and `ops` ([`GatherPlan`], [`ScatterPlan`],
//!   [`MlaAppendPlan`], [`RopePlan`], [`AppendRopePlan`]): the algorithms.
//! - `parallel` ([`TensorParallel`]): the algorithms over several GPUs, heads sharded, outputs
//!   all-gathered through NCCL.
//!
//! [`mod@reference`] is the f64 CPU reference every kernel is tested against.
#![deny(missing_docs)]

mod error;
#[macro_use]
mod runtime;
mod attention;
mod cache;
#[cfg(feature = "internals")]
pub mod internals;
#[cfg(test)]
mod layers;
mod ops;
mod parallel;
mod plan;
pub mod reference;

pub use attention::cascade::{CascadeDecodePlan, CascadeLevels};
pub use attention::decode::{BatchDecodePlan, DecodeOptions};
pub use attention::merge::{merge_state, merge_state_in_place, merge_states, StateShape};
pub use attention::mla::{mla_split, BatchMlaPlan, MlaOptions, MlaSplit};
pub use attention::prefill::{BatchPrefillPlan, CustomMask, PrefillKernel, PrefillOptions};
pub use cache::allocator::{PageCopy, SeqId, SequenceAllocator};
pub use cache::layout::{CacheShape, KvLayout, MAX_INDEX};
pub use cache::mla::{MlaCacheShape, MlaKvCache, MlaLayerPools};
pub use cache::page_table::PageTable;
pub use cache::paged::{KvHeadScales, KvScales, LayerPools, PagedKvCache};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use ops::page_copy::{GatherPlan, MlaAppendPlan, ScatterPlan};
pub use ops::rope::{AppendRopePlan, RopeAngles, RopeOptions, RopePlan, RopePositions, RopeShape, MAX_ROPE_POSITION};
pub use parallel::TensorParallel;
pub use runtime::device::Device;
pub use runtime::dtype::{DType, E4m3, E5m2, KvDType};
pub use runtime::kernels::qk_vo_head_dims;
pub use runtime::raw::RawSlice;
