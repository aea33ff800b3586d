//! Key/value tiles of one request and one KV head, streamed from the paged cache into shared
//! memory by `cp.async`: the page-table addressing every attention kernel shares, written once.
//!
//! A tile is `TILE_TOKENS` consecutive key positions of the request; thread `i` of `THREADS`
//! copies 16-byte chunk `i % (HEAD_DIM / 8)` of rows `i / (HEAD_DIM / 8) + j · pass_rows`.
//! Rows at or past `end` copy the request's last key again instead of branching or zero-filling:
//! the kernel masks their logits to −∞, so their probability is exactly 0 and the duplicate adds
//! nothing (a key at `end − 1` that is not finite poisons the output either way). A tile's pages
//! are looked up one tile before it is issued, so the dependent load of `kv_indices` overlaps
//! the math on earlier tiles. Every row costs a handful of integer ops and no branch: at full
//! bandwidth the copies' address math competes with the attention math for issue slots.
use crate::abi::{FastDiv, PagedCacheParams};
use crate::gpu::index::thread_x_here;
use crate::gpu::sync::sync_threads;
use crate::gpu::tensor::{commit_async_copies, copy_async, wait_async_copies};

/// Byte offset of 16-byte chunk `chunk` of row `row` in a shared tile of `HEAD_DIM`-element
/// rows. Chunks are XOR-swizzled by the row so the eight rows an `ldmatrix` reads at one
/// column fall in eight different bank groups.
///
/// Rows are a power of two bytes and chunks stay within their row, so XOR-ing a chunk index
/// commutes with the swizzle: for a tile whose shared address is a multiple of its row size,
/// `(tile + swizzled(row, c)) ^ (16 · f) == tile + swizzled(row, c ^ f)`. Fragment loads use
/// this to step along a row with one `xor` each.
#[inline(always)]
pub fn swizzled<const HEAD_DIM: u32>(row: u32, chunk: u32) -> u32 {
    row * HEAD_DIM * 2 + ((chunk ^ (row % 8)) * 16)
}

/// Where one request's keys live: its pages (from `kv_indices[kv_indptr[request]..]`) and
/// the cache geometry, in bytes.
#[derive(Clone, Copy)]
pub struct PagedKv {
    pub k_pages: *const u8,
    pub v_pages: *const u8,
    /// The request's first entry of `kv_indices`.
    pub pages: *const u32,
    pub page_size: FastDiv,
    pub page_bytes: u32,
    pub slot_bytes: u32,
    /// Byte offset of the KV head within a token's slot.
    pub head_bytes: u32,
}

impl PagedKv {
    /// KV head `kv_head` of the request whose pages start at entry `first_page` of the
    /// cache's `kv_indices` (2-byte elements).
    #[inline(always)]
    pub unsafe fn new(cache: &PagedCacheParams, first_page: u32, kv_head: u32) -> Self {
        PagedKv {
            k_pages: cache.k_pages as *const u8,
            v_pages: cache.v_pages as *const u8,
            pages: (cache.kv_indices as *const u32).add(first_page as usize),
            page_size: cache.page_size,
            page_bytes: 2 * cache.page_elems,
            slot_bytes: 2 * cache.slot_stride,
            head_bytes: 2 * kv_head * cache.head_stride,
        }
    }
}

/// The K/V pipeline every attention kernel runs: key positions `start..end` in tiles of
/// `TILE_TOKENS`, through `STAGES` shared-memory stages of K (at `k_smem`) and V (at `v_smem`),
/// `STAGES − 1` tiles in flight ahead of the math.
pub struct KvRing<const HEAD_DIM: u32, const TILE_TOKENS: u32, const THREADS: u32, const STAGES: u32> {
    loader: Option<PagedTileLoader<HEAD_DIM, TILE_TOKENS, THREADS>>,
    tiles: u32,
    k_smem: u32,
    v_smem: u32,
}

impl<const HEAD_DIM: u32, const TILE_TOKENS: u32, const THREADS: u32, const STAGES: u32>
    KvRing<HEAD_DIM, TILE_TOKENS, THREADS, STAGES>
{
    const TILE_BYTES: u32 = TILE_TOKENS * HEAD_DIM * 2;

    /// Starts copying the first `STAGES − 1` tiles (every thread of the block calls this; the
    /// first commit group also carries whatever copies the caller issued before).
    ///
    /// # Safety
    /// As [`PagedTileLoader::new`] and [`PagedTileLoader::issue`]; `k_smem` and `v_smem` have
    /// room for `STAGES` tiles each.
    #[inline(always)]
    pub unsafe fn start(kv: PagedKv, start: u32, end: u32, thread: u32, k_smem: u32, v_smem: u32) -> Self {
        let tiles = (end - start).div_ceil(TILE_TOKENS);
        let loader = if tiles > 0 { Some(PagedTileLoader::new(kv, start, end, thread)) } else { None };
        let mut ring = KvRing { loader, tiles, k_smem, v_smem };
        for tile in 0..STAGES - 1 {
            ring.issue(tile);
        }
        ring
    }

    /// Tiles covering `start..end`.
    #[inline(always)]
    pub fn tiles(&self) -> u32 {
        self.tiles
    }

    /// Shared offset of `tile`'s stage.
    #[inline(always)]
    fn stage_offset(tile: u32) -> u32 {
        (tile % STAGES) * Self::TILE_BYTES
    }

    /// Issues `tile` (when it exists) and closes a commit group either way, so the group count
    /// stays in step with the tiles.
    #[inline(always)]
    unsafe fn issue(&mut self, tile: u32) {
        if let Some(loader) = self.loader.as_mut().filter(|_| tile < self.tiles) {
            loader.issue(tile, self.k_smem + Self::stage_offset(tile), self.v_smem + Self::stage_offset(tile));
        }
        commit_async_copies();
    }

    /// Waits for `tile` to land in shared memory (a block barrier: every thread calls this for
    /// every tile in order), refills the stage the previous tile used, and returns the shared
    /// addresses of `tile`'s K and V.
    ///
    /// # Safety
    /// As [`start`](Self::start).
    #[inline(always)]
    pub unsafe fn wait(&mut self, tile: u32) -> (u32, u32) {
        wait_async_copies(STAGES - 2);
        // Everyone's copies of `tile` have landed, and everyone is done with the stage refilled next.
        sync_threads();
        self.issue(tile + STAGES - 1);
        (self.k_smem + Self::stage_offset(tile), self.v_smem + Self::stage_offset(tile))
    }

    /// Waits for every copy this thread started (the last groups hold no tiles).
    #[inline(always)]
    pub fn drain(&self) {
        wait_async_copies(0);
    }
}

pub struct PagedTileLoader<const HEAD_DIM: u32, const TILE_TOKENS: u32, const THREADS: u32> {
    kv: PagedKv,
    /// Key positions `start..=last` of the request are loaded; tile `j` starts at `start + j · TILE_TOKENS`.
    start: u32,
    last: u32,
    row: u32,
    /// Byte offset of this thread's chunk within a token's slot.
    chunk_bytes: u32,
    /// Pages of this thread's rows of the tile to issue next, and the rows' byte offsets
    /// within their pages (this thread's chunk included).
    pages: [u32; 16],
    in_page: [u32; 16],
}

impl<const HEAD_DIM: u32, const TILE_TOKENS: u32, const THREADS: u32> PagedTileLoader<HEAD_DIM, TILE_TOKENS, THREADS> {
    const CHUNKS: u32 = HEAD_DIM / 8;
    const PASS_ROWS: u32 = THREADS / Self::CHUNKS;
    /// Rows per thread and tile: at most 16.
    const PASSES: u32 = TILE_TOKENS / Self::PASS_ROWS;

    /// A loader for positions `start..end` (`end > start`), with the first tile's pages
    /// looked up.
    ///
    /// # Safety
    /// The page table was validated for positions below `end`.
    #[inline(always)]
    pub unsafe fn new(kv: PagedKv, start: u32, end: u32, thread: u32) -> Self {
        let chunk_bytes = kv.head_bytes + (thread % Self::CHUNKS) * 16;
        let mut loader = PagedTileLoader {
            kv,
            start,
            last: end - 1,
            row: thread / Self::CHUNKS,
            chunk_bytes,
            pages: [0; 16],
            in_page: [0; 16],
        };
        loader.look_up_pages(0);
        loader
    }

    /// Position of pass `j`'s row of `tile`, past the end clamped to the last key.
    #[inline(always)]
    fn position(&self, tile: u32, j: u32) -> u32 {
        (self.start + tile * TILE_TOKENS + self.row + j * Self::PASS_ROWS).min(self.last)
    }

    /// Reads the page ids of `tile` (this thread's rows) into registers and works out where
    /// in its page each row starts, so `issue` has only a multiply-add per row left.
    #[inline(always)]
    unsafe fn look_up_pages(&mut self, tile: u32) {
        crate::unroll_to!(j < Self::PASSES, {
            let (page, slot) = self.kv.page_size.divmod(self.position(tile, j as u32));
            self.pages[j] = *self.kv.pages.add(page as usize);
            self.in_page[j] = slot * self.kv.slot_bytes + self.chunk_bytes;
        });
    }

    /// Starts copying `tile` (whose pages were looked up last) to the shared tiles at `k_dst`
    /// and `v_dst`, `TILE_TOKENS` rows each, swizzled, then looks up the pages of `tile + 1`
    /// (past the end: the last key's page again, harmless).
    ///
    /// # Safety
    /// `k_dst` and `v_dst` are shared addresses with room for a tile; the pools hold every page
    /// the validated table names.
    #[inline(always)]
    pub unsafe fn issue(&mut self, tile: u32, k_dst: u32, v_dst: u32) {
        let kv = &self.kv;
        let chunk = thread_x_here() % Self::CHUNKS;
        crate::unroll_to!(j < Self::PASSES, {
            let offset = self.pages[j] as u64 * kv.page_bytes as u64 + self.in_page[j] as u64;
            let dst = swizzled::<HEAD_DIM>(self.row + j as u32 * Self::PASS_ROWS, chunk);
            copy_async(k_dst + dst, kv.k_pages.add(offset as usize).cast());
            copy_async(v_dst + dst, kv.v_pages.add(offset as usize).cast());
        });
        self.look_up_pages(tile + 1);
    }
}
