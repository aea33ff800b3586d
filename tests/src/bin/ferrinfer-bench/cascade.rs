//! Cascade decode against plain batch decode on issue 6's workload: `batch` requests forked
//! from one `prefix`-token prompt, each with `own` tokens of its own (f16, the bench's heads).
//! Both run over the same cache; the cascade output is checked against plain decode's.
use ferrinfer::{
    f16, BatchDecodePlan, CascadeDecodePlan, DecodeOptions, LayerPools, PagedKvCache, SeqId, SequenceAllocator,
};
use ferrinfer_tests::workload::{random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::Bench;
use crate::sampled::filled_pool;
use crate::timing::BoxResult;

pub fn header(b: &Bench) {
    b.print("| kernel | page_size | requests | shared prefix | own tokens | plain decode us | cascade us | speedup | check |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|---|");
}

/// The second field is 1 when cascade and plain decode disagree beyond twice the f16 bound.
pub fn cascade(b: &mut Bench, batch: usize, prefix: usize, own: usize, page_size: usize) -> BoxResult<(Value, usize)> {
    let (dev, s) = (b.dev, &b.shapes);
    let tokens = prefix + batch * (own + page_size);
    let shape = ferrinfer::CacheShape {
        num_pages: tokens.div_ceil(page_size) + batch + 1,
        page_size,
        num_kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        layout: s.layout,
    };
    let mut alloc = SequenceAllocator::new(shape.num_pages, page_size)?;
    let parent = alloc.create();
    alloc.reserve(parent, prefix)?;
    let mut family: Vec<SeqId> = vec![parent];
    family.extend((1..batch).map(|_| alloc.fork(parent)).collect::<Result<Vec<_>, _>>()?);
    for &id in &family {
        alloc.reserve(id, own)?; // copy-on-write copies need no applying: the pool is random
    }
    let blocks: [Vec<f16>; 2] = [1, 2].map(|seed| random_values(&mut rng(seed), 1 << 22));
    let layer = LayerPools::new(
        filled_pool(dev, shape.pool_elems(), &blocks[0])?,
        filled_pool(dev, shape.pool_elems(), &blocks[1])?,
    );
    let cache = PagedKvCache::from_layers(shape, vec![layer])?;
    let heads = s.kv_heads * 4;
    let mut plain = BatchDecodePlan::new(dev, &shape, heads, &alloc.page_table(&family)?, DecodeOptions::default())?;
    let mut plan =
        CascadeDecodePlan::<f16>::new(dev, &shape, heads, &alloc.cascade_levels(&[family])?, DecodeOptions::default())?;
    let q = dev.upload(&random_values::<f16>(&mut rng(3), plain.qo_elems()))?;
    let (mut out_plain, mut out_cascade) =
        (dev.alloc_zeros::<f16>(plain.qo_elems())?, dev.alloc_zeros::<f16>(plain.qo_elems())?);
    let plain_us = b.timer.median_us(|| plain.run(dev.stream(), &q, &cache, 0, &mut out_plain, None))?;
    let cascade_us = b.timer.median_us(|| plan.run(dev.stream(), &q, &cache, 0, &mut out_cascade, None))?;
    let (a, c) = (dev.download(&out_plain)?, dev.download(&out_cascade)?);
    // NaN fails the check.
    let close = |x: f64, y: f64| (x - y).abs() <= 4e-3 + 2e-2 * x.abs();
    let wrong = a.iter().zip(&c).filter(|&(x, y)| !close(x.to_f64(), y.to_f64())).count();
    let check = if wrong == 0 { "ok".to_string() } else { format!("{wrong} WRONG") };
    let speedup = plain_us / cascade_us;
    b.print(&format!(
        "| cascade decode | {page_size} | {batch} | {prefix} | {own} | {plain_us:.1} | {cascade_us:.1} | {speedup:.2}× | {check} |"
    ));
    let row = json!({"kernel": "cascade", "page_size": page_size, "batch": batch, "prefix": prefix, "own": own,
                     "plain_us": plain_us, "cascade_us": cascade_us, "speedup": speedup, "elements_wrong": wrong});
    Ok((row, wrong.min(1)))
}
