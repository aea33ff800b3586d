//! The paged copy kernels on the emulator, from the host plans' own parameters
//! (`append_row_offsets`, `copy_params`): the MLA append (one plan of ckv row offsets, the kpe
//! pool's rows the same offsets `KPE_OFFSET_SHIFT` narrower), bit for bit against the reference
//! append, into 16-bit and quantising into 8-bit caches, at page sizes 1, 7 and 64; and a
//! gather of a two-head cache in both layouts.
use ferrinfer::internals::abi::PagedCopyParams;
use ferrinfer::internals::{append_row_offsets, copy_params, KPE_OFFSET_SHIFT};
use ferrinfer::{bf16, f16, reference, CacheShape, E4m3, KvDType, KvLayout, KvScales, PageTable};
use ferrinfer_emu::gpu::{fp8, half};
use ferrinfer_emu::{launch, page_copy, DeviceBuffer, LaunchConfig};
use ferrinfer_tests::workload::{expect_bitwise_eq, pages_needed, random_table, random_values, rng};

/// The copy kernels' block size (the host's `THREADS`; the kernels take any).
const THREADS: u32 = 256;

fn one_head(num_pages: usize, page_size: usize, dim: usize) -> CacheShape {
    CacheShape { num_pages, page_size, num_kv_heads: 1, head_dim: dim, layout: KvLayout::Nhd }
}

/// Runs one copy launch of `params` over `grid`.
fn run_copy(params: PagedCopyParams, grid: (u32, u32), kernel: fn(&PagedCopyParams)) {
    let cfg = LaunchConfig { grid, threads: THREADS, smem_bytes: params.rows_per_block * 8 };
    launch(cfg, move || kernel(&params)).unwrap_or_else(|f| panic!("copy kernel: {f}"));
}

/// The MLA append of `T` rows into a cache of `C` (scale `scale`), against the reference.
fn mla_append<T: KvDType, C: KvDType>(page_size: usize, scale: f32, seed: u64, kernel: fn(&PagedCopyParams)) {
    let mut r = rng(seed);
    // After the append: lengths 9, 1, 0 and 130; appended 4, 1, 0 and 67 tokens.
    let kv_lens = [9, 1, 0, 130];
    let append_indptr = [0u32, 4, 5, 5, 72];
    let num_pages = pages_needed(&kv_lens, page_size) + 3;
    let table: PageTable = random_table(&mut r, &kv_lens, page_size, num_pages);
    let (ckv_shape, kpe_shape) = (one_head(num_pages, page_size, 512), one_head(num_pages, page_size, 64));
    let mut ckv: Vec<C> = random_values(&mut r, ckv_shape.pool_elems());
    let mut kpe: Vec<C> = random_values(&mut r, kpe_shape.pool_elems());
    let (new_ckv, new_kpe): (Vec<T>, Vec<T>) = (random_values(&mut r, 72 * 512), random_values(&mut r, 72 * 64));
    let offsets = append_row_offsets(&ckv_shape, &table, &append_indptr).expect("a valid append");
    assert_eq!(offsets.len(), 72);

    let b_ckv = DeviceBuffer::from_slice("ckv pool", &ckv);
    let b_kpe = DeviceBuffer::from_slice("kpe pool", &kpe);
    let b_new_ckv = DeviceBuffer::from_slice("ragged ckv", &new_ckv);
    let b_new_kpe = DeviceBuffer::from_slice("ragged kpe", &new_kpe);
    let b_offsets = DeviceBuffer::from_slice("row offsets", &offsets);
    let scales = KvScales { k: scale, v: scale };
    for (pool, shift, pages, ragged) in
        [(&ckv_shape, 0, &b_ckv, &b_new_ckv), (&kpe_shape, KPE_OFFSET_SHIFT, &b_kpe, &b_new_kpe)]
    {
        let buffers = [pages.ptr(), 0, ragged.ptr(), 0];
        let (params, grid) = copy_params::<C>((pool, shift), true, 72, 1, buffers, b_offsets.ptr(), scales, 0);
        run_copy(params, grid, kernel);
    }

    reference::append_quantised(&ckv_shape, &mut ckv, &table, &append_indptr, &new_ckv, scale);
    reference::append_quantised(&kpe_shape, &mut kpe, &table, &append_indptr, &new_kpe, scale);
    expect_bitwise_eq("ckv pool", &b_ckv.to_vec(), &ckv, 512).unwrap_or_else(|e| panic!("{e}"));
    expect_bitwise_eq("kpe pool", &b_kpe.to_vec(), &kpe, 64).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn mla_append_page_size_7_f16() {
    mla_append::<f16, f16>(7, 1.0, 1, |p| unsafe { page_copy::paged_copy::<true>(p) });
}

#[test]
fn mla_append_page_size_1_bf16() {
    mla_append::<bf16, bf16>(1, 1.0, 2, |p| unsafe { page_copy::paged_copy::<true>(p) });
}

#[test]
fn mla_append_quantised_into_e4m3_page_size_64_bf16() {
    mla_append::<bf16, E4m3>(64, 0.0625 * 1.1, 3, |p| unsafe {
        page_copy::paged_copy_fp8::<true, half::Bf16, fp8::E4m3>(p)
    });
}

/// A gather of whole sequences of a two-head cache in `layout`, against the reference gather.
fn gather(layout: KvLayout, page_size: usize, seed: u64) {
    let mut r = rng(seed);
    let kv_lens = [0, 5, 33, 1];
    let shape = CacheShape {
        num_pages: pages_needed(&kv_lens, page_size) + 2,
        page_size,
        num_kv_heads: 2,
        head_dim: 64,
        layout,
    };
    let table: PageTable = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
    let (k, v): (Vec<f16>, Vec<f16>) =
        (random_values(&mut r, shape.pool_elems()), random_values(&mut r, shape.pool_elems()));
    // Every position of every sequence: an append of whole sequences, read the other way.
    let whole: Vec<u32> = std::iter::once(0)
        .chain(kv_lens.iter().scan(0, |n, &l| {
            *n += l as u32;
            Some(*n)
        }))
        .collect();
    let offsets = append_row_offsets(&shape, &table, &whole).expect("a valid table");
    let rows = offsets.len();
    let (b_k, b_v) = (DeviceBuffer::from_slice("k pool", &k), DeviceBuffer::from_slice("v pool", &v));
    let b_offsets = DeviceBuffer::from_slice("row offsets", &offsets);
    let out_elems = rows * shape.token_elems();
    let (b_ko, b_vo) =
        (DeviceBuffer::filled("ragged k", out_elems, f16::NAN), DeviceBuffer::filled("ragged v", out_elems, f16::NAN));
    let buffers = [b_k.ptr(), b_v.ptr(), b_ko.ptr(), b_vo.ptr()];
    let (params, grid) =
        copy_params::<f16>((&shape, 0), false, rows as u32, 2, buffers, b_offsets.ptr(), KvScales::default(), 0);
    run_copy(params, grid, |p| unsafe { page_copy::paged_copy::<false>(p) });
    let row = shape.token_elems();
    expect_bitwise_eq("gathered k", &b_ko.to_vec(), &reference::gather(&shape, &k, &table), row)
        .unwrap_or_else(|e| panic!("{e}"));
    expect_bitwise_eq("gathered v", &b_vo.to_vec(), &reference::gather(&shape, &v, &table), row)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn gather_page_size_3_nhd_f16() {
    gather(KvLayout::Nhd, 3, 4);
}

#[test]
fn gather_page_size_16_hnd_f16() {
    gather(KvLayout::Hnd, 16, 5);
}
