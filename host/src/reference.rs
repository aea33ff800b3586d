//! The CPU reference: straightforward, element-by-element versions of every kernel, written
//! independently of the kernels' addressing, with f64 accumulation where kernels accumulate.
//! GPU tests compare against these.
use crate::layout::CacheShape;
use crate::page_table::PageTable;

/// Every token of every sequence of `table`, copied out of `pool` into a ragged
/// `[token][head][dim]` buffer, sequence after sequence. `table` must be valid for `shape`.
pub fn gather<T: Copy>(shape: &CacheShape, pool: &[T], table: &PageTable) -> Vec<T> {
    let mut out = Vec::new();
    for (seq, kv_len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
        for pos in 0..kv_len {
            let (page, slot) = table.locate(seq, pos, shape.page_size);
            for head in 0..shape.num_kv_heads {
                for d in 0..shape.head_dim {
                    out.push(pool[shape.element_index(page, slot, head, d)]);
                }
            }
        }
    }
    out
}

/// Writes ragged rows into `pool` as FlashInfer's `append_paged_kv_cache` does: sequence `i`'s
/// rows `append_indptr[i]..append_indptr[i + 1]` of `ragged` become its last tokens (positions
/// `kv_len(i) − append_len(i)..kv_len(i)`). With `append_indptr = table.token_indptr(..)` this
/// is the reverse of [`gather`]. The plan's validation must hold.
pub fn append<T: Copy>(shape: &CacheShape, pool: &mut [T], table: &PageTable, append_indptr: &[u32], ragged: &[T]) {
    let mut row = 0;
    for (seq, kv_len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
        let append_len = (append_indptr[seq + 1] - append_indptr[seq]) as usize;
        for pos in kv_len - append_len..kv_len {
            let (page, slot) = table.locate(seq, pos, shape.page_size);
            for head in 0..shape.num_kv_heads {
                for d in 0..shape.head_dim {
                    pool[shape.element_index(page, slot, head, d)] =
                        ragged[(row * shape.num_kv_heads + head) * shape.head_dim + d];
                }
            }
            row += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::KvLayout;

    #[test]
    fn gather_follows_the_page_table_in_both_layouts() {
        // Two pages of 2 slots, 2 heads, head_dim 1: element value = its pool index.
        for (layout, want) in [(KvLayout::Nhd, [4, 5, 6, 7, 0, 1]), (KvLayout::Hnd, [4, 6, 5, 7, 0, 2])] {
            let shape = CacheShape { num_pages: 2, page_size: 2, num_kv_heads: 2, head_dim: 1, layout };
            let pool: Vec<u32> = (0..8).collect();
            let table = PageTable { kv_indptr: vec![0, 2], kv_indices: vec![1, 0], kv_last_page_len: vec![1] };
            assert_eq!(gather(&shape, &pool, &table), want, "{layout:?}");
        }
    }

    #[test]
    fn append_writes_the_last_positions_and_gather_reads_them_back() {
        let shape = CacheShape { num_pages: 3, page_size: 2, num_kv_heads: 1, head_dim: 1, layout: KvLayout::Nhd };
        let mut pool = vec![0u32; 6];
        // Sequence 0: pages [2, 0], 3 tokens, the last 2 appended; sequence 1: page [1], 1 token.
        let table = PageTable { kv_indptr: vec![0, 2, 3], kv_indices: vec![2, 0, 1], kv_last_page_len: vec![1, 1] };
        append(&shape, &mut pool, &table, &[0, 2, 3], &[7, 8, 9]);
        assert_eq!(pool, vec![8, 0, 9, 0, 0, 7]);
        assert_eq!(gather(&shape, &pool, &table), vec![0, 7, 8, 9]);
    }
}
