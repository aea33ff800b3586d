//! Multi-head latent attention (DeepSeek-V2/V3/R1, Kimi-K2) over the paged latent cache,
//! plan-then-run like FlashInfer's `BatchMLAPagedAttentionWrapper`, with the weights absorbed:
//! query row `(token, head)` has `q_nope` (512 dims) and `q_pe` (64 dims), its logits over the
//! request's cached tokens are `sm_scale · (q_nope·ckvᵀ + q_pe·kpeᵀ)` and its output is
//! `softmax · ckv` (512 dims), with the base-2 LSE. Decode is one query token a request;
//! several (speculative tokens, chunked prefill) may be causal.
//!
//! Every head reads the same keys, so the plan cuts each request's packed rows
//! (`token · heads + head`) into 64-row tiles as prefill does with one KV head, and, when the
//! tiles alone cannot fill the GPU, splits their keys into parts that a second kernel merges
//! (`run` then makes two launches, both captured by a CUDA graph alike).
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::prefill::{check_queries, row_tiles, split_tiles, PrefillOptions};
use super::split_chunk;
use crate::cache::mla::{MlaCacheShape, MlaKvCache};
use crate::cache::page_table::PageTable;
use crate::error::{Error, Result};
use crate::plan::{as_bytes, check_lengths, paged_cache_params, PlanCore, ScratchLayout};
use crate::runtime::abi::{
    FastDiv, MlaMergeParams, MlaParams, PrefillParams, PrefillWorkItem, SplitScratch, MLA_CKV_DIM,
    MLA_HOPPER_TILE_TOKENS, MLA_KPE_DIM, MLA_MAX_PARTS, MLA_MERGE_ROWS, MLA_ROWS, MLA_TILE_TOKENS, NO_PARTIAL,
};
use crate::runtime::device::{launch_config, Device, LaunchStream};
use crate::runtime::dtype::{DType, KvDType};

/// Run-time options of an MLA plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlaOptions {
    /// Multiplies the logits; FlashInfer's `sm_scale`, required there too: with absorbed
    /// weights it is the model's, `1 / √(qk_nope_head_dim + qk_rope_head_dim)` (DeepSeek-V3:
    /// `1 / √192`, times its YaRN factor), not anything the 576 dims here imply.
    pub sm_scale: f32,
    /// Query `j` of a request sees keys up to its position `kv_len − qo_len + j` only.
    pub causal: bool,
    /// The element type of the cache the plan runs over (FlashInfer's `kv_data_type`): `None`
    /// for the queries' own type; [`DType::E4M3`] or [`DType::E5M2`] for an 8-bit latent cache.
    /// A run over a cache of another type is an error.
    pub kv_dtype: Option<DType>,
}

/// Keys a part of a split row tile takes at least: a part also loads its 64 rows of queries
/// (72 KiB, as much as 64 keys), so shorter parts would mostly load queries.
const MIN_PART_KEYS: usize = 4 * MLA_TILE_TOKENS as usize;

/// An MLA batch's work split: what a plan uploads.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaSplit {
    /// One block each: a row tile (64 packed rows of a request), or a part of a split one.
    pub work: Vec<PrefillWorkItem>,
    /// Each split row tile's first part: one merge per tile.
    pub merge_tiles: Vec<PrefillWorkItem>,
    /// Partial slots of split row tiles (each `MLA_ROWS` rows of 512 16-bit values).
    pub slots: usize,
    /// Query tokens of the batch.
    pub total_q: usize,
}

/// The work split of an MLA batch (`num_heads` query heads, request `i` with query tokens
/// `qo_indptr[i]..qo_indptr[i + 1]` over the keys of `table`) on a device of `sms`
/// multiprocessors holding `blocks_per_sm` MLA blocks each, worked out without a GPU: the
/// validation and every work item (for plans, and for testing the planner).
pub fn mla_split(
    shape: &MlaCacheShape,
    num_heads: usize,
    qo_indptr: &[u32],
    table: &PageTable,
    options: MlaOptions,
    sms: usize,
    blocks_per_sm: usize,
) -> Result<MlaSplit> {
    shape.validate()?;
    if num_heads == 0 {
        return Err(Error::ZeroDimension { what: "num_heads" });
    }
    if !options.sm_scale.is_finite() {
        return Err(Error::BadOption { what: "sm_scale must be finite" });
    }
    table.validate(shape.page_size, shape.num_pages)?;
    let (kv_lens, total_q) = check_queries(table, shape.page_size, qo_indptr, num_heads, options.causal)?;
    let tile_options = PrefillOptions { causal: options.causal, ..PrefillOptions::DEFAULT };
    let tiles = row_tiles(qo_indptr, &kv_lens, &table.kv_indptr, num_heads, MLA_ROWS as usize, &tile_options);
    let spans: Vec<usize> = tiles.iter().map(|t| (t.kv_end - t.kv_start) as usize).collect();
    let capacity = sms * blocks_per_sm;
    let chunk =
        split_chunk(&spans, MLA_TILE_TOKENS, 1, capacity, MLA_MAX_PARTS as usize).map(|chunk| chunk.max(MIN_PART_KEYS));
    let (work, slots, _) = split_tiles(tiles, chunk, 1);
    let merge_tiles: Vec<PrefillWorkItem> =
        work.iter().filter(|w| w.slot != NO_PARTIAL && w.slot == w.first_slot).copied().collect();
    if work.len() > i32::MAX as usize {
        return Err(Error::TooLarge {
            what: "MLA blocks (row tiles and parts)",
            value: work.len(),
            max: i32::MAX as usize,
        });
    }
    Ok(MlaSplit { work, merge_tiles, slots, total_q })
}

/// What an MLA launch needs besides its operands.
struct MlaWork {
    shape: MlaCacheShape,
    num_heads: usize,
    total_q: usize,
    options: MlaOptions,
    blocks: u32,
    merge_tiles: u32,
}

/// A validated MLA batch with its work split and metadata on the device (FlashInfer's
/// `BatchMLAPagedAttentionWrapper.plan`): any page size, any number of query heads (16 to 128
/// in the models that use it), f16 or bf16 queries over a latent cache of their type or of
/// e4m3/e5m2 (`MlaOptions::kv_dtype`).
///
/// The plan holds its [`Device`] and its scratch (split tiles' partial outputs): `run` takes
/// `&mut self` and tracks the scratch as written, so runs of one plan on two streams are
/// ordered; plan once per concurrent batch. `replan` re-plans the next step into the same
/// buffers without waiting for the GPU; `run` only launches (CUDA-graph safe).
///
/// ```no_run
/// use ferrinfer::{bf16, BatchMlaPlan, Device, MlaCacheShape, MlaKvCache, MlaOptions, PageTable};
///
/// let dev = Device::new(0)?;
/// let shape = MlaCacheShape { num_pages: 1024, page_size: 64 };
/// let cache = MlaKvCache::<bf16>::new(&dev, shape, 1)?;
/// // Two requests decoding one token each, over 100 and 7 cached tokens.
/// let table = PageTable { kv_indptr: vec![0, 2, 3], kv_indices: vec![5, 9, 2], kv_last_page_len: vec![36, 7] };
/// let options = MlaOptions { sm_scale: 1.0 / 192f32.sqrt(), causal: false, kv_dtype: None };
/// let mut plan = BatchMlaPlan::new(&dev, &shape, 128, &[0, 1, 2], &table, options)?;
/// let q_nope = dev.alloc_zeros::<bf16>(plan.q_nope_elems())?; // [2][128][512]
/// let q_pe = dev.alloc_zeros::<bf16>(plan.q_pe_elems())?; // [2][128][64]
/// let mut out = dev.alloc_zeros::<bf16>(plan.out_elems())?; // [2][128][512]
/// plan.run(dev.stream(), &q_nope, &q_pe, &cache, 0, &mut out, None)?;
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct BatchMlaPlan {
    core: PlanCore,
    work: MlaWork,
}

impl BatchMlaPlan {
    /// Plans the batch in `table` (request `i`'s query tokens `qo_indptr[i]..qo_indptr[i + 1]`;
    /// decode: `[0, 1, …, batch]`) over a cache of `shape` with `num_heads` query heads, on
    /// `device`.
    pub fn new(
        device: &Device,
        shape: &MlaCacheShape,
        num_heads: usize,
        qo_indptr: &[u32],
        table: &PageTable,
        options: MlaOptions,
    ) -> Result<Self> {
        let work = MlaWork { shape: *shape, num_heads, total_q: 0, options, blocks: 0, merge_tiles: 0 };
        let mut plan = BatchMlaPlan { core: PlanCore::new(device)?, work };
        plan.replan(shape, num_heads, qo_indptr, table, options)?;
        Ok(plan)
    }

    /// Plans the next batch into this plan's buffers: validates and splits on the host, then
    /// enqueues the metadata's upload on the device's stream without waiting for the GPU. On
    /// an invalid batch nothing changes and the plan stays usable.
    pub fn replan(
        &mut self,
        shape: &MlaCacheShape,
        num_heads: usize,
        qo_indptr: &[u32],
        table: &PageTable,
        options: MlaOptions,
    ) -> Result<()> {
        let device = self.core.device();
        // The kernels' element types share one geometry: f16's occupancy serves both.
        let blocks_per_sm = device.kernels().mla(DType::F16, DType::F16).map_or(1, |(k, _)| k.blocks_per_sm);
        let split =
            mla_split(shape, num_heads, qo_indptr, table, options, device.multiprocessor_count(), blocks_per_sm)?;
        let scratch = ScratchLayout {
            counters: 0,
            partial_rows: split.slots * MLA_ROWS as usize,
            // 16-bit partial rows: half a row of f32.
            head_dim: MLA_CKV_DIM as usize / 2,
        };
        let parts = [as_bytes(&table.kv_indices), as_bytes(&split.work), as_bytes(&split.merge_tiles)];
        self.core.replan(&parts, scratch)?;
        self.work = MlaWork {
            shape: *shape,
            num_heads,
            total_q: split.total_q,
            options,
            blocks: split.work.len() as u32,
            merge_tiles: split.merge_tiles.len() as u32,
        };
        Ok(())
    }

    /// The device the plan runs on.
    pub fn device(&self) -> &Device {
        self.core.device()
    }

    /// Elements of `q_nope` and of the output: `total_q × num_heads × 512`.
    pub fn q_nope_elems(&self) -> usize {
        self.lse_elems() * MLA_CKV_DIM as usize
    }

    /// Elements of `q_pe`: `total_q × num_heads × 64`.
    pub fn q_pe_elems(&self) -> usize {
        self.lse_elems() * MLA_KPE_DIM as usize
    }

    /// Elements of the output: `total_q × num_heads × 512`.
    pub fn out_elems(&self) -> usize {
        self.q_nope_elems()
    }

    /// Entries of the LSE: `total_q × num_heads`.
    pub fn lse_elems(&self) -> usize {
        self.work.total_q * self.work.num_heads
    }

    /// Blocks of the attention launch and split row tiles (merged by a second launch).
    #[cfg(feature = "internals")]
    pub fn launch_shape(&self) -> (u32, u32) {
        (self.work.blocks, self.work.merge_tiles)
    }

    /// Attention of `q_nope` (`[total_q][num_heads][512]`) and `q_pe` (`[total_q][num_heads][64]`)
    /// over layer `layer` of `cache`, into `out` (`[total_q][num_heads][512]`) and, if given,
    /// the base-2 LSE `log2 Σ exp(s)` per (token, head) into `lse` (`[total_q][num_heads]`; −∞
    /// and a zero output for a row without keys). Only launches, on `stream` (a stream of the
    /// plan's device); every buffer is checked against the plan first.
    ///
    /// The cache holds the queries' type `T`, or, for a plan made with an 8-bit `kv_dtype`,
    /// that type (`C`), read as its values times the layer's scale (the LSE is that of the
    /// scaled logits).
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: KvDType, C: KvDType>(
        &mut self,
        stream: &CudaStream,
        q_nope: &impl DevicePtr<T>,
        q_pe: &impl DevicePtr<T>,
        cache: &MlaKvCache<C>,
        layer: usize,
        out: &mut impl DevicePtrMut<T>,
        mut lse: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        let device = self.core.device().clone();
        device.check_stream(stream)?;
        device.check_buffer("q_nope", q_nope)?;
        device.check_buffer("q_pe", q_pe)?;
        device.check_buffer("out", out)?;
        if let Some(lse) = &lse {
            device.check_buffer("lse", &**lse)?;
        }
        let planned = self.work.options.kv_dtype.unwrap_or(T::DTYPE);
        if C::DTYPE != planned {
            return Err(Error::KvDTypeMismatch { planned: planned.name(), got: C::DTYPE.name() });
        }
        let (portable, merge) = device.kernels().mla(T::DTYPE, C::DTYPE)?;
        // On Hopper (compute capability 9.0) a 16-bit cache takes the `wgmma` kernel: same
        // parameters, work items and partials.
        let hopper = if C::DTYPE == T::DTYPE { device.mla_hopper(T::DTYPE) } else { None };
        let attention = hopper.unwrap_or(portable);
        let rows = self.lse_elems();
        check_lengths(&[
            ("q_nope", q_nope.len(), self.q_nope_elems()),
            ("q_pe", q_pe.len(), self.q_pe_elems()),
            ("out", out.len(), self.out_elems()),
            ("lse", lse.as_ref().map_or(rows, |l| l.len()), rows),
        ])?;
        let work = &self.work;
        let (ckv, kpe, scale) = cache.pools_for(&device, &work.shape, layer)?;
        if work.blocks == 0 {
            return Ok(());
        }
        let (q_nope, _g0) = q_nope.device_ptr(stream);
        let (q_pe, _g1) = q_pe.device_ptr(stream);
        let (ckv, _g2) = ckv.device_ptr(stream);
        let (kpe, _g3) = kpe.device_ptr(stream);
        let (out, _g4) = out.device_ptr_mut(stream);
        let (lse, _g5) = match lse.as_mut() {
            Some(l) => {
                let (p, g) = l.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (parts, split, _g6) = self.core.buffers_on(stream)?;
        let addresses = MlaAddresses {
            q_nope,
            q_pe,
            ckv,
            kpe,
            kv_indices: parts[0],
            work: parts[1],
            merge_tiles: parts[2],
            out,
            lse,
            split,
        };
        let (mut params, merge_params) = mla_params(&work.shape, work.num_heads, &work.options, scale, &addresses);
        // The Hopper kernel's producer issues TMA boxes where every tile is one box a slab
        // (page sizes of whole tiles; smaller boxes cost more than `cp.async`, docs/perf.md).
        let whole_tiles = work.shape.page_size.is_multiple_of(MLA_HOPPER_TILE_TOKENS as usize);
        let maps = cache.tensor_maps(layer).filter(|_| hopper.is_some() && whole_tiles);
        let _g7 = maps.as_ref().map(|maps| {
            let (at, guard) = maps.device_ptr(stream);
            params.tensor_maps = at;
            params.pool_rows = (work.shape.num_pages * work.shape.page_size) as u32;
            guard
        });
        let cfg = launch_config((work.blocks, 1), attention.threads, attention.smem_bytes);
        // SAFETY: the plan validated its page table against the shape, so the kernel reads the
        // pools only at tokens below `num_pages × page_size` (the pools were checked to have
        // this shape's lengths and to live in this context; the cache's TMA maps span exactly
        // its pools, and a box past them reads zeros); it reads q_nope, q_pe and writes
        // out and lse only at the rows its work items name, below `total_q × num_heads` (the
        // checked lengths), and its metadata and scratch inside what the plan uploaded and
        // sized. Every buffer outlives the launch's enqueueing (the guards above).
        unsafe {
            device.launch(
                &attention.function,
                cfg,
                LaunchStream::Cudarc(stream),
                &params,
                "multi-head latent attention",
            )?
        };
        if work.merge_tiles == 0 {
            return Ok(());
        }
        let cfg = launch_config((work.merge_tiles, MLA_ROWS / MLA_MERGE_ROWS), merge.threads, merge.smem_bytes);
        // SAFETY: as above: the merge reads the partials the first launch wrote (stream order,
        // or on sm_90 a programmatic dependency: `mla_merge` waits for the attention grid
        // before its first read of a partial) at the slots of the uploaded tiles, and writes
        // the rows of those tiles.
        unsafe {
            let what = "merging split MLA rows";
            device.launch_dependent(&merge.function, cfg, LaunchStream::Cudarc(stream), &merge_params, what)
        }
    }
}

/// Device addresses of an MLA batch's operands, metadata and scratch.
#[derive(Clone, Copy, Debug)]
pub struct MlaAddresses {
    /// `[total_q][heads][512]` queries.
    pub q_nope: u64,
    /// `[total_q][heads][64]` queries.
    pub q_pe: u64,
    /// The layer's ckv pool.
    pub ckv: u64,
    /// The layer's kpe pool.
    pub kpe: u64,
    /// The page table's `kv_indices`.
    pub kv_indices: u64,
    /// The split's work items ([`MlaSplit::work`]).
    pub work: u64,
    /// The split's merged tiles ([`MlaSplit::merge_tiles`]).
    pub merge_tiles: u64,
    /// `[total_q][heads][512]` output.
    pub out: u64,
    /// `[total_q][heads]` LSE, or 0 for none.
    pub lse: u64,
    /// Partial rows of the split tiles (`MlaSplit::slots × MLA_ROWS` rows of 512 f32).
    pub split: SplitScratch,
}

/// The parameter blocks of an MLA batch's two launches (attention, then the merge of split
/// tiles) over a cache of `shape` whose layer scale is `scale` (1 for a 16-bit cache).
pub fn mla_params(
    shape: &MlaCacheShape,
    num_heads: usize,
    options: &MlaOptions,
    scale: f32,
    a: &MlaAddresses,
) -> (MlaParams, MlaMergeParams) {
    let heads = num_heads as u32;
    let attention = MlaParams {
        attention: PrefillParams {
            q: a.q_nope,
            cache: paged_cache_params(&shape.ckv(), a.ckv, a.kpe, a.kv_indices),
            work: a.work,
            schedule: 0,
            out: a.out,
            lse: a.lse,
            sinks: 0,
            split: a.split,
            num_qo_heads: heads,
            num_kv_heads: 1,
            group_size: FastDiv::new(heads),
            sm_scale: options.sm_scale * scale,
            logits_soft_cap: 0.0,
            window_left: -1,
            causal: options.causal as u32,
            v_scale: scale,
            kv_head_scales: 0,
        },
        q_pe: a.q_pe,
        tensor_maps: 0,
        pool_rows: 0,
        _pad: 0,
    };
    let merge = MlaMergeParams { split: a.split, tiles: a.merge_tiles, out: a.out, lse: a.lse, heads };
    (attention, merge)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(kv_lens: &[usize], page_size: usize) -> PageTable {
        let mut t = PageTable { kv_indptr: vec![0], kv_indices: Vec::new(), kv_last_page_len: Vec::new() };
        for &len in kv_lens {
            let pages = len.div_ceil(page_size);
            let first = t.kv_indices.len();
            t.kv_indices.extend((first..first + pages).map(|p| p as u32));
            t.kv_indptr.push(t.kv_indices.len() as u32);
            t.kv_last_page_len.push(if len == 0 { 0 } else { ((len - 1) % page_size + 1) as u32 });
        }
        t
    }

    const DECODE: MlaOptions = MlaOptions { sm_scale: 0.07, causal: false, kv_dtype: None };

    #[test]
    fn a_full_decode_batch_takes_a_block_per_64_heads_of_a_request_unsplit() {
        let lens = vec![1000; 128];
        let shape = MlaCacheShape { num_pages: 128 * 16, page_size: 64 };
        let qo: Vec<u32> = (0..=128).collect();
        let split = mla_split(&shape, 128, &qo, &table(&lens, 64), DECODE, 132, 1).unwrap();
        assert_eq!((split.work.len(), split.slots, split.merge_tiles.len()), (256, 0, 0));
        assert!(split.work.iter().all(|w| (w.kv_start, w.kv_end, w.qo_len) == (0, 1000, 1)));
        assert_eq!(split.work.iter().filter(|w| w.first_row == 64).count(), 128);
    }

    #[test]
    fn one_long_request_is_split_to_fill_the_gpu_and_each_tile_merged_once() {
        let shape = MlaCacheShape { num_pages: 600, page_size: 64 };
        let split = mla_split(&shape, 128, &[0, 1], &table(&[32768], 64), DECODE, 132, 1).unwrap();
        // Two row tiles of 64 heads in parts of whole 32-key tiles, at most 132 blocks: 64
        // parts of 512 keys each (parts of 480 keys would be 69 a tile).
        assert_eq!(split.work.len(), 128);
        assert!(split.work.iter().all(|w| w.kv_end - w.kv_start == 512));
        assert_eq!((split.slots, split.merge_tiles.len()), (128, 2));
        for tile in &split.merge_tiles {
            let parts: Vec<_> = split.work.iter().filter(|w| w.first_slot == tile.first_slot).collect();
            assert_eq!(parts.len(), tile.parts as usize);
            // The parts cover the keys once, in order of their slots.
            let mut covered = 0;
            for part in 0..tile.parts {
                let w = parts.iter().find(|w| w.slot == tile.first_slot + part).unwrap();
                assert_eq!(w.kv_start, covered);
                covered = w.kv_end;
            }
            assert_eq!(covered, 32768);
        }
    }

    #[test]
    fn short_parts_are_not_cut_below_four_tiles() {
        let shape = MlaCacheShape { num_pages: 40, page_size: 16 };
        let split = mla_split(&shape, 16, &[0, 1], &table(&[512], 16), DECODE, 132, 1).unwrap();
        assert_eq!(split.work.len(), 512 / MIN_PART_KEYS);
        assert!(split.work.iter().all(|w| w.kv_end - w.kv_start == MIN_PART_KEYS as u32));
    }

    #[test]
    fn causal_multi_token_rows_see_their_own_prefix_and_16_heads_pack_four_tokens_a_tile() {
        let shape = MlaCacheShape { num_pages: 10, page_size: 7 };
        let options = MlaOptions { causal: true, ..DECODE };
        let split = mla_split(&shape, 16, &[0, 6], &table(&[50], 7), options, 1, 1).unwrap();
        // 6 tokens × 16 heads = 96 rows: tiles of tokens 0–3 and 4–5, at positions 44…49.
        let mut tiles: Vec<_> = split.work.iter().map(|w| (w.first_row, w.kv_end)).collect();
        tiles.sort_unstable();
        assert_eq!(tiles, [(0, 48), (64, 50)]);
    }

    #[test]
    fn bad_batches_are_errors_naming_what_is_wrong() {
        let shape = MlaCacheShape { num_pages: 10, page_size: 7 };
        let t = table(&[5, 9], 7);
        let e = mla_split(&shape, 0, &[0, 1, 2], &t, DECODE, 132, 1).unwrap_err();
        assert!(matches!(e, Error::ZeroDimension { what: "num_heads" }), "{e}");
        let e = mla_split(&shape, 16, &[0, 1], &t, DECODE, 132, 1).unwrap_err();
        assert!(matches!(e, Error::IndptrLength { .. }), "{e}");
        let causal = MlaOptions { causal: true, ..DECODE };
        let e = mla_split(&shape, 16, &[0, 6, 7], &t, causal, 132, 1).unwrap_err();
        assert!(matches!(e, Error::QueryLongerThanKeys { seq: 0, qo_len: 6, kv_len: 5 }), "{e}");
        let nan = MlaOptions { sm_scale: f32::NAN, ..DECODE };
        assert!(matches!(mla_split(&shape, 16, &[0, 1, 2], &t, nan, 132, 1), Err(Error::BadOption { .. })));
        // A page past the pool.
        let bad = PageTable { kv_indices: vec![0, 10], ..t.clone() };
        assert!(mla_split(&shape, 16, &[0, 1, 2], &bad, DECODE, 132, 1).is_err());
        // Without causality more queries than keys are fine.
        assert!(mla_split(&shape, 16, &[0, 6, 7], &t, DECODE, 132, 1).is_ok());
    }
}
