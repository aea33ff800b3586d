//! One tensor-parallel decode step of a layer on the GPUs of this machine, the way a serving
//! engine splits a model too large for one GPU: 64 query heads over 16 KV heads, head_dim 128,
//! each GPU holding its share of the heads in a cache of its own whose pages mean the same
//! tokens everywhere, so one allocator and one page table serve all GPUs. The step appends each
//! sequence's new token's K/V on every GPU (its heads), plans decode once per GPU from the
//! same table, runs it, and all-gathers the outputs through NCCL into every GPU's
//! `[batch][64 heads][128]`. One sequence's output is checked against the f64 CPU reference of
//! the whole model; a miss ends the example with an error.
//!
//!     cargo run --release -p ferrinfer --example tensor_parallel [GPUS]
//!
//! Uses the largest power of two of GPUs up to `GPUS` (default: all) that divides 16; needs
//! NCCL (`libnccl.so` on the library path). Without a GPU or NCCL it says so and exits.
use std::error::Error;

use ferrinfer::{
    f16, reference, BatchDecodePlan, CacheShape, DecodeOptions, Device, KvLayout, PagedKvCache, ScatterPlan,
    SequenceAllocator, TensorParallel,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KV_HEADS: usize = 16;
const QO_HEADS: usize = 64;
const HEAD_DIM: usize = 128;
const BATCH: usize = 8;
const PROMPT: usize = 500;

fn random(rng: &mut StdRng, n: usize) -> Vec<f16> {
    (0..n).map(|_| f16::from_f64(rng.random_range(-1.0..1.0))).collect()
}

/// Heads `first..first + n` of each row of `x` (rows of `heads` heads).
fn heads_of(x: &[f16], heads: usize, first: usize, n: usize) -> Vec<f16> {
    x.chunks(heads * HEAD_DIM).flat_map(|row| row[first * HEAD_DIM..(first + n) * HEAD_DIM].iter().copied()).collect()
}

fn main() -> Result<(), Box<dyn Error>> {
    let available = TensorParallel::gpu_count();
    if available == 0 || !TensorParallel::nccl_present() {
        println!(
            "needs a GPU and NCCL: {available} GPU(s), NCCL {}",
            if TensorParallel::nccl_present() { "found" } else { "not found" }
        );
        return Ok(());
    }
    let wanted = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(available).min(available);
    let gpus = [16, 8, 4, 2, 1].into_iter().find(|&n| n <= wanted.max(1)).unwrap_or(1);
    let tp = TensorParallel::new((0..gpus).map(Device::new).collect::<Result<_, _>>()?)?;
    let shape = CacheShape {
        num_pages: 2048,
        page_size: 16,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        layout: KvLayout::Nhd,
    };
    let (shard, local_heads) = (tp.shard_shape(&shape)?, tp.shard_heads(&shape, QO_HEADS)?);
    println!(
        "{gpus} GPU(s) ({}): {} query / {} KV heads each",
        tp.devices()[0].name(),
        local_heads,
        shard.num_kv_heads
    );
    let mut caches = tp.on_each(|_, dev| PagedKvCache::<f16>::new(dev, shard, 1))?;

    // One allocator for every GPU: the prompts, then one decode token each.
    let mut alloc = SequenceAllocator::new(shape.num_pages, shape.page_size)?;
    let seqs: Vec<_> = (0..BATCH).map(|_| alloc.create()).collect();
    let mut rng = StdRng::seed_from_u64(25);
    let (mut k_all, mut v_all) = (Vec::new(), Vec::new());
    for tokens in [PROMPT, 1] {
        for &s in &seqs {
            alloc.reserve(s, tokens)?;
        }
        let table = alloc.page_table(&seqs)?;
        let append_indptr: Vec<u32> = (0..=BATCH as u32).map(|i| i * tokens as u32).collect();
        // The model's new K/V rows for all heads; each GPU writes its own heads.
        let (k, v) = (
            random(&mut rng, BATCH * tokens * KV_HEADS * HEAD_DIM),
            random(&mut rng, BATCH * tokens * KV_HEADS * HEAD_DIM),
        );
        for (r, cache) in caches.iter_mut().enumerate() {
            let dev = &tp.devices()[r];
            let kv = shard.num_kv_heads;
            let (k_r, v_r) =
                (dev.upload(&heads_of(&k, KV_HEADS, r * kv, kv))?, dev.upload(&heads_of(&v, KV_HEADS, r * kv, kv))?);
            let append = ScatterPlan::append(dev, &shard, &table, &append_indptr).map_err(|e| e.on_gpu(r))?;
            append.run(dev.stream(), cache, 0, &k_r, &v_r).map_err(|e| e.on_gpu(r))?;
        }
        k_all.push(k);
        v_all.push(v);
    }

    // The decode step: the same table on every GPU, each its own heads.
    let table = alloc.page_table(&seqs)?;
    let q = random(&mut rng, BATCH * QO_HEADS * HEAD_DIM);
    let mut plans =
        tp.on_each(|_, dev| BatchDecodePlan::new(dev, &shard, local_heads, &table, DecodeOptions::default()))?;
    let q_local = tp.on_each(|r, dev| dev.upload(&heads_of(&q, QO_HEADS, r * local_heads, local_heads)))?;
    let mut local = tp.on_each(|_, dev| dev.alloc_zeros::<f16>(BATCH * local_heads * HEAD_DIM))?;
    for (r, plan) in plans.iter_mut().enumerate() {
        let dev = &tp.devices()[r];
        plan.run(dev.stream(), &q_local[r], &caches[r], 0, &mut local[r], None).map_err(|e| e.on_gpu(r))?;
    }
    let mut staging = tp.on_each(|_, dev| dev.alloc_zeros::<f16>(BATCH * QO_HEADS * HEAD_DIM))?;
    let mut out = tp.on_each(|_, dev| dev.alloc_zeros::<f16>(BATCH * QO_HEADS * HEAD_DIM))?;
    tp.all_gather_heads(BATCH, &local, &mut staging, &mut out)?;

    // Check the last GPU's copy of sequence 0 against the whole model on the CPU: its keys are
    // the prompt's rows then the decode token's, in one-token pages.
    let got = tp.devices()[gpus - 1].download(&out[gpus - 1])?;
    let len = PROMPT + 1;
    let rows = |all: &[f16], tokens: usize, seq: usize| {
        all[seq * tokens * KV_HEADS * HEAD_DIM..][..tokens * KV_HEADS * HEAD_DIM].to_vec()
    };
    let k0: Vec<f16> = [rows(&k_all[0], PROMPT, 0), rows(&k_all[1], 1, 0)].concat();
    let v0: Vec<f16> = [rows(&v_all[0], PROMPT, 0), rows(&v_all[1], 1, 0)].concat();
    let one = CacheShape { num_pages: len, page_size: 1, ..shape };
    let one_table = ferrinfer::PageTable {
        kv_indptr: vec![0, len as u32],
        kv_indices: (0..len as u32).collect(),
        kv_last_page_len: vec![1],
    };
    let (want, _) =
        reference::decode(&one, &k0, &v0, &one_table, &q[..QO_HEADS * HEAD_DIM], QO_HEADS, &DecodeOptions::default());
    // The f16 bound of the tests: |error| ≤ 2e-3 + 1e-2·|expected| (NaN never passes).
    let mut worst = 0.0f64;
    for (i, (g, w)) in got[..QO_HEADS * HEAD_DIM].iter().zip(&want).enumerate() {
        let error = (g.to_f64() - w).abs();
        if error.is_nan() || error > 2e-3 + 1e-2 * w.abs() {
            return Err(
                format!("sequence 0, head {}, dim {}: GPU {g}, reference {w}", i / HEAD_DIM, i % HEAD_DIM).into()
            );
        }
        worst = worst.max(error);
    }
    println!("decode step of {BATCH} sequences of {len} tokens on {gpus} GPU(s), gathered on every GPU: matches the f64 reference (max error {worst:.1e})");
    Ok(())
}
