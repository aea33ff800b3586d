//! `cargo xtask fuzz`: builds the libFuzzer targets in `fuzz/` with coverage instrumentation
//! (stable rustc: sancov passes and LLVM options, no sanitizer runtime needed) and runs each for
//! a fixed time, keeping its corpus in `target/fuzz-corpus/<target>` between runs and any
//! crashing input in `target/fuzz-artifacts/`.
use std::process::Command;

use crate::{run, workspace_root};

/// The targets, one per host entry point that takes caller data.
pub const TARGETS: [&str; 3] = ["page_table", "plans", "allocator"];

const COVERAGE_FLAGS: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing";

/// The host's target triple: naming it keeps RUSTFLAGS off build scripts (which must not be
/// instrumented: they link without libFuzzer).
fn host_triple() -> crate::Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc).arg("-vV").output().map_err(|e| format!("{rustc} -vV: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .ok_or_else(|| format!("{rustc} -vV names no host"))
}

pub fn fuzz(seconds: u32, only: Option<String>) -> crate::Result {
    let root = workspace_root();
    let target_dir = root.join("target/fuzz");
    let triple = host_triple()?;
    run(Command::new(env!("CARGO"))
        .current_dir(root.join("fuzz"))
        .env("RUSTFLAGS", COVERAGE_FLAGS)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args(["build", "--release", "--bins", "--target", &triple]))?;
    for target in TARGETS.iter().filter(|t| only.as_deref().is_none_or(|o| o == **t)) {
        let (corpus, artifacts) = (root.join("target/fuzz-corpus").join(target), root.join("target/fuzz-artifacts"));
        for dir in [&corpus, &artifacts] {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        eprintln!("fuzzing {target} for {seconds} s (corpus {})", corpus.display());
        run(Command::new(target_dir.join(&triple).join("release").join(target))
            .arg(&corpus)
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/{target}-", artifacts.display()))
            .arg("-rss_limit_mb=4096")
            .arg("-print_final_stats=1"))?;
    }
    Ok(())
}
