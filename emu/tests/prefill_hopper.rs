//! The Hopper prefill kernel (`wgmma`, a producer warpgroup, mbarriers, ping-pong consumers) on
//! the emulator against the f64 reference. This kernel passes its tests on H200s, so these
//! cases check the emulator's Hopper instructions as much as the kernel: the descriptors'
//! swizzled addressing, the accumulator and register-operand layouts, the mbarrier phases. The
//! parameters are the host plan's own (`prefill_split`, `persistent_schedule`,
//! `prefill_params`): odd page sizes on shuffled pages, partly full last pages, empty and
//! one-token requests, causal and not, several units a persistent block, split keys merged.
use ferrinfer::internals::abi::{
    hopper_prefill_byte_stages, hopper_prefill_smem_bytes, hopper_prefill_stages, hopper_prefill_tile_tokens,
    PrefillParams, SplitScratch, HOPPER_PREFILL_ROWS, HOPPER_PREFILL_THREADS,
};
use ferrinfer::internals::{persistent_schedule, prefill_params, prefill_split, Addresses, PrefillKernel};
use ferrinfer::{f16, reference, CacheShape, KvLayout, KvScales, PageTable, PrefillOptions};
use ferrinfer_emu::gpu::half::F16;
use ferrinfer_emu::{launch, prefill_hopper, DeviceBuffer, LaunchConfig};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::workload::{pages_needed, poison, random_table, random_values, rng};

struct Case {
    /// (qo_len, kv_len) per request.
    lens: Vec<(usize, usize)>,
    page_size: usize,
    head_dim: usize,
    causal: bool,
    /// Persistent blocks the schedule deals units to (the GPU's SMs).
    sms: usize,
    /// Whether the plan must split row tiles.
    splits: bool,
}

const QO_HEADS: usize = 8;
const KV_HEADS: usize = 2;

/// The kernel for head_dim `$dim` over an f16 cache (the constants of `entries.rs`).
macro_rules! kernel_f16 {
    ($dim:literal) => {
        |p: &PrefillParams| unsafe {
            prefill_hopper::prefill_hopper::<
                F16,
                F16,
                $dim,
                { hopper_prefill_tile_tokens($dim, 2) },
                { hopper_prefill_stages($dim, 2) },
                { hopper_prefill_byte_stages($dim, 2) },
                { hopper_prefill_tile_tokens($dim, 2) as usize / 8 },
                { hopper_prefill_tile_tokens($dim, 2) as usize / 16 },
                { $dim / 8 },
            >(p)
        }
    };
}

fn run(case: &Case, seed: u64, kernel: fn(&PrefillParams)) {
    let mut r = rng(seed);
    let kv_lens: Vec<usize> = case.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = CacheShape {
        num_pages: pages_needed(&kv_lens, case.page_size) + 2,
        page_size: case.page_size,
        num_kv_heads: KV_HEADS,
        head_dim: case.head_dim,
        layout: KvLayout::Nhd,
    };
    let table: PageTable = random_table(&mut r, &kv_lens, case.page_size, shape.num_pages);
    let (k, v): (Vec<f16>, Vec<f16>) =
        (random_values(&mut r, shape.pool_elems()), random_values(&mut r, shape.pool_elems()));
    let mut qo_indptr = vec![0u32];
    for &(qo, _) in &case.lens {
        qo_indptr.push(qo_indptr.last().unwrap() + qo as u32);
    }
    let rows = *qo_indptr.last().unwrap() as usize * QO_HEADS;
    let q: Vec<f16> = random_values(&mut r, rows * case.head_dim);
    let options = PrefillOptions { causal: case.causal, ..PrefillOptions::DEFAULT };
    let split = prefill_split(&shape, QO_HEADS, &qo_indptr, &table, options, PrefillKernel::Hopper, case.sms, 1)
        .expect("a valid batch");
    assert_eq!(split.split_tiles > 0, case.splits, "whether the plan splits row tiles");
    let tile_tokens = hopper_prefill_tile_tokens(case.head_dim as u32, 2);
    let (schedule, blocks) = persistent_schedule(&split.work, KV_HEADS, tile_tokens, case.sms);

    let b_k = DeviceBuffer::from_slice("k pool", &k);
    let b_v = DeviceBuffer::from_slice("v pool", &v);
    let b_indices = DeviceBuffer::from_slice("kv_indices", &table.kv_indices);
    let b_work = DeviceBuffer::from_slice("work items", &split.work);
    let b_schedule = DeviceBuffer::from_slice("schedule", &schedule);
    let b_q = DeviceBuffer::from_slice("q", &q);
    let b_out = DeviceBuffer::filled("out", rows * case.head_dim, poison::<f16>());
    let b_lse = DeviceBuffer::filled("lse", rows, f32::NAN);
    let partial_rows = split.slots * KV_HEADS * HOPPER_PREFILL_ROWS as usize;
    let b_counters = DeviceBuffer::filled("merge counters", (split.split_tiles * KV_HEADS).max(1), 0u32);
    let b_partial = DeviceBuffer::filled("partial out", (partial_rows * case.head_dim).max(1), f32::NAN);
    let b_partial_lse = DeviceBuffer::filled("partial lse", partial_rows.max(1), f32::NAN);
    let ops = Addresses {
        q: b_q.ptr(),
        k: b_k.ptr(),
        v: b_v.ptr(),
        out: b_out.ptr(),
        lse: b_lse.ptr(),
        sinks: 0,
        scales: KvScales::default(),
        head_scales: 0,
    };
    let scratch = SplitScratch {
        merge_counters: b_counters.ptr(),
        partial_out: b_partial.ptr(),
        partial_lse: b_partial_lse.ptr(),
    };
    let params = prefill_params(
        &shape,
        (QO_HEADS, split.group_size, split.sm_scale),
        &options,
        &ops,
        &[b_indices.ptr(), b_work.ptr(), b_schedule.ptr()],
        scratch,
    );
    let cfg = LaunchConfig {
        grid: (blocks as u32, 1),
        threads: HOPPER_PREFILL_THREADS,
        smem_bytes: hopper_prefill_smem_bytes(case.head_dim as u32, 2),
    };
    launch(cfg, move || kernel(&params)).unwrap_or_else(|f| panic!("Hopper prefill: {f}"));

    let (want, want_lse) = reference::prefill(&shape, &k, &v, &table, &qo_indptr, &q, QO_HEADS, &options);
    expect_attention_close(&b_out.to_vec(), &want, &b_lse.to_vec(), &want_lse, QO_HEADS, case.head_dim, "token")
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn prefill_hopper_causal_page_size_3_head_dim_64_f16() {
    let case = Case {
        lens: vec![(40, 40), (0, 5), (1, 1), (70, 130)],
        page_size: 3,
        head_dim: 64,
        causal: true,
        sms: 4,
        splits: false,
    };
    run(&case, 1, kernel_f16!(64));
}

#[test]
fn prefill_hopper_page_size_48_head_dim_128_f16() {
    let case =
        Case { lens: vec![(33, 100), (17, 17)], page_size: 48, head_dim: 128, causal: false, sms: 2, splits: false };
    run(&case, 2, kernel_f16!(128));
}

#[test]
fn prefill_hopper_causal_one_unit_a_block_page_size_1_head_dim_128_f16() {
    let case = Case { lens: vec![(20, 90), (9, 9)], page_size: 1, head_dim: 128, causal: true, sms: 64, splits: false };
    run(&case, 3, kernel_f16!(128));
}

#[test]
fn prefill_hopper_split_keys_merged_page_size_7_head_dim_64_f16() {
    let case = Case { lens: vec![(16, 1500)], page_size: 7, head_dim: 64, causal: true, sms: 16, splits: true };
    run(&case, 4, kernel_f16!(64));
}
