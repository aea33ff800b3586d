//! The kernel ABI: parameter blocks passed by value to the PTX entry points.
//!
//! This file is compiled into both crates (`kernels-gpu` includes it by path), so host and
//! device cannot disagree on a field's offset. It must stay `no_std`: plain `#[repr(C)]`
//! data and arithmetic on it.

/// Division by a divisor known only at run time, as a multiply-high, an add and a shift
/// (Granlund–Montgomery). Exact for every divisor ≥ 1 and every dividend below 2^31.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastDiv {
    pub divisor: u32,
    pub multiplier: u32,
    pub shift: u32,
}

impl FastDiv {
    /// Largest dividend `div` is exact for.
    pub const MAX_DIVIDEND: u32 = (1 << 31) - 1;

    /// # Panics
    /// On `divisor == 0` (callers validate first).
    pub const fn new(divisor: u32) -> Self {
        assert!(divisor > 0, "FastDiv by zero");
        // shift = ceil(log2(divisor)); multiplier = floor(2^32 · (2^shift − d) / d) + 1.
        let shift = 32 - (divisor - 1).leading_zeros();
        let multiplier = ((((1u64 << shift) - divisor as u64) << 32) / divisor as u64) as u32 + 1;
        FastDiv { divisor, multiplier, shift }
    }

    #[inline(always)]
    pub const fn div(&self, n: u32) -> u32 {
        let hi = ((n as u64 * self.multiplier as u64) >> 32) as u32;
        (hi + n) >> self.shift
    }

    /// `(n / divisor, n % divisor)`.
    #[inline(always)]
    pub const fn divmod(&self, n: u32) -> (u32, u32) {
        let q = self.div(n);
        (q, n - q * self.divisor)
    }
}

/// Where the 16-byte vectors of one page-table entry live, for either layout. Units are
/// 16-byte vectors, so every offset is a vector index into the page pool.
///
/// NHD: `[page][slot][head][dim]`: `slot_stride = heads·head_vecs`, `head_stride = head_vecs`.
/// HND: `[page][head][slot][dim]`: `slot_stride = head_vecs`, `head_stride = page_size·head_vecs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLayout {
    pub page_stride: u64,
    pub slot_stride: u32,
    pub head_stride: u32,
    pub page_size: FastDiv,
    /// 16-byte vectors in one head's row of `head_dim` elements.
    pub head_vecs: FastDiv,
}

/// Copy between paged K/V and contiguous ragged K/V (`[row][head][dim]`), in either direction.
///
/// Sequence `i` owns ragged rows `ragged_indptr[i]..ragged_indptr[i + 1]`; row `r` of it is
/// the token at position `first_pos[i] + r - ragged_indptr[i]` of the sequence, found through
/// `kv_indptr`/`kv_indices`. Gather: all positions, `first_pos = 0`. Append: the new tokens,
/// `first_pos = kv_len − append_len`. `blockIdx.y` picks K (0) or V (1).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PagedCopyParams {
    pub k_pages: u64,
    pub v_pages: u64,
    pub k_ragged: u64,
    pub v_ragged: u64,
    /// `*const u32`, `batch_size + 1` entries.
    pub kv_indptr: u64,
    /// `*const u32`.
    pub kv_indices: u64,
    /// `*const u32`, `batch_size + 1` entries; the last is `total_rows`.
    pub ragged_indptr: u64,
    /// `*const u32`, `batch_size` entries.
    pub first_pos: u64,
    pub layout: PageLayout,
    /// 16-byte vectors per ragged row (`num_heads · head_vecs`).
    pub row_vecs: FastDiv,
    pub batch_size: u32,
    pub total_rows: u32,
    /// Rows per block; the block's dynamic shared memory holds one `u64` per row.
    pub rows_per_block: u32,
}

/// Exercises the device helpers (`kernels-gpu/src/gpu`) so tests can compare them with the
/// host: thread `i` reads `input[i]` and writes `HELPER_OUTPUTS` values at `output[i * 10..]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HelperCheckParams {
    /// `*const f32`, one entry per thread.
    pub input: u64,
    /// `*mut f32`, `HELPER_OUTPUTS` entries per thread.
    pub output: u64,
    pub divisor: FastDiv,
}

/// Per input: exp2, log2(|x| + 1), rcp, f16 round trip, bf16 round trip, warp sum, warp max,
/// the value of lane `lane ^ 5`, `(i · 7919) / divisor` and its remainder.
pub const HELPER_OUTPUTS: usize = 10;
