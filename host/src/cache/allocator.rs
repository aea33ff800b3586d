//! A sequence allocator for serving engines: pages handed out from a fixed pool, shared between
//! forked sequences by reference count, with copy-on-write of a shared, partly filled last page.
//! It only does bookkeeping on the host; the page copies it asks for are applied to the cache
//! with [`PagedKvCache::copy_pages`](crate::PagedKvCache::copy_pages).
use std::collections::BTreeMap;

use super::page_table::PageTable;
use crate::error::{Error, Result};

/// Names a sequence of a [`SequenceAllocator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(u64);

impl SeqId {
    /// The id as a number (what [`Error::UnknownSequence`] reports).
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Copy page `src`'s contents to page `dst` (every layer, K and V) before writing `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCopy {
    /// The page to copy from.
    pub src: u32,
    /// The page to copy to.
    pub dst: u32,
}

#[derive(Clone, Debug, Default)]
struct Sequence {
    pages: Vec<u32>,
    len: usize,
}

/// Hands out the pages of a fixed pool to sequences, sharing pages between forks by reference
/// count.
///
/// ```
/// use ferrinfer::SequenceAllocator;
///
/// let mut alloc = SequenceAllocator::new(64, 16)?;
/// let parent = alloc.create();
/// assert!(alloc.reserve(parent, 20)?.is_empty()); // 2 pages, nothing to copy
/// let child = alloc.fork(parent)?; // shares both pages
/// // The child's next token lands in the shared, partly filled last page: it gets a copy.
/// let copies = alloc.reserve(child, 1)?;
/// assert_eq!(copies.len(), 1);
/// let table = alloc.page_table(&[parent, child])?; // FlashInfer's three arrays
/// assert_eq!(table.kv_lens(16), [20, 21]);
/// alloc.free(parent)?;
/// # Ok::<(), ferrinfer::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SequenceAllocator {
    page_size: usize,
    /// References to each page; 0 means free.
    refcount: Vec<u32>,
    /// Free pages, taken from the end.
    free: Vec<u32>,
    sequences: BTreeMap<SeqId, Sequence>,
    next_id: u64,
}

impl SequenceAllocator {
    /// A pool of `num_pages` pages of `page_size` tokens, all free.
    pub fn new(num_pages: usize, page_size: usize) -> Result<Self> {
        if page_size == 0 {
            return Err(Error::ZeroPageSize);
        }
        if num_pages > u32::MAX as usize {
            return Err(Error::TooLarge { what: "num_pages", value: num_pages, max: u32::MAX as usize });
        }
        Ok(SequenceAllocator {
            page_size,
            refcount: vec![0; num_pages],
            free: (0..num_pages as u32).rev().collect(),
            sequences: BTreeMap::new(),
            next_id: 0,
        })
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages that no sequence holds.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// A new, empty sequence.
    pub fn create(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, Sequence::default());
        id
    }

    fn sequence(&self, id: SeqId) -> Result<&Sequence> {
        self.sequences.get(&id).ok_or(Error::UnknownSequence { id: id.0 })
    }

    /// Tokens in sequence `id`.
    pub fn len(&self, id: SeqId) -> Result<usize> {
        Ok(self.sequence(id)?.len)
    }

    /// References to `page` (0 when free).
    pub fn page_refcount(&self, page: u32) -> u32 {
        self.refcount.get(page as usize).copied().unwrap_or(0)
    }

    /// Grows sequence `id` by `n` tokens, taking pages as needed. When its last page is partly
    /// filled and shared with another sequence (after a fork), the sequence gets a private copy
    /// of it first: the returned copies must be applied to the cache before the new tokens are
    /// written. On error (too few free pages) nothing changes.
    pub fn reserve(&mut self, id: SeqId, n: usize) -> Result<Vec<PageCopy>> {
        let ps = self.page_size;
        let seq = self.sequence(id)?;
        let (len, last) = (seq.len, seq.pages.last().copied());
        let shared_partial_last = match last {
            Some(p) => n > 0 && len % ps != 0 && self.refcount[p as usize] > 1,
            None => false,
        };
        let new_pages = (len + n).div_ceil(ps) - len.div_ceil(ps);
        let needed = new_pages + shared_partial_last as usize;
        if needed > self.free.len() {
            return Err(Error::OutOfPages { needed, free: self.free.len() });
        }
        let fresh = self.free.split_off(self.free.len() - needed);
        for &p in &fresh {
            self.refcount[p as usize] = 1;
        }
        let mut fresh = fresh.into_iter();
        let mut copies = Vec::new();
        let seq = self.sequences.get_mut(&id).ok_or(Error::UnknownSequence { id: id.0 })?;
        if shared_partial_last {
            if let (Some(src), Some(dst)) = (seq.pages.pop(), fresh.next()) {
                self.refcount[src as usize] -= 1;
                seq.pages.push(dst);
                copies.push(PageCopy { src, dst });
            }
        }
        seq.pages.extend(fresh);
        seq.len += n;
        Ok(copies)
    }

    /// A new sequence holding the same tokens as `parent`, sharing all of its pages.
    pub fn fork(&mut self, parent: SeqId) -> Result<SeqId> {
        let child = self.sequence(parent)?.clone();
        for &p in &child.pages {
            self.refcount[p as usize] += 1;
        }
        let id = self.create();
        self.sequences.insert(id, child);
        Ok(id)
    }

    /// Ends sequence `id`; each of its pages returns to the pool when no sequence holds it.
    pub fn free(&mut self, id: SeqId) -> Result<()> {
        let seq = self.sequences.remove(&id).ok_or(Error::UnknownSequence { id: id.0 })?;
        for p in seq.pages {
            self.refcount[p as usize] -= 1;
            if self.refcount[p as usize] == 0 {
                self.free.push(p);
            }
        }
        Ok(())
    }

    /// The page table of `ids`, in that order.
    pub fn page_table(&self, ids: &[SeqId]) -> Result<PageTable> {
        let mut table = PageTable { kv_indptr: vec![0], ..Default::default() };
        for &id in ids {
            let seq = self.sequence(id)?;
            table.kv_indices.extend(&seq.pages);
            table.kv_indptr.push(table.kv_indices.len() as u32);
            table.kv_last_page_len.push(if seq.len == 0 { 0 } else { ((seq.len - 1) % self.page_size + 1) as u32 });
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_takes_pages_as_the_sequence_grows() {
        let mut a = SequenceAllocator::new(10, 4).unwrap();
        let s = a.create();
        assert_eq!(a.reserve(s, 5).unwrap(), vec![]);
        assert_eq!((a.len(s).unwrap(), a.free_pages()), (5, 8));
        a.reserve(s, 3).unwrap();
        assert_eq!(a.free_pages(), 8, "8 tokens fit in 2 pages");
        a.reserve(s, 1).unwrap();
        let t = a.page_table(&[s]).unwrap();
        assert_eq!((t.kv_indptr, t.kv_last_page_len), (vec![0, 3], vec![1]));
    }

    #[test]
    fn fork_shares_full_pages_and_copies_a_partial_last_page_on_write() {
        let mut a = SequenceAllocator::new(10, 4).unwrap();
        let parent = a.create();
        a.reserve(parent, 6).unwrap(); // one full page, one with 2 tokens
        let child = a.fork(parent).unwrap();
        let shared = a.page_table(&[parent]).unwrap().kv_indices;
        assert_eq!(a.page_table(&[child]).unwrap().kv_indices, shared);
        assert!(shared.iter().all(|&p| a.page_refcount(p) == 2));

        let copies = a.reserve(child, 1).unwrap();
        let child_pages = a.page_table(&[child]).unwrap().kv_indices;
        assert_eq!(copies, vec![PageCopy { src: shared[1], dst: child_pages[1] }]);
        assert_eq!(child_pages[0], shared[0], "the full page stays shared");
        assert_eq!((a.page_refcount(shared[0]), a.page_refcount(shared[1])), (2, 1));
        // The parent now owns its partial page alone: it appends in place.
        assert_eq!(a.reserve(parent, 1).unwrap(), vec![]);
        assert_eq!(a.page_table(&[parent]).unwrap().kv_indices, shared);
    }

    #[test]
    fn fork_at_a_page_boundary_needs_no_copy() {
        let mut a = SequenceAllocator::new(10, 4).unwrap();
        let parent = a.create();
        a.reserve(parent, 8).unwrap();
        let child = a.fork(parent).unwrap();
        assert_eq!(a.reserve(child, 3).unwrap(), vec![]);
        assert_eq!(a.free_pages(), 7);
    }

    #[test]
    fn free_returns_pages_when_the_last_reference_goes() {
        let mut a = SequenceAllocator::new(6, 2).unwrap();
        let parent = a.create();
        a.reserve(parent, 4).unwrap();
        let child = a.fork(parent).unwrap();
        a.reserve(child, 2).unwrap();
        assert_eq!(a.free_pages(), 3);
        a.free(parent).unwrap();
        assert_eq!(a.free_pages(), 3, "the child still holds the shared pages");
        a.free(child).unwrap();
        assert_eq!(a.free_pages(), 6);
        assert!(matches!(a.len(child), Err(Error::UnknownSequence { .. })));
        assert!(matches!(a.free(child), Err(Error::UnknownSequence { .. })));
    }

    #[test]
    fn exhaustion_is_an_error_that_changes_nothing() {
        let mut a = SequenceAllocator::new(3, 4).unwrap();
        let s = a.create();
        a.reserve(s, 6).unwrap();
        let child = a.fork(s).unwrap();
        let before = (a.page_table(&[s, child]).unwrap(), a.free_pages());
        // The child needs a copy of the shared partial page plus 2 new pages; 1 is free.
        let e = a.reserve(child, 7).unwrap_err();
        assert!(matches!(e, Error::OutOfPages { needed: 3, free: 1 }), "{e}");
        assert_eq!((a.page_table(&[s, child]).unwrap(), a.free_pages()), before);
        assert_eq!(a.len(child).unwrap(), 6);
    }

    #[test]
    fn zero_page_size_is_rejected() {
        assert!(matches!(SequenceAllocator::new(4, 0), Err(Error::ZeroPageSize)));
    }

    /// Random create/reserve/fork/free sequences against the invariants: every page's count is
    /// the number of sequences holding it, free pages are exactly the unreferenced ones, each
    /// sequence holds ceil(len / page_size) pages, and the pages a reserve will write are held
    /// by that sequence alone.
    #[test]
    fn random_operations_keep_the_books_straight() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(3);
        for round in 0..200 {
            let page_size = r.random_range(1..6);
            let mut a = SequenceAllocator::new(r.random_range(1..24), page_size).unwrap();
            let mut live: Vec<SeqId> = Vec::new();
            for _ in 0..60 {
                match r.random_range(0..4) {
                    0 => live.push(a.create()),
                    1 if !live.is_empty() => {
                        let s = live[r.random_range(0..live.len())];
                        let (before, n) = (a.len(s).unwrap(), r.random_range(0..9));
                        if a.reserve(s, n).is_ok() {
                            let table = a.page_table(&[s]).unwrap();
                            for pos in before..before + n {
                                let (page, _) = table.locate(0, pos, page_size);
                                assert_eq!(a.page_refcount(page as u32), 1, "round {round}: write to a shared page");
                            }
                        }
                    }
                    2 if !live.is_empty() => live.push(a.fork(live[r.random_range(0..live.len())]).unwrap()),
                    3 if !live.is_empty() => a.free(live.swap_remove(r.random_range(0..live.len()))).unwrap(),
                    _ => {}
                }
                let table = a.page_table(&live).unwrap();
                table.validate(page_size, a.refcount.len()).unwrap();
                let mut held = vec![0u32; a.refcount.len()];
                for &p in &table.kv_indices {
                    held[p as usize] += 1;
                }
                assert_eq!(held, a.refcount, "round {round}");
                let mut free = a.free.clone();
                free.sort_unstable();
                let unreferenced: Vec<u32> = (0..held.len() as u32).filter(|&p| held[p as usize] == 0).collect();
                assert_eq!(free, unreferenced, "round {round}");
                for (i, &s) in live.iter().enumerate() {
                    let pages = table.kv_indptr[i + 1] - table.kv_indptr[i];
                    assert_eq!(pages as usize, a.len(s).unwrap().div_ceil(page_size), "round {round}");
                }
            }
        }
    }
}
