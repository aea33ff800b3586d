//! The CPU reference: straightforward, element-by-element versions of every kernel, written
//! independently of the kernels' addressing, with f64 accumulation where kernels accumulate.
//! GPU tests compare against these.
use crate::decode::DecodeOptions;
use crate::dtype::KvDType;
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

/// Batch decode in f64: for request `i` and query head `h` (KV head `h / group`), logits
/// `s_j = sm_scale · q·k_j` (then `cap · tanh(s_j / cap)` with a soft cap) over the keys in the
/// window, `out = Σ softmax(s)_j v_j`. Returns `out` (`[batch][num_qo_heads][head_dim]`) and the
/// base-2 LSE `log2 Σ exp(s_j)` per (request, head): 0 and −∞ for an empty sequence.
pub fn decode<T: KvDType>(
    shape: &CacheShape,
    k_pool: &[T],
    v_pool: &[T],
    table: &PageTable,
    q: &[T],
    num_qo_heads: usize,
    options: &DecodeOptions,
) -> (Vec<f64>, Vec<f64>) {
    let dim = shape.head_dim;
    let group = num_qo_heads / shape.num_kv_heads;
    let sm_scale = options.sm_scale.map_or(1.0 / (dim as f64).sqrt(), |s| s as f64);
    let cap = options.logits_soft_cap as f64;
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for (seq, kv_len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
        let first = match options.window_left {
            -1 => 0,
            w => kv_len.saturating_sub(w as usize + 1),
        };
        let slots: Vec<(usize, usize)> = (first..kv_len).map(|pos| table.locate(seq, pos, shape.page_size)).collect();
        for h in 0..num_qo_heads {
            let qh = &q[(seq * num_qo_heads + h) * dim..][..dim];
            let kv_head = h / group;
            let logits: Vec<f64> = slots
                .iter()
                .map(|&(page, slot)| {
                    let dot: f64 = (0..dim)
                        .map(|d| qh[d].to_f64() * k_pool[shape.element_index(page, slot, kv_head, d)].to_f64())
                        .sum();
                    let s = sm_scale * dot;
                    if cap > 0.0 {
                        cap * (s / cap).tanh()
                    } else {
                        s
                    }
                })
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = logits.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..dim {
                let acc: f64 = weights
                    .iter()
                    .zip(&slots)
                    .map(|(w, &(page, slot))| w * v_pool[shape.element_index(page, slot, kv_head, d)].to_f64())
                    .sum();
                out.push(if total > 0.0 { acc / total } else { 0.0 });
            }
            lse.push(if total > 0.0 { (max + total.ln()) * std::f64::consts::LOG2_E } else { f64::NEG_INFINITY });
        }
    }
    (out, lse)
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

    #[test]
    fn decode_of_one_key_returns_its_value_and_of_none_zeros() {
        let shape = CacheShape { num_pages: 2, page_size: 1, num_kv_heads: 1, head_dim: 2, layout: KvLayout::Nhd };
        let (k, v) = (vec![1.0f32, 0.0, 0.0, 1.0], vec![3.0f32, 4.0, 5.0, 6.0]);
        let table = PageTable { kv_indptr: vec![0, 1, 1], kv_indices: vec![1], kv_last_page_len: vec![1, 0] };
        let q = vec![2.0f32, 0.0, 1.0, 1.0];
        let (out, lse) =
            decode(&shape, &k, &v, &table, &q, 1, &DecodeOptions { sm_scale: Some(1.0), ..Default::default() });
        assert_eq!(out, vec![5.0, 6.0, 0.0, 0.0]);
        // One key with logit q·k = 0: log2(e^0) = 0.
        assert_eq!(lse[0], 0.0);
        assert_eq!(lse[1], f64::NEG_INFINITY);
    }

    #[test]
    fn decode_weights_keys_by_softmax_within_the_window() {
        let shape = CacheShape { num_pages: 3, page_size: 1, num_kv_heads: 1, head_dim: 1, layout: KvLayout::Nhd };
        let (k, v) = (vec![0.0f32, (2.0f64).ln() as f32, 100.0], vec![1.0f32, 4.0, 7.0]);
        let table = PageTable { kv_indptr: vec![0, 2], kv_indices: vec![0, 1], kv_last_page_len: vec![1] };
        let opts = DecodeOptions { sm_scale: Some(1.0), ..Default::default() };
        let (out, lse) = decode(&shape, &k, &v, &table, &[1.0f32], 1, &opts);
        // Weights 1 and 2: (1 + 8) / 3 = 3; log2(1 + 2).
        assert!((out[0] - 3.0).abs() < 1e-6 && (lse[0] - 3f64.log2()).abs() < 1e-6, "{out:?} {lse:?}");
        let (out, _) = decode(&shape, &k, &v, &table, &[1.0f32], 1, &DecodeOptions { window_left: 0, ..opts });
        assert!((out[0] - 4.0).abs() < 1e-6, "window 0 keeps only the last key: {out:?}");
    }
}
