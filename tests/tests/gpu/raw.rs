//! The raw API (device addresses, lengths and a `CUstream`, for stacks not on cudarc) against
//! the cudarc API: the same plan run both ways gives bit-identical results, on a stream the
//! raw caller made itself; and lengths are checked in the raw form too.
use cudarc::driver::{CudaSlice, DevicePtr};
use ferrinfer::{
    f16, BatchDecodePlan, BatchPrefillPlan, DecodeOptions, Device, Error, GatherPlan, KvLayout, PrefillOptions,
    RawSlice,
};
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{random_cache, random_table, random_values, rng, shape_for};

/// The raw view of a cudarc buffer (its address, taken on the device's stream).
fn raw<T>(dev: &Device, buffer: &CudaSlice<T>) -> RawSlice<T> {
    let (ptr, _sync) = buffer.device_ptr(dev.stream());
    // SAFETY: `buffer` is a live allocation of `dev`'s context holding `len` elements; the
    // tests keep it alive until the raw launch has completed (they synchronise first).
    unsafe { RawSlice::new(ptr, buffer.len()) }
}

fn raw_and_cudarc_runs_agree(dev: &Device) -> TestResult {
    let mut r = rng(11);
    let kv_lens = [700, 3, 129];
    let shape = shape_for(&kv_lens, 7, 2, 128, KvLayout::Hnd);
    let table = random_table(&mut r, &kv_lens, 7, shape.num_pages);
    let (cache, _) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let pools = cache.layer(0)?;
    let (k_pool, v_pool) = (raw(dev, pools.k()), raw(dev, pools.v()));
    // The raw caller's own stream.
    let foreign = dev.new_stream()?;
    dev.synchronize()?;

    let mut decode = BatchDecodePlan::new(dev, &shape, 8, &table, DecodeOptions::default())?;
    let q = dev.upload(&random_values::<f16>(&mut r, decode.qo_elems()))?;
    let (mut a, b) = (dev.alloc_zeros::<f16>(decode.qo_elems())?, dev.alloc_zeros::<f16>(decode.qo_elems())?);
    decode.run(dev.stream(), &q, &cache, 0, &mut a, None)?;
    dev.synchronize()?;
    // SAFETY: every buffer is live and idle (synchronised), the stream is of dev's context.
    unsafe { decode.run_raw(foreign.cu_stream(), raw(dev, &q), k_pool, v_pool, raw(dev, &b), None)? };
    foreign.synchronize()?;
    ensure!(dev.download(&a)? == dev.download(&b)?, "decode: raw and cudarc runs differ");

    let qo_indptr = [0, 60, 63, 129];
    let causal = PrefillOptions { causal: true, ..Default::default() };
    let mut prefill = BatchPrefillPlan::new(dev, &shape, 8, &qo_indptr, &table, causal)?;
    let q = dev.upload(&random_values::<f16>(&mut r, prefill.qo_elems()))?;
    let (mut a, b) = (dev.alloc_zeros::<f16>(prefill.qo_elems())?, dev.alloc_zeros::<f16>(prefill.qo_elems())?);
    let mut lse = dev.alloc_zeros::<f32>(129 * 8)?;
    prefill.run(dev.stream(), &q, &cache, 0, &mut a, Some(&mut lse))?;
    dev.synchronize()?;
    let lse_raw = dev.alloc_zeros::<f32>(129 * 8)?;
    // SAFETY: as above.
    unsafe {
        prefill.run_raw(foreign.cu_stream(), raw(dev, &q), k_pool, v_pool, raw(dev, &b), Some(raw(dev, &lse_raw)))?
    };
    foreign.synchronize()?;
    ensure!(dev.download(&a)? == dev.download(&b)?, "prefill: raw and cudarc runs differ");
    ensure!(dev.download(&lse)? == dev.download(&lse_raw)?, "prefill LSE: raw and cudarc runs differ");

    let gather = GatherPlan::new(dev, &shape, &table)?;
    dev.synchronize()?;
    let n = gather.ragged_elems();
    let (mut ka, mut va) = (dev.alloc_zeros::<f16>(n)?, dev.alloc_zeros::<f16>(n)?);
    let (kb, vb) = (dev.alloc_zeros::<f16>(n)?, dev.alloc_zeros::<f16>(n)?);
    gather.run(dev.stream(), &cache, 0, &mut ka, &mut va)?;
    dev.synchronize()?;
    // SAFETY: as above; the plan's upload was synchronised.
    unsafe { gather.run_raw(foreign.cu_stream(), [k_pool, v_pool], raw(dev, &kb), raw(dev, &vb))? };
    foreign.synchronize()?;
    ensure!(dev.download(&ka)? == dev.download(&kb)? && dev.download(&va)? == dev.download(&vb)?, "gather differs");
    Ok(())
}

fn raw_lengths_are_checked(dev: &Device) -> TestResult {
    let mut r = rng(12);
    let shape = shape_for(&[40], 16, 2, 64, KvLayout::Nhd);
    let table = random_table(&mut r, &[40], 16, shape.num_pages);
    let mut decode = BatchDecodePlan::new(dev, &shape, 2, &table, DecodeOptions::default())?;
    let (q, pool) = (dev.alloc_zeros::<f16>(decode.qo_elems())?, dev.alloc_zeros::<f16>(shape.pool_elems() - 8)?);
    let out = dev.alloc_zeros::<f16>(decode.qo_elems())?;
    // SAFETY: the short pool is rejected before any launch.
    let e = unsafe {
        decode.run_raw(dev.stream().cu_stream(), raw(dev, &q), raw(dev, &pool), raw(dev, &pool), raw(dev, &out), None)
    }
    .err()
    .ok_or("accepted a short pool")?;
    ensure!(matches!(e, Error::BufferLength { what: "k", .. }), "wrong error: {e}");
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    vec![
        GpuTest::new("raw_and_cudarc_runs_agree_decode_prefill_gather", raw_and_cudarc_runs_agree),
        GpuTest::new("raw_runs_check_lengths", raw_lengths_are_checked),
    ]
}
