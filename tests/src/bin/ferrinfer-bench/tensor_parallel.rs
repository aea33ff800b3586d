//! Tensor-parallel decode (issue 25's rows): a decode step over `gpus ×` the heads on `gpus`
//! GPUs (each GPU its share: decode, then the outputs all-gathered through NCCL into every
//! GPU's single-GPU layout) against 1× the heads on one GPU. A step's time is the slowest GPU's,
//! from CUDA events around its work on its own stream, every GPU's L2 flushed first; the
//! all-gather's share is its events' time (from the last decode's end on that GPU). Median
//! over the runs. The first request's output on the last GPU is checked against the f64
//! reference (`sampled`).
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use ferrinfer::{
    f16, reference, BatchDecodePlan, CacheShape, DecodeOptions, Device, LayerPools, PagedKvCache, TensorParallel,
};
use ferrinfer_tests::workload::{random_table, random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::{pool_shape, Bench};
use crate::sampled::{count_wrong, filled_pool, SampledRequest};
use crate::timing::BoxResult;

pub fn header(b: &Bench) {
    b.print("| kernel | GPUs | batch | kv_len | query/KV heads | median us | all-gather us | all-gather share | vs 1 GPU | check |");
    b.print("|---|---:|---:|---:|---|---:|---:|---:|---:|---|");
}

/// The step on `gpus` GPUs of `gpus × group · kv_heads` query heads over `gpus × kv_heads` KV
/// heads (each GPU `kv_heads` of them), batch × kv_len, page size 16; `one_gpu_us` is the
/// single-GPU row's time for the ratio (0: this is that row, on one GPU without NCCL).
pub fn tensor_parallel_decode(
    b: &mut Bench,
    gpus: usize,
    batch: usize,
    kv_len: usize,
    group: usize,
    one_gpu_us: f64,
) -> BoxResult<(Value, usize, f64)> {
    let devices: Vec<Device> =
        std::iter::once(Ok(b.dev.clone())).chain((1..gpus).map(Device::new)).collect::<Result<_, _>>()?;
    let kv_local = b.shapes.kv_heads;
    let shard = CacheShape { num_kv_heads: kv_local, ..pool_shape(&b.shapes, &vec![kv_len; batch], 16) };
    let table = random_table(&mut rng(16), &vec![kv_len; batch], 16, shard.num_pages);
    let blocks: [Vec<f16>; 2] = [1, 2].map(|seed| random_values(&mut rng(seed), 1 << 22));
    let heads = kv_local * group;
    let options = DecodeOptions::default();
    let mut caches = Vec::new();
    let mut plans = Vec::new();
    for dev in &devices {
        let layer = LayerPools::new(
            filled_pool(dev, shard.pool_elems(), &blocks[0])?,
            filled_pool(dev, shard.pool_elems(), &blocks[1])?,
        );
        caches.push(PagedKvCache::from_layers(shard, vec![layer])?);
        plans.push(BatchDecodePlan::new(dev, &shard, heads, &table, options)?);
    }
    let q_host: Vec<f16> = random_values(&mut rng(3), batch * heads * b.shapes.head_dim);
    let q: Vec<CudaSlice<f16>> = devices.iter().map(|d| d.upload(&q_host)).collect::<Result<_, _>>()?;
    let mut local: Vec<CudaSlice<f16>> =
        devices.iter().map(|d| d.alloc_zeros(q_host.len())).collect::<Result<_, _>>()?;
    let total = gpus * q_host.len();
    let mut staging: Vec<CudaSlice<f16>> = devices.iter().map(|d| d.alloc_zeros(total)).collect::<Result<_, _>>()?;
    let mut out: Vec<CudaSlice<f16>> = devices.iter().map(|d| d.alloc_zeros(total)).collect::<Result<_, _>>()?;
    let tp = if one_gpu_us > 0.0 { Some(TensorParallel::new(devices.clone())?) } else { None };
    let mut flush: Vec<CudaSlice<u8>> = devices.iter().map(|d| d.alloc_zeros(256 << 20)).collect::<Result<_, _>>()?;

    let runs = b.timer.runs();
    let (mut steps, mut gathers) = (Vec::new(), Vec::new());
    for run in 0..runs + 3 {
        let mut events = Vec::new();
        for (r, dev) in devices.iter().enumerate() {
            dev.stream().memset_zeros(&mut flush[r])?;
            let event = || dev.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
            let (start, mid, end) = (event()?, event()?, event()?);
            start.record(dev.stream())?;
            plans[r].run(dev.stream(), &q[r], &caches[r], 0, &mut local[r], None)?;
            mid.record(dev.stream())?;
            events.push((start, mid, end));
        }
        if let Some(tp) = &tp {
            tp.all_gather_heads(batch, &local, &mut staging, &mut out)?;
        }
        for (r, dev) in devices.iter().enumerate() {
            events[r].2.record(dev.stream())?;
        }
        let (mut step, mut gather) = (0.0f64, 0.0f64);
        for (start, mid, end) in &events {
            end.synchronize()?;
            step = step.max(start.elapsed_ms(end)? as f64 * 1e3);
            gather = gather.max(mid.elapsed_ms(end)? as f64 * 1e3);
        }
        if run >= 3 {
            steps.push(step);
            gathers.push(gather);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (us, gather_us) = (median(steps), median(gathers));

    // The first request's first GPU-local heads, on the last GPU's gathered output (or the
    // single GPU's own), against the reference over its keys.
    let last = gpus - 1;
    let got = devices[last].download(if tp.is_some() { &out[last] } else { &local[last] })?;
    let own = SampledRequest::new(&shard, &table, (&blocks[0], &blocks[1]), 0, kv_len);
    let row = heads * b.shapes.head_dim;
    let (want, _) = reference::decode(&own.shape, &own.k, &own.v, &own.table, &q_host[..row], heads, &options);
    let wrong = count_wrong(&got[..row], &want);
    let check = if wrong == 0 { "ok".to_string() } else { format!("{wrong} WRONG") };
    let (share, ratio) = (100.0 * gather_us / us, if one_gpu_us > 0.0 { us / one_gpu_us } else { 1.0 });
    b.print(&format!(
        "| {} | {gpus} | {batch} | {kv_len} | {}/{} | {us:.1} | {gather_us:.1} | {share:.1}% | {ratio:.3} | {check} |",
        if tp.is_some() { "decode + all-gather f16" } else { "decode f16" },
        gpus * heads,
        gpus * kv_local
    ));
    let json = json!({"kernel": "tensor_parallel_decode", "gpus": gpus, "nccl": tp.is_some(), "batch": batch,
                      "kv_len": kv_len, "num_qo_heads": gpus * heads, "num_kv_heads": gpus * kv_local,
                      "median_us": us, "all_gather_us": gather_us, "all_gather_share_pct": share,
                      "vs_one_gpu": ratio, "sampled_elements_wrong": wrong});
    Ok((json, wrong, us))
}
