//! ferrinfer's main job and benchmark: runs the kernels on generated paged workloads, checks
//! each result against the CPU reference, and reports bandwidth as a fraction of a
//! device-to-device copy measured in the same run. Without a GPU it runs the CPU reference on
//! the same kind of workload and says so.
mod cascade;
mod check;
mod decode;
mod merge;
mod mla;
mod page_ops;
mod plan_time;
mod plot;
mod prefill;
mod prefill_mask;
mod rope;
mod sampled;
mod speculative;
mod tensor_parallel;
mod timing;

use std::time::Instant;

use clap::Parser;
use ferrinfer::{bf16, f16, reference, CacheShape, Device, E4m3, E5m2, KvLayout, PageTable};
use ferrinfer_tests::workload::{random_table, random_values, rng};
use indicatif::{ProgressBar, ProgressStyle};
use page_ops::{Bench, Shapes};
use timing::{BoxResult, Timer};

#[derive(Parser)]
#[command(
    about = "ferrinfer benchmark: paged KV gather, append, batch decode, batch prefill, cascade, merge, RoPE and planning"
)]
struct Args {
    /// Sequences in the gather batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Tokens per sequence in the gather batch.
    #[arg(long, default_value_t = 4096)]
    kv_len: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Page sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 64, 512, 7, 100])]
    page_sizes: Vec<usize>,
    #[arg(long, value_enum, default_value = "nhd")]
    layout: Layout,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Kernels to measure (by default the page operations and the decode sweep; prefill,
    /// cascade, merge and plan (host planning time) when asked for).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Kernel::Gather, Kernel::Append, Kernel::Decode])]
    kernels: Vec<Kernel>,
    /// Decode batches.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 64, 256])]
    decode_batches: Vec<usize>,
    /// Each decode row is measured a second time with attention sinks (`run_with_sinks`, one
    /// random logit per query head), printed as a `decode+sinks` row below it.
    #[arg(long)]
    sinks: bool,
    /// Decode query heads per KV head (4: 32 query heads over 8 KV heads).
    #[arg(long, value_delimiter = ',', default_values_t = vec![4])]
    decode_groups: Vec<usize>,
    /// Decode sequence lengths.
    #[arg(long, value_delimiter = ',', default_values_t = vec![512, 4096, 32768])]
    decode_kv_lens: Vec<usize>,
    /// Element types of decode and prefill (gather and append run f16).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Dtype::F16])]
    dtypes: Vec<Dtype>,
    /// The cache's element type for decode, prefill and append: the queries' own (`same`), or
    /// an 8-bit float (FlashInfer's `kv_data_type=torch.float8_e4m3fn`: `e4m3`); MLA's latent
    /// cache too.
    #[arg(long, value_enum, default_value = "same")]
    kv_dtype: KvDtype,
    /// Prefill prompt lengths (qo_len = kv_len, causal).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 4096])]
    prefill_lens: Vec<usize>,
    /// Prompts per prefill batch.
    #[arg(long, default_value_t = 8)]
    prefill_batch: usize,
    /// Prefill masks: causal (FlashInfer's benchmark), full (no mask), or both.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Mask::Causal])]
    prefill_masks: Vec<Mask>,
    /// Plan on the portable kernels only (`Device::with_portable_kernels`): on an H100 or H200,
    /// prefill (and cascade's shared level) on `mma.sync` instead of Hopper's `wgmma`.
    #[arg(long)]
    portable: bool,
    /// MLA decode batches.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 16, 64, 128])]
    mla_batches: Vec<usize>,
    /// MLA decode sequence lengths.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 8192, 32768])]
    mla_kv_lens: Vec<usize>,
    /// MLA query heads (128: DeepSeek-V3 unsharded; 16: one shard of eight).
    #[arg(long, value_delimiter = ',', default_values_t = vec![128])]
    mla_heads: Vec<usize>,
    /// MLA page sizes.
    #[arg(long, value_delimiter = ',', default_values_t = vec![64, 1])]
    mla_page_sizes: Vec<usize>,
    /// Speculative-decoding batches (`--kernels spec`).
    #[arg(long, value_delimiter = ',', default_values_t = vec![16, 64, 256])]
    spec_batches: Vec<usize>,
    /// Draft tokens a request (`--kernels spec`).
    #[arg(long, value_delimiter = ',', default_values_t = vec![2, 4, 8])]
    spec_drafts: Vec<usize>,
    /// Keys a request, the draft tokens' included (`--kernels spec`).
    #[arg(long, value_delimiter = ',', default_values_t = vec![4096, 32768])]
    spec_kv_lens: Vec<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Draw the bandwidth results as an SVG chart here.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// With `--plot`: draw a saved `--json` file instead of running anything (no GPU needed).
    #[arg(long, requires = "plot")]
    plot_from: Option<std::path::PathBuf>,
    /// A short sweep (the demo's): page sizes 16 and 7, decode batches 1, 16 and 64 at
    /// kv_len 512 and 4096, prefill (if asked for) of 1024-token prompts, 10 runs each.
    /// Replaces those options.
    #[arg(long)]
    short: bool,
    /// One short row of every kernel's bar (gather, append, decode, prefill, cascade, merge),
    /// compared with the committed baseline of this GPU model; fails naming any row more than
    /// 3% slower. Replaces the sweep options.
    #[arg(long)]
    check: bool,
    /// With `--check`: the baseline file (default: `bench/baseline/<gpu>.json`, or
    /// `baseline/<gpu>.json` beside the executable in the GPU bundle).
    #[arg(long, requires = "check")]
    baseline: Option<std::path::PathBuf>,
    /// With `--check`: write the rows measured as the baseline here instead of comparing.
    #[arg(long, requires = "check")]
    write_baseline: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mask {
    Causal,
    Full,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kernel {
    Gather,
    Append,
    Decode,
    Prefill,
    /// 64 requests sharing an 8192-token prompt plus 256 own tokens: cascade against plain decode.
    Cascade,
    /// Two states of 8192 tokens × 32 heads × 128 merged (`merge_state`).
    Merge,
    /// Host time of planning: decode batches 1, 64, 256 (kv 4096) and prefill batch 8.
    Plan,
    /// Prefill with a custom mask, tree verification as in EAGLE: 8 requests of 64 draft tokens
    /// forming random trees (a fixed seed) at the end of 4096 keys, page sizes 16 and 1.
    #[value(name = "prefill-mask", alias = "prefill_mask")]
    PrefillMask,
    /// RoPE on 8192 tokens × (32 query + `--kv-heads`) heads: FlashInfer's four functions, out
    /// of place, and the fused append+RoPE against RoPE then append at each page size.
    Rope,
    /// MLA decode (DeepSeek's 512 + 64 dims): `--mla-batches` × `--mla-kv-lens` ×
    /// `--mla-heads` at page sizes 64 and 1 (issue 24's rows).
    Mla,
    /// Tensor-parallel decode, 64 × 4096 (issue 25's row): `--kv-heads` KV heads and 4 query
    /// heads each on one GPU, then on every GPU of the machine up to 2 with NCCL's all-gather
    /// (also on one GPU with it, for its overhead).
    #[value(name = "tensor-parallel", alias = "tensor_parallel")]
    TensorParallel,
    /// Speculative decoding (issue 20): `--spec-batches` × `--spec-drafts` draft tokens at the
    /// end of `--spec-kv-lens` keys, causal, 4 query heads a KV head, at each page size: the
    /// plan's own kernel, the portable one, the Hopper one (where the GPU has it) and one-token
    /// decode as the floor.
    #[value(name = "spec", alias = "speculative")]
    Speculative,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Dtype {
    F16,
    Bf16,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KvDtype {
    Same,
    E4m3,
    E5m2,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Layout {
    Nhd,
    Hnd,
}

impl Args {
    fn shorten(mut self) -> Self {
        if self.check {
            // One short row of each kernel's bar, at page size 16.
            self.kernels =
                vec![Kernel::Gather, Kernel::Append, Kernel::Decode, Kernel::Prefill, Kernel::Cascade, Kernel::Merge];
            self.page_sizes = vec![16];
            self.decode_batches = vec![16, 64];
            self.decode_kv_lens = vec![4096];
            self.decode_groups = vec![4];
            self.dtypes = vec![Dtype::F16];
            self.prefill_lens = vec![1024];
            self.prefill_batch = 8;
            return self;
        }
        if self.short {
            self.page_sizes = vec![16, 7];
            self.decode_batches = vec![1, 16, 64];
            self.decode_kv_lens = vec![512, 4096];
            self.prefill_lens = vec![1024];
            self.runs = 10;
        }
        self
    }

    /// Decode rows of the sweep: (dtype, page_size, batch, kv_len, group), skipping K and V over
    /// 40 GB.
    fn decode_rows(&self) -> Vec<(Dtype, usize, usize, usize, usize)> {
        if !self.kernels.contains(&Kernel::Decode) {
            return Vec::new();
        }
        let mut rows = Vec::new();
        for &ps in &self.page_sizes {
            for &batch in &self.decode_batches {
                for &kv_len in &self.decode_kv_lens {
                    if 2 * batch * kv_len * self.kv_heads * self.head_dim * 2 > 40_000_000_000 {
                        continue;
                    }
                    for &dtype in &self.dtypes {
                        rows.extend(self.decode_groups.iter().map(|&group| (dtype, ps, batch, kv_len, group)));
                    }
                }
            }
        }
        rows
    }

    /// Prefill rows: (dtype, page_size, prompt length, causal).
    fn prefill_rows(&self) -> Vec<(Dtype, usize, usize, bool)> {
        if !self.kernels.contains(&Kernel::Prefill) {
            return Vec::new();
        }
        let mut rows = Vec::new();
        for &mask in &self.prefill_masks {
            for &ps in &self.page_sizes {
                for &len in &self.prefill_lens {
                    rows.extend(self.dtypes.iter().map(|&dtype| (dtype, ps, len, mask == Mask::Causal)));
                }
            }
        }
        rows
    }

    /// Speculative-decoding rows: (dtype, page_size, batch, draft, kv_len), skipping K and V
    /// over 40 GB.
    fn spec_rows(&self) -> Vec<(Dtype, usize, usize, usize, usize)> {
        if !self.kernels.contains(&Kernel::Speculative) {
            return Vec::new();
        }
        let mut rows = Vec::new();
        for &ps in &self.page_sizes {
            for &batch in &self.spec_batches {
                for &kv_len in &self.spec_kv_lens {
                    if 2 * batch * kv_len * self.kv_heads * self.head_dim * 2 > 40_000_000_000 {
                        continue;
                    }
                    for &draft in self.spec_drafts.iter().filter(|&&d| d >= 1 && d <= kv_len) {
                        rows.extend(self.dtypes.iter().map(|&dtype| (dtype, ps, batch, draft, kv_len)));
                    }
                }
            }
        }
        rows
    }

    fn shapes(&self) -> Shapes {
        let layout = match self.layout {
            Layout::Nhd => KvLayout::Nhd,
            Layout::Hnd => KvLayout::Hnd,
        };
        Shapes { kv_heads: self.kv_heads, head_dim: self.head_dim, layout }
    }
}

/// The RoPE rows of `--kernels rope`, before the append rows.
const ROPE_VARIANTS: &[rope::Variant] = &[
    rope::Variant::Ragged,
    rope::Variant::PosIds,
    rope::Variant::Llama31,
    rope::Variant::CosSinCache,
    rope::Variant::OutOfPlace,
];

/// Runs the sweep `args` asks for and returns its rows (as written to `--json`).
fn run_gpu(dev: &Device, args: &Args) -> BoxResult<Vec<serde_json::Value>> {
    let portable;
    let dev = if args.portable {
        portable = dev.with_portable_kernels();
        &portable
    } else {
        dev
    };
    let kernels = match dev.arch_specific_ptx() {
        Some(arch) => format!("{} + {arch}", dev.ptx_arch()),
        None => dev.ptx_arch().to_string(),
    };
    let kernels =
        if dev.kernels_prebuilt() { format!("{kernels} SASS, prebuilt") } else { format!("PTX {kernels}, JIT") };
    println!("GPU: {} (compute capability {:?}; {kernels})", dev.name(), dev.compute_capability());
    let mut timer = Timer::new(dev, args.runs)?;
    // The ceiling: a 1 GiB device-to-device copy, counting bytes read plus written.
    let bytes = 1usize << 30;
    let src = dev.alloc_zeros::<u8>(bytes)?;
    let mut dst = dev.alloc_zeros::<u8>(bytes)?;
    let copy_us = timer.median_us(|| {
        dev.stream().memcpy_dtod(&src, &mut dst).map_err(|e| ferrinfer::Error::Driver { context: "copying", source: e })
    })?;
    let copy_gbs = 2.0 * bytes as f64 / copy_us / 1e3;
    drop((src, dst));
    // ferrinfer's own pure read stream (16-byte loads), the ceiling for kernels that only read.
    let mut read = ferrinfer::internals::ReadStream::new(dev, 4 << 30)?;
    let read_us = timer.median_us(|| read.run(dev.stream()))?;
    let read_gbs = read.bytes() as f64 / read_us / 1e3;
    drop(read);
    println!("device-to-device copy: {copy_gbs:.0} GB/s (read + write); read stream: {read_gbs:.0} GB/s");
    println!("{} timed runs each; before each, the L2 is flushed (a buffer written, another read)\n", args.runs);

    let gather_sizes = if args.kernels.contains(&Kernel::Gather) { &args.page_sizes[..] } else { &[] };
    let append_sizes = if args.kernels.contains(&Kernel::Append) { &args.page_sizes[..] } else { &[] };
    let appends = [(8, 4096), (256, 1)];
    let decode_rows = args.decode_rows();
    let prefill_rows = args.prefill_rows();
    let cascades = if args.kernels.contains(&Kernel::Cascade) { args.page_sizes.len() } else { 0 };
    let merges = args.kernels.contains(&Kernel::Merge) as usize;
    let plans = if args.kernels.contains(&Kernel::Plan) { PLAN_ROWS.len() } else { 0 };
    let ropes = if args.kernels.contains(&Kernel::Rope) { ROPE_VARIANTS.len() + 2 * args.page_sizes.len() } else { 0 };
    let mask_page_sizes: &[usize] = if args.kernels.contains(&Kernel::PrefillMask) { &[16, 1] } else { &[] };
    let mask_rows: Vec<(Dtype, usize)> =
        args.dtypes.iter().flat_map(|&d| mask_page_sizes.iter().map(move |&ps| (d, ps))).collect();
    let mla_rows: Vec<(Dtype, usize, usize, usize, usize)> = if args.kernels.contains(&Kernel::Mla) {
        let mut rows = Vec::new();
        for &ps in &args.mla_page_sizes {
            for &batch in &args.mla_batches {
                for &kv_len in &args.mla_kv_lens {
                    for &heads in &args.mla_heads {
                        rows.extend(args.dtypes.iter().map(|&d| (d, ps, batch, kv_len, heads)));
                    }
                }
            }
        }
        rows
    } else {
        Vec::new()
    };
    let spec_rows = args.spec_rows();
    let total = mla_rows.len()
        + spec_rows.len()
        + gather_sizes.len()
        + mask_rows.len()
        + appends.len() * append_sizes.len()
        + decode_rows.len()
        + prefill_rows.len()
        + cascades
        + merges
        + plans
        + ropes;
    let progress = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} rows, {elapsed} {msg}").expect("a valid template"),
    );
    let mut b = Bench { dev, timer, shapes: args.shapes(), copy_gbs, read_gbs, progress, sinks: args.sinks };
    let mut results = Vec::new();
    if gather_sizes.len() + append_sizes.len() > 0 {
        page_ops::header(&b);
    }
    for &ps in gather_sizes {
        b.progress.set_message(format!("gather, page_size {ps}"));
        results.push(page_ops::gather(&mut b, args.batch, args.kv_len, ps)?);
        b.progress.inc(1);
    }
    for &ps in append_sizes {
        for (batch, tokens) in appends {
            b.progress.set_message(format!("append {batch} × {tokens}, page_size {ps}"));
            results.push(match args.kv_dtype {
                KvDtype::Same => page_ops::append::<f16>(&mut b, batch, tokens, 4096, ps)?,
                KvDtype::E4m3 => page_ops::append::<E4m3>(&mut b, batch, tokens, 4096, ps)?,
                KvDtype::E5m2 => page_ops::append::<E5m2>(&mut b, batch, tokens, 4096, ps)?,
            });
            b.progress.inc(1);
        }
    }
    let mut wrong = 0;
    if !decode_rows.is_empty() {
        b.print("");
        decode::header(&b);
    }
    for &(dtype, ps, batch, kv_len, group) in &decode_rows {
        b.progress.set_message(format!("decode {batch} × {kv_len}, page_size {ps}, group {group}"));
        let (row, row_wrong) = match (dtype, args.kv_dtype) {
            (Dtype::F16, KvDtype::Same) => decode::decode::<f16, f16>(&mut b, batch, kv_len, ps, group)?,
            (Dtype::Bf16, KvDtype::Same) => decode::decode::<bf16, bf16>(&mut b, batch, kv_len, ps, group)?,
            (Dtype::F16, KvDtype::E4m3) => decode::decode::<f16, E4m3>(&mut b, batch, kv_len, ps, group)?,
            (Dtype::Bf16, KvDtype::E4m3) => decode::decode::<bf16, E4m3>(&mut b, batch, kv_len, ps, group)?,
            (Dtype::F16, KvDtype::E5m2) => decode::decode::<f16, E5m2>(&mut b, batch, kv_len, ps, group)?,
            (Dtype::Bf16, KvDtype::E5m2) => decode::decode::<bf16, E5m2>(&mut b, batch, kv_len, ps, group)?,
        };
        results.push(row);
        wrong += row_wrong;
        b.progress.inc(1);
    }
    if !prefill_rows.is_empty() {
        b.print("");
        prefill::header(&b);
    }
    // FlashInfer's prefill benchmark shape: 4 query heads per KV head.
    for &(dtype, ps, len, causal) in &prefill_rows {
        b.progress.set_message(format!("prefill {} × {len}, page_size {ps}", args.prefill_batch));
        let n = args.prefill_batch;
        let (row, row_wrong) = match (dtype, args.kv_dtype) {
            (Dtype::F16, KvDtype::Same) => prefill::prefill::<f16, f16>(&mut b, n, len, ps, 4, causal)?,
            (Dtype::Bf16, KvDtype::Same) => prefill::prefill::<bf16, bf16>(&mut b, n, len, ps, 4, causal)?,
            (Dtype::F16, KvDtype::E4m3) => prefill::prefill::<f16, E4m3>(&mut b, n, len, ps, 4, causal)?,
            (Dtype::Bf16, KvDtype::E4m3) => prefill::prefill::<bf16, E4m3>(&mut b, n, len, ps, 4, causal)?,
            (Dtype::F16, KvDtype::E5m2) => prefill::prefill::<f16, E5m2>(&mut b, n, len, ps, 4, causal)?,
            (Dtype::Bf16, KvDtype::E5m2) => prefill::prefill::<bf16, E5m2>(&mut b, n, len, ps, 4, causal)?,
        };
        results.push(row);
        wrong += row_wrong;
        b.progress.inc(1);
    }
    if !spec_rows.is_empty() {
        b.print("");
        speculative::header(&b);
    }
    for &(dtype, ps, batch, draft, kv_len) in &spec_rows {
        b.progress.set_message(format!("speculative decoding {batch} × {draft} over {kv_len}, page_size {ps}"));
        let (rows, row_wrong) = match dtype {
            Dtype::F16 => speculative::speculative::<f16>(&mut b, batch, draft, kv_len, ps, 4)?,
            Dtype::Bf16 => speculative::speculative::<bf16>(&mut b, batch, draft, kv_len, ps, 4)?,
        };
        results.extend(rows);
        wrong += row_wrong;
        b.progress.inc(1);
    }
    if !mask_rows.is_empty() {
        b.print("");
        prefill_mask::header(&b);
    }
    for &(dtype, ps) in &mask_rows {
        b.progress.set_message(format!("prefill with a tree mask, 8 × 64 over 4096, page_size {ps}"));
        let (row, row_wrong) = match dtype {
            Dtype::F16 => prefill_mask::prefill_mask::<f16>(&mut b, 8, 64, 4096, ps, 4)?,
            Dtype::Bf16 => prefill_mask::prefill_mask::<bf16>(&mut b, 8, 64, 4096, ps, 4)?,
        };
        results.push(row);
        wrong += row_wrong;
        b.progress.inc(1);
    }
    if !mla_rows.is_empty() {
        b.print("");
        mla::header(&b);
    }
    for &(dtype, ps, batch, kv_len, heads) in &mla_rows {
        b.progress.set_message(format!("MLA decode {batch} × {kv_len}, {heads} heads, page_size {ps}"));
        let (row, row_wrong) = match (dtype, args.kv_dtype) {
            (Dtype::F16, KvDtype::Same) => mla::mla_decode::<f16, f16>(&mut b, batch, kv_len, ps, heads)?,
            (Dtype::Bf16, KvDtype::Same) => mla::mla_decode::<bf16, bf16>(&mut b, batch, kv_len, ps, heads)?,
            (Dtype::F16, KvDtype::E4m3) => mla::mla_decode::<f16, E4m3>(&mut b, batch, kv_len, ps, heads)?,
            (Dtype::Bf16, KvDtype::E4m3) => mla::mla_decode::<bf16, E4m3>(&mut b, batch, kv_len, ps, heads)?,
            (Dtype::F16, KvDtype::E5m2) => mla::mla_decode::<f16, E5m2>(&mut b, batch, kv_len, ps, heads)?,
            (Dtype::Bf16, KvDtype::E5m2) => mla::mla_decode::<bf16, E5m2>(&mut b, batch, kv_len, ps, heads)?,
        };
        results.push(row);
        wrong += row_wrong;
        b.progress.inc(1);
    }
    if args.kernels.contains(&Kernel::TensorParallel) {
        b.print("");
        tensor_parallel::header(&b);
        b.progress.set_message("tensor-parallel decode 64 × 4096");
        let (row, row_wrong, one_gpu_us) = tensor_parallel::tensor_parallel_decode(&mut b, 1, 64, 4096, 4, 0.0)?;
        results.push(row);
        wrong += row_wrong;
        if ferrinfer::TensorParallel::nccl_present() {
            let gpus = ferrinfer::TensorParallel::gpu_count().clamp(1, 2);
            for n in if gpus > 1 { vec![1, gpus] } else { vec![1] } {
                let (row, row_wrong, _) = tensor_parallel::tensor_parallel_decode(&mut b, n, 64, 4096, 4, one_gpu_us)?;
                results.push(row);
                wrong += row_wrong;
            }
        } else {
            b.print("(no NCCL found: the all-gather rows are left out)");
        }
    }
    let cascade_sizes = if args.kernels.contains(&Kernel::Cascade) { &args.page_sizes[..] } else { &[] };
    if !cascade_sizes.is_empty() {
        b.print("");
        cascade::header(&b);
    }
    for &ps in cascade_sizes {
        b.progress.set_message(format!("cascade 64 × (8192 shared + 256), page_size {ps}"));
        let (row, row_wrong) = cascade::cascade(&mut b, 64, 8192, 256, ps)?;
        results.push(row);
        wrong += row_wrong;
        b.progress.inc(1);
    }
    if merges > 0 {
        b.print("");
        merge::header(&b);
        b.progress.set_message("merge_state 8192 tokens");
        let head_dim = b.shapes.head_dim;
        let (row, row_wrong) = merge::merge(&mut b, 8192, 32, head_dim)?;
        results.push(row);
        wrong += row_wrong;
        b.progress.inc(1);
    }
    if ropes > 0 {
        b.print("");
        rope::header(&b);
        for &variant in ROPE_VARIANTS {
            b.progress.set_message("RoPE 8192 tokens");
            let (row, row_wrong) = rope::rope(&mut b, 32, args.kv_heads, variant)?;
            results.push(row);
            wrong += row_wrong;
            b.progress.inc(1);
        }
        for &ps in &args.page_sizes {
            b.progress.set_message(format!("append+RoPE 8 × 1024, page_size {ps}"));
            let ((row, w0), k0, v0) = rope::append_rope(&mut b, 32, ps, false)?;
            results.push(row);
            b.progress.inc(1);
            let ((row, w1), k1, v1) = rope::append_rope(&mut b, 32, ps, true)?;
            results.push(row);
            b.progress.inc(1);
            wrong += w0 + w1;
            if k0 != k1 || v0 != v1 {
                return Err(
                    format!("page_size {ps}: the fused append+RoPE's pools differ from RoPE then append").into()
                );
            }
        }
    }
    if plans > 0 {
        b.print("");
        plan_time::header(&b);
        for &(kind, batch, len) in PLAN_ROWS {
            b.progress.set_message(format!("planning {kind} batch {batch}"));
            results.push(match kind {
                "decode" => plan_time::decode(&mut b, batch, len, 16, args.runs.max(20))?,
                _ => plan_time::prefill(&mut b, batch, len, 16, args.runs.max(20))?,
            });
            b.progress.inc(1);
        }
    }
    b.progress.finish_and_clear();
    if !gather_sizes.is_empty() || !append_sizes.is_empty() {
        println!("\nGather and append results matched the CPU reference bit for bit.");
    }
    if ropes > 0 {
        println!("RoPE: the first 64 tokens of every row within 1 f16 ulp + 6e-6 of the f64 reference; fused and unfused appends wrote identical pools.");
    }
    if decode_rows.len() + prefill_rows.len() + mask_rows.len() + mla_rows.len() + spec_rows.len() > 0 {
        let (atol, rtol) = ferrinfer_tests::compare::tolerance(ferrinfer::DType::F16);
        println!("Decode, prefill and MLA: sampled requests of every row checked against the f64 CPU reference (|error| ≤ {atol} + {rtol}·|expected|): {}.",
                 if wrong == 0 { "all matched".to_string() } else { format!("{wrong} elements WRONG") });
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({"gpu": dev.name(), "copy_gbs": copy_gbs, "read_stream_gbs": read_gbs, "runs": args.runs, "results": results});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    if let Some(path) = &args.plot {
        plot::write_svg(path, dev.name(), &results, copy_gbs, read_gbs)?;
        println!("chart written to {}", path.display());
    }
    if wrong > 0 {
        return Err(format!("{wrong} sampled output elements missed the reference").into());
    }
    Ok(results)
}

/// `--check`: the sweep's rows against the baseline of this GPU model (or written as it). A
/// row counts as slower only if it is slower in a second sweep too (the faster of its two
/// times is compared): some rows, such as a split decode's, move by several percent between
/// runs of the same binary.
fn check(dev: &Device, args: &Args, rows: Vec<serde_json::Value>) -> BoxResult<()> {
    let gpu = dev.name();
    if let Some(path) = &args.write_baseline {
        return check::write_baseline(path, gpu, &format!("{} runs per row", args.runs), &rows);
    }
    let path = check::baseline_path(args.baseline.as_deref(), gpu);
    let mut slower = check::compare(&path, gpu, &rows)?;
    if !slower.is_empty() {
        println!("\n{} row(s) slower; measuring the sweep again (a row must be slower twice):\n", slower.len());
        let again = run_gpu(dev, args)?;
        slower = check::compare(&path, gpu, &check::faster_of(&rows, &again))?;
    }
    if !slower.is_empty() {
        return Err(format!(
            "{} row(s) more than {:.0}% slower than the baseline in two sweeps:\n  {}",
            slower.len(),
            100.0 * check::TOLERANCE,
            slower.join("\n  ")
        )
        .into());
    }
    println!("Every row within {:.0}% of the baseline.", 100.0 * check::TOLERANCE);
    Ok(())
}

/// The plan-time rows: (kind, batch, prompt or sequence length).
const PLAN_ROWS: &[(&str, usize, usize)] =
    &[("decode", 1, 4096), ("decode", 64, 4096), ("decode", 256, 4096), ("prefill", 8, 1024), ("prefill", 8, 4096)];

/// No GPU: the same gather on the CPU reference, on a smaller workload.
fn run_cpu(args: &Args) -> BoxResult<()> {
    let (batch, kv_len) = (args.batch.min(8), args.kv_len.min(1024));
    let s = args.shapes();
    let kv_lens = vec![kv_len; batch];
    for &page_size in &args.page_sizes {
        let mut r = rng(page_size as u64);
        let pages = kv_lens.iter().map(|n| n.div_ceil(page_size)).sum::<usize>();
        let shape = CacheShape {
            num_pages: pages + 1,
            page_size,
            num_kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            layout: s.layout,
        };
        let table = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
        let pool: Vec<f16> = random_values(&mut r, shape.pool_elems());
        let t = Instant::now();
        let out = reference::gather(&shape, &pool, &table);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let checksum: f64 = out.iter().map(|x| x.to_f64()).sum();
        println!("cpu reference gather: page_size {page_size:>4}, {batch} × {kv_len} tokens: {ms:.1} ms, checksum {checksum:.4}");
        let v_pool: Vec<f16> = random_values(&mut r, shape.pool_elems());
        let heads = 4 * s.kv_heads;
        let q: Vec<f16> = random_values(&mut r, batch * heads * s.head_dim);
        let t = Instant::now();
        let (out, _) =
            reference::decode(&shape, &pool, &v_pool, &table, &q, heads, &ferrinfer::DecodeOptions::default());
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let checksum: f64 = out.iter().sum();
        println!("cpu reference decode: page_size {page_size:>4}, {batch} × {kv_len} tokens, {heads} query heads: {ms:.1} ms, checksum {checksum:.4}");
        // Causal prefill of the last 8 tokens of two of the sequences, as new tokens.
        let sub = PageTable {
            kv_indptr: table.kv_indptr[..3].to_vec(),
            kv_indices: table.kv_indices[..table.kv_indptr[2] as usize].to_vec(),
            kv_last_page_len: table.kv_last_page_len[..2].to_vec(),
        };
        let q: Vec<f16> = random_values(&mut r, 2 * 8 * heads * s.head_dim);
        let causal = ferrinfer::PrefillOptions { causal: true, ..Default::default() };
        let t = Instant::now();
        let (out, _) = reference::prefill(&shape, &pool, &v_pool, &sub, &[0, 8, 16], &q, heads, &causal);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let checksum: f64 = out.iter().sum();
        println!("cpu reference prefill (causal): page_size {page_size:>4}, 2 × 8 new of {kv_len} tokens, {heads} query heads: {ms:.1} ms, checksum {checksum:.4}");
    }
    Ok(())
}

/// `--plot-from`: redraws a saved run.
fn plot_saved(json: &std::path::Path, svg: &std::path::Path) -> BoxResult<()> {
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    let results = doc["results"].as_array().ok_or("no results array in the JSON")?;
    let number = |key: &str| doc[key].as_f64().ok_or(format!("no {key} in the JSON"));
    plot::write_svg(svg, doc["gpu"].as_str().unwrap_or("?"), results, number("copy_gbs")?, number("read_stream_gbs")?)?;
    println!("chart of {} written to {}", json.display(), svg.display());
    Ok(())
}

fn main() -> BoxResult<()> {
    let args = Args::parse().shorten();
    if let (Some(json), Some(svg)) = (&args.plot_from, &args.plot) {
        return plot_saved(json, svg);
    }
    match Device::new(0) {
        Ok(dev) => {
            let rows = run_gpu(&dev, &args)?;
            if args.check {
                check(&dev, &args, rows)?;
            }
            Ok(())
        }
        Err(e) => {
            println!("No GPU available ({e}).\nRunning the CPU reference path instead: a smaller workload, timed on the CPU (wall clock), not the GPU kernels.");
            run_cpu(&args)
        }
    }
}
