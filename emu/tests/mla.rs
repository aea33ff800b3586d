//! The MLA kernels (portable, and for 16-bit caches the Hopper one with either producer:
//! `cp.async` copies and TMA boxes at every page size) and their merge, run by the CPU
//! emulator from their own source, with NaN in every pool slot that holds no key,
//! against the f64 reference: shuffled pages of sizes 1, 7, 64, 100 and one larger than the
//! sequences, empty and one-token requests, 16, 64 and 128 heads, split row tiles merged by the
//! second kernel, causal multi-token queries, f16 and bf16 queries over 16-bit and 8-bit
//! caches, poisoned outputs. The launches' parameters are the host plan's own (`mla_split`,
//! `mla_params`). Small shapes: every thread of every block is emulated.
use ferrinfer::internals::abi::{
    mla_hopper_smem_bytes, mla_smem_bytes, MlaMergeParams, MlaParams, MLA_CKV_DIM, MLA_HOPPER_THREADS, MLA_MERGE_ROWS,
    MLA_MERGE_THREADS, MLA_ROWS, MLA_THREADS, MLA_TMA_MAPS,
};
use ferrinfer::internals::{mla_params, MlaAddresses};
use ferrinfer::{bf16, f16, mla_split, reference, E4m3, E5m2, KvDType, MlaCacheShape, MlaOptions, PageTable};
use ferrinfer_emu::gpu::fp8::{self, KvElem};
use ferrinfer_emu::gpu::half;
use ferrinfer_emu::gpu::hopper::{TensorMap2d, Wgmma};
use ferrinfer_emu::{launch, mla, mla_hopper, DeviceBuffer, LaunchConfig, SplitBuffers};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::workload::{pages_needed, poison, poison_slots_without_keys, random_table, random_values, rng};
use rand::Rng;

const CKV: usize = MlaCacheShape::CKV_DIM;
const KPE: usize = MlaCacheShape::KPE_DIM;

struct Case {
    /// (qo_len, kv_len) per request.
    lens: Vec<(usize, usize)>,
    page_size: usize,
    heads: usize,
    causal: bool,
    /// Multiprocessors the plan fills: few make it split long requests' row tiles.
    sms: usize,
    /// Whether the plan must split row tiles (checked when given, so that the merge is
    /// exercised).
    splits: Option<bool>,
    /// Keys grow with their position (key `j`'s rotary part times `1 + j / 16`), so a row's
    /// maximum keeps rising from tile to tile past the softmax's rescaling margin.
    rising_keys: bool,
}

fn decode(kv_lens: &[usize], page_size: usize, heads: usize) -> Case {
    Case {
        lens: kv_lens.iter().map(|&kv| (1, kv)).collect(),
        page_size,
        heads,
        causal: false,
        sms: 1,
        splits: Some(false),
        rising_keys: false,
    }
}

/// Stored values about ±1 / scale, so that an 8-bit cache's values mean about ±1.
const FP8_SCALE: f32 = 0.0625 * 1.1;

/// The kernel a case runs on.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kernel {
    Portable,
    /// The Hopper kernel, its producer copying with `cp.async`.
    HopperCopies,
    /// The Hopper kernel, its producer issuing TMA boxes.
    HopperTma,
}

/// Runs `case` with queries of `T` (kernel type `H`) over a cache of `C` (kernel type `K`) on
/// the emulator and compares with the reference: on the portable kernel, and for a 16-bit
/// cache on the Hopper one as well, both producers (the same work items, partials and merge).
/// The pools' slots that hold no key are NaN: they must not reach an output.
fn run<T: KvDType, C: KvDType, H: Wgmma + KvElem + 'static, K: KvElem + 'static>(case: &Case, seed: u64) {
    run_on::<T, C, H, K>(case, seed, Kernel::Portable);
    if T::DTYPE == C::DTYPE {
        run_on::<T, C, H, K>(case, seed, Kernel::HopperCopies);
        run_on::<T, C, H, K>(case, seed, Kernel::HopperTma);
    }
}

fn run_on<T: KvDType, C: KvDType, H: Wgmma + KvElem + 'static, K: KvElem + 'static>(
    case: &Case,
    seed: u64,
    kernel: Kernel,
) {
    let mut r = rng(seed);
    let kv_lens: Vec<usize> = case.lens.iter().map(|&(_, kv)| kv).collect();
    let shape = MlaCacheShape { num_pages: pages_needed(&kv_lens, case.page_size) + 3, page_size: case.page_size };
    let table: PageTable = random_table(&mut r, &kv_lens, case.page_size, shape.num_pages);
    let scale = if C::DTYPE.is_fp8() { FP8_SCALE } else { 1.0 };
    let mut values =
        |n: usize| -> Vec<C> { (0..n).map(|_| C::from_f64(r.random_range(-1.0..1.0) / scale as f64)).collect() };
    let (mut ckv, mut kpe) = (values(shape.ckv_pool_elems()), values(shape.kpe_pool_elems()));
    poison_slots_without_keys(&mut ckv, CKV, &table, &kv_lens, case.page_size);
    poison_slots_without_keys(&mut kpe, KPE, &table, &kv_lens, case.page_size);
    if case.rising_keys {
        for (request, &kv_len) in kv_lens.iter().enumerate() {
            let pages = &table.kv_indices[table.kv_indptr[request] as usize..];
            for j in 0..kv_len {
                let slot = pages[j / case.page_size] as usize * case.page_size + j % case.page_size;
                let row = &mut kpe[slot * KPE..(slot + 1) * KPE];
                row.iter_mut().for_each(|x| *x = C::from_f64(x.to_f64() * (1.0 + j as f64 / 16.0)));
            }
        }
    }
    let mut qo_indptr = vec![0u32];
    for &(qo, _) in &case.lens {
        qo_indptr.push(qo_indptr.last().unwrap() + qo as u32);
    }
    let rows = *qo_indptr.last().unwrap() as usize * case.heads;
    let q_nope: Vec<T> = random_values(&mut r, rows * CKV);
    let q_pe: Vec<T> = random_values(&mut r, rows * KPE);
    let kv_dtype = (T::DTYPE != C::DTYPE).then_some(C::DTYPE);
    let options = MlaOptions { sm_scale: 1.0 / 192f32.sqrt(), causal: case.causal, kv_dtype };
    let split = mla_split(&shape, case.heads, &qo_indptr, &table, options, case.sms, 1).expect("a valid batch");
    if let Some(splits) = case.splits {
        assert_eq!(!split.merge_tiles.is_empty(), splits, "whether the plan splits row tiles");
    }

    let b_ckv = DeviceBuffer::from_slice("ckv pool", &ckv);
    let b_kpe = DeviceBuffer::from_slice("kpe pool", &kpe);
    let b_indices = DeviceBuffer::from_slice("kv_indices", &table.kv_indices);
    let b_work = DeviceBuffer::from_slice("work items", &split.work);
    let b_tiles = DeviceBuffer::from_slice("merge tiles", &split.merge_tiles);
    let b_q_nope = DeviceBuffer::from_slice("q_nope", &q_nope);
    let b_q_pe = DeviceBuffer::from_slice("q_pe", &q_pe);
    let b_out = DeviceBuffer::filled("out", rows * CKV, poison::<T>());
    let b_lse = DeviceBuffer::filled("lse", rows, f32::NAN);
    let partial_rows = split.slots * MLA_ROWS as usize;
    // 16-bit partial rows: half a row of f32.
    let scratch_buffers = SplitBuffers::new(0, partial_rows, MLA_CKV_DIM as usize / 2);
    let addresses = MlaAddresses {
        q_nope: b_q_nope.ptr(),
        q_pe: b_q_pe.ptr(),
        ckv: b_ckv.ptr(),
        kpe: b_kpe.ptr(),
        kv_indices: b_indices.ptr(),
        work: b_work.ptr(),
        merge_tiles: b_tiles.ptr(),
        out: b_out.ptr(),
        lse: b_lse.ptr(),
        split: scratch_buffers.scratch(),
    };
    let (mut params, merge_params): (MlaParams, MlaMergeParams) =
        mla_params(&shape, case.heads, &options, scale, &addresses);
    // The maps the host encodes for the GPU, in the emulator's form: for box heights 64, 32,
    // .., 1 the ckv pool's, then the kpe pool's.
    let pool_rows = (shape.num_pages * shape.page_size) as u64;
    let maps: Vec<TensorMap2d> = (0..7)
        .flat_map(|i| {
            let map = |base, width| TensorMap2d {
                base,
                width,
                rows: pool_rows,
                stride: 2 * width,
                box_rows: 64 >> i,
                ..Default::default()
            };
            [map(b_ckv.ptr(), CKV as u64), map(b_kpe.ptr(), KPE as u64)]
        })
        .collect();
    assert_eq!(maps.len(), MLA_TMA_MAPS);
    let b_maps = DeviceBuffer::from_slice("TMA maps", &maps);
    if kernel == Kernel::HopperTma {
        params.tensor_maps = b_maps.ptr();
        params.pool_rows = pool_rows as u32;
    }

    let grid = (split.work.len() as u32, 1);
    // SAFETY (emulated): the parameters address the buffers above, as the plan's would.
    let hopper = kernel != Kernel::Portable;
    let launched = if hopper {
        let cfg = LaunchConfig { grid, threads: MLA_HOPPER_THREADS, smem_bytes: mla_hopper_smem_bytes() };
        launch(cfg, move || unsafe { mla_hopper::mla_hopper::<H>(&params) })
    } else {
        let cfg = LaunchConfig { grid, threads: MLA_THREADS, smem_bytes: mla_smem_bytes(<K as KvElem>::BYTES) };
        launch(cfg, move || unsafe { mla::mla::<H, K>(&params) })
    };
    let kernel = format!("MLA kernel ({kernel:?})");
    launched.unwrap_or_else(|f| panic!("{kernel}: {f}"));
    if !split.merge_tiles.is_empty() {
        let cfg = LaunchConfig {
            grid: (split.merge_tiles.len() as u32, MLA_ROWS / MLA_MERGE_ROWS),
            threads: MLA_MERGE_THREADS,
            smem_bytes: 0,
        };
        // SAFETY: as above.
        launch(cfg, move || unsafe { mla::mla_merge::<H>(&merge_params) })
            .unwrap_or_else(|f| panic!("MLA merge kernel: {f}"));
    }

    let (want, want_lse) =
        reference::mla_scaled(&shape, &ckv, &kpe, scale, &table, &qo_indptr, &q_nope, &q_pe, case.heads, &options);
    expect_attention_close(&b_out.to_vec(), &want, &b_lse.to_vec(), &want_lse, case.heads, CKV, "token")
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
}

#[test]
fn mla_decode_page_size_1_heads_16_f16() {
    run::<f16, f16, half::F16, half::F16>(&decode(&[0, 1, 7, 33, 100], 1, 16), 1);
}

#[test]
fn mla_decode_page_size_7_heads_64_bf16() {
    run::<bf16, bf16, half::Bf16, half::Bf16>(&decode(&[65, 0, 1, 40], 7, 64), 2);
}

#[test]
fn mla_decode_page_size_100_heads_128_f16() {
    run::<f16, f16, half::F16, half::F16>(&decode(&[130, 3], 100, 128), 3);
}

#[test]
fn mla_decode_page_size_513_longer_than_the_sequences_heads_16_bf16() {
    run::<bf16, bf16, half::Bf16, half::Bf16>(&decode(&[3, 1, 200], 513, 16), 4);
}

#[test]
fn mla_decode_split_and_merged_page_size_64_heads_64_f16() {
    let case = Case { sms: 8, splits: Some(true), ..decode(&[1000, 5], 64, 64) };
    run::<f16, f16, half::F16, half::F16>(&case, 5);
}

/// Logits that rise from tile to tile: the softmax's maxima pass their rescaling margin in the
/// middle of a request (the Hopper kernel then computes a tile's probabilities again against
/// the new maxima, and the other warpgroup adopts them).
#[test]
fn mla_decode_rising_logits_page_size_7_heads_16_f16() {
    let case = Case { rising_keys: true, ..decode(&[600, 130, 1], 7, 16) };
    run::<f16, f16, half::F16, half::F16>(&case, 9);
}

#[test]
fn mla_decode_rising_logits_split_and_merged_page_size_64_heads_64_bf16() {
    let case = Case { rising_keys: true, sms: 8, splits: Some(true), ..decode(&[1000, 5], 64, 64) };
    run::<bf16, bf16, half::Bf16, half::Bf16>(&case, 10);
}

/// One to four 64-key tiles, the last holding one key or full, so that either warpgroup of the
/// Hopper kernel has the last tile (and on a kernel taking tiles in pairs, a pair's second tile
/// holds one key or is missing); with rising logits the maxima move in either warpgroup's tiles.
#[test]
fn mla_decode_one_to_four_tiles_page_size_64_heads_128_f16() {
    let lens = [64, 65, 128, 129, 192, 200, 256];
    run::<f16, f16, half::F16, half::F16>(&decode(&lens, 64, 128), 14);
    run::<f16, f16, half::F16, half::F16>(&Case { rising_keys: true, ..decode(&lens, 64, 128) }, 15);
}

#[test]
fn mla_decode_split_and_merged_page_size_7_heads_16_bf16() {
    let case = Case { sms: 4, splits: Some(true), ..decode(&[700], 7, 16) };
    run::<bf16, bf16, half::Bf16, half::Bf16>(&case, 6);
}

/// Row tiles split in 13 and in 2 parts: the merge takes the first tile's parts eight at a
/// time, rescaling its running sums between the groups.
#[test]
fn mla_decode_split_in_many_and_in_few_parts_page_size_7_heads_16_f16() {
    let case = Case { sms: 16, splits: Some(true), rising_keys: true, ..decode(&[2000, 300], 7, 16) };
    run::<f16, f16, half::F16, half::F16>(&case, 13);
}

#[test]
fn mla_causal_multi_token_page_size_7_heads_16_f16() {
    let case = Case { lens: vec![(1, 1), (6, 50), (3, 3), (0, 20), (5, 70)], causal: true, ..decode(&[], 7, 16) };
    run::<f16, f16, half::F16, half::F16>(&case, 7);
}

#[test]
fn mla_decode_e4m3_cache_page_size_7_heads_16_f16() {
    run::<f16, E4m3, half::F16, fp8::E4m3>(&decode(&[0, 1, 45, 90], 7, 16), 8);
}

#[test]
fn mla_decode_e5m2_cache_split_page_size_1_heads_64_bf16() {
    let case = Case { sms: 4, splits: Some(true), ..decode(&[600], 1, 64) };
    run::<bf16, E5m2, half::Bf16, fp8::E5m2>(&case, 9);
}

#[test]
fn mla_decode_split_and_merged_heads_128_page_size_64_bf16() {
    let case = Case { sms: 8, splits: Some(true), ..decode(&[2048, 1], 64, 128) };
    run::<bf16, bf16, half::Bf16, half::Bf16>(&case, 10);
}

#[test]
fn mla_causal_multi_token_page_size_64_heads_128_bf16() {
    let case = Case { lens: vec![(3, 200), (1, 1), (2, 64)], causal: true, ..decode(&[], 64, 128) };
    run::<bf16, bf16, half::Bf16, half::Bf16>(&case, 11);
}

#[test]
fn mla_decode_e4m3_cache_page_size_100_heads_128_bf16() {
    run::<bf16, E4m3, half::Bf16, fp8::E4m3>(&decode(&[300, 0, 7], 100, 128), 12);
}

/// Random batches: page sizes, head counts, decode or causal multi-token queries, lengths
/// (empty and one-token among them), split or not, drawn from a fixed seed.
#[test]
fn mla_random_batches_bf16() {
    let mut r = rng(3000);
    for seed in 0..6 {
        let page_size = [1, 3, 7, 16, 64, 100][r.random_range(0..6)];
        let heads = [16, 32, 64, 128][r.random_range(0..4)];
        let causal = r.random_bool(0.5);
        let lens: Vec<(usize, usize)> = (0..r.random_range(1..=3))
            .map(|_| {
                let kv = [0, 1, r.random_range(2..600)][r.random_range(0..3)];
                let qo = if causal { r.random_range(0..=kv.min(4)) } else { 1 };
                (qo, kv)
            })
            .collect();
        let sms = [1, 8, 64][r.random_range(0..3)];
        let case = Case { lens, page_size, heads, causal, sms, splits: None, rising_keys: r.random_bool(0.3) };
        run::<bf16, bf16, half::Bf16, half::Bf16>(&case, seed);
    }
}
