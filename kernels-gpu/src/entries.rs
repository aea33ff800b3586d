//! Every entry point of the module with variants, generated from the one variant table in
//! `abi` (`kernel_variants!`), which the host's function table is generated from too. Each is
//! a thin `extern "ptx-kernel"` shim over its algorithm's generic kernel (instantiated by the
//! macros of `instances.rs` where it has constant parameters), named by `entry_name!`; the
//! kernels without variants are written by name in their own files.
//!
//! The `sm_90a` module holds the Hopper kernels (`prefill_hopper`) and nothing else; the
//! `sm_80` and `sm_90` modules hold all the others.
#[allow(unused_imports)]
use crate::abi::{
    DecodeParams, MergeStatesParams, MlaMergeParams, MlaParams, PagedCopyParams, PrefillParams, RopeParams, ROPE_GPTJ,
    ROPE_NEOX, ROPE_NEOX_SCALAR,
};
#[allow(unused_imports)]
use crate::gpu::fp8::{E4m3, E5m2, KvElem};
use crate::gpu::half::{Bf16, F16};

macro_rules! entry {
    (decode $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(decode $dtype $kvname $dim)]
            unsafe extern "ptx-kernel" fn entry(p: DecodeParams) {
                crate::decode_instance!($half, $kv, $dim, &p)
            }
        };
    };
    (decode_multi $half:ident $dtype:ident $dim:literal) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(decode_multi $dtype $dim)]
            unsafe extern "ptx-kernel" fn entry(p: DecodeParams) {
                crate::decode_multi_instance!($half, $dim, &p)
            }
        };
    };
    (prefill $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal $rows:literal) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(prefill $dtype $kvname $dim $rows)]
            unsafe extern "ptx-kernel" fn entry(p: PrefillParams) {
                crate::prefill_instance!($half, $kv, $dim, $dim, $rows, false, &p)
            }
        };
    };
    (prefill_masked $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(prefill_masked $dtype $kvname $dim)]
            unsafe extern "ptx-kernel" fn entry(p: PrefillParams) {
                crate::prefill_instance!($half, $kv, $dim, $dim, 64, true, &p)
            }
        };
    };
    (prefill_qk_vo $half:ident $dtype:ident $qk:literal $vo:literal $rows:literal) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(prefill_qk_vo $dtype $qk $vo $rows)]
            unsafe extern "ptx-kernel" fn entry(p: PrefillParams) {
                crate::prefill_instance!($half, $half, $qk, $vo, $rows, false, &p)
            }
        };
    };
    (prefill_hopper $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
        #[cfg(target_feature = "sm_90a")]
        const _: () = {
            #[export_name = entry_name!(prefill_hopper $dtype $kvname $dim)]
            unsafe extern "ptx-kernel" fn entry(p: PrefillParams) {
                crate::prefill_hopper_instance!($half, $kv, $dim, &p)
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
    (mla $half:ident $dtype:ident $kv:ident $kvname:ident) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(mla $dtype $kvname)]
            unsafe extern "ptx-kernel" fn entry(p: MlaParams) {
                crate::mla::mla::<$half, $kv>(&p)
            }
        };
    };
    (mla_hopper $half:ident $dtype:ident) => {
        #[cfg(target_feature = "sm_90a")]
        const _: () = {
            #[export_name = entry_name!(mla_hopper $dtype)]
            unsafe extern "ptx-kernel" fn entry(p: MlaParams) {
                crate::mla_hopper::mla_hopper::<$half>(&p)
            }
        };
    };
    (mla_merge $half:ident $dtype:ident) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(mla_merge $dtype)]
            unsafe extern "ptx-kernel" fn entry(p: MlaMergeParams) {
                crate::mla::mla_merge::<$half>(&p)
            }
        };
    };
    (rope $half:ident $dtype:ident $mode:ident) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(rope $dtype $mode)]
            unsafe extern "ptx-kernel" fn entry(p: RopeParams) {
                crate::rope::rope::<$half, { rope_mode_id!($mode) }>(&p)
            }
        };
    };
    (paged_copy_fp8 gather $half:ident $dtype:ident $kv:ident $kvname:ident) => {
        #[cfg(not(target_feature = "sm_90a"))]
        const _: () = {
            #[export_name = entry_name!(paged_copy_fp8 gather $dtype $kvname)]
            unsafe extern "ptx-kernel" fn entry(p: PagedCopyParams) {
                crate::page_copy::paged_copy_fp8::<false, $half, $kv>(&p)
            }
        };
    };
    (paged_copy_fp8 scatter $half:ident $dtype:ident $kv:ident $kvname:ident) => {
        #[cfg(not(target_feature = "sm_90a"))]
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
