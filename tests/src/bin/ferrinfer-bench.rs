//! ferrinfer's main job and benchmark: runs the kernels on a generated paged workload, checks a
//! sample against the CPU reference, and reports bandwidth as a fraction of a device-to-device
//! copy measured in the same run (CUDA events, warm-up, median of many runs). Without a GPU it
//! runs the CPU reference on the same kind of workload and says so.
use std::time::Instant;

use clap::Parser;
use cudarc::driver::{CudaSlice, CudaStream};
use ferrinfer::{f16, reference, CacheShape, Device, KvLayout, PagedCopyPlan, PagedKvCache};
use ferrinfer_tests::workload::{first_bitwise_mismatch, random_table, random_values, rng};

#[derive(Parser)]
#[command(about = "ferrinfer benchmark: paged KV gather against a device-to-device copy")]
struct Args {
    /// Sequences in the batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 4096)]
    kv_len: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Page sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 512, 7, 100])]
    page_sizes: Vec<usize>,
    #[arg(long, default_value = "nhd")]
    layout: String,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Median milliseconds of `runs` timed calls of `f` on `stream`, after 3 warm-up calls.
fn time_ms(
    dev: &Device,
    stream: &CudaStream,
    runs: usize,
    mut f: impl FnMut() -> ferrinfer::Result<()>,
) -> BoxResult<f64> {
    for _ in 0..3 {
        f()?;
    }
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (start, end) = (dev.context().new_event(flags)?, dev.context().new_event(flags)?);
        start.record(stream)?;
        f()?;
        end.record(stream)?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn layout(name: &str) -> BoxResult<KvLayout> {
    match name {
        "nhd" => Ok(KvLayout::Nhd),
        "hnd" => Ok(KvLayout::Hnd),
        other => Err(format!("unknown layout {other}; use nhd or hnd").into()),
    }
}

fn run_gpu(dev: &Device, args: &Args) -> BoxResult<()> {
    let stream = dev.stream().clone();
    let layout = layout(&args.layout)?;
    println!("GPU: {} (compute capability {:?})", dev.name(), dev.compute_capability());

    // The ceiling: a device-to-device copy of 2 GiB, counting bytes read plus written.
    let copy_elems = 1usize << 30;
    let src: CudaSlice<f16> = dev.alloc_zeros(copy_elems)?;
    let mut dst: CudaSlice<f16> = dev.alloc_zeros(copy_elems)?;
    let copy_ms = time_ms(dev, &stream, args.runs, || {
        stream.memcpy_dtod(&src, &mut dst).map_err(|e| ferrinfer::Error::Driver { context: "copying", source: e })
    })?;
    let copy_gbs = 2.0 * (copy_elems * 2) as f64 / copy_ms / 1e6;
    drop((src, dst));
    println!("device-to-device copy: {copy_gbs:.0} GB/s (read + write)\n");

    let kv_lens = vec![args.kv_len; args.batch];
    let mut results = Vec::new();
    println!("| kernel | page_size | batch | kv_len | MB moved | median us | GB/s | % copy | checked |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for &page_size in &args.page_sizes {
        let mut r = rng(page_size as u64);
        let pages = kv_lens.iter().map(|n| n.div_ceil(page_size)).sum::<usize>();
        // A pool 25% larger than the batch needs, pages drawn from a random permutation of it.
        let shape = CacheShape {
            num_pages: pages + pages / 4 + 1,
            page_size,
            num_kv_heads: args.kv_heads,
            head_dim: args.head_dim,
            layout,
        };
        let table = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
        let k_pool: Vec<f16> = random_values(&mut r, shape.pool_elems());
        let v_pool: Vec<f16> = random_values(&mut r, shape.pool_elems());
        let cache = PagedKvCache::from_buffers(shape, dev.upload(&k_pool)?, dev.upload(&v_pool)?)?;
        let plan = PagedCopyPlan::whole_sequences(dev, &shape, &table)?;
        let (mut k_out, mut v_out) =
            (dev.alloc_zeros::<f16>(plan.ragged_elems())?, dev.alloc_zeros::<f16>(plan.ragged_elems())?);
        let ms = time_ms(dev, &stream, args.runs, || plan.gather(dev, &stream, &cache, &mut k_out, &mut v_out))?;
        // K and V, each read once from the pages and written once to the ragged buffers.
        let bytes = 2.0 * 2.0 * (plan.ragged_elems() * 2) as f64;
        let gbs = bytes / ms / 1e6;
        let checked =
            first_bitwise_mismatch(&dev.download(&k_out)?, &reference::gather(&shape, &k_pool, &table)).is_none();
        println!(
            "| gather | {page_size} | {} | {} | {:.0} | {:.1} | {gbs:.0} | {:.1} | {} |",
            args.batch,
            args.kv_len,
            bytes / 1e6,
            ms * 1e3,
            100.0 * gbs / copy_gbs,
            if checked { "K bit-exact" } else { "MISMATCH" }
        );
        results.push(
            serde_json::json!({"kernel": "gather", "page_size": page_size, "batch": args.batch, "kv_len": args.kv_len,
            "bytes": bytes, "median_us": ms * 1e3, "gbs": gbs, "pct_copy": 100.0 * gbs / copy_gbs, "checked": checked}),
        );
        if !checked {
            return Err(format!("gather at page_size {page_size} does not match the CPU reference").into());
        }
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({"gpu": dev.name(), "copy_gbs": copy_gbs, "results": results});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

/// No GPU: the same gather on the CPU reference, on a smaller workload.
fn run_cpu(args: &Args) -> BoxResult<()> {
    let (batch, kv_len) = (args.batch.min(8), args.kv_len.min(1024));
    let kv_lens = vec![kv_len; batch];
    for &page_size in &args.page_sizes {
        let mut r = rng(page_size as u64);
        let pages = kv_lens.iter().map(|n| n.div_ceil(page_size)).sum::<usize>();
        let shape = CacheShape {
            num_pages: pages + 1,
            page_size,
            num_kv_heads: args.kv_heads,
            head_dim: args.head_dim,
            layout: layout(&args.layout)?,
        };
        let table = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
        let pool: Vec<f16> = random_values(&mut r, shape.pool_elems());
        let t = Instant::now();
        let out = reference::gather(&shape, &pool, &table);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let checksum: f64 = out.iter().map(|x| x.to_f64()).sum();
        println!("cpu reference gather: page_size {page_size:>4}, {batch} × {kv_len} tokens: {ms:.1} ms, checksum {checksum:.4}");
    }
    Ok(())
}

fn main() -> BoxResult<()> {
    let args = Args::parse();
    match Device::new(0) {
        Ok(dev) => run_gpu(&dev, &args),
        Err(e) => {
            println!("No GPU available ({e}).\nRunning the CPU reference path instead (smaller workload, no timing comparison).");
            run_cpu(&args)
        }
    }
}
