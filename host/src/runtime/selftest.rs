//! Runs the device helpers (conversions, fast math, warp collectives, fast division) on the GPU
//! so they can be checked against the host: a quick test that the toolchain and the driver agree
//! on what the PTX means.
use cudarc::driver::{DevicePtr, DevicePtrMut};

pub use super::abi::HELPER_OUTPUTS;
use super::abi::{FastDiv, HelperCheckParams};
use super::device::{launch_config, Device, LaunchStream};
use crate::error::{Error, Result};

/// For each `input[i]`, the `HELPER_OUTPUTS` values listed at [`HELPER_OUTPUTS`]. `input`'s
/// length must be a non-zero multiple of 32 (whole warps), `i · 7919 < 2^31` and `divisor ≥ 1`.
pub fn helper_outputs(device: &Device, input: &[f32], divisor: u32) -> Result<Vec<f32>> {
    if input.is_empty() || !input.len().is_multiple_of(32) {
        return Err(Error::BufferLength {
            what: "helper check input (whole warps)",
            got: input.len(),
            expected: input.len().next_multiple_of(32).max(32),
        });
    }
    if input.len() * 7919 > FastDiv::MAX_DIVIDEND as usize {
        return Err(Error::TooLarge {
            what: "helper check inputs",
            value: input.len(),
            max: FastDiv::MAX_DIVIDEND as usize / 7919,
        });
    }
    if divisor == 0 {
        return Err(Error::ZeroDimension { what: "divisor" });
    }
    let stream = device.stream();
    let input_dev = device.upload(input)?;
    let mut output = device.alloc_zeros::<f32>(input.len() * HELPER_OUTPUTS)?;
    {
        let (input_ptr, _g0) = input_dev.device_ptr(stream);
        let (output_ptr, _g1) = output.device_ptr_mut(stream);
        let params = HelperCheckParams { input: input_ptr, output: output_ptr, divisor: FastDiv::new(divisor) };
        let cfg = launch_config(((input.len() / 32) as u32, 1), 32, 32 * 4);
        let kernel = &device.kernels().single("helper_check").function;
        // SAFETY: one thread per input element, each writing its own HELPER_OUTPUTS outputs.
        unsafe { device.launch(kernel, cfg, LaunchStream::Cudarc(stream), &params, "launching the helper check")? };
    }
    device.download(&output)
}
