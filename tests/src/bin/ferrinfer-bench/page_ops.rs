//! Gather and append over the paged cache: time, bytes moved per second (read plus written) and
//! the fraction of the device-to-device copy, each result checked against the CPU reference.
use cudarc::driver::CudaSlice;
use ferrinfer::{f16, reference, CacheShape, Device, GatherPlan, KvDType, KvLayout, PagedKvCache, ScatterPlan};
use ferrinfer_tests::workload::{expect_bitwise_eq, random_cache, random_table, random_values, rng};
use indicatif::ProgressBar;
use serde_json::{json, Value};

use crate::timing::{BoxResult, Timer};

pub struct Shapes {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layout: KvLayout,
}

/// What every measurement needs: the GPU, the timer, the shapes and the run's two ceilings.
pub struct Bench<'d> {
    pub dev: &'d Device,
    pub timer: Timer,
    pub shapes: Shapes,
    pub copy_gbs: f64,
    pub read_gbs: f64,
    /// The sweep's progress (on stderr, and only on a terminal); table lines print above it.
    pub progress: ProgressBar,
    /// Decode rows are measured with attention sinks too (`--sinks`).
    pub sinks: bool,
}

impl Bench<'_> {
    pub fn print(&self, line: &str) {
        self.progress.suspend(|| println!("{line}"));
    }
}

/// A pool 25% larger than `kv_lens` needs, so pages come from a random permutation of it.
pub fn pool_shape(shapes: &Shapes, kv_lens: &[usize], page_size: usize) -> CacheShape {
    let pages: usize = kv_lens.iter().map(|n| n.div_ceil(page_size)).sum();
    CacheShape {
        num_pages: pages + pages / 4 + 1,
        page_size,
        num_kv_heads: shapes.kv_heads,
        head_dim: shapes.head_dim,
        layout: shapes.layout,
    }
}

fn row(b: &Bench, kernel: &str, page_size: usize, batch: usize, tokens: usize, bytes: f64, us: f64) -> Value {
    let (gbs, copy_gbs) = (bytes / us / 1e3, b.copy_gbs);
    b.print(&format!(
        "| {kernel} | {page_size} | {batch} | {tokens} | {:.1} | {us:.1} | {gbs:.0} | {:.1} |",
        bytes / 1e6,
        100.0 * gbs / copy_gbs
    ));
    json!({"kernel": kernel, "page_size": page_size, "batch": batch, "tokens_per_sequence": tokens, "bytes": bytes,
           "median_us": us, "gbs": gbs, "pct_copy": 100.0 * gbs / copy_gbs})
}

pub fn header(b: &Bench) {
    b.print("| kernel | page_size | batch | tokens/seq | MB moved | median us | GB/s | % copy |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|");
}

/// Gathers `batch` sequences of `kv_len` tokens into ragged K and V.
pub fn gather(b: &mut Bench, batch: usize, kv_len: usize, page_size: usize) -> BoxResult<Value> {
    let dev = b.dev;
    let mut r = rng(page_size as u64);
    let kv_lens = vec![kv_len; batch];
    let shape = pool_shape(&b.shapes, &kv_lens, page_size);
    let table = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
    let (cache, host) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let plan = GatherPlan::new(dev, &shape, &table)?;
    let (mut k, mut v) = (dev.alloc_zeros::<f16>(plan.ragged_elems())?, dev.alloc_zeros::<f16>(plan.ragged_elems())?);
    let us = b.timer.median_us(|| plan.run(dev.stream(), &cache, 0, &mut k, &mut v))?;
    expect_bitwise_eq(
        "gathered K",
        &dev.download(&k)?,
        &reference::gather(&shape, &host[0].0, &table),
        shape.token_elems(),
    )?;
    expect_bitwise_eq(
        "gathered V",
        &dev.download(&v)?,
        &reference::gather(&shape, &host[0].1, &table),
        shape.token_elems(),
    )?;
    // K and V: each element read from a page and written to the ragged output.
    Ok(row(b, "gather", page_size, batch, kv_len, 2.0 * 2.0 * (plan.ragged_elems() * 2) as f64, us))
}

/// Appends `tokens` new f16 tokens to each of `batch` sequences that hold `seq_after` tokens
/// after the append (FlashInfer's `append_paged_kv_cache` benchmark), into a cache of `C` (an
/// 8-bit one quantises, scale 1).
pub fn append<C: KvDType>(
    b: &mut Bench,
    batch: usize,
    tokens: usize,
    seq_after: usize,
    page_size: usize,
) -> BoxResult<Value> {
    let dev = b.dev;
    let mut r = rng(7 + page_size as u64);
    let kv_lens = vec![seq_after; batch];
    let shape = pool_shape(&b.shapes, &kv_lens, page_size);
    let table = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
    let mut cache = PagedKvCache::<C>::new(dev, shape, 1)?;
    let append_indptr: Vec<u32> = (0..=batch as u32).map(|i| i * tokens as u32).collect();
    let plan = ScatterPlan::append(dev, &shape, &table, &append_indptr)?;
    let (k_in, v_in): (Vec<f16>, Vec<f16>) =
        (random_values(&mut r, plan.ragged_elems()), random_values(&mut r, plan.ragged_elems()));
    let (k_dev, v_dev) = (dev.upload(&k_in)?, dev.upload(&v_in)?);
    let us = b.timer.median_us(|| plan.run(dev.stream(), &mut cache, 0, &k_dev, &v_dev))?;
    // Check the appended tokens by reading back just the pages they landed in.
    let pools = cache.layer(0)?;
    for (what, pool, input) in [("K", pools.k(), &k_in), ("V", pools.v(), &v_in)] {
        check_appended(dev, &shape, &table, tokens, pool, input).map_err(|e| format!("appended {what}: {e}"))?;
    }
    // K and V: each element read from the ragged input (f16) and written to a page (`C`).
    let kernel = if C::DTYPE == ferrinfer::DType::F16 {
        format!("append ({tokens} tok/seq)")
    } else {
        format!("append f16→{} ({tokens} tok/seq)", C::DTYPE.name())
    };
    let bytes = 2.0 * (plan.ragged_elems() * (2 + C::DTYPE.size_bytes())) as f64;
    Ok(row(b, &kernel, page_size, batch, tokens, bytes, us))
}

fn check_appended<C: KvDType>(
    dev: &Device,
    shape: &CacheShape,
    table: &ferrinfer::PageTable,
    tokens: usize,
    pool: &CudaSlice<C>,
    input: &[f16],
) -> BoxResult<()> {
    let n = shape.page_elems();
    let mut pages: Vec<usize> = Vec::new();
    for (seq, kv_len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
        for pos in kv_len - tokens..kv_len {
            pages.push(table.locate(seq, pos, shape.page_size).0);
        }
    }
    pages.sort_unstable();
    pages.dedup();
    // A host pool holding only the touched pages (others stay zero): reference-append into it
    // and compare those pages.
    let mut host = vec![C::default(); shape.pool_elems()];
    for &p in &pages {
        let page = dev.stream().clone_dtoh(&pool.slice(p * n..(p + 1) * n))?;
        host[p * n..(p + 1) * n].copy_from_slice(&page);
    }
    let mut want = host.clone();
    let indptr: Vec<u32> = (0..=table.batch_size() as u32).map(|i| i * tokens as u32).collect();
    // Scale 1: an f16 cache stores the input as it is, an 8-bit one quantised.
    reference::append_quantised(shape, &mut want, table, &indptr, input, 1.0);
    for &p in &pages {
        expect_bitwise_eq(
            &format!("page {p}"),
            &host[p * n..(p + 1) * n],
            &want[p * n..(p + 1) * n],
            shape.token_elems(),
        )?;
    }
    Ok(())
}
