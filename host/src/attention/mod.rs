//! The attention layer: batch decode, batch prefill (paged and ragged), cascade decode and
//! merging attention states, each in its own file over the plan core, and what decode and
//! prefill share: the checks of heads and options, and how long sequences are split.
pub(crate) mod cascade;
pub(crate) mod decode;
pub(crate) mod merge;
pub(crate) mod mla;
pub(crate) mod prefill;

use crate::cache::layout::CacheShape;
use crate::error::{Error, Result};
use crate::runtime::dtype::DType;
use crate::runtime::kernels::attention_head_dims;

/// Checks that the attention kernels are built for `head_dim` (queries, keys and values alike).
pub(crate) fn check_head_dim(head_dim: usize) -> Result<()> {
    let supported = attention_head_dims();
    if !supported.contains(&head_dim) {
        return Err(Error::UnsupportedHeadDim { head_dim, supported });
    }
    Ok(())
}

/// Checks the cache shape, the query heads and the options every attention kernel takes (the
/// head dim is the caller's to check), and returns the group size (query heads per KV head) and
/// the resolved `sm_scale`.
pub(crate) fn check_heads_and_options(
    shape: &CacheShape,
    num_qo_heads: usize,
    sm_scale: Option<f32>,
    logits_soft_cap: f32,
    window_left: i32,
) -> Result<(usize, f32)> {
    shape.validate(DType::F16)?;
    if num_qo_heads == 0 || !num_qo_heads.is_multiple_of(shape.num_kv_heads) {
        return Err(Error::GroupSize { num_qo_heads, num_kv_heads: shape.num_kv_heads });
    }
    let sm_scale = sm_scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
    if !sm_scale.is_finite() || !logits_soft_cap.is_finite() || logits_soft_cap < 0.0 {
        return Err(Error::BadOption { what: "sm_scale and logits_soft_cap must be finite, the cap ≥ 0" });
    }
    if window_left < -1 {
        return Err(Error::BadOption { what: "window_left must be −1 (none) or ≥ 0" });
    }
    Ok((num_qo_heads / shape.num_kv_heads, sm_scale))
}

/// The shortest chunk (a multiple of the kernel's `tile` keys) that splits the sequences of
/// `lens` into at most `capacity / blocks_per_item` work items and no sequence into more than
/// `max_parts`, or `None` when the unsplit batch already fills `capacity` blocks. One full
/// wave of equal blocks is what a bandwidth-bound kernel wants: more items only add merge
/// work, fewer leave SMs idle.
pub(crate) fn split_chunk(
    lens: &[usize],
    tile: u32,
    blocks_per_item: usize,
    capacity: usize,
    max_parts: usize,
) -> Option<usize> {
    let tile = tile as usize;
    let items_for = |chunk: usize| lens.iter().map(|&len| len.div_ceil(chunk).max(1)).sum::<usize>();
    let max_items = capacity / blocks_per_item;
    let longest = lens.iter().copied().max().unwrap_or(0);
    if lens.is_empty() || items_for(longest.max(1)) >= max_items {
        return None;
    }
    // items_for falls as the chunk grows: binary search the smallest chunk (in tiles) that fits.
    let (mut lo, mut hi) = (longest.div_ceil(tile).div_ceil(max_parts).max(1), longest.div_ceil(tile).max(1));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if items_for(mid * tile) <= max_items {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo * tile)
}
