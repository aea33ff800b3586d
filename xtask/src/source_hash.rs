//! The fingerprint recorded in every committed PTX file: a hash of the kernel sources (the
//! `kernels-gpu` crate and the ABI file it shares with the host) and the build settings.
//! `cargo test` recomputes it to catch PTX that is stale against its sources.
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The kernel ABI's file, shared by the host and the kernel crate (and read here for the
/// module table).
pub const ABI: &str = "host/src/runtime/abi.rs";

macro_rules! targets {
    ($($arch:ident $file:literal ($major:literal, $minor:literal) $kind:ident;)*) => {
        /// Architectures a PTX module is built for, and the file each lands in under
        /// `host/ptx/`: the ABI's `ptx_targets!` table.
        pub const TARGETS: &[(&str, &str)] = &[$((stringify!($arch), $file)),*];
    };
}
ptx_targets!(targets);

/// Flags for the final crate, after `--`; part of the fingerprint. `-JumpThreading`: see
/// kernels-gpu/src/gpu/sync.rs.
pub const RUSTC_FLAGS: &[&str] = &["--emit=asm", "-Zmir-enable-passes=-JumpThreading"];

pub const HASH_PREFIX: &str = "// source-hash: ";

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                collect(&path, out)?;
            }
        } else if path.file_name().is_some_and(|n| n != "Cargo.lock") {
            out.push(path);
        }
    }
    Ok(())
}

/// Hex SHA-256 over every kernel source file (path and bytes, in path order) and the settings.
pub fn kernel_source_hash(root: &Path) -> crate::Result<String> {
    let mut files = vec![root.join(ABI)];
    collect(&root.join("kernels-gpu"), &mut files).map_err(|e| format!("reading kernels-gpu: {e}"))?;
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap_or(f);
        // Normalise separators so the hash is the same on every OS.
        h.update(rel.to_string_lossy().replace('\\', "/").as_bytes());
        h.update([0]);
        h.update(std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?);
        h.update([0]);
    }
    h.update(format!("{TARGETS:?}{RUSTC_FLAGS:?}").as_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash a committed PTX file records, if it has one.
    fn recorded_hash(ptx: &str) -> Option<&str> {
        ptx.lines().find_map(|l| l.strip_prefix(HASH_PREFIX)).map(str::trim)
    }

    #[test]
    fn committed_ptx_matches_kernel_sources() {
        let root = crate::workspace_root();
        let want = kernel_source_hash(&root).expect("hashing kernel sources");
        for (arch, file) in TARGETS {
            let path = root.join("host/ptx").join(file);
            let ptx = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{} ({arch}) missing: {e}; run `cargo xtask build-kernels`", path.display())
            });
            assert_eq!(
                recorded_hash(&ptx),
                Some(want.as_str()),
                "{} is stale against kernels-gpu/ and host/src/runtime/abi.rs: run `cargo xtask build-kernels` and commit host/ptx/",
                path.display()
            );
        }
    }

    #[test]
    fn recorded_hash_reads_the_header_line() {
        assert_eq!(recorded_hash("// x\n// source-hash: abc \n.version 7.0\n"), Some("abc"));
        assert_eq!(recorded_hash(".version 7.0\n"), None);
    }
}
