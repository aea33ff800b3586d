//! The machine: blocks run one after another; a block's threads are coroutines that run until
//! they reach a collective (a barrier, a warp shuffle or vote, `ldmatrix`, `mma`), which
//! completes once every participant has reached it. Global memory is the host's (kernel
//! pointers are host addresses of [`DeviceBuffer`]s); shared memory is one buffer a block,
//! addressed by a 32-bit window address as on the GPU.
//!
//! What it checks that a GPU would not tell: a warp collective reached by only some lanes or
//! by lanes at different collectives, a deadlock (a barrier some threads never reach, an
//! mbarrier phase that never completes, `setmaxnreg.inc` asking for registers the block's pool
//! will never hold), shared-memory accesses outside the launch's bytes or
//! misaligned, global accesses through the checked helpers outside every buffer, mbarriers used
//! before their initialisation, and (by guard pages) any access just past a buffer's or the
//! shared memory's end. Asynchronous copies land when their thread waits for them, not
//! before; copies tied to an mbarrier (`cp.async`'s arrival, a TMA box's transaction bytes)
//! land only when no thread can go on without them;
//! shared memory starts as 0xFF bytes (NaN in f16, bf16 and f32): a read that a missing wait or
//! barrier leaves stale shows up in the results. `wgmma` runs when issued (its reads of shared
//! memory happen then; the GPU may read later).
use std::cell::{Cell, RefCell};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};

/// Shared-memory window address of a block's dynamic shared memory (1 KiB aligned, as the
/// kernels assume; not 0, so that an address computed from nothing is caught).
pub const SHARED_BASE: u32 = 0x400;
const WARP: usize = 32;
const PAGE: usize = 4096;
const STACK_BYTES: usize = 1 << 20;

/// What a thread waits for at a collective.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Op {
    /// `bar.sync id, threads` (`wait`) or `bar.arrive id, threads`.
    Barrier {
        id: u32,
        threads: u32,
        wait: bool,
    },
    SyncWarp,
    ShuffleXor {
        value: u32,
        mask: u32,
    },
    ShuffleIdx {
        value: u32,
        src: u32,
    },
    Vote {
        pred: bool,
    },
    LoadMatrix {
        addr: u32,
        trans: bool,
    },
    Mma {
        acc: [f32; 4],
        a: [u32; 4],
        b: [u32; 2],
        bf16: bool,
    },
    /// `mbarrier.try_wait.parity` until it succeeds: a wait of this thread alone.
    MbarrierWait {
        bar: u32,
        parity: u32,
    },
    /// `setmaxnreg.inc` until the block's pool holds `regs` a thread for it: a wait of this
    /// thread alone.
    RegisterClaim {
        regs: u32,
    },
}

impl Op {
    fn same_collective(&self, other: &Op) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && match (self, other) {
                (Op::LoadMatrix { trans: a, .. }, Op::LoadMatrix { trans: b, .. }) => a == b,
                (Op::Mma { bf16: a, .. }, Op::Mma { bf16: b, .. }) => a == b,
                _ => true,
            }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Reply {
    None,
    Word(u32),
    Quad([u32; 4]),
    Acc([f32; 4]),
}

/// A launch's shape: `grid.0 × grid.1` blocks of `threads` threads with `smem_bytes` of dynamic
/// shared memory.
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid: (u32, u32),
    pub threads: u32,
    pub smem_bytes: u32,
}

/// Why a launch failed: the block and thread, and what happened.
#[derive(Debug)]
pub struct Fault {
    pub block: (u32, u32),
    pub thread: Option<u32>,
    pub what: String,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.thread {
            Some(t) => write!(f, "block {:?}, thread {t}: {}", self.block, self.what),
            None => write!(f, "block {:?}: {}", self.block, self.what),
        }
    }
}

impl std::error::Error for Fault {}

/// An asynchronous 16-byte copy (`cp.async`), performed when its thread waits for its group.
#[derive(Clone, Copy)]
struct AsyncCopy {
    dst: u32,
    src: u64,
    valid: bool,
}

/// Copies a thread tied to an mbarrier: on landing, an arrival (`tx` 0) or `complete_tx` of
/// `tx` bytes.
struct TrackedCopies {
    thread: u32,
    copies: Vec<AsyncCopy>,
    bar: u32,
    tx: u32,
}

#[derive(Default)]
struct AsyncCopies {
    open: Vec<AsyncCopy>,
    committed: Vec<Vec<AsyncCopy>>,
}

/// The running block, as the primitives see it.
pub(crate) struct Block {
    pub index: (u32, u32),
    pub grid: (u32, u32),
    pub threads: u32,
    smem: *mut u8,
    smem_bytes: u32,
    copies: RefCell<Vec<AsyncCopies>>,
    mbarriers: RefCell<std::collections::HashMap<u32, Mbarrier>>,
    /// Copies whose completion a thread tied to an mbarrier (`cp.async.mbarrier.arrive`: an
    /// arrival, transaction bytes 0; a TMA box: its bytes of `complete_tx`): they land, and
    /// arrive or complete, only when nothing else can run (as late as the GPU may).
    tracked: RefCell<Vec<TrackedCopies>>,
    /// Registers each thread holds, and those free in the block's pool (`setmaxnreg`): a block
    /// starts with what its entry was given (`abi::entry_registers` a thread), none free.
    registers: RefCell<(Vec<u32>, u32)>,
}

/// An mbarrier's state: arrivals a phase, arrivals still missing in this phase, phases done,
/// transaction bytes expected and not yet completed in this phase (below zero while copies
/// complete before their `expect_tx`, as the PTX ISA allows).
struct Mbarrier {
    count: u32,
    pending: u32,
    phase: u32,
    tx: i64,
}

impl Mbarrier {
    /// The phase completes once every arrival is in and every expected byte has landed.
    fn advance(&mut self) {
        if self.pending == 0 && self.tx == 0 {
            self.phase += 1;
            self.pending = self.count;
        }
    }
}

thread_local! {
    static BLOCK: Cell<*const Block> = const { Cell::new(std::ptr::null()) };
    static THREAD: Cell<u32> = const { Cell::new(0) };
    static YIELDER: Cell<*const Yielder<Reply, Op>> = const { Cell::new(std::ptr::null()) };
    static BUFFERS: RefCell<Vec<(usize, usize, &'static str)>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn block() -> &'static Block {
    let b = BLOCK.with(|b| b.get());
    assert!(!b.is_null(), "a GPU primitive was called outside an emulated launch");
    // SAFETY: set by `run_block` to a block that outlives every coroutine of it.
    unsafe { &*b }
}

pub(crate) fn thread() -> u32 {
    THREAD.with(|t| t.get())
}

/// Suspends the calling thread at collective `op` until every participant has reached it.
pub(crate) fn collective(op: Op) -> Reply {
    let y = YIELDER.with(|y| y.get());
    assert!(!y.is_null(), "a collective outside an emulated launch");
    // SAFETY: the running coroutine's yielder, set when it started (and restored below: the
    // scheduler clears it while no coroutine runs).
    let reply = unsafe { (*y).suspend(op) };
    YIELDER.with(|c| c.set(y));
    reply
}

impl Block {
    /// Host pointer to `bytes` bytes of shared memory at window address `addr`, checked.
    pub(crate) fn shared(&self, addr: u32, bytes: u32, align: u32) -> *mut u8 {
        let end = SHARED_BASE as u64 + self.smem_bytes as u64;
        if addr < SHARED_BASE || addr as u64 + bytes as u64 > end {
            panic!(
                "shared access of {bytes} bytes at {addr:#x}, outside the launch's {} bytes ({SHARED_BASE:#x}..{end:#x})",
                self.smem_bytes
            );
        }
        if !addr.is_multiple_of(align) {
            panic!("shared access of {bytes} bytes at {addr:#x}, not {align}-byte aligned");
        }
        // SAFETY: within the block's shared buffer (checked above).
        unsafe { self.smem.add((addr - SHARED_BASE) as usize) }
    }

    pub(crate) fn smem_base(&self) -> *mut u8 {
        self.smem
    }

    pub(crate) fn copy_async(&self, dst: u32, src: u64, valid: bool) {
        self.shared(dst, 16, 16);
        if valid {
            check_global(src, 16, 16, "cp.async source");
        }
        self.copies.borrow_mut()[thread() as usize].open.push(AsyncCopy { dst, src, valid });
    }

    pub(crate) fn commit_copies(&self) {
        let mut all = self.copies.borrow_mut();
        let mine = &mut all[thread() as usize];
        let group = std::mem::take(&mut mine.open);
        mine.committed.push(group);
    }

    /// Performs this thread's committed groups but the newest `pending` (and first any copies it
    /// tied to an mbarrier, which a `wait_group` waits for too).
    pub(crate) fn wait_copies(&self, pending: u32) {
        self.land_tracked(Some(thread()));
        let mut all = self.copies.borrow_mut();
        let mine = &mut all[thread() as usize];
        let land = mine.committed.len().saturating_sub(pending as usize);
        let groups: Vec<AsyncCopy> = mine.committed.drain(..land).flatten().collect();
        drop(all);
        self.land(groups);
    }
}

impl Block {
    fn land(&self, copies: Vec<AsyncCopy>) {
        for c in copies {
            let dst = self.shared(c.dst, 16, 16);
            // SAFETY: `dst` is 16 checked bytes of shared memory; a valid source was checked
            // against the buffers when the copy was issued.
            unsafe {
                if c.valid {
                    std::ptr::copy_nonoverlapping(c.src as *const u8, dst, 16);
                } else {
                    std::ptr::write_bytes(dst, 0, 16);
                }
            }
        }
    }

    /// `setmaxnreg.dec` to `regs`: the thread's registers past them go back to the pool.
    pub(crate) fn release_registers(&self, regs: u32) {
        let mut r = self.registers.borrow_mut();
        let held = r.0[thread() as usize];
        assert!(regs <= held && regs.is_multiple_of(8), "setmaxnreg.dec to {regs} registers from {held}");
        r.0[thread() as usize] = regs;
        r.1 += held - regs;
    }

    /// Whether the pool holds what thread `t` lacks of `regs` registers.
    fn pool_holds(&self, t: u32, regs: u32) -> bool {
        let r = self.registers.borrow();
        r.1 >= regs.saturating_sub(r.0[t as usize])
    }

    /// `setmaxnreg.inc` to `regs`: takes the registers from the pool if it holds them.
    pub(crate) fn claim_registers(&self, regs: u32) -> bool {
        let held = self.registers.borrow().0[thread() as usize];
        assert!(
            regs >= held && regs.is_multiple_of(8) && regs <= 256,
            "setmaxnreg.inc to {regs} registers from {held}"
        );
        if !self.pool_holds(thread(), regs) {
            return false;
        }
        let mut r = self.registers.borrow_mut();
        r.0[thread() as usize] = regs;
        r.1 -= regs - held;
        true
    }

    pub(crate) fn mbarrier_init(&self, bar: u32, count: u32) {
        self.shared(bar, 8, 8);
        assert!(count > 0, "mbarrier at {bar:#x} initialised for 0 arrivals");
        self.mbarriers.borrow_mut().insert(bar, Mbarrier { count, pending: count, phase: 0, tx: 0 });
    }

    /// An arrival on `bar` that first expects `tx_bytes` more of transactions in this phase.
    pub(crate) fn mbarrier_arrive_expect(&self, bar: u32, tx_bytes: u32) {
        let mut all = self.mbarriers.borrow_mut();
        let b = all.get_mut(&bar).unwrap_or_else(|| panic!("arrival on mbarrier {bar:#x}, never initialised"));
        assert!(b.pending > 0, "arrival on mbarrier {bar:#x} past its count");
        b.tx += tx_bytes as i64;
        b.pending -= 1;
        b.advance();
    }

    pub(crate) fn mbarrier_arrive(&self, bar: u32) {
        self.mbarrier_arrive_expect(bar, 0);
    }

    /// `complete_tx` of `bytes` on `bar` (a TMA box landed).
    fn mbarrier_complete_tx(&self, bar: u32, bytes: u32) {
        let mut all = self.mbarriers.borrow_mut();
        let b = all.get_mut(&bar).unwrap_or_else(|| panic!("transactions on mbarrier {bar:#x}, never initialised"));
        b.tx -= bytes as i64;
        b.advance();
    }

    /// A TMA box (`cp.async.bulk.tensor.2d`, 16-bit elements, the 128-byte swizzle): `rows`
    /// rows of `row_bytes` (16-byte chunks) from `src(row)` (`None`: out of bounds, zeros)
    /// into shared memory from `dst` on (128-byte aligned, each row 128 bytes on, the swizzle
    /// computed from the address as `wgmma` reads it), completing `rows · row_bytes` on `bar`.
    pub(crate) fn tma_box(&self, dst: u32, rows: u32, row_bytes: u32, src: impl Fn(u32) -> Option<u64>, bar: u32) {
        assert!(dst.is_multiple_of(128) && row_bytes == 128, "TMA box at {dst:#x} of {row_bytes}-byte rows");
        assert!(self.mbarriers.borrow().contains_key(&bar), "TMA box on mbarrier {bar:#x}, never initialised");
        let mut copies = Vec::new();
        for r in 0..rows {
            let row = src(r);
            for c in 0..row_bytes / 16 {
                let addr = dst + r * 128 + 16 * c;
                let physical = addr ^ (((addr >> 7) & 7) << 4);
                self.shared(physical, 16, 16);
                let from = row.map(|base| base + 16 * c as u64);
                if let Some(from) = from {
                    check_global(from, 16, 16, "TMA source");
                }
                copies.push(AsyncCopy { dst: physical, src: from.unwrap_or(0), valid: from.is_some() });
            }
        }
        self.tracked.borrow_mut().push(TrackedCopies { thread: thread(), copies, bar, tx: rows * row_bytes });
    }

    /// Ties this thread's copies so far to an arrival on `bar` once they land.
    pub(crate) fn mbarrier_arrive_on_copies(&self, bar: u32) {
        assert!(self.mbarriers.borrow().contains_key(&bar), "copies tied to mbarrier {bar:#x}, never initialised");
        let mut all = self.copies.borrow_mut();
        let mine = &mut all[thread() as usize];
        let mut copies: Vec<AsyncCopy> = mine.committed.drain(..).flatten().collect();
        copies.append(&mut mine.open);
        self.tracked.borrow_mut().push(TrackedCopies { thread: thread(), copies, bar, tx: 0 });
    }

    /// Whether the phase of parity `parity` of the mbarrier at `bar` has completed (the phase
    /// before the first counts as completed, as on the GPU).
    pub(crate) fn mbarrier_phase_done(&self, bar: u32, parity: u32) -> bool {
        let all = self.mbarriers.borrow();
        let b = all.get(&bar).unwrap_or_else(|| panic!("wait on mbarrier {bar:#x}, never initialised"));
        b.phase % 2 != parity % 2
    }

    /// Lands the tracked copies (of `thread`, or all) and makes their arrivals; whether any.
    fn land_tracked(&self, thread: Option<u32>) -> bool {
        let batches: Vec<TrackedCopies> = {
            let mut tracked = self.tracked.borrow_mut();
            let (mine, rest) = tracked.drain(..).partition(|c| thread.is_none_or(|want| want == c.thread));
            *tracked = rest;
            mine
        };
        let any = !batches.is_empty();
        for TrackedCopies { copies, bar, tx, .. } in batches {
            self.land(copies);
            match tx {
                0 => self.mbarrier_arrive(bar),
                bytes => self.mbarrier_complete_tx(bar, bytes),
            }
        }
        any
    }
}

/// Panics unless `bytes` bytes at `addr` lie in one live [`DeviceBuffer`] and are aligned.
pub(crate) fn check_global(addr: u64, bytes: usize, align: u64, what: &str) {
    if !addr.is_multiple_of(align) {
        panic!("{what}: {bytes} bytes at {addr:#x}, not {align}-byte aligned");
    }
    let a = addr as usize;
    let inside = BUFFERS.with(|b| b.borrow().iter().any(|&(start, len, _)| a >= start && a + bytes <= start + len));
    if !inside {
        let near = BUFFERS.with(|b| {
            b.borrow()
                .iter()
                .map(|&(start, len, name)| format!("{name} {start:#x}..{:#x}", start + len))
                .collect::<Vec<_>>()
                .join(", ")
        });
        panic!("{what}: {bytes} bytes at {addr:#x} are outside every buffer ({near})");
    }
}

/// Memory mapped with an inaccessible page on either side; the payload ends `tail` bytes
/// before the upper guard page.
struct GuardedMap {
    map: *mut u8,
    map_len: usize,
    payload: *mut u8,
}

impl GuardedMap {
    fn new(bytes: usize, align: usize) -> GuardedMap {
        let inner = bytes.div_ceil(PAGE).max(1) * PAGE;
        let map_len = inner + 2 * PAGE;
        // SAFETY: an anonymous private mapping; checked for failure below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(map != libc::MAP_FAILED, "mmap of {map_len} bytes failed");
        let map = map as *mut u8;
        // SAFETY: both guard pages lie inside the mapping.
        unsafe {
            assert_eq!(libc::mprotect(map as *mut libc::c_void, PAGE, libc::PROT_NONE), 0);
            assert_eq!(libc::mprotect(map.add(PAGE + inner) as *mut libc::c_void, PAGE, libc::PROT_NONE), 0);
        }
        // As close to the upper guard page as the alignment allows.
        let offset = (inner - bytes) / align * align;
        // SAFETY: `offset + bytes ≤ inner`, inside the accessible pages.
        let payload = unsafe { map.add(PAGE + offset) };
        GuardedMap { map, map_len, payload }
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.map_len) };
    }
}

/// "Device" memory for emulated kernels: host memory between guard pages, registered so that
/// the checked primitives can tell an access outside every buffer. Kernel parameters take
/// [`ptr`](Self::ptr) where a GPU launch takes a device address.
pub struct DeviceBuffer<T: Copy> {
    map: GuardedMap,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Copy> DeviceBuffer<T> {
    /// A buffer holding `data`, named `name` in fault messages.
    pub fn from_slice(name: &'static str, data: &[T]) -> Self {
        let bytes = std::mem::size_of_val(data);
        let map = GuardedMap::new(bytes, 16.max(std::mem::align_of::<T>()));
        // SAFETY: the payload has room for `bytes` bytes and is aligned for T.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, map.payload, bytes) };
        BUFFERS.with(|b| b.borrow_mut().push((map.payload as usize, bytes, name)));
        DeviceBuffer { map, len: data.len(), _t: std::marker::PhantomData }
    }

    /// `len` copies of `value` (a poison, say).
    pub fn filled(name: &'static str, len: usize, value: T) -> Self {
        Self::from_slice(name, &vec![value; len])
    }

    /// The address kernels take.
    pub fn ptr(&self) -> u64 {
        self.map.payload as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn to_vec(&self) -> Vec<T> {
        let mut v = Vec::with_capacity(self.len);
        // SAFETY: the payload holds `len` initialised values of T.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.payload as *const T, v.as_mut_ptr(), self.len);
            v.set_len(self.len);
        }
        v
    }
}

impl<T: Copy> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        let start = self.map.payload as usize;
        BUFFERS.with(|b| b.borrow_mut().retain(|&(s, _, _)| s != start));
    }
}

enum ThreadState {
    Ready(Reply),
    Waiting(Op),
    Done,
}

type Thread = Coroutine<Reply, Op, (), DefaultStack>;

/// Runs `kernel` (called once per thread, reading its coordinates through the `gpu`
/// primitives) over the grid of `cfg`, block after block.
pub fn launch(cfg: LaunchConfig, kernel: impl Fn() + 'static) -> Result<(), Fault> {
    assert!(cfg.threads > 0 && (cfg.threads as usize).is_multiple_of(WARP), "blocks of whole warps only");
    let kernel: Rc<dyn Fn()> = Rc::new(kernel);
    let mut stacks: Vec<DefaultStack> = Vec::new();
    for y in 0..cfg.grid.1 {
        for x in 0..cfg.grid.0 {
            run_block(&cfg, (x, y), &kernel, &mut stacks)?;
        }
    }
    Ok(())
}

fn run_block(
    cfg: &LaunchConfig,
    index: (u32, u32),
    kernel: &Rc<dyn Fn()>,
    stacks: &mut Vec<DefaultStack>,
) -> Result<(), Fault> {
    let rounded = (cfg.smem_bytes as usize).div_ceil(1024) * 1024;
    let smem = GuardedMap::new(rounded, 1024);
    // SAFETY: `rounded` bytes of the mapping are accessible.
    unsafe { std::ptr::write_bytes(smem.payload, 0xFF, rounded) };
    let block = Box::new(Block {
        index,
        grid: cfg.grid,
        threads: cfg.threads,
        smem: smem.payload,
        smem_bytes: cfg.smem_bytes,
        copies: RefCell::new((0..cfg.threads).map(|_| AsyncCopies::default()).collect()),
        mbarriers: RefCell::new(std::collections::HashMap::new()),
        tracked: RefCell::new(Vec::new()),
        registers: RefCell::new((vec![crate::abi::entry_registers(cfg.threads); cfg.threads as usize], 0)),
    });
    BLOCK.with(|b| b.set(&*block));
    let fault = |thread: Option<u32>, what: String| Fault { block: index, thread, what };

    let n = cfg.threads as usize;
    let mut threads: Vec<Thread> = Vec::with_capacity(n);
    for _ in 0..n {
        let stack = match stacks.pop() {
            Some(s) => s,
            None => DefaultStack::new(STACK_BYTES).expect("a coroutine stack"),
        };
        let k = kernel.clone();
        threads.push(Coroutine::with_stack(stack, move |y: &Yielder<Reply, Op>, _: Reply| {
            YIELDER.with(|c| c.set(y));
            k()
        }));
    }
    let mut state: Vec<ThreadState> = (0..n).map(|_| ThreadState::Ready(Reply::None)).collect();
    let mut barriers: [Barrier; 16] = Default::default();

    let result = (|| loop {
        for t in 0..n {
            while let ThreadState::Ready(reply) = state[t] {
                THREAD.with(|c| c.set(t as u32));
                let co = &mut threads[t];
                let step = catch_unwind(AssertUnwindSafe(|| co.resume(reply)));
                YIELDER.with(|c| c.set(std::ptr::null()));
                state[t] = match step {
                    Ok(CoroutineResult::Yield(Op::Barrier { id, threads: count, wait })) => {
                        let b = barriers
                            .get_mut(id as usize)
                            .ok_or_else(|| fault(Some(t as u32), format!("barrier id {id}")))?;
                        b.arrive(t, count, wait, &mut state)
                            .map_err(|w| fault(Some(t as u32), format!("barrier {id}: {w}")))?
                    }
                    Ok(CoroutineResult::Yield(op)) => ThreadState::Waiting(op),
                    Ok(CoroutineResult::Return(())) => ThreadState::Done,
                    Err(panic) => return Err(fault(Some(t as u32), panic_message(panic))),
                };
            }
        }
        if state.iter().all(|s| matches!(s, ThreadState::Done)) {
            return Ok(());
        }
        // Warp collectives: every lane at the same one.
        let mut released = false;
        for w in 0..n / WARP {
            let lanes = w * WARP..(w + 1) * WARP;
            let ops: Vec<Option<Op>> = state[lanes.clone()]
                .iter()
                .map(|s| match s {
                    ThreadState::Waiting(op)
                        if !matches!(op, Op::Barrier { .. } | Op::MbarrierWait { .. } | Op::RegisterClaim { .. }) =>
                    {
                        Some(*op)
                    }
                    _ => None,
                })
                .collect();
            let Some(first) = ops.iter().flatten().next().copied() else { continue };
            if let Some(lane) = ops.iter().position(|o| o.is_some_and(|o| !o.same_collective(&first))) {
                let what = format!("warp {w} diverged: lanes at {first:?} and at {:?}", ops[lane].unwrap());
                return Err(fault(Some((w * WARP + lane) as u32), what));
            }
            if ops.iter().all(|o| o.is_some()) {
                let ops: Vec<Op> = ops.into_iter().flatten().collect();
                let replies = warp_collective(&block, &ops).map_err(|what| fault(Some((w * WARP) as u32), what))?;
                for (t, r) in lanes.zip(replies) {
                    state[t] = ThreadState::Ready(r);
                }
                released = true;
            }
        }
        // Waits of a thread alone: released once they can succeed (a thread waiting for
        // registers claims them when it next runs).
        for (t, s) in state.iter_mut().enumerate() {
            let go = match *s {
                ThreadState::Waiting(Op::MbarrierWait { bar, parity }) => block.mbarrier_phase_done(bar, parity),
                ThreadState::Waiting(Op::RegisterClaim { regs }) => block.pool_holds(t as u32, regs),
                _ => false,
            };
            if go {
                *s = ThreadState::Ready(Reply::None);
                released = true;
            }
        }
        // Nothing else can run: copies tied to mbarriers land now, as late as they may.
        if !released && !state.iter().any(|s| matches!(s, ThreadState::Ready(_))) && block.land_tracked(None) {
            continue;
        }
        if !released && !state.iter().any(|s| matches!(s, ThreadState::Ready(_))) {
            let exited = state.iter().filter(|s| matches!(s, ThreadState::Done)).count();
            let warps: Vec<String> = (0..n / WARP)
                .map(|w| {
                    let at = |t: usize| match &state[t] {
                        ThreadState::Waiting(op) => format!("{op:?}"),
                        ThreadState::Done => "exited".to_string(),
                        ThreadState::Ready(_) => "ready".to_string(),
                    };
                    let waiting = barriers.iter().position(|b| b.waiters.contains(&(w * WARP)));
                    match waiting {
                        Some(id) => format!("warp {w}: at barrier {id}"),
                        None => format!("warp {w}: lane 0 {}, lane 31 {}", at(w * WARP), at(w * WARP + 31)),
                    }
                })
                .collect();
            return Err(fault(None, format!("deadlock ({exited} threads exited): {}", warps.join("; "))));
        }
    })();

    BLOCK.with(|b| b.set(std::ptr::null()));
    // Finished coroutines give their stacks back; unfinished ones (a fault) are unwound.
    for co in threads {
        if co.done() {
            stacks.push(co.into_stack());
        }
    }
    drop(block);
    drop(smem);
    result
}

/// A named barrier's phase: the arrivals it has counted, the count they complete, and the
/// threads waiting (`bar.sync`; `bar.arrive` only counts).
#[derive(Default)]
struct Barrier {
    arrived: u32,
    count: u32,
    waiters: Vec<usize>,
}

impl Barrier {
    /// Counts thread `t`'s arrival for `count` threads and returns its state: waiting, or
    /// ready if it arrived without waiting or completed the phase (which releases every
    /// waiter).
    fn arrive(&mut self, t: usize, count: u32, wait: bool, state: &mut [ThreadState]) -> Result<ThreadState, String> {
        if self.arrived > 0 && count != self.count {
            return Err(format!("an arrival for {count} threads in a phase of {}", self.count));
        }
        if count == 0 || count as usize > state.len() {
            return Err(format!("a count of {count} threads in a block of {}", state.len()));
        }
        self.count = count;
        self.arrived += 1;
        if self.arrived < count {
            if wait {
                self.waiters.push(t);
                return Ok(ThreadState::Waiting(Op::Barrier { id: 0, threads: count, wait }));
            }
            return Ok(ThreadState::Ready(Reply::None));
        }
        for w in self.waiters.drain(..) {
            state[w] = ThreadState::Ready(Reply::None);
        }
        self.arrived = 0;
        Ok(ThreadState::Ready(Reply::None))
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// The replies of a warp's 32 lanes to one collective.
fn warp_collective(block: &Block, ops: &[Op]) -> Result<Vec<Reply>, String> {
    let lanes = 0..WARP;
    Ok(match ops[0] {
        Op::SyncWarp => vec![Reply::None; WARP],
        Op::ShuffleXor { .. } => lanes
            .map(|l| {
                let Op::ShuffleXor { mask, .. } = ops[l] else { unreachable!() };
                let src = l ^ (mask as usize & 31);
                let Op::ShuffleXor { value, .. } = ops[src] else { unreachable!() };
                Reply::Word(value)
            })
            .collect(),
        Op::ShuffleIdx { .. } => lanes
            .map(|l| {
                let Op::ShuffleIdx { src, .. } = ops[l] else { unreachable!() };
                let Op::ShuffleIdx { value, .. } = ops[src as usize & 31] else { unreachable!() };
                Reply::Word(value)
            })
            .collect(),
        Op::Vote { .. } => {
            let any = ops.iter().any(|o| matches!(o, Op::Vote { pred: true }));
            vec![Reply::Word(any as u32); WARP]
        }
        Op::LoadMatrix { trans, .. } => {
            // Matrix i's row r: the 16 bytes at lane 8i + r's address.
            let mut m = [[[0u16; 8]; 8]; 4];
            for (lane, op) in ops.iter().enumerate() {
                let Op::LoadMatrix { addr, .. } = *op else { unreachable!() };
                let row = block.shared(addr, 16, 16);
                for (e, v) in m[lane / 8][lane % 8].iter_mut().enumerate() {
                    // SAFETY: 16 checked bytes of shared memory.
                    *v = unsafe { (row as *const u16).add(e).read() };
                }
            }
            lanes
                .map(|l| {
                    let (g, t) = (l / 4, l % 4);
                    Reply::Quad(std::array::from_fn(|i| {
                        let (lo, hi) = if trans {
                            (m[i][2 * t][g], m[i][2 * t + 1][g])
                        } else {
                            (m[i][g][2 * t], m[i][g][2 * t + 1])
                        };
                        lo as u32 | (hi as u32) << 16
                    }))
                })
                .collect()
        }
        Op::Mma { bf16, .. } => {
            let value = |bits: u32| -> f32 {
                let b = bits as u16;
                if bf16 {
                    half::bf16::from_bits(b).to_f32()
                } else {
                    half::f16::from_bits(b).to_f32()
                }
            };
            let mut a = [[0f32; 16]; 16];
            let mut b = [[0f32; 8]; 16];
            for (l, op) in ops.iter().enumerate() {
                let Op::Mma { a: fa, b: fb, .. } = *op else { unreachable!() };
                let (g, t) = (l / 4, l % 4);
                for (i, (r, k)) in
                    [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].into_iter().enumerate()
                {
                    a[r][k] = value(fa[i]);
                    a[r][k + 1] = value(fa[i] >> 16);
                }
                for (i, k) in [2 * t, 2 * t + 8].into_iter().enumerate() {
                    b[k][g] = value(fb[i]);
                    b[k + 1][g] = value(fb[i] >> 16);
                }
            }
            lanes
                .map(|l| {
                    let Op::Mma { acc, .. } = ops[l] else { unreachable!() };
                    let (g, t) = (l / 4, l % 4);
                    Reply::Acc(std::array::from_fn(|i| {
                        let (r, n) = (g + 8 * (i / 2), 2 * t + i % 2);
                        let mut d = acc[i];
                        for (k, row) in b.iter().enumerate() {
                            d += a[r][k] * row[n];
                        }
                        d
                    }))
                })
                .collect()
        }
        Op::Barrier { .. } | Op::MbarrierWait { .. } | Op::RegisterClaim { .. } => {
            return Err("a barrier among warp collectives".into())
        }
    })
}
