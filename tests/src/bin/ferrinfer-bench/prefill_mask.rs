//! Batch prefill with a custom mask: speculative-decoding tree verification as SGLang's EAGLE
//! path runs it. Each request has `kv_len` keys whose last `qo_len` are draft tokens forming a
//! random tree; a draft sees every earlier key, itself and its ancestors. Time and TFLOP/s
//! (FlashInfer's unmasked formula `batch · 4 · qo_len · kv_len · num_qo_heads · head_dim`:
//! nearly every key is visible). The trees come from [`tree_parents`], a generator that
//! `bench/flashinfer/prefill_mask.py` repeats exactly, so FlashInfer runs the same mask; both
//! print the number of kept entries. Each row checks the first two and the last two draft
//! tokens of its first and last request against the f64 reference (`sampled`).
use ferrinfer::{reference, BatchPrefillPlan, CustomMask, KvDType, PrefillOptions};
use ferrinfer_tests::workload::{random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::Bench;
use crate::sampled::{count_wrong, BenchCache};
use crate::timing::BoxResult;

/// The seed of the benchmark's trees (issue 22).
pub const TREE_SEED: u64 = 22;

/// SplitMix64: small, and the same in Python with 64-bit masking.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Each request's draft tree: node 0 is the root, node `j ≥ 1` hangs off node
/// `splitmix64() % j` (one generator over the whole batch, request after request).
pub fn tree_parents(batch: usize, qo_len: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut state = seed;
    (0..batch)
        .map(|_| (0..qo_len).map(|j| if j == 0 { 0 } else { (splitmix64(&mut state) % j as u64) as usize }).collect())
        .collect()
}

/// The flattened mask of `tree_parents`' trees at the end of `kv_len` keys each.
pub fn tree_mask(batch: usize, qo_len: usize, kv_len: usize, seed: u64) -> Vec<bool> {
    let prefix = kv_len - qo_len;
    let mut mask = Vec::with_capacity(batch * qo_len * kv_len);
    for parents in tree_parents(batch, qo_len, seed) {
        for j in 0..qo_len {
            let mut row = vec![false; kv_len];
            row[..prefix].fill(true);
            let mut node = j;
            loop {
                row[prefix + node] = true;
                if node == 0 {
                    break;
                }
                node = parents[node];
            }
            mask.extend(row);
        }
    }
    mask
}

pub fn header(b: &Bench) {
    b.print("| kernel | page_size | batch | qo_len | kv_len | group | median us | TFLOP/s | blocks | path | check |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
}

/// Measures `batch` trees of `qo_len` drafts over `kv_len` keys; the second field counts the
/// sampled output elements that missed the reference.
pub fn prefill_mask<T: KvDType>(
    b: &mut Bench,
    batch: usize,
    qo_len: usize,
    kv_len: usize,
    page_size: usize,
    group: usize,
) -> BoxResult<(Value, usize)> {
    let (dev, s) = (b.dev, &b.shapes);
    let c = BenchCache::<T>::new(b, &vec![kv_len; batch], page_size)?;
    let heads = s.kv_heads * group;
    let qo_indptr: Vec<u32> = (0..=batch as u32).map(|i| i * qo_len as u32).collect();
    let mask = tree_mask(batch, qo_len, kv_len, TREE_SEED);
    let kept = mask.iter().filter(|&&m| m).count();
    let options = PrefillOptions::default();
    let mut plan =
        BatchPrefillPlan::new_masked(dev, &c.shape, heads, &qo_indptr, &c.table, CustomMask::Flat(&mask), options)?;
    let q_host: Vec<T> = random_values(&mut rng(3), plan.qo_elems());
    let q = dev.upload(&q_host)?;
    let mut out = dev.alloc_zeros::<T>(plan.qo_elems())?;
    let us = b.timer.median_us(|| plan.run(dev.stream(), &q, &c.cache, 0, &mut out, None))?;
    let out_host = dev.download(&out)?;

    let row = heads * s.head_dim;
    let mut wrong = 0;
    for request in [0, batch - 1].into_iter().take(batch.min(2)) {
        let own = c.sample(request, kv_len);
        for first in [0, qo_len.saturating_sub(2)] {
            let n = (qo_len - first).min(2);
            let token = request * qo_len + first;
            let rows_mask = &mask[token * kv_len..(token + n) * kv_len];
            let (want, _) = reference::prefill_masked(
                &own.shape,
                &own.k,
                &own.v,
                &own.table,
                &[0, n as u32],
                &q_host[token * row..(token + n) * row],
                heads,
                rows_mask,
                &options,
            );
            wrong += count_wrong(&out_host[token * row..(token + n) * row], &want);
        }
    }
    let check = if wrong == 0 { "ok".to_string() } else { format!("{wrong} WRONG") };
    let flops = (batch * 4 * qo_len * kv_len * heads * s.head_dim) as f64;
    let tflops = flops / us / 1e6;
    let path = plan.kernel().to_string();
    b.print(&format!(
        "| {} | {page_size} | {batch} | {qo_len} | {kv_len} | {group} | {us:.1} | {tflops:.1} | {} | {path} | {check} |",
        crate::decode::label::<T, T>("prefill (tree mask)"),
        plan.num_blocks()
    ));
    let row = json!({"kernel": "prefill_mask", "dtype": T::DTYPE.name(), "page_size": page_size, "batch": batch,
                     "qo_len": qo_len, "kv_len": kv_len, "group": group, "mask_seed": TREE_SEED, "mask_kept": kept,
                     "flops": flops, "median_us": us, "tflops": tflops, "path": path, "sampled_elements_wrong": wrong});
    Ok((row, wrong))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_generator_is_pinned_to_the_flashinfer_scripts() {
        // bench/flashinfer/prefill_mask.py's generator gives the same trees and count.
        assert_eq!(tree_parents(2, 6, TREE_SEED), [[0, 0, 0, 1, 2, 0], [0, 0, 0, 2, 1, 2]]);
        let mask = tree_mask(8, 64, 4096, TREE_SEED);
        assert_eq!((mask.len(), mask.iter().filter(|&&m| m).count()), (8 * 64 * 4096, 2066783));
    }
}
