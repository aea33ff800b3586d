//! ferrinfer: FlashInfer-class attention kernels over a paged KV cache, for Rust inference
//! stacks. Kernels are Rust compiled to PTX (embedded in this crate); the host side runs them
//! through the CUDA driver API via cudarc, loaded at run time, so building needs no CUDA.
//!
//! Every kernel takes `page_size` at run time, any value from 1 up, and every page table is
//! validated on the host before a launch: a malformed table is an [`Error`], never an
//! out-of-bounds access on the GPU.
//!
//! Layers, from the bottom: [`abi`] (the parameter blocks shared with the kernels), [`device`]
//! (context, module, streams, launches), then the typed, validated API: [`PageTable`],
//! [`PagedKvCache`] and its operations ([`BatchDecodePlan`], [`BatchPrefillPlan`], the page copies). [`mod@reference`] is the CPU reference every kernel is
//! tested against.
#![deny(missing_docs)]

pub mod abi;
pub mod allocator;
mod attention;
pub mod cache;
pub mod cascade;
pub mod decode;
pub mod device;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod merge;
pub mod page_copy;
pub mod page_table;
pub mod prefill;
pub mod probe;
mod ptx;
pub mod reference;
pub mod selftest;

pub use allocator::{PageCopy, SeqId, SequenceAllocator};
pub use cache::{LayerPools, PagedKvCache};
pub use cascade::{CascadeDecodePlan, CascadeLevels};
pub use decode::{BatchDecodePlan, DecodeOptions, DecodeSplit};
pub use device::{Device, RawSlice};
pub use dtype::{DType, KvDType};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use layout::{CacheShape, KvLayout};
pub use merge::{merge_state, merge_state_in_place, merge_states, StateShape};
pub use page_copy::{GatherPlan, ScatterPlan};
pub use page_table::PageTable;
pub use prefill::{BatchPrefillPlan, PrefillOptions, PrefillSplit};
