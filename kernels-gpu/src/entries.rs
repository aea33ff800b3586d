//! Every entry point of the module with variants, generated from the one variant table in
//! `abi` (`kernel_variants!`), which the host's function table is generated from too. Each is
//! a thin `extern "ptx-kernel"` shim over its algorithm's generic kernel, named by
//! `entry_name!`; the kernels without variants are written by name in their own files.
use crate::abi::{
    decode_stages, decode_threads, prefill_stages, prefill_threads, DecodeParams, MergeStatesParams, PrefillParams,
};
use crate::gpu::half::{Bf16, F16};

macro_rules! entry {
    (decode $half:ident $dtype:ident $dim:literal) => {
        const _: () = {
            #[export_name = entry_name!(decode $dtype $dim)]
            unsafe extern "ptx-kernel" fn entry(p: DecodeParams) {
                crate::decode::decode::<$half, $dim, { decode_threads($dim) }, { decode_stages($dim) }>(&p)
            }
        };
    };
    (prefill $half:ident $dtype:ident $dim:literal $rows:literal) => {
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
    (merge_states $half:ident $dtype:ident) => {
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
