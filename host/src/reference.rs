//! The CPU reference: straightforward, element-by-element versions of every kernel, written
//! independently of the kernels' addressing, with f64 accumulation where kernels accumulate.
//! GPU tests compare against these.
use crate::attention::decode::DecodeOptions;
use crate::attention::mla::MlaOptions;
use crate::attention::prefill::PrefillOptions;
use crate::cache::layout::CacheShape;
use crate::cache::mla::MlaCacheShape;
use crate::cache::page_table::PageTable;
use crate::cache::paged::{KvHeadScales, KvScales};
use crate::ops::rope::{RopeAngles, RopeOptions};
use crate::runtime::dtype::KvDType;

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

/// Writes ragged f16/bf16 rows into an 8-bit `pool` as [`append`] does, each value quantised as
/// the kernels do: [`E4m3::quantise`](crate::E4m3::quantise)`(x, scale)` (K with `scales.k`,
/// V with `scales.v`; call once per pool with its scale).
pub fn append_quantised<T: KvDType, C: KvDType>(
    shape: &CacheShape,
    pool: &mut [C],
    table: &PageTable,
    append_indptr: &[u32],
    ragged: &[T],
    scale: f32,
) {
    append_quantised_heads(shape, pool, table, append_indptr, ragged, scale, &vec![1.0; shape.num_kv_heads]);
}

/// [`append_quantised`] into a layer with per-KV-head scales (`head_scales[h]`: K's or V's scale
/// of KV head `h`, as given to [`PagedKvCache::set_head_scales`](crate::PagedKvCache::set_head_scales)):
/// a value of head `h` is stored as
/// [`E4m3::quantise_head`](crate::E4m3::quantise_head)`(x, scale, head_scales[h])`, the kernels' f32
/// operations in their order.
pub fn append_quantised_heads<T: KvDType, C: KvDType>(
    shape: &CacheShape,
    pool: &mut [C],
    table: &PageTable,
    append_indptr: &[u32],
    ragged: &[T],
    scale: f32,
    head_scales: &[f32],
) {
    let quantised: Vec<C> = ragged
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let head = head_scales[i / shape.head_dim % shape.num_kv_heads];
            C::from_f64((x.to_f64() as f32 * ((1.0 / scale) * (1.0 / head))) as f64)
        })
        .collect();
    append(shape, pool, table, append_indptr, &quantised);
}

/// An 8-bit pool's values dequantised as gather writes them: each value times `scale`, in
/// f32, rounded to `T`.
pub fn dequantise<C: KvDType, T: KvDType>(values: &[C], scale: f32) -> Vec<T> {
    dequantise_heads(values, scale, &[1.0], 1)
}

/// [`dequantise`] of ragged `[token][head][dim]` values (`head_dim` dims) of a layer with
/// per-KV-head scales `head_scales` (K's or V's, one per head): a value of head `h` times
/// `scale · head_scales[h]` (that product first, in f32, as gather computes it).
pub fn dequantise_heads<C: KvDType, T: KvDType>(
    values: &[C],
    scale: f32,
    head_scales: &[f32],
    head_dim: usize,
) -> Vec<T> {
    let head = |i: usize| head_scales[i / head_dim % head_scales.len()];
    values.iter().enumerate().map(|(i, x)| T::from_f64((x.to_f64() as f32 * (scale * head(i))) as f64)).collect()
}

/// Dequantisation scales by KV head, as the reference applies them (in f64): a stored K value
/// `x` of KV head `h` means `x × k(h)`, a V value `x × v(h)`. [`KvScales`] gives every head the
/// layer's scales; [`PerHeadScales`] the layer's times each head's.
pub trait Dequantisation: Copy {
    /// K's scale of KV head `kv_head`.
    fn k(&self, kv_head: usize) -> f64;
    /// V's scale of KV head `kv_head`.
    fn v(&self, kv_head: usize) -> f64;
}

impl Dequantisation for KvScales {
    fn k(&self, _: usize) -> f64 {
        self.k as f64
    }
    fn v(&self, _: usize) -> f64 {
        self.v as f64
    }
}

/// A layer's [`KvScales`] with per-KV-head scales
/// ([`PagedKvCache::set_head_scales`](crate::PagedKvCache::set_head_scales)): head `h`'s K
/// scale is `layer.k × heads.k[h]`, its V scale `layer.v × heads.v[h]` (exact in f64).
#[derive(Clone, Copy, Debug)]
pub struct PerHeadScales<'a> {
    /// The layer's scales.
    pub layer: KvScales,
    /// Each KV head's.
    pub heads: KvHeadScales<'a>,
}

impl Dequantisation for PerHeadScales<'_> {
    fn k(&self, kv_head: usize) -> f64 {
        self.layer.k as f64 * self.heads.k[kv_head] as f64
    }
    fn v(&self, kv_head: usize) -> f64 {
        self.layer.v as f64 * self.heads.v[kv_head] as f64
    }
}

/// One query row `q` (head_dim elements) attending over the keys at `slots` of KV head
/// `kv_head`, in f64, with the pools' values times their scales (exact in f64): logits
/// `s_j = sm_scale · q·k_j` (then `cap · tanh(s_j / cap)` with a soft cap),
/// `out = Σ softmax(s)_j v_j`, and the base-2 LSE `log2 Σ exp(s_j)`: zeros and −∞ over no keys.
#[allow(clippy::too_many_arguments)]
fn attend<T: KvDType, C: KvDType>(
    shape: &CacheShape,
    k_pool: &[C],
    v_pool: &[C],
    scales: impl Dequantisation,
    slots: &[(usize, usize)],
    kv_head: usize,
    q: &[T],
    sm_scale: f64,
    cap: f64,
    sink: Option<f64>,
    out: &mut Vec<f64>,
) -> f64 {
    let dim = shape.head_dim;
    let (k_scale, v_scale) = (scales.k(kv_head), scales.v(kv_head));
    let logits: Vec<f64> = slots
        .iter()
        .map(|&(page, slot)| {
            let dot: f64 = (0..dim)
                .map(|d| q[d].to_f64() * k_pool[shape.element_index(page, slot, kv_head, d)].to_f64() * k_scale)
                .sum();
            soft_cap(sm_scale * dot, cap)
        })
        .collect();
    softmax_values(&logits, sink, dim, out, |key, d| {
        let (page, slot) = slots[key];
        v_pool[shape.element_index(page, slot, kv_head, d)].to_f64() * v_scale
    })
}

/// `cap · tanh(s / cap)`, or `s` without a cap (`cap ≤ 0`).
fn soft_cap(s: f64, cap: f64) -> f64 {
    if cap > 0.0 {
        cap * (s / cap).tanh()
    } else {
        s
    }
}

/// The softmax of `logits` (and of `sink`, a key of value zero: in the maximum and the sum, not
/// in the weighted values) applied to the keys' values, `value(key, d)` for `dims` dims,
/// appended to `out`; returns the base-2 LSE. Without keys (and sink): zeros and −∞.
fn softmax_values(
    logits: &[f64],
    sink: Option<f64>,
    dims: usize,
    out: &mut Vec<f64>,
    value: impl Fn(usize, usize) -> f64,
) -> f64 {
    let sink = sink.filter(|&s| s > f64::NEG_INFINITY);
    let max = logits.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - max).exp());
    for d in 0..dims {
        let acc: f64 = weights.iter().enumerate().map(|(key, w)| w * value(key, d)).sum();
        out.push(if total > 0.0 { acc / total } else { 0.0 });
    }
    if total > 0.0 {
        (max + total.ln()) * std::f64::consts::LOG2_E
    } else {
        f64::NEG_INFINITY
    }
}

/// `sm_scale` (default `1 / √head_dim`) and the soft cap, in f64.
fn logit_scales(shape: &CacheShape, sm_scale: Option<f32>, cap: f32) -> (f64, f64) {
    (sm_scale.map_or(1.0 / (shape.head_dim as f64).sqrt(), |s| s as f64), cap as f64)
}

/// Batch decode in f64: for request `i` and query head `h` (KV head `h / group`), softmax
/// attention over the keys in the window (logits `s_j = sm_scale · q·k_j`, then
/// `cap · tanh(s_j / cap)` with a soft cap). Returns `out` (`[batch][num_qo_heads][head_dim]`) and the
/// base-2 LSE per (request, head): 0 and −∞ for an empty sequence.
pub fn decode<T: KvDType>(
    shape: &CacheShape,
    k_pool: &[T],
    v_pool: &[T],
    table: &PageTable,
    q: &[T],
    num_qo_heads: usize,
    options: &DecodeOptions,
) -> (Vec<f64>, Vec<f64>) {
    decode_scaled(shape, k_pool, v_pool, KvScales::default(), table, q, num_qo_heads, options)
}

/// [`decode`] over pools of another element type (an 8-bit cache), whose values mean their
/// value times `scales` (a layer's [`KvScales`], or [`PerHeadScales`] with its KV heads').
#[allow(clippy::too_many_arguments)]
pub fn decode_scaled<T: KvDType, C: KvDType>(
    shape: &CacheShape,
    k_pool: &[C],
    v_pool: &[C],
    scales: impl Dequantisation,
    table: &PageTable,
    q: &[T],
    num_qo_heads: usize,
    options: &DecodeOptions,
) -> (Vec<f64>, Vec<f64>) {
    decode_with_sinks(shape, k_pool, v_pool, scales, table, q, num_qo_heads, options, None)
}

/// [`decode_scaled`] with attention sinks (`sinks`, if given: one logit per query head in the
/// units of the scaled logits, −∞ for none), each joining its head's softmax denominator as a
/// key of value zero, in the LSE too; an empty sequence gives zeros and the sink as LSE.
#[allow(clippy::too_many_arguments)]
pub fn decode_with_sinks<T: KvDType, C: KvDType>(
    shape: &CacheShape,
    k_pool: &[C],
    v_pool: &[C],
    scales: impl Dequantisation,
    table: &PageTable,
    q: &[T],
    num_qo_heads: usize,
    options: &DecodeOptions,
    sinks: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let dim = shape.head_dim;
    let group = num_qo_heads / shape.num_kv_heads;
    let (sm_scale, cap) = logit_scales(shape, options.sm_scale, options.logits_soft_cap);
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for (seq, kv_len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
        let first = match options.window_left {
            -1 => 0,
            w => kv_len.saturating_sub(w as usize + 1),
        };
        let slots: Vec<(usize, usize)> = (first..kv_len).map(|pos| table.locate(seq, pos, shape.page_size)).collect();
        for h in 0..num_qo_heads {
            let qh = &q[(seq * num_qo_heads + h) * dim..][..dim];
            let sink = sinks.map(|s| s[h] as f64);
            lse.push(attend(shape, k_pool, v_pool, scales, &slots, h / group, qh, sm_scale, cap, sink, &mut out));
        }
    }
    (out, lse)
}

/// Multi-head latent attention in f64, weights absorbed (as
/// [`BatchMlaPlan`](crate::BatchMlaPlan)): request `i`'s query token `j` (row `qo_indptr[i] + j`)
/// sits at key position `p = kv_len − qo_len + j`; for each head `h` its logits over the
/// request's keys (`0..=p` when causal, else all) are
/// `sm_scale · (q_nope·ckv_k + q_pe·kpe_k)`, its output `Σ softmax_k · ckv_k` (512 dims) and its
/// base-2 LSE `log2 Σ exp(s_k)`: zeros and −∞ over no keys. The pools are `[page][slot][dim]`
/// (token `(page, slot)`'s ckv row at element `(page · page_size + slot) · 512`). Returns `out`
/// (`[total_q][num_heads][512]`) and the LSE per (token, head).
#[allow(clippy::too_many_arguments)]
pub fn mla<T: KvDType>(
    shape: &MlaCacheShape,
    ckv: &[T],
    kpe: &[T],
    table: &PageTable,
    qo_indptr: &[u32],
    q_nope: &[T],
    q_pe: &[T],
    num_heads: usize,
    options: &MlaOptions,
) -> (Vec<f64>, Vec<f64>) {
    mla_scaled(shape, ckv, kpe, 1.0, table, qo_indptr, q_nope, q_pe, num_heads, options)
}

/// [`mla`] over pools of another element type (an 8-bit latent cache), whose values mean their
/// value times `scale` (exact in f64).
#[allow(clippy::too_many_arguments)]
pub fn mla_scaled<T: KvDType, C: KvDType>(
    shape: &MlaCacheShape,
    ckv: &[C],
    kpe: &[C],
    scale: f32,
    table: &PageTable,
    qo_indptr: &[u32],
    q_nope: &[T],
    q_pe: &[T],
    num_heads: usize,
    options: &MlaOptions,
) -> (Vec<f64>, Vec<f64>) {
    let (ckv_dim, kpe_dim) = (MlaCacheShape::CKV_DIM, MlaCacheShape::KPE_DIM);
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for (seq, kv_len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
        // Each key's two rows, in f64, once per request.
        let keys: Vec<(Vec<f64>, Vec<f64>)> = (0..kv_len)
            .map(|pos| {
                let (page, slot) = table.locate(seq, pos, shape.page_size);
                let token = page * shape.page_size + slot;
                let row = |pool: &[C], dim: usize| {
                    pool[token * dim..][..dim].iter().map(|x| x.to_f64() * scale as f64).collect()
                };
                (row(ckv, ckv_dim), row(kpe, kpe_dim))
            })
            .collect();
        let qo_len = (qo_indptr[seq + 1] - qo_indptr[seq]) as usize;
        for j in 0..qo_len {
            let visible = if options.causal { kv_len - qo_len + j + 1 } else { kv_len };
            let token = qo_indptr[seq] as usize + j;
            for h in 0..num_heads {
                let row = token * num_heads + h;
                let qn: Vec<f64> = q_nope[row * ckv_dim..][..ckv_dim].iter().map(|x| x.to_f64()).collect();
                let qp: Vec<f64> = q_pe[row * kpe_dim..][..kpe_dim].iter().map(|x| x.to_f64()).collect();
                let logits: Vec<f64> = keys[..visible]
                    .iter()
                    .map(|(c, p)| {
                        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
                        options.sm_scale as f64 * (dot(&qn, c) + dot(&qp, p))
                    })
                    .collect();
                lse.push(softmax_values(&logits, None, ckv_dim, &mut out, |key, d| keys[key].0[d]));
            }
        }
    }
    (out, lse)
}

/// Batch prefill in f64: request `i`'s query token `j` (row `qo_indptr[i] + j` of `q`) sits at
/// key position `p = kv_len − qo_len + j` and, for each query head, attends as in [`decode`] over keys
/// `lo..=hi`: `hi = p` when causal, else the last key; `lo = p − window_left` (at least 0) with
/// a window, else 0. Returns `out` (`[total_q][num_qo_heads][head_dim]`) and the base-2 LSE
/// per (token, head).
#[allow(clippy::too_many_arguments)]
pub fn prefill<T: KvDType>(
    shape: &CacheShape,
    k_pool: &[T],
    v_pool: &[T],
    table: &PageTable,
    qo_indptr: &[u32],
    q: &[T],
    num_qo_heads: usize,
    options: &PrefillOptions,
) -> (Vec<f64>, Vec<f64>) {
    prefill_scaled(shape, k_pool, v_pool, KvScales::default(), table, qo_indptr, q, num_qo_heads, options)
}

/// [`prefill`] over pools of another element type (an 8-bit cache), whose values mean their
/// value times `scales` (a layer's [`KvScales`], or [`PerHeadScales`] with its KV heads').
#[allow(clippy::too_many_arguments)]
pub fn prefill_scaled<T: KvDType, C: KvDType>(
    shape: &CacheShape,
    k_pool: &[C],
    v_pool: &[C],
    scales: impl Dequantisation,
    table: &PageTable,
    qo_indptr: &[u32],
    q: &[T],
    num_qo_heads: usize,
    options: &PrefillOptions,
) -> (Vec<f64>, Vec<f64>) {
    prefill_with_sinks(shape, k_pool, v_pool, scales, table, qo_indptr, q, num_qo_heads, options, None)
}

/// [`prefill_scaled`] with attention sinks, as [`decode_with_sinks`].
#[allow(clippy::too_many_arguments)]
pub fn prefill_with_sinks<T: KvDType, C: KvDType>(
    shape: &CacheShape,
    k_pool: &[C],
    v_pool: &[C],
    scales: impl Dequantisation,
    table: &PageTable,
    qo_indptr: &[u32],
    q: &[T],
    num_qo_heads: usize,
    options: &PrefillOptions,
    sinks: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let dim = shape.head_dim;
    let group = num_qo_heads / shape.num_kv_heads;
    let (sm_scale, cap) = logit_scales(shape, options.sm_scale, options.logits_soft_cap);
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for (seq, kv_len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
        let (first_row, qo_len) = (qo_indptr[seq] as usize, (qo_indptr[seq + 1] - qo_indptr[seq]) as usize);
        for j in 0..qo_len {
            // Positions matter only with a causal mask or a window (then kv_len ≥ qo_len).
            let pos = (kv_len + j).saturating_sub(qo_len);
            let hi = if options.causal { pos + 1 } else { kv_len };
            let lo = match options.window_left {
                -1 => 0,
                w => pos.saturating_sub(w as usize),
            };
            let slots: Vec<(usize, usize)> = (lo..hi).map(|key| table.locate(seq, key, shape.page_size)).collect();
            for h in 0..num_qo_heads {
                let qh = &q[((first_row + j) * num_qo_heads + h) * dim..][..dim];
                let sink = sinks.map(|s| s[h] as f64);
                lse.push(attend(shape, k_pool, v_pool, scales, &slots, h / group, qh, sm_scale, cap, sink, &mut out));
            }
        }
    }
    (out, lse)
}

/// Ragged batch prefill in f64 with queries and keys of `head_dim_qk` dims and values of
/// `head_dim_vo` (DeepSeek-style prefill): `q` is `[total_q][num_qo_heads][head_dim_qk]`, `k`
/// `[total_kv][num_kv_heads][head_dim_qk]`, `v` `[total_kv][num_kv_heads][head_dim_vo]`, request
/// `i`'s keys rows `kv_indptr[i]..kv_indptr[i + 1]`; positions, mask, window, scale (default
/// `1 / √head_dim_qk`) and soft cap as in [`prefill`]. Returns `out`
/// (`[total_q][num_qo_heads][head_dim_vo]`) and the base-2 LSE per (token, head).
#[allow(clippy::too_many_arguments)]
pub fn prefill_ragged_qk_vo<T: KvDType>(
    q: &[T],
    k: &[T],
    v: &[T],
    qo_indptr: &[u32],
    kv_indptr: &[u32],
    (num_qo_heads, num_kv_heads): (usize, usize),
    (head_dim_qk, head_dim_vo): (usize, usize),
    options: &PrefillOptions,
) -> (Vec<f64>, Vec<f64>) {
    let group = num_qo_heads / num_kv_heads;
    let sm_scale = options.sm_scale.map_or(1.0 / (head_dim_qk as f64).sqrt(), |s| s as f64);
    let cap = options.logits_soft_cap as f64;
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for seq in 0..qo_indptr.len() - 1 {
        let (first_q, qo_len) = (qo_indptr[seq] as usize, (qo_indptr[seq + 1] - qo_indptr[seq]) as usize);
        let (first_kv, kv_len) = (kv_indptr[seq] as usize, (kv_indptr[seq + 1] - kv_indptr[seq]) as usize);
        for j in 0..qo_len {
            let pos = (kv_len + j).saturating_sub(qo_len);
            let hi = if options.causal { pos + 1 } else { kv_len };
            let lo = if options.window_left < 0 { 0 } else { pos.saturating_sub(options.window_left as usize) };
            for h in 0..num_qo_heads {
                let qh = &q[((first_q + j) * num_qo_heads + h) * head_dim_qk..][..head_dim_qk];
                let row = |key: usize| (first_kv + key) * num_kv_heads + h / group;
                let logits: Vec<f64> = (lo..hi)
                    .map(|key| {
                        let kh = &k[row(key) * head_dim_qk..][..head_dim_qk];
                        soft_cap(sm_scale * qh.iter().zip(kh).map(|(a, b)| a.to_f64() * b.to_f64()).sum::<f64>(), cap)
                    })
                    .collect();
                let value = |key: usize, d: usize| v[row(lo + key) * head_dim_vo + d].to_f64();
                lse.push(softmax_values(&logits, None, head_dim_vo, &mut out, value));
            }
        }
    }
    (out, lse)
}

/// Batch prefill in f64 with a custom mask: as [`prefill`], each query attending over the keys
/// whose entry in `mask` is true (request `i`'s `qo_len × kv_len` entries, query after query,
/// requests one after another, as [`CustomMask::Flat`](crate::CustomMask::Flat)) and, with a
/// window, at positions `≥ kv_len − qo_len + j − window_left`; `options.causal` is ignored.
/// A query whose keys are all masked gets zeros and an LSE of −∞.
#[allow(clippy::too_many_arguments)]
pub fn prefill_masked<T: KvDType>(
    shape: &CacheShape,
    k_pool: &[T],
    v_pool: &[T],
    table: &PageTable,
    qo_indptr: &[u32],
    q: &[T],
    num_qo_heads: usize,
    mask: &[bool],
    options: &PrefillOptions,
) -> (Vec<f64>, Vec<f64>) {
    let scales = KvScales::default();
    prefill_masked_scaled(shape, k_pool, v_pool, scales, table, qo_indptr, q, num_qo_heads, mask, options)
}

/// [`prefill_masked`] over pools of another element type (an 8-bit cache), whose values mean
/// their value times `scales`, as [`prefill_scaled`].
#[allow(clippy::too_many_arguments)]
pub fn prefill_masked_scaled<T: KvDType, C: KvDType>(
    shape: &CacheShape,
    k_pool: &[C],
    v_pool: &[C],
    scales: impl Dequantisation,
    table: &PageTable,
    qo_indptr: &[u32],
    q: &[T],
    num_qo_heads: usize,
    mask: &[bool],
    options: &PrefillOptions,
) -> (Vec<f64>, Vec<f64>) {
    let dim = shape.head_dim;
    let group = num_qo_heads / shape.num_kv_heads;
    let (sm_scale, cap) = logit_scales(shape, options.sm_scale, options.logits_soft_cap);
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    let mut entry = 0;
    for (seq, kv_len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
        let (first_row, qo_len) = (qo_indptr[seq] as usize, (qo_indptr[seq + 1] - qo_indptr[seq]) as usize);
        for j in 0..qo_len {
            let row_mask = &mask[entry..entry + kv_len];
            entry += kv_len;
            let in_window =
                |key: usize| options.window_left < 0 || key + qo_len + options.window_left as usize >= kv_len + j;
            let slots: Vec<(usize, usize)> = (0..kv_len)
                .filter(|&key| row_mask[key] && in_window(key))
                .map(|key| table.locate(seq, key, shape.page_size))
                .collect();
            for h in 0..num_qo_heads {
                let qh = &q[((first_row + j) * num_qo_heads + h) * dim..][..dim];
                lse.push(attend(shape, k_pool, v_pool, scales, &slots, h / group, qh, sm_scale, cap, None, &mut out));
            }
        }
    }
    (out, lse)
}

/// Merged attention states in f64: for each (token, head), states `k` with outputs `v_k`
/// (`v`: `[tokens][num_states][heads][head_dim]`) and base-2 LSEs `s_k` (`[tokens][num_states][heads]`)
/// give `Σ_k 2^(s_k − s) v_k` and `s = log2 Σ_k 2^(s_k)`; no finite LSE gives zeros and −∞.
pub fn merge_states<T: KvDType>(
    v: &[T],
    s: &[f32],
    num_states: usize,
    heads: usize,
    head_dim: usize,
) -> (Vec<f64>, Vec<f64>) {
    let tokens = s.len() / (num_states * heads);
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for t in 0..tokens {
        for h in 0..heads {
            let state_lse = |k: usize| s[(t * num_states + k) * heads + h] as f64;
            let max = (0..num_states).map(state_lse).fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = (0..num_states).map(|k| (state_lse(k) - max).exp2()).sum();
            let merged = if total > 0.0 { max + total.log2() } else { f64::NEG_INFINITY };
            for d in 0..head_dim {
                let sum: f64 = (0..num_states)
                    .map(|k| {
                        let w = if total > 0.0 { (state_lse(k) - merged).exp2() } else { 0.0 };
                        w * v[((t * num_states + k) * heads + h) * head_dim + d].to_f64()
                    })
                    .sum();
                out.push(sum);
            }
            lse.push(merged);
        }
    }
    (out, lse)
}

/// Cos and sin of RoPE pair `i` of `rotary_dim` at `position`, from the definition: the angle
/// in f64 (`position / rope_scale · rope_theta^(−2i / rotary_dim)`; with Llama 3.1 scaling,
/// Meta's wavelength bands: unscaled below `old_context_len / high_freq_factor`, divided by
/// `rope_scale` above `old_context_len / low_freq_factor`, interpolated between), or the cache's
/// row `position` (`cos_sin_cache`, f32 `[max_position][rotary_dim]`).
pub fn rope_cos_sin(
    angles: &RopeAngles,
    rotary_dim: usize,
    position: u64,
    i: usize,
    cos_sin_cache: Option<&[f32]>,
) -> (f64, f64) {
    let base = |theta: f64| theta.powf(-2.0 * i as f64 / rotary_dim as f64);
    let angle = match *angles {
        RopeAngles::Standard { rope_theta, rope_scale } => position as f64 / rope_scale * base(rope_theta),
        RopeAngles::Llama31 { rope_theta, rope_scale, low_freq_factor, high_freq_factor, old_context_len } => {
            let f = base(rope_theta);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let f = if wavelen < old_context_len / high_freq_factor {
                f
            } else if wavelen > old_context_len / low_freq_factor {
                f / rope_scale
            } else {
                let smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / rope_scale + smooth * f
            };
            position as f64 * f
        }
        RopeAngles::CosSinCache { .. } => {
            let cache = cos_sin_cache.expect("a cos/sin cache for RopeAngles::CosSinCache");
            let row = &cache[position as usize * rotary_dim..][..rotary_dim];
            return (row[i] as f64, row[rotary_dim / 2 + i] as f64);
        }
    };
    (angle.cos(), angle.sin())
}

/// RoPE of ragged rows `x` (`[token][heads][head_dim]`, token `t` at `positions[t]`), in f64:
/// NeoX pairs `(i, i + rotary_dim / 2)` or, with `interleave`, GPT-J pairs `(2i, 2i + 1)`, each
/// `(a, b)` becoming `(a cos − b sin, b cos + a sin)`; dims from `rotary_dim` on unchanged.
pub fn rope<T: KvDType>(
    x: &[T],
    heads: usize,
    head_dim: usize,
    positions: &[u64],
    options: &RopeOptions,
    cos_sin_cache: Option<&[f32]>,
) -> Vec<f64> {
    let rotary_dim = options.rotary_dim.unwrap_or(head_dim);
    let half = rotary_dim / 2;
    let mut out = Vec::with_capacity(x.len());
    for (token, &position) in positions.iter().enumerate() {
        for head in 0..heads {
            let row: Vec<f64> = x[(token * heads + head) * head_dim..][..head_dim].iter().map(|v| v.to_f64()).collect();
            for d in 0..head_dim {
                if d >= rotary_dim {
                    out.push(row[d]);
                    continue;
                }
                // The pair's index, its other element, and whether `d` is its first element.
                let (i, other, first) = if options.interleave {
                    (d / 2, d ^ 1, d % 2 == 0)
                } else if d < half {
                    (d, d + half, true)
                } else {
                    (d - half, d - half, false)
                };
                let (c, s) = rope_cos_sin(&options.angles, rotary_dim, position, i, cos_sin_cache);
                out.push(if first { row[d] * c - row[other] * s } else { row[d] * c + row[other] * s });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::layout::KvLayout;

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
    fn mla_is_ragged_prefill_of_one_kv_head_with_keys_ckv_and_kpe_and_values_ckv() {
        let (ckv_dim, kpe_dim) = (MlaCacheShape::CKV_DIM, MlaCacheShape::KPE_DIM);
        let shape = MlaCacheShape { num_pages: 4, page_size: 3 };
        // Requests of 5 keys (pages 2, 0) with 2 causal queries, and 3 keys (page 3) with 1.
        let table = PageTable { kv_indptr: vec![0, 2, 3], kv_indices: vec![2, 0, 3], kv_last_page_len: vec![2, 3] };
        let value = |i: usize, m: usize| ((i * m % 13) as f32 - 6.0) / 40.0;
        let ckv: Vec<f32> = (0..shape.ckv_pool_elems()).map(|i| value(i, 7)).collect();
        let kpe: Vec<f32> = (0..shape.kpe_pool_elems()).map(|i| value(i, 5)).collect();
        let heads = 3;
        let q_nope: Vec<f32> = (0..3 * heads * ckv_dim).map(|i| value(i, 3)).collect();
        let q_pe: Vec<f32> = (0..3 * heads * kpe_dim).map(|i| value(i, 11)).collect();
        let options = MlaOptions { sm_scale: 0.3, causal: true, kv_dtype: None };
        let scale = 0.5;
        let got = mla_scaled(&shape, &ckv, &kpe, scale, &table, &[0, 2, 3], &q_nope, &q_pe, heads, &options);
        // The same keys gathered in order: K = [ckv | kpe], V = ckv, Q = [q_nope | q_pe].
        let mut k = Vec::new();
        let mut v = Vec::new();
        for (seq, len) in table.kv_lens(shape.page_size).into_iter().enumerate() {
            for pos in 0..len {
                let (page, slot) = table.locate(seq, pos, shape.page_size);
                let token = page * shape.page_size + slot;
                let c: Vec<f32> = ckv[token * ckv_dim..][..ckv_dim].iter().map(|x| x * scale).collect();
                k.extend(&c);
                k.extend(kpe[token * kpe_dim..][..kpe_dim].iter().map(|x| x * scale));
                v.extend(c);
            }
        }
        let q: Vec<f32> = (0..3 * heads)
            .flat_map(|row| q_nope[row * ckv_dim..][..ckv_dim].iter().chain(&q_pe[row * kpe_dim..][..kpe_dim]))
            .copied()
            .collect();
        let prefill = PrefillOptions { sm_scale: Some(0.3), ..PrefillOptions::CAUSAL };
        let dims = (ckv_dim + kpe_dim, ckv_dim);
        let want = prefill_ragged_qk_vo(&q, &k, &v, &[0, 2, 3], &[0, 5, 8], (heads, 1), dims, &prefill);
        assert_eq!(got.0.len(), want.0.len());
        for (g, w) in got.0.iter().chain(&got.1).zip(want.0.iter().chain(&want.1)) {
            assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "{g} against {w}");
        }
    }

    #[test]
    fn prefill_masked_matches_the_causal_and_full_prefill_for_their_masks() {
        let shape = CacheShape { num_pages: 5, page_size: 2, num_kv_heads: 1, head_dim: 2, layout: KvLayout::Nhd };
        let k: Vec<f32> = (0..20).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let v: Vec<f32> = (0..20).map(|i| (i % 5) as f32).collect();
        // Requests of 3 queries over 5 keys and 2 over 4.
        let table =
            PageTable { kv_indptr: vec![0, 3, 5], kv_indices: vec![4, 0, 2, 1, 3], kv_last_page_len: vec![1, 2] };
        let qo_indptr = [0, 3, 5];
        let q: Vec<f32> = (0..10).map(|i| (i as f32 - 4.0) / 2.0).collect();
        let lens = [(3, 5), (2, 4)];
        let mask_of = |keep: &dyn Fn(usize, usize, usize, usize) -> bool| -> Vec<bool> {
            lens.iter()
                .flat_map(|&(qo, kv)| (0..qo).flat_map(move |j| (0..kv).map(move |key| (qo, kv, j, key))))
                .map(|(qo, kv, j, key)| keep(qo, kv, j, key))
                .collect()
        };
        let full = PrefillOptions::default();
        let causal = PrefillOptions { causal: true, ..full };
        let causal_mask = mask_of(&|qo, kv, j, key| key + qo <= kv + j);
        // `causal` in the options is ignored with a mask: the mask alone decides.
        let got = prefill_masked(&shape, &k, &v, &table, &qo_indptr, &q, 1, &causal_mask, &full);
        assert_eq!(got, prefill(&shape, &k, &v, &table, &qo_indptr, &q, 1, &causal));
        let everything = mask_of(&|_, _, _, _| true);
        let got = prefill_masked(&shape, &k, &v, &table, &qo_indptr, &q, 1, &everything, &causal);
        assert_eq!(got, prefill(&shape, &k, &v, &table, &qo_indptr, &q, 1, &full));
        // A window applies on top of the mask.
        let window = PrefillOptions { window_left: 1, ..full };
        let got = prefill_masked(&shape, &k, &v, &table, &qo_indptr, &q, 1, &everything, &window);
        assert_eq!(got, prefill(&shape, &k, &v, &table, &qo_indptr, &q, 1, &window));
        // A query with every key masked: zeros and −∞, as over no keys.
        let (out, lse) =
            prefill_masked(&shape, &k, &v, &table, &qo_indptr, &q, 1, &mask_of(&|_, _, j, _| j != 1), &full);
        assert_eq!((&out[2..4], lse[1]), (&[0.0, 0.0][..], f64::NEG_INFINITY));
        assert!(lse[0].is_finite() && lse[2].is_finite());
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

    #[test]
    fn prefill_causal_queries_see_their_prefix_only() {
        // Three keys with values 1, 4, 7 and equal logits; a prompt of 3 new tokens, one head.
        let shape = CacheShape { num_pages: 3, page_size: 1, num_kv_heads: 1, head_dim: 1, layout: KvLayout::Nhd };
        let (k, v) = (vec![0.0f32; 3], vec![1.0f32, 4.0, 7.0]);
        let table = PageTable { kv_indptr: vec![0, 3], kv_indices: vec![0, 1, 2], kv_last_page_len: vec![1] };
        let causal = PrefillOptions { causal: true, sm_scale: Some(1.0), ..Default::default() };
        let (out, lse) = prefill(&shape, &k, &v, &table, &[0, 3], &[1.0f32; 3], 1, &causal);
        assert_eq!(out, vec![1.0, 2.5, 4.0]);
        assert!(lse.iter().zip([0.0, 1.0, 3f64.log2()]).all(|(g, w)| (g - w).abs() < 1e-12), "{lse:?}");
        // Two new tokens at the end: they sit at positions 1 and 2.
        let (out, _) = prefill(&shape, &k, &v, &table, &[0, 2], &[1.0f32; 2], 1, &causal);
        assert_eq!(out, vec![2.5, 4.0]);
        // Without the mask every query sees all three keys; a window of 0 cuts the keys before
        // its own position, and with the mask leaves only its own.
        let full = PrefillOptions { causal: false, ..causal };
        assert_eq!(prefill(&shape, &k, &v, &table, &[0, 2], &[1.0f32; 2], 1, &full).0, vec![4.0, 4.0]);
        let from_own = PrefillOptions { window_left: 0, ..full };
        assert_eq!(prefill(&shape, &k, &v, &table, &[0, 2], &[1.0f32; 2], 1, &from_own).0, vec![5.5, 7.0]);
        let own = PrefillOptions { window_left: 0, ..causal };
        assert_eq!(prefill(&shape, &k, &v, &table, &[0, 2], &[1.0f32; 2], 1, &own).0, vec![4.0, 7.0]);
    }

    /// E4M3 pools of `shape` with codes of every sign and magnitude, and a table of two
    /// sequences (6 and 9 tokens) over its 5 pages of 3, for the scaled references.
    fn e4m3_pools_and_table(shape: &CacheShape) -> (Vec<crate::E4m3>, Vec<crate::E4m3>, PageTable) {
        let code = |i: usize| crate::E4m3(((i * 37) % 0x7E) as u8 | if i.is_multiple_of(3) { 0x80 } else { 0 });
        let table =
            PageTable { kv_indptr: vec![0, 2, 5], kv_indices: vec![4, 0, 2, 1, 3], kv_last_page_len: vec![2, 3] };
        ((0..shape.pool_elems()).map(code).collect(), (0..shape.pool_elems()).map(|i| code(i + 11)).collect(), table)
    }

    #[test]
    fn scaled_fp8_pools_read_as_their_values_times_the_scales() {
        // Power-of-two scales keep the dequantised values exact in f32, so attention over an
        // e4m3 pool with scales must equal attention over the f32 pool of those values.
        use crate::runtime::dtype::E4m3;
        let shape = CacheShape { num_pages: 5, page_size: 3, num_kv_heads: 1, head_dim: 4, layout: KvLayout::Nhd };
        let (k8, v8, table) = e4m3_pools_and_table(&shape);
        let scales = KvScales { k: 0.0078125, v: 4.0 };
        let k: Vec<f32> = k8.iter().map(|x| x.to_f32() * scales.k).collect();
        let v: Vec<f32> = v8.iter().map(|x| x.to_f32() * scales.v).collect();
        let q = [0.5f32, -1.0, 0.25, 2.0, 1.0, 0.0, -0.5, 0.125];
        let opts = DecodeOptions::default();
        let want = decode(&shape, &k, &v, &table, &q, 1, &opts);
        assert_eq!(decode_scaled(&shape, &k8, &v8, scales, &table, &q, 1, &opts), want);
        // And the quantising append stores what `E4m3::quantise` gives.
        let mut pool = vec![E4m3(0); shape.pool_elems()];
        let ragged: Vec<f32> = (0..2 * 4).map(|i| i as f32 * 3.3 - 9.0).collect();
        append_quantised(&shape, &mut pool, &table, &[0, 1, 2], &ragged, 0.3);
        let (page, slot) = table.locate(1, 8, 3); // sequence 1 (9 tokens) appends its last token
        assert_eq!(pool[shape.element_index(page, slot, 0, 2)], E4m3::quantise(ragged[6], 0.3));
    }

    #[test]
    fn per_head_scaled_fp8_pools_read_as_their_values_times_both_scales() {
        // Power-of-two scales again, distinct per KV head: attention over the e4m3 pools with
        // the layer's and the heads' scales equals attention over the f32 pools of the values.
        use crate::runtime::dtype::E4m3;
        let shape = CacheShape { num_pages: 5, page_size: 3, num_kv_heads: 2, head_dim: 4, layout: KvLayout::Hnd };
        let (k8, v8, table) = e4m3_pools_and_table(&shape);
        let layer = KvScales { k: 0.0078125, v: 4.0 };
        let (head_k, head_v) = ([2.0f32, 0.25], [0.5f32, 8.0]);
        let heads = KvHeadScales { k: &head_k, v: &head_v };
        let (mut k, mut v) = (vec![0.0f32; shape.pool_elems()], vec![0.0f32; shape.pool_elems()]);
        for page in 0..shape.num_pages {
            for slot in 0..shape.page_size {
                for head in 0..shape.num_kv_heads {
                    for d in 0..shape.head_dim {
                        let i = shape.element_index(page, slot, head, d);
                        k[i] = k8[i].to_f32() * layer.k * head_k[head];
                        v[i] = v8[i].to_f32() * layer.v * head_v[head];
                    }
                }
            }
        }
        let q: Vec<f32> = (0..2 * 4 * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        let opts = DecodeOptions::default();
        let scales = PerHeadScales { layer, heads };
        assert_eq!(
            decode_scaled(&shape, &k8, &v8, scales, &table, &q, 4, &opts),
            decode(&shape, &k, &v, &table, &q, 4, &opts)
        );
        // The quantising append stores what `E4m3::quantise_head` gives, head by head, and
        // dequantising reads back the value times both scales.
        let mut pool = vec![E4m3(0); shape.pool_elems()];
        let ragged: Vec<f32> = (0..2 * 2 * 4).map(|i| i as f32 * 3.3 - 20.0).collect();
        append_quantised_heads(&shape, &mut pool, &table, &[0, 1, 2], &ragged, 0.3, &[0.7, 3.0]);
        let (page, slot) = table.locate(1, 8, 3); // sequence 1 (9 tokens) appends its last token
        for (head, h) in [(0, 0.7), (1, 3.0)] {
            let x = ragged[(2 + head) * 4 + 1];
            assert_eq!(pool[shape.element_index(page, slot, head, 1)], E4m3::quantise_head(x, 0.3, h));
        }
        let codes = [E4m3(0x38), E4m3(0x38), E4m3(0x38), E4m3(0x38)]; // 1.0: head 0, then head 1
        assert_eq!(dequantise_heads::<E4m3, f32>(&codes, 0.5, &[3.0, 5.0], 2), [1.5, 1.5, 2.5, 2.5]);
        // Head scales of 1 are no head scales.
        assert_eq!(E4m3::quantise_head(7.7, 0.3, 1.0), E4m3::quantise(7.7, 0.3));
        assert_eq!(dequantise::<E4m3, f32>(&codes, 0.5), [0.5; 4]);
    }

    #[test]
    fn prefill_of_one_query_per_request_is_decode() {
        // Random keys, values and queries; 2 KV heads, group 3; lengths around pages of 3.
        let shape = CacheShape { num_pages: 12, page_size: 3, num_kv_heads: 2, head_dim: 4, layout: KvLayout::Hnd };
        let value = |i: usize| ((i * 7919) % 201) as f32 / 100.0 - 1.0;
        let k: Vec<f32> = (0..shape.pool_elems()).map(value).collect();
        let v: Vec<f32> = (0..shape.pool_elems()).map(|i| value(i + 5)).collect();
        let table = PageTable {
            kv_indptr: vec![0, 1, 4, 8],
            kv_indices: vec![5, 0, 11, 2, 7, 3, 9, 1],
            kv_last_page_len: vec![1, 3, 2],
        };
        let q: Vec<f32> = (0..3 * 6 * 4).map(|i| value(3 * i + 1)).collect();
        for window_left in [-1, 0, 4] {
            let base = DecodeOptions { sm_scale: Some(0.7), logits_soft_cap: 2.0, window_left, kv_dtype: None };
            let want = decode(&shape, &k, &v, &table, &q, 6, &base);
            for causal in [false, true] {
                let opts = PrefillOptions {
                    causal,
                    sm_scale: base.sm_scale,
                    logits_soft_cap: base.logits_soft_cap,
                    window_left,
                    kv_dtype: None,
                    head_dim_vo: None,
                };
                assert_eq!(prefill(&shape, &k, &v, &table, &[0, 1, 2, 3], &q, 6, &opts), want, "{opts:?}");
            }
        }
    }

    #[test]
    fn ragged_qk_vo_with_equal_dims_is_prefill_over_one_token_pages() {
        let value = |i: usize| ((i * 7919) % 201) as f32 / 100.0 - 1.0;
        let (kv_indptr, qo_indptr) = ([0u32, 5, 5, 12], [0u32, 3, 4, 6]);
        let (heads, kv_heads, dim) = (4, 2, 8);
        let k: Vec<f32> = (0..12 * kv_heads * dim).map(value).collect();
        let v: Vec<f32> = (0..12 * kv_heads * dim).map(|i| value(i + 3)).collect();
        let q: Vec<f32> = (0..6 * heads * dim).map(|i| value(2 * i + 1)).collect();
        let shape =
            CacheShape { num_pages: 12, page_size: 1, num_kv_heads: kv_heads, head_dim: dim, layout: KvLayout::Nhd };
        let table =
            PageTable { kv_indptr: kv_indptr.to_vec(), kv_indices: (0..12).collect(), kv_last_page_len: vec![1, 0, 1] };
        for causal in [false, true] {
            let opts = PrefillOptions { causal, logits_soft_cap: 3.0, window_left: 2, ..Default::default() };
            let want = prefill(&shape, &k, &v, &table, &qo_indptr, &q, heads, &opts);
            let got = prefill_ragged_qk_vo(&q, &k, &v, &qo_indptr, &kv_indptr, (heads, kv_heads), (dim, dim), &opts);
            assert_eq!(got, want, "causal {causal}");
        }
    }

    #[test]
    fn a_sink_is_a_key_of_value_zero_and_minus_infinity_is_none() {
        // Keys with values 1, 4 and logits 0, ln 2 (sm_scale 1, q = 1, one head); sink ln 3:
        // weights 1, 2 and 3 over a sum of 6, the sink's value zero.
        let shape = CacheShape { num_pages: 2, page_size: 1, num_kv_heads: 1, head_dim: 1, layout: KvLayout::Nhd };
        let (k, v) = (vec![0.0f32, (2.0f64).ln() as f32], vec![1.0f32, 4.0]);
        let opts = DecodeOptions { sm_scale: Some(1.0), ..Default::default() };
        let table = PageTable { kv_indptr: vec![0, 2, 2], kv_indices: vec![0, 1], kv_last_page_len: vec![1, 0] };
        let scales = KvScales::default();
        let sink = [(3.0f64).ln() as f32];
        let (out, lse) = decode_with_sinks(&shape, &k, &v, scales, &table, &[1.0f32, 1.0], 1, &opts, Some(&sink));
        assert!((out[0] - 9.0 / 6.0).abs() < 1e-6 && (lse[0] - 6.0f64.log2()).abs() < 1e-6, "{out:?} {lse:?}");
        // An empty sequence: zero output, the sink as LSE.
        assert!(out[1] == 0.0 && (lse[1] - 3.0f64.log2()).abs() < 1e-6, "{out:?} {lse:?}");
        let none =
            decode_with_sinks(&shape, &k, &v, scales, &table, &[1.0f32, 1.0], 1, &opts, Some(&[f32::NEG_INFINITY]));
        assert_eq!(none, decode(&shape, &k, &v, &table, &[1.0f32, 1.0], 1, &opts));
    }

    #[test]
    fn merging_two_halves_of_the_keys_gives_attention_over_all_of_them() {
        // Keys 0..3 with values 1, 4, 7 and logits 0, ln 2, 0 (sm_scale 1, q = 1, one head).
        let shape = CacheShape { num_pages: 3, page_size: 1, num_kv_heads: 1, head_dim: 1, layout: KvLayout::Nhd };
        let (k, v) = (vec![0.0f32, (2.0f64).ln() as f32, 0.0], vec![1.0f32, 4.0, 7.0]);
        let opts = DecodeOptions { sm_scale: Some(1.0), ..Default::default() };
        let table = |pages: Vec<u32>| PageTable {
            kv_indptr: vec![0, pages.len() as u32],
            kv_last_page_len: vec![1],
            kv_indices: pages,
        };
        let (all, all_lse) = decode(&shape, &k, &v, &table(vec![0, 1, 2]), &[1.0f32], 1, &opts);
        let (a, a_lse) = decode(&shape, &k, &v, &table(vec![0]), &[1.0f32], 1, &opts);
        let (b, b_lse) = decode(&shape, &k, &v, &table(vec![1, 2]), &[1.0f32], 1, &opts);
        let states = [a[0] as f32, b[0] as f32];
        let lses = [a_lse[0] as f32, b_lse[0] as f32];
        let (merged, lse) = merge_states(&states, &lses, 2, 1, 1);
        assert!((merged[0] - all[0]).abs() < 1e-6 && (lse[0] - all_lse[0]).abs() < 1e-6, "{merged:?} {lse:?}");
        // An empty state changes nothing; all empty gives zero and −∞.
        let (same, _) = merge_states(&[states[0], 5.0], &[lses[0], f32::NEG_INFINITY], 2, 1, 1);
        assert!((same[0] - a[0]).abs() < 1e-6);
        assert_eq!(
            merge_states(&[3.0f32, 5.0], &[f32::NEG_INFINITY; 2], 2, 1, 1),
            (vec![0.0], vec![f64::NEG_INFINITY])
        );
    }
}
