//! `cargo xtask gpu-bundle`: the GPU tests, the benchmark, the soak and the examples, built in release
//! mode, with a run script, in one folder that runs on a GPU machine with an NVIDIA driver and no
//! Rust toolchain. Every executable embeds the kernels (host/ptx/: the PTX and its cubins, zstd-compressed): the
//! folder needs no separate copy of them.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::workspace_root;

const RUN_SCRIPT: &str = include_str!("bundle_run.sh");
/// About 23 MiB now: six executables of 4-6 MiB, each embedding the three modules' PTX and cubins
/// compressed (3.3 MB; 52 MB and a 258 MiB bundle when they were embedded as they are); the limit
/// leaves room for growth before it asks for a look.
const MAX_BUNDLE_BYTES: u64 = 64 << 20;
/// The host crate's examples, each run on the GPU machine as `bundle/NAME`.
const EXAMPLES: [&str; 2] = ["serving_loop", "tensor_parallel"];

/// Builds with `cargo <args> --message-format=json` and returns the executable of target `name`
/// of kind `kind` (`test` or `bin`): building an integration test also builds the package's
/// binaries, so the messages name several executables.
fn build_executable(args: &[&str], name: &str, kind: &str) -> crate::Result<PathBuf> {
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(args)
        .args(["--release", "--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo {args:?} failed"));
    }
    let is_wanted = |m: &serde_json::Value| {
        let target = &m["target"];
        target["name"] == name && target["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == kind))
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(is_wanted)
        .find_map(|m| m.get("executable")?.as_str().map(PathBuf::from))
        .ok_or_else(|| format!("cargo {args:?} produced no {kind} executable named {name}"))
}

fn copy(from: &Path, to: &Path) -> crate::Result {
    std::fs::copy(from, to).map(|_| ()).map_err(|e| format!("copy {} → {}: {e}", from.display(), to.display()))
}

/// Strips the symbol table from a copied executable with binutils' `strip`, where there is one
/// (about 0.6 MiB each). Done on the copy, not through a cargo profile, so that the bundle's
/// builds share target/release with every other release build. Panic messages keep their file
/// and line; backtraces lose function names (`cargo test --release` on a runner with Rust has them).
/// Returns whether it stripped.
fn strip(exe: &Path) -> crate::Result<bool> {
    match Command::new("strip").arg(exe).status() {
        Ok(status) if status.success() => Ok(true),
        Ok(status) => Err(format!("strip {}: {status}", exe.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("strip {}: {e}", exe.display())),
    }
}

pub fn build(out: &Path) -> crate::Result {
    let root = workspace_root();
    let out = if out.is_absolute() { out.to_path_buf() } else { root.join(out) };
    let tests = build_executable(&["test", "-p", "ferrinfer-tests", "--test", "gpu", "--no-run"], "gpu", "test")?;
    let bench =
        build_executable(&["build", "-p", "ferrinfer-tests", "--bin", "ferrinfer-bench"], "ferrinfer-bench", "bin")?;
    let soak =
        build_executable(&["build", "-p", "ferrinfer-tests", "--bin", "ferrinfer-soak"], "ferrinfer-soak", "bin")?;
    let examples: Vec<(&str, PathBuf)> = EXAMPLES
        .iter()
        .map(|&name| Ok((name, build_executable(&["build", "-p", "ferrinfer", "--example", name], name, "example")?)))
        .collect::<crate::Result<_>>()?;
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut copies = vec![(tests, "gpu-tests"), (bench, "ferrinfer-bench"), (soak, "ferrinfer-soak")];
    copies.extend(examples.iter().map(|(name, exe)| (exe.clone(), *name)));
    let mut stripped = true;
    for (exe, name) in &copies {
        copy(exe, &out.join(name))?;
        stripped &= strip(&out.join(name))?;
    }
    if !stripped {
        eprintln!("note: no `strip` program found (binutils); the executables keep their symbols");
    }
    // The benchmark's per-GPU baselines, for `run.sh --bench --check`.
    let baselines = root.join("bench/baseline");
    if baselines.is_dir() {
        std::fs::create_dir_all(out.join("baseline")).map_err(|e| format!("{}: {e}", out.display()))?;
        for entry in std::fs::read_dir(&baselines).map_err(|e| format!("{}: {e}", baselines.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|e| e == "json") {
                copy(&path, &out.join("baseline").join(path.file_name().expect("a file name")))?;
            }
        }
    }
    let script = out.join("run.sh");
    std::fs::write(&script, RUN_SCRIPT).map_err(|e| format!("{}: {e}", script.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    }
    let size: u64 = std::fs::read_dir(&out)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    if size > MAX_BUNDLE_BYTES {
        return Err(format!("bundle is {size} bytes, over the {MAX_BUNDLE_BYTES}-byte limit"));
    }
    eprintln!(
        "bundle: {} ({:.1} MiB); on a GPU machine run {}/run.sh",
        out.display(),
        size as f64 / 1048576.0,
        out.display()
    );
    Ok(())
}
