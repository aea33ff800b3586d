//! Multi-head latent attention against the f64 CPU reference: run-time page sizes (1, 7, 64,
//! 100, a page larger than the sequence), 16, 64 and 128 heads, kv lengths from 0 and 1 to
//! 32768 on shuffled pages, decode and causal multi-token queries, split row tiles and their
//! merge, f16 and bf16, e4m3 and e5m2 latent caches with a scale, poisoned outputs, NaN in
//! every pool slot that holds no key (page sizes 64 and 128 take the Hopper kernel's TMA
//! producer, the others its `cp.async` one); the MLA
//! append (quantising into 8-bit caches) against the reference append; the checks of a run.
//! The 16-bit cases run twice: on the device as opened (on an H100 or H200, the `wgmma`
//! kernel) and, as `…_portable`, on `Device::with_portable_kernels`. Error bounds:
//! `ferrinfer_tests::compare`.
use ferrinfer::{
    bf16, f16, reference, BatchMlaPlan, CacheShape, Device, E4m3, E5m2, Error, KvDType, KvLayout, MlaAppendPlan,
    MlaCacheShape, MlaKvCache, MlaLayerPools, MlaOptions, PageTable,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::graph::{capture_device, expect_graph_replay_matches};
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{
    expect_bitwise_eq, pages_needed, poison, poison_slots_without_keys, random_table, random_values, rng,
};
use rand::Rng;

const CKV: usize = MlaCacheShape::CKV_DIM;
const KPE: usize = MlaCacheShape::KPE_DIM;

#[derive(Clone, Debug)]
struct Case {
    /// (qo_len, kv_len) per request.
    lens: Vec<(usize, usize)>,
    page_size: usize,
    heads: usize,
    causal: bool,
    seed: u64,
    /// The pools' slots that hold no key of a request are NaN (a partly filled last page's
    /// later slots, unused pages): no kernel may let them reach an output.
    nan_past_ends: bool,
}

impl Case {
    fn decode(kv_lens: &[usize], page_size: usize, heads: usize) -> Self {
        let lens = kv_lens.iter().map(|&kv| (1, kv)).collect();
        Case { lens, page_size, heads, causal: false, seed: (page_size * 131 + heads) as u64, nan_past_ends: false }
    }

    fn qo_indptr(&self) -> Vec<u32> {
        let mut indptr = vec![0u32];
        for &(qo, _) in &self.lens {
            indptr.push(indptr[indptr.len() - 1] + qo as u32);
        }
        indptr
    }

    /// The options of a plan over a cache of `C` and queries of `T`.
    fn options<T: KvDType, C: KvDType>(&self) -> MlaOptions {
        let kv_dtype = (T::DTYPE != C::DTYPE).then_some(C::DTYPE);
        MlaOptions { sm_scale: 1.0 / 192f32.sqrt(), causal: self.causal, kv_dtype }
    }
}

/// An 8-bit cache's scale in the tests: stored values up to about ±16 mean values up to about
/// ±1, as the 16-bit tests' random values; not a power of two, so the folded scales round.
const FP8_SCALE: f32 = 0.0625 * 1.1;

/// The scale of a cache of `C`: [`FP8_SCALE`] for 8 bits, 1 for 16.
fn scale_of<C: KvDType>() -> f32 {
    if C::DTYPE.is_fp8() {
        FP8_SCALE
    } else {
        1.0
    }
}

/// A cache of one layer of random values for `kv_lens` on shuffled pages (an 8-bit cache's
/// stored values about ±1 / its scale, [`scale_of`], which is set), its host pools
/// `(ckv, kpe)` and its page table.
#[allow(clippy::type_complexity)]
fn random_mla_cache<C: KvDType>(
    dev: &Device,
    r: &mut impl Rng,
    kv_lens: &[usize],
    page_size: usize,
    nan_past_ends: bool,
) -> Result<(MlaKvCache<C>, (Vec<C>, Vec<C>), PageTable), Box<dyn std::error::Error>> {
    let shape = MlaCacheShape { num_pages: pages_needed(kv_lens, page_size) + 3, page_size };
    let table = random_table(r, kv_lens, page_size, shape.num_pages);
    let scale = scale_of::<C>() as f64;
    let mut values = |n: usize| -> Vec<C> { (0..n).map(|_| C::from_f64(r.random_range(-1.0..1.0) / scale)).collect() };
    let (mut ckv, mut kpe) = (values(shape.ckv_pool_elems()), values(shape.kpe_pool_elems()));
    if nan_past_ends {
        poison_slots_without_keys(&mut ckv, CKV, &table, kv_lens, page_size);
        poison_slots_without_keys(&mut kpe, KPE, &table, kv_lens, page_size);
    }
    let mut cache = MlaKvCache::from_layers(shape, vec![MlaLayerPools::new(dev.upload(&ckv)?, dev.upload(&kpe)?)])?;
    if C::DTYPE.is_fp8() {
        cache.set_scale(0, scale_of::<C>())?;
    }
    Ok((cache, (ckv, kpe), table))
}

fn mla_case<T: KvDType, C: KvDType>(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.seed);
    let kv_lens: Vec<usize> = c.lens.iter().map(|&(_, kv)| kv).collect();
    let (cache, (ckv, kpe), table) = random_mla_cache::<C>(dev, &mut r, &kv_lens, c.page_size, c.nan_past_ends)?;
    let qo_indptr = c.qo_indptr();
    let rows = *qo_indptr.last().unwrap() as usize * c.heads;
    let q_nope: Vec<T> = random_values(&mut r, rows * CKV);
    let q_pe: Vec<T> = random_values(&mut r, rows * KPE);
    let options = c.options::<T, C>();
    let mut plan = BatchMlaPlan::new(dev, cache.shape(), c.heads, &qo_indptr, &table, options)?;
    ensure!(plan.out_elems() == rows * CKV && plan.q_pe_elems() == rows * KPE, "element counts");
    let mut out = dev.upload(&vec![poison::<T>(); rows * CKV])?;
    let mut lse = dev.upload(&vec![f32::NAN; rows])?;
    let (qn, qp) = (dev.upload(&q_nope)?, dev.upload(&q_pe)?);
    plan.run(dev.stream(), &qn, &qp, &cache, 0, &mut out, Some(&mut lse))?;
    let scale = scale_of::<C>();
    let (want, want_lse) =
        reference::mla_scaled(cache.shape(), &ckv, &kpe, scale, &table, &qo_indptr, &q_nope, &q_pe, c.heads, &options);
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, c.heads, CKV, "token")?)
}

/// Whether `c`'s plan splits row tiles (merged by the second launch), on this GPU.
fn splits(dev: &Device, c: &Case) -> Result<bool, Box<dyn std::error::Error>> {
    let kv_lens: Vec<usize> = c.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = MlaCacheShape { num_pages: pages_needed(&kv_lens, c.page_size) + 3, page_size: c.page_size };
    let table = random_table(&mut rng(c.seed), &kv_lens, c.page_size, shape.num_pages);
    let options = c.options::<f16, f16>();
    let split = ferrinfer::mla_split(&shape, c.heads, &c.qo_indptr(), &table, options, dev.multiprocessor_count(), 1)?;
    Ok(!split.merge_tiles.is_empty())
}

/// `case` with queries of `T` over a cache of `C`, named `name` and the types; with
/// `split`, it checks first that the plan splits row tiles (or not).
fn add<T: KvDType, C: KvDType>(t: &mut Vec<GpuTest>, name: &str, case: Case, split: Option<bool>) {
    let name = match T::DTYPE == C::DTYPE {
        true => format!("{name}_{}", T::DTYPE.name()),
        false => format!("{name}_{}_{}", C::DTYPE.name(), T::DTYPE.name()),
    };
    // 16-bit caches take the `wgmma` kernel on Hopper: run them on the portable one too.
    if T::DTYPE == C::DTYPE {
        let (portable_name, portable_case) = (format!("{name}_portable"), case.clone());
        t.push(GpuTest::new(portable_name, move |d| mla_case::<T, C>(&d.with_portable_kernels(), &portable_case)));
    }
    t.push(GpuTest::new(name, move |d| {
        if let Some(want) = split {
            ensure!(splits(d, &case)? == want, "the plan {} split row tiles", if want { "does not" } else { "does" });
        }
        mla_case::<T, C>(d, &case)
    }));
}

/// The MLA append writes exactly the reference's tokens, in both pools, and nothing else
/// (into an 8-bit cache quantised as the host quantiser does, with the layer's scale).
fn append_case<T: KvDType, C: KvDType>(dev: &Device, page_size: usize) -> TestResult {
    let mut r = rng(40 + page_size as u64);
    // After the append: lengths 9, 1, 0 and 130; appended 4, 1, 0 and 67 tokens.
    let kv_lens = [9, 1, 0, 130];
    let append_indptr = [0u32, 4, 5, 5, 72];
    let (mut cache, (mut ckv, mut kpe), table) = random_mla_cache::<C>(dev, &mut r, &kv_lens, page_size, false)?;
    let plan = MlaAppendPlan::new(dev, cache.shape(), &table, &append_indptr)?;
    ensure!(plan.ckv_elems() == 72 * CKV && plan.kpe_elems() == 72 * KPE, "ragged element counts");
    let (new_ckv, new_kpe): (Vec<T>, Vec<T>) = (random_values(&mut r, 72 * CKV), random_values(&mut r, 72 * KPE));
    plan.run(dev.stream(), &mut cache, 0, &dev.upload(&new_ckv)?, &dev.upload(&new_kpe)?)?;
    let pool = |dim| CacheShape {
        num_pages: cache.shape().num_pages,
        page_size,
        num_kv_heads: 1,
        head_dim: dim,
        layout: KvLayout::Nhd,
    };
    let scale = scale_of::<C>();
    reference::append_quantised(&pool(CKV), &mut ckv, &table, &append_indptr, &new_ckv, scale);
    reference::append_quantised(&pool(KPE), &mut kpe, &table, &append_indptr, &new_kpe, scale);
    let layer = cache.layer(0)?;
    expect_bitwise_eq("ckv pool", &dev.download(layer.ckv())?, &ckv, CKV)?;
    expect_bitwise_eq("kpe pool", &dev.download(layer.kpe())?, &kpe, KPE)?;
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    // Decode over shuffled pages, with empty, one-token and partly filled last pages.
    let mixed = [0, 1, 7, 63, 64, 65, 300, 1000];
    add::<f16, f16>(&mut t, "mla_decode_page_size_1_heads_16", Case::decode(&mixed, 1, 16), None);
    add::<bf16, bf16>(&mut t, "mla_decode_page_size_7_heads_128", Case::decode(&mixed, 7, 128), None);
    add::<f16, f16>(&mut t, "mla_decode_page_size_64_heads_64", Case::decode(&mixed, 64, 64), None);
    add::<bf16, bf16>(&mut t, "mla_decode_page_size_100_heads_16", Case::decode(&mixed, 100, 16), None);
    // Slots holding no key are NaN: keys past a request's end must not reach P · V.
    for (page_size, heads) in [(7, 128), (64, 128), (128, 128), (1, 64), (100, 16)] {
        let case = Case { nan_past_ends: true, ..Case::decode(&mixed, page_size, heads) };
        let name = format!("mla_decode_slots_past_the_ends_hold_nan_page_size_{page_size}_heads_{heads}");
        add::<f16, f16>(&mut t, &name, case, None);
    }
    // A page larger than every sequence.
    add::<f16, f16>(
        &mut t,
        "mla_decode_page_size_513_longer_than_the_sequences_heads_128",
        Case::decode(&[3, 1, 500], 513, 128),
        None,
    );
    // A full batch: as many row tiles as SMs, nothing split.
    let full = vec![700; 96];
    add::<bf16, bf16>(&mut t, "mla_decode_batch_96_heads_128_unsplit", Case::decode(&full, 64, 128), Some(false));
    // Few long requests: their keys split over many blocks, merged by the second launch.
    add::<f16, f16>(
        &mut t,
        "mla_decode_one_request_of_32768_keys_splits_heads_128",
        Case::decode(&[32768], 64, 128),
        Some(true),
    );
    add::<bf16, bf16>(
        &mut t,
        "mla_decode_split_page_size_1_heads_64",
        Case::decode(&[5000, 3, 0, 9000], 1, 64),
        Some(true),
    );
    add::<f16, f16>(&mut t, "mla_decode_split_page_size_7_heads_16", Case::decode(&[8192, 4097], 7, 16), Some(true));
    // A decode batch of 16 over 700 to 2950 keys: its row tiles split in a few parts each
    // (one group of the merge's loads).
    let sixteen: Vec<usize> = (0..16).map(|i| 700 + 150 * i).collect();
    add::<bf16, bf16>(
        &mut t,
        "mla_decode_batch_16_split_in_few_parts_page_size_64_heads_128",
        Case::decode(&sixteen, 64, 128),
        Some(true),
    );
    // Several query tokens a request (speculative decoding, chunked prefill), causal: 16 heads
    // pack four tokens in a block, 128 heads take two blocks a token.
    let multi = vec![(1, 1), (6, 50), (3, 3), (0, 20), (17, 400)];
    let causal =
        |page_size, heads| Case { lens: multi.clone(), page_size, heads, causal: true, seed: 77, nan_past_ends: false };
    add::<f16, f16>(&mut t, "mla_causal_multi_token_page_size_7_heads_16", causal(7, 16), None);
    add::<bf16, bf16>(&mut t, "mla_causal_multi_token_page_size_64_heads_128", causal(64, 128), None);
    add::<f16, f16>(&mut t, "mla_causal_multi_token_page_size_1_heads_64", causal(1, 64), None);
    add::<bf16, bf16>(
        &mut t,
        "mla_causal_one_long_chunk_splits_heads_16",
        Case { lens: vec![(40, 9000)], page_size: 100, heads: 16, causal: true, seed: 3, nan_past_ends: false },
        Some(true),
    );
    // Without causality queries may outnumber keys, and see every key.
    let full_mask =
        Case { lens: vec![(5, 2), (2, 70)], page_size: 7, heads: 16, causal: false, seed: 5, nan_past_ends: false };
    add::<f16, f16>(&mut t, "mla_non_causal_multi_token_page_size_7_heads_16", full_mask, None);

    // 8-bit latent caches with a scale, widened in shared memory: decode, split, causal.
    add::<f16, E4m3>(&mut t, "mla_decode_page_size_7_heads_128", Case::decode(&mixed, 7, 128), None);
    add::<bf16, E5m2>(&mut t, "mla_decode_page_size_64_heads_16", Case::decode(&mixed, 64, 16), None);
    let split_fp8 = Case::decode(&[5000, 3, 0, 9000], 1, 64);
    add::<bf16, E4m3>(&mut t, "mla_decode_split_page_size_1_heads_64", split_fp8, Some(true));
    add::<f16, E5m2>(&mut t, "mla_causal_multi_token_page_size_100_heads_16", causal(100, 16), None);

    for page_size in [1, 7, 64, 100] {
        t.push(GpuTest::new(format!("mla_append_page_size_{page_size}_bf16"), move |d| {
            append_case::<bf16, bf16>(d, page_size)
        }));
    }
    t.push(GpuTest::new("mla_append_page_size_7_f16", |d| append_case::<f16, f16>(d, 7)));
    t.push(GpuTest::new("mla_append_quantises_into_e4m3_page_size_7_f16", |d| append_case::<f16, E4m3>(d, 7)));
    t.push(GpuTest::new("mla_append_quantises_into_e5m2_page_size_64_bf16", |d| append_case::<bf16, E5m2>(d, 64)));

    t.push(GpuTest::new("mla_copy_pages_copies_both_pools_and_refuses_a_page_past_them_bf16", |d| {
        let mut r = rng(11);
        let (mut cache, (mut ckv, mut kpe), _) = random_mla_cache::<bf16>(d, &mut r, &[20], 7, false)?;
        let (pages, ps) = (cache.shape().num_pages, 7);
        cache.copy_pages(
            d.stream(),
            &[ferrinfer::PageCopy { src: 1, dst: 3 }, ferrinfer::PageCopy { src: 4, dst: 0 }],
        )?;
        for (pool, dim) in [(&mut ckv, CKV), (&mut kpe, KPE)] {
            let page = ps * dim;
            pool.copy_within(page..2 * page, 3 * page);
            pool.copy_within(4 * page..5 * page, 0);
        }
        let layer = cache.layer(0)?;
        expect_bitwise_eq("ckv pool", &d.download(layer.ckv())?, &ckv, CKV)?;
        expect_bitwise_eq("kpe pool", &d.download(layer.kpe())?, &kpe, KPE)?;
        let past = [ferrinfer::PageCopy { src: 0, dst: pages as u32 }];
        ensure!(matches!(cache.copy_pages(d.stream(), &past), Err(Error::TooLarge { .. })), "a page past the pools");
        Ok(())
    }));

    t.push(GpuTest::new("mla_run_replays_from_a_cuda_graph_split_and_not_f16", |_| {
        // A device of its own (`capture_device` says why).
        let dev = capture_device()?;
        let d = &dev;
        for kv_lens in [vec![20000], vec![300; 64]] {
            let mut r = rng(9);
            let (cache, _, table) = random_mla_cache::<f16>(d, &mut r, &kv_lens, 16, false)?;
            let qo: Vec<u32> = (0..=kv_lens.len() as u32).collect();
            let options = MlaOptions { sm_scale: 0.1, causal: false, kv_dtype: None };
            let mut plan = BatchMlaPlan::new(d, cache.shape(), 64, &qo, &table, options)?;
            let q_nope = d.upload(&random_values::<f16>(&mut r, plan.q_nope_elems()))?;
            let q_pe = d.upload(&random_values::<f16>(&mut r, plan.q_pe_elems()))?;
            expect_graph_replay_matches(d, plan.out_elems(), |stream, out| {
                plan.run(stream, &q_nope, &q_pe, &cache, 0, out, None)
            })?;
        }
        Ok(())
    }));

    t.push(GpuTest::new("mla_run_checks_its_buffers_cache_and_layer", |d| {
        let mut r = rng(10);
        let (cache, _, table) = random_mla_cache::<f16>(d, &mut r, &[100, 5], 7, false)?;
        let options = MlaOptions { sm_scale: 0.1, causal: false, kv_dtype: None };
        let mut plan = BatchMlaPlan::new(d, cache.shape(), 16, &[0, 1, 2], &table, options)?;
        let q_nope = d.alloc_zeros::<f16>(plan.q_nope_elems())?;
        let q_pe = d.alloc_zeros::<f16>(plan.q_pe_elems())?;
        let mut out = d.alloc_zeros::<f16>(plan.out_elems())?;
        let short = d.alloc_zeros::<f16>(plan.q_pe_elems() - 8)?;
        let e = plan.run(d.stream(), &q_nope, &short, &cache, 0, &mut out, None).unwrap_err();
        ensure!(matches!(e, Error::BufferLength { what: "q_pe", .. }), "short q_pe: {e}");
        let e = plan.run(d.stream(), &q_pe, &q_nope, &cache, 0, &mut out, None).unwrap_err();
        ensure!(matches!(e, Error::BufferLength { what: "q_nope", .. }), "swapped queries: {e}");
        let mut lse = d.alloc_zeros::<f32>(3)?;
        let e = plan.run(d.stream(), &q_nope, &q_pe, &cache, 0, &mut out, Some(&mut lse)).unwrap_err();
        ensure!(matches!(e, Error::BufferLength { what: "lse", .. }), "long lse: {e}");
        let e = plan.run(d.stream(), &q_nope, &q_pe, &cache, 1, &mut out, None).unwrap_err();
        ensure!(matches!(e, Error::LayerOutOfRange { layer: 1, num_layers: 1 }), "layer 1: {e}");
        // A cache of fewer pages than planned: its pools are shorter than the table may reach.
        let small = MlaKvCache::<f16>::new(d, MlaCacheShape { num_pages: 3, page_size: 7 }, 1)?;
        let e = plan.run(d.stream(), &q_nope, &q_pe, &small, 0, &mut out, None).unwrap_err();
        ensure!(matches!(e, Error::ShapeMismatch { .. }), "smaller cache: {e}");
        // A page table naming a page past the pool is refused when planning.
        let bad = PageTable { kv_indices: table.kv_indices.iter().map(|_| 1000).collect(), ..table.clone() };
        let e = BatchMlaPlan::new(d, cache.shape(), 16, &[0, 1, 2], &bad, options).err();
        ensure!(e.is_some(), "a page past the pool was planned");
        // A cache of another element type than planned: an error, never a launch.
        let (mut fp8, _, _) = random_mla_cache::<E4m3>(d, &mut r, &[100, 5], 7, false)?;
        let e = plan.run(d.stream(), &q_nope, &q_pe, &fp8, 0, &mut out, None).unwrap_err();
        ensure!(matches!(e, Error::KvDTypeMismatch { planned: "f16", got: "e4m3" }), "an e4m3 cache: {e}");
        // Scales: 8-bit caches only, finite and positive; a refused one changes nothing.
        let e = fp8.set_scale(0, 0.0).unwrap_err();
        ensure!(matches!(e, Error::BadScale { .. }), "scale 0: {e}");
        ensure!(fp8.scale(0)? == FP8_SCALE, "a refused scale changed the layer's");
        let mut small = small;
        ensure!(matches!(small.set_scale(0, 2.0), Err(Error::UnsupportedDType { .. })), "a 16-bit cache's scale");
        ensure!(matches!(MlaKvCache::<f32>::new(d, *cache.shape(), 1), Err(Error::UnsupportedDType { .. })), "f32");
        plan.run(d.stream(), &q_nope, &q_pe, &cache, 0, &mut out, None)?;
        Ok(())
    }));
    t
}
