//! The batch decode kernel (tensor cores, its cp.async ring, split requests merged by the last
//! part) on the emulator against the f64 reference, from the host plan's own parameters
//! (`decode_split`, `decode_params`). The kernel passes its GPU tests, so these cases also
//! check the emulator's `ldmatrix`, `mma.sync`, shuffles, byte permutes and asynchronous
//! copies: odd page sizes on shuffled pages, empty and one-token requests, GQA groups of 1, 5
//! and 8, head dims 64, 96 and 128, a window and a soft cap, attention sinks, an e4m3 cache with
//! scales, random batches; and the multi-token kernel (`decode_multi_*`: speculative decoding's
//! draft tokens, causal or not) against the f64 prefill reference.
use ferrinfer::internals::abi::{decode_block_smem_bytes, decode_block_threads, decode_heads_per_block, DecodeParams};
use ferrinfer::internals::{decode_params, decode_split_tokens};
use ferrinfer::{
    bf16, f16, reference, CacheShape, DecodeOptions, E4m3, KvDType, KvLayout, KvScales, PageTable, PrefillOptions,
};
use ferrinfer_emu::gpu::fp8;
use ferrinfer_emu::gpu::half;
use ferrinfer_emu::{launch, AttentionIo, DeviceBuffer, LaunchConfig, SplitBuffers};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::workload::{pages_needed, poison, random_sinks, random_table, random_values, rng};
use rand::Rng;

struct Case {
    kv_lens: Vec<usize>,
    page_size: usize,
    qo_heads: usize,
    kv_heads: usize,
    layout: KvLayout,
    options: DecodeOptions,
    /// The GPU's multiprocessors as the planner sees them: many split long requests.
    sms: usize,
    /// Whether the plan must split requests (checked when given).
    splits: Option<bool>,
    /// Attention sinks (one logit a query head).
    sinks: bool,
    /// Query tokens a request (the multi-token kernel above 1), and whether each sees only
    /// the keys up to its position.
    tokens: usize,
    causal: bool,
}

fn case(kv_lens: &[usize], page_size: usize, qo_heads: usize, kv_heads: usize) -> Case {
    Case {
        kv_lens: kv_lens.to_vec(),
        page_size,
        qo_heads,
        kv_heads,
        layout: KvLayout::Nhd,
        options: DecodeOptions::default(),
        sms: 1,
        splits: Some(false),
        sinks: false,
        tokens: 1,
        causal: false,
    }
}

/// The kernel for head_dim `$dim`, as the PTX's entry point instantiates it.
macro_rules! kernel {
    ($half:ty, $kv:ty, $dim:literal) => {
        |p: &DecodeParams| unsafe { ferrinfer_emu::decode_instance!($half, $kv, $dim, p) }
    };
}

/// The multi-token kernel for head_dim `$dim`, as the PTX's entry point instantiates it.
macro_rules! multi_kernel {
    ($half:ty, $dim:literal) => {
        |p: &DecodeParams| unsafe { ferrinfer_emu::decode_multi_instance!($half, $dim, p) }
    };
}

/// An 8-bit cache's scales: stored values about ±1 / scale mean about ±1.
const FP8_SCALES: KvScales = KvScales { k: 0.07, v: 0.05 };

fn run<T: KvDType, C: KvDType>(c: &Case, head_dim: usize, seed: u64, kernel: fn(&DecodeParams)) {
    let mut r = rng(seed);
    let shape = CacheShape {
        num_pages: pages_needed(&c.kv_lens, c.page_size) + 2,
        page_size: c.page_size,
        num_kv_heads: c.kv_heads,
        head_dim,
        layout: c.layout,
    };
    let table: PageTable = random_table(&mut r, &c.kv_lens, c.page_size, shape.num_pages);
    let scales = if C::DTYPE.is_fp8() { FP8_SCALES } else { KvScales::default() };
    let mut values = |n: usize, scale: f32| -> Vec<C> {
        (0..n).map(|_| C::from_f64(r.random_range(-1.0..1.0) / scale as f64)).collect()
    };
    let (k, v) = (values(shape.pool_elems(), scales.k), values(shape.pool_elems(), scales.v));
    let rows = c.kv_lens.len() * c.tokens * c.qo_heads;
    let q: Vec<T> = random_values(&mut r, rows * head_dim);
    let sinks = c.sinks.then(|| random_sinks(&mut r, c.qo_heads));
    let options = DecodeOptions { kv_dtype: (C::DTYPE != T::DTYPE).then_some(C::DTYPE), ..c.options };
    let split = decode_split_tokens(&shape, c.qo_heads, &table, options, c.tokens, c.sms, 1).expect("a valid batch");
    if let Some(splits) = c.splits {
        assert_eq!(split.split_requests > 0, splits, "whether the plan splits requests");
    }

    let b_k = DeviceBuffer::from_slice("k pool", &k);
    let b_v = DeviceBuffer::from_slice("v pool", &v);
    let b_indices = DeviceBuffer::from_slice("kv_indices", &table.kv_indices);
    let b_work = DeviceBuffer::from_slice("work items", &split.work);
    let io = AttentionIo::new(&q, rows, head_dim, poison::<T>(), sinks.as_deref());
    let counters = split.split_requests * c.kv_heads * split.row_tiles;
    let partial_rows = split.slots * c.tokens * c.qo_heads;
    let scratch_buffers = SplitBuffers::new(counters, partial_rows, head_dim);
    let ops = io.addresses(b_k.ptr(), b_v.ptr(), scales);
    let scratch = scratch_buffers.scratch();
    let planned = (c.qo_heads, split.group_size, split.sm_scale, split.work.len() as u32);
    let draft = (c.tokens, c.causal);
    let parts = [b_indices.ptr(), b_work.ptr()];
    let params = decode_params(&shape, planned, draft, options.logits_soft_cap, &ops, &parts, scratch);
    let (dim, kv_bytes) = (head_dim as u32, C::DTYPE.size_bytes() as u32);
    let head_blocks = c.kv_heads.div_ceil(decode_heads_per_block(dim, kv_bytes) as usize);
    let blocks = split.work.len() * head_blocks * split.row_tiles;
    let cfg = LaunchConfig {
        grid: (blocks as u32, 1),
        threads: decode_block_threads(dim, kv_bytes),
        smem_bytes: decode_block_smem_bytes(dim, kv_bytes),
    };
    launch(cfg, move || kernel(&params)).unwrap_or_else(|f| panic!("decode kernel: {f}"));
    // The merge counters are back at zero for the next launch.
    assert!(scratch_buffers.counters_are_zero(), "merge counters left non-zero");

    let (want, want_lse) = if c.tokens == 1 {
        reference::decode_with_sinks(&shape, &k, &v, scales, &table, &q, c.qo_heads, &options, sinks.as_deref())
    } else {
        // Draft tokens are a prefill of `tokens` queries a request at the end of its keys.
        let qo_indptr: Vec<u32> = (0..=c.kv_lens.len()).map(|i| (i * c.tokens) as u32).collect();
        let prefill = PrefillOptions {
            causal: c.causal,
            sm_scale: options.sm_scale,
            logits_soft_cap: options.logits_soft_cap,
            ..PrefillOptions::DEFAULT
        };
        let sinks = sinks.as_deref();
        reference::prefill_with_sinks(&shape, &k, &v, scales, &table, &qo_indptr, &q, c.qo_heads, &prefill, sinks)
    };
    expect_attention_close(&io.out.to_vec(), &want, &io.lse.to_vec(), &want_lse, c.qo_heads, head_dim, "request")
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn decode_page_size_7_group_5_f16() {
    run::<f16, f16>(&case(&[0, 1, 20, 150], 7, 10, 2), 128, 1, kernel!(half::F16, half::F16, 128));
}

#[test]
fn decode_page_size_1_group_1_hnd_bf16() {
    let c = Case { layout: KvLayout::Hnd, ..case(&[33, 2, 64], 1, 4, 4) };
    run::<bf16, bf16>(&c, 64, 2, kernel!(half::Bf16, half::Bf16, 64));
}

#[test]
fn decode_page_size_100_group_8_head_dim_96_f16() {
    run::<f16, f16>(&case(&[250, 3], 100, 8, 1), 96, 3, kernel!(half::F16, half::F16, 96));
}

// Head_dim 96: a block takes two KV heads (`decode_heads_per_block`); an odd count leaves the
// last block's second head past the cache, which must write nothing.
#[test]
fn decode_head_dim_96_kv_heads_3_split_page_size_1_group_4_bf16() {
    let c = Case { sms: 132, splits: Some(true), ..case(&[1500, 2, 0, 70], 1, 12, 3) };
    run::<bf16, bf16>(&c, 96, 30, kernel!(half::Bf16, half::Bf16, 96));
}

#[test]
fn decode_head_dim_96_kv_heads_4_hnd_sinks_window_page_size_7_group_2_f16() {
    let options = DecodeOptions { window_left: 60, logits_soft_cap: 20.0, ..DecodeOptions::default() };
    let c = Case { options, layout: KvLayout::Hnd, sinks: true, ..case(&[130, 1, 64, 65], 7, 8, 4) };
    run::<f16, f16>(&c, 96, 31, kernel!(half::F16, half::F16, 96));
}

#[test]
fn decode_head_dim_96_kv_heads_5_split_with_sinks_page_size_48_group_3_f16() {
    let c = Case { sms: 132, splits: Some(true), sinks: true, ..case(&[900, 33], 48, 15, 5) };
    run::<f16, f16>(&c, 96, 32, kernel!(half::F16, half::F16, 96));
}

#[test]
fn decode_split_requests_merged_page_size_3_group_4_f16() {
    let c = Case { sms: 132, splits: Some(true), ..case(&[2000, 5], 3, 8, 2) };
    run::<f16, f16>(&c, 128, 4, kernel!(half::F16, half::F16, 128));
}

#[test]
fn decode_window_and_soft_cap_page_size_16_group_4_bf16() {
    let options = DecodeOptions { window_left: 40, logits_soft_cap: 30.0, ..DecodeOptions::default() };
    let c = Case { options, ..case(&[300, 17, 0], 16, 8, 2) };
    run::<bf16, bf16>(&c, 128, 5, kernel!(half::Bf16, half::Bf16, 128));
}

#[test]
fn decode_e4m3_cache_page_size_7_group_4_f16() {
    run::<f16, E4m3>(&case(&[0, 1, 90, 200], 7, 8, 2), 128, 6, kernel!(half::F16, fp8::E4m3, 128));
}

/// Random batches: page sizes, lengths (empty and one-token among them), GQA groups, layouts,
/// windows and soft caps, split or not, drawn from a fixed seed.
#[test]
fn decode_random_batches_f16() {
    let mut r = rng(1000);
    for seed in 0..12 {
        let page_size = [1, 2, 3, 5, 7, 16, 33, 100][r.random_range(0..8)];
        let kv_heads = r.random_range(1..=2);
        let group = [1, 3, 4, 5, 8][r.random_range(0..5)];
        let batch = r.random_range(1..=4);
        let kv_lens: Vec<usize> = (0..batch).map(|_| [0, 1, r.random_range(2..400)][r.random_range(0..3)]).collect();
        let options = DecodeOptions {
            window_left: if r.random_bool(0.3) { r.random_range(0..100) } else { -1 },
            logits_soft_cap: if r.random_bool(0.3) { 20.0 } else { 0.0 },
            ..DecodeOptions::default()
        };
        let layout = if r.random_bool(0.5) { KvLayout::Nhd } else { KvLayout::Hnd };
        let c = Case {
            layout,
            options,
            sms: [1, 8, 132][r.random_range(0..3)],
            splits: None,
            sinks: r.random_bool(0.3),
            ..case(&kv_lens, page_size, kv_heads * group, kv_heads)
        };
        if r.random_bool(0.5) {
            run::<f16, f16>(&c, 64, seed, kernel!(half::F16, half::F16, 64));
        } else {
            run::<f16, f16>(&c, 128, seed, kernel!(half::F16, half::F16, 128));
        }
    }
}

#[test]
fn decode_with_sinks_and_window_split_page_size_5_group_4_bf16() {
    let options = DecodeOptions { window_left: 100, ..DecodeOptions::default() };
    let c = Case { options, sinks: true, sms: 132, splits: Some(true), ..case(&[0, 1, 1500], 5, 8, 2) };
    run::<bf16, bf16>(&c, 128, 7, kernel!(half::Bf16, half::Bf16, 128));
}

/// `tokens` causal draft tokens a request (`Case::tokens`), on the multi-token kernel.
fn drafts(tokens: usize, kv_lens: &[usize], page_size: usize, qo_heads: usize, kv_heads: usize) -> Case {
    Case { tokens, causal: true, ..case(kv_lens, page_size, qo_heads, kv_heads) }
}

#[test]
fn decode_4_draft_tokens_causal_page_size_7_group_4_f16() {
    let c = drafts(4, &[4, 5, 70, 131], 7, 8, 2);
    run::<f16, f16>(&c, 128, 20, multi_kernel!(half::F16, 128));
}

#[test]
fn decode_2_draft_tokens_page_size_1_group_8_hnd_bf16() {
    let c = Case { layout: KvLayout::Hnd, ..drafts(2, &[2, 64, 65], 1, 8, 1) };
    run::<bf16, bf16>(&c, 64, 21, multi_kernel!(half::Bf16, 64));
}

#[test]
fn decode_3_draft_tokens_split_with_sinks_page_size_3_group_5_f16() {
    let c = Case { sinks: true, sms: 132, splits: Some(true), ..drafts(3, &[1500, 3], 3, 10, 2) };
    run::<f16, f16>(&c, 128, 22, multi_kernel!(half::F16, 128));
}

#[test]
fn decode_16_tokens_not_causal_soft_cap_head_dim_96_page_size_100_f16() {
    let options = DecodeOptions { logits_soft_cap: 30.0, ..DecodeOptions::default() };
    let c = Case { options, causal: false, ..drafts(16, &[0, 7, 250], 100, 2, 2) };
    run::<f16, f16>(&c, 96, 23, multi_kernel!(half::F16, 96));
}

#[test]
fn decode_3_draft_tokens_split_head_dim_96_kv_heads_3_page_size_5_bf16() {
    let c = Case { sms: 132, splits: Some(true), ..drafts(3, &[1200, 9], 5, 12, 3) };
    run::<bf16, bf16>(&c, 96, 33, multi_kernel!(half::Bf16, 96));
}

#[test]
fn decode_8_draft_tokens_two_row_tiles_split_head_dim_256_bf16() {
    let c = Case { sms: 64, splits: Some(true), ..drafts(8, &[900], 16, 4, 1) };
    run::<bf16, bf16>(&c, 256, 24, multi_kernel!(half::Bf16, 256));
}

/// Random batches of draft tokens: tokens 2–8, page sizes, GQA groups, layouts, soft caps,
/// sinks, split or not, causal or not, drawn from a fixed seed.
#[test]
fn decode_draft_tokens_random_batches_f16() {
    let mut r = rng(2000);
    for seed in 0..8 {
        let tokens = r.random_range(2..=8);
        let page_size = [1, 2, 3, 7, 16, 33, 100][r.random_range(0..7)];
        let kv_heads = r.random_range(1..=2);
        let group = [1, 2, 4, 5][r.random_range(0..4)];
        let batch = r.random_range(1..=3);
        let kv_lens: Vec<usize> =
            (0..batch).map(|_| tokens + [0, 1, r.random_range(2..300)][r.random_range(0..3)]).collect();
        let options =
            DecodeOptions { logits_soft_cap: if r.random_bool(0.3) { 20.0 } else { 0.0 }, ..DecodeOptions::default() };
        let c = Case {
            layout: if r.random_bool(0.5) { KvLayout::Nhd } else { KvLayout::Hnd },
            options,
            sms: [1, 8, 132][r.random_range(0..3)],
            splits: None,
            sinks: r.random_bool(0.3),
            causal: r.random_bool(0.7),
            ..drafts(tokens, &kv_lens, page_size, kv_heads * group, kv_heads)
        };
        run::<f16, f16>(&c, 64, 100 + seed, multi_kernel!(half::F16, 64));
    }
}
