//! Developer chores for ferrinfer: `cargo xtask <command>`.
//!
//! `build-kernels` turns the `kernels-gpu` crate into committed PTX (one module per target
//! architecture), `gpu-bundle` packs the GPU tests and benchmark for a GPU runner, `demo` runs
//! the main job, `fuzz` runs the fuzz targets for a fixed time.

// The kernel ABI, for its table of PTX modules (`ptx_targets!`).
#[path = "../../host/src/runtime/abi.rs"]
#[macro_use]
#[allow(dead_code)]
mod abi;
mod bundle;
mod fuzz;
mod kernels;
mod ptx_diff;
mod ptxas;
mod sass;
mod source_hash;
mod toolchain;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ferrinfer developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile kernels-gpu to PTX for every target, assemble it with ptxas and write host/ptx/
    /// (the PTX, and what the host embeds: the PTX and its cubins zstd-compressed).
    BuildKernels {
        /// Rebuild into a scratch folder and compare with the committed PTX: any difference fails
        /// when built by the toolchain the PTX records; with another, it is reported only.
        #[arg(long)]
        check: bool,
    },
    /// Assemble the committed PTX with ptxas, print each kernel's resources and write its
    /// compressed copy and cubins beside it (host/ptx/*.zst, cubins.txt).
    Ptxas,
    /// Disassemble the committed cubins' kernels whose name contains FILTER (no GPU needed):
    /// listings in target/sass/, a summary line each (instructions, spills, store widths,
    /// HGMMAs, barriers). cuobjdump and nvdisasm come from PyPI.
    Sass {
        filter: String,
        /// Only this module's architecture (sm_80, sm_90, sm_90a).
        #[arg(long)]
        arch: Option<String>,
    },
    /// Build the GPU tests and benchmark (release) into a folder that runs on a GPU machine.
    GpuBundle {
        #[arg(long, default_value = "bundle")]
        out: PathBuf,
    },
    /// On a GPU runner with Rust: build the GPU bundle and run its tests, optionally under
    /// compute-sanitizer (`--sanitize memcheck|racecheck|initcheck|synccheck|all`).
    GpuTest {
        /// The compute-sanitizer tool, or `all` for each of the four in turn.
        #[arg(long)]
        sanitize: Option<String>,
        /// Only tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Build the fuzz targets (fuzz/) and run each for a fixed time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Only this target (page_table, plans, allocator).
        #[arg(long)]
        target: Option<String>,
    },
    /// The main job: run the kernels on a generated paged workload (the CPU reference where
    /// there is no GPU). Arguments go to the benchmark binary; without any, its short sweep
    /// (`--short`).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

pub type Result<T = ()> = std::result::Result<T, String>;

/// `cargo xtask gpu-test`: the bundle's `run.sh` with its `--sanitize` and `--filter`.
fn gpu_test(sanitize: Option<String>, filter: Option<String>) -> Result {
    let out = workspace_root().join("bundle");
    bundle::build(&out)?;
    let mut run_sh = Command::new("bash");
    run_sh.arg(out.join("run.sh"));
    if let Some(tool) = sanitize {
        run_sh.args(["--sanitize", &tool]);
    }
    if let Some(name) = filter {
        run_sh.args(["--filter", &name]);
    }
    run(&mut run_sh)
}

/// `cargo xtask demo`: the benchmark binary, built in release mode first. The build is not
/// `--quiet` (unlike the `xtask` alias): the first one takes minutes, and cargo's progress shows it.
fn demo(args: Vec<String>) -> Result {
    eprintln!("building the benchmark (release; a few minutes the first time)…");
    run(Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["run", "--release", "-p", "ferrinfer-tests", "--bin", "ferrinfer-bench", "--"])
        .args(if args.is_empty() { vec!["--short".to_string()] } else { args }))
}

/// Runs `cmd`, failing with its description when it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Result {
    let status = cmd.status().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn main() -> ExitCode {
    // rustc runs us as the nvptx "linker": see kernels::link_shim.
    if std::env::var_os(kernels::LINK_SHIM_ENV).is_some() {
        return report(kernels::link_shim(std::env::args().skip(1).collect()));
    }
    let cli = Cli::parse();
    report(match cli.command {
        Cmd::BuildKernels { check } => kernels::build(check),
        Cmd::Ptxas => ptxas::assemble_committed().map(|_| ()),
        Cmd::Sass { filter, arch } => sass::sass(&filter, arch.as_deref()),
        Cmd::GpuBundle { out } => bundle::build(&out),
        Cmd::GpuTest { sanitize, filter } => gpu_test(sanitize, filter),
        Cmd::Fuzz { seconds, target } => fuzz::fuzz(seconds, target),
        Cmd::Demo { args } => demo(args),
    })
}

fn report(r: Result) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
