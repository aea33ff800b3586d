//! Batch prefill (causal or not): time and TFLOP/s, with FlashInfer's formula
//! `batch · 4 · qo_len · kv_len · num_qo_heads · head_dim` (halved when causal). Pools repeat
//! one random block as in decode; each row checks the first two and the last two query tokens
//! of its first and last request against the f64 reference (`sampled`).
use ferrinfer::{reference, BatchPrefillPlan, KvDType, KvScales, PrefillOptions};
use ferrinfer_tests::workload::{random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::Bench;
use crate::sampled::{count_wrong, BenchCache};
use crate::timing::BoxResult;

const CAUSAL: PrefillOptions = PrefillOptions::CAUSAL;

pub fn header(b: &Bench) {
    b.print("| kernel | page_size | batch | qo_len = kv_len | group | median us | TFLOP/s | blocks | path | check |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
}

/// Measures `batch` prompts of `len` tokens (all new: qo_len = kv_len); the second field
/// counts the sampled output elements that missed the reference.
pub fn prefill<T: KvDType, C: KvDType>(
    b: &mut Bench,
    batch: usize,
    len: usize,
    page_size: usize,
    group: usize,
    causal: bool,
) -> BoxResult<(Value, usize)> {
    let (dev, s) = (b.dev, &b.shapes);
    let c = BenchCache::<C>::new(b, &vec![len; batch], page_size)?;
    let heads = s.kv_heads * group;
    let qo_indptr: Vec<u32> = (0..=batch as u32).map(|i| i * len as u32).collect();
    let options = PrefillOptions { causal, kv_dtype: (T::DTYPE != C::DTYPE).then_some(C::DTYPE), ..CAUSAL };
    let mut plan = BatchPrefillPlan::new(dev, &c.shape, heads, &qo_indptr, &c.table, options)?;
    let q_host: Vec<T> = random_values(&mut rng(3), plan.qo_elems());
    let q = dev.upload(&q_host)?;
    let mut out = dev.alloc_zeros::<T>(plan.qo_elems())?;
    let us = b.timer.median_us(|| plan.run(dev.stream(), &q, &c.cache, 0, &mut out, None))?;
    let out_host = dev.download(&out)?;

    // Causal: tokens j of a prompt sit at positions j, so the first two are a 2-token prompt of
    // their own, the last two a 2-token chunk at the end of the whole prompt. Without a mask
    // every token sees the whole prompt.
    let row = heads * s.head_dim;
    let mut wrong = 0;
    for request in [0, batch - 1].into_iter().take(batch.min(2)) {
        for (kv_len, first_token) in [(if causal { 2.min(len) } else { len }, 0), (len, len.saturating_sub(2))] {
            let qo_len = (kv_len - first_token).min(2);
            let own = c.sample(request, kv_len);
            let rows = (request * len + first_token) * row..(request * len + first_token + qo_len) * row;
            let (want, _) = reference::prefill_scaled(
                &own.shape,
                &own.k,
                &own.v,
                KvScales::default(),
                &own.table,
                &[0, qo_len as u32],
                &q_host[rows.clone()],
                heads,
                &options,
            );
            wrong += count_wrong(&out_host[rows], &want);
        }
    }
    let check = if wrong == 0 { "ok".to_string() } else { format!("{wrong} WRONG") };
    let flops = (batch * 4 * len * len * heads * s.head_dim / if causal { 2 } else { 1 }) as f64;
    let tflops = flops / us / 1e6;
    let path = plan.kernel().to_string();
    let (mask, kernel) = if causal { ("causal", "prefill") } else { ("full", "prefill_full") };
    b.print(&format!(
        "| {} | {page_size} | {batch} | {len} | {group} | {us:.1} | {tflops:.1} | {} | {path} | {check} |",
        crate::decode::label::<T, C>(&format!("prefill ({mask})")),
        plan.num_blocks()
    ));
    let row = json!({"kernel": kernel, "dtype": T::DTYPE.name(), "kv_dtype": C::DTYPE.name(), "causal": causal, "page_size": page_size, "batch": batch, "qo_len": len,
                     "kv_len": len, "group": group, "flops": flops, "median_us": us, "tflops": tflops,
                     "path": path, "sampled_elements_wrong": wrong});
    Ok((row, wrong))
}
