//! Batch prefill with a custom mask against the f64 CPU reference (`reference::prefill_masked`,
//! which applies the boolean mask per query and key): random masks with fully masked rows,
//! speculative-decoding token trees, run-time page sizes, paged and ragged K/V, flat and
//! packed masks, group sizes, head dims, dtypes, soft cap, window, split keys, and the mask's
//! validation. Outputs start poisoned and every element is compared; LSE too (−∞ exactly where
//! a query sees no key). Masked plans run the portable kernel on every GPU (checked).
use ferrinfer::{
    bf16, f16, reference, BatchPrefillPlan, CacheShape, CustomMask, Device, Error, KvDType, KvLayout, PageTable,
    PrefillKernel, PrefillOptions,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{poison, ragged_as_pages, random_cache, random_table, random_values, rng, shape_for};
use rand::Rng;

#[derive(Clone, Copy, Debug)]
enum MaskKind {
    /// Each entry kept with probability `density`; one row in eight fully masked.
    Random { density: f64 },
    /// Each request's queries are the nodes of a random token tree after `kv_len − qo_len`
    /// cached keys: a query sees the whole prefix, itself and its ancestors.
    Tree,
}

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
    mask: MaskKind,
    /// Hand the plan the mask bit-packed (with its byte indptr) rather than as booleans.
    packed: bool,
    seed: u64,
}

impl Case {
    fn new(lens: &[(usize, usize)], page_size: usize, mask: MaskKind) -> Self {
        Case {
            lens: lens.to_vec(),
            page_size,
            num_kv_heads: 2,
            group: 4,
            head_dim: 128,
            layout: KvLayout::Nhd,
            options: PrefillOptions::default(),
            mask,
            packed: false,
            seed: 1000 + page_size as u64,
        }
    }

    fn qo_indptr(&self) -> Vec<u32> {
        let mut indptr = vec![0u32];
        for &(qo, _) in &self.lens {
            indptr.push(indptr[indptr.len() - 1] + qo as u32);
        }
        indptr
    }
}

/// The batch's mask, flattened request after request, query after query.
fn random_mask(r: &mut impl Rng, lens: &[(usize, usize)], kind: MaskKind) -> Vec<bool> {
    let mut mask = Vec::new();
    for &(qo, kv) in lens {
        match kind {
            MaskKind::Random { density } => {
                for _ in 0..qo {
                    let empty = r.random_range(0..8) == 0;
                    mask.extend((0..kv).map(|_| !empty && r.random_bool(density)));
                }
            }
            MaskKind::Tree => {
                let prefix = kv - qo;
                // Node 0 is a root; later nodes hang off an earlier node, or (rarely) start a
                // tree of their own.
                let parents: Vec<Option<usize>> =
                    (0..qo).map(|j| (j > 0 && r.random_range(0..10) > 0).then(|| r.random_range(0..j))).collect();
                for j in 0..qo {
                    let mut row = vec![false; kv];
                    row[..prefix].fill(true);
                    let mut node = Some(j);
                    while let Some(n) = node {
                        row[prefix + n] = true;
                        node = parents[n];
                    }
                    mask.extend(row);
                }
            }
        }
    }
    mask
}

/// FlashInfer's `segment_packbits`, written out: each request's entries from a fresh byte,
/// entry `e` in bit `e % 8` of byte `e / 8`; and the byte indptr.
fn pack(mask: &[bool], lens: &[(usize, usize)]) -> (Vec<u8>, Vec<u32>) {
    let (mut bytes, mut indptr, mut at) = (Vec::new(), vec![0u32], 0);
    for &(qo, kv) in lens {
        let n = qo * kv;
        let mut request = vec![0u8; n.div_ceil(8)];
        for (e, &keep) in mask[at..at + n].iter().enumerate() {
            request[e / 8] |= (keep as u8) << (e % 8);
        }
        at += n;
        bytes.extend(request);
        indptr.push(bytes.len() as u32);
    }
    (bytes, indptr)
}

fn masked_case<T: KvDType>(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.seed);
    let kv_lens: Vec<usize> = c.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = shape_for(&kv_lens, c.page_size, c.num_kv_heads, c.head_dim, c.layout);
    let table = random_table(&mut r, &kv_lens, c.page_size, shape.num_pages);
    let (cache, host) = random_cache::<T>(dev, &mut r, shape, 1)?;
    let heads = c.num_kv_heads * c.group;
    let qo_indptr = c.qo_indptr();
    let tokens = *qo_indptr.last().unwrap() as usize;
    let q: Vec<T> = random_values(&mut r, tokens * heads * c.head_dim);
    let mask = random_mask(&mut r, &c.lens, c.mask);
    let (bits, indptr) = pack(&mask, &c.lens);
    let custom = if c.packed { CustomMask::Packed { bits: &bits, indptr: &indptr } } else { CustomMask::Flat(&mask) };
    let mut plan = BatchPrefillPlan::new_masked(dev, &shape, heads, &qo_indptr, &table, custom, c.options)?;
    let kernel = plan.kernel();
    ensure!(kernel == PrefillKernel::Portable { block_rows: 64 }, "a masked plan chose {kernel:?}");
    let mut out = dev.upload(&vec![poison::<T>(); q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; tokens * heads])?;
    plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, Some(&mut lse))?;
    let (want, want_lse) =
        reference::prefill_masked(&shape, &host[0].0, &host[0].1, &table, &qo_indptr, &q, heads, &mask, &c.options);
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, c.head_dim, "token")?)
}

/// The same over contiguous K/V rows (the ragged plan), against the reference on the equivalent
/// cache of one-token pages in order.
fn ragged_masked_case<T: KvDType>(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.seed);
    let mut kv_indptr = vec![0u32];
    for &(_, kv) in &c.lens {
        kv_indptr.push(kv_indptr[kv_indptr.len() - 1] + kv as u32);
    }
    let total_kv = kv_indptr[kv_indptr.len() - 1] as usize;
    let heads = c.num_kv_heads * c.group;
    let (k, v): (Vec<T>, Vec<T>) = (
        random_values(&mut r, total_kv * c.num_kv_heads * c.head_dim),
        random_values(&mut r, total_kv * c.num_kv_heads * c.head_dim),
    );
    let qo_indptr = c.qo_indptr();
    let q: Vec<T> = random_values(&mut r, qo_indptr[qo_indptr.len() - 1] as usize * heads * c.head_dim);
    let mask = random_mask(&mut r, &c.lens, c.mask);
    let (bits, indptr) = pack(&mask, &c.lens);
    let custom = if c.packed { CustomMask::Packed { bits: &bits, indptr: &indptr } } else { CustomMask::Flat(&mask) };
    let mut plan = BatchPrefillPlan::ragged_masked(
        dev,
        c.num_kv_heads,
        c.head_dim,
        heads,
        &qo_indptr,
        &kv_indptr,
        custom,
        c.options,
    )?;
    let mut out = dev.upload(&vec![poison::<T>(); q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; q.len() / c.head_dim])?;
    plan.run_ragged(dev.stream(), &dev.upload(&q)?, &dev.upload(&k)?, &dev.upload(&v)?, &mut out, Some(&mut lse))?;
    let (shape, table) = ragged_as_pages(&kv_indptr, c.num_kv_heads, c.head_dim);
    let (want, want_lse) = reference::prefill_masked(&shape, &k, &v, &table, &qo_indptr, &q, heads, &mask, &c.options);
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, heads, c.head_dim, "token")?)
}

fn add<T: KvDType>(t: &mut Vec<GpuTest>, name: String, case: Case) {
    t.push(GpuTest::new(name, move |d| masked_case::<T>(d, &case)));
}

const RANDOM: MaskKind = MaskKind::Random { density: 0.5 };

fn case_tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    // Trees of draft tokens after a cached prefix, a whole prompt masked at random, one token,
    // queries not among the keys (no window: allowed), a request without keys (all its rows
    // masked), and a tail longer than a tile.
    for ps in [1usize, 7, 48, 16, 3] {
        let trees = [(64, 4096), (7, 7), (1, 300), (33, 33 + 3 * ps), (130, 200)];
        add::<f16>(
            &mut t,
            format!("prefill_mask_tree_page_size_{ps}_group_4_f16"),
            Case::new(&trees, ps, MaskKind::Tree),
        );
        let random = [(100, 300), (50, 10), (3, 0), (1, 2 * ps + 1), (70, 70)];
        let c = Case { layout: KvLayout::Hnd, seed: 2000 + ps as u64, ..Case::new(&random, ps, RANDOM) };
        add::<bf16>(&mut t, format!("prefill_mask_random_rows_fully_masked_page_size_{ps}_hnd_bf16"), c);
    }
    for (group, head_dim) in [(1, 64), (4, 256), (5, 128), (1, 256), (5, 64), (4, 64)] {
        let c = Case {
            group,
            head_dim,
            seed: 13 * group as u64 + head_dim as u64,
            ..Case::new(&[(40, 500), (9, 9), (100, 150)], 7, RANDOM)
        };
        add::<f16>(&mut t, format!("prefill_mask_random_page_size_7_group_{group}_head_dim_{head_dim}_f16"), c.clone());
        let c = Case { mask: MaskKind::Tree, packed: true, ..c };
        add::<bf16>(&mut t, format!("prefill_mask_tree_packed_page_size_7_group_{group}_head_dim_{head_dim}_bf16"), c);
    }
    // Sparse and dense masks, flat and packed; soft cap; `causal` ignored (the reference
    // ignores it too); a window on top of the mask.
    let sparse = Case { packed: true, ..Case::new(&[(90, 400), (17, 17)], 48, MaskKind::Random { density: 0.05 }) };
    add::<f16>(&mut t, "prefill_mask_sparse_packed_page_size_48_f16".into(), sparse);
    let dense = Case::new(&[(90, 400), (17, 17)], 1, MaskKind::Random { density: 0.97 });
    add::<f16>(&mut t, "prefill_mask_dense_page_size_1_f16".into(), dense);
    let capped = PrefillOptions { logits_soft_cap: 30.0, sm_scale: Some(0.5), ..Default::default() };
    add::<f16>(
        &mut t,
        "prefill_mask_tree_soft_cap_30_page_size_16_f16".into(),
        Case { options: capped, ..Case::new(&[(64, 1000), (20, 40)], 16, MaskKind::Tree) },
    );
    let causal = PrefillOptions { causal: true, ..Default::default() };
    add::<bf16>(
        &mut t,
        "prefill_mask_ignores_causal_page_size_7_bf16".into(),
        Case { options: causal, ..Case::new(&[(80, 80), (5, 300)], 7, RANDOM) },
    );
    let window = PrefillOptions { window_left: 50, logits_soft_cap: 10.0, ..Default::default() };
    add::<f16>(
        &mut t,
        "prefill_mask_tree_with_window_left_50_page_size_7_f16".into(),
        Case { options: window, ..Case::new(&[(64, 600), (100, 100)], 7, MaskKind::Tree) },
    );
    // Long queries (on Hopper these would take the Hopper kernel unmasked) and one long request
    // among short ones (its keys split over blocks and merged in the launch).
    add::<f16>(
        &mut t,
        "prefill_mask_tree_long_queries_stay_portable_f16".into(),
        Case { num_kv_heads: 8, ..Case::new(&[(512, 2048), (512, 600)], 16, MaskKind::Tree) },
    );
    add::<f16>(
        &mut t,
        "prefill_mask_one_long_request_splits_its_keys_f16".into(),
        Case { num_kv_heads: 1, ..Case::new(&[(1, 20000), (3, 3), (70, 9000)], 16, RANDOM) },
    );
    // The benchmark's shape, scaled down in heads: 8 trees of 64 drafts over 4096 keys.
    add::<f16>(
        &mut t,
        "prefill_mask_tree_8_x_qo_64_over_kv_4096_page_size_16_f16".into(),
        Case { num_kv_heads: 1, packed: true, ..Case::new(&[(64, 4096); 8], 16, MaskKind::Tree) },
    );
    // Contiguous K/V: the same kernel through one-token pages.
    let ragged = [(100, 100), (3, 517), (0, 9), (64, 64), (20, 5)];
    let c = Case::new(&ragged, 1, RANDOM);
    t.push(GpuTest::new("prefill_mask_ragged_random_group_4_f16", move |d| ragged_masked_case::<f16>(d, &c)));
    let c = Case { group: 5, packed: true, seed: 77, ..Case::new(&ragged, 1, RANDOM) };
    t.push(GpuTest::new("prefill_mask_ragged_random_packed_group_5_bf16", move |d| ragged_masked_case::<bf16>(d, &c)));
    let tree = Case::new(&[(64, 1000), (8, 8)], 1, MaskKind::Tree);
    t.push(GpuTest::new("prefill_mask_ragged_tree_f16", move |d| ragged_masked_case::<f16>(d, &tree)));
    t
}

fn validation_tests() -> Vec<GpuTest> {
    let shape = CacheShape { num_pages: 4, page_size: 16, num_kv_heads: 2, head_dim: 128, layout: KvLayout::Nhd };
    // Two requests of 19 and 0 keys; 3 and 2 queries (no window: more queries than keys is fine).
    let table = PageTable { kv_indptr: vec![0, 2, 2], kv_indices: vec![2, 0], kv_last_page_len: vec![3, 0] };
    let qo_indptr = [0u32, 3, 5];
    let (t1, t2) = (table.clone(), table.clone());
    let opts = PrefillOptions::default();
    vec![
        GpuTest::new("prefill_mask_rejects_a_mask_too_short_for_the_batch", move |d| {
            let short = vec![true; 3 * 19 - 1];
            let e = BatchPrefillPlan::new_masked(d, &shape, 4, &qo_indptr, &t1, CustomMask::Flat(&short), opts)
                .err()
                .ok_or("accepted a short mask")?;
            ensure!(matches!(e, Error::MaskLength { what: "custom_mask", got: 56, expected: 57 }), "wrong error: {e}");
            // 57 bits are 8 bytes; 7 given.
            let bits = [0xffu8; 7];
            let packed = CustomMask::Packed { bits: &bits, indptr: &[0, 8, 8] };
            let e = BatchPrefillPlan::new_masked(d, &shape, 4, &qo_indptr, &t1, packed, opts)
                .err()
                .ok_or("accepted short packed bits")?;
            ensure!(
                matches!(e, Error::MaskLength { what: "packed_custom_mask", got: 7, expected: 8 }),
                "wrong error: {e}"
            );
            // A plan replanned with a bad mask keeps working with its last batch.
            let mut plan =
                BatchPrefillPlan::new_masked(d, &shape, 4, &qo_indptr, &t1, CustomMask::Flat(&[true; 57]), opts)?;
            ensure!(plan.replan_masked(&shape, 4, &qo_indptr, &t1, CustomMask::Flat(&short), opts).is_err(), "replan");
            Ok(())
        }),
        GpuTest::new("prefill_mask_rejects_a_bad_mask_indptr", move |d| {
            let bits = [0xffu8; 8];
            let cases: [(&[u32], &str); 3] = [(&[0, 7, 8], "segment"), (&[0, 8], "length"), (&[0, 9, 8], "monotone")];
            for (indptr, what) in cases {
                let packed = CustomMask::Packed { bits: &bits, indptr };
                let e = BatchPrefillPlan::new_masked(d, &shape, 4, &qo_indptr, &t2, packed, opts)
                    .err()
                    .ok_or(format!("accepted mask_indptr {indptr:?}"))?;
                let right = match what {
                    "segment" => matches!(e, Error::MaskSegment { seq: 0, got: 7, expected: 8, qo_len: 3, kv_len: 19 }),
                    "length" => matches!(e, Error::IndptrLength { what: "mask_indptr", got: 2, batch: 2 }),
                    _ => matches!(e, Error::IndptrNotMonotone { what: "mask_indptr", index: 2, prev: 9, next: 8 }),
                };
                ensure!(right, "wrong error for {indptr:?}: {e}");
            }
            Ok(())
        }),
    ]
}

pub fn tests() -> Vec<GpuTest> {
    let mut t = case_tests();
    t.extend(validation_tests());
    t
}
