//! A serving loop on ferrinfer's paged KV cache, the way an inference engine drives it:
//! requests arrive and are prefilled, decode steps append one token per sequence and attend,
//! a request forks parallel samples that share its prompt's pages (copy-on-write of the shared
//! last page), finished sequences free their pages. The model itself is left out: K, V and Q
//! are random stand-ins for its projections, rotated with Llama 3.1's RoPE as the new tokens'
//! K/V are appended (`AppendRopePlan`: keys rotated as they are written into the cache, the
//! layer's queries in the same launch). After prefill and after the last decode step the
//! last layer's attention output of one sequence is checked against the f64 CPU reference; a
//! miss ends the example with an error.
//!
//!     cargo run --release -p ferrinfer --example serving_loop [PAGE_SIZE]
//!
//! Needs an NVIDIA GPU (compute capability 8.0+) and driver; without one it says so and exits.
use std::error::Error;

use cudarc::driver::CudaSlice;
use ferrinfer::{
    f16, reference, AppendRopePlan, BatchDecodePlan, BatchPrefillPlan, CacheShape, DecodeOptions, Device, KvLayout,
    PageTable, PagedKvCache, PrefillOptions, RopeOptions, SeqId, SequenceAllocator,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LAYERS: usize = 2;
const KV_HEADS: usize = 8;
const QO_HEADS: usize = 32;
const HEAD_DIM: usize = 128;

fn random(rng: &mut StdRng, n: usize) -> Vec<f16> {
    (0..n).map(|_| f16::from_f64(rng.random_range(-1.0..1.0))).collect()
}

/// Each layer's queries of a step (`[token][QO_HEADS][HEAD_DIM]`), rotated.
type LayerQueries = Vec<CudaSlice<f16>>;

/// The engine's state: the cache, its page allocator and the live sequences.
struct Engine {
    dev: Device,
    shape: CacheShape,
    cache: PagedKvCache<f16>,
    alloc: SequenceAllocator,
    live: Vec<SeqId>,
    rng: StdRng,
}

impl Engine {
    /// Grows each of `ids` by `new_tokens[i]`, applies copy-on-write copies, and writes the new
    /// tokens' K and V into every layer, keys rotated for their positions (Llama 3.1 RoPE) and
    /// each layer's queries (random, returned) rotated in the same launch. Returns the page
    /// table after the append, and the queries of each layer.
    fn append(&mut self, ids: &[SeqId], new_tokens: &[usize]) -> Result<(PageTable, LayerQueries), Box<dyn Error>> {
        for (&id, &n) in ids.iter().zip(new_tokens) {
            let copies = self.alloc.reserve(id, n)?;
            self.cache.copy_pages(self.dev.stream(), &copies)?;
        }
        let table = self.alloc.page_table(ids)?;
        let mut append_indptr = vec![0u32];
        for &n in new_tokens {
            append_indptr.push(append_indptr[append_indptr.len() - 1] + n as u32);
        }
        let plan =
            AppendRopePlan::new(&self.dev, &self.shape, &table, &append_indptr, QO_HEADS, RopeOptions::llama31())?;
        let mut qs = Vec::with_capacity(LAYERS);
        for layer in 0..LAYERS {
            let mut q = self.dev.upload(&random(&mut self.rng, plan.q_elems()))?;
            let k = self.dev.upload(&random(&mut self.rng, plan.ragged_elems()))?;
            let v = self.dev.upload(&random(&mut self.rng, plan.ragged_elems()))?;
            plan.run(self.dev.stream(), &mut q, &k, &v, &mut self.cache, layer, None)?;
            qs.push(q);
        }
        Ok((table, qs))
    }

    /// Checks the last layer's output rows of sequence `seq` of `table` (its queries are rows
    /// `qo_indptr[seq]..qo_indptr[seq + 1]` of `q`, the last of its keys) against the f64
    /// reference: every element within 2e-3 + 1e-2·|expected| (f16), else an error. Returns
    /// the largest |GPU − reference|.
    fn check(
        &self,
        table: &PageTable,
        qo_indptr: &[u32],
        q: &[f16],
        out: &[f16],
        seq: usize,
    ) -> Result<f64, Box<dyn Error>> {
        let pools = self.cache.layer(LAYERS - 1)?;
        let (k, v) = (self.dev.download(pools.k())?, self.dev.download(pools.v())?);
        let one = PageTable {
            kv_indptr: vec![0, table.kv_indptr[seq + 1] - table.kv_indptr[seq]],
            kv_indices: table.kv_indices[table.kv_indptr[seq] as usize..table.kv_indptr[seq + 1] as usize].to_vec(),
            kv_last_page_len: vec![table.kv_last_page_len[seq]],
        };
        let row = QO_HEADS * HEAD_DIM;
        let rows = qo_indptr[seq] as usize * row..qo_indptr[seq + 1] as usize * row;
        let qo_len = qo_indptr[seq + 1] - qo_indptr[seq];
        let causal = PrefillOptions { causal: true, ..Default::default() };
        let (want, _) =
            reference::prefill(&self.shape, &k, &v, &one, &[0, qo_len], &q[rows.clone()], QO_HEADS, &causal);
        let mut worst = 0.0f64;
        for (g, w) in out[rows].iter().zip(&want) {
            let error = (g.to_f64() - w).abs();
            if error.is_nan() || error > 2e-3 + 1e-2 * w.abs() {
                return Err(format!("output {} against the reference {w}: outside the f16 bound", g.to_f64()).into());
            }
            worst = worst.max(error);
        }
        Ok(worst)
    }

    fn report(&self, what: &str) -> Result<(), Box<dyn Error>> {
        let lens: Vec<usize> = self.live.iter().map(|&id| self.alloc.len(id)).collect::<Result<_, _>>()?;
        println!("{what:<48} live lengths {lens:?}, free pages {}", self.alloc.free_pages());
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let page_size = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(16usize);
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("No GPU here ({e}).");
            println!("On a GPU this example prefills 4 requests, forks 2 samples off one of them, runs 8 decode");
            println!("steps over {LAYERS} layers with page_size {page_size}, frees finished sequences, and checks the");
            println!("attention output against the CPU reference. Nothing to do without one.");
            return Ok(());
        }
    };
    println!("{} (compute capability {:?}), page_size {page_size}", dev.name(), dev.compute_capability());
    let shape = CacheShape {
        num_pages: 32768usize.div_ceil(page_size),
        page_size,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        layout: KvLayout::Nhd,
    };
    let cache = PagedKvCache::<f16>::new(&dev, shape, LAYERS)?;
    let alloc = SequenceAllocator::new(shape.num_pages, page_size)?;
    let mut e = Engine { dev, shape, cache, alloc, live: Vec::new(), rng: StdRng::seed_from_u64(7) };

    // Four requests arrive: write their prompts' K/V, then causal prefill attention per layer.
    let prompts = [37usize, 200, 5, 129];
    let ids: Vec<SeqId> = prompts.iter().map(|_| e.alloc.create()).collect();
    e.live.extend(&ids);
    let (table, q_layers) = e.append(&ids, &prompts)?;
    let mut qo_indptr = vec![0u32];
    for &n in &prompts {
        qo_indptr.push(qo_indptr[qo_indptr.len() - 1] + n as u32);
    }
    let causal = PrefillOptions { causal: true, ..Default::default() };
    let mut prefill = BatchPrefillPlan::new(&e.dev, &e.shape, QO_HEADS, &qo_indptr, &table, causal)?;
    let mut out = e.dev.alloc_zeros::<f16>(prefill.qo_elems())?;
    for (layer, q) in q_layers.iter().enumerate() {
        prefill.run(e.dev.stream(), q, &e.cache, layer, &mut out, None)?;
    }
    let q = e.dev.download(&q_layers[LAYERS - 1])?;
    e.report("prefilled 4 prompts")?;
    let error = e.check(&table, &qo_indptr, &q, &e.dev.download(&out)?, 1)?;
    println!("  prefill of request 1 (200 tokens) against the CPU reference: max |error| {error:.2e}");

    // Request 3 forks two samples: they share its 129-token prompt, and the first token each
    // appends copies the shared, partly filled last page (copy-on-write).
    for _ in 0..2 {
        let child = e.alloc.fork(ids[3])?;
        e.live.push(child);
    }
    e.report("forked 2 samples off request 3")?;

    // Decode steps: every live sequence appends its new token's K/V and attends with one query.
    // One plan serves every step: `replan` reuses its buffers and does not wait for the GPU.
    let mut last = None;
    let mut plan: Option<BatchDecodePlan> = None;
    for step in 0..8 {
        let live = e.live.clone();
        let (table, q_layers) = e.append(&live, &vec![1; live.len()])?;
        let plan = match &mut plan {
            Some(p) => {
                p.replan(&e.shape, QO_HEADS, &table, DecodeOptions::default())?;
                p
            }
            None => plan.insert(BatchDecodePlan::new(&e.dev, &e.shape, QO_HEADS, &table, DecodeOptions::default())?),
        };
        let mut out = e.dev.alloc_zeros::<f16>(plan.qo_elems())?;
        for (layer, q) in q_layers.iter().enumerate() {
            plan.run(e.dev.stream(), q, &e.cache, layer, &mut out, None)?;
        }
        let q = e.dev.download(&q_layers[LAYERS - 1])?;
        e.report(&format!("decode step {step}"))?;
        if step == 3 {
            // Request 2 is done: its pages go back to the pool.
            e.alloc.free(ids[2])?;
            e.live.retain(|&id| id != ids[2]);
            e.report("request 2 finished")?;
        }
        last = Some((table, q, e.dev.download(&out)?));
    }
    // One decode query per sequence is a one-token prefill at the end of its keys.
    let (table, q, out) = last.ok_or("no decode step ran")?;
    let one_each: Vec<u32> = (0..=table.batch_size() as u32).collect();
    let forked = table.batch_size() - 1;
    let error = e.check(&table, &one_each, &q, &out, forked)?;
    println!("  last decode step of a forked sample against the CPU reference: max |error| {error:.2e}");
    for id in e.live.drain(..) {
        e.alloc.free(id)?;
    }
    println!("all sequences finished: {} of {} pages free", e.alloc.free_pages(), e.shape.num_pages);
    Ok(())
}
