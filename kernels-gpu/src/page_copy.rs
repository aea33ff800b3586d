//! Copies between the paged KV cache and contiguous ragged K/V: gather (pages → ragged) and
//! scatter/append (ragged → pages). `page_size` and the layout are run-time values.
//!
//! A block owns `rows_per_block` consecutive ragged rows. First each row's page-pool offset is
//! found once (a binary search for its sequence, one fast division by `page_size`, one page
//! table read) and parked in shared memory; then the block streams the rows' 16-byte vectors
//! as one flat, coalesced range, `UNROLL` loads in flight per thread.
use crate::abi::PagedCopyParams;
use crate::gpu::index::{block_dim_x, block_x, block_y, thread_x};
use crate::gpu::mem::{load_readonly, store, Vec16};
use crate::gpu::shared::dynamic_smem;
use crate::gpu::sync::sync_threads;
use crate::paged::{sequence_of_row, PageTable};

const UNROLL: u32 = 4;

#[inline(always)]
unsafe fn paged_copy<const TO_PAGES: bool>(p: &PagedCopyParams) {
    let (pages, ragged) = if block_y() == 0 {
        (p.k_pages as *mut Vec16, p.k_ragged as *mut Vec16)
    } else {
        (p.v_pages as *mut Vec16, p.v_ragged as *mut Vec16)
    };
    let ragged_indptr = p.ragged_indptr as *const u32;
    let first_pos = p.first_pos as *const u32;
    let table = PageTable { indptr: p.kv_indptr as *const u32, indices: p.kv_indices as *const u32 };
    let layout = &p.layout;

    let row0 = block_x() * p.rows_per_block;
    let rows = p.rows_per_block.min(p.total_rows - row0);
    let row_offset = dynamic_smem::<u64>();

    let mut r = thread_x();
    while r < rows {
        let row = row0 + r;
        let seq = sequence_of_row(ragged_indptr, p.batch_size + 1, row);
        let pos = *first_pos.add(seq as usize) + (row - *ragged_indptr.add(seq as usize));
        let (page, slot) = table.locate(layout, seq, pos);
        *row_offset.add(r as usize) = layout.token_offset(page, slot);
        r += block_dim_x();
    }
    sync_threads();

    let n = rows * p.row_vecs.divisor;
    let ragged = ragged.add(row0 as usize * p.row_vecs.divisor as usize);
    let stride = block_dim_x();
    let mut e0 = thread_x();
    while e0 < n {
        let mut vals = [Vec16::default(); UNROLL as usize];
        let mut dsts = [core::ptr::null_mut::<Vec16>(); UNROLL as usize];
        for u in 0..UNROLL {
            let e = e0 + u * stride;
            if e < n {
                let (r, v) = p.row_vecs.divmod(e);
                let paged = pages.add((*row_offset.add(r as usize) + layout.vec_offset(v) as u64) as usize);
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

/// Ragged K/V → paged K/V (scatter, and append with `first_pos = kv_len − append_len`).
/// Grid: `(ceil(total_rows / rows_per_block), 2)`.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn paged_kv_scatter(p: PagedCopyParams) {
    paged_copy::<true>(&p)
}
