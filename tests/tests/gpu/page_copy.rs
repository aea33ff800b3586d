//! Gather, scatter and append against the CPU reference, bit for bit, over run-time page sizes,
//! both layouts, shuffled pages, partly full last pages and empty sequences; and each
//! validation error before any launch.
use ferrinfer::{
    bf16, f16, reference, CacheShape, Device, Error, GatherPlan, KvDType, KvLayout, PageTable, PagedKvCache,
    ScatterPlan,
};
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{expect_bitwise_eq, poison, random_cache, random_table, random_values, rng, shape_for};
use rand::Rng;

/// A batch: sequence lengths, page size, heads and layout, and the seed of its random data.
#[derive(Clone, Debug)]
struct Case {
    kv_lens: Vec<usize>,
    page_size: usize,
    heads: usize,
    head_dim: usize,
    layout: KvLayout,
    seed: u64,
}

impl Case {
    /// 8 KV heads of 128: the shapes of the benchmark.
    fn new(kv_lens: &[usize], page_size: usize, layout: KvLayout, seed: u64) -> Self {
        Case { kv_lens: kv_lens.to_vec(), page_size, heads: 8, head_dim: 128, layout, seed }
    }

    fn heads(self, heads: usize, head_dim: usize) -> Self {
        Case { heads, head_dim, ..self }
    }

    fn shape(&self) -> CacheShape {
        shape_for(&self.kv_lens, self.page_size, self.heads, self.head_dim, self.layout)
    }
}

/// Gathers layer 1 of a 2-layer cache through a shuffled page table; the outputs start poisoned.
fn gather_case<T: KvDType>(dev: &Device, case: &Case) -> TestResult {
    let mut rng = rng(case.seed);
    let shape = case.shape();
    let table = random_table(&mut rng, &case.kv_lens, case.page_size, shape.num_pages);
    let (cache, host) = random_cache::<T>(dev, &mut rng, shape, 2)?;
    let plan = GatherPlan::new(dev, &shape, &table)?;
    let n = plan.ragged_elems();
    // One poisoned element more than the output: it must stay poisoned (nothing past the end).
    let (mut k_out, mut v_out) = (dev.upload(&vec![poison::<T>(); n + 1])?, dev.upload(&vec![poison::<T>(); n + 1])?);
    let (mut k_view, mut v_view) = (k_out.slice_mut(..n), v_out.slice_mut(..n));
    plan.run(dev.stream(), &cache, 1, &mut k_view, &mut v_view)?;
    for (what, out, pool) in [("K", &k_out, &host[1].0), ("V", &v_out, &host[1].1)] {
        let got = dev.download(out)?;
        ensure!(got[n].to_f64().is_nan(), "{what}: element past the output was written");
        expect_bitwise_eq(what, &got[..n], &reference::gather(&shape, pool, &table), shape.token_elems())?;
    }
    Ok(())
}

/// Appends (or, with `append_lens == kv_lens`, scatters whole sequences) into layer 1 of a
/// 2-layer random cache; every element of both layers must equal the reference afterwards, so
/// untouched slots and the other layer are checked too.
fn append_case<T: KvDType>(dev: &Device, case: &Case, append_lens: &[usize]) -> TestResult {
    let mut rng = rng(case.seed);
    let shape = case.shape();
    let table = random_table(&mut rng, &case.kv_lens, case.page_size, shape.num_pages);
    let (mut cache, mut host) = random_cache::<T>(dev, &mut rng, shape, 2)?;
    let whole = append_lens == case.kv_lens;
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
    let rows = *append_indptr.last().unwrap_or(&0) as usize;
    let (k_in, v_in): (Vec<T>, Vec<T>) =
        (random_values(&mut rng, rows * shape.token_elems()), random_values(&mut rng, rows * shape.token_elems()));
    let (k_dev, v_dev) = (dev.upload(&k_in)?, dev.upload(&v_in)?);
    plan.run(dev.stream(), &mut cache, 1, &k_dev.slice(..), &v_dev.slice(..))?;
    reference::append(&shape, &mut host[1].0, &table, &append_indptr, &k_in);
    reference::append(&shape, &mut host[1].1, &table, &append_indptr, &v_in);
    for (layer, (k, v)) in host.iter().enumerate() {
        let pools = cache.layer(layer)?;
        expect_bitwise_eq(&format!("layer {layer} K pool"), &dev.download(pools.k())?, k, shape.token_elems())?;
        expect_bitwise_eq(&format!("layer {layer} V pool"), &dev.download(pools.v())?, v, shape.token_elems())?;
    }
    Ok(())
}

/// Empty, one token, below one page, exactly one page, one past a boundary, several pages with
/// the last partly full.
fn edge_lengths(page_size: usize) -> Vec<usize> {
    let p = page_size;
    vec![0, 1, p.saturating_sub(1).max(1), p, p + 1, 3 * p + p / 2 + 1, 0, 2 * p]
}

/// Appends of 0, 1, part and all of each sequence.
fn append_lengths(rng: &mut impl Rng, kv_lens: &[usize]) -> Vec<usize> {
    kv_lens
        .iter()
        .enumerate()
        .map(|(i, &n)| match i % 4 {
            0 => 0,
            1 => n.min(1),
            2 => rng.random_range(0..=n),
            _ => n,
        })
        .collect()
}

const PAGE_SIZES: [usize; 10] = [1, 2, 3, 7, 16, 100, 512, 513, 4096, 37];

fn case_tests() -> Vec<GpuTest> {
    let mut tests = Vec::new();
    let mut add = |name: String, body: Box<dyn Fn(&Device) -> TestResult + Send + Sync>| {
        tests.push(GpuTest { name, body, gpus: 1, nccl: false })
    };
    for page_size in PAGE_SIZES {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            let l = format!("{layout:?}").to_lowercase();
            let ps = page_size as u64;
            let case = Case::new(&edge_lengths(page_size.min(600)), page_size, layout, ps);
            let c = case.clone();
            add(format!("gather_page_size_{page_size}_{l}_f16"), Box::new(move |d| gather_case::<f16>(d, &c)));
            let c = Case { seed: 1000 + ps, ..case.clone() }.heads(3, 64);
            add(
                format!("gather_page_size_{page_size}_{l}_bf16_heads_3_head_dim_64"),
                Box::new(move |d| gather_case::<bf16>(d, &c)),
            );
            let c = Case { seed: 2000 + ps, ..case.clone() }.heads(1, 256);
            add(
                format!("gather_page_size_{page_size}_{l}_f32_heads_1_head_dim_256"),
                Box::new(move |d| gather_case::<f32>(d, &c)),
            );
            let c = Case { seed: 3000 + ps, ..case.clone() };
            add(
                format!("scatter_page_size_{page_size}_{l}_f16"),
                Box::new(move |d| append_case::<f16>(d, &c, &c.kv_lens)),
            );
            let c = Case { seed: 4000 + ps, ..case.clone() }.heads(2, 128);
            add(
                format!("append_page_size_{page_size}_{l}_bf16_heads_2"),
                Box::new(move |d| append_case::<bf16>(d, &c, &append_lengths(&mut rng(c.seed), &c.kv_lens))),
            );
        }
    }
    add(
        "gather_page_size_4096_larger_than_every_sequence_f16".into(),
        Box::new(|d| gather_case::<f16>(d, &Case::new(&[1, 4095, 17, 0], 4096, KvLayout::Hnd, 7).heads(2, 128))),
    );
    add(
        "gather_rows_of_one_16_byte_vector_f16".into(),
        Box::new(|d| gather_case::<f16>(d, &Case::new(&[1000, 3, 1], 5, KvLayout::Nhd, 8).heads(1, 8))),
    );
    add(
        "append_one_token_to_each_of_256_sequences_f16".into(),
        Box::new(|d| {
            let kv_lens: Vec<usize> = (0..256).map(|i| 1 + (i * 37) % 300).collect();
            append_case::<f16>(d, &Case::new(&kv_lens, 16, KvLayout::Nhd, 9), &[1; 256])
        }),
    );
    add(
        "gather_and_append_random_page_sizes_and_lengths".into(),
        Box::new(|d| {
            let mut r = rng(99);
            for seed in 0..16u64 {
                let page_size = r.random_range(1..700);
                let lens: Vec<usize> = (0..r.random_range(1..9)).map(|_| r.random_range(0..3000)).collect();
                let appended = append_lengths(&mut r, &lens);
                let layout = if seed % 2 == 0 { KvLayout::Nhd } else { KvLayout::Hnd };
                let case = Case::new(&lens, page_size, layout, seed);
                let context = |e: libtest_mimic::Failed| format!("{case:?}: {}", e.message().unwrap_or_default());
                gather_case::<f16>(d, &case.clone().heads(4, 64)).map_err(context)?;
                append_case::<f32>(d, &case.clone().heads(2, 32), &appended).map_err(context)?;
            }
            Ok(())
        }),
    );
    add("gather_empty_batch_f16".into(), Box::new(|d| gather_case::<f16>(d, &Case::new(&[], 16, KvLayout::Nhd, 3))));
    add(
        "gather_all_sequences_empty_f16".into(),
        Box::new(|d| gather_case::<f16>(d, &Case::new(&[0, 0, 0], 16, KvLayout::Nhd, 4))),
    );
    add(
        "append_nothing_to_every_sequence_f16".into(),
        Box::new(|d| append_case::<f16>(d, &Case::new(&[5, 0, 9], 4, KvLayout::Hnd, 5).heads(2, 64), &[0, 0, 0])),
    );
    tests
}

fn expect_err(result: ferrinfer::Result<impl Sized>, matches: impl Fn(&Error) -> bool, case: &str) -> TestResult {
    match result {
        Ok(_) => Err(format!("{case}: accepted").into()),
        Err(e) if matches(&e) => Ok(()),
        Err(e) => Err(format!("{case}: wrong error: {e}").into()),
    }
}

fn validation_tests() -> Vec<GpuTest> {
    let shape = CacheShape { num_pages: 4, page_size: 16, num_kv_heads: 2, head_dim: 64, layout: KvLayout::Nhd };
    let table = |indices: Vec<u32>, last: u32| PageTable {
        kv_indptr: vec![0, indices.len() as u32],
        kv_indices: indices,
        kv_last_page_len: vec![last],
    };
    vec![
        GpuTest::new("gather_rejects_page_index_out_of_range", move |d| {
            expect_err(
                GatherPlan::new(d, &shape, &table(vec![4], 3)),
                |e| matches!(e, Error::PageOutOfRange { page: 4, .. }),
                "page 4 of 4",
            )
        }),
        GpuTest::new("gather_rejects_last_page_len_over_page_size", move |d| {
            expect_err(
                GatherPlan::new(d, &shape, &table(vec![1], 17)),
                |e| matches!(e, Error::LastPageLen { len: 17, .. }),
                "17 of 16",
            )
        }),
        GpuTest::new("gather_rejects_output_of_wrong_length", move |d| {
            let cache = PagedKvCache::<f16>::new(d, shape, 1)?;
            let plan = GatherPlan::new(d, &shape, &table(vec![2], 3))?;
            let (mut k, mut v) = (d.alloc_zeros::<f16>(3 * 128 - 1)?, d.alloc_zeros::<f16>(3 * 128)?);
            expect_err(
                plan.run(d.stream(), &cache, 0, &mut k, &mut v),
                |e| matches!(e, Error::BufferLength { got: 383, expected: 384, .. }),
                "short K",
            )
        }),
        GpuTest::new("gather_rejects_layer_out_of_range", move |d| {
            let cache = PagedKvCache::<f16>::new(d, shape, 2)?;
            let plan = GatherPlan::new(d, &shape, &table(vec![2], 3))?;
            let (mut k, mut v) = (d.alloc_zeros::<f16>(3 * 128)?, d.alloc_zeros::<f16>(3 * 128)?);
            expect_err(
                plan.run(d.stream(), &cache, 2, &mut k, &mut v),
                |e| matches!(e, Error::LayerOutOfRange { layer: 2, num_layers: 2 }),
                "layer 2",
            )
        }),
        GpuTest::new("gather_rejects_cache_of_another_shape", move |d| {
            let other = CacheShape { page_size: 8, ..shape };
            let cache = PagedKvCache::<f16>::new(d, other, 1)?;
            let plan = GatherPlan::new(d, &shape, &table(vec![2], 3))?;
            let (mut k, mut v) = (d.alloc_zeros::<f16>(3 * 128)?, d.alloc_zeros::<f16>(3 * 128)?);
            expect_err(
                plan.run(d.stream(), &cache, 0, &mut k, &mut v),
                |e| matches!(e, Error::ShapeMismatch { .. }),
                "page size 8 vs 16",
            )
        }),
        GpuTest::new("scatter_rejects_two_sequences_writing_one_page", move |d| {
            let shared = PageTable { kv_indptr: vec![0, 1, 2], kv_indices: vec![3, 3], kv_last_page_len: vec![2, 5] };
            expect_err(
                ScatterPlan::whole_sequences(d, &shape, &shared),
                |e| matches!(e, Error::OverlappingWrites { page: 3, .. }),
                "page 3 twice",
            )
        }),
        GpuTest::new("append_rejects_more_tokens_than_the_sequence_holds", move |d| {
            expect_err(
                ScatterPlan::append(d, &shape, &table(vec![1], 3), &[0, 4]),
                |e| matches!(e, Error::AppendLongerThanSequence { append_len: 4, kv_len: 3, .. }),
                "4 into 3",
            )
        }),
        GpuTest::new("append_rejects_malformed_append_indptr", move |d| {
            expect_err(
                ScatterPlan::append(d, &shape, &table(vec![1], 3), &[1, 2]),
                |e| matches!(e, Error::IndptrStart { what: "append_indptr", first: 1 }),
                "starts at 1",
            )?;
            expect_err(
                ScatterPlan::append(d, &shape, &table(vec![1], 3), &[0]),
                |e| matches!(e, Error::IndptrLength { what: "append_indptr", .. }),
                "too short",
            )
        }),
        GpuTest::new("append_rejects_writes_into_a_shared_prefix_page", move |d| {
            // Two sequences of 17 tokens share full page 0 as a prefix and own one more page each.
            // Appending 1 token each writes only their own pages; 2 each reaches back into slot 15
            // of the shared page.
            let t = PageTable { kv_indptr: vec![0, 2, 4], kv_indices: vec![0, 1, 0, 2], kv_last_page_len: vec![1, 1] };
            ScatterPlan::append(d, &shape, &t, &[0, 1, 2])?;
            expect_err(
                ScatterPlan::append(d, &shape, &t, &[0, 2, 4]),
                |e| matches!(e, Error::OverlappingWrites { page: 0, slot: 15, .. }),
                "both write slot 15 of page 0",
            )
        }),
    ]
}

pub fn tests() -> Vec<GpuTest> {
    case_tests().into_iter().chain(validation_tests()).collect()
}
