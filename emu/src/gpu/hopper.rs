//! Hopper's asynchronous machinery (`kernels-gpu/src/gpu/hopper.rs`) on the emulated block:
//! `wgmma` computed when issued (each thread its own accumulators, reading the operands'
//! shared memory through the descriptors and the 128-byte swizzle; an A operand from
//! registers gathered from the warp's quad by shuffles), mbarriers with phases (copies tied to
//! one land as late as they may, see `sim`; transaction bytes for TMA boxes, which land
//! through the 128-byte swizzle of their shared address), named barriers, register reallocation against
//! the block's pool (a claim the pool can never meet is a deadlock, as on the GPU); the proxy
//! fence has nothing to do here.
//!
//! Operand addressing (PTX ISA, "Matrix Descriptor Format", 128-byte swizzle): a K-major
//! operand's element (row `r`, k) sits at `start + (r / 8) · stride + (r % 8) · 128 + 2k`; an
//! MN-major one's (k, column `n`) at `start + (n / 64) · leading + (k / 8) · stride +
//! (k % 8) · 128 + 2 (n % 64)`; the swizzle then XORs address bits 4–6 with bits 7–9.
use super::half::{Bf16, Half, F16};
use super::index::{lane, warp};
use super::warp::shfl_idx_u32;
use crate::sim::{block, collective, Op};

pub use super::plain::smem_descriptor;

/// `desc` with its start address moved on by `bytes` (the kernels' form joins the words in PTX).
pub fn descriptor_plus(desc: u64, bytes: u32) -> u64 {
    desc + (bytes >> 4) as u64
}

/// A descriptor's start address, leading and stride byte offsets.
fn decode(desc: u64) -> (u32, u32, u32) {
    assert_eq!(desc >> 62, 1, "descriptor {desc:#x}: only the 128-byte swizzle is emulated");
    let field = |shift: u32| (((desc >> shift) & 0x3FFF) << 4) as u32;
    (field(0), field(16), field(32))
}

/// The 16-bit element at logical shared address `addr` of a 128-byte-swizzled operand.
fn element(addr: u32) -> u16 {
    let physical = addr ^ (((addr >> 7) & 7) << 4);
    // SAFETY: two checked bytes of shared memory.
    unsafe { *(block().shared(physical, 2, 2) as *const u16) }
}

fn k_major(desc: u64, row: u32, k: u32) -> u16 {
    let (start, _, stride) = decode(desc);
    element(start + (row / 8) * stride + (row % 8) * 128 + 2 * k)
}

fn mn_major(desc: u64, k: u32, n: u32) -> u16 {
    let (start, leading, stride) = decode(desc);
    element(start + (n / 64) * leading + (k / 8) * stride + (k % 8) * 128 + 2 * (n % 64))
}

/// This thread's accumulators of a 64 × 8N tile: entry (j, c) is row `16 w + g + 8 (c / 2)`,
/// column `8 j + 2 t + c % 2` of warp `w` of the warpgroup; `a(row, k)` and `b(k, col)` as f32.
fn product<const N: usize>(
    acc: &mut [[f32; 4]; N],
    accumulate: bool,
    a: impl Fn(u32, u32) -> f32,
    b: impl Fn(u32, u32) -> f32,
) {
    let (w, g, t) = (warp() % 4, lane() / 4, lane() % 4);
    for (j, frag) in acc.iter_mut().enumerate() {
        for (c, d) in frag.iter_mut().enumerate() {
            let (row, col) = (16 * w + g + 8 * (c as u32 / 2), 8 * j as u32 + 2 * t + c as u32 % 2);
            let mut sum = if accumulate { *d } else { 0.0 };
            for k in 0..16 {
                sum += a(row, k) * b(k, col);
            }
            *d = sum;
        }
    }
}

/// The warp's 16 × 16 A operand from the m16n8k16 fragments of its lanes (`[row][k]`, bits).
fn gather_a(a: [u32; 4]) -> [[u16; 16]; 16] {
    let mut m = [[0u16; 16]; 16];
    let g = lane() / 4;
    // Every lane fetches its quad's registers; it keeps its own rows g and g + 8.
    for src_t in 0..4 {
        for (i, &reg) in a.iter().enumerate() {
            let v = shfl_idx_u32(reg, 4 * g + src_t);
            let (r, k) = (g as usize + 8 * (i % 2), 2 * src_t as usize + 8 * (i / 2));
            m[r][k] = v as u16;
            m[r][k + 1] = (v >> 16) as u16;
        }
    }
    m
}

pub fn wgmma_fence() {}
pub fn wgmma_commit() {}
/// Computed at issue: nothing in flight.
pub fn wgmma_wait<const PENDING: u32, const N: usize>(_acc: &mut [f32; N]) {}
pub fn wgmma_wait_frags<const PENDING: u32, const N: usize>(_acc: &mut [[f32; 4]; N]) {}
pub fn fence_proxy_async() {}

/// The `wgmma` forms of an element type, as `kernels-gpu`'s trait.
pub trait Wgmma: Half {
    /// # Safety
    /// As the GPU's (the shared accesses are checked here).
    unsafe fn mma_ss<const N: usize>(acc: &mut [[f32; 4]; N], a: u64, b: u64, accumulate: u32);
    /// # Safety
    /// As the GPU's.
    unsafe fn mma_rs<const N: usize>(acc: &mut [[f32; 4]; N], a: [u32; 4], b: u64);
    /// # Safety
    /// As the GPU's.
    unsafe fn mma_rk<const N: usize>(acc: &mut [[f32; 4]; N], a: [u32; 4], b: u64, accumulate: u32);
}

macro_rules! impl_wgmma {
    ($half:ty) => {
        impl Wgmma for $half {
            unsafe fn mma_ss<const N: usize>(acc: &mut [[f32; 4]; N], a: u64, b: u64, accumulate: u32) {
                assert!(matches!(N, 4 | 8 | 16), "no wgmma m64n{}k16 from shared memory", 8 * N);
                let value = |bits: u16| <$half>::to_f32(bits);
                product(acc, accumulate != 0, |r, k| value(k_major(a, r, k)), |k, n| value(k_major(b, n, k)));
            }
            unsafe fn mma_rs<const N: usize>(acc: &mut [[f32; 4]; N], a: [u32; 4], b: u64) {
                assert!(matches!(N, 8 | 16 | 32), "no wgmma m64n{}k16 with A from registers", 8 * N);
                let value = |bits: u16| <$half>::to_f32(bits);
                let rows = gather_a(a);
                let w = warp() % 4;
                product(
                    acc,
                    true,
                    |r, k| value(rows[(r - 16 * w) as usize][k as usize]),
                    |k, n| value(mn_major(b, k, n)),
                );
            }
            unsafe fn mma_rk<const N: usize>(acc: &mut [[f32; 4]; N], a: [u32; 4], b: u64, accumulate: u32) {
                assert!(matches!(N, 4 | 8 | 16), "no wgmma m64n{}k16 with A from registers, B K-major", 8 * N);
                let value = |bits: u16| <$half>::to_f32(bits);
                let rows = gather_a(a);
                let w = warp() % 4;
                product(
                    acc,
                    accumulate != 0,
                    |r, k| value(rows[(r - 16 * w) as usize][k as usize]),
                    |k, n| value(k_major(b, n, k)),
                );
            }
        }
    };
}
impl_wgmma!(F16);
impl_wgmma!(Bf16);

/// # Safety
/// As the GPU's (checked here).
pub unsafe fn mbarrier_init(bar: u32, count: u32) {
    block().mbarrier_init(bar, count);
}
/// # Safety
/// As the GPU's (checked here).
pub unsafe fn mbarrier_arrive(bar: u32) {
    block().mbarrier_arrive(bar);
}
/// # Safety
/// As the GPU's (checked here).
pub unsafe fn mbarrier_arrive_on_async_copies(bar: u32) {
    block().mbarrier_arrive_on_copies(bar);
}
/// # Safety
/// As the GPU's (checked here).
pub unsafe fn mbarrier_wait(bar: u32, parity: u32) {
    while !block().mbarrier_phase_done(bar, parity) {
        collective(Op::MbarrierWait { bar, parity });
    }
}

/// # Safety
/// As the GPU's (checked here).
pub unsafe fn mbarrier_arrive_expect_tx(bar: u32, bytes: u32) {
    block().mbarrier_arrive_expect(bar, bytes);
}

/// The emulator's form of a 2-D TMA map (`cuTensorMapEncodeTiled`'s is the driver's own):
/// 16-bit elements, `width` a row, `rows` rows `stride` bytes apart from `base`, boxes of
/// `box_rows` rows of 64 elements, the 128-byte swizzle. 128 bytes, as the driver's.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct TensorMap2d {
    pub base: u64,
    pub width: u64,
    pub rows: u64,
    pub stride: u64,
    pub box_rows: u32,
    pub _reserved: [u32; 23],
}
const _: () = assert!(std::mem::size_of::<TensorMap2d>() == 128);

/// # Safety
/// `map` is a [`TensorMap2d`] in global memory (checked here, as the box's reads).
pub unsafe fn tma_load_2d(dst: u32, map: u64, x: u32, y: u32, bar: u32) {
    crate::sim::check_global(map, 128, 64, "TMA map");
    let m = *(map as *const TensorMap2d);
    assert!(x as u64 + 64 <= m.width && x.is_multiple_of(64), "TMA box at column {x} of a {}-wide map", m.width);
    // Rows at or past `rows` (the coordinate is signed on the GPU) read as zeros.
    let src = |r: u32| {
        let row = y as u64 + r as u64;
        (row < m.rows && (y as i32) >= 0).then(|| m.base + row * m.stride + 2 * x as u64)
    };
    block().tma_box(dst, m.box_rows, 128, src, bar);
}

/// `setmaxnreg.dec`: this thread's registers go back to the block's pool.
pub fn release_registers<const REGS: u32>() {
    block().release_registers(REGS);
}
/// `setmaxnreg.inc`: waits until the block's pool holds the registers asked for (the GPU waits
/// forever when it never will: a deadlock here).
pub fn claim_registers<const REGS: u32>() {
    while !block().claim_registers(REGS) {
        collective(Op::RegisterClaim { regs: REGS });
    }
}

pub fn named_barrier(id: u32, threads: u32) {
    collective(Op::Barrier { id, threads, wait: true });
}

pub fn named_barrier_arrive(id: u32, threads: u32) {
    collective(Op::Barrier { id, threads, wait: false });
}
