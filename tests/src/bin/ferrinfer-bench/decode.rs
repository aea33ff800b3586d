//! Batch decode: time, K/V bytes read per second, and the fraction of the copy and of
//! ferrinfer's read stream (decode only reads, so the read stream is its practical ceiling).
//! Pools are filled on the device by repeating one random block: decode's speed does not depend
//! on the values, and the sweep's pools reach tens of GB. The first and last request of every
//! row are checked against the f64 CPU reference (`sampled`).
use ferrinfer::{reference, BatchDecodePlan, DecodeOptions, KvDType, KvScales};
use ferrinfer_tests::workload::{random_sinks, random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::Bench;
use crate::sampled::{count_wrong, BenchCache};
use crate::timing::BoxResult;

/// Elements of `out` for `request` that miss the reference (or are not finite).
fn mismatches<T: KvDType, C: KvDType>(
    c: &BenchCache<C>,
    q: &[T],
    out: &[T],
    heads: usize,
    request: usize,
    sinks: Option<&[f32]>,
) -> usize {
    let own = c.sample(request, c.table.kv_lens(c.shape.page_size)[request]);
    let rows = heads * c.shape.head_dim;
    let (expected, _) = reference::decode_with_sinks(
        &own.shape,
        &own.k,
        &own.v,
        KvScales::default(),
        &own.table,
        &q[request * rows..(request + 1) * rows],
        heads,
        &options::<T, C>(),
        sinks,
    );
    count_wrong(&out[request * rows..(request + 1) * rows], &expected)
}

/// The sampled requests' (first and last) elements that miss the reference.
fn sampled_wrong<T: KvDType, C: KvDType>(
    c: &BenchCache<C>,
    q: &[T],
    out: &[T],
    heads: usize,
    sinks: Option<&[f32]>,
) -> usize {
    let batch = c.table.kv_last_page_len.len();
    [0, batch - 1].into_iter().take(batch.min(2)).map(|r| mismatches(c, q, out, heads, r, sinks)).sum()
}

fn check_cell(wrong: usize) -> String {
    if wrong == 0 {
        "ok".to_string()
    } else {
        format!("{wrong} WRONG")
    }
}

pub fn header(b: &Bench) {
    b.print("| kernel | page_size | batch | kv_len | group | KV MB | median us | KV GB/s | % copy | % read stream | blocks | merged rows | check |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
}

/// Decode over a cache of `C` with queries of `T` (an 8-bit cache names its type).
fn options<T: KvDType, C: KvDType>() -> DecodeOptions {
    DecodeOptions { kv_dtype: (T::DTYPE != C::DTYPE).then_some(C::DTYPE), ..Default::default() }
}

/// The row's kernel label: `decode f16`, or `decode f16/e4m3` over an 8-bit cache.
pub fn label<T: KvDType, C: KvDType>(kernel: &str) -> String {
    if T::DTYPE == C::DTYPE {
        format!("{kernel} {}", T::DTYPE.name())
    } else {
        format!("{kernel} {}/{}", T::DTYPE.name(), C::DTYPE.name())
    }
}

/// Measures one row; the second field counts the sampled output elements that missed the reference.
pub fn decode<T: KvDType, C: KvDType>(
    b: &mut Bench,
    batch: usize,
    kv_len: usize,
    page_size: usize,
    group: usize,
) -> BoxResult<(Value, usize)> {
    let (dev, s) = (b.dev, &b.shapes);
    let c = BenchCache::<C>::new(b, &vec![kv_len; batch], page_size)?;
    let heads = s.kv_heads * group;
    let mut plan = BatchDecodePlan::new(dev, &c.shape, heads, &c.table, options::<T, C>())?;
    let q_host: Vec<T> = random_values(&mut rng(3), plan.qo_elems());
    let q = dev.upload(&q_host)?;
    let mut out = dev.alloc_zeros::<T>(plan.qo_elems())?;
    let us = b.timer.median_us(|| plan.run(dev.stream(), &q, &c.cache, 0, &mut out, None))?;
    let mut wrong = sampled_wrong(&c, &q_host, &dev.download(&out)?, heads, None);
    let check = check_cell(wrong);

    let bytes = (2 * batch * kv_len * s.kv_heads * s.head_dim * C::DTYPE.size_bytes()) as f64;
    let gbs = bytes / us / 1e3;
    let ((items, kv_heads, tiles), merged) = plan.launch_shape();
    let print_row = |b: &Bench, kernel: &str, us: f64, check: &str| {
        let gbs = bytes / us / 1e3;
        b.print(&format!(
            "| {} | {page_size} | {batch} | {kv_len} | {group} | {:.0} | {us:.1} | {gbs:.0} | {:.1} | {:.1} | {} | {merged} | {check} |",
            label::<T, C>(kernel),
            bytes / 1e6,
            100.0 * gbs / b.copy_gbs,
            100.0 * gbs / b.read_gbs,
            items * kv_heads * tiles
        ))
    };
    print_row(b, "decode", us, &check);
    let mut sinks_us = None;
    if b.sinks {
        let sinks_host = random_sinks(&mut rng(4), heads);
        let sinks = dev.upload(&sinks_host)?;
        let us =
            b.timer.median_us(|| plan.run_with_sinks(dev.stream(), &q, &c.cache, 0, Some(&sinks), &mut out, None))?;
        let sink_wrong = sampled_wrong(&c, &q_host, &dev.download(&out)?, heads, Some(&sinks_host));
        wrong += sink_wrong;
        print_row(b, "decode+sinks", us, &check_cell(sink_wrong));
        sinks_us = Some(us);
    }
    let row = json!({"kernel": "decode", "sinks_median_us": sinks_us, "dtype": T::DTYPE.name(), "kv_dtype": C::DTYPE.name(), "page_size": page_size, "batch": batch, "kv_len": kv_len, "group": group,
                     "kv_bytes": bytes, "median_us": us, "gbs": gbs, "pct_copy": 100.0 * gbs / b.copy_gbs,
                     "pct_read_stream": 100.0 * gbs / b.read_gbs, "sampled_elements_wrong": wrong});
    Ok((row, wrong))
}
