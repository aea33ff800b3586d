//! Failure and concurrency: running out of device memory is an error with context that leaves
//! the device, caches and allocator usable; one `Device` driven from several threads, each on
//! its own stream, gives the same results as serial use; the kernels load as prebuilt SASS, not
//! through the driver's half-minute-or-longer compile of their PTX.
use ferrinfer::{
    f16, BatchDecodePlan, CacheShape, DecodeOptions, Device, Error, KvLayout, PagedKvCache, SequenceAllocator,
};
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{random_cache, random_table, random_values, rng, shape_for};

fn out_of_memory_is_an_error_and_everything_stays_usable(dev: &Device) -> TestResult {
    let shape = CacheShape { num_pages: 64, page_size: 16, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
    let cache = PagedKvCache::<f16>::new(dev, shape, 2)?;
    let mut alloc = SequenceAllocator::new(shape.num_pages, shape.page_size)?;
    let seq = alloc.create();
    alloc.reserve(seq, 100)?;
    // 2^38 elements (512 GiB) per pool: more than any GPU has, within the shape limits.
    let huge = CacheShape { num_pages: 1 << 19, page_size: 256, head_dim: 256, ..shape };
    match PagedKvCache::<f16>::new(dev, huge, 1) {
        Err(Error::Driver { context, .. }) => ensure!(!context.is_empty(), "no context in the error"),
        Err(e) => ensure!(matches!(e, Error::TooLarge { .. }), "unexpected error: {e}"),
        Ok(_) => return Err("a 1 TiB cache was allocated".into()),
    }
    // The device, the earlier cache and the allocator still work.
    alloc.reserve(seq, 50)?;
    let table = alloc.page_table(&[seq])?;
    let mut plan = BatchDecodePlan::new(dev, &shape, 32, &table, DecodeOptions::default())?;
    let q = dev.upload(&random_values::<f16>(&mut rng(1), plan.qo_elems()))?;
    let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
    plan.run(dev.stream(), &q, &cache, 1, &mut out, None)?;
    dev.synchronize()?;
    ensure!(dev.download(&out)?.iter().all(|x| x.is_finite()), "decode after the failure wrote non-finite values");
    Ok(())
}

fn threads_on_their_own_streams_match_serial_use(dev: &Device) -> TestResult {
    let mut r = rng(21);
    let kv_lens = [900, 17, 3000, 1];
    let shape = shape_for(&kv_lens, 7, 4, 128, KvLayout::Nhd);
    let table = random_table(&mut r, &kv_lens, 7, shape.num_pages);
    let (cache, _) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let queries: Vec<Vec<f16>> = (0..4).map(|_| random_values(&mut r, kv_lens.len() * 16 * 128)).collect();
    let run = |q: &[f16], stream: &std::sync::Arc<cudarc::driver::CudaStream>| -> Result<Vec<f16>, Error> {
        // A plan per thread: a plan's scratch serves one run at a time.
        let mut plan = BatchDecodePlan::new(dev, &shape, 16, &table, DecodeOptions::default())?;
        let q = dev.upload(q)?;
        let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
        plan.run(stream, &q, &cache, 0, &mut out, None)?;
        stream.synchronize().map_err(|source| Error::Driver { context: "synchronizing a stream", source })?;
        dev.download(&out)
    };
    let serial: Vec<Vec<f16>> = queries.iter().map(|q| run(q, dev.stream())).collect::<Result<_, _>>()?;
    let parallel: Vec<Vec<f16>> = std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .iter()
            .map(|q| s.spawn(move || -> Result<Vec<f16>, Error> { run(q, &dev.new_stream()?) }))
            .collect();
        handles.into_iter().map(|h| h.join().expect("a thread panicked")).collect::<Result<_, _>>()
    })?;
    ensure!(serial == parallel, "results from several threads differ from serial runs");
    Ok(())
}

/// Ampere, Ada and Hopper run the committed cubins: a driver that refused them would fall back to
/// the PTX silently, and a process would start half a minute or more later.
fn kernels_load_as_prebuilt_sass_on_ampere_ada_and_hopper(dev: &Device) -> TestResult {
    let (major, minor) = dev.compute_capability();
    if matches!(major, 8 | 9) && std::env::var_os("FERRINFER_KERNELS_FROM_PTX").is_none() {
        ensure!(
            dev.kernels_prebuilt(),
            "compute capability {major}.{minor}: the kernels were compiled from PTX, not loaded from the cubins (host/ptx/*.cubin.zst)"
        );
    }
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    vec![
        GpuTest::new(
            "kernels_load_as_prebuilt_sass_on_ampere_ada_and_hopper",
            kernels_load_as_prebuilt_sass_on_ampere_ada_and_hopper,
        ),
        GpuTest::new(
            "out_of_memory_is_an_error_and_everything_stays_usable",
            out_of_memory_is_an_error_and_everything_stays_usable,
        ),
        GpuTest::new("threads_on_their_own_streams_match_serial_use", threads_on_their_own_streams_match_serial_use),
    ]
}
