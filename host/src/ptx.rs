//! The kernels, prebuilt by `cargo xtask build-kernels` and embedded so that building this
//! crate needs no kernel toolchain.

/// PTX for compute capability 8.x (Ampere, Ada).
pub(crate) const SM80: &str = include_str!("../ptx/ferrinfer_sm80.ptx");
/// PTX for compute capability 9.0 and newer (Hopper and later; the driver JIT-compiles it).
pub(crate) const SM90: &str = include_str!("../ptx/ferrinfer_sm90.ptx");

/// The module to load on a device of compute capability `major.minor`, if any.
pub(crate) fn for_compute_capability(major: i32, _minor: i32) -> Option<&'static str> {
    match major {
        9.. => Some(SM90),
        8 => Some(SM80),
        _ => None,
    }
}
