//! A batch's page table in FlashInfer's format, validated before anything reaches the GPU.
use super::layout::MAX_INDEX;
use crate::error::{Error, Result};

/// Sequence `i` of the batch holds pages `kv_indices[kv_indptr[i]..kv_indptr[i + 1]]`, in
/// order; its last page holds `kv_last_page_len[i]` tokens, so
/// `kv_len = (pages − 1) · page_size + last_page_len`. An empty sequence has no pages and a
/// `last_page_len` of 0. The same page may appear in several sequences (a shared prefix).
///
/// ```
/// use ferrinfer::{Error, PageTable};
///
/// // Two sequences in pages of 16: 20 tokens on pages 3, 0 and 5 tokens on page 7.
/// let table = PageTable { kv_indptr: vec![0, 2, 3], kv_indices: vec![3, 0, 7], kv_last_page_len: vec![4, 5] };
/// table.validate(16, 8)?;
/// assert_eq!(table.kv_lens(16), [20, 5]);
/// // A last page claiming more tokens than a page holds is refused, naming the value.
/// let bad = PageTable { kv_last_page_len: vec![17, 5], ..table };
/// assert!(matches!(bad.validate(16, 8), Err(Error::LastPageLen { seq: 0, len: 17, .. })));
/// # Ok::<(), ferrinfer::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageTable {
    /// Where each sequence's pages start in `kv_indices`, then its length: `batch_size + 1` entries.
    pub kv_indptr: Vec<u32>,
    /// Page indices of every sequence, laid end to end.
    pub kv_indices: Vec<u32>,
    /// Tokens in each sequence's last page; 0 for a sequence with no pages.
    pub kv_last_page_len: Vec<u32>,
}

impl PageTable {
    /// Sequences in the batch (entries of `kv_last_page_len`).
    pub fn batch_size(&self) -> usize {
        self.kv_last_page_len.len()
    }

    /// Checks the table against a cache of `num_pages` pages of `page_size` tokens. After this,
    /// every position `< kv_len(i)` of every sequence maps to a slot inside the pool.
    pub fn validate(&self, page_size: usize, num_pages: usize) -> Result<()> {
        if page_size == 0 {
            return Err(Error::ZeroPageSize);
        }
        let batch = self.kv_last_page_len.len();
        validate_indptr("kv_indptr", &self.kv_indptr, batch)?;
        let end = self.kv_indptr[batch];
        if end as usize != self.kv_indices.len() {
            return Err(Error::IndptrEnd { end, len: self.kv_indices.len() });
        }
        // A serving engine validates every step's whole table: a branch-free pass the compiler
        // vectorises (on any x86-64), then a search for the offending entry only when there is one.
        let limit = u32::try_from(num_pages).unwrap_or(u32::MAX);
        if self.kv_indices.iter().fold(0u32, |bad, &p| bad | (p >= limit) as u32) != 0 {
            let (index, &page) = self
                .kv_indices
                .iter()
                .enumerate()
                .find(|(_, &p)| p as usize >= num_pages)
                .expect("an entry is out of range");
            return Err(Error::PageOutOfRange { index, page, num_pages });
        }
        for (seq, &len) in self.kv_last_page_len.iter().enumerate() {
            let pages = self.kv_indptr[seq + 1] - self.kv_indptr[seq];
            if pages == 0 && len != 0 {
                return Err(Error::LastPageLenOfEmpty { seq, len });
            }
            if pages > 0 && (len == 0 || len as usize > page_size) {
                return Err(Error::LastPageLen { seq, len, page_size });
            }
            let kv_len = self.kv_len_unchecked(seq, page_size);
            if kv_len > MAX_INDEX {
                return Err(Error::TooLarge { what: "kv_len", value: kv_len, max: MAX_INDEX });
            }
        }
        let total = self.total_tokens_unchecked(page_size);
        if total > MAX_INDEX {
            return Err(Error::TooLarge { what: "total tokens in the batch", value: total, max: MAX_INDEX });
        }
        Ok(())
    }

    /// Checks that no two writes land in the same slot when each sequence `i` writes its
    /// positions `starts[i]..kv_len(i)`: sequences may share pages they only read (a prefix),
    /// but a slot written twice in one launch is a race. Call on a validated table.
    pub fn validate_disjoint_writes(&self, page_size: usize, starts: &[usize]) -> Result<()> {
        // Each sequence writes a contiguous slot range in each page it touches.
        let mut ranges: Vec<(u32, usize, usize, usize)> = Vec::new();
        for (seq, (kv_len, &start)) in self.kv_lens(page_size).into_iter().zip(starts).enumerate() {
            if start >= kv_len {
                continue;
            }
            for j in start / page_size..=(kv_len - 1) / page_size {
                let page = self.kv_indices[self.kv_indptr[seq] as usize + j];
                let lo = start.max(j * page_size) - j * page_size;
                let hi = kv_len.min((j + 1) * page_size) - j * page_size;
                ranges.push((page, lo, hi, seq));
            }
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            let ((page, _, hi, first_seq), (next_page, lo, _, second_seq)) = (w[0], w[1]);
            if page == next_page && lo < hi {
                return Err(Error::OverlappingWrites { page, slot: lo, first_seq, second_seq });
            }
        }
        Ok(())
    }

    fn kv_len_unchecked(&self, seq: usize, page_size: usize) -> usize {
        let pages = (self.kv_indptr[seq + 1] - self.kv_indptr[seq]) as usize;
        match pages {
            0 => 0,
            n => (n - 1) * page_size + self.kv_last_page_len[seq] as usize,
        }
    }

    fn total_tokens_unchecked(&self, page_size: usize) -> usize {
        (0..self.batch_size()).map(|s| self.kv_len_unchecked(s, page_size)).sum()
    }

    /// Tokens in each sequence. Call on a validated table.
    pub fn kv_lens(&self, page_size: usize) -> Vec<usize> {
        (0..self.batch_size()).map(|s| self.kv_len_unchecked(s, page_size)).collect()
    }

    /// Ragged row offsets of the batch's tokens laid end to end (`batch + 1` entries; FlashInfer's
    /// `kv_indptr` of a ragged KV tensor). Call on a validated table.
    pub fn token_indptr(&self, page_size: usize) -> Vec<u32> {
        std::iter::once(0)
            .chain(self.kv_lens(page_size).into_iter().scan(0u32, |acc, n| {
                *acc += n as u32;
                Some(*acc)
            }))
            .collect()
    }

    /// The page and slot of position `pos` of sequence `seq`.
    pub fn locate(&self, seq: usize, pos: usize, page_size: usize) -> (usize, usize) {
        let page = self.kv_indices[self.kv_indptr[seq] as usize + pos / page_size] as usize;
        (page, pos % page_size)
    }
}

/// Checks a CSR offset array of `batch + 1` entries: starts at 0, never decreases.
pub(crate) fn validate_indptr(what: &'static str, indptr: &[u32], batch: usize) -> Result<()> {
    if indptr.is_empty() {
        return Err(Error::EmptyIndptr { what });
    }
    if indptr.len() != batch + 1 {
        return Err(Error::IndptrLength { what, got: indptr.len(), batch });
    }
    if indptr[0] != 0 {
        return Err(Error::IndptrStart { what, first: indptr[0] });
    }
    for (index, w) in indptr.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::IndptrNotMonotone { what, index: index + 1, prev: w[0], next: w[1] });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(indptr: &[u32], indices: &[u32], last: &[u32]) -> PageTable {
        PageTable { kv_indptr: indptr.into(), kv_indices: indices.into(), kv_last_page_len: last.into() }
    }

    #[test]
    fn accepts_shared_pages_and_empty_sequences() {
        let t = table(&[0, 2, 2, 4], &[3, 1, 3, 0], &[5, 0, 1]);
        t.validate(7, 4).unwrap();
        assert_eq!(t.kv_lens(7), vec![12, 0, 8]);
        assert_eq!(t.token_indptr(7), vec![0, 12, 12, 20]);
        assert_eq!(t.locate(2, 7, 7), (0, 0));
    }

    #[test]
    fn rejects_zero_page_size() {
        assert!(matches!(table(&[0], &[], &[]).validate(0, 1), Err(Error::ZeroPageSize)));
    }

    #[test]
    fn rejects_empty_indptr() {
        assert!(matches!(table(&[], &[], &[]).validate(1, 1), Err(Error::EmptyIndptr { .. })));
    }

    #[test]
    fn rejects_indptr_of_wrong_length() {
        let e = table(&[0, 1], &[0], &[1, 1]).validate(4, 1).unwrap_err();
        assert!(matches!(e, Error::IndptrLength { what: "kv_indptr", got: 2, batch: 2 }), "{e}");
    }

    #[test]
    fn rejects_indptr_not_starting_at_zero() {
        let e = table(&[1, 2], &[0, 0], &[1]).validate(4, 1).unwrap_err();
        assert!(matches!(e, Error::IndptrStart { what: "kv_indptr", first: 1 }), "{e}");
    }

    #[test]
    fn rejects_decreasing_indptr() {
        let e = table(&[0, 2, 1], &[0, 0], &[1, 1]).validate(4, 1).unwrap_err();
        assert!(matches!(e, Error::IndptrNotMonotone { index: 2, prev: 2, next: 1, .. }), "{e}");
    }

    #[test]
    fn rejects_indptr_end_not_matching_indices() {
        let e = table(&[0, 1], &[0, 0], &[1]).validate(4, 1).unwrap_err();
        assert!(matches!(e, Error::IndptrEnd { end: 1, len: 2 }), "{e}");
    }

    #[test]
    fn rejects_page_index_out_of_range() {
        let e = table(&[0, 2], &[0, 9], &[1]).validate(4, 9).unwrap_err();
        assert!(matches!(e, Error::PageOutOfRange { index: 1, page: 9, num_pages: 9 }), "{e}");
        assert!(e.to_string().contains("kv_indices[1] = 9"));
    }

    #[test]
    fn rejects_last_page_len_zero_or_over_page_size() {
        let zero = table(&[0, 1], &[0], &[0]).validate(4, 1).unwrap_err();
        assert!(matches!(zero, Error::LastPageLen { seq: 0, len: 0, page_size: 4 }), "{zero}");
        let over = table(&[0, 1], &[0], &[5]).validate(4, 1).unwrap_err();
        assert!(matches!(over, Error::LastPageLen { seq: 0, len: 5, page_size: 4 }), "{over}");
    }

    #[test]
    fn rejects_last_page_len_of_empty_sequence() {
        let e = table(&[0, 0], &[], &[3]).validate(4, 1).unwrap_err();
        assert!(matches!(e, Error::LastPageLenOfEmpty { seq: 0, len: 3 }), "{e}");
    }

    #[test]
    fn rejects_last_page_len_length_mismatch_as_indptr_length() {
        let e = table(&[0, 1, 2], &[0, 0], &[1]).validate(4, 1).unwrap_err();
        assert!(matches!(e, Error::IndptrLength { got: 3, batch: 1, .. }), "{e}");
    }

    #[test]
    fn writes_to_a_shared_page_overlap() {
        // Both sequences hold page 3 as their first page: reading is fine, writing it twice is not.
        let t = table(&[0, 2, 4], &[3, 1, 3, 0], &[2, 2]);
        t.validate(4, 4).unwrap();
        let e = t.validate_disjoint_writes(4, &[0, 0]).unwrap_err();
        assert!(matches!(e, Error::OverlappingWrites { page: 3, slot: 0, first_seq: 0, second_seq: 1 }), "{e}");
        // Appending only past the shared page touches pages 1 and 0: disjoint.
        t.validate_disjoint_writes(4, &[4, 4]).unwrap();
    }

    #[test]
    fn a_page_listed_twice_in_one_sequence_overlaps_itself() {
        // One sequence that lists page 5 twice: positions 0 and 2 both land in slot 0 of it.
        let t = table(&[0, 2], &[5, 5], &[1]);
        t.validate(2, 6).unwrap();
        let e = t.validate_disjoint_writes(2, &[0]).unwrap_err();
        assert!(matches!(e, Error::OverlappingWrites { page: 5, first_seq: 0, second_seq: 0, .. }), "{e}");
        t.validate_disjoint_writes(2, &[2]).unwrap();
    }

    /// Random tables, many malformed: whatever `validate` accepts, an independent model finds
    /// in bounds, and whatever `validate_disjoint_writes` accepts writes no slot twice.
    #[test]
    fn accepted_tables_stay_in_bounds_and_accepted_writes_are_disjoint() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(17);
        let (mut accepted, mut disjoint) = (0, 0);
        for _ in 0..20_000 {
            let (page_size, num_pages) = (r.random_range(1..6usize), r.random_range(1..6usize));
            let batch = r.random_range(0..4usize);
            let mut indptr = vec![0u32];
            for _ in 0..batch {
                let step = r.random_range(0..3u32);
                indptr.push(indptr[indptr.len() - 1] + step);
            }
            if r.random_bool(0.1) {
                let i = r.random_range(0..indptr.len());
                indptr[i] = r.random_range(0..6);
            }
            let n = if r.random_bool(0.9) { indptr[indptr.len() - 1] as usize } else { r.random_range(0..6) };
            let t = PageTable {
                kv_indices: (0..n).map(|_| r.random_range(0..num_pages as u32 + 1)).collect(),
                kv_last_page_len: (0..batch + r.random_range(0..2) * r.random_range(0..2))
                    .map(|_| r.random_range(0..page_size as u32 + 2))
                    .collect(),
                kv_indptr: indptr,
            };
            if t.validate(page_size, num_pages).is_err() {
                continue;
            }
            accepted += 1;
            let starts: Vec<usize> = t.kv_lens(page_size).iter().map(|&l| r.random_range(0..=l)).collect();
            let mut written = std::collections::HashSet::new();
            let mut overlap = false;
            for (seq, &len) in t.kv_lens(page_size).iter().enumerate() {
                let pages = (t.kv_indptr[seq + 1] - t.kv_indptr[seq]) as usize;
                assert!(len <= pages * page_size && (pages == 0 || len > (pages - 1) * page_size), "{t:?}");
                for pos in 0..len {
                    let index = t.kv_indptr[seq] as usize + pos / page_size;
                    assert!(index < t.kv_indices.len(), "{t:?}");
                    let (page, slot) = t.locate(seq, pos, page_size);
                    assert!(page < num_pages && slot < page_size, "{t:?}");
                    if pos >= starts[seq] {
                        overlap |= !written.insert((page, slot));
                    }
                }
            }
            let verdict = t.validate_disjoint_writes(page_size, &starts);
            assert_eq!(verdict.is_ok(), !overlap, "{t:?} starts {starts:?}: {verdict:?}");
            disjoint += verdict.is_ok() as usize;
        }
        assert!(accepted > 1000 && disjoint > 500, "too few accepted cases: {accepted}, {disjoint}");
    }
}
