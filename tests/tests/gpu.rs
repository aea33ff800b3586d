//! GPU kernels against the CPU reference. Run with `cargo test -p ferrinfer-tests --test gpu`
//! (or the GPU bundle's run.sh); skipped, and reported as such, where there is no GPU.
use ferrinfer::{bf16, f16, reference, CacheShape, Device, KvDType, KvLayout, PageTable, PagedKvCache};
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{self, GpuTest, TestResult};
use ferrinfer_tests::workload::{first_bitwise_mismatch, poison, random_table, random_values, rng, shape_for};

/// Gathers `kv_lens` sequences through a shuffled page table and compares every element, bit
/// for bit, with the CPU reference; outputs start poisoned.
fn gather_case<T: KvDType>(
    dev: &Device,
    kv_lens: &[usize],
    page_size: usize,
    heads: usize,
    head_dim: usize,
    layout: KvLayout,
    seed: u64,
) -> TestResult {
    let mut rng = rng(seed);
    let shape = shape_for(kv_lens, page_size, heads, head_dim, layout);
    let table = random_table(&mut rng, kv_lens, page_size, shape.num_pages);
    let k_pool: Vec<T> = random_values(&mut rng, shape.pool_elems());
    let v_pool: Vec<T> = random_values(&mut rng, shape.pool_elems());
    let cache = PagedKvCache::from_buffers(shape, dev.upload(&k_pool)?, dev.upload(&v_pool)?)?;

    let (want_k, want_v) = (reference::gather(&shape, &k_pool, &table), reference::gather(&shape, &v_pool, &table));
    let n = want_k.len().max(1);
    let mut k_out = dev.upload(&vec![poison::<T>(); n])?;
    let mut v_out = dev.upload(&vec![poison::<T>(); n])?;
    if want_k.is_empty() {
        // Nothing to gather: the call must accept empty outputs and write nothing.
        let (mut k0, mut v0) = (dev.alloc_zeros::<T>(0)?, dev.alloc_zeros::<T>(0)?);
        cache.gather(dev, &table, &mut k0, &mut v0)?;
        ensure!(dev.download(&k_out)?[0].to_f64().is_nan(), "gather of an empty batch wrote");
        return Ok(());
    }
    cache.gather(dev, &table, &mut k_out, &mut v_out)?;
    for (what, got, want) in [("K", dev.download(&k_out)?, want_k), ("V", dev.download(&v_out)?, want_v)] {
        if let Some((i, g, w)) = first_bitwise_mismatch(&got, &want) {
            return Err(format!(
                "{what}[{i}] (token {}, element {}): GPU {g:?}, reference {w:?}",
                i / shape.token_elems(),
                i % shape.token_elems()
            )
            .into());
        }
    }
    Ok(())
}

/// Lengths that cover the edges for `page_size`: empty, one token, below one page, exactly one
/// page, one past a page boundary, several pages with the last partly full.
fn edge_lengths(page_size: usize) -> Vec<usize> {
    let p = page_size;
    vec![0, 1, p.saturating_sub(1).max(1), p, p + 1, 3 * p + p / 2 + 1, 0, 2 * p]
}

fn gather_tests() -> Vec<GpuTest> {
    let mut tests = Vec::new();
    for page_size in [1usize, 2, 3, 7, 16, 100, 512, 513] {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            let l = format!("{layout:?}").to_lowercase();
            let lens = edge_lengths(page_size);
            tests.push(GpuTest::new(format!("gather_page_size_{page_size}_{l}_f16"), {
                let lens = lens.clone();
                move |d| gather_case::<f16>(d, &lens, page_size, 8, 128, layout, page_size as u64)
            }));
            tests.push(GpuTest::new(format!("gather_page_size_{page_size}_{l}_bf16_head_dim_64_heads_3"), {
                let lens = lens.clone();
                move |d| gather_case::<bf16>(d, &lens, page_size, 3, 64, layout, 1000 + page_size as u64)
            }));
            tests.push(GpuTest::new(format!("gather_page_size_{page_size}_{l}_f32_head_dim_256_heads_1"), move |d| {
                gather_case::<f32>(d, &lens, page_size, 1, 256, layout, 2000 + page_size as u64)
            }));
        }
    }
    tests.push(GpuTest::new("gather_page_size_4096_larger_than_every_sequence_f16", |d| {
        gather_case::<f16>(d, &[1, 4095, 17, 0], 4096, 2, 128, KvLayout::Hnd, 7)
    }));
    tests.push(GpuTest::new("gather_one_token_row_of_16_bytes_f16", |d| {
        // head_dim 8 × 1 head: a row is a single vector, so a block holds hundreds of rows.
        gather_case::<f16>(d, &[1000, 3, 1], 5, 1, 8, KvLayout::Nhd, 8)
    }));
    tests.push(GpuTest::new("gather_random_lengths_and_page_sizes_f16", |d| {
        let mut r = rng(99);
        for case in 0..12 {
            let page_size = rand::Rng::random_range(&mut r, 1..700);
            let lens: Vec<usize> =
                (0..rand::Rng::random_range(&mut r, 1..9)).map(|_| rand::Rng::random_range(&mut r, 0..3000)).collect();
            let layout = if case % 2 == 0 { KvLayout::Nhd } else { KvLayout::Hnd };
            gather_case::<f16>(d, &lens, page_size, 4, 64, layout, case).map_err(|e| {
                format!("page_size {page_size}, lens {lens:?}, {layout:?}: {}", e.message().unwrap_or_default())
            })?;
        }
        Ok(())
    }));
    tests.push(GpuTest::new("gather_empty_batch_f16", |d| gather_case::<f16>(d, &[], 16, 8, 128, KvLayout::Nhd, 3)));
    tests.push(GpuTest::new("gather_all_sequences_empty_f16", |d| {
        gather_case::<f16>(d, &[0, 0, 0], 16, 8, 128, KvLayout::Nhd, 4)
    }));
    tests
}

fn validation_tests() -> Vec<GpuTest> {
    let shape = CacheShape { num_pages: 4, page_size: 16, num_kv_heads: 2, head_dim: 64, layout: KvLayout::Nhd };
    vec![
        GpuTest::new("gather_rejects_page_index_out_of_range_before_launch", move |d| {
            let cache = PagedKvCache::<f16>::new(d, shape)?;
            let table = PageTable { kv_indptr: vec![0, 1], kv_indices: vec![4], kv_last_page_len: vec![3] };
            let (mut k, mut v) = (d.alloc_zeros(3 * 128)?, d.alloc_zeros(3 * 128)?);
            let err = cache.gather(d, &table, &mut k, &mut v).err().ok_or("accepted page 4 of 4")?;
            ensure!(matches!(err, ferrinfer::Error::PageOutOfRange { page: 4, .. }), "wrong error: {err}");
            Ok(())
        }),
        GpuTest::new("gather_rejects_output_of_wrong_length", move |d| {
            let cache = PagedKvCache::<f16>::new(d, shape)?;
            let table = PageTable { kv_indptr: vec![0, 1], kv_indices: vec![2], kv_last_page_len: vec![3] };
            let (mut k, mut v) = (d.alloc_zeros(3 * 128 - 1)?, d.alloc_zeros(3 * 128)?);
            let err = cache.gather(d, &table, &mut k, &mut v).err().ok_or("accepted a short output")?;
            ensure!(
                matches!(err, ferrinfer::Error::BufferLength { got: 383, expected: 384, .. }),
                "wrong error: {err}"
            );
            Ok(())
        }),
    ]
}

/// Each device helper against the host's exact or f64 result.
fn device_helpers_match_the_host(dev: &Device) -> TestResult {
    use ferrinfer::selftest::{helper_outputs, HELPER_OUTPUTS};
    let mut r = rng(5);
    let mut input: Vec<f32> = (0..4096).map(|_| rand::Rng::random_range(&mut r, -20.0f32..20.0)).collect();
    input[..4].copy_from_slice(&[0.5, -0.0, 65504.0, 1e-8]);
    let divisor = 613;
    let out = helper_outputs(dev, &input, divisor)?;
    for (i, (&x, got)) in input.iter().zip(out.chunks(HELPER_OUTPUTS)).enumerate() {
        let warp = &input[i / 32 * 32..][..32];
        let close = |g: f32, want: f64, rel: f64| (g as f64 - want).abs() <= rel * want.abs().max(1e-30);
        let checks = [
            ("exp2", close(got[0], (x as f64).exp2(), 1e-6)),
            ("log2", (got[1] as f64 - (x.abs() as f64 + 1.0).log2()).abs() <= 1e-6),
            ("rcp", x == 0.0 || close(got[2], 1.0 / x as f64, 1e-6)),
            ("f16", got[3] == f16::from_f32(x).to_f32()),
            ("bf16", got[4] == bf16::from_f32(x).to_f32()),
            // 32 f32 additions of values up to 20 in magnitude: absolute error well under 1e-4.
            ("warp sum", (got[5] as f64 - warp.iter().map(|&v| v as f64).sum::<f64>()).abs() < 1e-4),
            ("warp max", got[6] == warp.iter().copied().fold(f32::MIN, f32::max)),
            ("shuffle", got[7].to_bits() == warp[(i % 32) ^ 5].to_bits()),
            ("fast div", got[8] == ((i * 7919) as u32 / divisor) as f32),
            ("fast rem", got[9] == ((i * 7919) as u32 % divisor) as f32),
        ];
        if let Some((name, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Err(format!("{name} of input {i} ({x}): GPU gave {:?}", got).into());
        }
    }
    Ok(())
}

fn main() {
    let helpers = GpuTest::new("device_helpers_match_the_host", device_helpers_match_the_host);
    harness::run(std::iter::once(helpers).chain(gather_tests()).chain(validation_tests()).collect())
}
