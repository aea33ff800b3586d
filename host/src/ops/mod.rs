//! Operations on the paged cache that are not attention: copies between pages and contiguous
//! ragged K/V (gather, scatter, append), over the plan core.
pub(crate) mod page_copy;
