//! Batch decode: time, K/V bytes read per second, and the fraction of the copy and of
//! ferrinfer's read stream (decode only reads, so the read stream is its practical ceiling).
//! Pools are filled on the device by repeating one random block: decode's speed does not depend
//! on the values, and the sweep's pools reach tens of GB.
use cudarc::driver::CudaSlice;
use ferrinfer::{f16, BatchDecodePlan, DecodeOptions, Device, LayerPools, PagedKvCache};
use ferrinfer_tests::workload::{random_table, random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::{pool_shape, Bench};
use crate::timing::BoxResult;

fn filled_pool(dev: &Device, elems: usize, seed: u64) -> BoxResult<CudaSlice<f16>> {
    let block: Vec<f16> = random_values(&mut rng(seed), (1 << 22).min(elems));
    let src = dev.upload(&block)?;
    let mut pool = dev.alloc_zeros::<f16>(elems)?;
    let mut at = 0;
    while at < elems {
        let n = block.len().min(elems - at);
        dev.stream().memcpy_dtod(&src.slice(..n), &mut pool.slice_mut(at..at + n))?;
        at += n;
    }
    Ok(pool)
}

pub fn header() {
    println!("| kernel | page_size | batch | kv_len | group | KV MB | median us | KV GB/s | % copy | % read stream | blocks | merged rows |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
}

pub fn decode(b: &mut Bench, batch: usize, kv_len: usize, page_size: usize, group: usize) -> BoxResult<Value> {
    let (dev, s) = (b.dev, &b.shapes);
    let kv_lens = vec![kv_len; batch];
    let shape = pool_shape(s, &kv_lens, page_size);
    let table = random_table(&mut rng(page_size as u64), &kv_lens, page_size, shape.num_pages);
    let layer = LayerPools { k: filled_pool(dev, shape.pool_elems(), 1)?, v: filled_pool(dev, shape.pool_elems(), 2)? };
    let cache = PagedKvCache::from_layers(shape, vec![layer])?;
    let heads = s.kv_heads * group;
    let plan = BatchDecodePlan::new(dev, &shape, heads, &table, DecodeOptions::default())?;
    let q = dev.upload(&random_values::<f16>(&mut rng(3), plan.qo_elems()))?;
    let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
    let us = b.timer.median_us(|| plan.run(dev, dev.stream(), &q, &cache, 0, &mut out, None))?;
    let bytes = (2 * batch * kv_len * s.kv_heads * s.head_dim * 2) as f64;
    let gbs = bytes / us / 1e3;
    let ((items, kv_heads, tiles), merged) = plan.launch_shape();
    println!(
        "| decode | {page_size} | {batch} | {kv_len} | {group} | {:.0} | {us:.1} | {gbs:.0} | {:.1} | {:.1} | {} | {merged} |",
        bytes / 1e6,
        100.0 * gbs / b.copy_gbs,
        100.0 * gbs / b.read_gbs,
        items * kv_heads * tiles
    );
    Ok(
        json!({"kernel": "decode", "page_size": page_size, "batch": batch, "kv_len": kv_len, "group": group, "kv_bytes": bytes,
              "median_us": us, "gbs": gbs, "pct_copy": 100.0 * gbs / b.copy_gbs, "pct_read_stream": 100.0 * gbs / b.read_gbs}),
    )
}
