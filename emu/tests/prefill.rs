//! Batch prefill on the emulator against the f64 reference: the portable kernel (`mma.sync`,
//! 64- and 128-row blocks) and the Hopper one (`wgmma`, a producer warpgroup, mbarriers,
//! ping-pong consumers). Both pass their tests on H200s, so these cases check the emulator as
//! much as the kernels (for Hopper: the descriptors' swizzled addressing, the accumulator and
//! register-operand layouts, the mbarrier phases). The parameters are the host plan's own
//! (`prefill_split`, `persistent_schedule`, `prefill_params`): odd page sizes on shuffled pages,
//! partly full last pages, empty and one-token requests, causal and not, several units a
//! persistent block, split keys merged, draft tokens (speculative decoding) on the Hopper kernel,
//! attention sinks, an e4m3 cache (the Hopper producer's widening), custom masks with fully
//! masked rows (pages 1, 7, 48), random batches.
use ferrinfer::internals::abi::{
    hopper_prefill_ping_pong, hopper_prefill_smem_bytes, hopper_prefill_tile_tokens, prefill_smem_bytes,
    prefill_threads, PrefillParams, HOPPER_PREFILL_THREADS,
};
use ferrinfer::internals::{persistent_schedule, prefill_params, prefill_split, prefill_work_bytes, PrefillKernel};
use ferrinfer::{
    bf16, f16, reference, CacheShape, CustomMask, E4m3, E5m2, KvDType, KvLayout, KvScales, PageTable, PrefillOptions,
};
use ferrinfer_emu::gpu::fp8;
use ferrinfer_emu::gpu::half::{Bf16, F16};
use ferrinfer_emu::{launch, AttentionIo, DeviceBuffer, LaunchConfig, SplitBuffers};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::workload::{
    pages_needed, poison, random_sinks, random_table, random_values, random_values_times, rng,
    sm_scale_for_queries_times,
};
use rand::Rng;

struct Case {
    /// (qo_len, kv_len) per request.
    lens: Vec<(usize, usize)>,
    page_size: usize,
    head_dim: usize,
    causal: bool,
    /// The GPU's multiprocessors as the planner sees them: the capacity it splits long tiles to
    /// fill, and the Hopper kernel's persistent blocks.
    sms: usize,
    /// Whether the plan must split row tiles (checked when given).
    splits: Option<bool>,
    kernel: PrefillKernel,
    /// Attention sinks (one logit a query head).
    sinks: bool,
    /// Keys grow with their position (key `j`'s K row times `1 + j / 16`), so a row's maximum
    /// keeps rising from tile to tile past the softmax's rescaling margin.
    rising_keys: bool,
    /// Queries are this many times larger (the logit scale as many times smaller: the same
    /// logits), to reach past a 16-bit type's range.
    query_scale: f64,
}

/// A case on one kernel without splits or sinks, planned for one multiprocessor.
fn case(lens: Vec<(usize, usize)>, page_size: usize, head_dim: usize, causal: bool, kernel: PrefillKernel) -> Case {
    Case {
        lens,
        page_size,
        head_dim,
        causal,
        sms: 1,
        splits: Some(false),
        kernel,
        sinks: false,
        rising_keys: false,
        query_scale: 1.0,
    }
}

const QO_HEADS: usize = 8;
const KV_HEADS: usize = 2;

/// The portable kernel of `$rows`-row blocks for head_dim `$dim` over an f16 cache, as the
/// PTX's entry point instantiates it.
macro_rules! portable_f16 {
    ($dim:literal, $rows:literal) => {
        |p: &PrefillParams| unsafe { ferrinfer_emu::prefill_instance!(F16, F16, $dim, $dim, $rows, false, p) }
    };
}

/// The Hopper kernel for head_dim `$dim` over an f16 cache, as the PTX's entry point
/// instantiates it.
macro_rules! hopper_f16 {
    ($dim:literal) => {
        |p: &PrefillParams| unsafe { ferrinfer_emu::prefill_hopper_instance!(F16, F16, $dim, p) }
    };
}

/// An 8-bit cache's scales: stored values about ±1 / scale mean about ±1.
const FP8_SCALES: KvScales = KvScales { k: 0.07, v: 0.05 };

/// Runs `case` with f16 queries over a cache of `C` on `kernel` and compares with the reference.
fn run<C: KvDType>(case: &Case, seed: u64, kernel: fn(&PrefillParams)) {
    run_queries::<f16, C>(case, seed, kernel)
}

/// [`run`] with queries (and output) of `T`.
fn run_queries<T: KvDType, C: KvDType>(case: &Case, seed: u64, kernel: fn(&PrefillParams)) {
    let mut r = rng(seed);
    let kv_lens: Vec<usize> = case.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = CacheShape {
        num_pages: pages_needed(&kv_lens, case.page_size) + 2,
        page_size: case.page_size,
        num_kv_heads: KV_HEADS,
        head_dim: case.head_dim,
        layout: KvLayout::Nhd,
    };
    let table: PageTable = random_table(&mut r, &kv_lens, case.page_size, shape.num_pages);
    let scales = if C::DTYPE.is_fp8() { FP8_SCALES } else { KvScales::default() };
    let mut values = |n: usize, scale: f32| -> Vec<C> {
        (0..n).map(|_| C::from_f64(r.random_range(-1.0..1.0) / scale as f64)).collect()
    };
    let (mut k, v) = (values(shape.pool_elems(), scales.k), values(shape.pool_elems(), scales.v));
    if case.rising_keys {
        for (request, &kv_len) in kv_lens.iter().enumerate() {
            let pages = &table.kv_indices[table.kv_indptr[request] as usize..];
            for j in 0..kv_len {
                // NHD: a token's slot holds its KV heads' rows one after the other.
                let slot = (pages[j / case.page_size] as usize * case.page_size + j % case.page_size) * KV_HEADS;
                let row = &mut k[slot * case.head_dim..(slot + KV_HEADS) * case.head_dim];
                row.iter_mut().for_each(|x| *x = C::from_f64(x.to_f64() * (1.0 + j as f64 / 16.0)));
            }
        }
    }
    let mut qo_indptr = vec![0u32];
    for &(qo, _) in &case.lens {
        qo_indptr.push(qo_indptr.last().unwrap() + qo as u32);
    }
    let rows = *qo_indptr.last().unwrap() as usize * QO_HEADS;
    let q: Vec<T> = random_values_times(&mut r, rows * case.head_dim, case.query_scale);
    let sinks = case.sinks.then(|| random_sinks(&mut r, QO_HEADS));
    let kv_dtype = C::DTYPE.is_fp8().then_some(C::DTYPE);
    let sm_scale = sm_scale_for_queries_times(case.head_dim, case.query_scale);
    let options = PrefillOptions { causal: case.causal, kv_dtype, sm_scale, ..PrefillOptions::DEFAULT };
    let kv_bytes = C::DTYPE.size_bytes() as u32;
    let split =
        prefill_split(&shape, QO_HEADS, &qo_indptr, &table, options, case.kernel, case.sms, 1).expect("a valid batch");
    if let Some(splits) = case.splits {
        assert_eq!(split.split_tiles > 0, splits, "whether the plan splits row tiles");
    }
    let (schedule, blocks) = match case.kernel {
        PrefillKernel::Hopper => {
            let (head_dim, tile_tokens) =
                (case.head_dim as u32, hopper_prefill_tile_tokens(case.head_dim as u32, kv_bytes));
            persistent_schedule(&split.work, KV_HEADS, tile_tokens, hopper_prefill_ping_pong(head_dim), case.sms)
        }
        PrefillKernel::Portable { .. } => (vec![0], split.work.len() * KV_HEADS),
        PrefillKernel::Decode => unreachable!("draft tokens on the decode kernel are tests/decode.rs's"),
    };

    let b_k = DeviceBuffer::from_slice("k pool", &k);
    let b_v = DeviceBuffer::from_slice("v pool", &v);
    let b_indices = DeviceBuffer::from_slice("kv_indices", &table.kv_indices);
    let b_work = DeviceBuffer::from_slice("work items", &split.work);
    let b_schedule = DeviceBuffer::from_slice("schedule", &schedule);
    let io = AttentionIo::new(&q, rows, case.head_dim, poison::<T>(), sinks.as_deref());
    let partial_rows = split.slots * KV_HEADS * case.kernel.block_rows() as usize;
    let scratch_buffers = SplitBuffers::new(split.split_tiles * KV_HEADS, partial_rows, case.head_dim);
    let ops = io.addresses(b_k.ptr(), b_v.ptr(), scales);
    let scratch = scratch_buffers.scratch();
    let params = prefill_params(
        &shape,
        (QO_HEADS, split.group_size, split.sm_scale),
        &options,
        &ops,
        &[b_indices.ptr(), b_work.ptr(), b_schedule.ptr()],
        scratch,
    );
    let dim = case.head_dim as u32;
    let (threads, smem_bytes) = match case.kernel {
        PrefillKernel::Hopper => (HOPPER_PREFILL_THREADS, hopper_prefill_smem_bytes(dim, kv_bytes)),
        PrefillKernel::Portable { block_rows } => {
            (prefill_threads(dim), prefill_smem_bytes(dim, dim, block_rows / 64, kv_bytes))
        }
        PrefillKernel::Decode => unreachable!("draft tokens on the decode kernel are tests/decode.rs's"),
    };
    let cfg = LaunchConfig { grid: (blocks as u32, 1), threads, smem_bytes };
    launch(cfg, move || kernel(&params)).unwrap_or_else(|f| panic!("{:?} prefill: {f}", case.kernel));
    assert!(scratch_buffers.counters_are_zero(), "merge counters left non-zero");

    let (want, want_lse) = reference::prefill_with_sinks(
        &shape,
        &k,
        &v,
        scales,
        &table,
        &qo_indptr,
        &q,
        QO_HEADS,
        &options,
        sinks.as_deref(),
    );
    expect_attention_close(&io.out.to_vec(), &want, &io.lse.to_vec(), &want_lse, QO_HEADS, case.head_dim, "token")
        .unwrap_or_else(|e| panic!("{:?} prefill: {e}", case.kernel));
}

#[test]
fn prefill_hopper_causal_page_size_3_head_dim_64_f16() {
    let case = Case { sms: 4, ..case(vec![(40, 40), (0, 5), (1, 1), (70, 130)], 3, 64, true, PrefillKernel::Hopper) };
    run::<f16>(&case, 1, hopper_f16!(64));
}

#[test]
fn prefill_hopper_page_size_48_head_dim_128_f16() {
    let case = Case { sms: 2, ..case(vec![(33, 100), (17, 17)], 48, 128, false, PrefillKernel::Hopper) };
    run::<f16>(&case, 2, hopper_f16!(128));
}

#[test]
fn prefill_hopper_causal_one_unit_a_block_page_size_1_head_dim_128_f16() {
    let case = Case { sms: 64, ..case(vec![(20, 90), (9, 9)], 1, 128, true, PrefillKernel::Hopper) };
    run::<f16>(&case, 3, hopper_f16!(128));
}

#[test]
fn prefill_hopper_split_keys_merged_page_size_7_head_dim_64_f16() {
    let case = Case { sms: 16, splits: Some(true), ..case(vec![(16, 1500)], 7, 64, true, PrefillKernel::Hopper) };
    run::<f16>(&case, 4, hopper_f16!(64));
}

/// Logits that rise from tile to tile: the softmax's maxima pass their rescaling margin in
/// the middle of units, not only at a unit's first tile (the path where the Hopper kernel's
/// probabilities, computed against the old maxima, are thrown away and computed again).
#[test]
fn prefill_hopper_rising_logits_page_size_7_head_dim_128_f16() {
    let case =
        Case { rising_keys: true, ..case(vec![(40, 700), (3, 300), (0, 5)], 7, 128, true, PrefillKernel::Hopper) };
    run::<f16>(&case, 12, hopper_f16!(128));
}

#[test]
fn prefill_hopper_rising_logits_split_keys_page_size_1_head_dim_64_f16() {
    let case = Case {
        rising_keys: true,
        sms: 8,
        splits: Some(true),
        ..case(vec![(17, 1000), (1, 9)], 1, 64, false, PrefillKernel::Hopper)
    };
    run::<f16>(&case, 13, hopper_f16!(64));
}

/// Speculative decoding on the Hopper kernel (`Device::with_hopper_prefill`): 1 to 8 draft
/// tokens at the end of each request's keys (group 4: 4 to 32 rows of a 128-row unit), several
/// units a block, keys on and off the 128-key tile.
#[test]
fn prefill_hopper_draft_tokens_causal_page_size_7_head_dim_128_f16() {
    let lens = vec![(2, 300), (4, 129), (8, 1000), (1, 64), (3, 3), (5, 128)];
    let case = Case { sms: 5, ..case(lens, 7, 128, true, PrefillKernel::Hopper) };
    run::<f16>(&case, 10, hopper_f16!(128));
}

/// Draft tokens of one request over many keys, split across blocks and merged.
#[test]
fn prefill_hopper_draft_tokens_split_keys_merged_page_size_1_head_dim_64_f16() {
    let case =
        Case { sms: 24, splits: Some(true), ..case(vec![(4, 2000), (2, 37)], 1, 64, true, PrefillKernel::Hopper) };
    run::<f16>(&case, 11, hopper_f16!(64));
}

const fn portable(block_rows: u32) -> PrefillKernel {
    PrefillKernel::Portable { block_rows }
}

#[test]
fn prefill_causal_page_size_3_head_dim_64_rows_64_f16() {
    let lens = vec![(40, 40), (0, 5), (1, 1), (70, 130)];
    let case = case(lens, 3, 64, true, portable(64));
    run::<f16>(&case, 5, portable_f16!(64, 64));
}

#[test]
fn prefill_page_size_257_head_dim_128_rows_128_f16() {
    let lens = vec![(100, 300), (30, 30)];
    let case = case(lens, 257, 128, false, portable(128));
    run::<f16>(&case, 6, portable_f16!(128, 128));
}

#[test]
fn prefill_split_keys_merged_page_size_1_head_dim_128_rows_64_f16() {
    let case = Case { sms: 32, splits: Some(true), ..case(vec![(8, 900)], 1, 128, true, portable(64)) };
    run::<f16>(&case, 7, portable_f16!(128, 64));
}

/// Random batches on each kernel: page sizes, query and key lengths (empty and one-token among
/// them), causal or not, split or not, drawn from a fixed seed.
#[test]
fn prefill_random_batches_f16() {
    let mut r = rng(2000);
    for seed in 0..9 {
        let page_size = [1, 2, 3, 5, 7, 16, 33, 100][r.random_range(0..8)];
        let causal = r.random_bool(0.5);
        let lens: Vec<(usize, usize)> = (0..r.random_range(1..=3))
            .map(|_| {
                let kv = [0, 1, r.random_range(2..300)][r.random_range(0..3)];
                let qo = if causal { r.random_range(0..=kv.min(90)) } else { r.random_range(0..90) };
                (qo, kv)
            })
            .collect();
        let (head_dim, sms) = ([64, 128][r.random_range(0..2)], [1, 4, 32][r.random_range(0..3)]);
        let kernel = [PrefillKernel::Hopper, portable(64), portable(128)][seed as usize % 3];
        let case = Case {
            lens,
            page_size,
            head_dim,
            causal,
            sms,
            splits: None,
            kernel,
            sinks: r.random_bool(0.3),
            rising_keys: r.random_bool(0.3),
            query_scale: 1.0,
        };
        let f: fn(&PrefillParams) = match (kernel, head_dim) {
            (PrefillKernel::Hopper, 64) => hopper_f16!(64),
            (PrefillKernel::Hopper, _) => hopper_f16!(128),
            (PrefillKernel::Portable { block_rows: 64 }, 64) => portable_f16!(64, 64),
            (PrefillKernel::Portable { block_rows: 64 }, _) => portable_f16!(128, 64),
            (_, 64) => portable_f16!(64, 128),
            _ => portable_f16!(128, 128),
        };
        run::<f16>(&case, seed, f);
    }
}

#[test]
fn prefill_hopper_e4m3_causal_page_size_7_head_dim_128_f16() {
    let case = Case { sms: 3, ..case(vec![(50, 150), (1, 1), (0, 9)], 7, 128, true, PrefillKernel::Hopper) };
    run::<E4m3>(&case, 8, |p| unsafe { ferrinfer_emu::prefill_hopper_instance!(F16, fp8::E4m3, 128, p) });
}

/// The widening producer over one-token pages, several units a block (its loads of a unit's
/// first tiles follow the last unit's), keys on and off the tile, a one-key request.
#[test]
fn prefill_hopper_e4m3_causal_page_size_1_head_dim_64_f16() {
    let lens = vec![(40, 300), (3, 3), (1, 1), (70, 130), (0, 5), (9, 64)];
    let case = Case { sms: 2, ..case(lens, 1, 64, true, PrefillKernel::Hopper) };
    run::<E4m3>(&case, 14, |p| unsafe { ferrinfer_emu::prefill_hopper_instance!(F16, fp8::E4m3, 64, p) });
}

#[test]
fn prefill_hopper_e4m3_split_keys_merged_page_size_3_head_dim_128_f16() {
    let case = Case { sms: 16, splits: Some(true), ..case(vec![(16, 1500)], 3, 128, false, PrefillKernel::Hopper) };
    run::<E4m3>(&case, 15, |p| unsafe { ferrinfer_emu::prefill_hopper_instance!(F16, fp8::E4m3, 128, p) });
}

/// Over an 8-bit cache, logits that rise from tile to tile (the re-computed probabilities'
/// path), several units a block whose tiles follow each other through the ring, pages of 100
/// keys, keys on and off the tile, a one-key and an empty request.
#[test]
fn prefill_hopper_e4m3_rising_logits_several_units_page_size_100_head_dim_128_f16() {
    let lens = vec![(70, 520), (1, 1), (33, 33), (0, 7), (5, 260)];
    let case = Case { rising_keys: true, sms: 2, ..case(lens, 100, 128, true, PrefillKernel::Hopper) };
    run::<E4m3>(&case, 16, |p| unsafe { ferrinfer_emu::prefill_hopper_instance!(F16, fp8::E4m3, 128, p) });
}

/// bf16 queries over an 8-bit cache: split keys merged, logits rising from tile to tile, several
/// units a block, keys on and off the tile.
#[test]
fn prefill_hopper_e4m3_rising_logits_split_keys_page_size_7_head_dim_128_bf16() {
    let lens = vec![(40, 900), (1, 1), (17, 130)];
    let case = Case { rising_keys: true, sms: 4, ..case(lens, 7, 128, true, PrefillKernel::Hopper) };
    run_queries::<bf16, E4m3>(&case, 18, |p| unsafe {
        ferrinfer_emu::prefill_hopper_instance!(Bf16, fp8::E4m3, 128, p)
    });
}

/// bf16 queries past f16's range (2^20 times the usual, the logit scale as much smaller), over
/// an 8-bit cache, where S runs in f16: the Hopper kernel scales each warp's queries by a power
/// of two first.
#[test]
fn prefill_hopper_e4m3_queries_past_f16s_range_page_size_7_head_dim_128_bf16() {
    let lens = vec![(40, 300), (1, 1), (17, 130)];
    let case = Case { sms: 2, query_scale: 1048576.0, ..case(lens, 7, 128, true, PrefillKernel::Hopper) };
    run_queries::<bf16, E4m3>(&case, 20, |p| unsafe {
        ferrinfer_emu::prefill_hopper_instance!(Bf16, fp8::E4m3, 128, p)
    });
}

/// bf16 queries below f16's smallest subnormal (2^-30 times the usual), as above.
#[test]
fn prefill_hopper_e5m2_queries_below_f16s_range_page_size_3_head_dim_64_bf16() {
    let lens = vec![(40, 300), (3, 3), (70, 130)];
    let case = Case { sms: 2, query_scale: 1.0 / 1073741824.0, ..case(lens, 3, 64, true, PrefillKernel::Hopper) };
    run_queries::<bf16, E5m2>(&case, 21, |p| unsafe {
        ferrinfer_emu::prefill_hopper_instance!(Bf16, fp8::E5m2, 64, p)
    });
}

#[test]
fn prefill_hopper_e5m2_causal_page_size_1_head_dim_64_bf16() {
    let lens = vec![(40, 300), (3, 3), (70, 130), (0, 5)];
    let case = Case { sms: 2, ..case(lens, 1, 64, true, PrefillKernel::Hopper) };
    run_queries::<bf16, E5m2>(&case, 19, |p| unsafe {
        ferrinfer_emu::prefill_hopper_instance!(Bf16, fp8::E5m2, 64, p)
    });
}

/// Over an 8-bit cache with attention sinks, a page larger than every sequence, full attention.
#[test]
fn prefill_hopper_e4m3_sinks_page_size_513_head_dim_128_f16() {
    let lens = vec![(20, 300), (2, 129), (1, 1)];
    let case = Case { sinks: true, ..case(lens, 513, 128, false, PrefillKernel::Hopper) };
    run::<E4m3>(&case, 17, |p| unsafe { ferrinfer_emu::prefill_hopper_instance!(F16, fp8::E4m3, 128, p) });
}

#[test]
fn prefill_with_sinks_causal_page_size_16_head_dim_64_rows_64_f16() {
    let lens = vec![(30, 80), (1, 1), (0, 4)];
    let case = Case { sinks: true, ..case(lens, 16, 64, true, portable(64)) };
    run::<f16>(&case, 9, portable_f16!(64, 64));
}

/// A custom mask (random, with fully masked rows) on the 64-row kernel that reads one, against
/// the reference; the mask laid out after the work items as the plan uploads it.
fn masked(lens: Vec<(usize, usize)>, page_size: usize, seed: u64) {
    let mut r = rng(seed);
    let kv_lens: Vec<usize> = lens.iter().map(|&(_, kv)| kv).collect();
    let shape = CacheShape {
        num_pages: pages_needed(&kv_lens, page_size) + 2,
        page_size,
        num_kv_heads: KV_HEADS,
        head_dim: 64,
        layout: KvLayout::Nhd,
    };
    let table: PageTable = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
    let (k, v): (Vec<f16>, Vec<f16>) =
        (random_values(&mut r, shape.pool_elems()), random_values(&mut r, shape.pool_elems()));
    let mut qo_indptr = vec![0u32];
    for &(qo, _) in &lens {
        qo_indptr.push(qo_indptr.last().unwrap() + qo as u32);
    }
    let rows = *qo_indptr.last().unwrap() as usize * QO_HEADS;
    let q: Vec<f16> = random_values(&mut r, rows * 64);
    // Every fifth query row masked whole (zeros and an LSE of −∞ for it); the others keep about
    // two keys in three.
    let mut mask = Vec::new();
    for &(qo, kv) in &lens {
        for j in 0..qo {
            mask.extend((0..kv).map(|_| j % 5 != 4 && r.random_bool(0.66)));
        }
    }
    let options = PrefillOptions::DEFAULT;
    let mut split = prefill_split(&shape, QO_HEADS, &qo_indptr, &table, options, portable(64), 1, 1).unwrap();
    let flat = CustomMask::Flat(&mask);
    let work_part = prefill_work_bytes(&mut split.work, Some(&flat), &qo_indptr, &table.kv_lens(page_size))
        .unwrap()
        .expect("a masked plan's work part");

    let b_k = DeviceBuffer::from_slice("k pool", &k);
    let b_v = DeviceBuffer::from_slice("v pool", &v);
    let b_indices = DeviceBuffer::from_slice("kv_indices", &table.kv_indices);
    let b_work = DeviceBuffer::from_slice("work items and mask", &work_part);
    let io = AttentionIo::new(&q, rows, 64, poison::<f16>(), None);
    let scratch_buffers = SplitBuffers::new(split.split_tiles * KV_HEADS, split.slots * KV_HEADS * 64, 64);
    let ops = io.addresses(b_k.ptr(), b_v.ptr(), KvScales::default());
    let parts = [b_indices.ptr(), b_work.ptr(), 0];
    let planned = (QO_HEADS, split.group_size, split.sm_scale);
    let params = prefill_params(&shape, planned, &options, &ops, &parts, scratch_buffers.scratch());
    let blocks = split.work.len() * KV_HEADS;
    let cfg = LaunchConfig {
        grid: (blocks as u32, 1),
        threads: prefill_threads(64),
        smem_bytes: prefill_smem_bytes(64, 64, 1, 2),
    };
    launch(cfg, move || unsafe { ferrinfer_emu::prefill_instance!(F16, F16, 64, 64, 64, true, &params) })
        .unwrap_or_else(|f| panic!("masked prefill: {f}"));

    let (want, want_lse) = reference::prefill_masked(&shape, &k, &v, &table, &qo_indptr, &q, QO_HEADS, &mask, &options);
    expect_attention_close(&io.out.to_vec(), &want, &io.lse.to_vec(), &want_lse, QO_HEADS, 64, "token")
        .unwrap_or_else(|e| panic!("masked prefill: {e}"));
}

#[test]
fn prefill_custom_mask_page_size_1_f16() {
    masked(vec![(9, 20), (1, 1), (0, 3)], 1, 10);
}

#[test]
fn prefill_custom_mask_page_size_7_f16() {
    masked(vec![(20, 70), (5, 5)], 7, 11);
}

#[test]
fn prefill_custom_mask_page_size_48_f16() {
    masked(vec![(16, 100), (3, 49)], 48, 12);
}
