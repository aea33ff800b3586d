//! A GPU with ferrinfer's kernels loaded: the context, its default stream, the module chosen for
//! the device's compute capability (loaded once) and the kernel functions (looked up once).
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};
use crate::ptx;

/// Every kernel entry point in the PTX module.
pub(crate) struct Kernels {
    pub paged_kv_gather: CudaFunction,
    pub paged_kv_scatter: CudaFunction,
    pub helper_check: CudaFunction,
    pub read_stream: CudaFunction,
    /// `[f16, bf16][head_dim 64, 128, 256]`.
    pub decode: [[CudaFunction; 3]; 2],
    /// `[f16, bf16]`.
    pub merge_states: [CudaFunction; 2],
}

pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
    pub(crate) kernels: Kernels,
}

impl Device {
    /// Whether a CUDA driver can be loaded on this machine (no context is created).
    pub fn driver_present() -> bool {
        // SAFETY: only tries to dlopen libcuda; loads no symbols.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }

    /// Opens GPU `ordinal` and loads the kernels for its architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !Self::driver_present() {
            return Err(Error::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::driver("creating the CUDA context"))?;
        let name = ctx.name().map_err(Error::driver("reading the device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(Error::driver("reading the compute capability"))?;
        let ptx = ptx::for_compute_capability(major, minor).ok_or_else(|| Error::UnsupportedDevice {
            name: name.clone(),
            major,
            minor,
        })?;
        let module = ctx.load_module(Ptx::from_src(ptx)).map_err(Error::driver("loading the PTX module"))?;
        let function = |n: &str| module.load_function(n).map_err(Error::driver("looking up a kernel"));
        let kernels = Kernels {
            paged_kv_gather: function("paged_kv_gather")?,
            paged_kv_scatter: function("paged_kv_scatter")?,
            helper_check: function("helper_check")?,
            read_stream: function("read_stream")?,
            decode: [
                [function("decode_f16_64")?, function("decode_f16_128")?, function("decode_f16_256")?],
                [function("decode_bf16_64")?, function("decode_bf16_128")?, function("decode_bf16_256")?],
            ],
            merge_states: [function("merge_states_f16")?, function("merge_states_bf16")?],
        };
        // Its own stream rather than the legacy default one, so work on it can be graph-captured.
        let stream = ctx.new_stream().map_err(Error::driver("creating a stream"))?;
        Ok(Device { ctx, stream, name, compute_capability: (major, minor), kernels })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream ferrinfer's convenience calls use.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new stream on this device, for concurrent work.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.stream.fork().map_err(Error::driver("creating a stream"))
    }

    /// A zero-filled device buffer.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).map_err(Error::driver("allocating device memory"))
    }

    /// Copies `data` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(data).map_err(Error::driver("copying to the device"))
    }

    /// Copies `data` into an existing device buffer of the same length.
    pub fn upload_into<T: DeviceRepr>(&self, data: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if data.len() != dst.len() {
            return Err(Error::BufferLength { what: "upload destination", got: dst.len(), expected: data.len() });
        }
        self.stream.memcpy_htod(data, dst).map_err(Error::driver("copying to the device"))
    }

    /// Copies a device buffer to the host (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, src: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(src).map_err(Error::driver("copying to the host"))
    }

    /// Streaming multiprocessors on the GPU.
    pub fn multiprocessor_count(&self) -> Result<usize> {
        let n = self
            .ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(Error::driver("reading the multiprocessor count"))?;
        Ok(n.max(1) as usize)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(Error::driver("synchronizing the stream"))
    }
}

/// Grid and block of a launch, with dynamic shared memory.
pub(crate) fn launch_config(grid: (u32, u32), block: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes }
}
