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
        let (own_shape, own_table) = own_pages(shape, table, request, kv_len);
        SampledRequest {
            shape: own_shape,
            table: own_table,
            k: rebuild_pages(shape, table, blocks.0, request, kv_len),
            v: rebuild_pages(shape, table, blocks.1, request, kv_len),
        }
    }
}

/// The pages of request `request`'s first `kv_len` keys in a pool of `shape` repeating `block`,
/// rebuilt on the host in order (the pool of [`own_pages`]).
pub fn rebuild_pages<T: KvDType>(
    shape: &CacheShape,
    table: &PageTable,
    block: &[T],
    request: usize,
    kv_len: usize,
) -> Vec<T> {
    let pages = &table.kv_indices[table.kv_indptr[request] as usize..][..kv_len.div_ceil(shape.page_size)];
    let page_elems = shape.page_elems();
    let first = |page: u32| page as usize * page_elems;
    pages.iter().flat_map(|&page| (0..page_elems).map(move |i| block[(first(page) + i) % block.len()])).collect()
}

/// The shape and page table of those keys as a cache of their own: pages `0..n` in order.
pub fn own_pages(shape: &CacheShape, table: &PageTable, request: usize, kv_len: usize) -> (CacheShape, PageTable) {
    let pages = kv_len.div_ceil(shape.page_size);
    debug_assert!(table.kv_indptr[request] as usize + pages <= table.kv_indices.len());
    let last = if kv_len == 0 { 0 } else { (kv_len - 1) % shape.page_size + 1 };
    let own = PageTable {
        kv_indptr: vec![0, pages as u32],
        kv_indices: (0..pages as u32).collect(),
        kv_last_page_len: vec![last as u32],
    };
    (CacheShape { num_pages: pages.max(1), ..*shape }, own)
}

/// Elements of `got` that miss the f64 reference `want` (NaN always does).
pub fn count_wrong<T: KvDType>(got: &[T], want: &[f64]) -> usize {
    got.iter().zip(want).filter(|&(g, &w)| !close(g.to_f64(), w, T::DTYPE)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrinfer::{f16, reference, KvLayout};

    #[test]
    fn a_rebuilt_request_holds_the_same_keys_as_the_repeating_pool() {
        let shape = CacheShape { num_pages: 9, page_size: 3, num_kv_heads: 2, head_dim: 8, layout: KvLayout::Hnd };
        let table = random_table(&mut rng(4), &[5, 7], 3, 9);
        let block: Vec<f16> = random_values(&mut rng(5), 37);
        let pool: Vec<f16> = (0..shape.pool_elems()).map(|i| block[i % block.len()]).collect();
        let all = reference::gather(&shape, &pool, &table);
        for (request, (first, kv_len)) in [(0, (0, 5)), (1, (5, 7))] {
            let (own_shape, own_table) = own_pages(&shape, &table, request, kv_len);
            let own =
                reference::gather(&own_shape, &rebuild_pages(&shape, &table, &block, request, kv_len), &own_table);
            let row = shape.token_elems();
            assert_eq!(own, all[first * row..(first + kv_len) * row], "request {request}");
        }
    }
}
