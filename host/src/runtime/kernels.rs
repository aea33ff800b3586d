//! The host's function table, generated from the ABI's one variant table (`kernel_variants!`)
//! that also generates the kernel crate's entry points: every variant is looked up once when a
//! [`Device`](super::device::Device) loads its module, with its launch geometry and occupancy,
//! and found again by what it computes (family, element type, head_dim, block rows), never by
//! a bare index.
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaModule};

use super::abi::{
    decode_block_smem_bytes, decode_block_threads, hopper_prefill_smem_bytes, mla_hopper_smem_bytes, mla_smem_bytes,
    prefill_smem_bytes, prefill_threads, HOPPER_PREFILL_ROWS, HOPPER_PREFILL_THREADS, MERGE_THREADS, MLA_CKV_DIM,
    MLA_HOPPER_THREADS, MLA_KPE_DIM, MLA_MERGE_THREADS, MLA_ROWS, MLA_THREADS, ROPE_GPTJ, ROPE_NEOX, ROPE_NEOX_SCALAR,
    ROPE_THREADS,
};
use super::dtype::DType;
use crate::error::{Error, Result};

/// What a kernel computes; its variants differ in element type and shape only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Decode,
    /// Decode with several query tokens a request (speculative decoding's draft tokens; 16-bit
    /// caches): `DecodeParams::tokens_per_request`.
    DecodeMultiToken,
    Prefill,
    /// Batch prefill on Hopper's `wgmma` (the `sm_90a` module only).
    PrefillHopper,
    MergeStates,
    /// Multi-head latent attention, and the merge of its split row tiles.
    Mla,
    MlaMerge,
    /// MLA on Hopper's `wgmma` (the `sm_90a` module only; 16-bit caches).
    MlaHopper,
    /// Gather from an 8-bit cache into 16-bit ragged K/V (dequantising).
    GatherFp8,
    /// Scatter (and append) 16-bit ragged K/V into an 8-bit cache (quantising).
    ScatterFp8,
    /// Rotary position embeddings, and RoPE fused into the append (`Variant::mode` says which
    /// pairing).
    Rope,
    /// A kernel without variants: `Variant::name` says which.
    Single,
}

/// One entry point of the variant table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Variant {
    /// The `.entry` name in every PTX module.
    pub name: &'static str,
    pub family: Family,
    /// The element type of the attention and merge kernels' queries and outputs, and of the
    /// ragged side of the fp8 copies.
    pub dtype: Option<DType>,
    /// The cache's element type (attention and fp8 copies).
    pub kv_dtype: Option<DType>,
    /// The head dimension of the attention kernels (0 for others); of queries and keys where
    /// values differ.
    pub head_dim: u32,
    /// The head dimension of values and outputs: `head_dim` but in prefill with narrower values.
    pub head_dim_vo: u32,
    /// Packed query rows of a prefill block (0 for others).
    pub rows: u32,
    /// The RoPE kernels' pairing (`abi::rope_mode`; 0 for others).
    pub mode: u32,
    /// A prefill kernel that reads custom masks (`PrefillWorkItem::mask_word`).
    pub custom_mask: bool,
}

impl Variant {
    /// Threads per block and dynamic shared memory of the kernels whose geometry is fixed by
    /// their variant (the attention kernels); `None` for kernels whose callers choose it.
    fn geometry(&self) -> Option<(u32, u32)> {
        match self.family {
            Family::Decode | Family::DecodeMultiToken => Some((
                decode_block_threads(self.head_dim, self.kv_bytes()),
                decode_block_smem_bytes(self.head_dim, self.kv_bytes()),
            )),
            Family::Prefill => Some((
                prefill_threads(self.head_dim_vo),
                prefill_smem_bytes(self.head_dim, self.head_dim_vo, self.rows / 64, self.kv_bytes()),
            )),
            Family::PrefillHopper => {
                Some((HOPPER_PREFILL_THREADS, hopper_prefill_smem_bytes(self.head_dim, self.kv_bytes())))
            }
            Family::MergeStates => Some((MERGE_THREADS, 0)),
            Family::Mla => Some((MLA_THREADS, mla_smem_bytes(self.kv_bytes()))),
            Family::MlaMerge => Some((MLA_MERGE_THREADS, 0)),
            Family::MlaHopper => Some((MLA_HOPPER_THREADS, mla_hopper_smem_bytes())),
            Family::Rope => Some((ROPE_THREADS, 0)),
            Family::Single | Family::GatherFp8 | Family::ScatterFp8 => None,
        }
    }

    /// Whether the variant lives in the architecture-specific module (`ptx_targets!`'s
    /// `exactly` line) rather than the portable one.
    pub fn is_arch_specific(&self) -> bool {
        matches!(self.family, Family::PrefillHopper | Family::MlaHopper)
    }
}

impl Variant {
    fn kv_bytes(&self) -> u32 {
        self.kv_dtype.map_or(2, |d| d.size_bytes() as u32)
    }
}

/// Every variant of the table, in its order.
pub(crate) fn variants() -> &'static [Variant] {
    static TABLE: OnceLock<Vec<Variant>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = Vec::new();
        let dtype = |name: &str| Some(DType::from_name(name).expect("the variant table names element types"));
        // `same`: a cache of the query's own type.
        let kv = |name: &str, query: &str| dtype(if name == "same" { query } else { name });
        macro_rules! push {
            (decode $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
                table.push(Variant {
                    name: entry_name!(decode $dtype $kvname $dim),
                    family: Family::Decode,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: kv(stringify!($kvname), stringify!($dtype)),
                    head_dim: $dim,
                    head_dim_vo: $dim,
                    rows: 0,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (decode_multi $half:ident $dtype:ident $dim:literal) => {
                table.push(Variant {
                    name: entry_name!(decode_multi $dtype $dim),
                    family: Family::DecodeMultiToken,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: dtype(stringify!($dtype)),
                    head_dim: $dim,
                    head_dim_vo: $dim,
                    rows: 0,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (prefill $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal $rows:literal) => {
                table.push(Variant {
                    name: entry_name!(prefill $dtype $kvname $dim $rows),
                    family: Family::Prefill,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: kv(stringify!($kvname), stringify!($dtype)),
                    head_dim: $dim,
                    head_dim_vo: $dim,
                    rows: $rows,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (prefill_masked $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
                table.push(Variant {
                    name: entry_name!(prefill_masked $dtype $kvname $dim),
                    family: Family::Prefill,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: kv(stringify!($kvname), stringify!($dtype)),
                    head_dim: $dim,
                    head_dim_vo: $dim,
                    rows: 64,
                    mode: 0,
                    custom_mask: true,
                })
            };
            (prefill_qk_vo $half:ident $dtype:ident $qk:literal $vo:literal $rows:literal) => {
                table.push(Variant {
                    name: entry_name!(prefill_qk_vo $dtype $qk $vo $rows),
                    family: Family::Prefill,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: dtype(stringify!($dtype)),
                    head_dim: $qk,
                    head_dim_vo: $vo,
                    rows: $rows,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (prefill_hopper $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
                table.push(Variant {
                    name: entry_name!(prefill_hopper $dtype $kvname $dim),
                    family: Family::PrefillHopper,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: kv(stringify!($kvname), stringify!($dtype)),
                    head_dim: $dim,
                    head_dim_vo: $dim,
                    rows: HOPPER_PREFILL_ROWS,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (merge_states $half:ident $dtype:ident) => {
                table.push(Variant {
                    name: entry_name!(merge_states $dtype),
                    family: Family::MergeStates,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: None,
                    head_dim: 0,
                    head_dim_vo: 0,
                    rows: 0,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (mla $half:ident $dtype:ident $kv:ident $kvname:ident) => {
                table.push(Variant {
                    name: entry_name!(mla $dtype $kvname),
                    family: Family::Mla,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: kv(stringify!($kvname), stringify!($dtype)),
                    head_dim: MLA_CKV_DIM + MLA_KPE_DIM,
                    head_dim_vo: MLA_CKV_DIM,
                    rows: MLA_ROWS,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (mla_hopper $half:ident $dtype:ident) => {
                table.push(Variant {
                    name: entry_name!(mla_hopper $dtype),
                    family: Family::MlaHopper,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: dtype(stringify!($dtype)),
                    head_dim: MLA_CKV_DIM + MLA_KPE_DIM,
                    head_dim_vo: MLA_CKV_DIM,
                    rows: MLA_ROWS,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (mla_merge $half:ident $dtype:ident) => {
                table.push(Variant {
                    name: entry_name!(mla_merge $dtype),
                    family: Family::MlaMerge,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: None,
                    head_dim: 0,
                    head_dim_vo: MLA_CKV_DIM,
                    rows: 0,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (rope $half:ident $dtype:ident $mode:ident) => {
                table.push(Variant {
                    name: entry_name!(rope $dtype $mode),
                    family: Family::Rope,
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: None,
                    head_dim: 0,
                    head_dim_vo: 0,
                    rows: 0,
                    mode: rope_mode_id!($mode),
                    custom_mask: false,
                })
            };
            (paged_copy_fp8 $direction:ident $half:ident $dtype:ident $kv:ident $kvname:ident) => {
                table.push(Variant {
                    name: entry_name!(paged_copy_fp8 $direction $dtype $kvname),
                    family: if stringify!($direction) == "gather" { Family::GatherFp8 } else { Family::ScatterFp8 },
                    dtype: dtype(stringify!($dtype)),
                    kv_dtype: kv(stringify!($kvname), stringify!($dtype)),
                    head_dim: 0,
                    head_dim_vo: 0,
                    rows: 0,
                    mode: 0,
                    custom_mask: false,
                })
            };
            (single $name:ident) => {
                table.push(Variant {
                    name: entry_name!(single $name),
                    family: Family::Single,
                    dtype: None,
                    kv_dtype: None,
                    head_dim: 0,
                    head_dim_vo: 0,
                    rows: 0,
                    mode: 0,
                    custom_mask: false,
                })
            };
        }
        kernel_variants!(push);
        table
    })
}

/// Head dims the attention kernels are built for, ascending.
pub(crate) fn attention_head_dims() -> Vec<usize> {
    let mut dims: Vec<usize> =
        variants().iter().filter(|v| v.family == Family::Decode).map(|v| v.head_dim as usize).collect();
    dims.sort_unstable();
    dims.dedup();
    dims
}

/// The (query/key, value) head dims of prefill with narrower values, and the block heights of
/// each (ascending; one element type's).
pub fn qk_vo_prefill_kernels() -> Vec<(usize, usize, u32)> {
    let mut dims: Vec<(usize, usize, u32)> = variants()
        .iter()
        .filter(|v| v.family == Family::Prefill && v.head_dim_vo != v.head_dim)
        .map(|v| (v.head_dim as usize, v.head_dim_vo as usize, v.rows))
        .collect();
    dims.sort_unstable();
    dims.dedup();
    dims
}

/// The (query/key, value) head dims of the prefill kernels whose values are narrower than their
/// queries and keys ([`PrefillOptions::head_dim_vo`](crate::PrefillOptions::head_dim_vo)): DeepSeek-style 192 and 128.
pub fn qk_vo_head_dims() -> Vec<(usize, usize)> {
    let mut dims: Vec<(usize, usize)> = qk_vo_prefill_kernels().into_iter().map(|(qk, vo, _)| (qk, vo)).collect();
    dims.dedup();
    dims
}

/// Block heights (packed query rows) the prefill kernels of `head_dim` come in, ascending
/// (the same for every element type).
pub fn prefill_block_rows(head_dim: usize) -> Vec<u32> {
    let mut rows: Vec<u32> = variants()
        .iter()
        .filter(|v| {
            v.family == Family::Prefill
                && v.head_dim as usize == head_dim
                && v.head_dim_vo == v.head_dim
                && !v.custom_mask
        })
        .map(|v| v.rows)
        .collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// A loaded entry point: its function, launch geometry and how many of its blocks one SM holds.
pub(crate) struct Kernel {
    pub variant: Variant,
    pub function: CudaFunction,
    /// Threads per block (attention and merge kernels; 0 where the caller chooses).
    pub threads: u32,
    /// Dynamic shared memory per block (likewise).
    pub smem_bytes: u32,
    /// Resident blocks per SM at that geometry (registers and shared memory permitting).
    pub blocks_per_sm: usize,
}

/// Every kernel of the loaded modules, found by what it computes.
pub(crate) struct Kernels {
    all: Vec<Kernel>,
}

impl Kernels {
    /// Looks up every variant in its module (`specific`: the architecture-specific one, when
    /// the GPU has one), lets the attention kernels use their shared memory and reads their
    /// occupancy.
    pub fn load(portable: &Arc<CudaModule>, specific: Option<&Arc<CudaModule>>) -> Result<Self> {
        let mut all = Vec::with_capacity(variants().len());
        for &variant in variants() {
            let module = match (variant.is_arch_specific(), specific) {
                (false, _) => portable,
                (true, Some(module)) => module,
                (true, None) => continue,
            };
            let function = module.load_function(variant.name).map_err(Error::driver("looking up a kernel"))?;
            let (threads, smem_bytes, blocks_per_sm) = match variant.geometry() {
                Some((threads, smem)) => {
                    // Attention kernels use more than the default 48 KiB of dynamic shared memory.
                    if smem > 48 * 1024 {
                        function
                            .set_attribute(
                                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                smem as i32,
                            )
                            .map_err(Error::driver("allowing an attention kernel its shared memory"))?;
                    }
                    let n = function
                        .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
                        .map_err(Error::driver("reading a kernel's occupancy"))?;
                    (threads, smem, (n as usize).max(1))
                }
                None => (0, 0, 1),
            };
            all.push(Kernel { variant, function, threads, smem_bytes, blocks_per_sm });
        }
        Ok(Kernels { all })
    }

    fn find(&self, matches: impl Fn(&Variant) -> bool) -> Option<&Kernel> {
        self.all.iter().find(|k| matches(&k.variant))
    }

    /// The decode kernel for queries of `dtype` over a cache of `kv_dtype`, and `head_dim`.
    pub fn decode(&self, dtype: DType, kv_dtype: DType, head_dim: usize) -> Result<&Kernel> {
        self.attention(Family::Decode, dtype, kv_dtype, head_dim, 0, false, "decode attention")
    }

    /// The decode kernel for several query tokens a request (speculative decoding), for queries
    /// of `dtype` over a cache of `kv_dtype` (16-bit caches of the queries' own type only), and
    /// `head_dim`.
    pub fn decode_multi_token(&self, dtype: DType, kv_dtype: DType, head_dim: usize) -> Result<&Kernel> {
        self.attention(Family::DecodeMultiToken, dtype, kv_dtype, head_dim, 0, false, "decode of several query tokens")
    }

    /// The prefill kernel for queries of `dtype` over a cache of `kv_dtype`, `head_dim` and
    /// blocks of `rows` query rows.
    pub fn prefill(&self, dtype: DType, kv_dtype: DType, head_dim: usize, rows: u32) -> Result<&Kernel> {
        self.attention(Family::Prefill, dtype, kv_dtype, head_dim, rows, false, "prefill attention")
    }

    /// The 64-row prefill kernel that reads custom masks, for queries of `dtype` over a cache of
    /// `kv_dtype`, and `head_dim`.
    pub fn prefill_masked(&self, dtype: DType, kv_dtype: DType, head_dim: usize) -> Result<&Kernel> {
        self.attention(Family::Prefill, dtype, kv_dtype, head_dim, 64, true, "prefill attention with a custom mask")
    }

    /// The prefill kernel for queries and keys of `head_dim_qk` dims and values of a narrower
    /// `head_dim_vo`, over 16-bit K/V of the queries' `dtype`, with blocks of `rows` query rows.
    pub fn prefill_qk_vo(&self, dtype: DType, head_dim_qk: usize, head_dim_vo: usize, rows: u32) -> Result<&Kernel> {
        self.find(|v| {
            v.family == Family::Prefill
                && v.dtype == Some(dtype)
                && v.kv_dtype == Some(dtype)
                && (v.head_dim as usize, v.head_dim_vo as usize) == (head_dim_qk, head_dim_vo)
                && v.rows == rows
        })
        .ok_or(Error::UnsupportedHeadDims { head_dim_qk, head_dim_vo, supported: qk_vo_head_dims() })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        family: Family,
        dtype: DType,
        kv_dtype: DType,
        head_dim: usize,
        rows: u32,
        custom_mask: bool,
        what: &'static str,
    ) -> Result<&Kernel> {
        let of_family = |v: &Variant| {
            v.family == family && v.rows == rows && v.head_dim_vo == v.head_dim && v.custom_mask == custom_mask
        };
        if self.find(|v| of_family(v) && v.dtype == Some(dtype)).is_none() {
            return Err(Error::UnsupportedDType { what, dtype: dtype.name() });
        }
        if self.find(|v| of_family(v) && v.dtype == Some(dtype) && v.kv_dtype == Some(kv_dtype)).is_none() {
            // The query type has kernels, but not over this cache type.
            let what = if family == Family::Decode {
                "decode attention with these queries (an fp8 cache needs f16 or bf16 queries)"
            } else {
                "prefill attention with these queries (an fp8 cache needs f16 or bf16 queries)"
            };
            return Err(Error::UnsupportedDType { what, dtype: kv_dtype.name() });
        }
        let of_types = |v: &Variant| of_family(v) && v.dtype == Some(dtype) && v.kv_dtype == Some(kv_dtype);
        self.find(|v| of_types(v) && v.head_dim as usize == head_dim).ok_or_else(|| {
            // Head dims 80 and 96 run over 16-bit caches only: name what this pair supports.
            let mut supported: Vec<usize> =
                self.all.iter().filter(|k| of_types(&k.variant)).map(|k| k.variant.head_dim as usize).collect();
            supported.sort_unstable();
            supported.dedup();
            Error::UnsupportedHeadDim { head_dim, supported }
        })
    }

    /// The copy between an 8-bit cache of `kv_dtype` and 16-bit ragged K/V of `dtype`:
    /// gathering (dequantising) or scattering (quantising).
    pub fn paged_copy_fp8(&self, gather: bool, dtype: DType, kv_dtype: DType) -> Result<&Kernel> {
        let family = if gather { Family::GatherFp8 } else { Family::ScatterFp8 };
        self.find(|v| v.family == family && v.dtype == Some(dtype) && v.kv_dtype == Some(kv_dtype)).ok_or(
            Error::UnsupportedDType {
                what: "copies between an fp8 cache and ragged K/V of this type (f16 or bf16)",
                dtype: dtype.name(),
            },
        )
    }

    /// The Hopper prefill kernel for queries of `dtype` over a cache of `kv_dtype` and
    /// `head_dim`, where the GPU runs the `sm_90a` module (16-bit caches only).
    pub fn prefill_hopper(&self, dtype: DType, kv_dtype: DType, head_dim: usize) -> Option<&Kernel> {
        self.find(|v| {
            v.family == Family::PrefillHopper
                && v.dtype == Some(dtype)
                && v.kv_dtype == Some(kv_dtype)
                && v.head_dim as usize == head_dim
        })
    }

    /// The merge-states kernel for `dtype`.
    pub fn merge_states(&self, dtype: DType) -> Result<&Kernel> {
        self.find(|v| v.family == Family::MergeStates && v.dtype == Some(dtype))
            .ok_or(Error::UnsupportedDType { what: "merging attention states", dtype: dtype.name() })
    }

    /// The MLA kernel for queries and outputs of `dtype` over a latent cache of `kv_dtype`, and
    /// the merge of its split row tiles.
    pub fn mla(&self, dtype: DType, kv_dtype: DType) -> Result<(&Kernel, &Kernel)> {
        let merge =
            self.find(|v| v.family == Family::MlaMerge && v.dtype == Some(dtype)).ok_or(Error::UnsupportedDType {
                what: "multi-head latent attention (f16 or bf16 queries)",
                dtype: dtype.name(),
            })?;
        let attention = self
            .find(|v| v.family == Family::Mla && v.dtype == Some(dtype) && v.kv_dtype == Some(kv_dtype))
            .ok_or(Error::UnsupportedDType {
                what: "multi-head latent attention over this cache (f16, bf16 or fp8 of f16/bf16 queries)",
                dtype: kv_dtype.name(),
            })?;
        Ok((attention, merge))
    }

    /// The Hopper MLA kernel for queries and cache of `dtype`, where the GPU runs the `sm_90a`
    /// module.
    pub fn mla_hopper(&self, dtype: DType) -> Option<&Kernel> {
        self.find(|v| v.family == Family::MlaHopper && v.dtype == Some(dtype))
    }

    /// The RoPE kernel for rows of `dtype` and pairing `mode` (`abi::rope_mode`).
    pub fn rope(&self, dtype: DType, mode: u32) -> Result<&Kernel> {
        self.find(|v| v.family == Family::Rope && v.dtype == Some(dtype) && v.mode == mode)
            .ok_or(Error::UnsupportedDType { what: "rotary position embeddings (f16 or bf16)", dtype: dtype.name() })
    }

    /// The kernel without variants named `name` (one of the table's `single` lines).
    pub fn single(&self, name: &str) -> &Kernel {
        self.find(|v| v.family == Family::Single && v.name == name)
            .unwrap_or_else(|| panic!("{name} is not a kernel of the variant table"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ptx::{Loaded, MODULES};

    /// The `.entry` names of a PTX module.
    fn entries(ptx: &str) -> Vec<&str> {
        ptx.lines()
            .filter_map(|l| {
                l.trim_start().strip_prefix(".visible .entry ").or_else(|| l.trim_start().strip_prefix(".entry "))
            })
            .map(|rest| rest.split('(').next().unwrap_or(rest).trim())
            .collect()
    }

    #[test]
    fn every_variant_is_an_entry_of_each_of_its_committed_modules_and_nothing_else_is() {
        for module in MODULES {
            let ptx = module.ptx();
            let found = entries(&ptx);
            let specific = module.loaded == Loaded::Exactly;
            let of_module = |v: &&Variant| v.is_arch_specific() == specific;
            for v in variants().iter().filter(of_module) {
                assert!(found.contains(&v.name), "{} ({}) has no .entry {}", module.file, module.arch, v.name);
            }
            for name in &found {
                assert!(
                    variants().iter().filter(of_module).any(|v| v.name == *name),
                    "{} ({}) has .entry {name}, which the variant table does not list",
                    module.file,
                    module.arch
                );
            }
        }
    }

    #[test]
    fn the_table_names_each_variant_once_and_as_the_kernels_do() {
        let mut names: Vec<&str> = variants().iter().map(|v| v.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "an entry name appears twice");
        assert!(names.contains(&"decode_f16_128") && names.contains(&"prefill_bf16_64_rows128"));
        assert!(names.contains(&"merge_states_bf16") && names.contains(&"paged_kv_gather"));
        assert!(names.contains(&"decode_bf16_e4m3_256") && names.contains(&"prefill_f16_e5m2_128_rows128"));
        assert!(names.contains(&"paged_kv_scatter_bf16_e5m2") && names.contains(&"paged_kv_gather_f16_e4m3"));
        assert!(names.contains(&"prefill_hopper_f16_128") && names.contains(&"prefill_hopper_bf16_256"));
        assert!(names.contains(&"prefill_hopper_f16_e4m3_128") && names.contains(&"prefill_hopper_bf16_e5m2_64"));
        assert!(names.contains(&"rope_f16_neox") && names.contains(&"rope_bf16_gptj"));
        assert!(names.contains(&"rope_bf16_neox_scalar"));
        assert!(names.contains(&"mla_f16") && names.contains(&"mla_merge_bf16") && names.contains(&"mla_bf16_e5m2"));
    }

    #[test]
    fn each_rope_pairing_has_a_kernel_of_each_16_bit_type() {
        for dtype in [DType::F16, DType::BF16] {
            for mode in [ROPE_NEOX, ROPE_NEOX_SCALAR, ROPE_GPTJ] {
                let n =
                    variants().iter().filter(|v| v.family == Family::Rope && v.dtype == Some(dtype) && v.mode == mode);
                assert_eq!(n.count(), 1, "{dtype:?} mode {mode}");
            }
        }
    }

    #[test]
    fn hopper_prefill_reads_16_bit_caches_of_the_query_type_and_8_bit_ones_up_to_head_dim_128() {
        // Plans rely on finding no Hopper kernel where there is none (they take the portable one).
        let hopper: Vec<_> = variants().iter().filter(|v| v.family == Family::PrefillHopper).collect();
        // 16-bit: head dims 64, 128 and 256 (80 and 96 take the portable kernel everywhere);
        // 8-bit: 64 and 128, for either query type.
        assert_eq!(hopper.len(), 2 * 3 + 2 * 2 * 2);
        for v in hopper {
            assert!(matches!(v.dtype, Some(DType::F16 | DType::BF16)), "{}", v.name);
            let fp8 = matches!(v.kv_dtype, Some(DType::E4M3 | DType::E5M2));
            assert!(v.kv_dtype == v.dtype || (fp8 && v.head_dim <= 128), "{}", v.name);
        }
    }

    #[test]
    fn head_dims_and_block_heights_come_from_the_table() {
        assert_eq!(attention_head_dims(), [64, 80, 96, 128, 256]);
        assert_eq!(prefill_block_rows(128), [64, 128]);
        assert_eq!(prefill_block_rows(96), [64, 128]);
        assert_eq!(prefill_block_rows(256), [64]);
        assert!(prefill_block_rows(112).is_empty());
        // Narrower values: DeepSeek's 192 / 128 in 64-row blocks, not among the one-dim heights.
        assert_eq!(qk_vo_prefill_kernels(), [(192, 128, 64)]);
        assert!(prefill_block_rows(192).is_empty());
        // Every decode head_dim has prefill kernels, for both element types, and over 8-bit
        // caches too unless it is 80 or 96 (16-bit caches only).
        for dim in attention_head_dims() {
            for dtype in [DType::F16, DType::BF16] {
                let fp8 = if dim == 80 || dim == 96 { &[][..] } else { &[DType::E4M3, DType::E5M2][..] };
                for &kv_dtype in [dtype].iter().chain(fp8) {
                    let of = |f: Family| {
                        variants().iter().any(|v| {
                            v.family == f
                                && v.dtype == Some(dtype)
                                && v.kv_dtype == Some(kv_dtype)
                                && v.head_dim as usize == dim
                        })
                    };
                    assert!(of(Family::Decode) && of(Family::Prefill), "{dim} {dtype:?} {kv_dtype:?}");
                }
            }
        }
    }
}
