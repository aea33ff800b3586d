//! Speculative decoding (issue 20): `batch` requests of `draft` new query tokens each at the end of
//! `kv_len` keys, causal, through the prefill plan (FlashInfer's users run it through its prefill
//! wrapper). Each row times the plan's own choice, the portable kernel
//! (`Device::with_portable_kernels`), the Hopper kernel (`Device::with_hopper_prefill`, where the
//! GPU has it) and, as the floor, one-token decode over the same cache; K/V bytes per second as a
//! fraction of the read stream (the cache is read once a request and KV head, as in decode).
//! The first and last draft token of the first and last request are checked in every variant
//! against the f64 reference, computed once a row (in parallel: at 32768 keys it takes seconds
//! a token).
use ferrinfer::{reference, BatchDecodePlan, BatchPrefillPlan, Device, KvDType, KvScales, PrefillOptions};
use ferrinfer_tests::workload::{random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::Bench;
use crate::sampled::{count_wrong, BenchCache};
use crate::timing::BoxResult;

pub fn header(b: &Bench) {
    b.print("| kernel | page_size | batch | draft | kv_len | KV MB | median us | KV GB/s | % read stream | blocks | path | check |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
}

/// Measures one row (every variant); the second field counts the sampled output elements that
/// missed the reference.
pub fn speculative<T: KvDType>(
    b: &mut Bench,
    batch: usize,
    draft: usize,
    kv_len: usize,
    page_size: usize,
    group: usize,
) -> BoxResult<(Vec<Value>, usize)> {
    let dev = b.dev;
    let c = BenchCache::<T>::new(b, &vec![kv_len; batch], page_size)?;
    let (heads, head_dim) = (b.shapes.kv_heads * group, b.shapes.head_dim);
    let row_elems = heads * head_dim;
    let qo_indptr: Vec<u32> = (0..=batch as u32).map(|i| i * draft as u32).collect();
    let options = PrefillOptions::CAUSAL;
    let q_host: Vec<T> = random_values(&mut rng(3), batch * draft * row_elems);
    let q = dev.upload(&q_host)?;
    // The sampled (request, draft token) pairs, each a query of its own over the keys up to its
    // position; a request's last draft token is also decode's query.
    let mut sampled: Vec<(usize, usize)> = Vec::new();
    for request in [0, batch - 1] {
        for token in [0, draft - 1] {
            if !sampled.contains(&(request, token)) {
                sampled.push((request, token));
            }
        }
    }
    let want: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sampled
            .iter()
            .map(|&(request, token)| {
                let (c, q_host) = (&c, &q_host);
                scope.spawn(move || {
                    let own = c.sample(request, kv_len - draft + token + 1);
                    let at = (request * draft + token) * row_elems;
                    let (scales, indptr) = (KvScales::default(), [0, 1]);
                    let q = &q_host[at..at + row_elems];
                    reference::prefill_scaled(
                        &own.shape, &own.k, &own.v, scales, &own.table, &indptr, q, heads, &options,
                    )
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("the reference thread")).collect()
    });
    let bytes = (2 * batch * kv_len * b.shapes.kv_heads * head_dim * T::DTYPE.size_bytes()) as f64;

    let mut rows = Vec::new();
    let mut wrong_total = 0;
    let mut report = |b: &Bench, variant: &str, us: f64, blocks: usize, path: String, wrong: usize| {
        let gbs = bytes / us / 1e3;
        let check = if wrong == 0 { "ok".to_string() } else { format!("{wrong} WRONG") };
        b.print(&format!(
            "| {} | {page_size} | {batch} | {draft} | {kv_len} | {:.0} | {us:.1} | {gbs:.0} | {:.1} | {blocks} | {path} | {check} |",
            crate::decode::label::<T, T>(variant),
            bytes / 1e6,
            100.0 * gbs / b.read_gbs,
        ));
        rows.push(json!({"kernel": "spec", "variant": variant, "dtype": T::DTYPE.name(), "page_size": page_size,
                         "batch": batch, "draft": draft, "kv_len": kv_len, "group": group, "kv_bytes": bytes,
                         "median_us": us, "gbs": gbs, "pct_read_stream": 100.0 * gbs / b.read_gbs, "blocks": blocks,
                         "path": path, "sampled_elements_wrong": wrong}));
        wrong_total += wrong;
    };

    // One-token decode of each request's last draft token over the same keys: the floor.
    let last_tokens: Vec<T> = (0..batch)
        .flat_map(|r| q_host[((r + 1) * draft - 1) * row_elems..(r + 1) * draft * row_elems].to_vec())
        .collect();
    let mut decode = BatchDecodePlan::new(dev, &c.shape, heads, &c.table, Default::default())?;
    let q_last = dev.upload(&last_tokens)?;
    let mut out = dev.alloc_zeros::<T>(decode.qo_elems())?;
    let us = b.timer.median_us(|| decode.run(dev.stream(), &q_last, &c.cache, 0, &mut out, None))?;
    // Sampled elements of `got` (a row a query, `row_of(request, token)`) that miss the
    // reference, over the (request, token) pairs that `keep`.
    let wrong_in = |got: &[T], keep: &dyn Fn(usize) -> bool, row_of: &dyn Fn(usize, usize) -> usize| -> usize {
        let pairs = sampled.iter().zip(&want).filter(|((_, token), _)| keep(*token));
        pairs.map(|(&(r, token), want)| count_wrong(&got[row_of(r, token) * row_elems..][..row_elems], want)).sum()
    };
    let wrong = wrong_in(&dev.download(&out)?, &|token| token == draft - 1, &|r, _| r);
    let ((items, kv_heads, tiles), _) = decode.launch_shape();
    report(b, "spec: decode, last token", us, (items * kv_heads * tiles) as usize, "decode".into(), wrong);

    let mut variants: Vec<(&str, Device)> =
        vec![("spec: plan", dev.clone()), ("spec: portable", dev.with_portable_kernels())];
    if dev.arch_specific_ptx().is_some() {
        variants.push(("spec: hopper", dev.with_hopper_prefill()));
    }
    for (variant, on) in variants {
        let mut plan = BatchPrefillPlan::new(&on, &c.shape, heads, &qo_indptr, &c.table, options)?;
        let mut out = dev.alloc_zeros::<T>(plan.qo_elems())?;
        let us = b.timer.median_us(|| plan.run(dev.stream(), &q, &c.cache, 0, &mut out, None))?;
        let wrong = wrong_in(&dev.download(&out)?, &|_| true, &|r, token| r * draft + token);
        report(b, variant, us, plan.num_blocks(), plan.kernel().to_string(), wrong);
    }
    Ok((rows, wrong_total))
}
