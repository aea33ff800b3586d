//! Internals for ferrinfer's own tests, benchmark and fuzz targets (feature `internals`): the
//! planners' work splits as plain data, the kernel ABI's work items, the read-stream probe and
//! the device-helper self-test. Not part of the supported API.
pub use crate::attention::decode::{decode_params, decode_split, decode_split_tokens, DecodeSplit, MAX_DECODE_TOKENS};
pub use crate::attention::merge::{merge_states_blocks, merge_states_params};
pub use crate::attention::mla::{mla_params, MlaAddresses};
pub use crate::attention::prefill::{
    persistent_schedule, plan_prefill_split, preferred_block_rows, prefill_params, prefill_split, prefill_work_bytes,
    HopperPrefill, PrefillKernel, PrefillSplit,
};
pub use crate::ops::page_copy::{append_row_offsets, copy_params, KPE_OFFSET_SHIFT};
pub use crate::plan::Addresses;
pub use crate::runtime::abi;
pub use crate::runtime::abi::{DecodeWorkItem, PrefillWorkItem, NO_PARTIAL};
pub use crate::runtime::kernels::prefill_block_rows;
pub use crate::runtime::probe::ReadStream;
pub use crate::runtime::selftest::{helper_outputs, HELPER_OUTPUTS};
