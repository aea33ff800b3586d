//! Operations on the paged cache that are not attention: copies between pages and contiguous
//! ragged K/V (gather, scatter, append), and rotary position embeddings (alone, or fused into
//! the append), over the plan core.
pub(crate) mod page_copy;
pub(crate) mod rope;
