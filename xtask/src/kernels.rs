//! `cargo xtask build-kernels`: kernels-gpu → one PTX module per target architecture.
//!
//! rustc's nvptx64 target "links" with `llvm-bitcode-linker`, which Debian's rustc and most
//! nightlies lack. With fat LTO the assembly rustc emits (`--emit=asm`) already is the complete
//! module, so this binary stands in as the linker (`-C linker=<xtask>`): rustc only calls it
//! after codegen succeeded, and it checks that every exported kernel is in that assembly
//! before copying it to the output path. Any compile error still fails the build.
//!
//! `--check` builds into target/kernels/ptx and compares with host/ptx/. PTX is compared only
//! between builds of one toolchain (each file's header records it): with the committed one any
//! difference fails; with another (Debian updated rustc-web, say) the differences are reported
//! and the check passes, since the compile, ptxas and the source hash (stale PTX) still gate it.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::source_hash::{kernel_source_hash, HASH_PREFIX, RUSTC_FLAGS, TARGETS};
use crate::{ptxas, run, toolchain, workspace_root};

pub const LINK_SHIM_ENV: &str = "FERRINFER_PTX_LINK_SHIM";
const TARGET: &str = "nvptx64-nvidia-cuda";

/// Linker mode: `args` are what rustc passes a linker for nvptx64: `--export-symbol NAME`
/// pairs, object files, and `-o <deps>/<crate>.ptx`.
pub fn link_shim(args: Vec<String>) -> crate::Result {
    let out =
        args.windows(2).find(|w| w[0] == "-o").map(|w| PathBuf::from(&w[1])).ok_or("link shim: rustc passed no -o")?;
    let asm = out.with_extension("s");
    let ptx = std::fs::read_to_string(&asm).map_err(|e| format!("link shim: {}: {e}", asm.display()))?;
    let exports = args.windows(2).filter(|w| w[0] == "--export-symbol").map(|w| w[1].as_str());
    for name in exports {
        if !ptx.contains(&format!(".entry {name}(")) {
            return Err(format!("link shim: exported kernel {name} is not in {}", asm.display()));
        }
    }
    if ptx.contains(".extern .func") {
        return Err(format!("link shim: {} calls functions outside the module", asm.display()));
    }
    std::fs::write(&out, ptx).map_err(|e| format!("link shim: {}: {e}", out.display()))
}

/// Compiles kernels-gpu for `arch`; returns the PTX text rustc produced.
fn compile(tc: &toolchain::KernelToolchain, root: &Path, arch: &str) -> crate::Result<String> {
    let crate_dir = root.join("kernels-gpu");
    let target_dir = root.join("target/kernels").join(arch);
    let shim = std::env::current_exe().map_err(|e| format!("locating xtask: {e}"))?;
    let mut cmd = Command::new(&tc.cargo);
    // Start from a clean slate: the outer `cargo run` exports variables meant for the host build.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO") || k.starts_with("RUSTC") || k.starts_with("RUSTUP") || k == "RUSTFLAGS" {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(&crate_dir)
        .env("RUSTC", &tc.rustc)
        // Stable or beta rustc (Debian's) accepts nightly features and -Z flags with this.
        .env("RUSTC_BOOTSTRAP", "1")
        .env(LINK_SHIM_ENV, "1")
        .args(["rustc", "--release", "--quiet", "-Zbuild-std=core", "--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        .arg("--")
        .args(RUSTC_FLAGS)
        .arg(format!("-Ctarget-cpu={arch}"))
        .arg(format!("-Clinker={}", shim.display()));
    run(&mut cmd)?;
    let ptx = target_dir.join(TARGET).join("release/deps/ferrinfer_kernels.ptx");
    std::fs::read_to_string(&ptx).map_err(|e| format!("{}: {e}", ptx.display()))
}

/// Entry points launched with a fixed block size that must be declared (`.maxntid`): the
/// warp-specialised Hopper kernels, whose `setmaxnreg` takes effect only under a register cap
/// at entry, which ptxas derives from the declared block size. rustc has no attribute for it.
fn launch_bounds() -> Vec<(&'static str, u32)> {
    let mut bounds = Vec::new();
    macro_rules! each {
        (prefill_hopper $half:ident $dtype:ident $kv:ident $kvname:ident $dim:literal) => {
            bounds.push((entry_name!(prefill_hopper $dtype $kvname $dim), crate::abi::HOPPER_PREFILL_THREADS))
        };
        (mla_hopper $half:ident $dtype:ident) => {
            bounds.push((entry_name!(mla_hopper $dtype), crate::abi::MLA_HOPPER_THREADS))
        };
        ($($other:tt)*) => {};
    }
    kernel_variants!(each);
    bounds
}

/// Declares the block size of the entries [`launch_bounds`] names, between each one's
/// parameter list and its body.
fn with_launch_bounds(ptx: &str) -> crate::Result<String> {
    let mut out = ptx.to_string();
    for (name, threads) in launch_bounds() {
        let Some(entry) = out.find(&format!(".entry {name}(")) else { continue };
        let body = out[entry..].find("\n{\n").ok_or_else(|| format!("no body after .entry {name}"))? + entry;
        out.insert_str(body + 1, &format!(".maxntid {threads}, 1, 1\n"));
    }
    Ok(out)
}

fn with_header(ptx: &str, arch: &str, hash: &str, tc: &toolchain::KernelToolchain) -> String {
    format!(
        "// ferrinfer GPU kernels for {arch}: generated by `cargo xtask build-kernels` from \
         kernels-gpu/; do not edit.\n{HASH_PREFIX}{hash}\n// toolchain: {}\n{ptx}",
        tc.version
    )
}

/// The value of the header line starting with `prefix` (`// toolchain:`, `// source-hash: `), if any.
fn header_value<'a>(ptx: &'a str, prefix: &str) -> Option<&'a str> {
    ptx.lines().take_while(|l| l.starts_with("//")).find_map(|l| l.strip_prefix(prefix)).map(str::trim)
}

const TOOLCHAIN_PREFIX: &str = "// toolchain:";

pub fn build(check: bool) -> crate::Result {
    let root = workspace_root();
    let tc = toolchain::find()?;
    eprintln!("kernel toolchain: {} ({}, {})", tc.version, tc.origin, tc.rustc.display());
    let hash = kernel_source_hash(&root)?;
    let ptx_dir = root.join("host/ptx");
    let scratch = root.join("target/kernels/ptx");
    let out_dir = if check { &scratch } else { &ptx_dir };
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut written = Vec::new();
    for (arch, file) in TARGETS {
        let ptx = with_header(&with_launch_bounds(&compile(&tc, &root, arch)?)?, arch, &hash, &tc);
        let path = out_dir.join(file);
        std::fs::write(&path, &ptx).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push((arch.to_string(), path));
    }
    // Assembled whatever the toolchain: a compile or ptxas failure fails the check.
    ptxas::assemble(&written)?;
    if !check {
        ptxas::install_compressed(&written)?;
        eprintln!("wrote {}", ptx_dir.display());
        return Ok(());
    }
    let mut other_toolchain = None;
    let mut differing = Vec::new();
    for (arch, file) in TARGETS {
        let fresh_path = scratch.join(file);
        let fresh = std::fs::read_to_string(&fresh_path).map_err(|e| format!("{}: {e}", fresh_path.display()))?;
        let committed = std::fs::read_to_string(ptx_dir.join(file))
            .map_err(|e| format!("host/ptx/{file}: {e}; run `cargo xtask build-kernels` and commit host/ptx/"))?;
        if header_value(&committed, HASH_PREFIX) != Some(hash.as_str()) {
            return Err(format!(
                "host/ptx/{file} is stale against its sources, kernels-gpu/ and the kernel ABI (its \
                 source hash differs; `cargo test` fails on this too, in \
                 committed_ptx_matches_kernel_sources): run `cargo xtask build-kernels` and commit host/ptx/"
            ));
        }
        let committed_tc = header_value(&committed, TOOLCHAIN_PREFIX).unwrap_or("(none recorded)");
        let fresh_tc = header_value(&fresh, TOOLCHAIN_PREFIX).unwrap_or("(none recorded)");
        let report = crate::ptx_diff::report(&committed, &fresh, TOOLCHAIN_PREFIX, 12);
        if committed_tc == fresh_tc {
            if let Some(report) = report {
                differing.push(format!(
                    "host/ptx/{file} ({arch}) differs from a fresh build by the same toolchain (see {}): \
                     run `cargo xtask build-kernels` and commit host/ptx/\n{report}",
                    fresh_path.display()
                ));
            }
            continue;
        }
        // Another compiler (Debian updated rustc-web, say) emits other PTX from the same
        // sources: not a fault of the commit. Report the difference instead of failing on it.
        match report {
            Some(report) => eprintln!("host/ptx/{file} ({arch}) against this build: {report}\n"),
            None => eprintln!("host/ptx/{file} ({arch}): identical to this build apart from the toolchain line"),
        }
        other_toolchain = Some((committed_tc.to_string(), fresh_tc.to_string()));
    }
    if !differing.is_empty() {
        return Err(differing.join("\n"));
    }
    match other_toolchain {
        None => eprintln!("committed PTX matches a fresh build"),
        Some((committed_tc, fresh_tc)) => eprintln!(
            "warning: the committed PTX was built with {committed_tc}; this build used {fresh_tc}.\n\
             Different compilers emit different PTX from the same sources, so the bodies must match only \
             between builds of one toolchain: the differences above are reported, not failed on. The fresh \
             build compiled and passed ptxas, and the committed PTX is not stale against its sources (its \
             source hash matches; `cargo test` checks this too, in committed_ptx_matches_kernel_sources). \
             To compare bodies, rebuild with the committed toolchain (FERRINFER_KERNEL_RUSTC), or move to \
             this one: `cargo xtask build-kernels` and commit host/ptx/."
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_come_from_the_leading_comments() {
        let text = "// k\n// source-hash: abc\n// toolchain: rustc 1.96.0 (x)\n.version 8.0\n// toolchain: no header\n";
        assert_eq!(header_value(text, TOOLCHAIN_PREFIX), Some("rustc 1.96.0 (x)"));
        assert_eq!(header_value(text, HASH_PREFIX), Some("abc"));
        assert_eq!(header_value(".version 8.0\n", HASH_PREFIX), None);
    }
}
