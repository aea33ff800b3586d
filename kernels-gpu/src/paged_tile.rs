//! Key/value tiles of one request and one KV head, streamed from the paged cache into shared
//! memory by `cp.async`: the page-table addressing every attention kernel shares, written once.
//!
//! A tile is `TILE_TOKENS` consecutive key positions of the request; thread `i` of `THREADS`
//! copies 16-byte chunk `i % (HEAD_DIM / 8)` of rows `i / (HEAD_DIM / 8) + j · pass_rows`.
//! Positions at or past `end` are zero-filled and read nothing, so masked keys can never put a
//! NaN into P·V. A tile's pages are looked up (`look_up_pages`) one tile before it is issued,
//! so the dependent load of `kv_indices` overlaps the math on earlier tiles.
use crate::abi::FastDiv;
use crate::gpu::index::thread_x_here;
use crate::gpu::mem::Vec16;
use crate::gpu::tensor::copy_async;

/// Byte offset of 16-byte chunk `chunk` of row `row` in a shared tile of `HEAD_DIM`-element
/// rows. Chunks are XOR-swizzled by the row so the eight rows an `ldmatrix` reads at one
/// column fall in eight different bank groups.
#[inline(always)]
pub fn swizzled<const HEAD_DIM: u32>(row: u32, chunk: u32) -> u32 {
    row * HEAD_DIM * 2 + ((chunk ^ (row % 8)) * 16)
}

/// Where one request's keys live: its pages (from `kv_indices[kv_indptr[request]..]`) and
/// the cache geometry, in elements.
#[derive(Clone, Copy)]
pub struct PagedKv {
    pub k_pages: *const Vec16,
    pub v_pages: *const Vec16,
    /// The request's first entry of `kv_indices`.
    pub pages: *const u32,
    pub page_size: FastDiv,
    pub page_elems: u32,
    pub slot_stride: u32,
    /// Element offset of the KV head within a token's slot.
    pub head_offset: u32,
}

pub struct PagedTileLoader<const HEAD_DIM: u32, const TILE_TOKENS: u32, const THREADS: u32> {
    kv: PagedKv,
    /// Key positions `start..end` of the request are loaded; tile `j` starts at `start + j · TILE_TOKENS`.
    start: u32,
    end: u32,
    row: u32,
    chunk: u32,
    /// Pages of this thread's rows of the tile to issue next.
    pages: [u32; 16],
}

impl<const HEAD_DIM: u32, const TILE_TOKENS: u32, const THREADS: u32> PagedTileLoader<HEAD_DIM, TILE_TOKENS, THREADS> {
    const CHUNKS: u32 = HEAD_DIM / 8;
    const PASS_ROWS: u32 = THREADS / Self::CHUNKS;
    /// Rows per thread and tile: at most 16.
    const PASSES: u32 = TILE_TOKENS / Self::PASS_ROWS;

    #[inline(always)]
    pub fn new(kv: PagedKv, start: u32, end: u32, thread: u32) -> Self {
        PagedTileLoader { kv, start, end, row: thread / Self::CHUNKS, chunk: thread % Self::CHUNKS, pages: [0; 16] }
    }

    /// Tiles covering `start..end`.
    #[inline(always)]
    pub fn tiles(&self) -> u32 {
        (self.end - self.start).div_ceil(TILE_TOKENS)
    }

    /// Reads the page ids of `tile` (this thread's rows) into registers.
    ///
    /// # Safety
    /// The page table was validated for positions below `end`.
    #[inline(always)]
    pub unsafe fn look_up_pages(&mut self, tile: u32) {
        crate::unroll_to!(j < Self::PASSES, {
            let pos = self.start + tile * TILE_TOKENS + self.row + j as u32 * Self::PASS_ROWS;
            if pos < self.end {
                self.pages[j] = *self.kv.pages.add(self.kv.page_size.div(pos) as usize);
            }
        });
    }

    /// Starts copying `tile` (whose pages were looked up last) to the shared tiles at `k_dst`
    /// and `v_dst`, `TILE_TOKENS` rows each, swizzled, then looks up the pages of `tile + 1`.
    ///
    /// # Safety
    /// `k_dst` and `v_dst` are shared addresses with room for a tile; the pools hold every page
    /// the validated table names.
    #[inline(always)]
    pub unsafe fn issue(&mut self, tile: u32, k_dst: u32, v_dst: u32) {
        let kv = &self.kv;
        let chunk = thread_x_here() % Self::CHUNKS;
        crate::unroll_to!(j < Self::PASSES, {
            let row = self.row + j as u32 * Self::PASS_ROWS;
            let pos = self.start + tile * TILE_TOKENS + row;
            let valid = pos < self.end;
            // The division repeats `look_up_pages`'s: three integer ops, cheaper than holding
            // the slots in registers across the tile's math.
            let slot = pos - kv.page_size.div(pos) * kv.page_size.divisor;
            let elem = self.pages[j] as u64 * kv.page_elems as u64
                + (slot * kv.slot_stride + kv.head_offset + self.chunk * 8) as u64;
            let (k, v) = if valid {
                (kv.k_pages.add((elem / 8) as usize), kv.v_pages.add((elem / 8) as usize))
            } else {
                (kv.k_pages, kv.v_pages)
            };
            let dst = swizzled::<HEAD_DIM>(row, chunk);
            copy_async(k_dst + dst, k, valid);
            copy_async(v_dst + dst, v, valid);
        });
        self.look_up_pages(tile + 1);
    }
}
