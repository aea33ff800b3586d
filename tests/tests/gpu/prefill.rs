//! Batch prefill against the f64 CPU reference: run-time page sizes, head dims, group sizes,
//! dtypes, layouts, causal and not, soft cap and window, requests whose new tokens are a short
//! tail of a long cache (chunked prefill, append) or all of it, requests without queries,
//! validation errors, and replay from a CUDA graph. Error bounds: `ferrinfer_tests::compare`.
//!
//! Every case runs twice: on the device as opened (on an H100 or H200, long-query batches take
//! the Hopper kernel) and, as `…_portable`, on `Device::with_portable_kernels` (`mma.sync`).
//! The `prefill_hopper_…` cases also check that the Hopper kernel ran where the GPU has it.
use ferrinfer::{
    bf16, f16, reference, BatchPrefillPlan, CacheShape, Device, Error, KvDType, KvLayout, KvScales, PageTable,
    PagedKvCache, PrefillKernel, PrefillOptions,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::graph::{capture_device, expect_graph_replay_matches};
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{
    poison, ragged_as_pages, random_cache, random_sinks, random_table, random_values, rng, shape_for,
};
use rand::Rng;

#[derive(Clone, Debug)]
struct Case {
    /// (qo_len, kv_len) per request.
    lens: Vec<(usize, usize)>,
    page_size: usize,
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    layout: KvLayout,
    options: PrefillOptions,
    /// Run with random attention sinks (`random_sinks`).
    sinks: bool,
    seed: u64,
}

const CAUSAL: PrefillOptions = PrefillOptions::CAUSAL;

impl Case {
    fn new(lens: &[(usize, usize)], page_size: usize) -> Self {
        Case {
            lens: lens.to_vec(),
            page_size,
            num_kv_heads: 2,
            group: 4,
            head_dim: 128,
            layout: KvLayout::Nhd,
            options: CAUSAL,
            sinks: false,
            seed: page_size as u64,
        }
    }

    /// Ragged K/V's row offsets of the requests' keys.
    fn kv_indptr(&self) -> Vec<u32> {
        let mut indptr = vec![0u32];
        for &(_, kv) in &self.lens {
            indptr.push(indptr[indptr.len() - 1] + kv as u32);
        }
        indptr
    }

    fn qo_indptr(&self) -> Vec<u32> {
        let mut indptr = vec![0u32];
        for &(qo, _) in &self.lens {
            indptr.push(indptr[indptr.len() - 1] + qo as u32);
        }
        indptr
    }
}

fn prefill_case<T: KvDType>(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.seed);
    let kv_lens: Vec<usize> = c.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = shape_for(&kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &kv_lens, c.page_size, shape.num_pages);
    let (cache, host) = random_cache::<T>(dev, &mut r, shape, 1)?;
    let heads = c.num_kv_heads * c.group;
    let qo_indptr = c.qo_indptr();
    let tokens = *qo_indptr.last().unwrap() as usize;
    let q: Vec<T> = random_values(&mut r, tokens * heads * c.head_dim);
    let mut plan = BatchPrefillPlan::new(dev, &shape, heads, &qo_indptr, &table, c.options)?;
    let mut out = dev.upload(&vec![poison::<T>(); q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; tokens * heads])?;
    let (k, v, o) = (&host[0].0, &host[0].1, &c.options);
    let (want, want_lse) = if c.sinks {
        let sinks = random_sinks(&mut r, heads);
        let on_device = dev.upload(&sinks)?;
        plan.run_with_sinks(dev.stream(), &dev.upload(&q)?, &cache, 0, Some(&on_device), &mut out, Some(&mut lse))?;
        reference::prefill_with_sinks(&shape, k, v, KvScales::default(), &table, &qo_indptr, &q, heads, o, Some(&sinks))
    } else {
        plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, Some(&mut lse))?;
        reference::prefill(&shape, k, v, &table, &qo_indptr, &q, heads, o)
    };
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, c.head_dim, "token")?)
}

/// The same case over contiguous K/V rows (the ragged plan), against the reference on the
/// equivalent cache of one-token pages in order.
fn ragged_case<T: KvDType>(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.seed);
    let kv_indptr = c.kv_indptr();
    let total_kv = kv_indptr[kv_indptr.len() - 1] as usize;
    let heads = c.num_kv_heads * c.group;
    let (k, v): (Vec<T>, Vec<T>) = (
        random_values(&mut r, total_kv * c.num_kv_heads * c.head_dim),
        random_values(&mut r, total_kv * c.num_kv_heads * c.head_dim),
    );
    let qo_indptr = c.qo_indptr();
    let q: Vec<T> = random_values(&mut r, qo_indptr[qo_indptr.len() - 1] as usize * heads * c.head_dim);
    let mut plan = BatchPrefillPlan::ragged(dev, c.num_kv_heads, c.head_dim, heads, &qo_indptr, &kv_indptr, c.options)?;
    let mut out = dev.upload(&vec![poison::<T>(); q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; q.len() / c.head_dim])?;
    let sinks = random_sinks(&mut r, heads);
    let on_device = dev.upload(&sinks)?;
    let (q_dev, k_dev, v_dev) = (dev.upload(&q)?, dev.upload(&k)?, dev.upload(&v)?);
    if c.sinks {
        plan.run_ragged_with_sinks(dev.stream(), &q_dev, &k_dev, &v_dev, Some(&on_device), &mut out, Some(&mut lse))?;
    } else {
        plan.run_ragged(dev.stream(), &q_dev, &k_dev, &v_dev, &mut out, Some(&mut lse))?;
    }
    let (shape, table) = ragged_as_pages(&kv_indptr, c.num_kv_heads, c.head_dim);
    let (want, want_lse) = if c.sinks {
        reference::prefill_with_sinks(
            &shape,
            &k,
            &v,
            KvScales::default(),
            &table,
            &qo_indptr,
            &q,
            heads,
            &c.options,
            Some(&sinks),
        )
    } else {
        reference::prefill(&shape, &k, &v, &table, &qo_indptr, &q, heads, &c.options)
    };
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, c.head_dim, "token")?)
}

/// `c` over ragged K/V with queries and keys of `head_dim_qk` dims and values (and outputs) of
/// `head_dim_vo` (DeepSeek-style prefill), against the f64 reference written for it.
fn ragged_qk_vo_case<T: KvDType>(dev: &Device, c: &Case, (head_dim_qk, head_dim_vo): (usize, usize)) -> TestResult {
    let mut r = rng(c.seed);
    let kv_indptr = c.kv_indptr();
    let total_kv = kv_indptr[kv_indptr.len() - 1] as usize;
    let heads = c.num_kv_heads * c.group;
    let k: Vec<T> = random_values(&mut r, total_kv * c.num_kv_heads * head_dim_qk);
    let v: Vec<T> = random_values(&mut r, total_kv * c.num_kv_heads * head_dim_vo);
    let qo_indptr = c.qo_indptr();
    let tokens = qo_indptr[qo_indptr.len() - 1] as usize;
    let q: Vec<T> = random_values(&mut r, tokens * heads * head_dim_qk);
    let options = PrefillOptions { head_dim_vo: Some(head_dim_vo), ..c.options };
    let mut plan = BatchPrefillPlan::ragged(dev, c.num_kv_heads, head_dim_qk, heads, &qo_indptr, &kv_indptr, options)?;
    ensure!(plan.qo_elems() == tokens * heads * head_dim_qk, "qo_elems counts the queries' elements");
    ensure!(plan.out_elems() == tokens * heads * head_dim_vo, "out_elems counts the outputs' elements");
    let mut out = dev.upload(&vec![poison::<T>(); tokens * heads * head_dim_vo])?;
    let mut lse = dev.upload(&vec![f32::NAN; tokens * heads])?;
    let (q_dev, k_dev, v_dev) = (dev.upload(&q)?, dev.upload(&k)?, dev.upload(&v)?);
    plan.run_ragged(dev.stream(), &q_dev, &k_dev, &v_dev, &mut out, Some(&mut lse))?;
    let dims = (head_dim_qk, head_dim_vo);
    let (want, want_lse) =
        reference::prefill_ragged_qk_vo(&q, &k, &v, &qo_indptr, &kv_indptr, (heads, c.num_kv_heads), dims, &options);
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, head_dim_vo, "token")?)
}

/// The plan of `c`: row tiles it splits, and the kernel it launches.
fn planned(dev: &Device, c: &Case) -> Result<(usize, PrefillKernel), Box<dyn std::error::Error>> {
    let kv_lens: Vec<usize> = c.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = shape_for(&kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut rng(c.seed), &kv_lens, c.page_size, shape.num_pages);
    let plan = BatchPrefillPlan::new(dev, &shape, c.num_kv_heads * c.group, &c.qo_indptr(), &table, c.options)?;
    Ok((plan.split_tiles().0, plan.kernel()))
}

/// `case` as `name`, on the Hopper kernel where the GPU runs it (checked), unsplit, with fewer
/// persistent blocks than units (row tiles × KV heads): blocks run several units each.
fn add_persistent<T: KvDType>(tests: &mut Vec<GpuTest>, name: String, case: Case) {
    tests.push(GpuTest::new(name, move |d| {
        if d.arch_specific_ptx() == Some("sm_90a") {
            let kv_lens: Vec<usize> = case.lens.iter().map(|&(_, kv)| kv).collect();
            let shape = shape_for(&kv_lens, case.page_size, case.num_kv_heads, case.head_dim, case.layout);
            let table = random_table(&mut rng(case.seed), &kv_lens, case.page_size, shape.num_pages);
            let heads = case.num_kv_heads * case.group;
            let plan = BatchPrefillPlan::new(d, &shape, heads, &case.qo_indptr(), &table, case.options)?;
            let units: usize =
                case.lens.iter().map(|&(qo, _)| (qo * case.group).div_ceil(128)).sum::<usize>() * case.num_kv_heads;
            let (split, kernel, blocks) = (plan.split_tiles().0, plan.kernel(), plan.num_blocks());
            ensure!(kernel == PrefillKernel::Hopper && split == 0, "planned {kernel:?}, {split} split tiles");
            ensure!(blocks <= d.multiprocessor_count() && blocks < units, "{blocks} blocks for {units} units");
        }
        prefill_case::<T>(d, &case)
    }));
}

/// Many short requests (1 to 60 queries over up to 300 more keys, some without queries):
/// several hundred units, several a block.
fn many_short_requests(seed: u64) -> Vec<(usize, usize)> {
    let mut r = rng(seed);
    (0..200)
        .map(|i| {
            let qo = if i % 17 == 5 { 0 } else { r.random_range(1..=60usize) };
            (qo, qo + r.random_range(0..=300usize))
        })
        .collect()
}

fn split_tiles(dev: &Device, c: &Case) -> Result<usize, Box<dyn std::error::Error>> {
    Ok(planned(dev, c)?.0)
}

/// `case` as `name` on the device as opened, and as `name_portable` on the portable kernels.
fn add<T: KvDType>(tests: &mut Vec<GpuTest>, name: String, case: Case) {
    let portable = case.clone();
    tests.push(GpuTest::new(name.clone(), move |d| prefill_case::<T>(d, &case)));
    tests.push(GpuTest::new(format!("{name}_portable"), move |d| {
        prefill_case::<T>(&d.with_portable_kernels(), &portable)
    }));
}

/// `case` on the Hopper kernel where the GPU runs it (checked), else on the portable one.
fn add_hopper<T: KvDType>(tests: &mut Vec<GpuTest>, name: String, case: Case) {
    tests.push(GpuTest::new(name, move |d| {
        let kernel = planned(d, &case)?.1;
        if d.arch_specific_ptx() == Some("sm_90a") {
            ensure!(kernel == PrefillKernel::Hopper, "planned {kernel:?} on a GPU with the Hopper kernel");
        }
        prefill_case::<T>(d, &case)
    }));
}

/// `case` (draft tokens: a few queries a request) as `name` on `Device::with_hopper_prefill`,
/// checked to take the Hopper kernel where the GPU runs it (the plan alone gives such batches
/// the portable kernel: checked too).
fn add_draft_tokens<T: KvDType>(tests: &mut Vec<GpuTest>, name: String, case: Case) {
    tests.push(GpuTest::new(name, move |d| {
        let forced = d.with_hopper_prefill();
        if d.arch_specific_ptx() == Some("sm_90a") {
            let (own, hopper) = (planned(d, &case)?.1, planned(&forced, &case)?.1);
            ensure!(own != PrefillKernel::Hopper, "the plan's own choice for draft tokens: {own:?}");
            ensure!(hopper == PrefillKernel::Hopper, "planned {hopper:?} on `with_hopper_prefill`");
        }
        prefill_case::<T>(&forced, &case)
    }));
}

fn hopper_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    // Key counts on and off the 128-key tile: whole tiles, one past, one short, a tile and a
    // bit, a single key; query counts on and off the 128-row block (group 4: 32 tokens a block).
    let lens = [(256, 256), (128, 384), (130, 1000), (1, 129), (77, 127), (32, 128), (1, 1)];
    for ps in [1usize, 3, 48, 257, 16] {
        add_hopper::<f16>(&mut t, format!("prefill_hopper_causal_page_size_{ps}_group_4_f16"), Case::new(&lens, ps));
        let c = Case { layout: KvLayout::Hnd, seed: 300 + ps as u64, ..Case::new(&lens, ps) };
        add_hopper::<bf16>(&mut t, format!("prefill_hopper_causal_page_size_{ps}_group_4_hnd_bf16"), c);
    }
    let full = PrefillOptions { causal: false, ..CAUSAL };
    for (group, head_dim) in [(1, 64), (3, 64), (2, 256), (6, 256), (5, 128)] {
        let c = Case {
            group,
            head_dim,
            options: full,
            seed: 11 * group as u64 + head_dim as u64,
            ..Case::new(&[(300, 300), (70, 1000), (129, 129)], 48)
        };
        add_hopper::<f16>(
            &mut t,
            format!("prefill_hopper_full_page_size_48_group_{group}_head_dim_{head_dim}_f16"),
            c.clone(),
        );
        let c = Case { options: CAUSAL, layout: KvLayout::Hnd, ..c };
        add_hopper::<bf16>(
            &mut t,
            format!("prefill_hopper_causal_page_size_48_group_{group}_head_dim_{head_dim}_hnd_bf16"),
            c,
        );
    }
    // A unit's last tile that no row of it sees past the first half of runs at half width:
    // causal diagonals at each 32-token offset into the tile (group 4: 32-token units; group 8:
    // 16; group 1: 128, which halve only with the keys 37 ahead of the queries), keys 37 ahead
    // of the queries (units across a tile's edge), and keys ending just past a tile or at its
    // middle (full attention).
    let halved = [(256, 256), (200, 237), (65, 65), (64, 64), (96, 160), (1, 193), (300, 337)];
    for group in [1usize, 4, 8] {
        let c = Case { group, seed: 400 + group as u64, ..Case::new(&halved, 7) };
        add_hopper::<f16>(&mut t, format!("prefill_hopper_last_tile_halved_causal_group_{group}_page_size_7_f16"), c);
    }
    let c =
        Case { head_dim: 64, options: full, seed: 409, ..Case::new(&[(100, 129), (30, 192), (64, 193), (7, 64)], 1) };
    add_hopper::<bf16>(&mut t, "prefill_hopper_last_tile_halved_full_head_dim_64_page_size_1_bf16".into(), c);
    let window = PrefillOptions { window_left: 200, logits_soft_cap: 30.0, ..CAUSAL };
    add_hopper::<f16>(
        &mut t,
        "prefill_hopper_window_left_200_soft_cap_30_page_size_7_f16".into(),
        Case { options: window, ..Case::new(&[(700, 900), (129, 1300)], 7) },
    );
    let steep = PrefillOptions { sm_scale: Some(4.0), ..CAUSAL };
    add_hopper::<bf16>(
        &mut t,
        "prefill_hopper_steep_logits_rescale_mid_sequence_bf16".into(),
        Case { options: steep, ..Case::new(&[(600, 600), (200, 900)], 16) },
    );
    let sinks = Case { sinks: true, ..Case::new(&lens, 3) };
    add_hopper::<f16>(&mut t, "prefill_hopper_sinks_causal_page_size_3_f16".into(), sinks.clone());
    let c = Case {
        sinks: true,
        group: 3,
        head_dim: 256,
        options: full,
        ..Case::new(&[(300, 300), (70, 1000), (129, 0)], 48)
    };
    add_hopper::<bf16>(&mut t, "prefill_hopper_sinks_full_group_3_head_dim_256_bf16".into(), c);
    t.push(GpuTest::new("prefill_hopper_sinks_one_long_request_splits_its_keys_bf16", |d| {
        let c = Case { sinks: true, ..Case::new(&[(40, 20000), (30, 30), (70, 9000)], 16) };
        ensure!(planned(d, &c)?.0 > 0, "the case should split");
        prefill_case::<bf16>(d, &c)
    }));
    // Persistent blocks: each runs several units back to back, the ring's stages and phases
    // carried from one unit to the next (page sizes 1, 7 and 100; one whole page per request
    // at 100 for most).
    for (ps, seed) in [(1usize, 31u64), (7, 32), (100, 33)] {
        let c = Case { seed, ..Case::new(&many_short_requests(seed), ps) };
        add_persistent::<f16>(&mut t, format!("prefill_hopper_persistent_many_short_requests_page_size_{ps}_f16"), c);
    }
    let c = Case { layout: KvLayout::Hnd, seed: 34, ..Case::new(&many_short_requests(34), 3) };
    add_persistent::<bf16>(&mut t, "prefill_hopper_persistent_many_short_requests_page_size_3_hnd_bf16".into(), c);
    let long = [(1024, 1024), (700, 1500), (333, 900), (1, 1), (0, 50), (512, 512), (129, 4000), (1200, 1200)];
    add_persistent::<f16>(
        &mut t,
        "prefill_hopper_persistent_long_and_short_requests_page_size_7_f16".into(),
        Case { seed: 35, ..Case::new(&long, 7) },
    );
    let c = Case { head_dim: 64, group: 3, seed: 36, ..Case::new(&many_short_requests(36), 16) };
    add_persistent::<f16>(&mut t, "prefill_hopper_persistent_many_short_requests_head_dim_64_f16".into(), c);
    let c = Case { head_dim: 256, options: full, seed: 37, ..Case::new(&many_short_requests(37), 48) };
    add_persistent::<bf16>(&mut t, "prefill_hopper_persistent_full_many_short_requests_head_dim_256_bf16".into(), c);
    // Queries without keys between the others (full attention): units of no key tile, several
    // back to back in a block, each starting the next unit's query load before its own output.
    let mut without_keys = many_short_requests(39);
    for (i, (qo, kv)) in without_keys.iter_mut().enumerate() {
        if i % 3 == 1 {
            (*qo, *kv) = ((*qo).max(1), 0);
        }
    }
    let c = Case { options: full, seed: 39, ..Case::new(&without_keys, 7) };
    add_persistent::<f16>(&mut t, "prefill_hopper_persistent_full_queries_without_keys_between_others_f16".into(), c);
    let window = PrefillOptions { window_left: 40, logits_soft_cap: 30.0, ..CAUSAL };
    let c = Case { options: window, sinks: true, seed: 38, ..Case::new(&many_short_requests(38), 5) };
    add_persistent::<f16>(&mut t, "prefill_hopper_persistent_sinks_window_40_soft_cap_page_size_5_f16".into(), c);
    // Speculative decoding on `Device::with_hopper_prefill`: 1 to 8 draft tokens at the end of
    // each request's keys (4 to 64 of a unit's 128 rows), which the plan alone gives the
    // portable kernel; keys on and off the tile, pages 1, 7 and 16, groups 4, 5 and 8; a batch
    // too small for the GPU, whose keys are split.
    let drafts = [(2, 300), (4, 129), (8, 1000), (1, 64), (3, 3), (5, 128), (6, 2100), (7, 257)];
    for (ps, group) in [(1usize, 4usize), (7, 5), (16, 8)] {
        let c = Case { group, seed: 60 + ps as u64, ..Case::new(&drafts, ps) };
        add_draft_tokens::<f16>(&mut t, format!("prefill_hopper_draft_tokens_page_size_{ps}_group_{group}_f16"), c);
    }
    let c = Case { layout: KvLayout::Hnd, head_dim: 64, seed: 67, ..Case::new(&drafts, 3) };
    add_draft_tokens::<bf16>(&mut t, "prefill_hopper_draft_tokens_page_size_3_head_dim_64_hnd_bf16".into(), c);
    t.push(GpuTest::new("prefill_hopper_draft_tokens_of_two_requests_split_their_keys_f16", |d| {
        let c = Case { seed: 68, ..Case::new(&[(4, 20000), (2, 9000)], 16) };
        let d = d.with_hopper_prefill();
        let (split, kernel) = planned(&d, &c)?;
        ensure!(split > 0, "the case should split");
        if d.arch_specific_ptx() == Some("sm_90a") {
            ensure!(kernel == PrefillKernel::Hopper, "planned {kernel:?}");
        }
        prefill_case::<f16>(&d, &c)
    }));
    // One long request among short ones, too few row tiles for the GPU: split keys, merged by
    // the consumer warpgroups of the last part.
    t.push(GpuTest::new("prefill_hopper_one_long_request_splits_its_keys_f16", |d| {
        let c = Case::new(&[(40, 20000), (30, 30), (70, 9000)], 16);
        let (split, kernel) = planned(d, &c)?;
        ensure!(split > 0, "the case should split");
        if d.arch_specific_ptx() == Some("sm_90a") {
            ensure!(kernel == PrefillKernel::Hopper, "planned {kernel:?}");
        }
        prefill_case::<f16>(d, &c)
    }));
    t
}

fn case_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    for ps in [1usize, 7, 16, 100, 512, 37] {
        // A whole prompt, a tail appended to a cache that crosses pages, one token (decode-like)
        // and a prompt shorter than a page.
        let lens = [(200, 200), (37, 3 * ps + 50), (1, ps + 1), (5, 5)];
        add::<f16>(&mut t, format!("prefill_causal_page_size_{ps}_group_4_f16"), Case::new(&lens, ps));
        let c = Case { layout: KvLayout::Hnd, seed: 100 + ps as u64, ..Case::new(&lens, ps) };
        add::<bf16>(&mut t, format!("prefill_causal_page_size_{ps}_group_4_hnd_bf16"), c);
    }
    for (group, head_dim) in [(1, 64), (2, 256), (5, 128), (7, 64), (8, 128), (3, 256), (16, 64)] {
        let c =
            Case { group, head_dim, seed: 7 * group as u64 + head_dim as u64, ..Case::new(&[(70, 90), (3, 700)], 7) };
        add::<f16>(&mut t, format!("prefill_causal_page_size_7_group_{group}_head_dim_{head_dim}_f16"), c.clone());
        let full = PrefillOptions { causal: false, ..CAUSAL };
        add::<bf16>(
            &mut t,
            format!("prefill_full_page_size_7_group_{group}_head_dim_{head_dim}_hnd_bf16"),
            Case { layout: KvLayout::Hnd, options: full, ..c },
        );
    }
    let capped = PrefillOptions { logits_soft_cap: 30.0, sm_scale: Some(0.5), ..CAUSAL };
    add::<f16>(
        &mut t,
        "prefill_soft_cap_30_f16".into(),
        Case { options: capped, ..Case::new(&[(300, 300), (9, 40)], 16) },
    );
    // Logits spread wide enough that rows' maxima keep rising past the rescale margin of the
    // online softmax after the first tile, so O and the sums are rescaled mid-sequence.
    let steep = PrefillOptions { sm_scale: Some(4.0), ..CAUSAL };
    add::<f16>(
        &mut t,
        "prefill_steep_logits_rescale_mid_sequence_f16".into(),
        Case { options: steep, ..Case::new(&[(300, 300), (20, 900)], 16) },
    );
    let window = PrefillOptions { window_left: 100, ..CAUSAL };
    add::<bf16>(
        &mut t,
        "prefill_causal_window_left_100_bf16".into(),
        Case { options: window, ..Case::new(&[(300, 300), (150, 1200), (1, 102)], 3) },
    );
    let both = PrefillOptions { causal: false, window_left: 0, logits_soft_cap: 5.0, ..CAUSAL };
    add::<f16>(
        &mut t,
        "prefill_full_window_left_0_soft_cap_5_f16".into(),
        Case { options: both, ..Case::new(&[(64, 300), (1, 1)], 64) },
    );
    add::<f16>(
        &mut t,
        "prefill_requests_without_queries_take_no_rows_f16".into(),
        Case::new(&[(0, 50), (3, 3), (0, 0), (70, 80)], 16),
    );
    // Without a mask or window, queries need not be among the keys (cascade's shared level).
    let full = PrefillOptions { causal: false, ..CAUSAL };
    add::<f16>(
        &mut t,
        "prefill_full_more_queries_than_keys_f16".into(),
        Case { options: full, ..Case::new(&[(50, 10), (3, 0), (64, 700)], 16) },
    );
    // Small batches split their keys (below); this one fills the GPU with row tiles alone.
    for portable in [false, true] {
        let suffix = if portable { "_portable" } else { "" };
        let on = move |d: &Device| if portable { d.with_portable_kernels() } else { d.clone() };
        t.push(GpuTest::new(format!("prefill_enough_row_tiles_run_unsplit_f16{suffix}"), move |d| {
            let c = Case {
                num_kv_heads: 8,
                group: 2,
                ..Case::new(&[(1024, 1024), (1000, 1030), (1024, 2000), (999, 999)], 16)
            };
            ensure!(split_tiles(&on(d), &c)? == 0, "the case should not split");
            prefill_case::<f16>(&on(d), &c)
        }));
        // Too few row tiles to fill the GPU: the long ones' keys are split and merged in-launch.
        t.push(GpuTest::new(format!("prefill_one_long_request_among_short_splits_its_keys_f16{suffix}"), move |d| {
            let c = Case::new(&[(1, 20000), (3, 3), (70, 9000), (5, 40)], 16);
            ensure!(split_tiles(&on(d), &c)? > 0, "the case should split");
            prefill_case::<f16>(&on(d), &c)
        }));
    }
    let windowed = Case {
        options: PrefillOptions { window_left: 3000, logits_soft_cap: 20.0, ..CAUSAL },
        group: 7,
        ..Case::new(&[(200, 12000)], 7)
    };
    add::<bf16>(&mut t, "prefill_split_keys_window_3000_soft_cap_group_7_bf16".into(), windowed);
    // Head dims 80 and 96 (the portable kernel on every GPU): rows of 10 and 12 chunks in
    // 16-chunk shared rows; both block heights, split keys, a window with sinks.
    for head_dim in [80, 96] {
        for (ps, group) in [(1, 4), (7, 5), (48, 1), (100, 8)] {
            let c = Case {
                group,
                head_dim,
                seed: ps as u64 + head_dim as u64,
                ..Case::new(&[(200, 200), (37, 400), (1, 1), (5, 5)], ps)
            };
            add::<f16>(
                &mut t,
                format!("prefill_causal_page_size_{ps}_group_{group}_head_dim_{head_dim}_f16"),
                c.clone(),
            );
            let c = Case { layout: KvLayout::Hnd, options: PrefillOptions { causal: false, ..CAUSAL }, ..c };
            add::<bf16>(&mut t, format!("prefill_full_page_size_{ps}_group_{group}_head_dim_{head_dim}_hnd_bf16"), c);
        }
        let options = PrefillOptions { window_left: 300, logits_soft_cap: 20.0, ..CAUSAL };
        let c = Case { head_dim, options, sinks: true, ..Case::new(&[(1, 20000), (3, 3), (70, 9000)], 16) };
        add::<bf16>(&mut t, format!("prefill_split_keys_window_sinks_head_dim_{head_dim}_bf16"), c);
        let c = Case { head_dim, group: 3, ..Case::new(&[(100, 100), (3, 517), (0, 9), (64, 64)], 1) };
        t.push(GpuTest::new(format!("prefill_ragged_causal_group_3_head_dim_{head_dim}_f16"), move |d| {
            ragged_case::<f16>(d, &c)
        }));
    }
    // Queries and keys of 192 dims, values of 128 (DeepSeek-style prefill, ragged K/V): causal
    // and not, window and soft cap, groups 1 to 16, requests without keys or queries, and one
    // long request whose keys are split and merged.
    let qk_vo = (192, 128);
    for (group, options, seed) in [
        (4, CAUSAL, 1),
        (1, PrefillOptions { causal: false, ..CAUSAL }, 2),
        (16, PrefillOptions { window_left: 50, logits_soft_cap: 20.0, ..CAUSAL }, 3),
        (5, PrefillOptions { causal: false, sm_scale: Some(0.3), ..CAUSAL }, 4),
    ] {
        let c = Case { group, options, seed, ..Case::new(&[(100, 100), (3, 517), (0, 9), (64, 64), (1, 1)], 1) };
        let name = format!("prefill_ragged_head_dim_qk_192_vo_128_group_{group}_case_{seed}");
        let c2 = c.clone();
        t.push(GpuTest::new(format!("{name}_f16"), move |d| ragged_qk_vo_case::<f16>(d, &c, qk_vo)));
        t.push(GpuTest::new(format!("{name}_bf16"), move |d| ragged_qk_vo_case::<bf16>(d, &c2, qk_vo)));
    }
    let c = Case { options: PrefillOptions { causal: false, ..CAUSAL }, ..Case::new(&[(5, 0), (7, 3)], 1) };
    t.push(GpuTest::new("prefill_ragged_head_dim_qk_192_vo_128_queries_without_keys_f16", move |d| {
        ragged_qk_vo_case::<f16>(d, &c, qk_vo)
    }));
    let c = Case::new(&[(1, 20000), (3, 3), (70, 9000)], 1);
    t.push(GpuTest::new("prefill_ragged_head_dim_qk_192_vo_128_splits_its_keys_bf16", move |d| {
        ragged_qk_vo_case::<bf16>(d, &c, qk_vo)
    }));
    // Sinks: unsplit and split tiles (folded in once, by the merge), queries without keys,
    // window and soft cap, head dims 64 and 256; head 0 has none.
    let sinks = Case { sinks: true, ..Case::new(&[(200, 200), (37, 400), (1, 1), (5, 5)], 7) };
    add::<f16>(&mut t, "prefill_sinks_causal_page_size_7_f16".into(), sinks.clone());
    let c = Case {
        group: 5,
        head_dim: 64,
        layout: KvLayout::Hnd,
        options: PrefillOptions { causal: false, ..CAUSAL },
        // Queries without keys (only without a causal mask): zeros, and the sink as LSE.
        lens: vec![(200, 200), (37, 400), (1, 1), (5, 0)],
        ..sinks.clone()
    };
    add::<bf16>(&mut t, "prefill_sinks_full_group_5_head_dim_64_hnd_bf16".into(), c);
    let c = Case {
        group: 2,
        head_dim: 256,
        options: PrefillOptions { window_left: 100, logits_soft_cap: 30.0, ..CAUSAL },
        ..sinks
    };
    add::<f16>(&mut t, "prefill_sinks_window_left_100_soft_cap_30_head_dim_256_f16".into(), c);
    let c = Case { sinks: true, ..Case::new(&[(1, 20000), (3, 3), (70, 9000), (5, 40)], 16) };
    add::<bf16>(&mut t, "prefill_sinks_one_long_request_splits_its_keys_bf16".into(), c);
    let c = Case { sinks: true, group: 5, ..Case::new(&[(100, 100), (3, 517), (0, 9), (64, 64)], 1) };
    t.push(GpuTest::new("prefill_ragged_sinks_causal_group_5_f16", move |d| ragged_case::<f16>(d, &c)));
    // Contiguous K/V: the same kernel through one-token pages.
    let ragged = Case::new(&[(100, 100), (3, 517), (0, 9), (64, 64)], 1);
    let r2 = ragged.clone();
    t.push(GpuTest::new("prefill_ragged_causal_group_4_f16", move |d| ragged_case::<f16>(d, &ragged)));
    t.push(GpuTest::new("prefill_ragged_causal_group_4_f16_portable", move |d| {
        ragged_case::<f16>(&d.with_portable_kernels(), &r2)
    }));
    let ragged = Case {
        group: 5,
        head_dim: 64,
        options: PrefillOptions { causal: false, ..CAUSAL },
        ..Case::new(&[(40, 300), (7, 7)], 1)
    };
    let r2 = ragged.clone();
    t.push(GpuTest::new("prefill_ragged_full_group_5_head_dim_64_bf16", move |d| ragged_case::<bf16>(d, &ragged)));
    t.push(GpuTest::new("prefill_ragged_full_group_5_head_dim_64_bf16_portable", move |d| {
        ragged_case::<bf16>(&d.with_portable_kernels(), &r2)
    }));
    // The extremes with one KV head so the reference stays quick: a 2048-token prompt,
    // and a short chunk at the end of 16 384 cached tokens.
    add::<f16>(
        &mut t,
        "prefill_qo_2048_and_qo_16_over_kv_16384_f16".into(),
        Case { num_kv_heads: 1, group: 2, ..Case::new(&[(2048, 2100), (16, 16384)], 16) },
    );
    t
}

/// Captures `c`'s `run` in a CUDA graph and replays it: the same output as a direct run, bit
/// for bit; planned on `kernel` where given.
fn graph_replay_case(c: &Case, seed: u64, kernel: Option<PrefillKernel>) -> TestResult {
    // A device of its own (`capture_device` says why).
    let dev = capture_device()?;
    let mut r = rng(seed);
    let kv_lens: Vec<usize> = c.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = shape_for(&kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &kv_lens, c.page_size, shape.num_pages);
    let (cache, _) = random_cache::<f16>(&dev, &mut r, shape, 1)?;
    let heads = c.num_kv_heads * c.group;
    let mut plan = BatchPrefillPlan::new(&dev, &shape, heads, &c.qo_indptr(), &table, c.options)?;
    if let Some(kernel) = kernel {
        ensure!(plan.kernel() == kernel, "planned {:?}, the case wants {kernel:?}", plan.kernel());
    }
    let q = dev.upload(&random_values::<f16>(&mut r, plan.qo_elems()))?;
    expect_graph_replay_matches(&dev, plan.qo_elems(), |stream, out| plan.run(stream, &q, &cache, 0, out, None))
}

fn prefill_replays_from_a_cuda_graph(_: &Device) -> TestResult {
    graph_replay_case(&Case::new(&[(500, 700), (7, 300)], 16), 3, None)
}

fn validation_tests() -> Vec<GpuTest> {
    let shape = CacheShape { num_pages: 4, page_size: 16, num_kv_heads: 2, head_dim: 128, layout: KvLayout::Nhd };
    // One request of 19 keys.
    let table = PageTable { kv_indptr: vec![0, 2], kv_indices: vec![2, 0], kv_last_page_len: vec![3] };
    let (t1, t2, t3, t4) = (table.clone(), table.clone(), table.clone(), table.clone());
    vec![
        GpuTest::new("prefill_head_dim_vo_is_ragged_16_bit_and_192_128_only", move |d| {
            let narrow = PrefillOptions { head_dim_vo: Some(64), ..CAUSAL };
            let e = BatchPrefillPlan::new(d, &shape, 4, &[0, 3], &t4, narrow).err().ok_or("paged with head_dim_vo")?;
            ensure!(matches!(e, Error::BadOption { .. }), "wrong error: {e}");
            let (qo, kv) = ([0u32, 3], [0u32, 10]);
            let e = BatchPrefillPlan::ragged(d, 2, 128, 4, &qo, &kv, narrow).err().ok_or("accepted 128 / 64")?;
            let named = matches!(&e, Error::UnsupportedHeadDims { head_dim_qk: 128, head_dim_vo: 64, supported }
                if supported == &[(192, 128)]);
            ensure!(named, "wrong error: {e}");
            let deepseek = PrefillOptions { head_dim_vo: Some(128), ..CAUSAL };
            let fp8 = PrefillOptions { kv_dtype: Some(ferrinfer::DType::E4M3), ..deepseek };
            let e = BatchPrefillPlan::ragged(d, 2, 192, 4, &qo, &kv, fp8).err().ok_or("accepted fp8 192 / 128")?;
            ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
            // V and out are checked at their own width.
            let mut plan = BatchPrefillPlan::ragged(d, 2, 192, 4, &qo, &kv, deepseek)?;
            let (q, k) = (d.alloc_zeros::<f16>(3 * 4 * 192)?, d.alloc_zeros::<f16>(10 * 2 * 192)?);
            let (v, mut out) = (d.alloc_zeros::<f16>(10 * 2 * 192)?, d.alloc_zeros::<f16>(3 * 4 * 128)?);
            let e = plan.run_ragged(d.stream(), &q, &k, &v, &mut out, None).err().ok_or("accepted a 192-wide v")?;
            ensure!(matches!(e, Error::BufferLength { what: "v", expected: 2560, .. }), "wrong error: {e}");
            let (v, mut out) = (d.alloc_zeros::<f16>(10 * 2 * 128)?, d.alloc_zeros::<f16>(3 * 4 * 192)?);
            let e = plan.run_ragged(d.stream(), &q, &k, &v, &mut out, None).err().ok_or("accepted a 192-wide out")?;
            ensure!(matches!(e, Error::BufferLength { what: "out", expected: 1536, .. }), "wrong error: {e}");
            Ok(())
        }),
        GpuTest::new("prefill_rejects_more_queries_than_keys", move |d| {
            let e = BatchPrefillPlan::new(d, &shape, 4, &[0, 20], &t1, CAUSAL).err().ok_or("accepted 20 queries")?;
            ensure!(matches!(e, Error::QueryLongerThanKeys { seq: 0, qo_len: 20, kv_len: 19 }), "wrong error: {e}");
            Ok(())
        }),
        GpuTest::new("prefill_rejects_a_bad_qo_indptr", move |d| {
            let e = BatchPrefillPlan::new(d, &shape, 4, &[0, 2, 3], &t2, CAUSAL).err().ok_or("accepted 3 entries")?;
            ensure!(matches!(e, Error::IndptrLength { what: "qo_indptr", got: 3, batch: 1 }), "wrong error: {e}");
            let e = BatchPrefillPlan::new(d, &shape, 4, &[1, 2], &t2, CAUSAL).err().ok_or("accepted a start of 1")?;
            ensure!(matches!(e, Error::IndptrStart { what: "qo_indptr", first: 1 }), "wrong error: {e}");
            Ok(())
        }),
        GpuTest::new("prefill_rejects_query_of_wrong_length_and_f32", move |d| {
            let mut plan = BatchPrefillPlan::new(d, &shape, 4, &[0, 3], &t3, CAUSAL)?;
            let cache = PagedKvCache::<f16>::new(d, shape, 1)?;
            let (q, mut out) = (d.alloc_zeros::<f16>(3 * 4 * 128 - 8)?, d.alloc_zeros::<f16>(3 * 4 * 128)?);
            let e = plan.run(d.stream(), &q, &cache, 0, &mut out, None).err().ok_or("accepted a short q")?;
            ensure!(matches!(e, Error::BufferLength { what: "q", .. }), "wrong error: {e}");
            let cache = PagedKvCache::<f32>::new(d, shape, 1)?;
            let (q, mut out) = (d.alloc_zeros::<f32>(3 * 4 * 128)?, d.alloc_zeros::<f32>(3 * 4 * 128)?);
            let e = plan.run(d.stream(), &q, &cache, 0, &mut out, None).err().ok_or("accepted f32")?;
            ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
            Ok(())
        }),
    ]
}

/// `requests` requests of `tokens` draft tokens each at the end of keys drawn from `kv_lens`
/// (each at least `tokens`, as causal needs).
fn drafts(requests: usize, tokens: usize, kv_lens: &[usize]) -> Vec<(usize, usize)> {
    (0..requests).map(|i| (tokens, kv_lens[i % kv_lens.len()].max(tokens))).collect()
}

/// `case` as `name` on the device as opened, checked to plan the decode kernel (every GPU), and
/// as `name_portable` on the portable prefill kernel (checked not to).
fn add_decode_route<T: KvDType>(tests: &mut Vec<GpuTest>, name: String, case: Case) {
    let portable = case.clone();
    tests.push(GpuTest::new(name.clone(), move |d| {
        let kernel = planned(d, &case)?.1;
        ensure!(kernel == PrefillKernel::Decode, "planned {kernel:?} for draft tokens");
        prefill_case::<T>(d, &case)
    }));
    tests.push(GpuTest::new(format!("{name}_portable"), move |d| {
        let d = d.with_portable_kernels();
        let kernel = planned(&d, &portable)?.1;
        ensure!(kernel != PrefillKernel::Decode, "planned {kernel:?} on `with_portable_kernels`");
        prefill_case::<T>(&d, &portable)
    }));
}

/// Speculative decoding's batches (every request the same few draft tokens, `tokens × group`
/// ≤ 16 rows a KV head) on the decode kernel: causal or not, odd page sizes, keys on and off
/// the 64-key tile and fewer than a tile, groups 1–16, head dims 64–256, sinks, soft cap, split
/// keys, ragged K/V, a CUDA graph; and the batches that must stay on the prefill kernels.
fn decode_route_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    let kv = [4, 5, 64, 65, 300, 1000, 129];
    for ps in [1usize, 7, 16, 513] {
        let c = Case { seed: 500 + ps as u64, ..Case::new(&drafts(9, 4, &kv), ps) };
        add_decode_route::<f16>(&mut t, format!("prefill_draft_4_tokens_page_size_{ps}_group_4_f16"), c);
    }
    let c = Case { group: 8, head_dim: 64, layout: KvLayout::Hnd, seed: 510, ..Case::new(&drafts(5, 2, &kv), 3) };
    add_decode_route::<bf16>(&mut t, "prefill_draft_2_tokens_page_size_3_group_8_head_dim_64_hnd_bf16".into(), c);
    let c = Case { group: 16, head_dim: 256, seed: 511, ..Case::new(&drafts(6, 1, &kv), 48) };
    add_decode_route::<f16>(&mut t, "prefill_one_token_page_size_48_group_16_head_dim_256_f16".into(), c);
    let c = Case { group: 5, sinks: true, seed: 512, ..Case::new(&drafts(7, 3, &kv), 7) };
    add_decode_route::<f16>(&mut t, "prefill_draft_3_tokens_group_5_with_sinks_page_size_7_f16".into(), c);
    let full_capped = PrefillOptions { causal: false, logits_soft_cap: 30.0, ..CAUSAL };
    let c = Case {
        group: 2,
        head_dim: 96,
        options: full_capped,
        seed: 513,
        ..Case::new(&[(8, 0), (8, 3), (8, 100), (8, 777)], 100)
    };
    add_decode_route::<bf16>(&mut t, "prefill_full_8_tokens_soft_cap_head_dim_96_page_size_100_bf16".into(), c);
    let c = Case { group: 1, head_dim: 80, seed: 514, ..Case::new(&drafts(4, 16, &kv), 16) };
    add_decode_route::<f16>(&mut t, "prefill_draft_16_tokens_group_1_head_dim_80_page_size_16_f16".into(), c);
    // Two requests of 4 draft tokens over 20000 and 9000 keys: too few blocks for the GPU, so
    // their keys are split, the causal mask applied in each request's last part only.
    t.push(GpuTest::new("prefill_draft_4_tokens_of_two_requests_split_their_keys_f16", |d| {
        let c = Case { seed: 515, ..Case::new(&[(4, 20000), (4, 9000)], 16) };
        let (split, kernel) = planned(d, &c)?;
        ensure!(kernel == PrefillKernel::Decode && split > 0, "planned {kernel:?} with {split} split requests");
        prefill_case::<f16>(d, &c)
    }));
    t.push(GpuTest::new("prefill_ragged_draft_4_tokens_group_4_f16", move |d| {
        let c = Case { seed: 516, ..Case::new(&drafts(6, 4, &kv), 1) };
        let plan = BatchPrefillPlan::ragged(d, c.num_kv_heads, c.head_dim, 8, &c.qo_indptr(), &c.kv_indptr(), CAUSAL)?;
        ensure!(plan.kernel() == PrefillKernel::Decode, "planned {:?}", plan.kernel());
        ragged_case::<f16>(d, &c)
    }));
    // Not decode's: different query counts, a window, more than 16 rows a KV head, an 8-bit
    // cache with several tokens (checked in fp8.rs), a handle that asks for a kernel.
    t.push(GpuTest::new("prefill_batches_decode_does_not_compute_stay_on_prefill_kernels", move |d| {
        let window = PrefillOptions { window_left: 100, ..CAUSAL };
        let cases = [
            Case::new(&[(4, 300), (3, 300)], 16),
            Case { options: window, ..Case::new(&drafts(4, 4, &kv), 16) },
            Case::new(&drafts(4, 5, &kv), 16),
            Case { group: 8, ..Case::new(&drafts(4, 3, &kv), 16) },
        ];
        for c in &cases {
            let kernel = planned(d, c)?.1;
            ensure!(kernel != PrefillKernel::Decode, "planned {kernel:?} for {:?}", c.lens);
        }
        let c = Case::new(&drafts(4, 4, &kv), 16);
        let kernel = planned(&d.with_hopper_prefill(), &c)?.1;
        ensure!(kernel != PrefillKernel::Decode, "planned {kernel:?} on `with_hopper_prefill`");
        Ok(())
    }));
    t.push(GpuTest::new("prefill_draft_tokens_replay_from_a_cuda_graph", |_| {
        let c = Case::new(&[(4, 20000), (4, 9000), (4, 10)], 16);
        graph_replay_case(&c, 4, Some(PrefillKernel::Decode))
    }));
    t
}

pub fn tests() -> Vec<GpuTest> {
    let mut t = case_tests();
    t.extend(hopper_tests());
    t.extend(decode_route_tests());
    t.push(GpuTest::new("prefill_replays_from_a_cuda_graph", prefill_replays_from_a_cuda_graph));
    t.extend(validation_tests());
    t
}
