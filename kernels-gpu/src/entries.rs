//! Every entry point of the module with variants, generated from the one variant table in
//! `abi` (`kernel_variants!`), which the host's function table is generated from too. Each is
//! a thin `extern "ptx-kernel"` shim over its algorithm's generic kernel, named by
//! `entry_name!`; the kernels without variants are written by name in their own files.
//!
//! The `sm_90a` module holds the Hopper kernels (`prefill_hopper`) and nothing else; the
//! `sm_80` and `sm_90` modules hold all the others.
#[allow(unused_imports)]
use crate::abi::{
    decode_stages, decode_threads, hopper_prefill_stages, hopper_prefill_tile_tokens, prefill_stages, prefill_threads,
    DecodeParams, MergeStatesParams, PrefillParams,
};
use crate::gpu::half::{Bf16, F16};

macro_rules! entry {
    (decode $half:ident $dtype:ident $dim:literal) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(decode $dtype $dim)]
            unsafe extern "ptx-kernel" fn entry(p: DecodeParams) {
                crate::decode::decode::<$half, $dim, { decode_threads($dim) }, { decode_stages($dim) }>(&p)
            }
        };
    };
    (prefill $half:ident $dtype:ident $dim:literal $rows:literal) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(prefill $dtype $dim $rows)]
            unsafe extern "ptx-kernel" fn entry(p: PrefillParams) {
                crate::prefill::prefill::<
                    $half,
                    $dim,
                    { $rows / 64 },
                    { prefill_threads($dim) },
                    { prefill_stages($dim, $rows / 64) },
                >(&p)
            }
        };
    };
    (prefill_hopper $half:ident $dtype:ident $dim:literal) => {
        #[cfg(target_feature = "sm_90a")]
        const _: () = {
            #[export_name = entry_name!(prefill_hopper $dtype $dim)]
            unsafe extern "ptx-kernel" fn entry(p: PrefillParams) {
                crate::prefill_hopper::prefill_hopper::<
                    $half,
                    $dim,
                    { hopper_prefill_tile_tokens($dim) },
                    { hopper_prefill_stages($dim) },
                    { hopper_prefill_tile_tokens($dim) as usize / 8 },
                    { hopper_prefill_tile_tokens($dim) as usize / 16 },
                    { $dim / 8 },
                >(&p)
            }
        };
    };
    (merge_states $half:ident $dtype:ident) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(merge_states $dtype)]
            unsafe extern "ptx-kernel" fn entry(p: MergeStatesParams) {
                crate::merge::merge_states::<$half>(&p)
            }
        };
    };
    (single $name:ident) => {};
}

kernel_variants!(entry);
