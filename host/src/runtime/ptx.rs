//! The kernels, prebuilt by `cargo xtask build-kernels` and embedded so that building this
//! crate needs no kernel toolchain: one module per line of the ABI's `ptx_targets!` table.

/// A PTX module and the GPUs it is for.
pub(crate) struct PtxModule {
    /// The architecture it was compiled for, e.g. `"sm_90"`.
    pub arch: &'static str,
    /// Its file under `host/ptx/`.
    #[allow(dead_code)]
    pub file: &'static str,
    /// The lowest compute capability it is loaded on.
    pub min_compute_capability: (i32, i32),
    pub ptx: &'static str,
}

macro_rules! modules {
    ($($arch:ident $file:literal ($major:literal, $minor:literal);)*) => {
        /// Every module, in the table's order.
        pub(crate) const MODULES: &[PtxModule] = &[$(PtxModule {
            arch: stringify!($arch),
            file: $file,
            min_compute_capability: ($major, $minor),
            ptx: include_str!(concat!("../../ptx/", $file)),
        }),*];
    };
}
ptx_targets!(modules);

/// The module to load on a device of compute capability `major.minor`: the one with the highest
/// lowest capability the device reaches; `None` below every module's.
pub(crate) fn for_compute_capability(major: i32, minor: i32) -> Option<&'static PtxModule> {
    MODULES.iter().filter(|m| m.min_compute_capability <= (major, minor)).max_by_key(|m| m.min_compute_capability)
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
}
