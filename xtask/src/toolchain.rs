//! Finding a kernel toolchain: a rustc with the `nvptx64-nvidia-cuda` backend and core's source
//! (for `-Zbuild-std=core`), with its cargo. Looked for in this order:
//! 1. `FERRINFER_KERNEL_RUSTC` (cargo from `FERRINFER_KERNEL_CARGO`, else beside that rustc);
//! 2. a rustup nightly that has the `rust-src` component;
//! 3. Debian's `rustc-web`, `cargo-web` and `rust-web-src` (`/usr/bin/rustc`, `/usr/bin/cargo`).
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct KernelToolchain {
    pub rustc: PathBuf,
    pub cargo: PathBuf,
    /// `rustc --version`, recorded in the PTX header.
    pub version: String,
    pub origin: &'static str,
}

const INSTALL_HINT: &str = "no kernel toolchain found. Install one of:\n  \
    - Debian 12: apt-get install rustc-web cargo-web rust-web-src\n  \
    - rustup:    rustup toolchain install nightly --component rust-src\n  \
    - or point FERRINFER_KERNEL_RUSTC (and FERRINFER_KERNEL_CARGO) at a rustc with the nvptx64 \
    backend and library source";

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn probe(rustc: &Path, cargo: &Path, origin: &'static str) -> Option<KernelToolchain> {
    let version = output(Command::new(rustc).arg("--version").env_remove("RUSTUP_TOOLCHAIN"))?;
    let sysroot = output(Command::new(rustc).args(["--print", "sysroot"]))?;
    let has_core_src = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core/src/lib.rs").exists();
    let has_nvptx = output(Command::new(rustc).args(["--print", "target-list"]))
        .is_some_and(|l| l.lines().any(|t| t == "nvptx64-nvidia-cuda"));
    (has_core_src && has_nvptx && cargo.exists()).then(|| KernelToolchain {
        rustc: rustc.into(),
        cargo: cargo.into(),
        version,
        origin,
    })
}

fn rustup_nightly() -> Option<KernelToolchain> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    list.lines().filter_map(|l| l.split_whitespace().next()).filter(|tc| tc.starts_with("nightly")).find_map(|tc| {
        let which = |tool| output(Command::new("rustup").args(["which", "--toolchain", tc, tool])).map(PathBuf::from);
        probe(&which("rustc")?, &which("cargo")?, "rustup nightly with rust-src")
    })
}

pub fn find() -> crate::Result<KernelToolchain> {
    if let Some(rustc) = std::env::var_os("FERRINFER_KERNEL_RUSTC").map(PathBuf::from) {
        let cargo = std::env::var_os("FERRINFER_KERNEL_CARGO")
            .map(PathBuf::from)
            .unwrap_or_else(|| rustc.with_file_name("cargo"));
        return probe(&rustc, &cargo, "FERRINFER_KERNEL_RUSTC").ok_or_else(|| {
            format!(
                "FERRINFER_KERNEL_RUSTC={} is not usable: it needs the nvptx64-nvidia-cuda target, \
                 library source (rust-src) in its sysroot, and cargo at {}",
                rustc.display(),
                cargo.display()
            )
        });
    }
    rustup_nightly()
        .or_else(|| probe(Path::new("/usr/bin/rustc"), Path::new("/usr/bin/cargo"), "Debian rustc-web"))
        .ok_or_else(|| INSTALL_HINT.to_string())
}
