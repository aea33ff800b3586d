//! Random paged workloads: sequences of given lengths on pages drawn from a shuffled pool,
//! random element values, and bitwise comparison helpers.
use ferrinfer::{CacheShape, KvDType, PageTable};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Pages needed for `kv_lens` at `page_size`.
pub fn pages_needed(kv_lens: &[usize], page_size: usize) -> usize {
    kv_lens.iter().map(|n| n.div_ceil(page_size)).sum()
}

/// A page table for sequences of `kv_lens` tokens whose pages are a random permutation of a
/// pool of `num_pages` pages (so pages are scattered and out of order).
pub fn random_table(rng: &mut impl Rng, kv_lens: &[usize], page_size: usize, num_pages: usize) -> PageTable {
    let mut pool: Vec<u32> = (0..num_pages as u32).collect();
    pool.shuffle(rng);
    let mut table = PageTable { kv_indptr: vec![0], ..Default::default() };
    let mut next = pool.into_iter();
    for &len in kv_lens {
        let pages = len.div_ceil(page_size);
        table.kv_indices.extend(next.by_ref().take(pages));
        table.kv_indptr.push(table.kv_indices.len() as u32);
        table.kv_last_page_len.push(if len == 0 { 0 } else { (len - 1) % page_size + 1 } as u32);
    }
    assert_eq!(table.kv_indices.len(), pages_needed(kv_lens, page_size), "pool of {num_pages} pages too small");
    table
}

/// The poison (NaN) in every slot of `pool` (`dim` values a slot, pages of `page_size`) that
/// holds no key of the sequences of `table` (`kv_lens` long): a partly filled last page's later
/// slots, unused pages. No kernel may let one reach an output.
pub fn poison_slots_without_keys<T: KvDType>(
    pool: &mut [T],
    dim: usize,
    table: &PageTable,
    kv_lens: &[usize],
    page_size: usize,
) {
    let mut holds_a_key = vec![false; pool.len() / dim];
    for (i, &len) in kv_lens.iter().enumerate() {
        let pages = &table.kv_indices[table.kv_indptr[i] as usize..table.kv_indptr[i + 1] as usize];
        for key in 0..len {
            holds_a_key[pages[key / page_size] as usize * page_size + key % page_size] = true;
        }
    }
    for (slot, _) in holds_a_key.iter().enumerate().filter(|(_, &held)| !held) {
        pool[slot * dim..(slot + 1) * dim].fill(poison::<T>());
    }
}

/// Uniform values in [-1, 1) of any element type.
pub fn random_values<T: KvDType>(rng: &mut impl Rng, n: usize) -> Vec<T> {
    random_values_times(rng, n, 1.0)
}

/// Uniform values in [-`scale`, `scale`) (the draws of [`random_values`], multiplied), for
/// inputs past a 16-bit type's range.
pub fn random_values_times<T: KvDType>(rng: &mut impl Rng, n: usize, scale: f64) -> Vec<T> {
    (0..n).map(|_| T::from_f64(rng.random_range(-1.0..1.0) * scale)).collect()
}

/// The logit scale that makes queries `query_scale` times larger ([`random_values_times`]) give
/// the usual logits: the default `1/√head_dim` divided by it, or `None` (the default itself)
/// when `query_scale` is 1.
pub fn sm_scale_for_queries_times(head_dim: usize, query_scale: f64) -> Option<f32> {
    (query_scale != 1.0).then(|| (1.0 / (head_dim as f64).sqrt() / query_scale) as f32)
}

/// A value no random input produces (NaN), written into outputs before a kernel runs so that
/// an element the kernel skipped cannot match the reference.
pub fn poison<T: KvDType>() -> T {
    T::from_f64(f64::NAN)
}

/// Index and values of the first element where `got` and `want` differ bit for bit (through
/// f64, which represents every f16/bf16/f32 value exactly, signed zeros included).
pub fn first_bitwise_mismatch<T: KvDType>(got: &[T], want: &[T]) -> Option<(usize, T, T)> {
    let bits = |x: T| x.to_f64().to_bits();
    got.iter().zip(want).enumerate().find(|(_, (g, w))| bits(**g) != bits(**w)).map(|(i, (g, w))| (i, *g, *w))
}

/// A cache shape sized for `kv_lens` plus some unused pages.
pub fn shape_for(
    kv_lens: &[usize],
    page_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    layout: ferrinfer::KvLayout,
) -> CacheShape {
    CacheShape { num_pages: pages_needed(kv_lens, page_size) + 3, page_size, num_kv_heads, head_dim, layout }
}

/// A cache of `num_layers` layers filled with random values, and the host copy of each layer's
/// `(K, V)` pools.
#[allow(clippy::type_complexity)]
pub fn random_cache<T: KvDType>(
    dev: &ferrinfer::Device,
    rng: &mut impl Rng,
    shape: CacheShape,
    num_layers: usize,
) -> ferrinfer::Result<(ferrinfer::PagedKvCache<T>, Vec<(Vec<T>, Vec<T>)>)> {
    let host: Vec<(Vec<T>, Vec<T>)> = (0..num_layers)
        .map(|_| (random_values(rng, shape.pool_elems()), random_values(rng, shape.pool_elems())))
        .collect();
    let layers = host
        .iter()
        .map(|(k, v)| Ok(ferrinfer::LayerPools::new(dev.upload(k)?, dev.upload(v)?)))
        .collect::<ferrinfer::Result<_>>()?;
    Ok((ferrinfer::PagedKvCache::from_layers(shape, layers)?, host))
}

/// Fails with the first element where `got` and `want` differ bit for bit.
pub fn expect_bitwise_eq<T: KvDType>(what: &str, got: &[T], want: &[T], row_elems: usize) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} elements, reference has {}", got.len(), want.len()));
    }
    match first_bitwise_mismatch(got, want) {
        None => Ok(()),
        Some((i, g, w)) => {
            Err(format!("{what}[{i}] (row {}, element {}): GPU {g:?}, reference {w:?}", i / row_elems, i % row_elems))
        }
    }
}

/// Attention sinks for `heads` query heads: uniform in [−2, 8) (around the log of the
/// softmax sums of random short and long sequences, so they weigh in), except head 0's −∞, which
/// means no sink.
pub fn random_sinks(rng: &mut impl Rng, heads: usize) -> Vec<f32> {
    (0..heads).map(|h| if h == 0 { f32::NEG_INFINITY } else { rng.random_range(-2.0..8.0) }).collect()
}

/// Ragged K/V (`[total_kv][num_kv_heads][head_dim]`, request `i`'s keys rows
/// `kv_indptr[i]..kv_indptr[i + 1]`) seen as a paged cache of one-token pages in order, for the
/// reference: its shape and page table.
pub fn ragged_as_pages(kv_indptr: &[u32], num_kv_heads: usize, head_dim: usize) -> (CacheShape, PageTable) {
    let total_kv = kv_indptr[kv_indptr.len() - 1] as usize;
    let shape = CacheShape {
        num_pages: total_kv.max(1),
        page_size: 1,
        num_kv_heads,
        head_dim,
        layout: ferrinfer::KvLayout::Nhd,
    };
    let table = PageTable {
        kv_indptr: kv_indptr.to_vec(),
        kv_indices: (0..total_kv as u32).collect(),
        kv_last_page_len: kv_indptr.windows(2).map(|w| (w[1] > w[0]) as u32).collect(),
    };
    (shape, table)
}
