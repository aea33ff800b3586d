//! Key/value tiles of one request and one KV head, streamed from the paged cache into shared
//! memory by `cp.async`: the page-table addressing every attention kernel shares, written once.
//!
//! A tile is `TILE_TOKENS` consecutive key positions of the request; thread `i` of `THREADS`
//! copies 16-byte chunk `i % (HEAD_DIM / 8)` of rows `i / (HEAD_DIM / 8) + j · pass_rows`.
//! Rows at or past `end` copy the request's last key again instead of branching or zero-filling:
//! the kernel masks their logits to −∞, so their probability is exactly 0 and the duplicate adds
//! nothing (a key at `end − 1` that is not finite poisons the output either way).
//!
//! Where a row lives is worked out once per tile, not once per copying thread: the first
//! `TILE_TOKENS` threads each resolve one row (a fast division into page and slot, the page id
//! from `kv_indices`) into a table in shared memory, as the row's offset in the pool counted in
//! head rows (`HEAD_DIM` elements), and the copies read it back with one shared load and one
//! multiply-add per address. The page id is loaded a tile before it is needed, so that load's
//! latency hides behind the math. At full bandwidth the copies' address math competes with the
//! attention math for issue slots: this keeps it to a handful of instructions per row.
//!
//! An 8-bit cache streams its bytes (half the traffic of a 16-bit one) into stages of rows of
//! `HEAD_DIM` bytes. Prefill's ring (`WIDEN_8BIT`) keeps them unswizzled and, when a stage has
//! landed, the block widens it into one K and one V tile of the query's 16-bit type in the
//! layout a 16-bit stage has (`swizzled`), so its fragment loads and mma are the same code for
//! every cache type. Decode's ring hands out the byte stages themselves, swizzled for its
//! fragment loads ([`fp8_swizzled`]), and converts bytes straight into mma fragments.
use crate::abi::{decode_head_smem_stride, kv_table_slots, tile_dim, FastDiv, KvHeadScale, PagedCacheParams};
use crate::gpu::fp8::KvElem;
use crate::gpu::half::Half;
use crate::gpu::shared::{load_shared_u32, load_shared_u32x2, load_shared_u32x4, store_shared_u32, store_shared_u32x4};
use crate::gpu::sync::sync_threads;
use crate::gpu::tensor::{commit_async_copies, copy_async, wait_async_copies};

/// Byte offset of 16-byte chunk `chunk` of row `row` in a shared tile of `HEAD_DIM`-element
/// rows, each [`tile_dim`]`(HEAD_DIM)` elements wide (head dims 80 and 96 leave the end of a
/// row unused). Chunks are XOR-swizzled by the row so the eight rows an `ldmatrix` reads at one
/// column fall in eight different bank groups.
///
/// Rows are a power of two bytes and chunks stay within their row, so XOR-ing a chunk index
/// commutes with the swizzle: for a tile whose shared address is a multiple of its row size,
/// `(tile + swizzled(row, c)) ^ (16 · f) == tile + swizzled(row, c ^ f)`. Fragment loads use
/// this to step along a row with one `xor` each.
#[inline(always)]
pub fn swizzled<const HEAD_DIM: u32>(row: u32, chunk: u32) -> u32 {
    row * tile_dim(HEAD_DIM) * 2 + ((chunk ^ (row % 8)) * 16)
}

/// Byte offset of 16-byte chunk `chunk` of row `row` in a dense shared tile of 12-chunk rows
/// (96 dims of 16 bits: `abi::decode_dense_stages`). Rows are 192 bytes, so 16-byte bank group
/// `(12 r + chunk) mod 8` alternates by 4 between even and odd rows; XOR-ing the chunk with
/// `(r >> 1) & 3` spreads the four even (and four odd) rows of an 8-row `ldmatrix` phase over
/// the other two bits: eight rows, eight groups. The XOR changes a chunk's low two bits only, so
/// it stays in its row, and `dense_swizzled(r, c ^ f) == row start + ((dense offset) ^ 16 f)`
/// ([`LaneAddr`] steps along a row that way).
#[inline(always)]
pub fn dense_swizzled<const HEAD_DIM: u32>(row: u32, chunk: u32) -> u32 {
    row * HEAD_DIM * 2 + dense_chunk_offset(row, chunk)
}

/// [`dense_swizzled`]'s offset within row `row`.
#[inline(always)]
fn dense_chunk_offset(row: u32, chunk: u32) -> u32 {
    (chunk ^ ((row >> 1) & 3)) * 16
}

/// A lane's fragment address in a swizzled tile, stepped along its row by XOR-ing a chunk
/// offset: `base + (offset ^ step)`. In a tile of power-of-two rows the whole address XORs
/// (`base` 0); in a dense tile only the offset within the row does.
#[derive(Clone, Copy)]
pub struct LaneAddr {
    base: u32,
    offset: u32,
}

impl LaneAddr {
    /// Chunk `chunk` of row `row` of the tile at `tile` (a multiple of its row size), dense
    /// (`dense_swizzled`) or not (`swizzled`).
    #[inline(always)]
    pub fn new<const HEAD_DIM: u32, const DENSE: bool>(tile: u32, row: u32, chunk: u32) -> Self {
        if DENSE {
            LaneAddr { base: tile + row * HEAD_DIM * 2, offset: dense_chunk_offset(row, chunk) }
        } else {
            LaneAddr { base: 0, offset: tile + swizzled::<HEAD_DIM>(row, chunk) }
        }
    }

    /// The address `step` bytes (a multiple of 16, XOR-ed) along the row.
    #[inline(always)]
    pub fn at(self, step: u32) -> u32 {
        self.base + (self.offset ^ step)
    }
}

/// Byte offset of 16-byte chunk `chunk` of row `row` in a shared tile of `HEAD_DIM` one-byte
/// elements as decode reads it (`decode.rs`): chunks are XOR-swizzled by
/// `x(r) = 4·(r & 1) ^ 2·((r >> 1) & 3)` (modulo the chunks of a row) so that both of its
/// 16-byte fragment loads are free of bank conflicts: K's (an 8-lane phase reads rows g, g + 1,
/// chunks 4c..4c + 4 each: bit 2 of x, which differs between the two, puts their quads of
/// chunks on different halves of the banks) and V's (a phase reads rows o, o + 2, o + 4, o + 6, chunks 2m and 2m + 1: bits 1–2 of x
/// spread them over the eight 16-byte bank groups). At head_dim 256 a row is two bank lines,
/// the same pattern in each; at head_dim 64 (4 chunks) V's 8-byte loads read rows of one parity
/// only, which share half the banks: 2-way conflicts remain there, the least that layout allows.
///
/// As with [`swizzled`], XOR-ing a chunk index commutes with the swizzle: for a tile whose
/// shared address is a multiple of its row size,
/// `(tile + fp8_swizzled(r, c)) ^ (16 · f) == tile + fp8_swizzled(r, c ^ f)`.
#[inline(always)]
pub fn fp8_swizzled<const HEAD_DIM: u32>(row: u32, chunk: u32) -> u32 {
    let x = (4 * (row & 1)) ^ (2 * ((row >> 1) & 3));
    row * HEAD_DIM + (chunk ^ (x % (HEAD_DIM / 16))) * 16
}

/// Widens a landed 8-bit tile at shared address `src` (`TILE_TOKENS` rows of `HEAD_DIM`
/// bytes) into the 16-bit tile at `dst`, whose 16-byte chunk `c` of row `r` is at `dst +
/// place(r, c)` (a swizzled layout: [`swizzled`] for the `mma.sync` kernels, the 128-byte
/// `wgmma` slabs for Hopper's), `THREADS` threads each taking eight values at a time: an 8-byte
/// load, four conversions and a 16-byte store; consecutive threads take consecutive pieces of a
/// row, so neither side has bank conflicts.
#[inline(always)]
pub unsafe fn widen_tile<H: Half, K: KvElem, const HEAD_DIM: u32, const TILE_TOKENS: u32, const THREADS: u32>(
    src: u32,
    dst: u32,
    place: impl Fn(u32, u32) -> u32,
    thread: u32,
) {
    // 8-bit caches come in power-of-two head dims only (instantiated, never called, for others).
    const { assert!(K::BYTES == 2 || HEAD_DIM == tile_dim(HEAD_DIM)) };
    let per_thread = const { TILE_TOKENS * HEAD_DIM / 8 / THREADS };
    const { assert!((TILE_TOKENS * HEAD_DIM / 8) % THREADS == 0 && TILE_TOKENS * HEAD_DIM / 8 / THREADS <= 16) };
    let chunks = HEAD_DIM / 8;
    // Four loads in flight at a time: enough to hide shared-memory latency, few registers
    // beside the accumulators the caller keeps live.
    crate::unroll!(batch in [0, 4, 8, 12] {
        if batch < per_thread as usize {
            let mut bytes = [[0u32; 2]; 4];
            crate::unroll!(j in [0, 1, 2, 3] {
                if batch + j < per_thread as usize {
                    bytes[j] = load_shared_u32x2(src + (thread + (batch + j) as u32 * THREADS) * 8);
                }
            });
            crate::unroll!(j in [0, 1, 2, 3] {
                if batch + j < per_thread as usize {
                    let piece = thread + (batch + j) as u32 * THREADS;
                    let at = dst + place(piece / chunks, piece % chunks);
                    store_shared_u32x4(at, K::widen8::<H>(bytes[j]));
                }
            });
        }
    });
}

/// KV head `kv_head`'s dequantisation scale of V (`V`) or K in a layer's per-KV-head scales
/// at `scales` (`KvHeadScale`s; 0 for none: 1). One load, the same for the whole block: an
/// attention block's keys are all of one KV head.
#[inline(always)]
pub unsafe fn kv_head_scale<const V: bool>(scales: u64, kv_head: u32) -> f32 {
    if scales == 0 {
        return 1.0;
    }
    let head = &*(scales as *const KvHeadScale).add(kv_head as usize);
    if V {
        head.v
    } else {
        head.k
    }
}

/// Where one request's keys live: its pages (from `kv_indices[kv_indptr[request]..]`) and
/// the cache geometry, in elements.
#[derive(Clone, Copy)]
pub struct PagedKv {
    pub k_pages: *const u8,
    pub v_pages: *const u8,
    /// The request's first entry of `kv_indices`.
    pub pages: *const u32,
    pub page_size: FastDiv,
    pub page_elems: u32,
    pub slot_stride: u32,
    /// Offset of the KV head within a token's slot.
    pub head_offset: u32,
    /// Elements from one KV head's row to the next's (adjacent in NHD).
    pub head_stride: u32,
    /// Whether a ring of two heads (`DENSE`) copies the second (the next KV head) as well: not
    /// past the cache's last head.
    pub second_head: bool,
}

impl PagedKv {
    /// KV head `kv_head` of the request whose pages start at entry `first_page` of the
    /// cache's `kv_indices`.
    #[inline(always)]
    pub unsafe fn new(cache: &PagedCacheParams, first_page: u32, kv_head: u32) -> Self {
        PagedKv {
            k_pages: cache.k_pages as *const u8,
            v_pages: cache.v_pages as *const u8,
            pages: (cache.kv_indices as *const u32).add(first_page as usize),
            page_size: cache.page_size,
            page_elems: cache.page_elems,
            slot_stride: cache.slot_stride,
            head_offset: kv_head * cache.head_stride,
            head_stride: cache.head_stride,
            second_head: true,
        }
    }
}

/// The K/V pipeline every attention kernel runs: key positions `start..end` in tiles of
/// `TILE_TOKENS`, through `STAGES` shared-memory stages of K (at `k_smem`) and V (at `v_smem`),
/// `STAGES − 1` tiles in flight ahead of the math, with the row table at `table_smem`
/// ([`kv_table_slots`] slots of `TILE_TOKENS` `u32`, each copying thread's rows side by side so
/// that it reads them with a few vector loads).
///
/// Tile `u`'s rows are resolved into table slot `u % slots` by [`wait`](Self::wait)`(u − STAGES)`
/// (the first `STAGES` tiles by [`start`](Self::start)) and read when `u` is issued, after the
/// next barrier. With at least two slots, and one per tile the prologue resolves, a slot is
/// rewritten only after a barrier that follows every read of it.
///
/// The cache holds elements of `K`; the math reads tiles of `H`. For an 8-bit `K` the stages
/// hold bytes: with `WIDEN_8BIT`, [`wait`](Self::wait) widens each tile into the 16-bit tiles at
/// `wide_smem` (K, then V); without, it returns the byte stages, laid out by [`fp8_swizzled`].
/// A 16-bit `K` ignores `WIDEN_8BIT`.
///
/// With `DENSE` (16-bit, 96 dims: decode) the stages' rows are [`dense_swizzled`] 192-byte rows,
/// and the ring copies two KV heads, `kv`'s and the next (unless `kv.second_head` is false), a
/// warp a token's pair of rows (384 bytes, contiguous in NHD): the second head's stages are
/// [`decode_head_smem_stride`] bytes after the first's (`abi::decode_heads_per_block`).
///
/// K rows have `HEAD_DIM` elements, V rows `V_DIM` (at most as many: DeepSeek-style prefill's
/// 192 and 128, MLA's 512 and 64; both count the same head rows); the threads of a K row's first
/// `V_DIM · K::BYTES / 16` chunks copy V's row too. 8-bit caches need the two equal unless
/// widened (`WIDEN_8BIT`: V's widened tile then follows K's at `wide_smem`).
pub struct KvRing<
    H: Half,
    K: KvElem,
    const HEAD_DIM: u32,
    const V_DIM: u32,
    const TILE_TOKENS: u32,
    const THREADS: u32,
    const STAGES: u32,
    const WIDEN_8BIT: bool,
    const DENSE: bool,
> {
    _types: core::marker::PhantomData<(H, K)>,
    kv: PagedKv,
    /// Key positions `start..=last` are loaded; tile `j` starts at `start + j · TILE_TOKENS`.
    start: u32,
    last: u32,
    tiles: u32,
    k_smem: u32,
    v_smem: u32,
    table_smem: u32,
    /// The widened K tile, the V tile after it (8-bit caches only).
    wide_smem: u32,
    /// This thread's first row of a tile (it copies rows `row + j · PASS_ROWS`), and the pools
    /// advanced by its 16-byte chunk of a row (and by its head's offset, `DENSE`).
    row: u32,
    k_chunk: *const u8,
    v_chunk: *const u8,
    /// The pool offset of head row 0 of page 0's slot 0 for this KV head, and the head rows per
    /// page and per slot.
    head_row: u32,
    page_rows: u32,
    slot_rows: u32,
    /// A look-up thread's row of the next tile to resolve: its page id (loaded, not yet
    /// used) and its slot within the page.
    next: (u32, u32),
}

impl<
        H: Half,
        K: KvElem,
        const HEAD_DIM: u32,
        const V_DIM: u32,
        const TILE_TOKENS: u32,
        const THREADS: u32,
        const STAGES: u32,
        const WIDEN_8BIT: bool,
        const DENSE: bool,
    > KvRing<H, K, HEAD_DIM, V_DIM, TILE_TOKENS, THREADS, STAGES, WIDEN_8BIT, DENSE>
{
    /// Bytes of a head row in the pool, and of a row of a stage (a power of two: `tile_dim`).
    const ROW_BYTES: u32 = HEAD_DIM * K::BYTES;
    const STAGE_ROW_BYTES: u32 = tile_dim(HEAD_DIM) * K::BYTES;
    const TILE_BYTES: u32 = TILE_TOKENS * if DENSE { Self::ROW_BYTES } else { Self::STAGE_ROW_BYTES };
    /// 16-byte chunks of a `tile_dim` row, and those of them a head row fills (threads of the
    /// others copy nothing: 80 and 96 dims; dense stages keep this mapping).
    const CHUNKS: u32 = Self::STAGE_ROW_BYTES / 16;
    const FILLED_CHUNKS: u32 = Self::ROW_BYTES / 16;
    /// The same for V's rows.
    const V_ROW_BYTES: u32 = V_DIM * K::BYTES;
    const V_TILE_BYTES: u32 = TILE_TOKENS * if DENSE { Self::V_ROW_BYTES } else { tile_dim(V_DIM) * K::BYTES };
    const V_FILLED_CHUNKS: u32 = Self::V_ROW_BYTES / 16;
    /// KV heads the ring copies (`DENSE`: two, their rows' chunks side by side in a warp), and
    /// the bytes from one head's stages to the next's.
    const HEADS: u32 = if DENSE { 2 } else { 1 };
    const HEAD_SMEM: u32 = if DENSE { decode_head_smem_stride(HEAD_DIM, K::BYTES) } else { 0 };
    const PASS_ROWS: u32 = THREADS / (Self::CHUNKS * Self::HEADS);
    /// Rows per thread and tile: 2, or a multiple of 4 up to 16.
    const PASSES: u32 = TILE_TOKENS / Self::PASS_ROWS;
    const SLOTS: u32 = kv_table_slots(STAGES);
    /// Bytes of one widened 16-bit tile.
    const WIDE_BYTES: u32 = TILE_TOKENS * tile_dim(HEAD_DIM) * 2;

    /// Resolves the first `STAGES` tiles' rows and starts copying the first `STAGES − 1` tiles
    /// (every thread of the block calls this; the first commit group also carries whatever
    /// copies the caller issued before).
    ///
    /// # Safety
    /// The page table was validated for positions below `end`, and the pools hold every page it
    /// names; `k_smem` and `v_smem` have room for `STAGES` tiles each, `table_smem` for the
    /// table, `wide_smem` for two widened tiles when `K` is 8-bit and `WIDEN_8BIT`; shared
    /// addresses are 16-byte aligned, the widened tiles' a multiple of a 16-bit row.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn start(
        kv: PagedKv,
        start: u32,
        end: u32,
        thread: u32,
        k_smem: u32,
        v_smem: u32,
        table_smem: u32,
        wide_smem: u32,
    ) -> Self {
        const {
            assert!(THREADS >= TILE_TOKENS && (Self::PASSES == 2 || Self::PASSES % 4 == 0) && Self::PASSES <= 16);
            assert!(Self::SLOTS >= STAGES && STAGES <= 4);
            assert!(V_DIM <= HEAD_DIM && (K::BYTES == 2 || V_DIM == HEAD_DIM || WIDEN_8BIT));
            assert!(!DENSE || (K::BYTES == 2 && V_DIM == HEAD_DIM && HEAD_DIM == 96));
        };
        // The second head's rows follow the first's by `head_stride` elements in the pool.
        let head = if DENSE { (thread / Self::CHUNKS) % Self::HEADS } else { 0 };
        let chunk_bytes = (thread % Self::CHUNKS) as usize * 16 + (head * kv.head_stride * K::BYTES) as usize;
        let mut ring = KvRing {
            _types: core::marker::PhantomData,
            kv,
            start,
            last: end.max(start + 1) - 1,
            tiles: (end - start).div_ceil(TILE_TOKENS),
            k_smem,
            v_smem,
            table_smem,
            wide_smem,
            row: thread / (Self::CHUNKS * Self::HEADS),
            k_chunk: kv.k_pages.add(chunk_bytes),
            v_chunk: kv.v_pages.add(chunk_bytes),
            head_row: kv.head_offset / HEAD_DIM,
            page_rows: kv.page_elems / HEAD_DIM,
            slot_rows: kv.slot_stride / HEAD_DIM,
            next: (0, 0),
        };
        if ring.tiles > 0 {
            // All the prologue's page ids in flight at once.
            let mut rows = [(0, 0); 4];
            crate::unroll!(tile in [0, 1, 2, 3] {
                if tile < STAGES as usize {
                    rows[tile] = ring.look_up(tile as u32, thread);
                }
            });
            crate::unroll!(tile in [0, 1, 2, 3] {
                if tile < STAGES as usize {
                    ring.store_row(tile as u32, thread, rows[tile]);
                }
            });
            sync_threads();
        }
        crate::unroll_to!(tile < STAGES - 1, {
            ring.issue(tile as u32);
        });
        ring.next = ring.look_up(STAGES, thread);
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

    /// Shared offset of `tile`'s V stage.
    #[inline(always)]
    fn v_stage_offset(tile: u32) -> u32 {
        (tile % STAGES) * Self::V_TILE_BYTES
    }

    /// Shared address of `row`'s entry in `tile`'s table slot: rows `r + j · PASS_ROWS` sit
    /// side by side, in `j` order.
    #[inline(always)]
    fn table_entry(&self, tile: u32, row: u32) -> u32 {
        let index = (row % Self::PASS_ROWS) * Self::PASSES + row / Self::PASS_ROWS;
        self.table_smem + ((tile % Self::SLOTS) * TILE_TOKENS + index) * 4
    }

    /// First half of resolving `tile`'s rows: a look-up thread (`thread < TILE_TOKENS`) loads
    /// the page id of its row (past the end: the last key's page again, harmless) and works out
    /// the row's slot; other threads get zeros.
    #[inline(always)]
    unsafe fn look_up(&self, tile: u32, thread: u32) -> (u32, u32) {
        if thread < TILE_TOKENS && self.tiles > 0 {
            let position = (self.start + tile * TILE_TOKENS + thread).min(self.last);
            let (page, slot) = self.kv.page_size.divmod(position);
            (*self.kv.pages.add(page as usize), slot)
        } else {
            (0, 0)
        }
    }

    /// Second half: writes the row's pool offset, in head rows, to `tile`'s table slot.
    #[inline(always)]
    unsafe fn store_row(&self, tile: u32, thread: u32, (page, slot): (u32, u32)) {
        if thread < TILE_TOKENS && self.tiles > 0 {
            let offset = page * self.page_rows + slot * self.slot_rows + self.head_row;
            store_shared_u32(self.table_entry(tile, thread), offset);
        }
    }

    /// Starts copying `tile` (when it exists; its rows resolved and behind a barrier) into its
    /// stage, swizzled, and closes a commit group either way, so the group count stays in step
    /// with the tiles.
    #[inline(always)]
    unsafe fn issue(&self, tile: u32) {
        let thread = crate::gpu::index::thread_x_here();
        let (chunk, head) = (thread % Self::CHUNKS, if DENSE { (thread / Self::CHUNKS) % Self::HEADS } else { 0 });
        let head_copies = head == 0 || self.kv.second_head;
        if tile < self.tiles && (Self::FILLED_CHUNKS == Self::CHUNKS || chunk < Self::FILLED_CHUNKS) && head_copies {
            let head_smem = head * Self::HEAD_SMEM;
            let (k_dst, v_dst) = (
                self.k_smem + head_smem + Self::stage_offset(tile),
                self.v_smem + head_smem + Self::v_stage_offset(tile),
            );
            // All of this thread's rows first: a copy writes shared memory, so a table read
            // after it would wait for it.
            let mut rows = [0u32; 16];
            if Self::PASSES % 4 == 0 {
                crate::unroll_to!(v < Self::PASSES / 4, {
                    let entries = load_shared_u32x4(self.table_entry(tile, self.row) + 16 * v as u32);
                    rows[4 * v..4 * v + 4].copy_from_slice(&entries);
                });
            } else {
                crate::unroll_to!(j < Self::PASSES, {
                    rows[j] = load_shared_u32(self.table_entry(tile, self.row) + 4 * j as u32);
                });
            }
            crate::unroll_to!(j < Self::PASSES, {
                let offset = rows[j] as usize * Self::ROW_BYTES as usize;
                let row = self.row + j as u32 * Self::PASS_ROWS;
                // 16-bit stages are read by the fragment loads (swizzled); 8-bit ones by the
                // widening pass (plain rows) or by decode's byte fragment loads (swizzled).
                let dst = if DENSE {
                    dense_swizzled::<HEAD_DIM>(row, chunk)
                } else if K::BYTES == 2 {
                    swizzled::<HEAD_DIM>(row, chunk)
                } else if WIDEN_8BIT {
                    row * Self::STAGE_ROW_BYTES + chunk * 16
                } else {
                    fp8_swizzled::<HEAD_DIM>(row, chunk)
                };
                copy_async(k_dst + dst, self.k_chunk.add(offset).cast());
                if V_DIM == HEAD_DIM {
                    copy_async(v_dst + dst, self.v_chunk.add(offset).cast());
                } else if chunk < Self::V_FILLED_CHUNKS {
                    let offset = rows[j] as usize * Self::V_ROW_BYTES as usize;
                    // 8-bit (widened, then: MLA's) in plain rows, as K's.
                    let v_at = if K::BYTES == 2 {
                        swizzled::<V_DIM>(row, chunk)
                    } else {
                        row * Self::V_ROW_BYTES + chunk * 16
                    };
                    copy_async(v_dst + v_at, self.v_chunk.add(offset).cast());
                }
            });
        }
        commit_async_copies();
    }

    /// Waits for `tile` to land in shared memory (a block barrier: every thread calls this for
    /// every tile in order), refills the stage the previous tile used, resolves the rows of the
    /// tile `STAGES` ahead, and returns the shared addresses of `tile`'s K and V as 16-bit
    /// swizzled tiles (an 8-bit tile widened first with `WIDEN_8BIT`, behind a second barrier;
    /// the widened tiles are rewritten only after the next call's first barrier, which follows
    /// every read of them), or without `WIDEN_8BIT` as the 8-bit stages themselves.
    ///
    /// # Safety
    /// As [`start`](Self::start).
    #[inline(always)]
    pub unsafe fn wait(&mut self, tile: u32) -> (u32, u32) {
        wait_async_copies(STAGES - 2);
        // Everyone's copies of `tile` have landed, everyone is done with the stage refilled
        // next, and the rows of `tile + STAGES − 1` are in the table.
        sync_threads();
        self.issue(tile + STAGES - 1);
        let thread = crate::gpu::index::thread_x_here();
        self.store_row(tile + STAGES, thread, self.next);
        self.next = self.look_up(tile + STAGES + 1, thread);
        let (k, v) = (self.k_smem + Self::stage_offset(tile), self.v_smem + Self::v_stage_offset(tile));
        if K::BYTES == 2 || !WIDEN_8BIT {
            return (k, v);
        }
        let (k_wide, v_wide) = (self.wide_smem, self.wide_smem + Self::WIDE_BYTES);
        widen_tile::<H, K, HEAD_DIM, TILE_TOKENS, THREADS>(k, k_wide, swizzled::<HEAD_DIM>, thread);
        widen_tile::<H, K, V_DIM, TILE_TOKENS, THREADS>(v, v_wide, swizzled::<V_DIM>, thread);
        sync_threads();
        (k_wide, v_wide)
    }

    /// Waits for every copy this thread started (the last groups hold no tiles).
    #[inline(always)]
    pub fn drain(&self) {
        wait_async_copies(0);
    }
}
