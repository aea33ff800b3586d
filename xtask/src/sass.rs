//! `cargo xtask sass`: the SASS of committed kernels, read without a GPU. ptxas reports
//! registers and spills; the SASS shows what the kernel does with them: where a spill sits,
//! whether stores leave in 4 or 16 bytes, how many instructions a loop issues between two
//! `HGMMA`s. It disassembles the committed cubins (`host/ptx/<file>.cubin.zst`) with NVIDIA's
//! `cuobjdump` and `nvdisasm`, installed under `target/tools/` from PyPI (pinned) like ptxas.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ptxas::{compressed_names, install_from_wheel};
use crate::source_hash::TARGETS;
use crate::workspace_root;

const WHEELS: [(&str, &str); 2] =
    [("nvidia-cuda-cuobjdump==13.5.37", "cuobjdump"), ("nvidia-cuda-nvdisasm==13.5.37", "nvdisasm")];

/// The folder holding `cuobjdump` and `nvdisasm`, installed there from PyPI if missing.
fn tools() -> crate::Result<PathBuf> {
    let dir = workspace_root().join("target/tools/sass");
    let bin = dir.join("nvidia/cu13/bin");
    if WHEELS.iter().all(|(_, tool)| bin.join(tool).exists()) {
        return Ok(bin);
    }
    for (wheel, tool) in WHEELS {
        install_from_wheel(wheel, &format!("nvidia/cu13/bin/{tool}"), &dir)
            .map_err(|e| format!("{e}\n`cargo xtask sass` needs python3 with pip and access to PyPI"))?;
    }
    Ok(bin)
}

/// Counts of the instructions worth a look in a kernel's SASS listing.
#[derive(Debug, Default, PartialEq)]
pub struct SassSummary {
    pub instructions: usize,
    /// Local-memory stores and loads: spills (or a stack array).
    pub local: usize,
    /// Global stores by width: generic `ST.E` and `STG.E`, 4 bytes or wider.
    pub stores_4_bytes: usize,
    pub stores_wide: usize,
    pub hgmma: usize,
    pub barriers: usize,
}

/// Summarises a `cuobjdump -sass` listing of one function.
pub fn summarise(listing: &str) -> SassSummary {
    let mut s = SassSummary::default();
    for line in listing.lines() {
        // "        /*0210*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;   /* 0x... */"
        let Some(code) = line.trim_start().strip_prefix("/*").and_then(|l| l.split_once("*/")).map(|(_, c)| c) else {
            continue;
        };
        let code = code.split(';').next().unwrap_or("").trim();
        // An optional predicate, then the opcode.
        let mut words = code.split_whitespace();
        let Some(mut op) = words.next() else { continue };
        if op.starts_with('@') {
            op = words.next().unwrap_or("");
        }
        if op.is_empty() {
            continue;
        }
        s.instructions += 1;
        let base = op.split('.').next().unwrap_or(op);
        match base {
            "STL" | "LDL" => s.local += 1,
            "ST" | "STG" if op.ends_with(".64") || op.ends_with(".128") => s.stores_wide += 1,
            "ST" | "STG" => s.stores_4_bytes += 1,
            "HGMMA" => s.hgmma += 1,
            "BAR" => s.barriers += 1,
            _ => {}
        }
    }
    s
}

/// The `.entry` names of a PTX module.
fn entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
        .map(|rest| rest.split('(').next().unwrap_or(rest).trim().to_string())
        .collect()
}

/// Disassembles every committed kernel of `arch` (all modules when `None`) whose name contains
/// `filter` into `target/sass/<arch>/<kernel>.sass` and prints a summary line for each.
pub fn sass(filter: &str, arch: Option<&str>) -> crate::Result {
    let root = workspace_root();
    let bin = tools()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(&path)))
        .map_err(|e| format!("PATH: {e}"))?;
    println!(
        "{:<8} {:<36} {:>6} {:>6} {:>8} {:>8} {:>6} {:>5}",
        "arch", "kernel", "instrs", "local", "st 4 B", "st wide", "hgmma", "bar"
    );
    let mut found = 0;
    for (target_arch, file) in TARGETS {
        if arch.is_some_and(|a| a != *target_arch) {
            continue;
        }
        let dir = root.join("host/ptx");
        let ptx = std::fs::read_to_string(dir.join(file)).map_err(|e| format!("host/ptx/{file}: {e}"))?;
        let kernels: Vec<String> = entries(&ptx).into_iter().filter(|k| k.contains(filter)).collect();
        if kernels.is_empty() {
            continue;
        }
        let (_, cubin_zst) = compressed_names(file);
        let packed = std::fs::read(dir.join(&cubin_zst)).map_err(|e| format!("host/ptx/{cubin_zst}: {e}"))?;
        let cubin = zstd::decode_all(&packed[..]).map_err(|e| format!("host/ptx/{cubin_zst}: {e}"))?;
        let out_dir = root.join("target/sass").join(target_arch);
        std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
        let cubin_path = out_dir.join(format!("{file}.cubin"));
        std::fs::write(&cubin_path, cubin).map_err(|e| format!("{}: {e}", cubin_path.display()))?;
        for kernel in kernels {
            let listing = disassemble(&bin, &path, &cubin_path, &kernel)?;
            let out = out_dir.join(format!("{kernel}.sass"));
            std::fs::write(&out, &listing).map_err(|e| format!("{}: {e}", out.display()))?;
            let s = summarise(&listing);
            println!(
                "{:<8} {:<36} {:>6} {:>6} {:>8} {:>8} {:>6} {:>5}",
                target_arch, kernel, s.instructions, s.local, s.stores_4_bytes, s.stores_wide, s.hgmma, s.barriers
            );
            found += 1;
        }
    }
    if found == 0 {
        return Err(format!("no committed kernel's name contains {filter:?}"));
    }
    eprintln!("listings in {}", root.join("target/sass").display());
    Ok(())
}

fn disassemble(bin: &Path, path: &std::ffi::OsStr, cubin: &Path, kernel: &str) -> crate::Result<String> {
    let out = Command::new(bin.join("cuobjdump"))
        .env("PATH", path)
        .args(["-sass", "-fun", kernel])
        .arg(cubin)
        .output()
        .map_err(|e| format!("running cuobjdump: {e}"))?;
    if !out.status.success() {
        return Err(format!("cuobjdump on {kernel}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_is_summarised_by_opcode() {
        let listing = "\t\tFunction : k\n\
            \x20       /*0000*/                   LDC R1, c[0x0][0x28] ;  /* 0x00000a00ff017b82 */\n\
            \x20                                                          /* 0x000fe40000000800 */\n\
            \x20       /*0010*/                   STL [R1], R2 ;  /* 0x0000000201007387 */\n\
            \x20       /*0020*/              @!P0 LDL R2, [R1] ;  /* 0x0000000001027983 */\n\
            \x20       /*0030*/                   ST.E desc[UR4][R2.64], R5 ;  /* 0x */\n\
            \x20       /*0040*/                   STG.E.128 desc[UR4][R2.64], R4 ;  /* 0x */\n\
            \x20       /*0050*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24 ;  /* 0x */\n\
            \x20       /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x1, 0x100 ;  /* 0x */\n\
            \x20       /*0070*/                   EXIT ;  /* 0x */\n";
        assert_eq!(
            summarise(listing),
            SassSummary { instructions: 8, local: 2, stores_4_bytes: 1, stores_wide: 1, hgmma: 1, barriers: 1 }
        );
    }
}
