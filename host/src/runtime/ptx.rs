//! The kernels, prebuilt by `cargo xtask build-kernels` and embedded so that building this
//! crate needs no kernel toolchain: one module per line of the ABI's `ptx_targets!` table, each
//! as PTX and as the SASS `ptxas` assembled from that PTX (listed with the PTX's hash in
//! `host/ptx/cubins.txt`). The driver's own compile of the modules' PTX took 26–70 s a process
//! on an H200 and its cache did not always keep it, so a GPU that runs the SASS gets the SASS;
//! other GPUs (and drivers older than the `ptxas` that made it) get the PTX.
//!
//! Both are embedded zstd-compressed (`<file>.zst`, `<file>.cubin.zst`: 3.3 MB for the 52 MB of
//! the three modules, where the packaged crate's gzip left 9.6 MB of crates.io's 10 MiB and every
//! executable carried all 52 MB) and unpacked when a device loads them (a few tens of
//! milliseconds for a module).
use std::io::Read;

/// How a module relates to the compute capability it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loaded {
    /// On that capability and every later one without a `From` module of its own.
    From,
    /// On exactly that capability, beside its `From` module (architecture-specific code).
    Exactly,
}

/// A PTX module and the GPUs it is for.
pub(crate) struct PtxModule {
    /// The architecture it was compiled for, e.g. `"sm_90"`.
    pub arch: &'static str,
    /// Its file under `host/ptx/` (embedded as `<file>.zst`, its cubin as `<file>.cubin.zst`).
    pub file: &'static str,
    /// The compute capability it is for.
    pub compute_capability: (i32, i32),
    pub loaded: Loaded,
    /// The PTX, zstd-compressed.
    ptx_zst: &'static [u8],
    /// The PTX assembled for `arch` exactly, zstd-compressed.
    cubin_zst: &'static [u8],
}

/// Unpacks an embedded zstd frame. The frames are fixed when the crate is built and each is
/// unpacked by this crate's tests (`every_module_unpacks_to_its_ptx_and_cubin`), so this cannot
/// fail on a build whose tests passed.
fn unpack(packed: &'static [u8], file: &str, what: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    ruzstd::decoding::StreamingDecoder::new(packed)
        .map_err(|e| e.to_string())
        .and_then(|mut d| d.read_to_end(&mut bytes).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("the embedded {what} of {file} does not unpack: {e}"));
    bytes
}

impl PtxModule {
    /// The module's PTX text.
    pub(crate) fn ptx(&self) -> String {
        String::from_utf8(unpack(self.ptx_zst, self.file, "PTX")).expect("the embedded PTX is ASCII")
    }

    /// The module's cubin (an ELF image, as `cuModuleLoadData` takes it).
    pub(crate) fn cubin(&self) -> Vec<u8> {
        unpack(self.cubin_zst, self.file, "cubin")
    }

    /// Whether the cubin runs on compute capability `major.minor`: SASS runs on its own major
    /// version from its minor up (sm_80's on 8.6 and 8.9), architecture-specific SASS
    /// (`Exactly`: sm_90a) only on its own capability, neither on a later major version.
    pub(crate) fn cubin_runs_on(&self, major: i32, minor: i32) -> bool {
        let (m, n) = self.compute_capability;
        match self.loaded {
            Loaded::From => major == m && minor >= n,
            Loaded::Exactly => (major, minor) == (m, n),
        }
    }
}

macro_rules! modules {
    (@loaded from) => { Loaded::From };
    (@loaded exactly) => { Loaded::Exactly };
    ($($arch:ident $file:literal ($major:literal, $minor:literal) $kind:ident;)*) => {
        /// Every module, in the table's order.
        pub(crate) const MODULES: &[PtxModule] = &[$(PtxModule {
            arch: stringify!($arch),
            file: $file,
            compute_capability: ($major, $minor),
            loaded: modules!(@loaded $kind),
            ptx_zst: include_bytes!(concat!("../../ptx/", $file, ".zst")),
            cubin_zst: include_bytes!(concat!("../../ptx/", $file, ".cubin.zst")),
        }),*];
    };
}
ptx_targets!(modules);

/// The module to load on a device of compute capability `major.minor`: the `From` module with
/// the highest capability the device reaches; `None` below every module's.
pub(crate) fn for_compute_capability(major: i32, minor: i32) -> Option<&'static PtxModule> {
    MODULES
        .iter()
        .filter(|m| m.loaded == Loaded::From && m.compute_capability <= (major, minor))
        .max_by_key(|m| m.compute_capability)
}

/// The architecture-specific module for exactly `major.minor`, if there is one.
pub(crate) fn specific_to(major: i32, minor: i32) -> Option<&'static PtxModule> {
    MODULES.iter().find(|m| m.loaded == Loaded::Exactly && m.compute_capability == (major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gpu_generation_gets_its_module() {
        assert_eq!(for_compute_capability(7, 5).map(|m| m.arch), None);
        assert_eq!(for_compute_capability(8, 0).map(|m| m.arch), Some("sm_80"));
        assert_eq!(for_compute_capability(8, 9).map(|m| m.arch), Some("sm_80"));
        assert_eq!(for_compute_capability(9, 0).map(|m| m.arch), Some("sm_90"));
        assert_eq!(for_compute_capability(10, 0).map(|m| m.arch), Some("sm_90"));
    }

    #[test]
    fn a_cubin_runs_only_where_its_sass_does() {
        let module = |arch| MODULES.iter().find(|m| m.arch == arch).unwrap();
        let runs = |arch, cc: (i32, i32)| module(arch).cubin_runs_on(cc.0, cc.1);
        assert!(runs("sm_80", (8, 0)) && runs("sm_80", (8, 6)) && runs("sm_80", (8, 9)));
        assert!(!runs("sm_80", (9, 0)) && !runs("sm_80", (7, 5)));
        assert!(runs("sm_90", (9, 0)) && !runs("sm_90", (10, 0)) && !runs("sm_90", (12, 0)));
        assert!(runs("sm_90a", (9, 0)) && !runs("sm_90a", (9, 1)) && !runs("sm_90a", (10, 0)));
    }

    #[test]
    fn every_module_unpacks_to_its_ptx_and_cubin() {
        for m in MODULES {
            let ptx = m.ptx();
            assert!(ptx.starts_with("// ferrinfer GPU kernels for "), "{}", m.file);
            assert!(ptx.contains(&format!(".target {}", m.arch)), "{} is not for {}", m.file, m.arch);
            // An ELF image, as `cuModuleLoadData` takes it.
            assert_eq!(&m.cubin()[..4], b"\x7fELF", "{}.cubin", m.file);
        }
    }

    #[test]
    fn only_compute_capability_9_0_gets_the_sm_90a_module() {
        assert_eq!(specific_to(9, 0).map(|m| m.arch), Some("sm_90a"));
        for (major, minor) in [(8, 0), (8, 9), (9, 1), (10, 0), (12, 0)] {
            assert!(specific_to(major, minor).is_none(), "{major}.{minor}");
        }
    }
}
