//! Multi-head latent attention against the f64 CPU reference: run-time page sizes (1, 7, 64,
//! 100, a page larger than the sequence), 16, 64 and 128 heads, kv lengths from 0 and 1 to
//! 32768 on shuffled pages, decode and causal multi-token queries, split row tiles and their
//! merge, f16 and bf16, poisoned outputs; the MLA append against the reference append; the
//! checks of a run. Error bounds: `ferrinfer_tests::compare`.
use ferrinfer::{
    bf16, f16, reference, BatchMlaPlan, CacheShape, Device, Error, KvDType, KvLayout, MlaAppendPlan, MlaCacheShape,
    MlaKvCache, MlaLayerPools, MlaOptions, PageTable,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::graph::expect_graph_replay_matches;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{expect_bitwise_eq, pages_needed, poison, random_table, random_values, rng};

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
}

impl Case {
    fn decode(kv_lens: &[usize], page_size: usize, heads: usize) -> Self {
        let lens = kv_lens.iter().map(|&kv| (1, kv)).collect();
        Case { lens, page_size, heads, causal: false, seed: (page_size * 131 + heads) as u64 }
    }

    fn qo_indptr(&self) -> Vec<u32> {
        let mut indptr = vec![0u32];
        for &(qo, _) in &self.lens {
            indptr.push(indptr[indptr.len() - 1] + qo as u32);
        }
        indptr
    }

    fn options(&self) -> MlaOptions {
        MlaOptions { sm_scale: 1.0 / 192f32.sqrt(), causal: self.causal }
    }
}

/// A cache of one layer of random values for `kv_lens` on shuffled pages, its host pools
/// `(ckv, kpe)` and its page table.
#[allow(clippy::type_complexity)]
fn random_mla_cache<T: KvDType>(
    dev: &Device,
    r: &mut impl rand::Rng,
    kv_lens: &[usize],
    page_size: usize,
) -> Result<(MlaKvCache<T>, (Vec<T>, Vec<T>), PageTable), Box<dyn std::error::Error>> {
    let shape = MlaCacheShape { num_pages: pages_needed(kv_lens, page_size) + 3, page_size };
    let table = random_table(r, kv_lens, page_size, shape.num_pages);
    let ckv: Vec<T> = random_values(r, shape.ckv_pool_elems());
    let kpe: Vec<T> = random_values(r, shape.kpe_pool_elems());
    let cache = MlaKvCache::from_layers(shape, vec![MlaLayerPools::new(dev.upload(&ckv)?, dev.upload(&kpe)?)])?;
    Ok((cache, (ckv, kpe), table))
}

fn mla_case<T: KvDType>(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.seed);
    let kv_lens: Vec<usize> = c.lens.iter().map(|&(_, kv)| kv).collect();
    let (cache, (ckv, kpe), table) = random_mla_cache::<T>(dev, &mut r, &kv_lens, c.page_size)?;
    let qo_indptr = c.qo_indptr();
    let rows = *qo_indptr.last().unwrap() as usize * c.heads;
    let q_nope: Vec<T> = random_values(&mut r, rows * CKV);
    let q_pe: Vec<T> = random_values(&mut r, rows * KPE);
    let mut plan = BatchMlaPlan::new(dev, cache.shape(), c.heads, &qo_indptr, &table, c.options())?;
    ensure!(plan.out_elems() == rows * CKV && plan.q_pe_elems() == rows * KPE, "element counts");
    let mut out = dev.upload(&vec![poison::<T>(); rows * CKV])?;
    let mut lse = dev.upload(&vec![f32::NAN; rows])?;
    let (qn, qp) = (dev.upload(&q_nope)?, dev.upload(&q_pe)?);
    plan.run(dev.stream(), &qn, &qp, &cache, 0, &mut out, Some(&mut lse))?;
    let (want, want_lse) =
        reference::mla(cache.shape(), &ckv, &kpe, &table, &qo_indptr, &q_nope, &q_pe, c.heads, &c.options());
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, c.heads, CKV, "token")?)
}

/// Whether `c`'s plan splits row tiles (merged by the second launch), on this GPU.
fn splits(dev: &Device, c: &Case) -> Result<bool, Box<dyn std::error::Error>> {
    let kv_lens: Vec<usize> = c.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = MlaCacheShape { num_pages: pages_needed(&kv_lens, c.page_size) + 3, page_size: c.page_size };
    let table = random_table(&mut rng(c.seed), &kv_lens, c.page_size, shape.num_pages);
    let split =
        ferrinfer::mla_split(&shape, c.heads, &c.qo_indptr(), &table, c.options(), dev.multiprocessor_count(), 1)?;
    Ok(!split.merge_tiles.is_empty())
}

fn add<T: KvDType>(t: &mut Vec<GpuTest>, name: &str, case: Case, split: Option<bool>) {
    let name = format!("{name}_{}", T::DTYPE.name());
    t.push(GpuTest::new(name, move |d| {
        if let Some(want) = split {
            ensure!(splits(d, &case)? == want, "the plan {} split row tiles", if want { "does not" } else { "does" });
        }
        mla_case::<T>(d, &case)
    }));
}

/// The MLA append writes exactly the reference's tokens, in both pools, and nothing else.
fn append_case<T: KvDType>(dev: &Device, page_size: usize) -> TestResult {
    let mut r = rng(40 + page_size as u64);
    // After the append: lengths 9, 1, 0 and 130; appended 4, 1, 0 and 67 tokens.
    let kv_lens = [9, 1, 0, 130];
    let append_indptr = [0u32, 4, 5, 5, 72];
    let (mut cache, (mut ckv, mut kpe), table) = random_mla_cache::<T>(dev, &mut r, &kv_lens, page_size)?;
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
    reference::append(&pool(CKV), &mut ckv, &table, &append_indptr, &new_ckv);
    reference::append(&pool(KPE), &mut kpe, &table, &append_indptr, &new_kpe);
    let layer = cache.layer(0)?;
    expect_bitwise_eq("ckv pool", &dev.download(layer.ckv())?, &ckv, CKV)?;
    expect_bitwise_eq("kpe pool", &dev.download(layer.kpe())?, &kpe, KPE)?;
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    // Decode over shuffled pages, with empty, one-token and partly filled last pages.
    let mixed = [0, 1, 7, 63, 64, 65, 300, 1000];
    add::<f16>(&mut t, "mla_decode_page_size_1_heads_16", Case::decode(&mixed, 1, 16), None);
    add::<bf16>(&mut t, "mla_decode_page_size_7_heads_128", Case::decode(&mixed, 7, 128), None);
    add::<f16>(&mut t, "mla_decode_page_size_64_heads_64", Case::decode(&mixed, 64, 64), None);
    add::<bf16>(&mut t, "mla_decode_page_size_100_heads_16", Case::decode(&mixed, 100, 16), None);
    // A page larger than every sequence.
    add::<f16>(
        &mut t,
        "mla_decode_page_size_513_longer_than_the_sequences_heads_128",
        Case::decode(&[3, 1, 500], 513, 128),
        None,
    );
    // A full batch: as many row tiles as SMs, nothing split.
    let full = vec![700; 96];
    add::<bf16>(&mut t, "mla_decode_batch_96_heads_128_unsplit", Case::decode(&full, 64, 128), Some(false));
    // Few long requests: their keys split over many blocks, merged by the second launch.
    add::<f16>(
        &mut t,
        "mla_decode_one_request_of_32768_keys_splits_heads_128",
        Case::decode(&[32768], 64, 128),
        Some(true),
    );
    add::<bf16>(&mut t, "mla_decode_split_page_size_1_heads_64", Case::decode(&[5000, 3, 0, 9000], 1, 64), Some(true));
    add::<f16>(&mut t, "mla_decode_split_page_size_7_heads_16", Case::decode(&[8192, 4097], 7, 16), Some(true));
    // Several query tokens a request (speculative decoding, chunked prefill), causal: 16 heads
    // pack four tokens in a block, 128 heads take two blocks a token.
    let multi = vec![(1, 1), (6, 50), (3, 3), (0, 20), (17, 400)];
    let causal = |page_size, heads| Case { lens: multi.clone(), page_size, heads, causal: true, seed: 77 };
    add::<f16>(&mut t, "mla_causal_multi_token_page_size_7_heads_16", causal(7, 16), None);
    add::<bf16>(&mut t, "mla_causal_multi_token_page_size_64_heads_128", causal(64, 128), None);
    add::<f16>(&mut t, "mla_causal_multi_token_page_size_1_heads_64", causal(1, 64), None);
    add::<bf16>(
        &mut t,
        "mla_causal_one_long_chunk_splits_heads_16",
        Case { lens: vec![(40, 9000)], page_size: 100, heads: 16, causal: true, seed: 3 },
        Some(true),
    );
    // Without causality queries may outnumber keys, and see every key.
    let full_mask = Case { lens: vec![(5, 2), (2, 70)], page_size: 7, heads: 16, causal: false, seed: 5 };
    add::<f16>(&mut t, "mla_non_causal_multi_token_page_size_7_heads_16", full_mask, None);

    for page_size in [1, 7, 64, 100] {
        t.push(GpuTest::new(format!("mla_append_page_size_{page_size}_bf16"), move |d| {
            append_case::<bf16>(d, page_size)
        }));
    }
    t.push(GpuTest::new("mla_append_page_size_7_f16", |d| append_case::<f16>(d, 7)));

    t.push(GpuTest::new("mla_run_replays_from_a_cuda_graph_split_and_not_f16", |d| {
        for kv_lens in [vec![20000], vec![300; 64]] {
            let mut r = rng(9);
            let (cache, _, table) = random_mla_cache::<f16>(d, &mut r, &kv_lens, 16)?;
            let qo: Vec<u32> = (0..=kv_lens.len() as u32).collect();
            let options = MlaOptions { sm_scale: 0.1, causal: false };
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
        let (cache, _, table) = random_mla_cache::<f16>(d, &mut r, &[100, 5], 7)?;
        let options = MlaOptions { sm_scale: 0.1, causal: false };
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
        plan.run(d.stream(), &q_nope, &q_pe, &cache, 0, &mut out, None)?;
        Ok(())
    }));
    t
}
