//! Paged KV addressing, written once for every kernel: page-table lookups and the layout's
//! strides.
use crate::abi::PageLayout;

impl PageLayout {
    /// Vector offset of `(page, slot)`'s first head in the page pool.
    #[inline(always)]
    pub fn token_offset(&self, page: u32, slot: u32) -> u64 {
        page as u64 * self.page_stride + slot as u64 * self.slot_stride as u64
    }

    /// Vector offset, relative to `token_offset`, of vector `v` of a token's `[head][dim]` row.
    #[inline(always)]
    pub fn vec_offset(&self, v: u32) -> u32 {
        let (head, d) = self.head_vecs.divmod(v);
        head * self.head_stride + d
    }
}

/// A batch's page table on the device (FlashInfer's `kv_indptr`, `kv_indices`).
#[derive(Clone, Copy)]
pub struct PageTable {
    pub indptr: *const u32,
    pub indices: *const u32,
}

impl PageTable {
    /// Physical page holding position `pos` of sequence `seq`, and the slot within it.
    ///
    /// # Safety
    /// The host validated the table: `pos < kv_len(seq)`.
    #[inline(always)]
    pub unsafe fn locate(&self, layout: &PageLayout, seq: u32, pos: u32) -> (u32, u32) {
        let (page_in_seq, slot) = layout.page_size.divmod(pos);
        let page = *self.indices.add((*self.indptr.add(seq as usize) + page_in_seq) as usize);
        (page, slot)
    }
}

/// Index `s` with `indptr[s] <= row < indptr[s + 1]`, skipping empty sequences.
///
/// # Safety
/// `indptr` has `len` monotone entries and `indptr[0] <= row < indptr[len - 1]`.
#[inline(always)]
pub unsafe fn sequence_of_row(indptr: *const u32, len: u32, row: u32) -> u32 {
    // Invariant: indptr[lo] <= row < indptr[hi].
    let (mut lo, mut hi) = (0u32, len - 1);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if *indptr.add(mid as usize) <= row {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}
