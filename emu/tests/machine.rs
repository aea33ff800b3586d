//! The emulator itself: its collectives give what the PTX ISA says, and what it promises to
//! catch it catches (divergent warps, deadlocks, accesses outside the buffers or the shared
//! memory, a read of an asynchronous copy before waiting for it).
use std::cell::RefCell;
use std::rc::Rc;

use ferrinfer_emu::gpu::index::{block_x, lane, thread_x, warp};
use ferrinfer_emu::gpu::mem::{load_readonly, Vec16};
use ferrinfer_emu::gpu::shared::{dynamic_smem_addr, load_shared_u32, store_shared_u32, store_shared_u32x4};
use ferrinfer_emu::gpu::sync::sync_threads;
use ferrinfer_emu::gpu::tensor::{
    commit_async_copies, copy_async, load_matrix_x4, load_matrix_x4_trans, mma_f16, wait_async_copies,
};
use ferrinfer_emu::gpu::warp::{any, reduce_sum_f32, shfl_idx_u32, shfl_xor_u32};
use ferrinfer_emu::{launch, DeviceBuffer, LaunchConfig};
use half::f16;

fn one_block(threads: u32, smem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid: (1, 1), threads, smem_bytes }
}

/// Collects one value per thread.
fn per_thread<T: Copy + Default + 'static>(threads: u32, f: impl Fn() -> T + 'static) -> Vec<T> {
    let out = Rc::new(RefCell::new(vec![T::default(); threads as usize]));
    let o = out.clone();
    launch(one_block(threads, 4096), move || {
        let v = f();
        o.borrow_mut()[thread_x() as usize] = v;
    })
    .unwrap();
    let v = out.borrow().clone();
    v
}

#[test]
fn shuffles_votes_and_reductions_follow_the_ptx_semantics() {
    let xor = per_thread(64, || shfl_xor_u32(thread_x(), 5));
    assert!(xor.iter().enumerate().all(|(t, &v)| v as usize == (t & !31) | ((t % 32) ^ 5)));
    let idx = per_thread(64, || shfl_idx_u32(thread_x() * 10, 31 - lane()));
    assert!(idx.iter().enumerate().all(|(t, &v)| v as usize == 10 * ((t & !31) + 31 - t % 32)));
    let votes = per_thread(64, || any(thread_x() == 40) as u32);
    assert_eq!(votes, [vec![0; 32], vec![1; 32]].concat());
    let sums = per_thread(32, || reduce_sum_f32(lane() as f32));
    assert!(sums.iter().all(|&s| s == 496.0));
}

#[test]
fn ldmatrix_and_mma_compute_a_16x16_by_16x8_product_in_the_documented_fragments() {
    // A row-major 16 × 16 at shared offset 0, B stored as Bᵀ (8 × 16, `[n][k]`) at 512:
    // A[r][k] = r + k / 16, B[k][n] = 1 where k = n, 0.5 where k = n + 8.
    let a = |r: usize, k: usize| r as f32 + k as f32 / 16.0;
    let b = |k: usize, n: usize| (k == n) as u32 as f32 + 0.5 * (k == n + 8) as u32 as f32;
    let d = per_thread(32, move || {
        let base = dynamic_smem_addr();
        let l = lane() as usize;
        // Lane l writes half l % 2 of A's row l / 2 and a quarter of Bᵀ's row l / 4, in pairs.
        for e in 0..4 {
            let (r, k) = (l / 2, 8 * (l % 2) + 2 * e);
            let w = f16::from_f32(a(r, k)).to_bits() as u32 | (f16::from_f32(a(r, k + 1)).to_bits() as u32) << 16;
            unsafe { store_shared_u32(base + 2 * (r * 16 + k) as u32, w) };
        }
        for e in 0..2 {
            let (n, k) = (l / 4, 4 * (l % 4) + 2 * e);
            let w = f16::from_f32(b(k, n)).to_bits() as u32 | (f16::from_f32(b(k + 1, n)).to_bits() as u32) << 16;
            unsafe { store_shared_u32(base + 512 + 2 * (n * 16 + k) as u32, w) };
        }
        sync_threads();
        // A: lanes 0–15 rows 0–15 at k 0, lanes 16–31 the same rows at k 8. Bᵀ: lanes 0–7 rows
        // (n) 0–7 at k 0, lanes 8–15 at k 8.
        let fa = unsafe { load_matrix_x4(base + 2 * ((l % 16) * 16 + 8 * (l / 16)) as u32) };
        let fb = unsafe { load_matrix_x4(base + 512 + 2 * ((l % 8) * 16 + 8 * ((l / 8) % 2)) as u32) };
        let mut acc = [1.0f32; 4];
        mma_f16(&mut acc, fa, [fb[0], fb[1]]);
        acc
    });
    for (l, acc) in d.iter().enumerate() {
        let (g, t) = (l / 4, l % 4);
        for (c, &got) in acc.iter().enumerate() {
            let (r, n) = (g + 8 * (c / 2), 2 * t + c % 2);
            // A's values rounded to f16 as stored; B's are exact.
            let want = (0..16).fold(1.0f32, |s, k| s + f16::from_f32(a(r, k)).to_f32() * b(k, n));
            assert!((got - want).abs() < 1e-3, "lane {l} entry {c}: {got} against {want}");
        }
    }
}

#[test]
fn transposed_ldmatrix_gives_each_lane_a_column_pair() {
    let q = per_thread(32, || {
        let base = dynamic_smem_addr();
        // Matrix i, row r, column c holds 1000 i + 10 r + c (as u16).
        let l = lane();
        for c in 0..8u32 {
            let (i, r) = (l / 8, l % 8);
            let v = 1000 * i + 10 * r + c;
            let addr = base + 16 * l + 2 * c;
            unsafe { store_shared_u32(addr & !3, if c % 2 == 0 { v } else { load_shared_u32(addr & !3) | v << 16 }) };
        }
        sync_threads();
        unsafe { load_matrix_x4_trans(base + 16 * l) }
    });
    for (l, regs) in q.iter().enumerate() {
        let (g, t) = (l as u32 / 4, l as u32 % 4);
        for (i, &w) in regs.iter().enumerate() {
            let i = i as u32;
            assert_eq!(w & 0xFFFF, 1000 * i + 10 * (2 * t) + g, "lane {l} matrix {i}");
            assert_eq!(w >> 16, 1000 * i + 10 * (2 * t + 1) + g, "lane {l} matrix {i}");
        }
    }
}

#[test]
fn a_shuffle_that_half_a_warp_skips_is_a_fault() {
    let fault = launch(one_block(32, 0), || {
        if lane() < 16 {
            shfl_xor_u32(1, 1);
        }
    })
    .unwrap_err();
    assert!(fault.what.contains("deadlock"), "{fault}");
}

#[test]
fn lanes_at_different_collectives_are_a_fault() {
    let fault = launch(one_block(32, 0), || {
        if lane() < 16 {
            shfl_xor_u32(1, 1);
        } else {
            any(true);
        }
    })
    .unwrap_err();
    assert!(fault.what.contains("diverged"), "{fault}");
}

#[test]
fn a_block_barrier_that_a_warp_skips_deadlocks() {
    let fault = launch(one_block(64, 0), || {
        if warp() == 0 {
            sync_threads();
        }
    })
    .unwrap_err();
    assert!(fault.what.contains("deadlock"), "{fault}");
}

#[test]
fn a_global_load_past_the_buffer_is_a_fault_naming_it() {
    let buf = DeviceBuffer::filled("sixteen floats", 16, 0.0f32);
    let p = buf.ptr();
    let fault = launch(LaunchConfig { grid: (2, 1), threads: 32, smem_bytes: 0 }, move || unsafe {
        // Four threads read the four vectors; block 1 one past them.
        if lane() < 4 {
            load_readonly((p as *const Vec16).add(lane() as usize + 4 * block_x() as usize));
        }
    })
    .unwrap_err();
    assert_eq!(fault.block, (1, 0));
    assert!(fault.what.contains("outside every buffer") && fault.what.contains("sixteen floats"), "{fault}");
}

#[test]
fn a_shared_access_past_the_launch_bytes_is_a_fault() {
    let fault =
        launch(one_block(32, 1024), || unsafe { store_shared_u32x4(dynamic_smem_addr() + 64 * lane(), [0; 4]) })
            .unwrap_err();
    assert!(fault.what.contains("outside the launch's 1024 bytes"), "{fault}");
}

#[test]
fn an_asynchronous_copy_lands_only_when_its_thread_waits() {
    let src = DeviceBuffer::from_slice("source", &[7u32; 4 * 32]);
    let out = DeviceBuffer::filled("out", 2 * 32, 0u32);
    let (s, o) = (src.ptr(), out.ptr());
    launch(one_block(32, 512), move || unsafe {
        let dst = dynamic_smem_addr() + 16 * lane();
        copy_async(dst, (s as *const Vec16).add(lane() as usize));
        commit_async_copies();
        let before = load_shared_u32(dst);
        wait_async_copies(0);
        let after = load_shared_u32(dst);
        let row = (o as *mut u32).add(2 * lane() as usize);
        *row = before;
        *row.add(1) = after;
    })
    .unwrap();
    // Shared memory starts as 0xFF bytes: the early read sees them, the late one the copy.
    assert!(out.to_vec().chunks(2).all(|p| p == [u32::MAX, 7]));
}

#[test]
fn copies_tied_to_an_mbarrier_land_only_for_the_waiter_of_its_phase() {
    use ferrinfer_emu::gpu::hopper::{mbarrier_arrive_on_async_copies, mbarrier_init, mbarrier_wait};
    let src = DeviceBuffer::from_slice("source", &[5u32; 4 * 32]);
    let out = DeviceBuffer::filled("out", 2 * 32, 0u32);
    let (s, o) = (src.ptr(), out.ptr());
    launch(one_block(64, 1024), move || unsafe {
        let base = dynamic_smem_addr();
        let bar = base + 1016;
        if thread_x() == 0 {
            mbarrier_init(bar, 32);
        }
        sync_threads();
        if warp() == 0 {
            // The producer: a copy each, tied to the barrier (expected count 32: no extra arrival).
            copy_async(base + 16 * lane(), (s as *const Vec16).add(lane() as usize));
            mbarrier_arrive_on_async_copies(bar);
        } else {
            // The consumer: before waiting it sees shared memory's initial bytes; after, the copy.
            let row = (o as *mut u32).add(2 * lane() as usize);
            *row = load_shared_u32(base + 16 * lane());
            mbarrier_wait(bar, 0);
            *row.add(1) = load_shared_u32(base + 16 * lane());
        }
    })
    .unwrap();
    assert!(out.to_vec().chunks(2).all(|p| p == [u32::MAX, 5]));
}

/// A TMA box lands through the 128-byte swizzle of its shared address (its rows need not start
/// an 8-row group), rows past the tensor as zeros, and completes its bytes on the mbarrier: the
/// phase needs both the arrival with `expect_tx` and every byte.
#[test]
fn a_tma_box_lands_swizzled_with_zeros_past_the_tensor_and_completes_its_bytes() {
    use ferrinfer_emu::gpu::hopper::{
        mbarrier_arrive_expect_tx, mbarrier_init, mbarrier_wait, tma_load_2d, TensorMap2d,
    };
    // A 5-row tensor of 64 u16 a row: element (r, c) = 100 r + c.
    let tensor: Vec<u16> = (0..5 * 64).map(|i| (100 * (i / 64) + i % 64) as u16).collect();
    let t = DeviceBuffer::from_slice("tensor", &tensor);
    let map = TensorMap2d { base: t.ptr(), width: 64, rows: 5, stride: 128, box_rows: 4, ..Default::default() };
    let m = DeviceBuffer::from_slice("map", &[map]);
    let out = DeviceBuffer::filled("out", 4 * 64, 0u16);
    let (m, o) = (m.ptr(), out.ptr());
    launch(one_block(32, 4096), move || unsafe {
        let base = dynamic_smem_addr();
        let bar = base + 4088;
        if lane() == 0 {
            mbarrier_init(bar, 1);
            mbarrier_arrive_expect_tx(bar, 4 * 128);
            // Rows 2..6 of the tensor into rows 3..7 of a swizzled 1024-byte atom.
            tma_load_2d(base + 3 * 128, m, 0, 2, bar);
        }
        sync_threads();
        mbarrier_wait(bar, 0);
        // Element (r, c) of the box at row 3 + r: chunk c / 8 XORed with the row's address bits.
        for i in [lane(), lane() + 32, lane() + 64, lane() + 96, lane() + 128, lane() + 160, lane() + 192, lane() + 224]
        {
            let (r, c) = (i / 64, i % 64);
            let row = 3 + r;
            let addr = base + row * 128 + (((c / 8) ^ (row % 8)) * 16) + 2 * (c % 8);
            let word = load_shared_u32(addr & !3);
            let v = if addr.is_multiple_of(4) { word & 0xFFFF } else { word >> 16 };
            *(o as *mut u16).add(i as usize) = v as u16;
        }
    })
    .unwrap();
    let want: Vec<u16> =
        (0..4 * 64).map(|i| if i / 64 + 2 < 5 { (100 * (i / 64 + 2) + i % 64) as u16 } else { 0 }).collect();
    assert_eq!(out.to_vec(), want);
}

/// A stage armed for more bytes than its boxes bring never completes.
#[test]
fn an_mbarrier_expecting_bytes_no_box_brings_is_a_deadlock() {
    use ferrinfer_emu::gpu::hopper::{
        mbarrier_arrive_expect_tx, mbarrier_init, mbarrier_wait, tma_load_2d, TensorMap2d,
    };
    let t = DeviceBuffer::from_slice("tensor", &[0u16; 64]);
    let map = TensorMap2d { base: t.ptr(), width: 64, rows: 1, stride: 128, box_rows: 1, ..Default::default() };
    let m = DeviceBuffer::from_slice("map", &[map]);
    let m = m.ptr();
    let fault = launch(one_block(32, 2048), move || unsafe {
        let base = dynamic_smem_addr();
        let bar = base + 2040;
        if lane() == 0 {
            mbarrier_init(bar, 1);
            mbarrier_arrive_expect_tx(bar, 256);
            tma_load_2d(base, m, 0, 0, bar);
        }
        sync_threads();
        mbarrier_wait(bar, 0);
    })
    .unwrap_err();
    assert!(fault.what.contains("deadlock"), "{fault}");
}

#[test]
fn an_mbarrier_phase_that_never_completes_is_a_deadlock() {
    use ferrinfer_emu::gpu::hopper::{mbarrier_arrive, mbarrier_init, mbarrier_wait};
    let fault = launch(one_block(32, 1024), || unsafe {
        let bar = dynamic_smem_addr();
        if lane() == 0 {
            mbarrier_init(bar, 33);
        }
        sync_threads();
        mbarrier_arrive(bar);
        mbarrier_wait(bar, 0);
    })
    .unwrap_err();
    assert!(fault.what.contains("deadlock"), "{fault}");
}

/// `setmaxnreg` only moves registers within the block's pool (168 a thread at 384 threads):
/// consumers may take what a producer warpgroup gave back, and waiting for more never ends
/// (the thirty-fourth session's MLA build asked 128 · 32 + 256 · 240 = 64 Ki and hung).
#[test]
fn claiming_registers_past_the_blocks_pool_is_a_deadlock() {
    use ferrinfer_emu::gpu::hopper::{claim_registers, release_registers};
    // The producer warpgroup first or last: consumers that ask before it gives back wait.
    let split = |over: bool, producer: u32| {
        launch(one_block(384, 0), move || {
            if thread_x() / 128 == producer {
                if over {
                    release_registers::<32>();
                } else {
                    release_registers::<24>();
                }
            } else {
                claim_registers::<240>();
            }
        })
    };
    split(false, 0).unwrap();
    split(false, 2).unwrap();
    let fault = split(true, 0).unwrap_err();
    assert!(fault.what.contains("deadlock") && fault.what.contains("RegisterClaim"), "{fault}");
}
