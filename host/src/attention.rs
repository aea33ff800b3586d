//! What the attention plans (decode, prefill) share on the host: the checks of heads and
//! options, the kernel variant of a dtype, buffer-length checks, the split-KV scratch, and the
//! device addresses of a launch's operands.
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::abi::{FastDiv, PagedCacheParams, SplitScratch};
use crate::device::{Device, RawSlice};
use crate::dtype::{DType, KvDType};
use crate::error::{Error, Result};
use crate::layout::CacheShape;

/// Head dimensions the attention kernels are built for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Checks the cache shape, the query heads and the options every attention kernel takes, and
/// returns the group size (query heads per KV head) and the resolved `sm_scale`.
pub(crate) fn check_heads_and_options(
    shape: &CacheShape,
    num_qo_heads: usize,
    sm_scale: Option<f32>,
    logits_soft_cap: f32,
    window_left: i32,
) -> Result<(usize, f32)> {
    shape.validate(DType::F16)?;
    if !HEAD_DIMS.contains(&shape.head_dim) {
        return Err(Error::UnsupportedHeadDim { head_dim: shape.head_dim, supported: &HEAD_DIMS });
    }
    if num_qo_heads == 0 || !num_qo_heads.is_multiple_of(shape.num_kv_heads) {
        return Err(Error::GroupSize { num_qo_heads, num_kv_heads: shape.num_kv_heads });
    }
    let sm_scale = sm_scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
    if !sm_scale.is_finite() || !logits_soft_cap.is_finite() || logits_soft_cap < 0.0 {
        return Err(Error::BadOption { what: "sm_scale and logits_soft_cap must be finite, the cap ≥ 0" });
    }
    if window_left < -1 {
        return Err(Error::BadOption { what: "window_left must be −1 (none) or ≥ 0" });
    }
    Ok((num_qo_heads / shape.num_kv_heads, sm_scale))
}

/// Index of `T`'s kernel variant (`[f16, bf16]`).
pub(crate) fn kernel_dtype<T: KvDType>(what: &'static str) -> Result<usize> {
    match T::DTYPE {
        DType::F16 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F32 => Err(Error::UnsupportedDType { what, dtype: "f32" }),
    }
}

/// Index of `head_dim`'s kernel variant (a validated head_dim).
pub(crate) fn kernel_head_dim(head_dim: usize) -> usize {
    HEAD_DIMS.iter().position(|&d| d == head_dim).unwrap_or(0)
}

/// `(what, got, expected)` for each buffer: the first mismatch is the error.
pub(crate) fn check_lengths(buffers: &[(&'static str, usize, usize)]) -> Result<()> {
    match buffers.iter().find(|(_, got, expected)| got != expected) {
        Some(&(what, got, expected)) => Err(Error::BufferLength { what, got, expected }),
        None => Ok(()),
    }
}

/// Checks the element type and the lengths of an attention run's `q` and `out`
/// (`rows × head_dim` elements each) and `lse` (`rows`, when given); returns the dtype's
/// kernel index.
pub(crate) fn check_operands<T: KvDType>(
    what: &'static str,
    rows: usize,
    head_dim: usize,
    q: usize,
    out: usize,
    lse: Option<usize>,
) -> Result<usize> {
    let dtype = kernel_dtype::<T>(what)?;
    let elems = rows * head_dim;
    check_lengths(&[("q", q, elems), ("out", out, elems), ("lse", lse.unwrap_or(rows), rows)])?;
    Ok(dtype)
}

/// The paged cache as the attention kernels address it: `ops`' pools, the page table's
/// indices at `kv_indices`, and `shape`'s geometry.
pub(crate) fn paged_cache_params(shape: &CacheShape, ops: &Addresses, kv_indices: u64) -> PagedCacheParams {
    let (slot_stride, head_stride) = shape.strides();
    PagedCacheParams {
        k_pages: ops.k_pages,
        v_pages: ops.v_pages,
        kv_indices,
        page_size: FastDiv::new(shape.page_size as u32),
        page_elems: shape.page_elems() as u32,
        slot_stride: slot_stride as u32,
        head_stride: head_stride as u32,
    }
}

/// The shortest chunk (a multiple of the kernel's `tile` keys) that splits the sequences of
/// `lens` into at most `capacity / blocks_per_item` work items and no sequence into more than
/// `max_parts`, or `None` when the unsplit batch already fills `capacity` blocks. One full
/// wave of equal blocks is what a bandwidth-bound kernel wants: more items only add merge
/// work, fewer leave SMs idle.
pub(crate) fn split_chunk(
    lens: &[usize],
    tile: u32,
    blocks_per_item: usize,
    capacity: usize,
    max_parts: usize,
) -> Option<usize> {
    let tile = tile as usize;
    let items_for = |chunk: usize| lens.iter().map(|&len| len.div_ceil(chunk).max(1)).sum::<usize>();
    let max_items = capacity / blocks_per_item;
    let longest = lens.iter().copied().max().unwrap_or(0);
    if lens.is_empty() || items_for(longest.max(1)) >= max_items {
        return None;
    }
    // items_for falls as the chunk grows: binary search the smallest chunk (in tiles) that fits.
    let (mut lo, mut hi) = (longest.div_ceil(tile).div_ceil(max_parts).max(1), longest.div_ceil(tile).max(1));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if items_for(mid * tile) <= max_items {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo * tile)
}

/// A plan's split-KV scratch: f32 partial outputs and LSEs of the parts of split work, and the
/// merge counters the last part to finish claims.
pub(crate) struct SplitBuffers {
    partial_out: CudaSlice<f32>,
    partial_lse: CudaSlice<f32>,
    merge_counters: CudaSlice<u32>,
    /// Their addresses for `run_raw`, whose caller orders its stream after the plan's.
    raw: SplitScratch,
}

impl SplitBuffers {
    /// `partial_rows` partial rows of `head_dim` and their LSEs, and `counters` zeroed merge
    /// counters (each buffer at least one element, so none is a null address).
    pub fn new(device: &Device, partial_rows: usize, head_dim: usize, counters: usize) -> Result<Self> {
        let partial_out = device.alloc_zeros::<f32>((partial_rows * head_dim).max(1))?;
        let partial_lse = device.alloc_zeros::<f32>(partial_rows.max(1))?;
        let merge_counters = device.alloc_zeros::<u32>(counters.max(1))?;
        let stream = device.stream();
        let raw = SplitScratch {
            partial_out: partial_out.device_ptr(stream).0,
            partial_lse: partial_lse.device_ptr(stream).0,
            merge_counters: merge_counters.device_ptr(stream).0,
        };
        Ok(SplitBuffers { partial_out, partial_lse, merge_counters, raw })
    }

    /// The addresses for a raw run.
    pub fn raw(&self) -> SplitScratch {
        self.raw
    }

    /// The addresses for a run on `stream` through cudarc's tracking, so that runs of one plan
    /// on different streams are ordered; hold the guards until the launch is enqueued.
    pub fn on<'a>(&'a self, stream: &'a CudaStream) -> (SplitScratch, [SyncOnDrop<'a>; 3]) {
        let (partial_out, g0) = self.partial_out.device_ptr(stream);
        let (partial_lse, g1) = self.partial_lse.device_ptr(stream);
        let (merge_counters, g2) = self.merge_counters.device_ptr(stream);
        (SplitScratch { partial_out, partial_lse, merge_counters }, [g0, g1, g2])
    }
}

/// Device addresses of an attention launch's operands.
#[derive(Clone, Copy)]
pub(crate) struct Addresses {
    pub q: u64,
    pub k_pages: u64,
    pub v_pages: u64,
    pub out: u64,
    /// 0 when no LSE is wanted.
    pub lse: u64,
}

impl Addresses {
    /// The raw API's operands (lengths checked by the caller).
    pub fn raw<T>(
        q: RawSlice<T>,
        k: RawSlice<T>,
        v: RawSlice<T>,
        out: RawSlice<T>,
        lse: Option<RawSlice<f32>>,
    ) -> Self {
        Addresses { q: q.ptr(), k_pages: k.ptr(), v_pages: v.ptr(), out: out.ptr(), lse: lse.map_or(0, |l| l.ptr()) }
    }
}

/// [`Addresses`] of cudarc buffers, with cudarc's stream-ordering guards held until the launch
/// has been enqueued.
pub(crate) struct Operands<'a> {
    pub addresses: Addresses,
    /// q, k, v, out and lse's guards; held in place, since `run` is called per token and layer.
    _guards: ([SyncOnDrop<'a>; 4], Option<SyncOnDrop<'a>>),
}

impl<'a> Operands<'a> {
    /// `k` and `v` are the pools (or contiguous rows) the plan's page table addresses.
    pub fn new<T: KvDType>(
        stream: &'a CudaStream,
        q: &'a impl DevicePtr<T>,
        k: &'a impl DevicePtr<T>,
        v: &'a impl DevicePtr<T>,
        out: &'a mut impl DevicePtrMut<T>,
        lse: Option<&'a mut CudaSlice<f32>>,
    ) -> Self {
        let (q, g0) = q.device_ptr(stream);
        let (k_pages, g1) = k.device_ptr(stream);
        let (v_pages, g2) = v.device_ptr(stream);
        let (out, g3) = out.device_ptr_mut(stream);
        let (lse, g4) = optional_ptr_mut(stream, lse);
        Operands { addresses: Addresses { q, k_pages, v_pages, out, lse }, _guards: ([g0, g1, g2, g3], g4) }
    }
}

/// The address of an optional output (0 when absent) and its stream-ordering guard.
pub(crate) fn optional_ptr_mut<'a>(
    stream: &'a CudaStream,
    buffer: Option<&'a mut CudaSlice<f32>>,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match buffer {
        Some(b) => {
            let (p, g) = b.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}
