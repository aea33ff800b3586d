//! Host time of planning, what a serving engine pays every step: `replan` (the plan's buffers
//! reused) and `new`, with the GPU idle and with it busy with the previous step's work (a
//! ~0.5 ms read queued before each plan, as a decode step's kernels would be). Planning never
//! waits for the GPU: each busy row also says whether the queued work was still running when
//! planning returned. Times are host wall-clock microseconds (median of `runs`).
use std::time::Instant;

use ferrinfer::internals::ReadStream;
use ferrinfer::{BatchDecodePlan, BatchPrefillPlan, CacheShape, DecodeOptions, Device, PageTable, PrefillOptions};
use ferrinfer_tests::workload::{random_table, rng};
use serde_json::{json, Value};

use crate::page_ops::{pool_shape, Bench};
use crate::timing::BoxResult;

pub fn header(b: &Bench) {
    b.print(
        "| plan | batch | qo_len | kv_len | replan idle us | replan busy us | new busy us | GPU still busy after |",
    );
    b.print("|---|---:|---:|---:|---:|---:|---:|---|");
}

/// Median host microseconds of `plan`, each call preceded by `before` (not timed); and whether
/// `busy` work queued by `before` was still running after every call.
fn median_host_us(
    dev: &Device,
    runs: usize,
    busy: Option<&mut ReadStream>,
    mut plan: impl FnMut() -> ferrinfer::Result<()>,
) -> BoxResult<(f64, bool)> {
    let mut times = Vec::with_capacity(runs);
    let mut always_busy = true;
    let mut busy = busy;
    for i in 0..runs + 3 {
        let done = match busy.as_deref_mut() {
            Some(read) => {
                read.run(dev.stream())?;
                read.run(dev.stream())?;
                Some(dev.stream().record_event(None)?)
            }
            None => None,
        };
        let t = Instant::now();
        plan()?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if let Some(done) = done {
            always_busy &= !done.is_complete();
        }
        dev.synchronize()?;
        if i >= 3 {
            times.push(us);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], always_busy))
}

fn row(b: &mut Bench, kind: &str, batch: usize, qo_len: usize, kv_len: usize, times: [(f64, bool); 3]) -> Value {
    let [idle, busy, new] = times;
    let still_busy = if busy.1 && new.1 { "yes" } else { "NO" };
    b.print(&format!(
        "| {kind} | {batch} | {qo_len} | {kv_len} | {:.1} | {:.1} | {:.1} | {still_busy} |",
        idle.0, busy.0, new.0
    ));
    json!({"kernel": "plan", "plan": kind, "batch": batch, "qo_len": qo_len, "kv_len": kv_len, "replan_idle_us": idle.0,
           "replan_busy_us": busy.0, "new_busy_us": new.0, "gpu_busy_throughout": busy.1 && new.1})
}

/// Decode planning of `batch` requests of `kv_len` tokens at `page_size` (the bench's heads,
/// group 4).
pub fn decode(b: &mut Bench, batch: usize, kv_len: usize, page_size: usize, runs: usize) -> BoxResult<Value> {
    let (shape, table) = workload(b, &vec![kv_len; batch], page_size);
    let heads = b.shapes.kv_heads * 4;
    let dev = b.dev;
    let opts = DecodeOptions::default();
    let mut plan = BatchDecodePlan::new(dev, &shape, heads, &table, opts)?;
    let mut read = ReadStream::new(dev, 1 << 30)?;
    let idle = median_host_us(dev, runs, None, || plan.replan(&shape, heads, &table, opts))?;
    let busy = median_host_us(dev, runs, Some(&mut read), || plan.replan(&shape, heads, &table, opts))?;
    let new = median_host_us(dev, runs, Some(&mut read), || {
        BatchDecodePlan::new(dev, &shape, heads, &table, opts).map(drop)
    })?;
    Ok(row(b, "decode", batch, 1, kv_len, [idle, busy, new]))
}

/// Causal prefill planning of `batch` prompts of `len` new tokens.
pub fn prefill(b: &mut Bench, batch: usize, len: usize, page_size: usize, runs: usize) -> BoxResult<Value> {
    let (shape, table) = workload(b, &vec![len; batch], page_size);
    let heads = b.shapes.kv_heads * 4;
    let dev = b.dev;
    let qo: Vec<u32> = (0..=batch as u32).map(|i| i * len as u32).collect();
    let opts = PrefillOptions { causal: true, ..Default::default() };
    let mut plan = BatchPrefillPlan::new(dev, &shape, heads, &qo, &table, opts)?;
    let mut read = ReadStream::new(dev, 1 << 30)?;
    let idle = median_host_us(dev, runs, None, || plan.replan(&shape, heads, &qo, &table, opts))?;
    let busy = median_host_us(dev, runs, Some(&mut read), || plan.replan(&shape, heads, &qo, &table, opts))?;
    let new = median_host_us(dev, runs, Some(&mut read), || {
        BatchPrefillPlan::new(dev, &shape, heads, &qo, &table, opts).map(drop)
    })?;
    Ok(row(b, "prefill (causal)", batch, len, len, [idle, busy, new]))
}

/// A page table on a random permutation of a pool 25% larger than needed (no device memory:
/// planning reads only the table).
fn workload(b: &Bench, kv_lens: &[usize], page_size: usize) -> (CacheShape, PageTable) {
    let shape = pool_shape(&b.shapes, kv_lens, page_size);
    let table = random_table(&mut rng(page_size as u64), kv_lens, page_size, shape.num_pages);
    (shape, table)
}
