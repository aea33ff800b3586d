//! Merging attention states (`merge_state`: two states per row, FlashInfer's `merge_state`):
//! bytes read plus written per second against the copy. Checked against the f64 reference.
use ferrinfer::{f16, merge_state, reference, StateShape};
use ferrinfer_tests::workload::{random_values, rng};
use rand::Rng;
use serde_json::{json, Value};

use crate::page_ops::Bench;
use crate::sampled::count_wrong;
use crate::timing::BoxResult;

pub fn header(b: &Bench) {
    b.print("| kernel | tokens | heads | head_dim | MB moved | median us | GB/s | % copy | check |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|---|");
}

/// Merges two f16 states of `tokens × heads × head_dim`; the second field counts output
/// elements that missed the reference.
pub fn merge(b: &mut Bench, tokens: usize, heads: usize, head_dim: usize) -> BoxResult<(Value, usize)> {
    let dev = b.dev;
    let mut r = rng(13);
    let shape = StateShape { heads, head_dim };
    let (rows, elems) = (tokens * heads, tokens * heads * head_dim);
    let (va, vb): (Vec<f16>, Vec<f16>) = (random_values(&mut r, elems), random_values(&mut r, elems));
    let (sa, sb): (Vec<f32>, Vec<f32>) = (
        (0..rows).map(|_| r.random_range(-8.0..8.0)).collect(),
        (0..rows).map(|_| r.random_range(-8.0..8.0)).collect(),
    );
    let (va_d, sa_d, vb_d, sb_d) = (dev.upload(&va)?, dev.upload(&sa)?, dev.upload(&vb)?, dev.upload(&sb)?);
    let (mut out, mut lse) = (dev.alloc_zeros::<f16>(elems)?, dev.alloc_zeros::<f32>(rows)?);
    let us = b
        .timer
        .median_us(|| merge_state(dev, dev.stream(), shape, &va_d, &sa_d, &vb_d, &sb_d, &mut out, Some(&mut lse)))?;
    // The first 64 tokens against the reference (the stacked form's f64 merge).
    let check_tokens = tokens.min(64);
    let row = heads * head_dim;
    let stacked: Vec<f16> =
        (0..check_tokens).flat_map(|t| va[t * row..][..row].iter().chain(&vb[t * row..][..row]).copied()).collect();
    let stacked_s: Vec<f32> = (0..check_tokens)
        .flat_map(|t| sa[t * heads..][..heads].iter().chain(&sb[t * heads..][..heads]).copied())
        .collect();
    let (want, _) = reference::merge_states(&stacked, &stacked_s, 2, heads, head_dim);
    let got = dev.download(&out)?;
    let wrong = count_wrong(&got[..check_tokens * row], &want);
    let check = if wrong == 0 { "ok".to_string() } else { format!("{wrong} WRONG") };
    // Two states read, one written, each with its LSE.
    let bytes = (3 * (elems * 2 + rows * 4)) as f64;
    let gbs = bytes / us / 1e3;
    b.print(&format!(
        "| merge_state | {tokens} | {heads} | {head_dim} | {:.1} | {us:.1} | {gbs:.0} | {:.1} | {check} |",
        bytes / 1e6,
        100.0 * gbs / b.copy_gbs
    ));
    let row = json!({"kernel": "merge_state", "tokens": tokens, "heads": heads, "head_dim": head_dim, "bytes": bytes,
                     "median_us": us, "gbs": gbs, "pct_copy": 100.0 * gbs / b.copy_gbs, "elements_wrong": wrong});
    Ok((row, wrong.min(1)))
}
