//! MLA decode (issue 24's rows): `batch` requests of one query token and `num_heads` heads over
//! `kv_len` cached tokens each, DeepSeek's 512 + 64 dims. Time; the bytes read (the latent
//! cache, once: every head shares it; plus queries and outputs) per second, as a fraction of
//! the read stream; and TFLOP/s as FlashMLA and FlashInfer count it,
//! `batch · heads · kv_len · 2 · (576 + 512)`. The pools repeat one random block (`sampled`),
//! so the first and last request's first [`CHECKED_HEADS`] heads are checked against the f64
//! reference.
use ferrinfer::{
    reference, BatchMlaPlan, CacheShape, KvDType, KvLayout, MlaCacheShape, MlaKvCache, MlaLayerPools, MlaOptions,
};
use ferrinfer_tests::workload::{random_table, random_values, rng};
use serde_json::{json, Value};

use crate::page_ops::Bench;
use crate::sampled::{count_wrong, filled_pool, own_pages, rebuild_pages};
use crate::timing::BoxResult;

const CKV: usize = MlaCacheShape::CKV_DIM;
const KPE: usize = MlaCacheShape::KPE_DIM;
/// Heads of the first and last request checked against the reference (all 128 over 32768
/// keys would take the f64 reference seconds a row).
const CHECKED_HEADS: usize = 8;

pub fn header(b: &Bench) {
    b.print("| kernel | page_size | batch | kv_len | heads | median us | GB/s | % read | TFLOP/s | blocks | merged tiles | path | check |");
    b.print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
}

/// Measures one decode row; the second field counts the checked output elements that missed.
pub fn mla_decode<T: KvDType, C: KvDType>(
    b: &mut Bench,
    batch: usize,
    kv_len: usize,
    page_size: usize,
    num_heads: usize,
) -> BoxResult<(Value, usize)> {
    let dev = b.dev;
    let kv_lens = vec![kv_len; batch];
    let pages: usize = kv_len.div_ceil(page_size) * batch;
    let shape = MlaCacheShape { num_pages: pages + pages / 4 + 1, page_size };
    let table = random_table(&mut rng(page_size as u64), &kv_lens, page_size, shape.num_pages);
    // An 8-bit cache keeps its scale at 1 (speed does not depend on it).
    let blocks: [Vec<C>; 2] = [1, 2].map(|seed| random_values(&mut rng(seed), 1 << 22));
    let layer = MlaLayerPools::new(
        filled_pool(dev, shape.ckv_pool_elems(), &blocks[0])?,
        filled_pool(dev, shape.kpe_pool_elems(), &blocks[1])?,
    );
    let cache = MlaKvCache::from_layers(shape, vec![layer])?;
    let qo_indptr: Vec<u32> = (0..=batch as u32).collect();
    // DeepSeek-V3's scale: 1 / √(128 + 64).
    let kv_dtype = (T::DTYPE != C::DTYPE).then_some(C::DTYPE);
    let options = MlaOptions { sm_scale: 1.0 / 192f32.sqrt(), causal: false, kv_dtype };
    let mut plan = BatchMlaPlan::new(dev, &shape, num_heads, &qo_indptr, &table, options)?;
    let (q_nope_host, q_pe_host): (Vec<T>, Vec<T>) =
        (random_values(&mut rng(3), plan.q_nope_elems()), random_values(&mut rng(4), plan.q_pe_elems()));
    let (q_nope, q_pe) = (dev.upload(&q_nope_host)?, dev.upload(&q_pe_host)?);
    let mut out = dev.alloc_zeros::<T>(plan.out_elems())?;
    let us = b.timer.median_us(|| plan.run(dev.stream(), &q_nope, &q_pe, &cache, 0, &mut out, None))?;
    let out_host = dev.download(&out)?;

    let mut wrong = 0;
    let row = num_heads * CKV;
    for request in [0, batch - 1].into_iter().take(batch.min(2)) {
        // The request's pages of each pool, as one-head caches of their own.
        let pool = |dim| CacheShape {
            num_pages: shape.num_pages,
            page_size,
            num_kv_heads: 1,
            head_dim: dim,
            layout: KvLayout::Nhd,
        };
        let ckv = rebuild_pages(&pool(CKV), &table, &blocks[0], request, kv_len);
        let kpe = rebuild_pages(&pool(KPE), &table, &blocks[1], request, kv_len);
        let (own_pool, own_table) = own_pages(&pool(CKV), &table, request, kv_len);
        let own = MlaCacheShape { num_pages: own_pool.num_pages, page_size };
        // The first heads only: each head's output depends on its own queries alone.
        let heads = num_heads.min(CHECKED_HEADS);
        let q_nope = &q_nope_host[request * row..][..heads * CKV];
        let q_pe = &q_pe_host[request * num_heads * KPE..][..heads * KPE];
        let (want, _) =
            reference::mla_scaled(&own, &ckv, &kpe, 1.0, &own_table, &[0, 1], q_nope, q_pe, heads, &options);
        wrong += count_wrong(&out_host[request * row..][..heads * CKV], &want);
    }
    let check = if wrong == 0 { "ok".to_string() } else { format!("{wrong} WRONG") };
    let (elem, kv_elem) = (T::DTYPE.size_bytes() as f64, C::DTYPE.size_bytes() as f64);
    let bytes = (batch * kv_len * (CKV + KPE)) as f64 * kv_elem + (batch * num_heads * (2 * CKV + KPE)) as f64 * elem;
    let gbs = bytes / us / 1e3;
    let flops = (batch * num_heads * kv_len * 2 * (CKV + KPE + CKV)) as f64;
    let tflops = flops / us / 1e6;
    let launch = plan.launch_shape();
    // As `BatchMlaPlan::run` chooses: Hopper's `wgmma` kernel for a 16-bit cache where this
    // handle may use it (not with `--portable`).
    let path = if T::DTYPE == C::DTYPE && dev.arch_specific_ptx() == Some("sm_90a") { "wgmma" } else { "mma.sync" };
    b.print(&format!(
        "| {} | {page_size} | {batch} | {kv_len} | {num_heads} | {us:.1} | {gbs:.0} | {:.1} | {tflops:.0} | {} | {} | {path} | {check} |",
        crate::decode::label::<T, C>("mla decode"),
        100.0 * gbs / b.read_gbs,
        launch.0,
        launch.1
    ));
    let row = json!({"kernel": "mla_decode", "dtype": T::DTYPE.name(), "kv_dtype": C::DTYPE.name(), "page_size": page_size, "batch": batch,
                     "kv_len": kv_len, "heads": num_heads, "median_us": us, "bytes": bytes, "gbs": gbs,
                     "pct_read": 100.0 * gbs / b.read_gbs, "flops": flops, "tflops": tflops, "blocks": launch.0,
                     "merged_tiles": launch.1, "path": path, "sampled_elements_wrong": wrong});
    Ok((row, wrong))
}
