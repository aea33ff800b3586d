//! Batch decode against the f64 CPU reference: run-time page sizes, head dims, group sizes,
//! dtypes, layouts, soft cap and window, batches that split long sequences (and merge), empty
//! sequences, validation errors, and replay from a CUDA graph.
//! Error bounds: `ferrinfer_tests::compare`.
use ferrinfer::{
    bf16, f16, reference, BatchDecodePlan, CacheShape, DecodeOptions, Device, Error, KvDType, KvLayout, KvScales,
    PageTable, PagedKvCache,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::graph::{capture_device, expect_graph_replay_matches};
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{poison, random_cache, random_sinks, random_table, random_values, rng, shape_for};

#[derive(Clone, Debug)]
struct Case {
    kv_lens: Vec<usize>,
    page_size: usize,
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    layout: KvLayout,
    options: DecodeOptions,
    /// Run with random attention sinks (`random_sinks`).
    sinks: bool,
    seed: u64,
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
            sinks: false,
            seed: page_size as u64,
        }
    }
}

fn decode_case<T: KvDType>(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.seed);
    let shape = shape_for(&c.kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &c.kv_lens, c.page_size, shape.num_pages);
    let (cache, host) = random_cache::<T>(dev, &mut r, shape, 1)?;
    let heads = c.num_kv_heads * c.group;
    let q: Vec<T> = random_values(&mut r, c.kv_lens.len() * heads * c.head_dim);
    let mut plan = BatchDecodePlan::new(dev, &shape, heads, &table, c.options)?;
    let mut out = dev.upload(&vec![poison::<T>(); q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; c.kv_lens.len() * heads])?;
    let (k, v) = (&host[0].0, &host[0].1);
    let (want, want_lse) = if c.sinks {
        let sinks = random_sinks(&mut r, heads);
        let on_device = dev.upload(&sinks)?;
        plan.run_with_sinks(dev.stream(), &dev.upload(&q)?, &cache, 0, Some(&on_device), &mut out, Some(&mut lse))?;
        reference::decode_with_sinks(&shape, k, v, KvScales::default(), &table, &q, heads, &c.options, Some(&sinks))
    } else {
        plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, Some(&mut lse))?;
        reference::decode(&shape, k, v, &table, &q, heads, &c.options)
    };
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, c.head_dim, "request")?)
}

fn add<T: KvDType>(tests: &mut Vec<GpuTest>, name: String, case: Case) {
    tests.push(GpuTest::new(name, move |d| decode_case::<T>(d, &case)));
}

fn case_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    for ps in [1usize, 2, 7, 16, 64, 100, 512, 1000] {
        // Below a page, on and past page boundaries, and one long sequence that gets split.
        let lens = [1, ps.saturating_sub(1).max(1), ps, ps + 1, 3 * ps + 5, 2000];
        add::<f16>(&mut t, format!("decode_page_size_{ps}_group_4_f16"), Case::new(&lens, ps));
        let c = Case { layout: KvLayout::Hnd, seed: 100 + ps as u64, ..Case::new(&lens, ps) };
        add::<bf16>(&mut t, format!("decode_page_size_{ps}_group_4_hnd_bf16"), c);
    }
    // Above 16 the group takes several row tiles, the last one partial.
    for (group, head_dim) in
        [(1, 64), (2, 256), (5, 128), (7, 64), (8, 128), (16, 128), (16, 256), (3, 256), (20, 128), (32, 64), (17, 256)]
    {
        let c = Case { group, head_dim, seed: 7 * group as u64 + head_dim as u64, ..Case::new(&[37, 1, 700, 129], 7) };
        add::<f16>(&mut t, format!("decode_page_size_7_group_{group}_head_dim_{head_dim}_f16"), c.clone());
        add::<bf16>(
            &mut t,
            format!("decode_page_size_7_group_{group}_head_dim_{head_dim}_hnd_bf16"),
            Case { layout: KvLayout::Hnd, ..c },
        );
    }
    // Head dims 80 and 96: rows of 10 and 12 chunks in 16-chunk shared rows.
    for head_dim in [80, 96] {
        for (ps, group) in [(1, 4), (7, 5), (16, 1), (100, 16)] {
            let c =
                Case { group, head_dim, seed: ps as u64 + head_dim as u64, ..Case::new(&[37, 1, 0, 700, 5000], ps) };
            add::<f16>(&mut t, format!("decode_page_size_{ps}_group_{group}_head_dim_{head_dim}_f16"), c.clone());
            let c = Case { layout: KvLayout::Hnd, ..c };
            add::<bf16>(&mut t, format!("decode_page_size_{ps}_group_{group}_head_dim_{head_dim}_hnd_bf16"), c);
        }
        let options = DecodeOptions { window_left: 100, logits_soft_cap: 30.0, ..Default::default() };
        let c = Case { head_dim, options, sinks: true, ..Case::new(&[300, 5, 33000], 3) };
        add::<bf16>(&mut t, format!("decode_sinks_window_soft_cap_split_head_dim_{head_dim}_bf16"), c);
    }
    // Head_dim 96 blocks take two KV heads: odd counts leave the last block's second head
    // past the cache (it must write nothing), and split requests merge each head on its own.
    for (kv_heads, ps, group) in [(1, 1, 8), (3, 1, 4), (5, 7, 3), (8, 16, 4), (3, 513, 2)] {
        let c = Case {
            num_kv_heads: kv_heads,
            group,
            head_dim: 96,
            seed: 96 + kv_heads as u64,
            ..Case::new(&[1, 600, 0, 20000, 65], ps)
        };
        add::<f16>(
            &mut t,
            format!("decode_head_dim_96_kv_heads_{kv_heads}_page_size_{ps}_group_{group}_f16"),
            c.clone(),
        );
        let c = Case { layout: KvLayout::Hnd, sinks: true, ..c };
        add::<bf16>(
            &mut t,
            format!("decode_head_dim_96_kv_heads_{kv_heads}_page_size_{ps}_group_{group}_hnd_sinks_bf16"),
            c,
        );
    }
    let capped = DecodeOptions { logits_soft_cap: 30.0, sm_scale: Some(0.5), ..Default::default() };
    add::<f16>(&mut t, "decode_soft_cap_30_f16".into(), Case { options: capped, ..Case::new(&[300, 5, 1200], 16) });
    // Maxima that keep rising past the online softmax's rescale margin after the first tile.
    let steep = DecodeOptions { sm_scale: Some(4.0), ..Default::default() };
    add::<bf16>(
        &mut t,
        "decode_steep_logits_rescale_mid_sequence_bf16".into(),
        Case { options: steep, ..Case::new(&[900, 5, 300], 7) },
    );
    let window = DecodeOptions { window_left: 100, ..Default::default() };
    add::<bf16>(
        &mut t,
        "decode_window_left_100_bf16".into(),
        Case { options: window, ..Case::new(&[300, 5, 101, 102, 1200], 3) },
    );
    let both = DecodeOptions { window_left: 0, logits_soft_cap: 5.0, ..Default::default() };
    add::<f16>(
        &mut t,
        "decode_window_left_0_soft_cap_5_f16".into(),
        Case { options: both, ..Case::new(&[300, 1, 64], 64) },
    );
    add::<f16>(&mut t, "decode_kv_len_33000_among_short_f16".into(), Case::new(&[33000, 3, 17, 1], 100));
    add::<bf16>(
        &mut t,
        "decode_empty_sequences_yield_zeros_and_minus_infinity_bf16".into(),
        Case::new(&[0, 5, 0, 40], 16),
    );
    // Sinks: in unsplit and split requests (folded in once, by the merge), empty sequences
    // (zeros, the sink as LSE), a window, a soft cap, steep logits; head 0 has none (−∞).
    let sinks = Case { sinks: true, ..Case::new(&[0, 1, 5, 700, 33000, 64], 7) };
    add::<f16>(&mut t, "decode_sinks_split_and_empty_page_size_7_f16".into(), sinks.clone());
    let c = Case { group: 5, head_dim: 64, layout: KvLayout::Hnd, ..sinks.clone() };
    add::<bf16>(&mut t, "decode_sinks_page_size_7_group_5_head_dim_64_hnd_bf16".into(), c);
    let c = Case { options: DecodeOptions { window_left: 100, logits_soft_cap: 30.0, ..Default::default() }, ..sinks };
    add::<bf16>(&mut t, "decode_sinks_window_left_100_soft_cap_30_bf16".into(), c);
    let c = Case { sinks: true, options: steep, group: 16, head_dim: 256, ..Case::new(&[900, 3, 5000], 1) };
    add::<f16>(&mut t, "decode_sinks_steep_logits_page_size_1_group_16_head_dim_256_f16".into(), c);
    let many: Vec<usize> = (0..300).map(|i| 1 + (i * 13) % 90).collect();
    add::<f16>(&mut t, "decode_batch_300_without_split_f16".into(), Case { num_kv_heads: 8, ..Case::new(&many, 16) });
    // Enough blocks to fill the GPU unsplit, each streaming many key tiles through the ring.
    let long: Vec<usize> = (0..40).map(|i| 500 + (i * 97) % 1100).collect();
    add::<bf16>(
        &mut t,
        "decode_batch_40_long_without_split_bf16".into(),
        Case { num_kv_heads: 8, ..Case::new(&long, 5) },
    );
    t
}

/// Captures `run` in a CUDA graph and replays it: the same output as a direct run, bit for bit.
fn decode_replays_from_a_cuda_graph(_: &Device) -> TestResult {
    // A device of its own (`capture_device` says why).
    let dev = capture_device()?;
    let c = Case::new(&[5000, 7, 300], 16);
    let mut r = rng(3);
    let shape = shape_for(&c.kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &c.kv_lens, c.page_size, shape.num_pages);
    let (cache, _) = random_cache::<f16>(&dev, &mut r, shape, 1)?;
    let heads = c.num_kv_heads * c.group;
    let mut plan = BatchDecodePlan::new(&dev, &shape, heads, &table, c.options)?;
    ensure!(plan.launch_shape().1 > 0, "the case should split and merge");
    let q = dev.upload(&random_values::<f16>(&mut r, plan.qo_elems()))?;
    expect_graph_replay_matches(&dev, plan.qo_elems(), |stream, out| plan.run(stream, &q, &cache, 0, out, None))
}

fn validation_tests() -> Vec<GpuTest> {
    let shape = CacheShape { num_pages: 4, page_size: 16, num_kv_heads: 2, head_dim: 128, layout: KvLayout::Nhd };
    let table = PageTable { kv_indptr: vec![0, 1], kv_indices: vec![2], kv_last_page_len: vec![3] };
    let (t1, t2, t3, t4, t5) = (table.clone(), table.clone(), table.clone(), table.clone(), table.clone());
    vec![
        GpuTest::new("decode_rejects_query_heads_not_a_multiple_of_kv_heads", move |d| {
            let e = BatchDecodePlan::new(d, &shape, 5, &t1, DecodeOptions::default())
                .err()
                .ok_or("accepted 5 / 2 heads")?;
            ensure!(matches!(e, Error::GroupSize { num_qo_heads: 5, num_kv_heads: 2 }), "wrong error: {e}");
            Ok(())
        }),
        GpuTest::new("decode_rejects_unsupported_head_dim", move |d| {
            let s = CacheShape { head_dim: 112, ..shape };
            let e =
                BatchDecodePlan::new(d, &s, 4, &t2, DecodeOptions::default()).err().ok_or("accepted head_dim 112")?;
            ensure!(matches!(e, Error::UnsupportedHeadDim { head_dim: 112, .. }), "wrong error: {e}");
            ensure!(e.to_string().contains("64, 80, 96, 128, 256"), "the error should name the head dims: {e}");
            Ok(())
        }),
        GpuTest::new("decode_over_fp8_rejects_head_dim_96_naming_its_head_dims", move |d| {
            let s = CacheShape { head_dim: 96, ..shape };
            let fp8 = DecodeOptions { kv_dtype: Some(ferrinfer::DType::E4M3), ..Default::default() };
            let e = match BatchDecodePlan::new(d, &s, 4, &t5, fp8) {
                Err(e) => e,
                Ok(mut plan) => {
                    let cache = PagedKvCache::<ferrinfer::E4m3>::new(d, s, 1)?;
                    let (q, mut out) = (d.alloc_zeros::<f16>(4 * 96)?, d.alloc_zeros::<f16>(4 * 96)?);
                    plan.run(d.stream(), &q, &cache, 0, &mut out, None).err().ok_or("ran head_dim 96 over e4m3")?
                }
            };
            ensure!(
                matches!(&e, Error::UnsupportedHeadDim { head_dim: 96, supported } if supported == &[64, 128, 256]),
                "wrong error: {e}"
            );
            Ok(())
        }),
        GpuTest::new("decode_rejects_sinks_not_one_per_query_head", move |d| {
            let mut plan = BatchDecodePlan::new(d, &shape, 4, &t4, DecodeOptions::default())?;
            let cache = PagedKvCache::<f16>::new(d, shape, 1)?;
            let (q, mut out) = (d.alloc_zeros::<f16>(4 * 128)?, d.alloc_zeros::<f16>(4 * 128)?);
            let sinks = d.alloc_zeros::<f32>(3)?;
            let e = plan
                .run_with_sinks(d.stream(), &q, &cache, 0, Some(&sinks), &mut out, None)
                .err()
                .ok_or("accepted 3 sinks for 4 heads")?;
            ensure!(matches!(e, Error::BufferLength { what: "sinks", got: 3, expected: 4 }), "wrong error: {e}");
            Ok(())
        }),
        GpuTest::new("decode_rejects_query_of_wrong_length_and_f32", move |d| {
            let mut plan = BatchDecodePlan::new(d, &shape, 4, &t3, DecodeOptions::default())?;
            let cache = PagedKvCache::<f16>::new(d, shape, 1)?;
            let (q, mut out) = (d.alloc_zeros::<f16>(4 * 128 - 8)?, d.alloc_zeros::<f16>(4 * 128)?);
            let e = plan.run(d.stream(), &q, &cache, 0, &mut out, None).err().ok_or("accepted a short q")?;
            ensure!(matches!(e, Error::BufferLength { what: "q", .. }), "wrong error: {e}");
            let cache = PagedKvCache::<f32>::new(d, shape, 1)?;
            let (q, mut out) = (d.alloc_zeros::<f32>(4 * 128)?, d.alloc_zeros::<f32>(4 * 128)?);
            let e = plan.run(d.stream(), &q, &cache, 0, &mut out, None).err().ok_or("accepted f32")?;
            ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
            Ok(())
        }),
    ]
}

pub fn tests() -> Vec<GpuTest> {
    let mut t = case_tests();
    t.push(GpuTest::new("decode_replays_from_a_cuda_graph", decode_replays_from_a_cuda_graph));
    t.extend(validation_tests());
    t
}
