//! Batch decode attention over the paged cache, plan-then-run like FlashInfer's
//! `BatchDecodeWithPagedKVCacheWrapper`: request `i` has one query token per query head and
//! attends over its `kv_len(i)` cached tokens, `out = softmax(sm_scale · q·Kᵀ) · V`, accumulated
//! in f32. `plan` validates, splits long sequences across blocks when the batch alone cannot
//! fill the GPU (flash-decoding; a merge kernel combines the parts by their LSE) and uploads
//! everything; `run` only launches, so it can be captured in a CUDA graph.
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg};

use crate::abi::{DecodeParams, FastDiv, MergeParams, NO_PARTIAL};
use crate::cache::PagedKvCache;
use crate::device::{launch_config, Device};
use crate::dtype::{DType, KvDType};
use crate::error::{Error, Result};
use crate::layout::CacheShape;
use crate::page_table::PageTable;

// SAFETY: plain `#[repr(C)]` data shared with the kernel crate.
unsafe impl DeviceRepr for DecodeParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for MergeParams {}

/// Head dimensions the decode kernels are built for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// Work items shorter than this are never split further.
const MIN_CHUNK: usize = 64;
/// Threads a block aims for.
const BLOCK_THREADS: usize = 128;

/// Run-time options, as FlashInfer's `plan` takes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions {
    /// Multiplies `q · k`; `None` means `1 / √head_dim`.
    pub sm_scale: Option<f32>,
    /// `cap` in `cap · tanh(s / cap)` applied to the scaled logits; 0 for none.
    pub logits_soft_cap: f32,
    /// Keys at positions `≥ kv_len − 1 − window_left` only; −1 for no window.
    pub window_left: i32,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions { sm_scale: None, logits_soft_cap: 0.0, window_left: -1 }
    }
}

/// A validated decode batch with its work split and metadata on the device.
pub struct BatchDecodePlan {
    shape: CacheShape,
    batch_size: usize,
    num_qo_heads: usize,
    sm_scale: f32,
    logits_soft_cap: f32,
    /// Blocks: work items × KV heads × head tiles.
    grid: (u32, u32, u32),
    heads_per_block: u32,
    token_lanes: u32,
    kv_indptr: CudaSlice<u32>,
    kv_indices: CudaSlice<u32>,
    work: [CudaSlice<u32>; 4],
    merge_rows: u32,
    merge_indptr: CudaSlice<u32>,
    merge_request: CudaSlice<u32>,
    partial_out: CudaSlice<f32>,
    partial_lse: CudaSlice<f32>,
}

/// Thread layout for `head_dim` and a group of `group_size` query heads:
/// `(heads_per_block, token_lanes)`, with whole warps.
fn thread_layout(head_dim: usize, group_size: usize) -> (usize, usize) {
    let lanes = head_dim / 8;
    let heads = group_size.min((256 / lanes).max(1));
    let mut token_lanes = (BLOCK_THREADS / (lanes * heads)).max(1);
    while !(lanes * heads * token_lanes).is_multiple_of(32) {
        token_lanes += 1;
    }
    (heads, token_lanes)
}

impl BatchDecodePlan {
    /// Plans decode for the batch in `table` over a cache of `shape`, with `num_qo_heads` query
    /// heads (a multiple of `shape.num_kv_heads`).
    pub fn new(
        device: &Device,
        shape: &CacheShape,
        num_qo_heads: usize,
        table: &PageTable,
        options: DecodeOptions,
    ) -> Result<Self> {
        shape.validate(DType::F16)?;
        table.validate(shape.page_size, shape.num_pages)?;
        if !HEAD_DIMS.contains(&shape.head_dim) {
            return Err(Error::UnsupportedHeadDim { head_dim: shape.head_dim, supported: &HEAD_DIMS });
        }
        if num_qo_heads == 0 || !num_qo_heads.is_multiple_of(shape.num_kv_heads) {
            return Err(Error::GroupSize { num_qo_heads, num_kv_heads: shape.num_kv_heads });
        }
        let sm_scale = options.sm_scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
        if !sm_scale.is_finite() || !options.logits_soft_cap.is_finite() || options.logits_soft_cap < 0.0 {
            return Err(Error::BadOption { what: "sm_scale and logits_soft_cap must be finite, the cap ≥ 0" });
        }
        if options.window_left < -1 {
            return Err(Error::BadOption { what: "window_left must be −1 (none) or ≥ 0" });
        }
        let group_size = num_qo_heads / shape.num_kv_heads;
        let (heads_per_block, token_lanes) = thread_layout(shape.head_dim, group_size);
        let head_tiles = group_size.div_ceil(heads_per_block);

        // Each request's key range, then the split: enough items to give every SM several blocks.
        let ranges: Vec<(usize, usize)> = table
            .kv_lens(shape.page_size)
            .into_iter()
            .map(|len| match options.window_left {
                -1 => (0, len),
                w => (len.saturating_sub(w as usize + 1), len),
            })
            .collect();
        let sms = device.multiprocessor_count()?;
        let blocks_per_item = shape.num_kv_heads * head_tiles;
        let target_items = (sms * 16).div_ceil(blocks_per_item).max(1);
        let total: usize = ranges.iter().map(|(lo, hi)| hi - lo).sum();
        let chunk = if ranges.len() >= target_items { usize::MAX } else { total.div_ceil(target_items).max(MIN_CHUNK) };

        let mut work: [Vec<u32>; 4] = Default::default();
        let (mut merge_indptr, mut merge_request) = (vec![0u32], Vec::new());
        for (request, &(lo, hi)) in ranges.iter().enumerate() {
            let parts = (hi - lo).div_ceil(chunk).max(1);
            for part in 0..parts {
                let start = lo + part * (hi - lo) / parts;
                let end = lo + (part + 1) * (hi - lo) / parts;
                let slot = if parts == 1 { NO_PARTIAL } else { merge_indptr[merge_indptr.len() - 1] + part as u32 };
                for (list, value) in work.iter_mut().zip([request as u32, start as u32, end as u32, slot]) {
                    list.push(value);
                }
            }
            if parts > 1 {
                merge_indptr.push(merge_indptr[merge_indptr.len() - 1] + parts as u32);
                merge_request.push(request as u32);
            }
        }
        let slots = merge_indptr[merge_indptr.len() - 1] as usize;
        let nonempty = |v: &[u32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        let [w0, w1, w2, w3] = &work;
        Ok(BatchDecodePlan {
            shape: *shape,
            batch_size: table.batch_size(),
            num_qo_heads,
            sm_scale,
            logits_soft_cap: options.logits_soft_cap,
            grid: (work[0].len() as u32, shape.num_kv_heads as u32, head_tiles as u32),
            heads_per_block: heads_per_block as u32,
            token_lanes: token_lanes as u32,
            kv_indptr: device.upload(&table.kv_indptr)?,
            kv_indices: device.upload(&nonempty(&table.kv_indices))?,
            work: [device.upload(w0)?, device.upload(w1)?, device.upload(w2)?, device.upload(w3)?],
            merge_rows: merge_request.len() as u32,
            merge_indptr: device.upload(&merge_indptr)?,
            merge_request: device.upload(&nonempty(&merge_request))?,
            partial_out: device.alloc_zeros((slots * num_qo_heads * shape.head_dim).max(1))?,
            partial_lse: device.alloc_zeros((slots * num_qo_heads).max(1))?,
        })
    }

    /// Elements of `q` and `out`: `batch × num_qo_heads × head_dim`.
    pub fn qo_elems(&self) -> usize {
        self.batch_size * self.num_qo_heads * self.shape.head_dim
    }

    /// Blocks of the decode launch and rows of the merge launch (0: nothing was split).
    pub fn launch_shape(&self) -> ((u32, u32, u32), u32) {
        (self.grid, self.merge_rows)
    }

    /// Attention of `q` (`[batch][num_qo_heads][head_dim]`) over layer `layer` of `cache`, into
    /// `out` (same shape) and, if given, the base-2 LSE `log2 Σ exp(s)` per (request, head) into
    /// `lse` (`[batch][num_qo_heads]`, −∞ for an empty sequence). Only launches, on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: KvDType>(
        &self,
        device: &Device,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        cache: &PagedKvCache<T>,
        layer: usize,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        if *cache.shape() != self.shape {
            return Err(Error::ShapeMismatch { planned: self.shape, got: *cache.shape() });
        }
        let dtype = match T::DTYPE {
            DType::F16 => 0,
            DType::BF16 => 1,
            DType::F32 => return Err(Error::UnsupportedDType { what: "decode attention", dtype: "f32" }),
        };
        for (what, got, expected) in [
            ("q", q.len(), self.qo_elems()),
            ("out", out.len(), self.qo_elems()),
            (
                "lse",
                lse.as_ref().map_or(self.batch_size * self.num_qo_heads, |l| l.len()),
                self.batch_size * self.num_qo_heads,
            ),
        ] {
            if got != expected {
                return Err(Error::BufferLength { what, got, expected });
            }
        }
        let pools = cache.layer(layer)?;
        if self.grid.0 == 0 {
            return Ok(());
        }
        let s = &self.shape;
        let (slot_stride, head_stride) = s.strides();
        let (q_ptr, _g0) = q.device_ptr(stream);
        let (k_pages, _g1) = pools.k.device_ptr(stream);
        let (v_pages, _g2) = pools.v.device_ptr(stream);
        let (kv_indptr, _g3) = self.kv_indptr.device_ptr(stream);
        let (kv_indices, _g4) = self.kv_indices.device_ptr(stream);
        let (w0, _g5) = self.work[0].device_ptr(stream);
        let (w1, _g6) = self.work[1].device_ptr(stream);
        let (w2, _g7) = self.work[2].device_ptr(stream);
        let (w3, _g8) = self.work[3].device_ptr(stream);
        let (out_ptr, _g9) = out.device_ptr_mut(stream);
        let (lse_ptr, _g10) = match lse {
            Some(l) => {
                let (p, g) = l.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (partial_out, _g11) = self.partial_out.device_ptr(stream);
        let (partial_lse, _g12) = self.partial_lse.device_ptr(stream);
        let params = DecodeParams {
            q: q_ptr,
            k_pages,
            v_pages,
            kv_indptr,
            kv_indices,
            work_request: w0,
            work_start: w1,
            work_end: w2,
            work_partial: w3,
            out: out_ptr,
            lse: lse_ptr,
            partial_out,
            partial_lse,
            page_size: FastDiv::new(s.page_size as u32),
            page_elems: s.page_elems() as u32,
            slot_stride: slot_stride as u32,
            head_stride: head_stride as u32,
            num_qo_heads: self.num_qo_heads as u32,
            group_size: (self.num_qo_heads / s.num_kv_heads) as u32,
            heads_per_block: self.heads_per_block,
            token_lanes: self.token_lanes,
            sm_scale: self.sm_scale,
            logits_soft_cap: self.logits_soft_cap,
        };
        let lanes = (s.head_dim / 8) as u32;
        let threads = lanes * self.heads_per_block * self.token_lanes;
        let slots = self.heads_per_block * self.token_lanes;
        let smem = slots * (2 + s.head_dim as u32) * 4;
        let dim_index = HEAD_DIMS.iter().position(|&d| d == s.head_dim).unwrap_or(0);
        let mut cfg = launch_config((self.grid.0, self.grid.1), threads, smem);
        cfg.grid_dim.2 = self.grid.2;
        // SAFETY: the table was validated against this shape when planning; q, out and lse were
        // checked against the plan's batch and heads; the work items address only positions
        // below each request's kv_len; partial slots were sized by the plan; every buffer lives
        // until after the launch (guards above).
        unsafe { stream.launch_builder(&device.kernels.decode[dtype][dim_index]).arg(&params).launch(cfg) }
            .map_err(Error::driver("launching batch decode"))?;
        if self.merge_rows > 0 {
            let (merge_indptr, _g13) = self.merge_indptr.device_ptr(stream);
            let (merge_request, _g14) = self.merge_request.device_ptr(stream);
            let params = MergeParams {
                partial_out,
                partial_lse,
                merge_indptr,
                merge_request,
                out: out_ptr,
                lse: lse_ptr,
                num_qo_heads: self.num_qo_heads as u32,
                head_dim: s.head_dim as u32,
            };
            let cfg = launch_config((self.merge_rows, self.num_qo_heads as u32), s.head_dim.min(128) as u32, 0);
            // SAFETY: merge rows and slots come from the plan and match the partial buffers;
            // out and lse were checked above.
            unsafe { stream.launch_builder(&device.kernels.merge_states[dtype]).arg(&params).launch(cfg) }
                .map_err(Error::driver("launching the decode merge"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_layout_uses_whole_warps_for_every_group_size() {
        for head_dim in HEAD_DIMS {
            for group in 1..=64 {
                let (heads, token_lanes) = thread_layout(head_dim, group);
                let threads = head_dim / 8 * heads * token_lanes;
                assert!(threads.is_multiple_of(32) && threads <= 1024, "{head_dim} {group}: {threads}");
                assert!(heads <= group && heads >= 1);
            }
        }
    }
}
