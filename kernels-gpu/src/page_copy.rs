//! Copies between the paged KV cache and contiguous ragged K/V: gather (pages → ragged) and
//! scatter/append (ragged → pages). `page_size` and the layout are run-time values.
//!
//! A block owns `rows_per_block` consecutive ragged rows and streams their 16-byte vectors as
//! one flat, coalesced range, `UNROLL` loads in flight per thread. Each vector's place in the
//! pool is its row's offset (resolved from the page table when the host planned the copy, one
//! load that neighbouring threads share) plus its head's stride in the layout.
use crate::abi::PagedCopyParams;
use crate::gpu::index::{block_dim_x, block_x, block_y, thread_x};
use crate::gpu::mem::{load_readonly, store, Vec16};

const UNROLL: u32 = 4;

#[inline(always)]
unsafe fn paged_copy<const TO_PAGES: bool>(p: &PagedCopyParams) {
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

/// Paged K/V → ragged K/V. Grid: `(ceil(total_rows / rows_per_block), 2)`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn paged_kv_gather(p: PagedCopyParams) {
    paged_copy::<false>(&p)
}

/// Ragged K/V → paged K/V (scatter, and append). Grid: `(ceil(total_rows / rows_per_block), 2)`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn paged_kv_scatter(p: PagedCopyParams) {
    paged_copy::<true>(&p)
}
