//! Checking a benchmark's output where the full CPU reference would take too long: pools are
//! filled on the device by repeating one random block, so any request's keys and values can be
//! rebuilt on the host from the block alone, as a one-request cache for the f64 reference.
use cudarc::driver::CudaSlice;
use ferrinfer::{CacheShape, Device, KvDType, LayerPools, PageTable, PagedKvCache};
use ferrinfer_tests::compare::close;
use ferrinfer_tests::workload::{random_table, random_values, rng};

use crate::page_ops::{pool_shape, Bench};
use crate::timing::BoxResult;

/// A device pool of `elems` elements repeating `block`.
pub fn filled_pool<T: KvDType>(dev: &Device, elems: usize, block: &[T]) -> BoxResult<CudaSlice<T>> {
    let block = &block[..block.len().min(elems)];
    let src = dev.upload(block)?;
    let mut pool = dev.alloc_zeros::<T>(elems)?;
    let mut at = 0;
    while at < elems {
        let n = block.len().min(elems - at);
        dev.stream().memcpy_dtod(&src.slice(..n), &mut pool.slice_mut(at..at + n))?;
        at += n;
    }
    Ok(pool)
}

/// A one-layer benchmark cache for sequences of `kv_lens` on a random page permutation, its
/// pools repeating two random blocks (kept for [`SampledRequest`]). An 8-bit cache keeps its
/// scales at 1 (speed does not depend on them).
pub struct BenchCache<T: KvDType> {
    pub shape: CacheShape,
    pub table: PageTable,
    pub blocks: [Vec<T>; 2],
    pub cache: PagedKvCache<T>,
}

impl<T: KvDType> BenchCache<T> {
    pub fn new(b: &Bench, kv_lens: &[usize], page_size: usize) -> BoxResult<Self> {
        let shape = pool_shape(&b.shapes, kv_lens, page_size);
        let table = random_table(&mut rng(page_size as u64), kv_lens, page_size, shape.num_pages);
        let blocks: [Vec<T>; 2] = [1, 2].map(|seed| random_values(&mut rng(seed), 1 << 22));
        let layer = LayerPools::new(
            filled_pool(b.dev, shape.pool_elems(), &blocks[0])?,
            filled_pool(b.dev, shape.pool_elems(), &blocks[1])?,
        );
        Ok(BenchCache { shape, table, blocks, cache: PagedKvCache::from_layers(shape, vec![layer])? })
    }

    /// Request `request`'s first `kv_len` keys, rebuilt on the host.
    pub fn sample(&self, request: usize, kv_len: usize) -> SampledRequest<T> {
        SampledRequest::new(&self.shape, &self.table, (&self.blocks[0], &self.blocks[1]), request, kv_len)
    }
}

/// The first `kv_len` keys of one request of a cache whose pools repeat `blocks`, as a cache
/// of their own: pages `0..n` in order.
pub struct SampledRequest<T> {
    pub shape: CacheShape,
    pub table: PageTable,
    pub k: Vec<T>,
    pub v: Vec<T>,
}

impl<T: KvDType> SampledRequest<T> {
    pub fn new(shape: &CacheShape, table: &PageTable, blocks: (&[T], &[T]), request: usize, kv_len: usize) -> Self {
        let pages = &table.kv_indices[table.kv_indptr[request] as usize..][..kv_len.div_ceil(shape.page_size)];
        let page_elems = shape.page_elems();
        let rebuild = |block: &[T]| -> Vec<T> {
            let first = |page: u32| page as usize * page_elems;
            pages
                .iter()
                .flat_map(|&page| (0..page_elems).map(move |i| block[(first(page) + i) % block.len()]))
                .collect()
        };
        let last = if kv_len == 0 { 0 } else { (kv_len - 1) % shape.page_size + 1 };
        SampledRequest {
            shape: CacheShape { num_pages: pages.len().max(1), ..*shape },
            table: PageTable {
                kv_indptr: vec![0, pages.len() as u32],
                kv_indices: (0..pages.len() as u32).collect(),
                kv_last_page_len: vec![last as u32],
            },
            k: rebuild(blocks.0),
            v: rebuild(blocks.1),
        }
    }
}

/// Elements of `got` that miss the f64 reference `want` (NaN always does).
pub fn count_wrong<T: KvDType>(got: &[T], want: &[f64]) -> usize {
    got.iter().zip(want).filter(|&(g, &w)| !close(g.to_f64(), w, T::DTYPE)).count()
}
