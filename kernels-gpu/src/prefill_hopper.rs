//! Batch prefill on Hopper (sm_90a): the semantics of `prefill` (paged K/V at any page size,
//! packed GQA rows, causal and window masks, soft cap, LSE, split keys merged in the launch)
//! on Hopper's asynchronous machinery, in the manner of FlashAttention-3.
//!
//! A block is three warpgroups. The first is the producer: it resolves each tile's keys
//! through the page table (one key a thread, shared with its warp by shuffles) and gathers K
//! and V rows with `cp.async` into a `STAGES`-deep shared ring; each stage's copies arrive on
//! its "full" mbarrier as they land. Page size is a run-time value like everywhere else: a
//! gather of 16-byte chunks works at any page size, where a TMA box would need whole tiles per
//! page. The two consumer warpgroups own 64 packed query rows each: per tile, S = Q·Kᵀ by
//! `wgmma` from shared memory (Q and K K-major), the online softmax in registers
//! (`softmax::RowState`, whose fragment layout `wgmma` shares), O += P·V by `wgmma` with P from
//! registers and V MN-major, then an arrival on the stage's "empty" mbarrier. The producer
//! gives registers up (`setmaxnreg`) so the consumers can hold S, P and O. The two consumer
//! warpgroups run out of step, so one's softmax overlaps the other's `wgmma`; that softmax is
//! then the tile's critical path, so it computes the tile's row maxima only where the running
//! ones no longer bound the probabilities (`RowState::update_speculating`), and the `wgmma`
//! descriptors are built in uniform registers beside the `wgmma`s, not in it (`uniform`).
//!
//! Over an 8-bit cache (e4m3, e5m2) the producer's copies land in byte stages (half the bytes
//! of a 16-bit tile) and the producer widens each tile into a ring stage itself, eight values
//! a thread at a time, before signalling it full (a fence first: `wgmma` reads through the
//! async proxy). The consumers run the same code as over a 16-bit cache, `wgmma` on 16-bit
//! tiles: K and V widened to f16 whatever the queries' type (S and P · V in f16,
//! `ProductHalf`; bf16 queries are moved to f16 exactly, after a power-of-two scale a warp that
//! the logit scale takes back); queries are not quantised, unlike FlashAttention-3's fp8 path.
//!
//! Shared tiles are 64-dim slabs of 128-byte rows with the 128-byte swizzle (16-byte chunk `c`
//! of row `r` at chunk `c ^ (r % 8)`), the layout `wgmma` descriptors name; every tile starts on
//! a 1 KiB boundary, so a k-step within a slab is a 32-byte offset of the descriptor's start.
//!
//! Blocks are persistent, one an SM: `plan` deals the units (a work item for one KV head) to
//! them longest first, each to the least loaded (`PrefillParams::schedule`), and a block runs
//! its units back to back. The ring's stages and phases, and the consumers' turns, run on from
//! one unit to the next: the producer gathers a unit's first tiles (and asks the L2 for its
//! query rows) while the consumers finish the last one, and one consumer warpgroup starts a
//! unit while the other writes the last one's output.
//!
//! Tried and not kept (docs/perf.md, Hopper prefill v2): issuing tile `j`'s S beside tile
//! `j − 1`'s P·V within a warpgroup, together with persistent blocks that strode over the units
//! (block `b` took units `b`, `b + grid`, …; before ping-pong): 9–13% slower on the H200.
use crate::abi::{
    hopper_prefill_bars_offset, hopper_prefill_ping_pong, hopper_prefill_smem_bytes, PrefillParams, PrefillWorkItem,
    HOPPER_CONSUMER_REGISTERS, HOPPER_PREFILL_ROWS, HOPPER_PREFILL_THREADS, HOPPER_PRODUCER_REGISTERS,
    HOPPER_PRODUCER_THREADS, NO_PARTIAL,
};
use crate::gpu::fp8::{E4m3, E5m2, KvElem};
use crate::gpu::half::{Bf16, F16};
use crate::gpu::hopper::{
    claim_registers, descriptor_plus, fence_proxy_async, mbarrier_arrive, mbarrier_arrive_on_async_copies,
    mbarrier_init, mbarrier_wait, named_barrier, named_barrier_arrive, release_registers, smem_descriptor,
    wgmma_commit, wgmma_fence, wgmma_wait_frags, Wgmma,
};
use crate::gpu::index::{block_x, thread_x, thread_x_here};
use crate::gpu::mem::{prefetch_l2, store, Vec16};
use crate::gpu::shared::{dynamic_smem, dynamic_smem_addr, load_shared_u32x4, store_shared_u32};
use crate::gpu::sync::sync_threads;
use crate::gpu::tensor::{commit_async_copies, copy_async, copy_async_or_zero, load_matrix_x4, wait_async_copies};
use crate::gpu::warp::{shfl_idx_u32, shfl_xor_f32, warp_uniform};
use crate::merge::{last_to_finish, merge, store_output, Team};
use crate::paged_tile::{kv_head_scale, widen_tile, PagedKv};
use crate::prefill::Visibility;
use crate::softmax::{finish_row, fold_sink, sink_logit, LogitScale, RowState};

/// Bytes of a row of a 64-dim slab (the swizzle atom's width).
const SLAB_ROW_BYTES: u32 = 128;
/// Named barriers: 0 is `bar.sync`'s; the two consumer warpgroups share one, and each has its own.
const BARRIER_CONSUMERS: u32 = 1;
const BARRIER_WARPGROUP: u32 = 2;
/// The two consumer warpgroups' turns at the tensor cores (see `consume`): 4 and 5.
const BARRIER_TURN: u32 = 4;
/// The producer warpgroup, between its byte stages' copies and their widening (8-bit caches).
const BARRIER_PRODUCER: u32 = 6;

/// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of `rows` rows laid out as
/// 64-dim slabs, swizzled.
#[inline(always)]
fn slab_offset(rows: u32, row: u32, chunk: u32) -> u32 {
    (chunk / 8) * rows * SLAB_ROW_BYTES + row * SLAB_ROW_BYTES + (((chunk % 8) ^ (row % 8)) * 16)
}

/// Threads of the two consumer warpgroups.
const CONSUMER_THREADS: u32 = HOPPER_PREFILL_THREADS - HOPPER_PRODUCER_THREADS;

/// The consumer warpgroups, for the split merge (the producer has left by then).
struct Consumers;

impl Team for Consumers {
    const THREADS: u32 = CONSUMER_THREADS;
    #[inline(always)]
    fn thread() -> u32 {
        thread_x() - HOPPER_PRODUCER_THREADS
    }
    #[inline(always)]
    fn sync() {
        named_barrier(BARRIER_CONSUMERS, CONSUMER_THREADS)
    }
}

/// Shared addresses of the ring: K and V stages and their mbarriers, and an 8-bit cache's K
/// and V byte stages.
#[derive(Clone, Copy)]
struct Ring<const HEAD_DIM: u32, const TILE: u32, const STAGES: u32> {
    k: u32,
    v: u32,
    k_bytes: u32,
    v_bytes: u32,
    bars: u32,
}

impl<const HEAD_DIM: u32, const TILE: u32, const STAGES: u32> Ring<HEAD_DIM, TILE, STAGES> {
    const STAGE_BYTES: u32 = TILE * HEAD_DIM * 2;
    /// Bytes of a K (or V) byte stage: a tile of 8-bit rows.
    const BYTE_STAGE_BYTES: u32 = TILE * HEAD_DIM;

    /// The ring after Q at `q_smem`, with `byte_stages` byte stages (8-bit caches) after it.
    #[inline(always)]
    fn after(q_smem: u32, byte_stages: u32) -> Self {
        let k = q_smem + HOPPER_PREFILL_ROWS * HEAD_DIM * 2;
        let v = k + STAGES * Self::STAGE_BYTES;
        let k_bytes = v + STAGES * Self::STAGE_BYTES;
        let v_bytes = k_bytes + byte_stages * Self::BYTE_STAGE_BYTES;
        Ring { k, v, k_bytes, v_bytes, bars: v_bytes + byte_stages * Self::BYTE_STAGE_BYTES }
    }

    #[inline(always)]
    fn k_stage(&self, stage: u32) -> u32 {
        self.k + stage * Self::STAGE_BYTES
    }
    #[inline(always)]
    fn v_stage(&self, stage: u32) -> u32 {
        self.v + stage * Self::STAGE_BYTES
    }
    /// Completes when the stage's copies have landed.
    #[inline(always)]
    fn full(&self, stage: u32) -> u32 {
        self.bars + 8 * stage
    }
    /// Completes when both consumer warpgroups are done with the stage.
    #[inline(always)]
    fn empty(&self, stage: u32) -> u32 {
        self.bars + 8 * (STAGES + stage)
    }
}

/// One unit of a block's list: a work item for one KV head, whose `tiles` key tiles are the
/// block's tiles `base..base + tiles`, counted over all its units (the block's tile `n` goes
/// through ring stage `n % STAGES` in round `n / STAGES`, which names its mbarriers' phase).
struct Unit {
    work: PrefillWorkItem,
    kv_head: u32,
    base: u32,
    tiles: u32,
}

/// The 16-bit types S and P · V run in, for queries of `H` over a cache of `Self`: the queries'
/// own over a 16-bit cache, f16 over an 8-bit one whatever the queries' type (K and V widen to
/// f16 in one conversion a pair, to bf16 it takes three more, through f32, on the producer's
/// critical path; P's probabilities are finer in f16 than in bf16; and bf16 queries, held in
/// registers over 8-bit caches, go to f16 exactly after a power-of-two scale a warp, which the
/// logit scale takes back).
pub trait ProductHalf<H: Wgmma> {
    type S: Wgmma;
    type Pv: Wgmma;
}
impl<H: Wgmma> ProductHalf<H> for F16 {
    type S = H;
    type Pv = H;
}
impl<H: Wgmma> ProductHalf<H> for Bf16 {
    type S = H;
    type Pv = H;
}
impl<H: Wgmma> ProductHalf<H> for E4m3 {
    type S = F16;
    type Pv = F16;
}
impl<H: Wgmma> ProductHalf<H> for E5m2 {
    type S = F16;
    type Pv = F16;
}

/// The kernel: `S_FRAGS = TILE / 8` n-fragments of S, `P_FRAGS = TILE / 16` A fragments of P,
/// `O_FRAGS = HEAD_DIM / 8` n-fragments of O (stable Rust cannot size arrays by expressions of
/// const parameters; the entry passes them and this checks them).
#[inline(always)]
pub unsafe fn prefill_hopper<
    H: Wgmma,
    K: KvElem + ProductHalf<H>,
    const HEAD_DIM: u32,
    const TILE: u32,
    const STAGES: u32,
    const BYTE_STAGES: u32,
    const S_FRAGS: usize,
    const P_FRAGS: usize,
    const O_FRAGS: usize,
>(
    p: &PrefillParams,
) {
    const {
        assert!(S_FRAGS == TILE as usize / 8 && P_FRAGS == TILE as usize / 16 && O_FRAGS == HEAD_DIM as usize / 8);
        assert!(TILE % 64 == 0 && HEAD_DIM % 64 == 0 && HEAD_DIM <= 256);
    };
    let tid = thread_x();
    let schedule = p.schedule as *const u32;
    let (first_unit, end_unit) = (*schedule.add(block_x() as usize), *schedule.add(block_x() as usize + 1));
    // Unit `at` of the block's list, whose tiles follow the block's first `base`.
    let unit = |at: u32, base: u32| {
        let unit = *schedule.add(at as usize);
        let (item, kv_head) = (unit / p.num_kv_heads, unit % p.num_kv_heads);
        let work = *(p.work as *const PrefillWorkItem).add(item as usize);
        Unit { work, kv_head, base, tiles: (work.kv_end - work.kv_start).div_ceil(TILE) }
    };
    let q_smem = dynamic_smem_addr();
    let ring = Ring::<HEAD_DIM, TILE, STAGES>::after(q_smem, BYTE_STAGES);
    const {
        assert!(
            hopper_prefill_bars_offset(HEAD_DIM, K::BYTES)
                == (HOPPER_PREFILL_ROWS + 2 * STAGES * TILE) * HEAD_DIM * 2 + 2 * BYTE_STAGES * TILE * HEAD_DIM
        );
        assert!(
            hopper_prefill_smem_bytes(HEAD_DIM, K::BYTES)
                == hopper_prefill_bars_offset(HEAD_DIM, K::BYTES) + 16 * STAGES + 16
        );
        assert!((K::BYTES == 2) == (BYTE_STAGES == 0));
    };

    if tid == 0 {
        let mut stage = 0;
        while stage < STAGES {
            mbarrier_init(ring.full(stage), HOPPER_PRODUCER_THREADS);
            mbarrier_init(ring.empty(stage), CONSUMER_THREADS);
            stage += 1;
        }
    }
    sync_threads();
    // Each warpgroup's role is one branch (`setmaxnreg` needs it so). Both run the block's
    // units in order; the ring's stages and phases continue from one unit to the next (`base`:
    // the tiles of the units before), so the producer gathers a unit's first tiles while the
    // consumers still work on the last one's.
    if tid < HOPPER_PRODUCER_THREADS {
        release_registers::<HOPPER_PRODUCER_REGISTERS>();
        let (mut at, mut base) = (first_unit, 0);
        while at < end_unit {
            let unit = unit(at, base);
            prefetch_queries::<HEAD_DIM>(p, &unit, tid);
            if K::BYTES == 2 {
                produce::<HEAD_DIM, TILE, STAGES>(p, &unit, ring, tid);
            } else {
                produce_widening::<K::S, K::Pv, K, HEAD_DIM, TILE, STAGES, BYTE_STAGES>(p, &unit, ring, tid);
            }
            (at, base) = (at + 1, base + unit.tiles);
        }
        // Leave only once this thread's copies have landed.
        commit_async_copies();
        wait_async_copies(0);
    } else {
        claim_registers::<HOPPER_CONSUMER_REGISTERS>();
        // The ping-pong turns (see `consume`) run on through the block's units: the second
        // warpgroup gives the first its first turn here, and the first takes the second's last
        // handover at the end of its last unit, so the counts balance.
        // The ABI's rule (`hopper_prefill_ping_pong`, the planner's too), written here and in
        // `consume` as `O_FRAGS <= 16`: as a `const` block it moved code of the head_dim 256
        // kernel.
        let ping_pong = O_FRAGS <= 16;
        const { assert!(hopper_prefill_ping_pong(HEAD_DIM) == (O_FRAGS <= 16)) };
        let warpgroup = tid / 128 - 1;
        if ping_pong && warpgroup == 1 {
            named_barrier_arrive(BARRIER_TURN, 2 * 128);
        }
        // Each unit's queries are on their way before it starts: the first unit's from here,
        // the next one's from the unit before, once its last S has read its Q rows (`consume`).
        // (With ping-pong only: at head_dim 256 each unit loads its own, as it starts.)
        if ping_pong && first_unit < end_unit {
            load_queries::<HEAD_DIM>(p, &unit(first_unit, 0), q_smem, tid);
        }
        let (mut at, mut base) = (first_unit, 0);
        while at < end_unit {
            let this = unit(at, base);
            let last = at + 1 == end_unit;
            // Two calls, not one closure testing `ping_pong`: that form, the same after constant
            // folding, made ptxas spill 12 bytes more in the ping-pong kernels.
            if ping_pong {
                let load_next = crate::inline_always!(|| {
                    if !last {
                        load_queries::<HEAD_DIM>(p, &unit(at + 1, 0), q_smem, tid);
                    }
                });
                consume::<H, K::S, K::Pv, K, HEAD_DIM, TILE, STAGES, S_FRAGS, P_FRAGS, O_FRAGS>(
                    p, &this, q_smem, ring, last, load_next, tid,
                );
            } else {
                consume::<H, K::S, K::Pv, K, HEAD_DIM, TILE, STAGES, S_FRAGS, P_FRAGS, O_FRAGS>(
                    p,
                    &this,
                    q_smem,
                    ring,
                    last,
                    || {},
                    tid,
                );
            }
            (at, base) = (at + 1, base + this.tiles);
        }
    }
}

/// Starts copying a unit's query rows of this consumer thread's warpgroup (64; zeros past the
/// request's last row) into the warpgroup's Q rows, in one commit group; `consume` waits.
#[inline(always)]
unsafe fn load_queries<const HEAD_DIM: u32>(p: &PrefillParams, unit: &Unit, q_smem: u32, tid: u32) {
    let (work, kv_head) = (&unit.work, unit.kv_head);
    let chunks = HEAD_DIM / 8;
    let group = p.group_size.divisor;
    let rows = work.qo_len * group;
    let wg_first_row = 64 * (tid / 128 - 1);
    let q = p.q as *const Vec16;
    let mut i = tid % 128;
    while i < 64 * chunks {
        let (row, chunk) = (wg_first_row + i / chunks, i % chunks);
        let packed = work.first_row + row;
        let valid = packed < rows;
        let (token, head) = p.group_size.divmod(packed);
        let src = ((work.q_start + token) * p.num_qo_heads + kv_head * group + head) as usize * chunks as usize
            + chunk as usize;
        copy_async_or_zero(
            q_smem + slab_offset(HOPPER_PREFILL_ROWS, row, chunk),
            q.add(if valid { src } else { 0 }),
            valid,
        );
        i += 128;
    }
    commit_async_copies();
}

/// Asks the L2 for a unit's query rows: the producer reaches a unit tiles before the consumers,
/// who load its rows only once they are done with the unit before.
#[inline(always)]
unsafe fn prefetch_queries<const HEAD_DIM: u32>(p: &PrefillParams, unit: &Unit, tid: u32) {
    let (work, kv_head) = (&unit.work, unit.kv_head);
    // 128-byte lines a row.
    let lines = HEAD_DIM * 2 / 128;
    let group = p.group_size.divisor;
    let rows = work.qo_len * group;
    let mut i = tid;
    while i < HOPPER_PREFILL_ROWS * lines {
        let packed = work.first_row + i / lines;
        if packed < rows {
            let (token, head) = p.group_size.divmod(packed);
            let row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
            prefetch_l2((p.q as *const u8).add(row as usize * HEAD_DIM as usize * 2 + (i % lines) as usize * 128));
        }
        i += HOPPER_PRODUCER_THREADS;
    }
}

/// A producer thread's part in gathering a tile's K and V rows (`K::BYTES` a value) from the
/// pages. Thread `tid` resolves key `tid % (TILE / 4)` of its warp's quarter of a tile; a copy
/// instruction moves whole rows (`32 / chunks` rows of `chunks` 16-byte chunks), its lanes
/// taking their row's pool offset from the resolving lane by a shuffle.
struct TileGather<K: KvElem, const HEAD_DIM: u32, const TILE: u32> {
    _elem: core::marker::PhantomData<K>,
    kv: PagedKv,
    warp: u32,
    lane: u32,
    /// The request's first and last key positions (keys past the end repeat the last one:
    /// their logits are masked, see `paged_tile`).
    first: u32,
    last: u32,
    /// This lane's 16-byte chunk of a row, and the pools advanced by it.
    chunk: u32,
    k_chunk: *const u8,
    v_chunk: *const u8,
    /// The pool offset, in head rows, of this KV head's row of page 0's slot 0; head rows per
    /// page and per slot.
    head_row: u32,
    page_rows: u32,
    slot_rows: u32,
}

impl<K: KvElem, const HEAD_DIM: u32, const TILE: u32> TileGather<K, HEAD_DIM, TILE> {
    const ROW_BYTES: u32 = HEAD_DIM * K::BYTES;
    const CHUNKS: u32 = Self::ROW_BYTES / 16;
    const WARP_ROWS: u32 = TILE / 4;
    const ROWS_PER_COPY: u32 = if Self::CHUNKS >= 32 { 1 } else { 32 / Self::CHUNKS };

    #[inline(always)]
    unsafe fn new(p: &PrefillParams, work: &PrefillWorkItem, kv_head: u32, tid: u32) -> Self {
        let kv = PagedKv::new(&p.cache, work.pages, kv_head);
        let lane = tid % 32;
        let chunk = lane % Self::CHUNKS;
        TileGather {
            _elem: core::marker::PhantomData,
            kv,
            warp: tid / 32,
            lane,
            first: work.kv_start,
            last: work.kv_end.max(work.kv_start + 1) - 1,
            chunk,
            k_chunk: kv.k_pages.add(chunk as usize * 16),
            v_chunk: kv.v_pages.add(chunk as usize * 16),
            head_row: kv.head_offset / HEAD_DIM,
            page_rows: kv.page_elems / HEAD_DIM,
            slot_rows: kv.slot_stride / HEAD_DIM,
        }
    }

    /// The pool offset, in head rows, of this lane's key of `tile` (a page-table load).
    #[inline(always)]
    unsafe fn look_up(&self, tile: u32) -> u32 {
        let position =
            (self.first + tile * TILE + self.warp * Self::WARP_ROWS + self.lane % Self::WARP_ROWS).min(self.last);
        let (page, slot) = self.kv.page_size.divmod(position);
        *self.kv.pages.add(page as usize) * self.page_rows + slot * self.slot_rows + self.head_row
    }

    /// Starts copying this warp's rows of the tile whose keys' offsets this warp's lanes hold
    /// (`offset`, from [`look_up`](Self::look_up)) to `k_dst` and `v_dst`, chunk `c` of row `r`
    /// at `place(r, c)`.
    #[inline(always)]
    unsafe fn copy(&self, offset: u32, k_dst: u32, v_dst: u32, place: impl Fn(u32, u32) -> u32) {
        let mut i = 0;
        while i < Self::WARP_ROWS / Self::ROWS_PER_COPY {
            let warp_row = i * Self::ROWS_PER_COPY + self.lane / Self::CHUNKS;
            let row_offset = shfl_idx_u32(offset, warp_row) as usize * Self::ROW_BYTES as usize;
            let dst = place(self.warp * Self::WARP_ROWS + warp_row, self.chunk);
            copy_async(k_dst + dst, self.k_chunk.add(row_offset).cast::<Vec16>());
            copy_async(v_dst + dst, self.v_chunk.add(row_offset).cast::<Vec16>());
            i += 1;
        }
    }
}

/// The producer warpgroup over a 16-bit cache: gathers a unit's tiles into the ring, each
/// stage's copies arriving on its "full" mbarrier as they land.
#[inline(always)]
unsafe fn produce<const HEAD_DIM: u32, const TILE: u32, const STAGES: u32>(
    p: &PrefillParams,
    unit: &Unit,
    ring: Ring<HEAD_DIM, TILE, STAGES>,
    tid: u32,
) {
    let gather = TileGather::<F16, HEAD_DIM, TILE>::new(p, &unit.work, unit.kv_head, tid);
    let mut tile = 0;
    while tile < unit.tiles {
        let n = unit.base + tile;
        let stage = n % STAGES;
        // The page id's load is in flight while the stage drains.
        let offset = gather.look_up(tile);
        if n >= STAGES {
            mbarrier_wait(ring.empty(stage), (n / STAGES + 1) % 2);
        }
        gather.copy(offset, ring.k_stage(stage), ring.v_stage(stage), |r, c| slab_offset(TILE, r, c));
        mbarrier_arrive_on_async_copies(ring.full(stage));
        tile += 1;
    }
}

/// The producer warpgroup over an 8-bit cache: gathers a unit's tile `n` bytes into byte stage
/// `n % BYTE_STAGES` (`BYTE_STAGES − 1` tiles in flight ahead), then widens them into the ring
/// once the consumers have emptied its stage (K into `H`, V into `PV`), and signals it full.
/// The consumers read the ring as over a 16-bit cache.
#[inline(always)]
unsafe fn produce_widening<
    H: Wgmma,
    PV: Wgmma,
    K: KvElem,
    const HEAD_DIM: u32,
    const TILE: u32,
    const STAGES: u32,
    const BYTE_STAGES: u32,
>(
    p: &PrefillParams,
    unit: &Unit,
    ring: Ring<HEAD_DIM, TILE, STAGES>,
    tid: u32,
) {
    // Instantiated, never called, over 16-bit caches.
    const { assert!(K::BYTES == 2 || BYTE_STAGES >= 2) };
    let tiles = unit.tiles;
    let gather = TileGather::<K, HEAD_DIM, TILE>::new(p, &unit.work, unit.kv_head, tid);
    let byte_stage = |tile: u32| (tile % BYTE_STAGES) * Ring::<HEAD_DIM, TILE, STAGES>::BYTE_STAGE_BYTES;
    // Byte stages hold plain rows: the widening reads them in order.
    let plain = |r: u32, c: u32| r * HEAD_DIM + c * 16;
    let issue = |tile: u32, offset: u32| {
        if tile < tiles {
            gather.copy(offset, ring.k_bytes + byte_stage(tile), ring.v_bytes + byte_stage(tile), plain);
        }
        // One commit group a tile, copies or not, so the count stays in step.
        commit_async_copies();
    };
    // Look-ups past the last tile load the last key's page again, harmless, but with no keys
    // there is no page to look up (an empty request's `kv_indices` entry may be past the end).
    let look_up_ahead = |tile: u32| if tiles > 0 { gather.look_up(tile) } else { 0 };
    // Everyone has widened the last unit's tiles before their byte stages refill.
    named_barrier(BARRIER_PRODUCER, HOPPER_PRODUCER_THREADS);
    let mut tile = 0;
    while tile + 1 < BYTE_STAGES {
        issue(tile, look_up_ahead(tile));
        tile += 1;
    }
    // Page ids are loaded an iteration before their copies are issued, so the load's latency
    // hides behind a widening instead of stalling the issue.
    let mut next = look_up_ahead(BYTE_STAGES - 1);
    let mut tile = 0;
    while tile < tiles {
        let ahead = tile + BYTE_STAGES - 1;
        let after = gather.look_up(ahead + 1);
        // This thread's copies of `tile` have landed; after the barrier everyone's have, and
        // everyone has widened `tile − 1`, whose byte stage `ahead` refills.
        wait_async_copies(BYTE_STAGES - 2);
        named_barrier(BARRIER_PRODUCER, HOPPER_PRODUCER_THREADS);
        issue(ahead, next);
        next = after;
        let (n, stage) = (unit.base + tile, (unit.base + tile) % STAGES);
        if n >= STAGES {
            mbarrier_wait(ring.empty(stage), (n / STAGES + 1) % 2);
        }
        let place = |r: u32, c: u32| slab_offset(TILE, r, c);
        let (k_src, v_src) = (ring.k_bytes + byte_stage(tile), ring.v_bytes + byte_stage(tile));
        widen_tile::<H, K, HEAD_DIM, TILE, HOPPER_PRODUCER_THREADS>(k_src, ring.k_stage(stage), place, tid);
        widen_tile::<PV, K, HEAD_DIM, TILE, HOPPER_PRODUCER_THREADS>(v_src, ring.v_stage(stage), place, tid);
        // The widened rows are plain shared stores, which `wgmma` (the async proxy) reads.
        fence_proxy_async();
        mbarrier_arrive(ring.full(stage));
        tile += 1;
    }
    wait_async_copies(0);
}

/// `2^e` for `e` in `-126..=127`.
#[inline(always)]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((127 + e) as u32) << 23)
}

/// The warp's query fragments (`H`, the first `HEAD_DIM / 16` k-steps) as `S` after scaling by
/// `2^-e`, `e` chosen from the warp's largest magnitude so that it lands in `[2^14, 2^15)` (f16's
/// top binade but one, room for rounding up): bf16 values become f16 ones exactly unless they
/// lie more than 2^28 below the warp's largest. Returns `e` (0 for a warp of zeros or with an
/// infinite query, which stays infinite; NaN stays NaN).
#[inline(always)]
fn requantise_queries<H: Wgmma, S: Wgmma, const HEAD_DIM: u32>(q_frags: &mut [[u32; 4]; 16]) -> i32 {
    let mut largest = 0.0f32;
    crate::unroll_to!(kk < HEAD_DIM / 16, {
        crate::unroll!(r in [0, 1, 2, 3] {
            let pair = q_frags[kk][r];
            largest = largest.max(H::to_f32(pair as u16).abs()).max(H::to_f32((pair >> 16) as u16).abs());
        });
    });
    crate::unroll!(mask in [1, 2, 4, 8, 16] {
        largest = largest.max(shfl_xor_f32(largest, mask as u32));
    });
    let binade = ((largest.to_bits() >> 23) & 0xFF) as i32 - 127;
    let e = if largest > 0.0 && largest.is_finite() { (binade - 14).clamp(-112, 113) } else { 0 };
    let down = pow2(-e);
    crate::unroll_to!(kk < HEAD_DIM / 16, {
        crate::unroll!(r in [0, 1, 2, 3] {
            let pair = q_frags[kk][r];
            q_frags[kk][r] = S::pack2(H::to_f32(pair as u16) * down, H::to_f32((pair >> 16) as u16) * down);
        });
    });
    e
}

/// A consumer warpgroup: 64 rows, every tile of the ring (S in `SQ`, P · V in `PV`), then the
/// output in `H` (or a partial and the merge of a split row tile).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn consume<
    H: Wgmma,
    SQ: Wgmma,
    PV: Wgmma,
    K: KvElem,
    const HEAD_DIM: u32,
    const TILE: u32,
    const STAGES: u32,
    const S_FRAGS: usize,
    const P_FRAGS: usize,
    const O_FRAGS: usize,
>(
    p: &PrefillParams,
    unit: &Unit,
    q_smem: u32,
    ring: Ring<HEAD_DIM, TILE, STAGES>,
    last_unit: bool,
    load_next: impl Fn(),
    tid: u32,
) {
    let (work, kv_head, base, tiles) = (&unit.work, unit.kv_head, unit.base, unit.tiles);
    let chunks = HEAD_DIM / 8;
    let group = p.group_size.divisor;
    let rows = work.qo_len * group;
    let warpgroup = uniform::<O_FRAGS>(tid / 128 - 1);
    let wg_first_row = 64 * warpgroup;
    let lane = tid % 32;
    let t = lane % 4;

    // This warpgroup's 64 query rows, made visible to `wgmma` before its first tile: with
    // ping-pong loading since the unit before (`load_next`), at head_dim 256 from here. (The
    // loop is `load_queries`' written out: called here, its code made ptxas spill 56 bytes at
    // head_dim 256.)
    if O_FRAGS > 16 {
        let q = p.q as *const Vec16;
        let mut i = tid % 128;
        while i < 64 * chunks {
            let (row, chunk) = (wg_first_row + i / chunks, i % chunks);
            let packed = work.first_row + row;
            let valid = packed < rows;
            let (token, head) = p.group_size.divmod(packed);
            let src = ((work.q_start + token) * p.num_qo_heads + kv_head * group + head) as usize * chunks as usize
                + chunk as usize;
            copy_async_or_zero(
                q_smem + slab_offset(HOPPER_PREFILL_ROWS, row, chunk),
                q.add(if valid { src } else { 0 }),
                valid,
            );
            i += 128;
        }
        commit_async_copies();
    }
    wait_async_copies(0);
    fence_proxy_async();
    named_barrier(BARRIER_WARPGROUP + warpgroup, 128);
    // Over an 8-bit cache S takes Q from registers (`wgmma`'s A operand, loaded once a unit):
    // the widened tiles are half as long as f16's at head_dim 128, so Q from shared memory
    // would be read twice as often a key, beside the widening's own shared-memory traffic.
    let q_in_registers = K::BYTES == 1 && O_FRAGS <= 16;
    let mut q_frags = [[0u32; 4]; 16];
    if q_in_registers {
        // `ldmatrix.x4` lane l names row l % 16 of its warp's 16 and the k-step's 8-dim half
        // l / 16: the four matrices come back in the A fragment's register order.
        let row = wg_first_row + 16 * ((tid / 32) % 4) + lane % 16;
        crate::unroll_to!(kk < HEAD_DIM / 16, {
            q_frags[kk] = load_matrix_x4(q_smem + slab_offset(HOPPER_PREFILL_ROWS, row, 2 * kk as u32 + lane / 16));
        });
    }
    // Queries of another type than S's (bf16 over an 8-bit cache) go to it scaled by a power
    // of two, a warp's (its 16 rows are S's): exact wherever the scaled value is normal.
    let q_exponent =
        if q_in_registers && H::BF16 != SQ::BF16 { requantise_queries::<H, SQ, HEAD_DIM>(&mut q_frags) } else { 0 };

    let diag = work.kv_len.saturating_sub(work.qo_len);
    let end = work.kv_end;
    let mut visibility =
        Visibility::<TILE, 4, 8> { p, diag, block_first_row: work.first_row, warp_rows: 16, all_lo: 0, all_hi: 0, end };
    let last_row = (work.first_row + HOPPER_PREFILL_ROWS).min(rows) - 1;
    (visibility.all_lo, visibility.all_hi) = (visibility.bounds(last_row).0, visibility.bounds(work.first_row).1);
    // The n-fragments of the unit's last tile that hold keys its rows may see: all, or the
    // first half when no row sees past it (on a causal diagonal, or at the item's end, the rest
    // is masked for every row), and then that tile's S, softmax and P·V run at half width.
    // Rows are tokens × group: with a group of 4 a unit's 128 rows are 32 tokens, whose
    // diagonal tile's visible keys end 32, 64, 96 or 128 keys into a 128-key tile, so half the
    // diagonal tiles halve. (Not at head_dim 256, which has no ping-pong: its last tile taken
    // apart spilled.)
    let last_live = if tiles == 0 || O_FRAGS > 16 {
        S_FRAGS
    } else {
        let first_key = work.kv_start + (tiles - 1) * TILE;
        let max_key = visibility.bounds(last_row).1.min(end - 1);
        let keys = (max_key + 1).saturating_sub(first_key);
        if keys <= TILE / 2 {
            S_FRAGS / 2
        } else {
            S_FRAGS
        }
    };

    // Over an 8-bit cache the block's KV head's K scale joins the logit scale (its V scale the
    // normalisation); 16-bit kernels have none.
    let sm_scale =
        if K::BYTES == 1 { p.sm_scale * kv_head_scale::<false>(p.kv_head_scales, kv_head) } else { p.sm_scale };
    let scale = LogitScale::new(sm_scale * pow2(q_exponent), p.logits_soft_cap);
    let mut state = RowState::new();
    let mut o = [[0.0f32; 4]; O_FRAGS];
    // Q's descriptor for this warpgroup's rows; k-step `kk` adds its slab and 32 bytes a step.
    let q_rows = q_smem + wg_first_row * SLAB_ROW_BYTES;
    // `on_live!(s, live, |p| body)`: `body` with `p` the first `live` n-fragments of `s` (4, 8
    // or all; `live` is a constant at each call, so one arm remains).
    macro_rules! on_live {
        ($s:expr, $live:expr, |$p:ident| $body:expr) => {
            match $live {
                4 => {
                    let $p = prefix_mut::<S_FRAGS, 4>($s);
                    $body
                }
                8 => {
                    let $p = prefix_mut::<S_FRAGS, 8>($s);
                    $body
                }
                _ => {
                    let $p = &mut *$s;
                    $body
                }
            }
        };
    }
    // S = Q·Kᵀ of `tile` (its stage landed), issued, not waited for.
    // Only the first `live` n-fragments (the tile's first `8 live` keys: the rows of a K-major
    // operand, so the same descriptor) are computed; `live` is a constant at each call.
    let issue_s = crate::inline_always!(|s: &mut [[f32; 4]; S_FRAGS], tile: u32, live: usize| {
        let k_tile = ring.k_stage(uniform::<O_FRAGS>((base + tile) % STAGES));
        let (q0, k0) = (smem_descriptor(q_rows, 16, 1024), smem_descriptor(k_tile, 16, 1024));
        crate::unroll_to!(kk < HEAD_DIM / 16, {
            let (slab, step) = (kk as u32 / 4, (kk as u32 % 4) * 32);
            let kd = operand::<O_FRAGS>(k_tile, k0, slab * TILE * SLAB_ROW_BYTES + step, 16);
            let accumulate = (kk > 0) as u32;
            if q_in_registers {
                on_live!(s, live, |prefix| SQ::mma_rk(prefix, q_frags[kk], kd, accumulate));
            } else {
                let qd = operand::<O_FRAGS>(q_rows, q0, slab * HOPPER_PREFILL_ROWS * SLAB_ROW_BYTES + step, 16);
                on_live!(s, live, |prefix| H::mma_ss(prefix, qd, kd, accumulate));
            }
        });
        wgmma_commit();
    });
    // Waits for S's first `live` n-fragments (as `issue_s` wrote them: the others' registers
    // hold the tile before's logits and stay out of the `wgmma` pipeline).
    let wait_s =
        crate::inline_always!(|s: &mut [[f32; 4]; S_FRAGS], live: usize| on_live!(
            s,
            live,
            |prefix| wgmma_wait_frags::<0, _>(prefix)
        ));
    let land = crate::inline_always!(|tile: u32| {
        mbarrier_wait(ring.full((base + tile) % STAGES), ((base + tile) / STAGES) % 2);
        fence_proxy_async();
    });
    // The softmax of `tile`'s S (O rescaled in place when a row's maximum moved far enough):
    // P, ready for P·V.
    let softmax = crate::inline_always!(|s: &mut [[f32; 4]; S_FRAGS],
                                         state: &mut RowState,
                                         o: &mut [[f32; 4]; O_FRAGS],
                                         tile: u32,
                                         masked: bool,
                                         live: usize| {
        // Fragments past `live` are left alone (they hold no logits of this tile).
        let first_key = work.kv_start + tile * TILE;
        let factor = on_live!(s, live, |prefix| scale.apply(prefix));
        if masked && O_FRAGS <= 16 {
            on_live!(s, live, |prefix| visibility.apply(0, prefix, first_key, t));
        } else if masked {
            visibility.apply_positions(0, s, first_key, t);
        }
        let rescale_o = |h: usize, rescale: f32| {
            crate::unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31] {
                if n < O_FRAGS {
                    o[n][2 * h] *= rescale;
                    o[n][2 * h + 1] *= rescale;
                }
            });
        };
        // With ping-pong the softmax's latency is the tile's (the other warpgroup's products
        // wait for it): the tile's maxima are computed only where the reference ones no longer
        // hold (a unit's first tile, rarely another).
        if O_FRAGS <= 16 {
            state.update_speculating::<PV, S_FRAGS, P_FRAGS>(s, live, factor, rescale_o)
        } else {
            state.update_rescaling::<PV, S_FRAGS, P_FRAGS>(s, live, factor, rescale_o)
        }
    });
    // O += P·V of `tile`, issued, not waited for: 16 keys a step; V's k-step is two 8-row
    // groups (1 KiB apart), its 64-dim slabs a whole slab apart.
    // (Keys past the first `8 live` have zero probabilities: their steps are skipped.)
    let issue_pv =
        crate::inline_always!(|o: &mut [[f32; 4]; O_FRAGS], probs: &[[u32; 4]; P_FRAGS], tile: u32, live: usize| {
            wgmma_fence();
            let v_tile = ring.v_stage(uniform::<O_FRAGS>((base + tile) % STAGES));
            let v0 = smem_descriptor(v_tile, TILE * SLAB_ROW_BYTES, 1024);
            crate::unroll_to!(kb < live.min(S_FRAGS) / 2, {
                let vd = operand::<O_FRAGS>(v_tile, v0, kb as u32 * 2048, TILE * SLAB_ROW_BYTES);
                PV::mma_rs(o, probs[kb], vd);
            });
            wgmma_commit();
        });
    // `last` and `live` below are constants at each call of a step (`wgmma`s of several widths
    // under one branch ptxas cannot prove uniform make it serialise them all); `masked` only
    // chooses whether the softmax masks, outside any `wgmma`'s flight.
    if O_FRAGS <= 16 {
        // The two warpgroups take turns at the tensor cores (FlashAttention-3's ping-pong): a
        // warpgroup's matrix phase (P·V of tile j, then S of tile j + 1) starts only once the
        // other's has been issued, so each one's softmax runs while the other's products do.
        // Barrier `BARRIER_TURN + w` opens warpgroup w's phase: it waits there, the other
        // arrives there after issuing its phase. Both have `tiles + 1` phases a unit (one more
        // when its last tile is halved, below); the turns run on from one unit to the next
        // (the block gives the first one and takes the last, `prefill_hopper`), so a
        // warpgroup starts a unit as soon as the other has issued its last products of the one
        // before, not after that one's output.
        let (my_turn, other_turn) = (BARRIER_TURN + warpgroup, BARRIER_TURN + 1 - warpgroup);
        let mut s = [[0.0f32; 4]; S_FRAGS];
        // A phase of S alone: the unit's first tile's, or its halved last one's.
        let s_alone = crate::inline_always!(|s: &mut [[f32; 4]; S_FRAGS], tile: u32, live: usize| {
            land(tile);
            named_barrier(my_turn, 2 * 128);
            wgmma_fence();
            issue_s(s, tile, live);
            named_barrier_arrive(other_turn, 2 * 128);
            wait_s(s, live);
        });
        // Tile `tile`'s softmax (its first `live` n-fragments; the mask where `masked`) and
        // P·V, with the next tile's S unless `last`.
        let mut step = crate::inline_always!(|s: &mut [[f32; 4]; S_FRAGS],
                                              tile: u32,
                                              masked: bool,
                                              last: bool,
                                              live: usize,
                                              queries: bool| {
            let probs = softmax(s, &mut state, &mut o, tile, masked, live);
            if !last {
                land(tile + 1);
            }
            named_barrier(my_turn, 2 * 128);
            issue_pv(&mut o, &probs, tile, live);
            if !last {
                issue_s(s, tile + 1, S_FRAGS);
            }
            named_barrier_arrive(other_turn, 2 * 128);
            // The unit's last S has read this warpgroup's Q rows (`queries`, in its last step):
            // the next unit's come in while P·V and the output finish.
            if last && queries {
                load_next();
            }
            wgmma_wait_frags::<0, O_FRAGS>(&mut o);
            if !last {
                wgmma_wait_frags::<0, S_FRAGS>(s);
            }
            mbarrier_arrive(ring.empty((base + tile) % STAGES));
        });
        // A unit whose last tile no row sees past half of (`last_live`) runs it apart, in two
        // phases of its own (S alone, then softmax and P·V) at half width, after the tiles
        // before it as a unit of one tile fewer: one phase more, for both warpgroups alike
        // (`last_live` is the unit's). So each step is one copy of code for every unit: a copy
        // for each width and mask of the last two steps (nine steps in all, 80% more code)
        // made the kernel slower at 1024 tokens than the tensor work saved (docs/perf.md).
        if tiles == 0 {
            load_next();
        }
        let halved = last_live < S_FRAGS;
        let chained = tiles - halved as u32;
        let mut tile = 0;
        if chained > 0 {
            s_alone(&mut s, 0, S_FRAGS);
            while tile + 1 < chained {
                step(&mut s, tile, visibility.masks(work.kv_start + tile * TILE), false, S_FRAGS, false);
                tile += 1;
            }
            // The unit's last S has read this warpgroup's Q rows: the next unit's queries may
            // come in while the last tile and the output finish.
            step(&mut s, tile, visibility.masks(work.kv_start + tile * TILE), true, S_FRAGS, !halved);
            tile += 1;
        }
        if halved {
            // Registers of its own: sharing the full S's, ptxas found no allocation that fits
            // both widths' `wgmma` and serialised them.
            let mut s_last = [[0.0f32; 4]; S_FRAGS];
            s_alone(&mut s_last, tile, S_FRAGS / 2);
            step(&mut s_last, tile, true, true, S_FRAGS / 2, true);
        }
        if last_unit && warpgroup == 0 {
            named_barrier(my_turn, 2 * 128);
        }
    } else {
        // At head_dim 256 the 128 O accumulators leave no registers for the next tile's S
        // beside this one's P (ping-pong spilled and ran 35% slower): each warpgroup runs its
        // tiles one after the other, S, softmax, P·V, and the two only overlap by chance.
        let mut step = crate::inline_always!(|tile: u32, masked: bool| {
            land(tile);
            let mut s = [[0.0f32; 4]; S_FRAGS];
            wgmma_fence();
            issue_s(&mut s, tile, S_FRAGS);
            wgmma_wait_frags::<0, S_FRAGS>(&mut s);
            let probs = softmax(&mut s, &mut state, &mut o, tile, masked, S_FRAGS);
            issue_pv(&mut o, &probs, tile, S_FRAGS);
            wgmma_wait_frags::<0, O_FRAGS>(&mut o);
            mbarrier_arrive(ring.empty((base + tile) % STAGES));
        });
        let mut tile = 0;
        while tile < tiles {
            if visibility.masks(work.kv_start + tile * TILE) {
                step(tile, true);
            } else {
                step(tile, false);
            }
            tile += 1;
        }
    }

    // Rows `g` and `g + 8` of the thread's warp, 8-dim blocks `8n + 2t`; an 8-bit cache's V
    // scales, the layer's and the KV head's.
    let my_first_row = visibility.thread_first_row(thread_x_here());
    let v_scale = if K::BYTES == 1 { p.v_scale * kv_head_scale::<true>(p.kv_head_scales, kv_head) } else { 1.0 };
    let split = work.slot != NO_PARTIAL;
    if O_FRAGS <= 16 && !split {
        // With ping-pong the output leaves from registers (`store_output_rows`): the Q rows are the
        // next unit's by now (`load_next`), so it cannot be staged there.
        store_output_rows::<H, O_FRAGS>(p, work, kv_head, &state, &o, my_first_row, v_scale, tid);
        return;
    }
    // Otherwise (a split part's partial output, or head_dim 256, where from registers ptxas
    // spilled 276 bytes) it goes through this warpgroup's Q rows, free now at head_dim 256
    // (its last S has completed; the other warpgroup reads only its own rows), in Q's swizzled
    // slab layout: the fragments' 4-byte stores there are free of bank conflicts, and whole rows
    // leave in 16-byte stores (a 4-byte global store a fragment pair kept the load/store unit's
    // queue full, docs/perf.md).
    crate::unroll!(h in [0, 1] {
        let d = state.row_sum(h);
        let row = my_first_row + 8 * h as u32;
        if row < rows {
            let (token, head) = p.group_size.divmod(row);
            // A split tile's sink waits for the merge (partials are sink-free).
            let sink = if split { f32::NEG_INFINITY } else { sink_logit(p.sinks, kv_head * group + head) };
            let (inv, lse) = finish_row(state.m[h], d, sink);
            // V's dequantisation scale goes with the normalisation (merging is linear).
            let inv = if K::BYTES == 1 { inv * v_scale } else { inv };
            let first_dim = (2 * t) as usize;
            if split {
                let prow =
                    ((work.slot * p.num_kv_heads + kv_head) * HOPPER_PREFILL_ROWS + row - work.first_row) as usize;
                let dst = (p.split.partial_out as *mut f32).add(prow * HEAD_DIM as usize + first_dim);
                crate::unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31] {
                    if n < O_FRAGS {
                        *dst.add(8 * n) = o[n][2 * h] * inv;
                        *dst.add(8 * n + 1) = o[n][2 * h + 1] * inv;
                    }
                });
                if t == 0 {
                    *(p.split.partial_lse as *mut f32).add(prow) = lse;
                }
            } else {
                let staged = q_smem + (4 * t) as u32;
                crate::unroll!(n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31] {
                    if n < O_FRAGS {
                        let at = staged + slab_offset(HOPPER_PREFILL_ROWS, row - work.first_row, n as u32);
                        store_shared_u32(at, H::pack2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv));
                    }
                });
                if p.lse != 0 && t == 0 {
                    let out_row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
                    *(p.lse as *mut f32).add(out_row as usize) = lse;
                }
            }
        }
    });
    if !split {
        named_barrier(BARRIER_WARPGROUP + warpgroup, 128);
        // Row `i / chunks` of the warpgroup's 64, 16-byte chunk `i % chunks`: consecutive
        // threads write consecutive bytes of a row.
        let mut i = tid % 128;
        while i < 64 * chunks {
            let (row, chunk) = (wg_first_row + i / chunks, i % chunks);
            let packed = work.first_row + row;
            if packed < rows {
                let (token, head) = p.group_size.divmod(packed);
                let out_row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
                let value = load_shared_u32x4(q_smem + slab_offset(HOPPER_PREFILL_ROWS, row, chunk));
                store((p.out as *mut Vec16).add(out_row as usize * chunks as usize + chunk as usize), Vec16(value));
            }
            i += 128;
        }
        return;
    }
    // The last part of the row tile to finish (for this KV head) merges all of them, with the
    // consumer threads only; the ring is free by now (a block with a split item runs no other
    // unit, so the producer has nothing left to gather), the flag lives past the mbarriers.
    let last_flag = dynamic_smem::<u32>().add((hopper_prefill_smem_bytes(HEAD_DIM, K::BYTES) / 4 - 1) as usize);
    let counter = (p.split.merge_counters as *mut u32).add((work.counters + kv_head) as usize);
    if !last_to_finish::<Consumers>(counter, work.parts, last_flag) {
        return;
    }
    let partial_row = |part: u32, row: u32| {
        ((work.first_slot + part) * p.num_kv_heads + kv_head) as usize * HOPPER_PREFILL_ROWS as usize + row as usize
    };
    let tile_rows = (rows - work.first_row).min(HOPPER_PREFILL_ROWS);
    merge::<Consumers, HEAD_DIM>(&p.split, work.parts, tile_rows, partial_row, |row, chunk, o, lse| {
        let (token, head) = p.group_size.divmod(work.first_row + row);
        let out_row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
        let (o, lse) = fold_sink(o, lse, sink_logit(p.sinks, kv_head * group + head));
        store_output::<H, HEAD_DIM>(p.out, p.lse, out_row as usize, chunk, &o, lse)
    });
}

/// The `wgmma` descriptor of the operand `offset` bytes into the tile at shared address `addr`
/// (`leading` bytes between its 8 × 128-byte atoms), whose own descriptor is `base`: one
/// addition to `base`, in uniform registers with [`uniform`]'s stage. At head_dim 256
/// (`O_FRAGS > 16`) built afresh as before: the addition made that kernel 1.4–2.2% slower
/// (docs/perf.md, twenty-eighth session).
#[inline(always)]
fn operand<const O_FRAGS: usize>(addr: u32, base: u64, offset: u32, leading: u32) -> u64 {
    if O_FRAGS <= 16 {
        descriptor_plus(base, offset)
    } else {
        smem_descriptor(addr + offset, leading, 1024)
    }
}

/// [`warp_uniform`] (the stage's and the Q rows' `wgmma` descriptors then live in uniform
/// registers), but not at head_dim 256 (`O_FRAGS > 16`), where ptxas then spilled.
#[inline(always)]
fn uniform<const O_FRAGS: usize>(x: u32) -> u32 {
    if O_FRAGS <= 16 {
        warp_uniform(x)
    } else {
        x
    }
}

/// The first `L` n-fragments of `acc` (a prefix, so the `wgmma` of a narrower tile writes the
/// same registers as the first columns of the full one).
#[inline(always)]
fn prefix_mut<const N: usize, const L: usize>(acc: &mut [[f32; 4]; N]) -> &mut [[f32; 4]; L] {
    if L > N {
        crate::gpu::trap();
    }
    // SAFETY: `L <= N` (checked), so the first `L` entries lie inside `acc`.
    unsafe { &mut *(acc as *mut [[f32; 4]; N] as *mut [[f32; 4]; L]) }
}

/// Writes a unit's output rows of this thread (packed rows `my_first_row` and `my_first_row +
/// 8`, dims `8n + 2t..`) and their LSE from the O accumulators, in 16-byte stores: the four
/// threads of a quad hold the 8 dims of each 8-dim block as four pairs, and exchange them
/// (three shuffles for four blocks) so that each holds one block's 16 contiguous bytes (a
/// 4-byte global store a pair kept the load/store unit's queue full, docs/perf.md). Every lane
/// shuffles; only rows of the request store.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn store_output_rows<H: Wgmma, const O_FRAGS: usize>(
    p: &PrefillParams,
    work: &PrefillWorkItem,
    kv_head: u32,
    state: &RowState,
    o: &[[f32; 4]; O_FRAGS],
    my_first_row: u32,
    v_scale: f32,
    tid: u32,
) {
    let (group, chunks) = (p.group_size.divisor, O_FRAGS);
    let rows = work.qo_len * group;
    let lane = tid % 32;
    let t = lane % 4;
    let quad = lane & !3;
    crate::unroll!(h in [0, 1] {
        let d = state.row_sum(h);
        let row = my_first_row + 8 * h as u32;
        let valid = row < rows;
        let (token, head) = p.group_size.divmod(row);
        let sink = if valid { sink_logit(p.sinks, kv_head * group + head) } else { f32::NEG_INFINITY };
        let (inv, lse) = finish_row(state.m[h], d, sink);
        // V's dequantisation scale (1 for a 16-bit cache) goes with the normalisation.
        let inv = inv * v_scale;
        let out_row = (work.q_start + token) * p.num_qo_heads + kv_head * group + head;
        let dst = (p.out as *mut Vec16).add(out_row as usize * chunks as usize);
        crate::unroll!(m in [0, 1, 2, 3] {
            if 4 * m < O_FRAGS {
                // Blocks 4m..4m + 3; thread t ends with block 4m + t. Round r sends this
                // thread's pair of block 4m + (t + r) % 4 to thread (t + r) % 4 and takes
                // thread (t − r) % 4's pair of block 4m + t.
                // Arrays written out, not `array::map`: its instances, though never run at head_dim
                // 256, changed that kernel's code and made ptxas spill there.
                let pair = |j: usize| H::pack2(o[4 * m + j][2 * h] * inv, o[4 * m + j][2 * h + 1] * inv);
                let pairs = [pair(0), pair(1), pair(2), pair(3)];
                let send = rotate_left(pairs, t);
                let take = |r: u32| shfl_idx_u32(send[r as usize], quad + (t + 4 - r) % 4);
                let taken = [send[0], take(1), take(2), take(3)];
                // taken[r] is thread (t − r)'s pair: in dim order, pair j is taken[(t − j) % 4].
                let block = rotate_right([taken[0], taken[3], taken[2], taken[1]], t);
                if valid {
                    store(dst.add(4 * m + t as usize), Vec16(block));
                }
            }
        });
        if valid && p.lse != 0 && t == 0 {
            *(p.lse as *mut f32).add(out_row as usize) = lse;
        }
    });
}

/// `v` rotated left by `by` places (`[v[by], v[by + 1], …]`), `by` in 0..4 at run time: two
/// selects a word, where indexing by `by` would go through local memory.
#[inline(always)]
fn rotate_left(v: [u32; 4], by: u32) -> [u32; 4] {
    let v = if by & 1 != 0 { [v[1], v[2], v[3], v[0]] } else { v };
    if by & 2 != 0 {
        [v[2], v[3], v[0], v[1]]
    } else {
        v
    }
}

/// `v` rotated right by `by` places (`[v[−by], …]`, indices mod 4), as [`rotate_left`].
#[inline(always)]
fn rotate_right(v: [u32; 4], by: u32) -> [u32; 4] {
    rotate_left(v, (4 - by) % 4)
}
