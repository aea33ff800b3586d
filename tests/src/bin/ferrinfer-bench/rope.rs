//! RoPE on FlashInfer's benchmark shape (8192 tokens of 32 query and 8 KV heads of 128, f16,
//! NeoX, in place unless the row says otherwise): each of FlashInfer's four angle sources, one
//! out-of-place row, and the fused append+RoPE against append after RoPE. Bytes are the q and k
//! read plus written (and, for the appends, v); % copy against the device-to-device copy.
//! Every row's first 64 tokens are checked against the f64 reference; the fused append's pools
//! must equal the unfused one's bit for bit.
use cudarc::driver::{CudaSlice, DevicePtr};
use ferrinfer::{
    f16, reference, AppendRopePlan, PagedKvCache, RopeOptions, RopePlan, RopePositions, RopeShape, ScatterPlan,
};
use ferrinfer_tests::workload::{random_table, random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::{pool_shape, Bench};
use crate::timing::BoxResult;

/// Tokens of every row: 8 requests of 1024.
const REQUESTS: usize = 8;
const PER_REQUEST: usize = 1024;
/// Rows of the cos/sin cache (vLLM's `max_position_embeddings` for many models).
const CACHE_ROWS: usize = 8192;

pub fn header(b: &Bench) {
    b.print("| kernel | tokens | q + kv heads | head_dim | MB moved | median us | GB/s | % copy | check |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|---|");
}

/// The rows `rope` can measure.
#[derive(Clone, Copy)]
pub enum Variant {
    /// `apply_rope`: indptr and offsets.
    Ragged,
    /// `apply_rope_pos_ids`: random positions up to 131072.
    PosIds,
    Llama31,
    CosSinCache,
    /// `apply_rope` out of place.
    OutOfPlace,
}

fn row(b: &Bench, kernel: &str, tokens: usize, heads: usize, bytes: f64, us: f64, wrong: usize) -> (Value, usize) {
    let gbs = bytes / us / 1e3;
    let head_dim = b.shapes.head_dim;
    let check = if wrong == 0 { "ok".to_string() } else { format!("{wrong} WRONG") };
    b.print(&format!(
        "| {kernel} | {tokens} | {heads} | {head_dim} | {:.1} | {us:.1} | {gbs:.0} | {:.1} | {check} |",
        bytes / 1e6,
        100.0 * gbs / b.copy_gbs
    ));
    let v = json!({"kernel": kernel, "tokens": tokens, "heads": heads, "head_dim": head_dim, "bytes": bytes,
                   "median_us": us, "gbs": gbs, "pct_copy": 100.0 * gbs / b.copy_gbs, "elements_wrong": wrong});
    (v, wrong.min(1))
}

/// Elements of the first `tokens` rows of `got` (rows of `heads × head_dim`) off the reference
/// by more than one f16 ulp plus 6e-6 (`tests/tests/gpu/rope.rs`'s bound).
fn count_wrong(
    got: &[f16],
    input: &[f16],
    heads: usize,
    head_dim: usize,
    positions: &[u64],
    o: &RopeOptions,
    cache: Option<&[f32]>,
) -> usize {
    let n = positions.len() * heads * head_dim;
    let want = reference::rope(&input[..n], heads, head_dim, positions, o, cache);
    got[..n]
        .iter()
        .zip(&want)
        .filter(|(g, &w)| {
            let ulp = 2f64.powi((w.abs().log2().floor() as i32).max(-14) - 10);
            let ok = (g.to_f64() - w).abs() <= ulp + 6e-6;
            !ok
        })
        .count()
}

/// One RoPE row on `q_heads + kv_heads` heads.
pub fn rope(b: &mut Bench, q_heads: usize, kv_heads: usize, variant: Variant) -> BoxResult<(Value, usize)> {
    let dev = b.dev;
    let head_dim = b.shapes.head_dim;
    let mut r = rng(17);
    let tokens = REQUESTS * PER_REQUEST;
    let indptr: Vec<u32> = (0..=REQUESTS as u32).map(|i| i * PER_REQUEST as u32).collect();
    let offsets: Vec<u32> = (0..REQUESTS as u32).map(|i| 1000 * i).collect();
    let (options, name) = match variant {
        Variant::Ragged => (RopeOptions::default(), "apply_rope"),
        Variant::PosIds => (RopeOptions::default(), "apply_rope_pos_ids"),
        Variant::Llama31 => (RopeOptions::llama31(), "apply_llama31_rope"),
        Variant::CosSinCache => {
            (RopeOptions::cos_sin_cache(CACHE_ROWS, head_dim, true), "apply_rope_with_cos_sin_cache")
        }
        Variant::OutOfPlace => (RopeOptions::default(), "apply_rope (out of place)"),
    };
    let pos_ids: Vec<u32> = match variant {
        Variant::PosIds => (0..tokens).map(|_| rand::Rng::random_range(&mut r, 0..=131072)).collect(),
        Variant::CosSinCache => (0..tokens).map(|_| rand::Rng::random_range(&mut r, 0..CACHE_ROWS as u32)).collect(),
        _ => Vec::new(),
    };
    let (positions, expanded): (RopePositions, Vec<u64>) = if pos_ids.is_empty() {
        let e =
            indptr.windows(2).zip(&offsets).flat_map(|(w, &o)| (0..(w[1] - w[0]) as u64).map(move |i| o as u64 + i));
        (RopePositions::Ragged { indptr: &indptr, offsets: &offsets }, e.collect())
    } else {
        (RopePositions::PerToken(&pos_ids), pos_ids.iter().map(|&p| p as u64).collect())
    };
    let shape = RopeShape { num_qo_heads: q_heads, num_kv_heads: kv_heads, head_dim };
    let plan = RopePlan::new(dev, shape, positions, options)?;
    let cache: Vec<f32> = (0..CACHE_ROWS * head_dim).map(|i| ((i % 977) as f32 * 0.37).cos()).collect();
    let cache_dev = dev.upload(&cache)?;
    let cache_arg = matches!(variant, Variant::CosSinCache).then_some(&cache_dev as &dyn DevicePtr<f32>);
    let (q, k): (Vec<f16>, Vec<f16>) = (random_values(&mut r, plan.q_elems()), random_values(&mut r, plan.k_elems()));
    let (mut qd, mut kd) = (dev.upload(&q)?, dev.upload(&k)?);
    let (mut qo, mut ko) = (dev.alloc_zeros::<f16>(q.len())?, dev.alloc_zeros::<f16>(k.len())?);
    let out_of_place = matches!(variant, Variant::OutOfPlace);
    // Checked on a fresh rotation of the inputs (in place, the timed runs rotate again and again).
    if out_of_place {
        plan.run_out_of_place(dev.stream(), &qd, &kd, &mut qo, &mut ko, cache_arg)?;
    } else {
        plan.run(dev.stream(), &mut qd, &mut kd, cache_arg)?;
    }
    let (qg, kg) =
        if out_of_place { (dev.download(&qo)?, dev.download(&ko)?) } else { (dev.download(&qd)?, dev.download(&kd)?) };
    let check = &expanded[..64];
    let c = cache_arg.map(|_| &cache[..]);
    let wrong = count_wrong(&qg, &q, q_heads, head_dim, check, &options, c)
        + count_wrong(&kg, &k, kv_heads, head_dim, check, &options, c);
    let us = if out_of_place {
        b.timer.median_us(|| plan.run_out_of_place(dev.stream(), &qd, &kd, &mut qo, &mut ko, cache_arg))?
    } else {
        b.timer.median_us(|| plan.run(dev.stream(), &mut qd, &mut kd, cache_arg))?
    };
    let bytes = (2 * (q.len() + k.len()) * 2) as f64;
    Ok(row(b, name, tokens, q_heads + kv_heads, bytes, us, wrong))
}

/// A row of [`append_rope`] with its count of wrong elements, and the K and V pools it wrote.
pub type AppendRow = ((Value, usize), Vec<f16>, Vec<f16>);

/// The append of 8 × 1024 new tokens to sequences of 4096 (positions 3072..4096) at
/// `page_size`, with RoPE: `fused` in one launch, else RoPE in place then the append. Returns
/// the row and the K and V pools for comparing the two.
pub fn append_rope(b: &mut Bench, q_heads: usize, page_size: usize, fused: bool) -> BoxResult<AppendRow> {
    let dev = b.dev;
    let mut r = rng(23);
    let seq_after = 4096;
    let kv_lens = vec![seq_after; REQUESTS];
    let shape = pool_shape(&b.shapes, &kv_lens, page_size);
    let table = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
    let append_indptr: Vec<u32> = (0..=REQUESTS as u32).map(|i| i * PER_REQUEST as u32).collect();
    let options = RopeOptions::default();
    let mut cache = PagedKvCache::<f16>::new(dev, shape, 1)?;
    let fused_plan = AppendRopePlan::new(dev, &shape, &table, &append_indptr, q_heads, options)?;
    let n = fused_plan.ragged_elems();
    let (q, k, v): (Vec<f16>, Vec<f16>, Vec<f16>) =
        (random_values(&mut r, fused_plan.q_elems()), random_values(&mut r, n), random_values(&mut r, n));
    let (mut qd, mut kd, vd) = (dev.upload(&q)?, dev.upload(&k)?, dev.upload(&v)?);
    let offsets = vec![(seq_after - PER_REQUEST) as u32; REQUESTS];
    let positions = RopePositions::Ragged { indptr: &append_indptr, offsets: &offsets };
    let rope_plan = RopePlan::new(
        dev,
        RopeShape { num_qo_heads: q_heads, num_kv_heads: shape.num_kv_heads, head_dim: shape.head_dim },
        positions,
        options,
    )?;
    let append = ScatterPlan::append(dev, &shape, &table, &append_indptr)?;
    let step = |qd: &mut CudaSlice<f16>, kd: &mut CudaSlice<f16>, cache: &mut PagedKvCache<f16>| {
        if fused {
            fused_plan.run(dev.stream(), qd, &*kd, &vd, cache, 0, None)
        } else {
            rope_plan.run(dev.stream(), qd, kd, None)?;
            append.run(dev.stream(), cache, 0, &*kd, &vd)
        }
    };
    // One step on the inputs, checked; the pools kept for comparing fused and unfused.
    step(&mut qd, &mut kd, &mut cache)?;
    let expanded: Vec<u64> = (0..64).map(|i| (seq_after - PER_REQUEST + i) as u64).collect();
    let wrong = count_wrong(&dev.download(&qd)?, &q, q_heads, shape.head_dim, &expanded, &options, None);
    let pools = cache.layer(0)?;
    let (k_pool, v_pool) = (dev.download(pools.k())?, dev.download(pools.v())?);
    let us = b.timer.median_us(|| step(&mut qd, &mut kd, &mut cache))?;
    // q read and written, k and v read and written once (the unfused path moves k twice more).
    let bytes = (2 * (q.len() + 2 * n) * 2) as f64;
    let name = if fused {
        format!("append+RoPE fused (page_size {page_size})")
    } else {
        format!("RoPE then append (page_size {page_size})")
    };
    Ok((row(b, &name, REQUESTS * PER_REQUEST, q_heads + 2 * shape.num_kv_heads, bytes, us, wrong), k_pool, v_pool))
}
