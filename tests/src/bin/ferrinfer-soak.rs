//! Soak: thousands of random batches through the whole host API, the way a serving engine
//! drives it. Each round picks a random cache (page size, heads, group, head_dim, layout,
//! dtype), then runs batches in which sequences are created, forked, grown (appends through the
//! allocator, copy-on-write included) and freed, and each batch runs decode and prefill with
//! random options. One sequence of every batch is checked against the f64 CPU reference, every
//! run is repeated and must give bit-identical output, and the counts are reported.
//!
//!     ferrinfer-soak [--rounds 100] [--batches 20] [--seed 1]
use clap::Parser;
use cudarc::driver::CudaSlice;
use ferrinfer::{
    bf16, f16, reference, BatchDecodePlan, BatchPrefillPlan, CacheShape, DecodeOptions, Device, KvDType, KvLayout,
    PageTable, PagedKvCache, PrefillOptions, ScatterPlan, SeqId, SequenceAllocator,
};
use ferrinfer_tests::compare::close;
use ferrinfer_tests::workload::{random_values, rng};
use rand::rngs::StdRng;
use rand::Rng;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(about = "ferrinfer soak: random serving batches checked against the CPU reference")]
struct Args {
    /// Random caches to run.
    #[arg(long, default_value_t = 100)]
    rounds: usize,
    /// Batches per cache.
    #[arg(long, default_value_t = 20)]
    batches: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Default)]
struct Counts {
    batches: usize,
    checked_elements: usize,
    mismatches: usize,
    reruns: usize,
    rerun_differences: usize,
}

/// One random cache and the sequences living in it.
struct Round<'d, T: KvDType> {
    dev: &'d Device,
    shape: CacheShape,
    cache: PagedKvCache<T>,
    alloc: SequenceAllocator,
    live: Vec<SeqId>,
}

impl<T: KvDType> Round<'_, T> {
    /// Creates, forks and frees a few sequences, then grows every live one by 0..=40 tokens
    /// (skipping growth that would not fit). Returns the table and each sequence's new tokens.
    fn evolve(&mut self, r: &mut StdRng) -> BoxResult<(PageTable, Vec<usize>)> {
        for _ in 0..r.random_range(0..3) {
            match r.random_range(0..3) {
                0 => self.live.push(self.alloc.create()),
                1 if !self.live.is_empty() => {
                    let parent = self.live[r.random_range(0..self.live.len())];
                    self.live.push(self.alloc.fork(parent)?);
                }
                _ if self.live.len() > 1 => {
                    let id = self.live.swap_remove(r.random_range(0..self.live.len()));
                    self.alloc.free(id)?;
                }
                _ => {}
            }
        }
        if self.live.is_empty() {
            self.live.push(self.alloc.create());
        }
        let mut new_tokens = Vec::new();
        for &id in &self.live {
            let n = r.random_range(0..=40);
            let n = match self.alloc.reserve(id, n) {
                Ok(copies) => {
                    self.cache.copy_pages(self.dev.stream(), &copies)?;
                    n
                }
                Err(_) => 0,
            };
            new_tokens.push(n);
        }
        let table = self.alloc.page_table(&self.live)?;
        let mut indptr = vec![0u32];
        for &n in &new_tokens {
            indptr.push(indptr[indptr.len() - 1] + n as u32);
        }
        let append = ScatterPlan::append(self.dev, &self.shape, &table, &indptr)?;
        let (k, v) = (random_values::<T>(r, append.ragged_elems()), random_values::<T>(r, append.ragged_elems()));
        append.run(self.dev.stream(), &mut self.cache, 0, &self.dev.upload(&k)?, &self.dev.upload(&v)?)?;
        Ok((table, new_tokens))
    }
}

/// Runs `run` twice into fresh outputs; returns the first output and whether the two differ.
fn twice<T: KvDType>(
    dev: &Device,
    elems: usize,
    mut run: impl FnMut(&mut CudaSlice<T>) -> ferrinfer::Result<()>,
) -> BoxResult<(Vec<T>, bool)> {
    let (mut a, mut b) = (dev.alloc_zeros::<T>(elems)?, dev.alloc_zeros::<T>(elems)?);
    run(&mut a)?;
    run(&mut b)?;
    let (a, b) = (dev.download(&a)?, dev.download(&b)?);
    let differ = a.iter().zip(&b).any(|(x, y)| x.to_f64().to_bits() != y.to_f64().to_bits());
    Ok((a, differ))
}

fn round<T: KvDType>(dev: &Device, r: &mut StdRng, batches: usize, counts: &mut Counts) -> BoxResult<()> {
    let page_size = [1, 2, 3, 7, 16, 37, 100, 512][r.random_range(0..8)];
    let shape = CacheShape {
        num_pages: 6000usize.div_ceil(page_size).max(16),
        page_size,
        num_kv_heads: r.random_range(1..=4),
        head_dim: [64, 128, 256][r.random_range(0..3)],
        layout: if r.random() { KvLayout::Nhd } else { KvLayout::Hnd },
    };
    let heads = shape.num_kv_heads * r.random_range(1..=8);
    let mut round = Round {
        dev,
        shape,
        cache: PagedKvCache::<T>::new(dev, shape, 1)?,
        alloc: SequenceAllocator::new(shape.num_pages, page_size)?,
        live: Vec::new(),
    };
    for _ in 0..batches {
        let (table, new_tokens) = round.evolve(r)?;
        let window_left = if r.random_range(0..4) == 0 { r.random_range(0..200) } else { -1 };
        let logits_soft_cap = if r.random_range(0..4) == 0 { 30.0 } else { 0.0 };
        let pools = round.cache.layer(0)?;
        let (k_host, v_host) = (dev.download(pools.k())?, dev.download(pools.v())?);
        let checked = r.random_range(0..round.live.len());
        let one = |seq: usize| PageTable {
            kv_indptr: vec![0, table.kv_indptr[seq + 1] - table.kv_indptr[seq]],
            kv_indices: table.kv_indices[table.kv_indptr[seq] as usize..table.kv_indptr[seq + 1] as usize].to_vec(),
            kv_last_page_len: vec![table.kv_last_page_len[seq]],
        };
        let row = heads * shape.head_dim;
        let mut tally = |got: &[T], want: &[f64], differ: bool| {
            counts.checked_elements += want.len();
            counts.mismatches += got.iter().zip(want).filter(|&(g, &w)| !close(g.to_f64(), w, T::DTYPE)).count();
            counts.reruns += 1;
            counts.rerun_differences += differ as usize;
        };

        // Decode: one query per live sequence.
        let options = DecodeOptions { sm_scale: None, logits_soft_cap, window_left, kv_dtype: None };
        let mut decode = BatchDecodePlan::new(dev, &shape, heads, &table, options)?;
        let q: Vec<T> = random_values(r, decode.qo_elems());
        let q_dev = dev.upload(&q)?;
        let (out, differ) =
            twice(dev, decode.qo_elems(), |o| decode.run(dev.stream(), &q_dev, &round.cache, 0, o, None))?;
        let (want, _) =
            reference::decode(&shape, &k_host, &v_host, &one(checked), &q[checked * row..][..row], heads, &options);
        tally(&out[checked * row..][..row], &want, differ);

        // Prefill: each sequence's new tokens as queries, causal or not.
        let mut qo_indptr = vec![0u32];
        for &n in &new_tokens {
            qo_indptr.push(qo_indptr[qo_indptr.len() - 1] + n as u32);
        }
        let options = PrefillOptions {
            causal: r.random(),
            sm_scale: None,
            logits_soft_cap,
            window_left,
            kv_dtype: None,
            head_dim_vo: None,
        };
        let mut prefill = BatchPrefillPlan::new(dev, &shape, heads, &qo_indptr, &table, options)?;
        let q: Vec<T> = random_values(r, prefill.qo_elems());
        let q_dev = dev.upload(&q)?;
        let (out, differ) =
            twice(dev, prefill.qo_elems(), |o| prefill.run(dev.stream(), &q_dev, &round.cache, 0, o, None))?;
        let rows = qo_indptr[checked] as usize * row..qo_indptr[checked + 1] as usize * row;
        let qo = [0, new_tokens[checked] as u32];
        let (want, _) =
            reference::prefill(&shape, &k_host, &v_host, &one(checked), &qo, &q[rows.clone()], heads, &options);
        tally(&out[rows], &want, differ);
        counts.batches += 1;
    }
    Ok(())
}

fn main() -> BoxResult<()> {
    let args = Args::parse();
    let dev = match Device::new(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("No GPU ({e}): the soak runs the kernels, so there is nothing to do here.");
            return Ok(());
        }
    };
    println!("{}: {} rounds × {} batches, seed {}", dev.name(), args.rounds, args.batches, args.seed);
    let mut r = rng(args.seed);
    let mut counts = Counts::default();
    for i in 0..args.rounds {
        if i % 2 == 0 {
            round::<f16>(&dev, &mut r, args.batches, &mut counts)?;
        } else {
            round::<bf16>(&dev, &mut r, args.batches, &mut counts)?;
        }
    }
    println!(
        "batches {}, checked elements {}, mismatches {}, reruns {}, reruns not bit-identical {}",
        counts.batches, counts.checked_elements, counts.mismatches, counts.reruns, counts.rerun_differences
    );
    if counts.mismatches + counts.rerun_differences > 0 {
        return Err("the soak found differences".into());
    }
    Ok(())
}
