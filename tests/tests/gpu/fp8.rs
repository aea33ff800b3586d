//! The 8-bit KV cache (E4M3, E5M2) with per-layer scales, and per-KV-head scales on top:
//! quantising append and scatter bit for bit against the host quantiser (round to nearest even,
//! saturation, NaN and ±∞), gather's dequantisation bit for bit, and batch decode, batch
//! prefill and cascade decode over fp8 pages against the f64 reference on the dequantised
//! values (the f16/bf16 bounds of `ferrinfer_tests::compare`): run-time page sizes (1, 3, 7,
//! 100, 513, page larger than the sequence, partly full last pages), every group shape,
//! head_dim 64/128/256, NHD and HND, soft cap and window, empty and one-token sequences,
//! poisoned outputs; head scales set after planning and after a CUDA graph's capture; and the
//! validation errors.
use std::sync::Arc;

use ferrinfer::reference::PerHeadScales;
use ferrinfer::{
    bf16, f16, reference, BatchDecodePlan, BatchPrefillPlan, CacheShape, CascadeDecodePlan, CustomMask, DType,
    DecodeOptions, Device, E4m3, E5m2, Error, GatherPlan, KvDType, KvHeadScales, KvLayout, KvScales, LayerPools,
    PageTable, PagedKvCache, PrefillKernel, PrefillOptions, ScatterPlan, SeqId, SequenceAllocator,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::graph::{capture_device, expect_graph_replay_after};
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{
    expect_bitwise_eq, poison, random_table, random_values, random_values_times, rng, shape_for,
    sm_scale_for_queries_times,
};
use rand::Rng;

/// The scales of the attention tests: stored values up to about ±16 (E4M3) mean values up to
/// about ±1, as the 16-bit tests' random values; not powers of two, so rounding of the folded
/// scales is exercised too.
const SCALES: KvScales = KvScales { k: 0.0625 * 1.1, v: 0.0625 * 0.9 };

/// Per-KV-head scales of a test: K's and V's of each head.
#[derive(Clone, Debug)]
struct HeadScales {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl HeadScales {
    /// Every head's scale 1: no head scales.
    fn ones(heads: usize) -> Self {
        HeadScales { k: vec![1.0; heads], v: vec![1.0; heads] }
    }

    /// Distinct scales for each of `heads` heads, K's and V's different, from about 0.25 to 4
    /// and not powers of two (so the products with the layer's scales round).
    fn distinct(heads: usize) -> Self {
        let at = |table: [f32; 5], h: usize| table[h % 5] * (1.0 + 0.03 * h as f32);
        HeadScales {
            k: (0..heads).map(|h| at([0.3, 2.7, 1.1, 0.55, 3.9], h)).collect(),
            v: (0..heads).map(|h| at([1.9, 0.27, 0.8, 3.3, 0.45], h)).collect(),
        }
    }

    fn get(&self) -> KvHeadScales<'_> {
        KvHeadScales { k: &self.k, v: &self.v }
    }

    /// The reference's view: the layer's `scales` times these.
    fn with(&self, scales: KvScales) -> PerHeadScales<'_> {
        PerHeadScales { layer: scales, heads: self.get() }
    }
}

/// A one-layer fp8 cache of random stored values whose dequantised values (with `scales` and
/// the heads' `heads`) lie in about [-1, 1), with `scales` set (the head scales are the
/// caller's to set); and the host pools.
#[allow(clippy::type_complexity)]
fn random_fp8_cache<C: KvDType>(
    dev: &Device,
    r: &mut impl Rng,
    shape: CacheShape,
    scales: KvScales,
    heads: &HeadScales,
) -> ferrinfer::Result<(PagedKvCache<C>, Vec<C>, Vec<C>)> {
    let head_stride = shape.strides().1;
    let mut values = |scale: f32, head: &[f32]| -> Vec<C> {
        (0..shape.pool_elems())
            .map(|i| {
                let scale = scale as f64 * head[i / head_stride % shape.num_kv_heads] as f64;
                C::from_f64(r.random_range(-1.0..1.0) / scale)
            })
            .collect()
    };
    let (k, v) = (values(scales.k, &heads.k), values(scales.v, &heads.v));
    let mut cache = PagedKvCache::from_layers(shape, vec![LayerPools::new(dev.upload(&k)?, dev.upload(&v)?)])?;
    cache.set_scales(0, scales)?;
    Ok((cache, k, v))
}

/// Sets layer `layer`'s head scales of `cache` where a case has them.
fn set_heads<C: KvDType>(
    dev: &Device,
    cache: &mut PagedKvCache<C>,
    layer: usize,
    heads: Option<&HeadScales>,
) -> ferrinfer::Result<()> {
    heads.map_or(Ok(()), |h| cache.set_head_scales(dev.stream(), layer, h.get()))
}

/// Ragged input of `n` values: random ones in about ±2/scale (so saturation happens at small
/// scales), with the special values sprinkled in: NaN, ±∞, huge, tiny, ±0, halfway cases.
fn special_input<T: KvDType>(r: &mut impl Rng, n: usize) -> Vec<T> {
    let specials =
        [f64::NAN, -f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e30, -1e30, 70000.0, -500.0, 1e-7, -1e-9, 0.0, -0.0];
    (0..n)
        .map(|i| {
            if i % 37 == 5 {
                T::from_f64(specials[(i / 37) % specials.len()])
            } else {
                T::from_f64(r.random_range(-40.0..40.0))
            }
        })
        .collect()
}

/// Bit patterns compared as values, NaN equal to NaN (the kernels' and the host's NaN payloads
/// may differ; what matters is that NaN stays NaN).
fn expect_values_eq<T: KvDType>(what: &str, got: &[T], want: &[T], row: usize) -> Result<(), String> {
    ensure!(got.len() == want.len(), "{what}: {} elements, reference has {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        let same = (g.is_nan() && w.is_nan()) || g.to_bits() == w.to_bits();
        ensure!(same, "{what}[{i}] (row {}, element {}): GPU {g}, reference {w}", i / row, i % row);
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct CopyCase {
    kv_lens: Vec<usize>,
    page_size: usize,
    heads: usize,
    head_dim: usize,
    layout: KvLayout,
    scales: KvScales,
    /// Layer 1's head scales, if any (layer 0 then gets others, which the copies must not use).
    head_scales: Option<HeadScales>,
}

/// Appends the last `append_lens` tokens of each sequence (all of them: a whole-sequence
/// scatter) quantised into layer 1 of a 2-layer fp8 cache, then gathers layer 1 back:
/// every stored byte of both layers equals the host quantiser's, and the gathered values
/// the host's dequantisation, bit for bit (with the case's head scales, if any: set after
/// planning).
fn append_gather_case<T: KvDType, C: KvDType>(
    dev: &Device,
    c: &CopyCase,
    append_lens: &[usize],
    seed: u64,
) -> TestResult {
    let mut r = rng(seed);
    let shape = shape_for(&c.kv_lens, c.page_size, c.heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &c.kv_lens, c.page_size, shape.num_pages);
    let host: Vec<(Vec<C>, Vec<C>)> = (0..2)
        .map(|_| (random_values(&mut r, shape.pool_elems()), random_values(&mut r, shape.pool_elems())))
        .collect();
    let layers = host
        .iter()
        .map(|(k, v)| Ok(LayerPools::new(dev.upload(k)?, dev.upload(v)?)))
        .collect::<ferrinfer::Result<_>>()?;
    let mut cache = PagedKvCache::<C>::from_layers(shape, layers)?;
    cache.set_scales(1, c.scales)?;
    let heads = c.head_scales.clone().unwrap_or_else(|| HeadScales::ones(c.heads));
    let whole = append_lens == c.kv_lens;
    let append_indptr: Vec<u32> = std::iter::once(0)
        .chain(append_lens.iter().scan(0, |a, &n| {
            *a += n as u32;
            Some(*a)
        }))
        .collect();
    let plan = if whole {
        ScatterPlan::whole_sequences(dev, &shape, &table)?
    } else {
        ScatterPlan::append(dev, &shape, &table, &append_indptr)?
    };
    let gather = GatherPlan::new(dev, &shape, &table)?;
    if let Some(h) = &c.head_scales {
        // Layer 0 gets the reverse of layer 1's head scales: a copy must read its own layer's.
        let (k0, v0): (Vec<f32>, Vec<f32>) = (h.k.iter().rev().copied().collect(), h.v.iter().rev().copied().collect());
        cache.set_head_scales(dev.stream(), 0, KvHeadScales { k: &k0, v: &v0 })?;
        set_heads(dev, &mut cache, 1, Some(h))?;
    }
    let n = plan.ragged_elems();
    let (k_in, v_in): (Vec<T>, Vec<T>) = (special_input(&mut r, n), special_input(&mut r, n));
    plan.run(dev.stream(), &mut cache, 1, &dev.upload(&k_in)?, &dev.upload(&v_in)?)?;
    let mut want = host.clone();
    let quantise = |pool: &mut Vec<C>, input: &[T], scale: f32, head: &[f32]| {
        reference::append_quantised_heads(&shape, pool, &table, &append_indptr, input, scale, head)
    };
    quantise(&mut want[1].0, &k_in, c.scales.k, &heads.k);
    quantise(&mut want[1].1, &v_in, c.scales.v, &heads.v);
    for (layer, (k, v)) in want.iter().enumerate() {
        let pools = cache.layer(layer)?;
        let row = shape.token_elems();
        expect_bitwise_eq(&format!("layer {layer} K"), &dev.download(pools.k())?, k, row)?;
        expect_bitwise_eq(&format!("layer {layer} V"), &dev.download(pools.v())?, v, row)?;
    }
    // Gather dequantises: into poisoned outputs one element longer than needed.
    let m = gather.ragged_elems();
    let (mut k_out, mut v_out) = (dev.upload(&vec![poison::<T>(); m + 1])?, dev.upload(&vec![poison::<T>(); m + 1])?);
    let (mut k_view, mut v_view) = (k_out.slice_mut(..m), v_out.slice_mut(..m));
    gather.run(dev.stream(), &cache, 1, &mut k_view, &mut v_view)?;
    let k = ("K", &k_out, &want[1].0, c.scales.k, &heads.k);
    for (what, out, pool, scale, head) in [k, ("V", &v_out, &want[1].1, c.scales.v, &heads.v)] {
        let got = dev.download(out)?;
        ensure!(got[m].to_f64().is_nan(), "gathered {what}: element past the output was written");
        let gathered = reference::gather(&shape, pool, &table);
        let expected: Vec<T> = reference::dequantise_heads(&gathered, scale, head, shape.head_dim);
        expect_values_eq(&format!("gathered {what}"), &got[..m], &expected, shape.token_elems())?;
    }
    Ok(())
}

/// The append (a few tokens per sequence) and whole-sequence scatter tests of `c`, each
/// followed by a gather: e4m3 from f16 and bf16, e5m2 from bf16 and f16; `name` (the case) goes
/// into each test's name after the element types, and the seeds are `seed`, `seed + 10`, ….
fn add_copy_tests(t: &mut Vec<GpuTest>, c: &CopyCase, name: &str, seed: u64) {
    let appends: Vec<usize> = c.kv_lens.iter().map(|&n| n.min(3)).collect();
    let (c1, c2, c3, c4) = (c.clone(), c.clone(), c.clone(), c.clone());
    let (a1, a2) = (appends.clone(), appends);
    t.push(GpuTest::new(format!("append_f16_into_e4m3_{name}_then_gather"), move |d| {
        append_gather_case::<f16, E4m3>(d, &c1, &a1, seed)
    }));
    t.push(GpuTest::new(format!("append_bf16_into_e5m2_{name}_then_gather"), move |d| {
        append_gather_case::<bf16, E5m2>(d, &c2, &a2, seed + 10)
    }));
    t.push(GpuTest::new(format!("scatter_bf16_into_e4m3_{name}_then_gather"), move |d| {
        append_gather_case::<bf16, E4m3>(d, &c3, &c3.kv_lens.clone(), seed + 20)
    }));
    t.push(GpuTest::new(format!("scatter_f16_into_e5m2_{name}_then_gather"), move |d| {
        append_gather_case::<f16, E5m2>(d, &c4, &c4.kv_lens.clone(), seed + 30)
    }));
}

fn copy_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    let lens = |ps: usize| vec![1, ps.saturating_sub(1).max(1), ps, ps + 1, 3 * ps + 5, 0, 700];
    let scales = KvScales { k: 0.1, v: 0.003 }; // V saturates often
    let case = |ps: usize, layout| CopyCase {
        kv_lens: lens(ps),
        page_size: ps,
        heads: 4,
        head_dim: 64,
        layout,
        scales,
        head_scales: None,
    };
    for (i, ps) in [1usize, 3, 7, 100, 513].into_iter().enumerate() {
        let layout = if i % 2 == 0 { KvLayout::Nhd } else { KvLayout::Hnd };
        let hnd = if layout == KvLayout::Hnd { "_hnd" } else { "" };
        add_copy_tests(&mut t, &case(ps, layout), &format!("page_size_{ps}{hnd}"), ps as u64);
    }
    // Per-KV-head scales, distinct for each head (four 16-byte pool vectors a head), in both
    // layouts: each vector quantised and dequantised with its own head's.
    for ps in [1usize, 3, 16] {
        for (layout, hnd) in [(KvLayout::Nhd, ""), (KvLayout::Hnd, "_hnd")] {
            let c = CopyCase { head_scales: Some(HeadScales::distinct(4)), ..case(ps, layout) };
            add_copy_tests(&mut t, &c, &format!("head_scales_page_size_{ps}{hnd}"), 40 + ps as u64);
        }
    }
    let wide = CopyCase {
        kv_lens: vec![5, 300],
        page_size: 16,
        heads: 2,
        head_dim: 256,
        layout: KvLayout::Nhd,
        scales: KvScales { k: 1.0, v: 2.5 },
        head_scales: None,
    };
    let wide_heads = CopyCase { heads: 3, head_scales: Some(HeadScales::distinct(3)), ..wide.clone() };
    t.push(GpuTest::new("scatter_f16_into_e4m3_head_dim_256_scale_1", move |d| {
        append_gather_case::<f16, E4m3>(d, &wide, &wide.kv_lens.clone(), 99)
    }));
    t.push(GpuTest::new("scatter_bf16_into_e4m3_head_dim_256_head_scales_3_heads", move |d| {
        append_gather_case::<bf16, E4m3>(d, &wide_heads, &wide_heads.kv_lens.clone(), 98)
    }));
    t
}

#[derive(Clone, Debug)]
struct Case {
    kv_lens: Vec<usize>,
    page_size: usize,
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    layout: KvLayout,
    options: DecodeOptions,
    seed: u64,
    /// Distinct per-KV-head scales ([`HeadScales::distinct`]), set after planning.
    head_scales: bool,
    /// Prefill's queries are this many times larger and its logit scale as many times smaller
    /// (the same logits), to reach past f16's range with bf16 queries.
    query_scale: f64,
}

impl Case {
    fn new(kv_lens: &[usize], page_size: usize) -> Self {
        Case {
            kv_lens: kv_lens.to_vec(),
            page_size,
            num_kv_heads: 2,
            group: 4,
            head_dim: 128,
            layout: KvLayout::Nhd,
            options: DecodeOptions::default(),
            seed: page_size as u64 + 500,
            head_scales: false,
            query_scale: 1.0,
        }
    }

    /// The case with distinct per-KV-head scales over `num_kv_heads` heads.
    fn with_head_scales(self, num_kv_heads: usize) -> Self {
        Case { num_kv_heads, head_scales: true, seed: self.seed + 77, ..self }
    }

    /// The head scales the case's pools are made for: distinct, or ones.
    fn heads(&self) -> HeadScales {
        if self.head_scales {
            HeadScales::distinct(self.num_kv_heads)
        } else {
            HeadScales::ones(self.num_kv_heads)
        }
    }
}

fn decode_case<T: KvDType, C: KvDType>(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.seed);
    let shape = shape_for(&c.kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &c.kv_lens, c.page_size, shape.num_pages);
    let hs = c.heads();
    let (mut cache, k, v) = random_fp8_cache::<C>(dev, &mut r, shape, SCALES, &hs)?;
    let heads = c.num_kv_heads * c.group;
    let q: Vec<T> = random_values(&mut r, c.kv_lens.len() * heads * c.head_dim);
    let options = DecodeOptions { kv_dtype: Some(C::DTYPE), ..c.options };
    let mut plan = BatchDecodePlan::new(dev, &shape, heads, &table, options)?;
    set_heads(dev, &mut cache, 0, c.head_scales.then_some(&hs))?;
    let mut out = dev.upload(&vec![poison::<T>(); q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; c.kv_lens.len() * heads])?;
    plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, Some(&mut lse))?;
    let (want, want_lse) = reference::decode_scaled(&shape, &k, &v, hs.with(SCALES), &table, &q, heads, &options);
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, c.head_dim, "request")?)
}

fn add_decode<T: KvDType, C: KvDType>(t: &mut Vec<GpuTest>, name: String, case: Case) {
    t.push(GpuTest::new(name, move |d| decode_case::<T, C>(d, &case)));
}

fn decode_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    for ps in [1usize, 3, 7, 16, 100, 513] {
        // One token, below a page, on and past page boundaries, empty, one long split sequence.
        let lens = [1, ps.saturating_sub(1).max(1), ps, ps + 1, 3 * ps + 5, 0, 2000];
        add_decode::<f16, E4m3>(&mut t, format!("decode_e4m3_page_size_{ps}_group_4_f16"), Case::new(&lens, ps));
        let c = Case { layout: KvLayout::Hnd, seed: 600 + ps as u64, ..Case::new(&lens, ps) };
        add_decode::<bf16, E5m2>(&mut t, format!("decode_e5m2_page_size_{ps}_group_4_hnd_bf16"), c);
    }
    for (group, head_dim) in
        [(1, 64), (5, 128), (7, 64), (8, 128), (16, 256), (3, 256), (5, 256), (20, 128), (32, 64), (17, 256)]
    {
        let c = Case { group, head_dim, seed: 7 * group as u64 + head_dim as u64, ..Case::new(&[37, 1, 700, 129], 7) };
        add_decode::<f16, E4m3>(
            &mut t,
            format!("decode_e4m3_page_size_7_group_{group}_head_dim_{head_dim}_f16"),
            c.clone(),
        );
        add_decode::<bf16, E4m3>(
            &mut t,
            format!("decode_e4m3_page_size_7_group_{group}_head_dim_{head_dim}_hnd_bf16"),
            Case { layout: KvLayout::Hnd, ..c.clone() },
        );
        add_decode::<f16, E5m2>(&mut t, format!("decode_e5m2_page_size_7_group_{group}_head_dim_{head_dim}_f16"), c);
    }
    // The page is larger than every sequence: one partly full page each.
    add_decode::<f16, E4m3>(
        &mut t,
        "decode_e4m3_page_larger_than_sequence_f16".into(),
        Case::new(&[3, 1, 250, 0], 256),
    );
    let capped = DecodeOptions { logits_soft_cap: 30.0, sm_scale: Some(0.5), ..Default::default() };
    add_decode::<f16, E4m3>(
        &mut t,
        "decode_e4m3_soft_cap_30_f16".into(),
        Case { options: capped, ..Case::new(&[300, 5, 1200], 16) },
    );
    let window = DecodeOptions { window_left: 100, ..Default::default() };
    add_decode::<bf16, E5m2>(
        &mut t,
        "decode_e5m2_window_left_100_bf16".into(),
        Case { options: window, ..Case::new(&[300, 5, 101, 102, 1200], 3) },
    );
    add_decode::<f16, E4m3>(
        &mut t,
        "decode_e4m3_kv_len_33000_among_short_f16".into(),
        Case::new(&[33000, 3, 17, 1], 100),
    );
    let long: Vec<usize> = (0..40).map(|i| 500 + (i * 97) % 1100).collect();
    add_decode::<f16, E4m3>(
        &mut t,
        "decode_e4m3_batch_40_long_without_split_f16".into(),
        Case { num_kv_heads: 8, ..Case::new(&long, 5) },
    );
    // Per-KV-head scales, distinct for every head: page sizes, layouts, groups (one and two row
    // tiles), head dims, one long split sequence (merged partials), soft cap.
    for ps in [1usize, 7, 16] {
        let lens = [1, ps + 1, 3 * ps + 5, 0, 2000];
        let c = Case::new(&lens, ps).with_head_scales(4);
        add_decode::<f16, E4m3>(&mut t, format!("decode_e4m3_head_scales_page_size_{ps}_group_4_f16"), c.clone());
        let c = Case { layout: KvLayout::Hnd, ..c };
        add_decode::<bf16, E5m2>(&mut t, format!("decode_e5m2_head_scales_page_size_{ps}_group_4_hnd_bf16"), c);
    }
    for (group, head_dim) in [(1, 64), (20, 128), (5, 256)] {
        let c = Case { group, head_dim, ..Case::new(&[37, 1, 700, 129], 7).with_head_scales(3) };
        let name = format!("decode_e4m3_head_scales_page_size_7_group_{group}_head_dim_{head_dim}_f16");
        add_decode::<f16, E4m3>(&mut t, name, c);
    }
    let capped = DecodeOptions { logits_soft_cap: 30.0, sm_scale: Some(0.5), ..Default::default() };
    add_decode::<bf16, E4m3>(
        &mut t,
        "decode_e4m3_head_scales_soft_cap_30_bf16".into(),
        Case { options: capped, ..Case::new(&[300, 5, 1200], 16).with_head_scales(8) },
    );
    t
}

/// What a prefill case's plan must be, checked before it runs (`None`: whatever the planner
/// chooses): its block height, whether it splits keys, and whether it takes the Hopper kernel
/// where the GPU runs it.
#[derive(Clone, Copy, Default)]
struct Planned {
    rows: Option<u32>,
    split: Option<bool>,
    hopper: bool,
    /// On the Hopper kernel, fewer persistent blocks than units (row tiles × KV heads).
    persistent: bool,
    /// Whether the plan runs the decode kernel (draft tokens: `PrefillKernel::Decode`).
    decode: Option<bool>,
}

impl Planned {
    const ANY: Planned = Planned { rows: None, split: None, hopper: false, persistent: false, decode: None };
    const HOPPER: Planned = Planned { hopper: true, ..Planned::ANY };

    fn rows(rows: u32, split: Option<bool>) -> Planned {
        Planned { rows: Some(rows), split, ..Planned::ANY }
    }
}

fn prefill_case<T: KvDType, C: KvDType>(
    dev: &Device,
    c: &Case,
    qo_lens: &[usize],
    options: PrefillOptions,
    planned: Planned,
) -> TestResult {
    prefill_case_masked::<T, C>(dev, c, qo_lens, options, planned, false)
}

/// [`prefill_case`], with a random custom mask where `masked` (the 64-row masked kernels).
fn prefill_case_masked<T: KvDType, C: KvDType>(
    dev: &Device,
    c: &Case,
    qo_lens: &[usize],
    options: PrefillOptions,
    planned: Planned,
    masked: bool,
) -> TestResult {
    let mut r = rng(c.seed);
    let shape = shape_for(&c.kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &c.kv_lens, c.page_size, shape.num_pages);
    let hs = c.heads();
    let (mut cache, k, v) = random_fp8_cache::<C>(dev, &mut r, shape, SCALES, &hs)?;
    let heads = c.num_kv_heads * c.group;
    let qo_indptr: Vec<u32> = std::iter::once(0)
        .chain(qo_lens.iter().scan(0u32, |a, &n| {
            *a += n as u32;
            Some(*a)
        }))
        .collect();
    let total_q = *qo_indptr.last().unwrap() as usize;
    let q: Vec<T> = random_values_times(&mut r, total_q * heads * c.head_dim, c.query_scale);
    let sm_scale = sm_scale_for_queries_times(c.head_dim, c.query_scale).or(options.sm_scale);
    let options = PrefillOptions { kv_dtype: Some(C::DTYPE), sm_scale, ..options };
    let mask: Vec<bool> = if masked {
        let entries: usize = qo_lens.iter().zip(&c.kv_lens).map(|(q, k)| q * k).sum();
        (0..entries).map(|_| r.random_bool(0.7)).collect()
    } else {
        Vec::new()
    };
    let mut plan = if masked {
        BatchPrefillPlan::new_masked(dev, &shape, heads, &qo_indptr, &table, CustomMask::Flat(&mask), options)?
    } else {
        BatchPrefillPlan::new(dev, &shape, heads, &qo_indptr, &table, options)?
    };
    let (split_tiles, block_rows) = plan.split_tiles();
    if let Some(rows) = planned.rows {
        ensure!(block_rows == rows, "planned {block_rows}-row blocks, the case wants {rows}");
    }
    if let Some(split) = planned.split {
        ensure!((split_tiles > 0) == split, "{split_tiles} split row tiles; the case wants split = {split}");
    }
    if planned.hopper && dev.arch_specific_ptx() == Some("sm_90a") {
        ensure!(plan.kernel() == PrefillKernel::Hopper, "planned {:?} on a GPU with the Hopper kernel", plan.kernel());
        let units = qo_lens.iter().map(|q| (q * c.group).div_ceil(128)).sum::<usize>() * c.num_kv_heads;
        let blocks = plan.num_blocks();
        ensure!(!planned.persistent || blocks < units, "{blocks} blocks for {units} units");
    }
    if let Some(decode) = planned.decode {
        let kernel = plan.kernel();
        ensure!((kernel == PrefillKernel::Decode) == decode, "planned {kernel:?}; the case wants decode = {decode}");
    }
    if let Some(decode) = planned.decode {
        let kernel = plan.kernel();
        ensure!((kernel == PrefillKernel::Decode) == decode, "planned {kernel:?}; the case wants decode = {decode}");
    }
    set_heads(dev, &mut cache, 0, c.head_scales.then_some(&hs))?;
    let mut out = dev.upload(&vec![poison::<T>(); q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; total_q * heads])?;
    plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, Some(&mut lse))?;
    let scales = hs.with(SCALES);
    let (want, want_lse) = if masked {
        reference::prefill_masked_scaled(&shape, &k, &v, scales, &table, &qo_indptr, &q, heads, &mask, &options)
    } else {
        reference::prefill_scaled(&shape, &k, &v, scales, &table, &qo_indptr, &q, heads, &options)
    };
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, c.head_dim, "token")?)
}

fn prefill_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    let causal = PrefillOptions { causal: true, ..Default::default() };
    for (ps, group, head_dim) in [(1usize, 4usize, 128usize), (7, 5, 64), (100, 1, 256), (513, 8, 128), (3, 16, 128)] {
        let kv_lens = vec![300, 1, 0, 77, 1000];
        let qo_lens = vec![300, 1, 0, 20, 130];
        let c = Case { group, head_dim, seed: 900 + ps as u64, ..Case::new(&kv_lens, ps) };
        let (c1, c2, q1, q2) = (c.clone(), Case { layout: KvLayout::Hnd, ..c }, qo_lens.clone(), qo_lens);
        t.push(GpuTest::new(
            format!("prefill_e4m3_causal_page_size_{ps}_group_{group}_head_dim_{head_dim}_f16"),
            move |d| prefill_case::<f16, E4m3>(d, &c1, &q1, causal, Planned::ANY),
        ));
        t.push(GpuTest::new(
            format!("prefill_e5m2_causal_page_size_{ps}_group_{group}_head_dim_{head_dim}_hnd_bf16"),
            move |d| prefill_case::<bf16, E5m2>(d, &c2, &q2, causal, Planned::ANY),
        ));
    }
    let both = PrefillOptions { window_left: 40, logits_soft_cap: 20.0, ..Default::default() };
    let c = Case::new(&[500, 64, 9], 16);
    t.push(GpuTest::new("prefill_e4m3_window_40_soft_cap_20_f16", move |d| {
        prefill_case::<f16, E4m3>(d, &c, &[200, 64, 9], both, Planned::ANY)
    }));
    // Per-KV-head scales on every portable kernel over fp8: 128-row blocks (long queries that
    // fill the GPU unsplit), 64-row blocks (short queries), split keys merged in-launch, and
    // the 64-row masked kernels.
    let full = PrefillOptions::default();
    // Twelve requests of 192 tokens (384 packed rows each): 128-row blocks, 288 of them, with a
    // reference the CPU finishes in seconds (a 4 × 1000-token case took minutes there).
    let long = Case { group: 2, ..Case::new(&[192; 12], 16).with_head_scales(8) };
    t.push(GpuTest::new("prefill_e4m3_head_scales_rows_128_page_size_16_group_2_f16", move |d| {
        prefill_case::<f16, E4m3>(d, &long, &[192; 12], causal, Planned::rows(128, None))
    }));
    let short = Case { group: 4, ..Case::new(&[300, 1, 0, 77, 1000], 3).with_head_scales(4) };
    let short_hnd = Case { layout: KvLayout::Hnd, ..short.clone() };
    t.push(GpuTest::new("prefill_e5m2_head_scales_rows_64_page_size_3_group_4_hnd_bf16", move |d| {
        prefill_case::<bf16, E5m2>(d, &short_hnd, &[9, 1, 0, 20, 13], causal, Planned::rows(64, None))
    }));
    // Short queries (39 tokens of group 4 over 4 requests: under 64 rows a request), so 64-row
    // blocks on every GPU, the long request's keys split.
    let split = Case::new(&[20000, 3, 9000, 40], 16).with_head_scales(2);
    t.push(GpuTest::new("prefill_e4m3_head_scales_split_keys_page_size_16_f16", move |d| {
        prefill_case::<f16, E4m3>(d, &split, &[1, 3, 30, 5], causal, Planned::rows(64, Some(true)))
    }));
    let wide = Case { head_dim: 256, group: 3, ..Case::new(&[500, 64, 9], 7).with_head_scales(3) };
    t.push(GpuTest::new("prefill_e4m3_head_scales_head_dim_256_window_40_soft_cap_20_bf16", move |d| {
        prefill_case::<bf16, E4m3>(d, &wide, &[200, 64, 9], both, Planned::ANY)
    }));
    // One token a request over an 8-bit cache runs on decode itself; several stay on the
    // prefill kernels (`decode_multi_*` reads 16-bit caches only).
    let one = Case { group: 4, ..Case::new(&[300, 1, 2, 77, 1000], 7).with_head_scales(2) };
    let one_e5m2 = Case { layout: KvLayout::Hnd, ..one.clone() };
    t.push(GpuTest::new("prefill_one_token_e4m3_head_scales_on_decode_page_size_7_group_4_f16", move |d| {
        let planned = Planned { decode: Some(true), ..Planned::ANY };
        prefill_case::<f16, E4m3>(d, &one, &[1; 5], causal, planned)
    }));
    t.push(GpuTest::new("prefill_draft_4_tokens_e5m2_stay_on_prefill_page_size_7_group_4_hnd_bf16", move |d| {
        let planned = Planned { decode: Some(false), ..Planned::ANY };
        let mut c = one_e5m2.clone();
        c.kv_lens = vec![300, 4, 4, 77, 1000];
        prefill_case::<bf16, E5m2>(d, &c, &[4; 5], causal, planned)
    }));
    t.push(GpuTest::new("prefill_masked_e4m3_head_scales_page_size_3_group_4_f16", move |d| {
        prefill_case_masked::<f16, E4m3>(d, &short, &[40, 1, 0, 20, 130], full, Planned::rows(64, None), true)
    }));
    t
}

/// `case` with `qo_lens` on the Hopper kernel where the GPU runs it (checked), and as
/// `…_portable` on the portable kernel.
fn add_hopper<T: KvDType, C: KvDType>(
    t: &mut Vec<GpuTest>,
    name: String,
    case: Case,
    qo_lens: &[usize],
    options: PrefillOptions,
) {
    let (c, q) = (case.clone(), qo_lens.to_vec());
    t.push(GpuTest::new(name.clone(), move |d| prefill_case::<T, C>(d, &c, &q, options, Planned::HOPPER)));
    let q = qo_lens.to_vec();
    t.push(GpuTest::new(format!("{name}_portable"), move |d| {
        prefill_case::<T, C>(&d.with_portable_kernels(), &case, &q, options, Planned::ANY)
    }));
}

/// Prefill over fp8 pages on Hopper's kernel, whose producer widens the byte tiles: the page
/// sizes and tile edges of the 16-bit Hopper tests (keys on and off the 128-key tile, queries
/// on and off the 128-row block), both layouts, head dims 64 and 128, window and soft cap,
/// and one long request whose keys are split.
fn hopper_prefill_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    let causal = PrefillOptions { causal: true, ..Default::default() };
    let kv_lens = [256, 384, 1000, 129, 127, 128, 1];
    let qo_lens = [256, 128, 130, 1, 77, 32, 1];
    // Per-KV-head scales (set after planning) at two of the page sizes.
    for ps in [1usize, 3, 16, 48, 257] {
        let (c, scaled) = (Case { seed: 1300 + ps as u64, ..Case::new(&kv_lens, ps) }, ps == 3 || ps == 48);
        let (c, heads) = if scaled { (c.with_head_scales(3), "_head_scales") } else { (c, "") };
        add_hopper::<f16, E4m3>(
            &mut t,
            format!("prefill_hopper_e4m3{heads}_causal_page_size_{ps}_group_4_f16"),
            c,
            &qo_lens,
            causal,
        );
        let c =
            Case { head_dim: 64, group: 5, layout: KvLayout::Hnd, seed: 1400 + ps as u64, ..Case::new(&kv_lens, ps) };
        let (c, heads) = if scaled { (c.with_head_scales(2), "_head_scales") } else { (c, "") };
        add_hopper::<bf16, E5m2>(
            &mut t,
            format!("prefill_hopper_e5m2{heads}_causal_page_size_{ps}_group_5_head_dim_64_hnd_bf16"),
            c,
            &qo_lens,
            causal,
        );
    }
    // bf16 queries past f16's range and below its smallest subnormal (the logits as usual): S
    // runs in f16 over 8-bit caches, after a power-of-two scale a warp.
    for (scale, what, seed) in [(1048576.0, "past", 1510u64), (1.0 / 1073741824.0, "below", 1511)] {
        let c = Case { query_scale: scale, seed, ..Case::new(&kv_lens, 7) };
        add_hopper::<bf16, E4m3>(
            &mut t,
            format!("prefill_hopper_e4m3_queries_{what}_f16s_range_causal_page_size_7_bf16"),
            c,
            &qo_lens,
            causal,
        );
    }
    let full = PrefillOptions::default();
    let c = Case { group: 3, head_dim: 64, seed: 1500, ..Case::new(&[300, 1000, 129], 48) };
    add_hopper::<f16, E4m3>(
        &mut t,
        "prefill_hopper_e4m3_full_group_3_head_dim_64_f16".into(),
        c,
        &[300, 70, 129],
        full,
    );
    // The last request has queries and no keys (a work item with no tiles: its producer looks
    // up no page; `kv_indices` ends before its entry would be).
    let c = Case { group: 3, seed: 1504, ..Case::new(&[300, 1000, 0], 16) };
    add_hopper::<f16, E5m2>(
        &mut t,
        "prefill_hopper_e5m2_full_last_request_without_keys_f16".into(),
        c,
        &[300, 70, 129],
        full,
    );
    let c = Case { group: 1, layout: KvLayout::Hnd, seed: 1501, ..Case::new(&[300, 1000, 129], 48) };
    add_hopper::<bf16, E4m3>(&mut t, "prefill_hopper_e4m3_full_group_1_hnd_bf16".into(), c, &[300, 70, 129], full);
    // The last 64-key tile halved (head_dim 128 over fp8 runs 64-key tiles): diagonals at each
    // 32-token offset, keys ahead of the queries, keys ending inside a tile's first half.
    let c = Case { seed: 1505, ..Case::new(&[256, 237, 65, 160, 193, 337], 7) };
    add_hopper::<f16, E4m3>(
        &mut t,
        "prefill_hopper_e4m3_last_tile_halved_causal_page_size_7_f16".into(),
        c,
        &[256, 200, 65, 96, 1, 300],
        causal,
    );
    let both = PrefillOptions { window_left: 200, logits_soft_cap: 30.0, ..causal };
    let c = Case { seed: 1502, ..Case::new(&[900, 1300], 7) };
    add_hopper::<f16, E5m2>(
        &mut t,
        "prefill_hopper_e5m2_window_left_200_soft_cap_30_page_size_7_f16".into(),
        c,
        &[700, 129],
        both,
    );
    // Persistent blocks, several units each (many short requests, some without queries), the
    // producer's byte stages refilled from one unit to the next.
    let mut r = rng(1505);
    let qo_lens: Vec<usize> = (0..200).map(|i| if i % 17 == 5 { 0 } else { r.random_range(1..=60) }).collect();
    let kv_lens: Vec<usize> = qo_lens.iter().map(|q| q + r.random_range(0..=300)).collect();
    let persistent = Planned { split: Some(false), persistent: true, ..Planned::HOPPER };
    for (ps, seed) in [(1usize, 1506u64), (7, 1507)] {
        let (c, q) = (Case { seed, ..Case::new(&kv_lens, ps) }.with_head_scales(2), qo_lens.clone());
        t.push(GpuTest::new(
            format!("prefill_hopper_e4m3_persistent_many_short_requests_page_size_{ps}_f16"),
            move |d| prefill_case::<f16, E4m3>(d, &c, &q, causal, persistent),
        ));
    }
    let c = Case { head_dim: 64, group: 3, layout: KvLayout::Hnd, seed: 1508, ..Case::new(&kv_lens, 16) };
    let q = qo_lens.clone();
    t.push(GpuTest::new("prefill_hopper_e5m2_persistent_many_short_requests_head_dim_64_hnd_bf16", move |d| {
        prefill_case::<bf16, E5m2>(d, &c, &q, causal, persistent)
    }));
    t.push(GpuTest::new("prefill_hopper_e4m3_head_scales_one_long_request_splits_its_keys_f16", move |d| {
        let c = Case { seed: 1503, ..Case::new(&[20000, 30, 9000], 16) }.with_head_scales(2);
        prefill_case::<f16, E4m3>(d, &c, &[40, 30, 70], causal, Planned { split: Some(true), ..Planned::HOPPER })
    }));
    t
}

/// Cascade decode over an fp8 cache (with distinct per-KV-head scales where `head_scales`, set
/// after planning) against plain decode's reference over each request's whole sequence.
fn cascade_e4m3_family_of_four_page_size_7(dev: &Device, head_scales: bool) -> TestResult {
    let mut r = rng(4242);
    let shape = CacheShape { num_pages: 2000, page_size: 7, num_kv_heads: 2, head_dim: 128, layout: KvLayout::Nhd };
    let hs = if head_scales { HeadScales::distinct(2) } else { HeadScales::ones(2) };
    let (mut cache, k, v) = random_fp8_cache::<E4m3>(dev, &mut r, shape, SCALES, &hs)?;
    let mut alloc = SequenceAllocator::new(shape.num_pages, shape.page_size)?;
    let parent = alloc.create();
    alloc.reserve(parent, 1500)?;
    let mut members: Vec<SeqId> = vec![parent];
    for _ in 0..3 {
        members.push(alloc.fork(parent)?);
    }
    for (i, &m) in members.iter().enumerate() {
        alloc.reserve(m, 1 + 40 * i)?;
    }
    let loner = alloc.create();
    alloc.reserve(loner, 90)?;
    let families = vec![members.clone(), vec![loner]];
    let levels = alloc.cascade_levels(&families)?;
    let all: Vec<SeqId> = families.concat();
    let whole = alloc.page_table(&all)?;
    let heads = 8;
    let options = DecodeOptions { kv_dtype: Some(DType::E4M3), ..Default::default() };
    let mut plan = CascadeDecodePlan::<f16>::new(dev, &shape, heads, &levels, options)?;
    set_heads(dev, &mut cache, 0, head_scales.then_some(&hs))?;
    let q: Vec<f16> = random_values(&mut r, plan.qo_elems());
    let mut out = dev.upload(&vec![f16::NAN; q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; all.len() * heads])?;
    plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, Some(&mut lse))?;
    let (want, _) = reference::decode_scaled(&shape, &k, &v, hs.with(SCALES), &whole, &q, heads, &options);
    let out = dev.download(&out)?;
    // Two f16 partials are merged and rounded again: twice the f16 bound (as cascade's tests).
    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
        let g = g.to_f64();
        ensure!((g - w).abs() <= 4e-3 + 2e-2 * w.abs(), "out[{i}]: GPU {g}, reference {w}");
    }
    Ok(())
}

fn validation_tests() -> Vec<GpuTest> {
    let shape = CacheShape { num_pages: 4, page_size: 16, num_kv_heads: 2, head_dim: 128, layout: KvLayout::Nhd };
    let table = PageTable { kv_indptr: vec![0, 1], kv_indices: vec![2], kv_last_page_len: vec![3] };
    let t1 = table.clone();
    vec![
        GpuTest::new("fp8_scales_zero_negative_nan_or_infinite_are_errors", move |d| {
            let mut cache = PagedKvCache::<E4m3>::new(d, shape, 2)?;
            for bad in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let e =
                    cache.set_scales(1, KvScales { k: 1.0, v: bad }).err().ok_or(format!("accepted v_scale {bad}"))?;
                ensure!(matches!(e, Error::BadScale { what: "v_scale", layer: 1, .. }), "wrong error: {e}");
                let e =
                    cache.set_scales(0, KvScales { k: bad, v: 1.0 }).err().ok_or(format!("accepted k_scale {bad}"))?;
                ensure!(matches!(e, Error::BadScale { what: "k_scale", layer: 0, .. }), "wrong error: {e}");
            }
            ensure!(cache.scales(1)? == KvScales::default(), "a rejected scale was kept");
            let e = cache.set_scales(2, KvScales::default()).err().ok_or("accepted layer 2 of 2")?;
            ensure!(matches!(e, Error::LayerOutOfRange { layer: 2, .. }), "wrong error: {e}");
            let mut f16_cache = PagedKvCache::<f16>::new(d, shape, 1)?;
            let e = f16_cache.set_scales(0, KvScales { k: 2.0, v: 2.0 }).err().ok_or("scaled an f16 cache")?;
            ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
            Ok(())
        }),
        GpuTest::new("decode_over_a_cache_of_another_element_type_than_planned_is_an_error", move |d| {
            let q = d.alloc_zeros::<f16>(4 * 128)?;
            let mut out = d.alloc_zeros::<f16>(4 * 128)?;
            let fp8 = PagedKvCache::<E4m3>::new(d, shape, 1)?;
            let mut plan = BatchDecodePlan::new(d, &shape, 4, &t1, DecodeOptions::default())?;
            let e = plan.run(d.stream(), &q, &fp8, 0, &mut out, None).err().ok_or("f16 plan read an e4m3 cache")?;
            ensure!(matches!(e, Error::KvDTypeMismatch { planned: "f16", got: "e4m3" }), "wrong error: {e}");
            let e5 = PagedKvCache::<E5m2>::new(d, shape, 1)?;
            let opts = DecodeOptions { kv_dtype: Some(DType::E4M3), ..Default::default() };
            let mut plan = BatchDecodePlan::new(d, &shape, 4, &t1, opts)?;
            let e = plan.run(d.stream(), &q, &e5, 0, &mut out, None).err().ok_or("e4m3 plan read an e5m2 cache")?;
            ensure!(matches!(e, Error::KvDTypeMismatch { planned: "e4m3", got: "e5m2" }), "wrong error: {e}");
            let f16_cache = PagedKvCache::<f16>::new(d, shape, 1)?;
            let e = plan.run(d.stream(), &q, &f16_cache, 0, &mut out, None).err().ok_or("e4m3 plan read f16")?;
            ensure!(matches!(e, Error::KvDTypeMismatch { planned: "e4m3", got: "f16" }), "wrong error: {e}");
            // f32 queries have no fp8 kernels.
            let (q32, mut out32) = (d.alloc_zeros::<f32>(4 * 128)?, d.alloc_zeros::<f32>(4 * 128)?);
            let e = plan.run(d.stream(), &q32, &fp8, 0, &mut out32, None).err().ok_or("f32 over e4m3")?;
            ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
            Ok(())
        }),
        GpuTest::new("prefill_over_a_cache_of_another_element_type_than_planned_is_an_error", move |d| {
            let q = d.alloc_zeros::<bf16>(4 * 128)?;
            let mut out = d.alloc_zeros::<bf16>(4 * 128)?;
            let opts = PrefillOptions { kv_dtype: Some(DType::E5M2), ..Default::default() };
            let mut plan = BatchPrefillPlan::new(d, &shape, 4, &[0, 1], &table, opts)?;
            let bf = PagedKvCache::<bf16>::new(d, shape, 1)?;
            let e = plan.run(d.stream(), &q, &bf, 0, &mut out, None).err().ok_or("e5m2 plan read bf16")?;
            ensure!(matches!(e, Error::KvDTypeMismatch { planned: "e5m2", got: "bf16" }), "wrong error: {e}");
            Ok(())
        }),
        GpuTest::new("copies_between_fp8_and_f32_are_errors", move |d| {
            let shape = CacheShape { num_pages: 2, page_size: 4, num_kv_heads: 1, head_dim: 16, layout: KvLayout::Nhd };
            let table = PageTable { kv_indptr: vec![0, 1], kv_indices: vec![1], kv_last_page_len: vec![2] };
            let mut cache = PagedKvCache::<E4m3>::new(d, shape, 1)?;
            let plan = ScatterPlan::whole_sequences(d, &shape, &table)?;
            let x = d.alloc_zeros::<f32>(plan.ragged_elems())?;
            let e = plan.run(d.stream(), &mut cache, 0, &x, &x).err().ok_or("quantised f32")?;
            ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
            let mut h = d.alloc_zeros::<f16>(plan.ragged_elems())?;
            let mut h2 = d.alloc_zeros::<f16>(plan.ragged_elems())?;
            let bf = PagedKvCache::<bf16>::new(d, shape, 1)?;
            let e = GatherPlan::new(d, &shape, &table)?
                .run(d.stream(), &bf, 0, &mut h, &mut h2)
                .err()
                .ok_or("bf16 → f16")?;
            ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
            Ok(())
        }),
    ]
}

/// The head-scale API's errors: bad values, lengths, a 16-bit cache, a layer out of range;
/// nothing a rejected call gave is kept.
fn head_scale_validation_tests() -> Vec<GpuTest> {
    let shape = CacheShape { num_pages: 4, page_size: 16, num_kv_heads: 2, head_dim: 128, layout: KvLayout::Nhd };
    vec![
        GpuTest::new("fp8_head_scales_zero_negative_nan_or_infinite_are_errors", move |d| {
            let mut cache = PagedKvCache::<E5m2>::new(d, shape, 2)?;
            for bad in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let heads = KvHeadScales { k: &[1.0, 2.0], v: &[3.0, bad] };
                let e = cache.set_head_scales(d.stream(), 1, heads).err().ok_or(format!("accepted V scale {bad}"))?;
                let named = matches!(e, Error::BadScale { what: "v head scale", layer: 1, kv_head: Some(1), .. });
                ensure!(named && e.to_string().contains(&format!("{bad}")), "wrong error: {e}");
                let heads = KvHeadScales { k: &[bad, 2.0], v: &[3.0, 4.0] };
                let e = cache.set_head_scales(d.stream(), 0, heads).err().ok_or(format!("accepted K scale {bad}"))?;
                let named = matches!(e, Error::BadScale { what: "k head scale", layer: 0, kv_head: Some(0), .. });
                ensure!(named, "wrong error: {e}");
            }
            ensure!(cache.head_scales(0)?.is_none() && cache.head_scales(1)?.is_none(), "a rejected scale was kept");
            Ok(())
        }),
        GpuTest::new("fp8_head_scales_of_another_length_than_num_kv_heads_are_errors", move |d| {
            let mut cache = PagedKvCache::<E4m3>::new(d, shape, 1)?;
            for (k, v) in [(&[1.0][..], &[1.0, 1.0][..]), (&[1.0, 1.0], &[1.0, 1.0, 1.0]), (&[], &[])] {
                let e = cache.set_head_scales(d.stream(), 0, KvHeadScales { k, v }).err().ok_or("accepted")?;
                ensure!(matches!(e, Error::BufferLength { expected: 2, .. }), "wrong error: {e}");
            }
            ensure!(cache.head_scales(0)?.is_none(), "a rejected scale was kept");
            Ok(())
        }),
        GpuTest::new("head_scales_of_a_16_bit_cache_are_errors", move |d| {
            let mut cache = PagedKvCache::<bf16>::new(d, shape, 1)?;
            let heads = KvHeadScales { k: &[1.0, 2.0], v: &[3.0, 4.0] };
            let e = cache.set_head_scales(d.stream(), 0, heads).err().ok_or("scaled the heads of a bf16 cache")?;
            ensure!(matches!(e, Error::UnsupportedDType { dtype: "bf16", .. }), "wrong error: {e}");
            let e = cache.clear_head_scales(d.stream(), 0).err().ok_or("cleared the heads of a bf16 cache")?;
            ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
            ensure!(cache.head_scales(0)?.is_none(), "a bf16 cache has head scales");
            Ok(())
        }),
        GpuTest::new("fp8_head_scales_of_a_layer_out_of_range_are_errors", move |d| {
            let mut cache = PagedKvCache::<E4m3>::new(d, shape, 2)?;
            let heads = KvHeadScales { k: &[1.0, 2.0], v: &[3.0, 4.0] };
            let e = cache.set_head_scales(d.stream(), 2, heads).err().ok_or("accepted layer 2 of 2")?;
            ensure!(matches!(e, Error::LayerOutOfRange { layer: 2, num_layers: 2 }), "wrong error: {e}");
            let e = cache.clear_head_scales(d.stream(), 5).err().ok_or("cleared layer 5 of 2")?;
            ensure!(matches!(e, Error::LayerOutOfRange { layer: 5, .. }), "wrong error: {e}");
            let e = cache.head_scales(2).err().ok_or("read layer 2 of 2")?;
            ensure!(matches!(e, Error::LayerOutOfRange { layer: 2, .. }), "wrong error: {e}");
            Ok(())
        }),
    ]
}

/// Decode over an fp8 cache before head scales are set, with them, and after clearing them:
/// cleared gives the first output bit for bit, set something else; the getter reads back
/// what was set, and nothing once cleared.
fn fp8_head_scales_set_read_back_and_cleared(dev: &Device) -> TestResult {
    let c = Case::new(&[300, 5, 1200], 16).with_head_scales(4);
    let mut r = rng(c.seed);
    let shape = shape_for(&c.kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &c.kv_lens, c.page_size, shape.num_pages);
    let hs = c.heads();
    let (mut cache, _, _) = random_fp8_cache::<E4m3>(dev, &mut r, shape, SCALES, &hs)?;
    let heads = c.num_kv_heads * c.group;
    let options = DecodeOptions { kv_dtype: Some(DType::E4M3), ..c.options };
    let mut plan = BatchDecodePlan::new(dev, &shape, heads, &table, options)?;
    let q = dev.upload(&random_values::<f16>(&mut r, plan.qo_elems()))?;
    let mut decode = |cache: &PagedKvCache<E4m3>| -> ferrinfer::Result<Vec<f16>> {
        let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
        plan.run(dev.stream(), &q, cache, 0, &mut out, None)?;
        dev.download(&out)
    };
    let without = decode(&cache)?;
    cache.set_head_scales(dev.stream(), 0, hs.get())?;
    ensure!(cache.head_scales(0)? == Some(hs.get()), "read back {:?}", cache.head_scales(0)?);
    ensure!(decode(&cache)? != without, "head scales changed nothing");
    cache.clear_head_scales(dev.stream(), 0)?;
    ensure!(cache.head_scales(0)?.is_none(), "cleared head scales read back");
    ensure!(decode(&cache)? == without, "cleared head scales are not ones");
    Ok(())
}

/// Captures a decode `run` over an fp8 cache with head scales in a CUDA graph, then sets other
/// head scales: the replays read the new ones (bit for bit a direct run's after the change),
/// and so does the direct run, against the reference with them.
fn fp8_head_scales_set_after_a_graph_capture_are_read_by_its_replays(_: &Device) -> TestResult {
    // A device of its own (`capture_device` says why).
    let dev = capture_device()?;
    let c = Case::new(&[5000, 7, 300], 16).with_head_scales(4);
    let mut r = rng(c.seed);
    let shape = shape_for(&c.kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &c.kv_lens, c.page_size, shape.num_pages);
    let hs = c.heads();
    let (mut cache, k, v) = random_fp8_cache::<E4m3>(&dev, &mut r, shape, SCALES, &hs)?;
    cache.set_head_scales(dev.stream(), 0, hs.get())?;
    let heads = c.num_kv_heads * c.group;
    let options = DecodeOptions { kv_dtype: Some(DType::E4M3), ..c.options };
    let plan = BatchDecodePlan::new(&dev, &shape, heads, &table, options)?;
    ensure!(plan.launch_shape().1 > 0, "the case should split and merge");
    let q: Vec<f16> = random_values(&mut r, plan.qo_elems());
    let q_dev = dev.upload(&q)?;
    // The change: the heads' scales in reverse order (each head's differs from before).
    let other = HeadScales { k: hs.k.iter().rev().copied().collect(), v: hs.v.iter().rev().copied().collect() };
    let stream: Arc<_> = dev.stream().clone();
    let mut state = (plan, cache);
    expect_graph_replay_after(
        &dev,
        q.len(),
        &mut state,
        |(plan, cache), s, out| plan.run(s, &q_dev, cache, 0, out, None),
        |(_, cache)| cache.set_head_scales(&stream, 0, other.get()),
    )?;
    let (plan, cache) = &mut state;
    let mut out = dev.alloc_zeros::<f16>(q.len())?;
    let mut lse = dev.alloc_zeros::<f32>(c.kv_lens.len() * heads)?;
    plan.run(dev.stream(), &q_dev, cache, 0, &mut out, Some(&mut lse))?;
    let (want, want_lse) = reference::decode_scaled(&shape, &k, &v, other.with(SCALES), &table, &q, heads, &options);
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, c.head_dim, "request")?)
}

/// One key whose V row holds every code of the type (two KV heads of 128 dims, a group of 4):
/// every query's output is that row's values, exactly (the probability is 1), so the kernels'
/// widening of each code is checked bit for bit on the GPU (NaN as NaN). `skip`ped codes read as
/// zero: E5M2's ±∞, which the masked padding keys of a tile (copies of the last key, with
/// probability 0) turn into NaN where the reference has ±∞ (the quantisers never store ∞).
fn every_code_read_exactly<T: KvDType, C: KvDType>(
    dev: &Device,
    code: fn(u8) -> C,
    skip: fn(u8) -> bool,
    decode: bool,
) -> TestResult {
    let (head_dim, kv_heads, group) = (128, 2, 4);
    let shape = shape_for(&[1], 16, kv_heads, head_dim, KvLayout::Nhd);
    let table = random_table(&mut rng(7), &[1], 16, shape.num_pages);
    let head_stride = shape.strides().1;
    let code_at = |head: usize, dim: usize| {
        let c = (head * head_dim + dim) as u8;
        if skip(c) {
            0
        } else {
            c
        }
    };
    let v: Vec<C> = (0..shape.pool_elems()).map(|i| code(code_at(i / head_stride % kv_heads, i % head_dim))).collect();
    let k = vec![code(0); v.len()];
    let mut cache = PagedKvCache::from_layers(shape, vec![LayerPools::new(dev.upload(&k)?, dev.upload(&v)?)])?;
    cache.set_scales(0, KvScales { k: 1.0, v: 1.0 })?;
    let heads = kv_heads * group;
    let tokens = if decode { 1 } else { 70 };
    let q: Vec<T> = random_values(&mut rng(8), tokens * heads * head_dim);
    let mut out = dev.upload(&vec![poison::<T>(); q.len()])?;
    if decode {
        let options = DecodeOptions { kv_dtype: Some(C::DTYPE), ..Default::default() };
        let mut plan = BatchDecodePlan::new(dev, &shape, heads, &table, options)?;
        plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, None)?;
    } else {
        let options = PrefillOptions { kv_dtype: Some(C::DTYPE), ..Default::default() };
        let mut plan = BatchPrefillPlan::new(dev, &shape, heads, &[0, tokens as u32], &table, options)?;
        plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, None)?;
    }
    let out = dev.download(&out)?;
    for (i, got) in out.iter().enumerate() {
        let (head, dim) = (i / head_dim % heads, i % head_dim);
        let c = code_at(head / group, dim);
        let want = T::from_f64(code(c).to_f64());
        let (g, w) = (got.to_f64(), want.to_f64());
        ensure!(
            (g.is_nan() && w.is_nan()) || got == &want,
            "code {c:#04x} (query head {head}, dim {dim}): read {g}, want {w}"
        );
    }
    Ok(())
}

/// [`every_code_read_exactly`] for both types, both query types, decode and prefill (Hopper's
/// kernel where it runs, and the portable one).
fn exact_widening_tests() -> Vec<GpuTest> {
    fn add<T: KvDType, C: KvDType>(t: &mut Vec<GpuTest>, name: &str, code: fn(u8) -> C, skip: fn(u8) -> bool) {
        let q = T::DTYPE.name();
        t.push(GpuTest::new(format!("decode_reads_every_{name}_code_exactly_{q}"), move |d| {
            every_code_read_exactly::<T, C>(d, code, skip, true)
        }));
        t.push(GpuTest::new(format!("prefill_reads_every_{name}_code_exactly_{q}"), move |d| {
            every_code_read_exactly::<T, C>(d, code, skip, false)
        }));
        t.push(GpuTest::new(format!("prefill_reads_every_{name}_code_exactly_{q}_portable"), move |d| {
            every_code_read_exactly::<T, C>(&d.with_portable_kernels(), code, skip, false)
        }));
    }
    let none: fn(u8) -> bool = |_| false;
    let infinities: fn(u8) -> bool = |c| c & 0x7F == 0x7C;
    let mut t = Vec::new();
    add::<f16, E4m3>(&mut t, "e4m3", E4m3, none);
    add::<bf16, E4m3>(&mut t, "e4m3", E4m3, none);
    add::<f16, E5m2>(&mut t, "e5m2", E5m2, infinities);
    add::<bf16, E5m2>(&mut t, "e5m2", E5m2, infinities);
    t
}

pub fn tests() -> Vec<GpuTest> {
    let mut t = copy_tests();
    t.extend(exact_widening_tests());
    t.extend(decode_tests());
    t.extend(prefill_tests());
    t.extend(hopper_prefill_tests());
    t.push(GpuTest::new("cascade_e4m3_family_of_four_page_size_7", |d| {
        cascade_e4m3_family_of_four_page_size_7(d, false)
    }));
    t.push(GpuTest::new("cascade_e4m3_head_scales_family_of_four_page_size_7", |d| {
        cascade_e4m3_family_of_four_page_size_7(d, true)
    }));
    t.extend(validation_tests());
    t.extend(head_scale_validation_tests());
    t.push(GpuTest::new("fp8_head_scales_set_read_back_and_cleared", fp8_head_scales_set_read_back_and_cleared));
    t.push(GpuTest::new(
        "fp8_head_scales_set_after_a_graph_capture_are_read_by_its_replays",
        fp8_head_scales_set_after_a_graph_capture_are_read_by_its_replays,
    ));
    t
}
