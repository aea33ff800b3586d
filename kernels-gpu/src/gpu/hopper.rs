//! Hopper's asynchronous machinery (sm_90a; only the `sm_90a` module's kernels use it):
//! warpgroup matrix multiply-accumulate (`wgmma`) on shared-memory matrix descriptors,
//! transaction barriers (`mbarrier`) between a producer and consumers, register reallocation
//! between warpgroups (`setmaxnreg`) and named barriers.
//!
//! `wgmma` layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"): a
//! warpgroup (four consecutive warps, the first a multiple of four) computes a 64 × N tile; warp
//! `w` of it owns rows `16w..16w + 16`, and within them each thread holds the accumulators in the
//! `mma.sync` m16n8 C layout repeated over the N / 8 column blocks: entry `4j + c` is row
//! `g + 8 (c / 2)`, column `8j + 2t + c % 2` (`g = lane / 4`, `t = lane % 4`). An A operand
//! from registers has the m16n8k16 A layout per warp. So the softmax of the `mma.sync` kernels
//! (`softmax::RowState`) runs on `wgmma` accumulators unchanged.
//!
//! The accumulators are written asynchronously: from the issue of a `wgmma` to the
//! `wait_group` that retires it they must not be read or written. Every function here takes
//! them as `inout` operands, including [`wgmma_wait`], so the compiler sees them defined by the
//! wait and places no use before it.
use core::arch::asm;

pub use super::plain::smem_descriptor;

/// `desc` (from [`smem_descriptor`]) with its start address moved on by `bytes`, a multiple of
/// 16 that keeps it inside shared memory (below 256 KiB, so the 14-bit field does not carry):
/// one 32-bit addition, where a descriptor built afresh takes a shift, a mask and an or before
/// each `wgmma`. The words are joined in `asm` so that LLVM cannot fold the offset and the
/// constant high word into a 64-bit addition (two instructions with the carry).
#[inline(always)]
pub fn descriptor_plus(desc: u64, bytes: u32) -> u64 {
    let (lo, hi) = ((desc as u32).wrapping_add(bytes >> 4), (desc >> 32) as u32);
    let d: u64;
    // SAFETY: a register move.
    unsafe {
        asm!("mov.b64 {d}, {{{lo}, {hi}}};", d = out(reg64) d, lo = in(reg32) lo, hi = in(reg32) hi,
             options(pure, nomem, nostack, preserves_flags))
    }
    d
}

/// Orders this thread's earlier register and shared-memory accesses before the warpgroup's
/// next `wgmma` (needed before the first `wgmma` that reads registers written since).
#[inline(always)]
pub fn wgmma_fence() {
    // SAFETY: a warpgroup collective without operands; callers reach it with the whole warpgroup.
    unsafe { asm!("wgmma.fence.sync.aligned;", options(nostack, preserves_flags)) }
}

/// Closes the group of `wgmma` this warpgroup issued since the last commit.
#[inline(always)]
pub fn wgmma_commit() {
    // SAFETY: as `wgmma_fence`.
    unsafe { asm!("wgmma.commit_group.sync.aligned;", options(nostack, preserves_flags)) }
}

/// Waits until at most `PENDING` committed groups are in flight; `acc` (the accumulators of
/// the retired groups) are defined from here on.
#[inline(always)]
pub fn wgmma_wait<const PENDING: u32, const N: usize>(acc: &mut [f32; N]) {
    macro_rules! wait {
        ($($i:literal)*) => {
            // SAFETY: a warpgroup collective; the operands only tie the accumulators to it.
            unsafe {
                asm!(concat!("wgmma.wait_group.sync.aligned {n}; // retires", $(" {", stringify!($i), "}",)*),
                     $( inout(reg32) acc[$i], )* n = const PENDING, options(nostack, preserves_flags))
            }
        };
    }
    match N {
        16 => wait!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15),
        32 => wait!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31),
        64 => {
            wait!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63)
        }
        128 => {
            wait!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122 123 124 125 126 127)
        }
        _ => panic!(),
    }
}

/// `$name`: `acc (+)= A · B` for a 64 × `$n` tile, k = 16, `$ty` inputs, A and B both K-major
/// in shared memory; `acc` is the thread's accumulators `[$first $($i)*]` (`$n / 2` of them).
macro_rules! wgmma_ss {
    ($name:ident, $n:literal, $ty:literal, [$first:literal $($i:literal)*]) => {
        #[doc = concat!("`acc (+)= A · B` for a 64 × ", $n, " tile, k = 16, ", $ty, " inputs: A (64 × 16) and B (16 × ",
                        $n, ") both K-major in shared memory (descriptors); `accumulate == 0` overwrites `acc`.")]
        ///
        /// # Safety
        /// The whole warpgroup calls it; the descriptors describe shared memory of the block that no
        /// one writes until the `wgmma` retires.
        #[inline(always)]
        pub unsafe fn $name(acc: &mut [f32; $n / 2], a: u64, b: u64, accumulate: u32) {
            asm!(concat!("{{ .reg .pred p; setp.ne.b32 p, {sc}, 0; ",
                         "wgmma.mma_async.sync.aligned.m64n", $n, "k16.f32.", $ty, ".", $ty,
                         " {{{", stringify!($first), "}", $(", {", stringify!($i), "}",)* "}}, {da}, {db}, p, 1, 1, 0, 0; }}"),
                 inout(reg32) acc[$first], $(inout(reg32) acc[$i],)*
                 da = in(reg64) a, db = in(reg64) b, sc = in(reg32) accumulate, options(nostack, preserves_flags));
        }
    };
}

/// `$name`: `acc += A · B` for a 64 × `$n` tile, k = 16, `$ty` inputs, A from registers and B
/// MN-major in shared memory.
macro_rules! wgmma_rs {
    ($name:ident, $n:literal, $ty:literal, [$first:literal $($i:literal)*]) => {
        #[doc = concat!("`acc += A · B` for a 64 × ", $n, " tile, k = 16, ", $ty, " inputs: A (64 × 16) from registers (each \
                         warp's 16 rows in the m16n8k16 A layout), B (16 × ", $n, ") MN-major in shared memory.")]
        ///
        /// # Safety
        /// As the shared-memory form.
        #[inline(always)]
        pub unsafe fn $name(acc: &mut [f32; $n / 2], a: [u32; 4], b: u64) {
            asm!(concat!("{{ .reg .pred p; setp.ne.b32 p, {sc}, 0; ",
                         "wgmma.mma_async.sync.aligned.m64n", $n, "k16.f32.", $ty, ".", $ty,
                         " {{{", stringify!($first), "}", $(", {", stringify!($i), "}",)*
                         "}}, {{{a0}, {a1}, {a2}, {a3}}}, {db}, p, 1, 1, 1; }}"),
                 inout(reg32) acc[$first], $(inout(reg32) acc[$i],)*
                 a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                 db = in(reg64) b, sc = in(reg32) 1u32, options(nostack, preserves_flags));
        }
    };
}

/// `$name`: `acc (+)= A · B` for a 64 × `$n` tile, k = 16, `$ty` inputs, A from registers and B
/// K-major in shared memory (the S product with the queries held in registers).
macro_rules! wgmma_rk {
    ($name:ident, $n:literal, $ty:literal, [$first:literal $($i:literal)*]) => {
        #[doc = concat!("`acc (+)= A · B` for a 64 × ", $n, " tile, k = 16, ", $ty, " inputs: A (64 × 16) from registers (each \
                         warp's 16 rows in the m16n8k16 A layout), B (16 × ", $n, ") K-major in shared memory; \
                         `accumulate == 0` overwrites `acc`.")]
        ///
        /// # Safety
        /// As the shared-memory form.
        #[inline(always)]
        pub unsafe fn $name(acc: &mut [f32; $n / 2], a: [u32; 4], b: u64, accumulate: u32) {
            asm!(concat!("{{ .reg .pred p; setp.ne.b32 p, {sc}, 0; ",
                         "wgmma.mma_async.sync.aligned.m64n", $n, "k16.f32.", $ty, ".", $ty,
                         " {{{", stringify!($first), "}", $(", {", stringify!($i), "}",)*
                         "}}, {{{a0}, {a1}, {a2}, {a3}}}, {db}, p, 1, 1, 0; }}"),
                 inout(reg32) acc[$first], $(inout(reg32) acc[$i],)*
                 a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                 db = in(reg64) b, sc = in(reg32) accumulate, options(nostack, preserves_flags));
        }
    };
}

/// Every form of one tile width `$n`, for both element types, from its accumulator list.
macro_rules! wgmma_width {
    ($n:literal, $acc:tt; ss: $($ss:ident $sst:literal),*; rs: $($rs:ident $rst:literal),*;
     rk: $($rk:ident $rkt:literal),*) => {
        $( wgmma_ss!($ss, $n, $sst, $acc); )*
        $( wgmma_rs!($rs, $n, $rst, $acc); )*
        $( wgmma_rk!($rk, $n, $rkt, $acc); )*
    };
}

wgmma_width!(32, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15];
             ss: wgmma_ss_n32_f16 "f16", wgmma_ss_n32_bf16 "bf16"; rs: ;
             rk: wgmma_rk_n32_f16 "f16", wgmma_rk_n32_bf16 "bf16");
wgmma_width!(64, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31];
             ss: wgmma_ss_n64_f16 "f16", wgmma_ss_n64_bf16 "bf16"; rs: wgmma_rs_n64_f16 "f16", wgmma_rs_n64_bf16 "bf16";
             rk: wgmma_rk_n64_f16 "f16", wgmma_rk_n64_bf16 "bf16");
wgmma_width!(128, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63];
             ss: wgmma_ss_n128_f16 "f16", wgmma_ss_n128_bf16 "bf16"; rs: wgmma_rs_n128_f16 "f16", wgmma_rs_n128_bf16 "bf16";
             rk: wgmma_rk_n128_f16 "f16", wgmma_rk_n128_bf16 "bf16");
wgmma_width!(256, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122 123 124 125 126 127];
             ss: ; rs: wgmma_rs_n256_f16 "f16", wgmma_rs_n256_bf16 "bf16"; rk: );

/// The `wgmma` forms an element type has: `N` is the accumulator tile's n-fragments (8
/// columns each, 4 f32 per thread), so `N = 8` is a 64 × 64 tile, 16 a 64 × 128 and 32 a
/// 64 × 256 one. The shared-memory form also takes 4 (a 64-key tile halved: a causal
/// diagonal's visible keys).
pub trait Wgmma: crate::gpu::half::Half {
    /// `acc (+)= A · B`, both operands K-major in shared memory (see [`wgmma_ss_n64_f16`]).
    ///
    /// # Safety
    /// As [`wgmma_ss_n64_f16`].
    unsafe fn mma_ss<const N: usize>(acc: &mut [[f32; 4]; N], a: u64, b: u64, accumulate: u32);
    /// `acc += A · B`, A from registers, B MN-major in shared memory (see [`wgmma_rs_n64_f16`]).
    ///
    /// # Safety
    /// As [`wgmma_rs_n64_f16`].
    unsafe fn mma_rs<const N: usize>(acc: &mut [[f32; 4]; N], a: [u32; 4], b: u64);
    /// `acc (+)= A · B`, A from registers, B K-major in shared memory (see [`wgmma_rk_n64_f16`]).
    ///
    /// # Safety
    /// As [`wgmma_rk_n64_f16`].
    unsafe fn mma_rk<const N: usize>(acc: &mut [[f32; 4]; N], a: [u32; 4], b: u64, accumulate: u32);
}

/// `acc` viewed as the flat `[f32; M]` of the `wgmma` functions; `M = 4N` (the callers' match
/// arms pick `M` by `N`, so every arm is compiled, and only the matching one is reached).
#[inline(always)]
unsafe fn flat<const N: usize, const M: usize>(acc: &mut [[f32; 4]; N]) -> &mut [f32; M] {
    if M != 4 * N {
        crate::gpu::trap();
    }
    &mut *(acc as *mut [[f32; 4]; N] as *mut [f32; M])
}

macro_rules! impl_wgmma {
    ($half:ty, $ss32:ident, $ss64:ident, $ss128:ident, $rs64:ident, $rs128:ident, $rs256:ident,
     $rk32:ident, $rk64:ident, $rk128:ident) => {
        impl Wgmma for $half {
            #[inline(always)]
            unsafe fn mma_ss<const N: usize>(acc: &mut [[f32; 4]; N], a: u64, b: u64, accumulate: u32) {
                match N {
                    4 => $ss32(flat::<N, 16>(acc), a, b, accumulate),
                    8 => $ss64(flat::<N, 32>(acc), a, b, accumulate),
                    16 => $ss128(flat::<N, 64>(acc), a, b, accumulate),
                    _ => crate::gpu::trap(),
                }
            }
            #[inline(always)]
            unsafe fn mma_rs<const N: usize>(acc: &mut [[f32; 4]; N], a: [u32; 4], b: u64) {
                match N {
                    8 => $rs64(flat::<N, 32>(acc), a, b),
                    16 => $rs128(flat::<N, 64>(acc), a, b),
                    32 => $rs256(flat::<N, 128>(acc), a, b),
                    _ => crate::gpu::trap(),
                }
            }
            #[inline(always)]
            unsafe fn mma_rk<const N: usize>(acc: &mut [[f32; 4]; N], a: [u32; 4], b: u64, accumulate: u32) {
                match N {
                    4 => $rk32(flat::<N, 16>(acc), a, b, accumulate),
                    8 => $rk64(flat::<N, 32>(acc), a, b, accumulate),
                    16 => $rk128(flat::<N, 64>(acc), a, b, accumulate),
                    _ => crate::gpu::trap(),
                }
            }
        }
    };
}
impl_wgmma!(
    crate::gpu::half::F16,
    wgmma_ss_n32_f16,
    wgmma_ss_n64_f16,
    wgmma_ss_n128_f16,
    wgmma_rs_n64_f16,
    wgmma_rs_n128_f16,
    wgmma_rs_n256_f16,
    wgmma_rk_n32_f16,
    wgmma_rk_n64_f16,
    wgmma_rk_n128_f16
);
impl_wgmma!(
    crate::gpu::half::Bf16,
    wgmma_ss_n32_bf16,
    wgmma_ss_n64_bf16,
    wgmma_ss_n128_bf16,
    wgmma_rs_n64_bf16,
    wgmma_rs_n128_bf16,
    wgmma_rs_n256_bf16,
    wgmma_rk_n32_bf16,
    wgmma_rk_n64_bf16,
    wgmma_rk_n128_bf16
);

/// [`wgmma_wait`] on accumulators held as n-fragments.
#[inline(always)]
pub fn wgmma_wait_frags<const PENDING: u32, const N: usize>(acc: &mut [[f32; 4]; N]) {
    // SAFETY: the same memory, viewed flat (`flat` checks the size).
    unsafe {
        match N {
            4 => wgmma_wait::<PENDING, 16>(flat::<N, 16>(acc)),
            8 => wgmma_wait::<PENDING, 32>(flat::<N, 32>(acc)),
            16 => wgmma_wait::<PENDING, 64>(flat::<N, 64>(acc)),
            32 => wgmma_wait::<PENDING, 128>(flat::<N, 128>(acc)),
            _ => crate::gpu::trap(),
        }
    }
}

/// Makes this thread's view of shared memory written through the generic proxy (ordinary
/// stores, `cp.async`) visible to the async proxy that `wgmma` reads it through.
#[inline(always)]
pub fn fence_proxy_async() {
    // SAFETY: a fence; no operands.
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack, preserves_flags)) }
}

/// Sets up the mbarrier at shared address `bar` for `count` arrivals a phase.
///
/// # Safety
/// `bar` is an 8-byte aligned shared address no one else uses until a barrier after this.
#[inline(always)]
pub unsafe fn mbarrier_init(bar: u32, count: u32) {
    asm!("mbarrier.init.shared::cta.b64 [{b}], {c};", b = in(reg32) bar, c = in(reg32) count,
         options(nostack, preserves_flags));
}

/// One arrival on the mbarrier at `bar` (release: this thread's earlier accesses are ordered
/// before the phase completes).
///
/// # Safety
/// `bar` is an initialised mbarrier.
#[inline(always)]
pub unsafe fn mbarrier_arrive(bar: u32) {
    asm!("{{ .reg .b64 state; mbarrier.arrive.shared::cta.b64 state, [{b}]; }}", b = in(reg32) bar,
         options(nostack, preserves_flags));
}

/// An arrival on the mbarrier at `bar` once every `cp.async` this thread started so far has
/// landed; the barrier's expected count already includes it (`.noinc`).
///
/// # Safety
/// `bar` is an initialised mbarrier.
#[inline(always)]
pub unsafe fn mbarrier_arrive_on_async_copies(bar: u32) {
    asm!("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [{b}];", b = in(reg32) bar, options(nostack, preserves_flags));
}

/// Waits until the phase of parity `parity` of the mbarrier at `bar` has completed (acquire).
/// The loop is Rust's: `asm!` may not hold labels.
///
/// # Safety
/// `bar` is an initialised mbarrier.
#[inline(always)]
pub unsafe fn mbarrier_wait(bar: u32, parity: u32) {
    loop {
        let done: u32;
        asm!("{{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [{b}], {ph}; selp.u32 {d}, 1, 0, p; }}",
             b = in(reg32) bar, ph = in(reg32) parity, d = out(reg32) done, options(nostack, preserves_flags));
        if done != 0 {
            break;
        }
    }
}

/// An arrival on the mbarrier at `bar` that also expects `bytes` more of asynchronous
/// transactions (TMA copies completing on it) in its current phase.
///
/// # Safety
/// `bar` is an initialised mbarrier.
#[inline(always)]
pub unsafe fn mbarrier_arrive_expect_tx(bar: u32, bytes: u32) {
    asm!("{{ .reg .b64 state; mbarrier.arrive.expect_tx.shared::cta.b64 state, [{b}], {n}; }}",
         b = in(reg32) bar, n = in(reg32) bytes, options(nostack, preserves_flags));
}

/// A TMA copy of the box at element coordinates (`x`, `y`) of the 2-D tensor map at `map`
/// (global memory) into shared memory at `dst`, completing `bytes` of transactions on `bar`.
///
/// # Safety
/// `map` is a valid tensor map; `dst` holds the box; `bar` expects the bytes.
#[inline(always)]
pub unsafe fn tma_load_2d(dst: u32, map: u64, x: u32, y: u32, bar: u32) {
    asm!("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [{d}], [{m}, {{{x}, {y}}}], [{b}];",
         d = in(reg32) dst, m = in(reg64) map, x = in(reg32) x, y = in(reg32) y, b = in(reg32) bar,
         options(nostack, preserves_flags));
}

/// Gives this warpgroup's registers back, down to `REGS` a thread (producer warpgroups).
#[inline(always)]
pub fn release_registers<const REGS: u32>() {
    // SAFETY: a warpgroup collective, reached by the whole warpgroup in its own branch.
    unsafe { asm!("setmaxnreg.dec.sync.aligned.u32 {n};", n = const REGS, options(nostack, preserves_flags)) }
}

/// Takes registers, up to `REGS` a thread (consumer warpgroups).
#[inline(always)]
pub fn claim_registers<const REGS: u32>() {
    // SAFETY: as `release_registers`.
    unsafe { asm!("setmaxnreg.inc.sync.aligned.u32 {n};", n = const REGS, options(nostack, preserves_flags)) }
}

/// Waits at named barrier `id` for `threads` threads (a multiple of 32) and orders their
/// shared-memory accesses, like `bar.sync` for a subset of the block.
#[inline(always)]
pub fn named_barrier(id: u32, threads: u32) {
    // SAFETY: barrier ids below 16; every caller's group reaches it with `threads` threads. On
    // sm_70+ a barrier counts arrivals, not program points.
    unsafe { asm!("bar.sync {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack, preserves_flags)) }
}

/// Arrives at named barrier `id` (counting `threads`) without waiting: the signalling half of a
/// handshake whose other side waits there with [`named_barrier`].
#[inline(always)]
pub fn named_barrier_arrive(id: u32, threads: u32) {
    // SAFETY: as `named_barrier`.
    unsafe { asm!("bar.arrive {i}, {n};", i = in(reg32) id, n = in(reg32) threads, options(nostack, preserves_flags)) }
}
