//! Every entry point of the module with variants, generated from the one variant table in
//! `abi` (`kernel_variants!`), which the host's function table is generated from too. Each is
//! a thin `extern "ptx-kernel"` shim over its algorithm's generic kernel, named by
//! `entry_name!`; the kernels without variants are written by name in their own files.
use crate::abi::{
    decode_stages, decode_threads, prefill_stages, prefill_threads, DecodeParams, MergeStatesParams, PagedCopyParams,
    PrefillParams,
};
use crate::gpu::fp8::{E4m3, E5m2, KvElem};
use crate::gpu::half::{Bf16, F16};

macro_rules! entry {
    (decode $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
        const _: () = {
            #[export_name = entry_name!(decode $dtype $kvname $dim)]
            unsafe extern "ptx-kernel" fn entry(p: DecodeParams) {
                crate::decode::decode::<
                    $half,
                    $kv,
                    $dim,
                    { decode_threads($dim) },
                    { decode_stages($dim, <$kv as KvElem>::BYTES) },
                >(&p)
            }
        };
    };
    (prefill $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal $rows:literal) => {
        const _: () = {
            #[export_name = entry_name!(prefill $dtype $kvname $dim $rows)]
            unsafe extern "ptx-kernel" fn entry(p: PrefillParams) {
                crate::prefill::prefill::<
                    $half,
                    $kv,
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
    (paged_copy_fp8 gather $half:ident $dtype:ident $kv:ident $kvname:ident) => {
        const _: () = {
            #[export_name = entry_name!(paged_copy_fp8 gather $dtype $kvname)]
            unsafe extern "ptx-kernel" fn entry(p: PagedCopyParams) {
                crate::page_copy::paged_copy_fp8::<false, $half, $kv>(&p)
            }
        };
    };
    (paged_copy_fp8 scatter $half:ident $dtype:ident $kv:ident $kvname:ident) => {
        const _: () = {
            #[export_name = entry_name!(paged_copy_fp8 scatter $dtype $kvname)]
            unsafe extern "ptx-kernel" fn entry(p: PagedCopyParams) {
                crate::page_copy::paged_copy_fp8::<true, $half, $kv>(&p)
            }
        };
    };
    (single $name:ident) => {};
}

kernel_variants!(entry);
