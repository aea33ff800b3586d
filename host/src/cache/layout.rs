//! The shape of a paged KV cache and where each element lives in it.
use crate::error::{Error, Result};
use crate::runtime::abi::{FastDiv, TokenLayout};
use crate::runtime::dtype::DType;

/// Order of a page's dimensions (FlashInfer's `kv_layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvLayout {
    /// `[page][slot][head][dim]`: a token's heads are contiguous.
    Nhd,
    /// `[page][head][slot][dim]`: a head's tokens are contiguous.
    Hnd,
}

/// Dimensions of one K (or V) page pool: `num_pages × page_size × num_kv_heads × head_dim`.
///
/// ```
/// use ferrinfer::{CacheShape, DType, KvLayout};
///
/// // Any page size, chosen at run time: 7 tokens per page here.
/// let shape = CacheShape { num_pages: 1000, page_size: 7, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
/// shape.validate(DType::F16)?;
/// assert_eq!(shape.page_elems(), 7 * 8 * 128);
/// # Ok::<(), ferrinfer::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    /// Pages in the pool.
    pub num_pages: usize,
    /// Tokens (slots) per page.
    pub page_size: usize,
    /// KV heads per token.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Order of a page's dimensions.
    pub layout: KvLayout,
}

/// Positions, page indices and vector offsets inside a kernel are 32-bit (and run-time
/// division is exact below 2^31), so counts that feed them stay under this.
pub const MAX_INDEX: usize = FastDiv::MAX_DIVIDEND as usize;

impl std::fmt::Display for CacheShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layout = match self.layout {
            KvLayout::Nhd => "NHD",
            KvLayout::Hnd => "HND",
        };
        write!(
            f,
            "{} pages × {} tokens × {} KV heads × {} dims, {layout}",
            self.num_pages, self.page_size, self.num_kv_heads, self.head_dim
        )
    }
}

impl CacheShape {
    /// Checks the dimensions for element type `dtype`: all non-zero, rows a whole number of
    /// 16-byte vectors, and every count within the kernels' 32-bit indexing.
    pub fn validate(&self, dtype: DType) -> Result<()> {
        if self.page_size == 0 {
            return Err(Error::ZeroPageSize);
        }
        for (what, v) in
            [("num_pages", self.num_pages), ("num_kv_heads", self.num_kv_heads), ("head_dim", self.head_dim)]
        {
            if v == 0 {
                return Err(Error::ZeroDimension { what });
            }
        }
        let bytes = self.head_dim * dtype.size_bytes();
        if !bytes.is_multiple_of(16) {
            return Err(Error::UnalignedHeadDim { head_dim: self.head_dim, dtype: dtype.name(), bytes });
        }
        let checks = [
            ("num_pages", self.num_pages),
            ("page_size", self.page_size),
            ("num_kv_heads × head_dim", self.num_kv_heads * self.head_dim),
            ("page_size × num_kv_heads × head_dim", self.page_elems()),
            // The attention kernels address a pool in head rows (`head_dim` elements).
            (
                "num_pages × page_size × num_kv_heads (head rows of a pool)",
                self.num_pages * self.page_size * self.num_kv_heads,
            ),
        ];
        for (what, value) in checks {
            if value > MAX_INDEX {
                return Err(Error::TooLarge { what, value, max: MAX_INDEX });
            }
        }
        Ok(())
    }

    /// Elements in one token's `[head][dim]` row.
    pub fn token_elems(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Elements in one page.
    pub fn page_elems(&self) -> usize {
        self.page_size * self.token_elems()
    }

    /// Elements in the whole pool.
    pub fn pool_elems(&self) -> usize {
        self.num_pages * self.page_elems()
    }

    /// Elements between consecutive slots of a page, and between consecutive heads of a token:
    /// the layout, written once for the reference, the plans and the kernels' parameters.
    pub fn strides(&self) -> (usize, usize) {
        match self.layout {
            KvLayout::Nhd => (self.num_kv_heads * self.head_dim, self.head_dim),
            KvLayout::Hnd => (self.head_dim, self.page_size * self.head_dim),
        }
    }

    /// Element index of `(page, slot, head, d)` in the pool.
    pub fn element_index(&self, page: usize, slot: usize, head: usize, d: usize) -> usize {
        let (slot_stride, head_stride) = self.strides();
        page * self.page_elems() + slot * slot_stride + head * head_stride + d
    }

    /// The kernels' view of a token's row, in 16-byte vectors of `dtype`. Call after `validate`.
    pub(crate) fn token_layout(&self, dtype: DType) -> TokenLayout {
        let elems_per_vec = 16 / dtype.size_bytes();
        let head_stride = (self.strides().1 / elems_per_vec) as u32;
        TokenLayout { head_stride, head_vecs: FastDiv::new((self.head_dim / elems_per_vec) as u32) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_division_is_exact() {
        let divisors = (1..=1100u32).chain([4095, 4096, 4097, 65535, 65536, 1 << 20, (1 << 31) - 1]);
        for d in divisors {
            let f = FastDiv::new(d);
            let dividends = (0..3000u32).chain([d - 1, d, d + 1, 2 * d + 1, MAX_INDEX as u32, MAX_INDEX as u32 - 1]);
            for n in dividends.filter(|&n| n <= FastDiv::MAX_DIVIDEND) {
                assert_eq!(f.divmod(n), (n / d, n % d), "{n} / {d}");
            }
        }
    }

    #[test]
    fn pools_beyond_32_bit_head_rows_are_refused() {
        // 2^19 pages × 256 tokens × 16 heads = 2^31 head rows: one past what kernels address.
        let shape =
            CacheShape { num_pages: 1 << 19, page_size: 256, num_kv_heads: 16, head_dim: 64, layout: KvLayout::Nhd };
        let err = shape.validate(DType::F16).unwrap_err();
        assert!(matches!(err, Error::TooLarge { what, .. } if what.contains("head rows")), "{err}");
        assert!(CacheShape { num_pages: (1 << 19) - 1, ..shape }.validate(DType::F16).is_ok());
    }

    #[test]
    fn vector_layout_matches_element_index() {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            let s = CacheShape { num_pages: 3, page_size: 5, num_kv_heads: 2, head_dim: 16, layout };
            let t = s.token_layout(DType::F16); // 2 vectors per head row
            for (page, slot, head, vec) in [(0, 0, 0, 0), (2, 4, 1, 1), (1, 3, 0, 1)] {
                let v = t.vec_offset(head as u32 * 2 + vec as u32) as usize;
                assert_eq!(
                    s.element_index(page, slot, 0, 0) + v * 8,
                    s.element_index(page, slot, head, vec * 8),
                    "{layout:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_rows_that_are_not_whole_vectors() {
        let s = CacheShape { num_pages: 1, page_size: 1, num_kv_heads: 1, head_dim: 12, layout: KvLayout::Nhd };
        assert!(matches!(s.validate(DType::F16), Err(Error::UnalignedHeadDim { head_dim: 12, .. })));
        assert!(s.validate(DType::F32).is_ok());
    }
}
