//! Cascade (shared-prefix) decode: requests that share a prefix of pages (a forked family: a
//! system prompt, few-shot examples, a parallel-sampling parent) read it once for all of them.
//! Level 0 attends each family's queries together over the family's shared pages (batch
//! prefill without a mask: one "request" per family whose queries are its members'); level 1
//! attends each request over its own pages (batch decode); the two states merge by their LSE.
//! The levels are independent until the merge, so they run side by side: the shared level on a
//! stream of the plan's own, forked from the caller's and joined back before the merge (CUDA
//! graph capture follows the fork and the join), so its compute-bound blocks and the own
//! level's bandwidth-bound ones fill the GPU together.
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::decode::{BatchDecodePlan, DecodeOptions};
use super::merge::{merge_state_in_place, StateShape};
use super::prefill::{BatchPrefillPlan, PrefillOptions};
use crate::cache::allocator::{SeqId, SequenceAllocator};
use crate::cache::layout::CacheShape;
use crate::cache::page_table::PageTable;
use crate::cache::paged::PagedKvCache;
use crate::error::{Error, Result};
use crate::plan::{check_lengths, head_scales_on};
use crate::runtime::device::Device;
use crate::runtime::dtype::KvDType;

/// A batch's two levels: `shared` has one sequence per family (its shared, full pages),
/// `unique` one per request (its pages after the shared ones), and `members` says which
/// requests (consecutive, in batch order) form each family: `members[f]..members[f + 1]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CascadeLevels {
    /// Level 0: one entry per family.
    pub shared: PageTable,
    /// Level 1: one entry per request.
    pub unique: PageTable,
    /// `families + 1` entries: family `f` is requests `members[f]..members[f + 1]`.
    pub members: Vec<u32>,
}

impl SequenceAllocator {
    /// The cascade layout of `families` (each a list of sequences, typically forked from one
    /// parent), requests numbered family after family: level 0 holds the longest run of full
    /// pages every member of a family has at the same positions, level 1 each sequence's
    /// remaining pages. A family of one shares nothing.
    pub fn cascade_levels(&self, families: &[Vec<SeqId>]) -> Result<CascadeLevels> {
        let ps = self.page_size();
        let mut levels = CascadeLevels {
            shared: PageTable { kv_indptr: vec![0], ..Default::default() },
            unique: PageTable { kv_indptr: vec![0], ..Default::default() },
            members: vec![0],
        };
        for family in families {
            let table = self.page_table(family)?;
            let pages = |i: usize| &table.kv_indices[table.kv_indptr[i] as usize..table.kv_indptr[i + 1] as usize];
            let lens = table.kv_lens(ps);
            // Full pages only: a partly filled last page may still change (copy-on-write).
            let full = |i: usize| lens[i] / ps;
            let mut shared = if family.len() > 1 { (0..family.len()).map(full).min().unwrap_or(0) } else { 0 };
            if let Some(first) = (0..shared).find(|&p| (1..family.len()).any(|i| pages(i)[p] != pages(0)[p])) {
                shared = first;
            }
            levels.shared.kv_indices.extend(&pages(0)[..shared]);
            levels.shared.kv_indptr.push(levels.shared.kv_indices.len() as u32);
            levels.shared.kv_last_page_len.push(if shared == 0 { 0 } else { ps as u32 });
            for (i, &len) in lens.iter().enumerate() {
                levels.unique.kv_indices.extend(&pages(i)[shared..]);
                levels.unique.kv_indptr.push(levels.unique.kv_indices.len() as u32);
                let rest = len - shared * ps;
                levels.unique.kv_last_page_len.push(if rest == 0 { 0 } else { table.kv_last_page_len[i] });
            }
            levels.members.push(levels.members[levels.members.len() - 1] + family.len() as u32);
        }
        Ok(levels)
    }
}

/// Decode for a batch in cascade layout: `run` launches level 0 (on the plan's side stream),
/// level 1 (on the caller's stream) and the merge. The plan holds the shared level's output and
/// LSEs as scratch; `run` takes `&mut self`, and the scratch is tracked, so runs of one plan on
/// two streams are ordered.
///
/// ```no_run
/// use ferrinfer::{f16, CacheShape, CascadeDecodePlan, DecodeOptions, Device, KvLayout, PagedKvCache, SequenceAllocator};
///
/// let dev = Device::new(0)?;
/// let shape = CacheShape { num_pages: 4096, page_size: 16, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
/// let cache = PagedKvCache::<f16>::new(&dev, shape, 1)?;
/// let mut alloc = SequenceAllocator::new(shape.num_pages, shape.page_size)?;
/// let parent = alloc.create();
/// alloc.reserve(parent, 8192)?; // the shared prompt (its K/V written by an append)
/// let samples: Vec<_> = (0..8).map(|_| alloc.fork(parent)).collect::<Result<_, _>>()?;
/// let levels = alloc.cascade_levels(&[samples])?;
/// let mut plan = CascadeDecodePlan::<f16>::new(&dev, &shape, 32, &levels, DecodeOptions::default())?;
/// let q = dev.alloc_zeros::<f16>(plan.qo_elems())?;
/// let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
/// plan.run(dev.stream(), &q, &cache, 0, &mut out, None)?;
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct CascadeDecodePlan<T: KvDType> {
    shared: BatchPrefillPlan,
    unique: BatchDecodePlan,
    state: StateShape,
    rows: usize,
    shared_out: CudaSlice<T>,
    shared_lse: CudaSlice<f32>,
    unique_lse: CudaSlice<f32>,
    /// The shared level's stream, and the events that fork it from the caller's and join it back.
    side: Arc<CudaStream>,
    fork: CudaEvent,
    join: CudaEvent,
}

impl<T: KvDType> CascadeDecodePlan<T> {
    /// Plans both levels of `levels` over a cache of `shape` for `num_qo_heads` query heads.
    /// The soft cap and scale apply to both levels; a window is not supported (it would cut
    /// the shared level per request).
    pub fn new(
        device: &Device,
        shape: &CacheShape,
        num_qo_heads: usize,
        levels: &CascadeLevels,
        options: DecodeOptions,
    ) -> Result<Self> {
        let (shared_options, rows) = Self::check(num_qo_heads, levels, options)?;
        let shared =
            BatchPrefillPlan::new(device, shape, num_qo_heads, &levels.members, &levels.shared, shared_options)?;
        let unique = BatchDecodePlan::new(device, shape, num_qo_heads, &levels.unique, options)?;
        let event = || device.context().new_event(None).map_err(Error::driver("creating an event"));
        Ok(CascadeDecodePlan {
            shared,
            unique,
            state: StateShape { heads: num_qo_heads, head_dim: shape.head_dim },
            rows,
            shared_out: device.alloc_zeros(rows * shape.head_dim)?,
            shared_lse: device.alloc_zeros(rows)?,
            unique_lse: device.alloc_zeros(rows)?,
            side: device.new_stream()?,
            fork: event()?,
            join: event()?,
        })
    }

    /// Plans the next batch into this plan's buffers (growing them if it is larger), without
    /// waiting for the GPU. On an invalid batch nothing changes.
    pub fn replan(
        &mut self,
        shape: &CacheShape,
        num_qo_heads: usize,
        levels: &CascadeLevels,
        options: DecodeOptions,
    ) -> Result<()> {
        let (shared_options, rows) = Self::check(num_qo_heads, levels, options)?;
        self.shared.replan(shape, num_qo_heads, &levels.members, &levels.shared, shared_options)?;
        self.unique.replan(shape, num_qo_heads, &levels.unique, options)?;
        let device = self.unique.device().clone();
        if self.shared_out.len() != rows * shape.head_dim {
            self.shared_out = device.alloc_zeros(rows * shape.head_dim)?;
        }
        if self.rows != rows {
            (self.shared_lse, self.unique_lse) = (device.alloc_zeros(rows)?, device.alloc_zeros(rows)?);
        }
        self.state = StateShape { heads: num_qo_heads, head_dim: shape.head_dim };
        self.rows = rows;
        Ok(())
    }

    /// The shared level's options and the rows of the batch, after checking `levels`.
    fn check(num_qo_heads: usize, levels: &CascadeLevels, options: DecodeOptions) -> Result<(PrefillOptions, usize)> {
        if options.window_left != -1 {
            return Err(Error::BadOption { what: "cascade decode takes no window (window_left must be −1)" });
        }
        let batch = levels.unique.batch_size();
        if levels.members.len() != levels.shared.batch_size() + 1 || levels.members.last() != Some(&(batch as u32)) {
            return Err(Error::IndptrLength {
                what: "cascade members",
                got: levels.members.len(),
                batch: levels.shared.batch_size(),
            });
        }
        let shared = PrefillOptions {
            causal: false,
            sm_scale: options.sm_scale,
            logits_soft_cap: options.logits_soft_cap,
            window_left: -1,
            kv_dtype: options.kv_dtype,
            head_dim_vo: None,
        };
        Ok((shared, batch * num_qo_heads))
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        self.unique.device()
    }

    /// Elements of `q` and `out`: `batch × num_qo_heads × head_dim`.
    pub fn qo_elems(&self) -> usize {
        self.unique.qo_elems()
    }

    /// Decode of `q` (`[batch][num_qo_heads][head_dim]`, requests in `levels`' order) over layer
    /// `layer`: both levels and their merge into `out` and, if given, the base-2 LSE over all of
    /// each request's keys into `lse` (`[batch][num_qo_heads]`). Only launches, on `stream` and
    /// the plan's side stream, which `stream` waits for before the merge. The cache holds `T`
    /// or the 8-bit type the plan's options name (as [`BatchDecodePlan::run`]).
    pub fn run<C: KvDType>(
        &mut self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        cache: &PagedKvCache<C>,
        layer: usize,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        self.run_with_sinks(stream, q, cache, layer, None, out, lse)
    }

    /// [`run`](Self::run) with attention sinks (`[num_qo_heads]`, as
    /// [`BatchDecodePlan::run_with_sinks`]): the unique level's decode folds them in and the
    /// shared level's stays sink-free, so the merge counts each sink once.
    #[allow(clippy::too_many_arguments)]
    pub fn run_with_sinks<C: KvDType>(
        &mut self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        cache: &PagedKvCache<C>,
        layer: usize,
        sinks: Option<&dyn DevicePtr<f32>>,
        out: &mut impl DevicePtrMut<T>,
        lse: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        check_lengths(&[("lse", lse.as_ref().map_or(self.rows, |l| l.len()), self.rows)])?;
        let device = self.unique.device().clone();
        device.check_stream(stream)?;
        // Level 0 on the side stream, after everything queued on `stream` so far.
        self.fork.record(stream).map_err(Error::driver("recording an event"))?;
        self.side.wait(&self.fork).map_err(Error::driver("ordering the side stream"))?;
        self.shared.run(&self.side, q, cache, layer, &mut self.shared_out, Some(&mut self.shared_lse))?;
        let lse: &mut dyn DevicePtrMut<f32> = match lse {
            Some(l) => l,
            None => &mut self.unique_lse,
        };
        self.unique.run_with_sinks(stream, q, cache, layer, sinks, out, Some(&mut *lse))?;
        self.join.record(&self.side).map_err(Error::driver("recording an event"))?;
        stream.wait(&self.join).map_err(Error::driver("joining the side stream"))?;
        // What level 0 read, `stream` now reads too: cudarc's read events of q, the pools and
        // the head scales (recorded per stream) then cover both levels for whoever writes them
        // next.
        let (pools, dequant) = (cache.layer(layer)?, cache.layer_dequant(layer)?);
        let _reads = (q.device_ptr(stream).1, pools.k().device_ptr(stream).1, pools.v().device_ptr(stream).1);
        let _head_scales = head_scales_on(dequant.heads, stream).1;
        merge_state_in_place(&device, stream, self.state, out, lse, &self.shared_out, &self.shared_lse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forked_family_shares_its_full_common_pages() {
        let mut alloc = SequenceAllocator::new(64, 4).unwrap();
        let parent = alloc.create();
        alloc.reserve(parent, 10).unwrap(); // pages p0 p1 p2(2 of 4)
        let a = alloc.fork(parent).unwrap();
        let b = alloc.fork(parent).unwrap();
        alloc.reserve(a, 5).unwrap(); // copies p2, grows
        alloc.reserve(b, 1).unwrap();
        let solo = alloc.create();
        alloc.reserve(solo, 3).unwrap();
        let levels = alloc.cascade_levels(&[vec![parent, a, b], vec![solo]]).unwrap();
        assert_eq!(levels.members, [0, 3, 4]);
        // Family 0 shares its two full pages; the solo request shares nothing.
        assert_eq!(levels.shared.kv_lens(4), [8, 0]);
        assert_eq!(levels.unique.kv_lens(4), [2, 7, 3, 3]);
        levels.shared.validate(4, 64).unwrap();
        levels.unique.validate(4, 64).unwrap();
        // Each request's two levels are its whole sequence.
        let whole = alloc.page_table(&[parent, a, b]).unwrap();
        for r in 0..3 {
            let own =
                &levels.unique.kv_indices[levels.unique.kv_indptr[r] as usize..levels.unique.kv_indptr[r + 1] as usize];
            let all = &whole.kv_indices[whole.kv_indptr[r] as usize..whole.kv_indptr[r + 1] as usize];
            assert_eq!([&levels.shared.kv_indices[..2], own].concat(), all);
        }
    }
}
