//! Copies between the paged KV cache and contiguous ragged K/V: gather (pages → ragged) and
//! scatter/append (ragged → pages). `page_size` and the layout are run-time values.
//!
//! A block owns `rows_per_block` consecutive ragged rows and streams their 16-byte vectors as
//! one flat, coalesced range, `UNROLL` loads in flight per thread. Each vector's place in the
//! pool is its row's offset (resolved from the page table when the host planned the copy, one
//! load that neighbouring threads share) plus its head's stride in the layout.
//!
//! Between an 8-bit cache and 16-bit ragged K/V (`paged_copy_fp8`) the unit is one 16-byte
//! vector of the pool (sixteen values) and two of the ragged side: quantised on the way in
//! (times the reciprocal of the scale, then rounded to nearest even, saturating), dequantised
//! on the way out (the exact value times the scale, rounded to the ragged type). With
//! per-KV-head scales a vector's factor is the layer's times its head's (or their reciprocals').
use crate::abi::{KvHeadScale, PagedCopyParams};
use crate::gpu::fp8::{to_f32, Fp8};
use crate::gpu::half::{pack, Half};
use crate::gpu::index::{block_dim_x, block_x, block_y, thread_x};
use crate::gpu::mem::{load_readonly, store, Vec16};

/// Vectors in flight per thread (the fp8 copies' `unroll!` lists match it).
const UNROLL: u32 = 4;

/// A 16-bit copy between pages and ragged rows (`TO_PAGES`: scatter).
#[inline(always)]
pub unsafe fn paged_copy<const TO_PAGES: bool>(p: &PagedCopyParams) {
    let (pages, ragged) = if block_y() == 0 {
        (p.k_pages as *mut Vec16, p.k_ragged as *mut Vec16)
    } else {
        (p.v_pages as *mut Vec16, p.v_ragged as *mut Vec16)
    };
    let row0 = block_x() * p.rows_per_block;
    let rows = p.rows_per_block.min(p.total_rows - row0);
    let row_offsets = (p.row_offsets as *const u64).add(row0 as usize);
    let ragged = ragged.add(row0 as usize * p.row_vecs.divisor as usize);

    let n = rows * p.row_vecs.divisor;
    let stride = block_dim_x();
    let mut e0 = thread_x();
    while e0 < n {
        let mut vals = [Vec16::default(); UNROLL as usize];
        let mut dsts = [core::ptr::null_mut::<Vec16>(); UNROLL as usize];
        for u in 0..UNROLL {
            let e = e0 + u * stride;
            if e < n {
                let (r, v) = p.row_vecs.divmod(e);
                let row = *row_offsets.add(r as usize) >> p.vec_shift;
                let paged = pages.add((row + p.layout.vec_offset(v) as u64) as usize);
                let flat = ragged.add(e as usize);
                let (src, dst) = if TO_PAGES { (flat, paged) } else { (paged, flat) };
                vals[u as usize] = load_readonly(src);
                dsts[u as usize] = dst;
            }
        }
        for u in 0..UNROLL {
            if e0 + u * stride < n {
                store(dsts[u as usize], vals[u as usize]);
            }
        }
        e0 += UNROLL * stride;
    }
}

// The entry points exist on the GPU only (the CPU emulator calls `paged_copy`).

/// Paged K/V → ragged K/V. Grid: `(ceil(total_rows / rows_per_block), 2)`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn paged_kv_gather(p: PagedCopyParams) {
    paged_copy::<false>(&p)
}

/// Ragged K/V → paged K/V (scatter, and append). Grid: `(ceil(total_rows / rows_per_block), 2)`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn paged_kv_scatter(p: PagedCopyParams) {
    paged_copy::<true>(&p)
}

/// Sixteen values of `H` (two vectors) times `factor`, quantised to 8 bits.
#[inline(always)]
fn quantise16<H: Half, F: Fp8>(lo: Vec16, hi: Vec16, factor: f32) -> Vec16 {
    let mut out = Vec16::default();
    // Output word w holds values 4w..4w + 4: the two pairs of input words 2w and 2w + 1.
    crate::unroll!(w in [0, 1, 2, 3] {
        let pair = |word: u32| F::pack2(H::to_f32(word as u16) * factor, H::to_f32((word >> 16) as u16) * factor);
        let (a, b) = if w < 2 { (lo.0[2 * w], lo.0[2 * w + 1]) } else { (hi.0[2 * w - 4], hi.0[2 * w - 3]) };
        out.0[w] = pair(a) | pair(b) << 16;
    });
    out
}

/// One vector of sixteen 8-bit values times `factor`, as two vectors of `H`.
#[inline(always)]
fn dequantise16<H: Half, F: Fp8>(v: Vec16, factor: f32) -> [Vec16; 2] {
    let mut x = [[0.0f32; 8]; 2];
    crate::unroll!(e in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
        x[e / 8][e % 8] = to_f32::<F>(v.0[e / 4] >> (8 * (e % 4))) * factor;
    });
    [pack::<H>(&x[0]), pack::<H>(&x[1])]
}

/// The factor of KV head `head`'s values: the layer's `factor` times the head's scale (gather)
/// or its reciprocal (scatter) from the per-KV-head scales at `scales` (0: none, `factor`).
/// One f32 product, as the host's quantiser and dequantiser compute it.
#[inline(always)]
unsafe fn head_factor<const TO_PAGES: bool>(scales: u64, v: bool, head: u32, factor: f32) -> f32 {
    if scales == 0 {
        return factor;
    }
    let s = &*(scales as *const KvHeadScale).add(head as usize);
    factor
        * match (TO_PAGES, v) {
            (false, false) => s.k,
            (false, true) => s.v,
            (true, false) => s.k_rcp,
            (true, true) => s.v_rcp,
        }
}

/// [`paged_copy`] between an 8-bit cache and 16-bit ragged K/V. Pool vectors hold sixteen
/// values; `vec_shift` is 4 and the layout and `row_vecs` count pool vectors, so ragged vector
/// `2e` and `2e + 1` go with pool vector `e`. Vector `v` of a row (pool vectors, `[head][dim]`
/// in either layout) is of KV head `v / head_vecs`, whose scale joins the factor.
#[inline(always)]
pub unsafe fn paged_copy_fp8<const TO_PAGES: bool, H: Half, F: Fp8>(p: &PagedCopyParams) {
    let is_v = block_y() != 0;
    let (pages, ragged, factor) = if is_v {
        (p.v_pages as *mut Vec16, p.v_ragged as *mut Vec16, p.v_factor)
    } else {
        (p.k_pages as *mut Vec16, p.k_ragged as *mut Vec16, p.k_factor)
    };
    let row0 = block_x() * p.rows_per_block;
    let rows = p.rows_per_block.min(p.total_rows - row0);
    let row_offsets = (p.row_offsets as *const u64).add(row0 as usize);
    let ragged = ragged.add(2 * row0 as usize * p.row_vecs.divisor as usize);

    let n = rows * p.row_vecs.divisor;
    let stride = block_dim_x();
    let mut e0 = thread_x();
    while e0 < n {
        // Loads of every step first, then conversions and stores.
        let mut loaded = [[Vec16::default(); 2]; UNROLL as usize];
        let mut paged_at = [core::ptr::null_mut::<Vec16>(); UNROLL as usize];
        let mut factors = [factor; UNROLL as usize];
        crate::unroll!(u in [0, 1, 2, 3] {
            let e = e0 + u as u32 * stride;
            if e < n {
                let (r, v) = p.row_vecs.divmod(e);
                let row = *row_offsets.add(r as usize) >> p.vec_shift;
                let paged = pages.add((row + p.layout.vec_offset(v) as u64) as usize);
                let flat = ragged.add(2 * e as usize);
                paged_at[u] = paged;
                factors[u] = head_factor::<TO_PAGES>(p.kv_head_scales, is_v, p.layout.head_vecs.div(v), factor);
                loaded[u] = if TO_PAGES {
                    [load_readonly(flat), load_readonly(flat.add(1))]
                } else {
                    [load_readonly(paged), Vec16::default()]
                };
            }
        });
        crate::unroll!(u in [0, 1, 2, 3] {
            let e = e0 + u as u32 * stride;
            if e < n {
                let [a, b] = loaded[u];
                if TO_PAGES {
                    store(paged_at[u], quantise16::<H, F>(a, b, factors[u]));
                } else {
                    let flat = ragged.add(2 * e as usize);
                    let [lo, hi] = dequantise16::<H, F>(a, factors[u]);
                    store(flat, lo);
                    store(flat.add(1), hi);
                }
            }
        });
        e0 += UNROLL * stride;
    }
}
