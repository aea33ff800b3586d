//! A GPU with ferrinfer's kernels loaded: the context, its default stream, the module chosen for
//! the device's compute capability (loaded once) and the kernel functions (looked up once).
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys::{CUdeviceptr, CUfunction_attribute, CUstream};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::abi::{
    decode_smem_bytes, decode_threads, prefill_max_row_frags, prefill_rows, prefill_smem_bytes, prefill_threads,
};
use crate::attention::kernel_head_dim;
use crate::decode::HEAD_DIMS;
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
    /// `[f16, bf16][head_dim 64, 128, 256][1, 2 row fragments]`; none where
    /// `prefill_max_row_frags` rules a variant out.
    pub prefill: [[[Option<CudaFunction>; 2]; 3]; 2],
    /// `[f16, bf16]`.
    pub merge_states: [CudaFunction; 2],
}

impl Kernels {
    /// The prefill kernel for a dtype index, head_dim and row fragments the plan checked.
    pub fn prefill(&self, dtype: usize, head_dim: usize, row_frags: u32) -> &CudaFunction {
        self.prefill[dtype][kernel_head_dim(head_dim)][row_frags as usize - 1]
            .as_ref()
            .expect("plans pick only row fragments a prefill kernel exists for")
    }
}

/// The entry points `prefill_{f16,bf16}_{64,128,256}_rows{64,128}` that exist.
fn prefill_kernels(function: &impl Fn(&str) -> Result<CudaFunction>) -> Result<[[[Option<CudaFunction>; 2]; 3]; 2]> {
    let mut kernels: [[[Option<CudaFunction>; 2]; 3]; 2] = Default::default();
    for (dtype, name) in ["f16", "bf16"].into_iter().enumerate() {
        for (d, head_dim) in HEAD_DIMS.into_iter().enumerate() {
            for frags in 1..=prefill_max_row_frags(head_dim as u32) {
                let entry = format!("prefill_{name}_{head_dim}_rows{}", prefill_rows(frags));
                kernels[dtype][d][frags as usize - 1] = Some(function(&entry)?);
            }
        }
    }
    Ok(kernels)
}

/// The entry points `{kind}_{f16,bf16}_{64,128,256}`.
fn by_dtype_and_head_dim(
    function: &impl Fn(&str) -> Result<CudaFunction>,
    kind: &str,
) -> Result<[[CudaFunction; 3]; 2]> {
    let row = |dtype: &str| -> Result<[CudaFunction; 3]> {
        Ok([
            function(&format!("{kind}_{dtype}_64"))?,
            function(&format!("{kind}_{dtype}_128"))?,
            function(&format!("{kind}_{dtype}_256"))?,
        ])
    };
    Ok([row("f16")?, row("bf16")?])
}

/// An open GPU: its CUDA context, a stream, and ferrinfer's kernels loaded for its architecture.
///
/// ```no_run
/// // Where there is no driver this is an `Err` that says so; nothing panics.
/// match ferrinfer::Device::new(0) {
///     Ok(dev) => println!("{} (compute capability {:?})", dev.name(), dev.compute_capability()),
///     Err(e) => println!("no GPU: {e}"),
/// }
/// ```
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
            decode: by_dtype_and_head_dim(&function, "decode")?,
            prefill: prefill_kernels(&function)?,
            merge_states: [function("merge_states_f16")?, function("merge_states_bf16")?],
        };
        // Attention kernels use more than the default 48 KiB of dynamic shared memory.
        let mut attention = Vec::new();
        for (dtype, head_dim) in (0..2).flat_map(|dtype| HEAD_DIMS.map(|dim| (dtype, dim))) {
            let dim = head_dim as u32;
            attention.push((&kernels.decode[dtype][kernel_head_dim(head_dim)], decode_smem_bytes(dim)));
            for frags in 1..=prefill_max_row_frags(dim) {
                attention.push((kernels.prefill(dtype, head_dim, frags), prefill_smem_bytes(dim, frags)));
            }
        }
        for (function, smem_bytes) in attention {
            function
                .set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes as i32)
                .map_err(Error::driver("allowing an attention kernel its shared memory"))?;
        }
        // Its own stream rather than the legacy default one, so work on it can be graph-captured.
        let stream = ctx.new_stream().map_err(Error::driver("creating a stream"))?;
        Ok(Device { ctx, stream, name, compute_capability: (major, minor), kernels })
    }

    /// The GPU's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GPU's compute capability, `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The CUDA context the kernels are loaded in.
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

    /// Decode blocks of `head_dim` resident per SM (registers and shared memory permitting).
    pub(crate) fn decode_blocks_per_sm(&self, head_dim: usize) -> Result<usize> {
        let dim = head_dim as u32;
        self.blocks_per_sm(
            &self.kernels.decode[0][kernel_head_dim(head_dim)],
            decode_threads(dim),
            decode_smem_bytes(dim),
        )
    }

    /// Prefill blocks of `head_dim` and `row_frags` that fit one SM at once (from the
    /// driver's occupancy).
    pub(crate) fn prefill_blocks_per_sm(&self, head_dim: usize, row_frags: u32) -> Result<usize> {
        let dim = head_dim as u32;
        self.blocks_per_sm(
            self.kernels.prefill(0, head_dim, row_frags),
            prefill_threads(dim),
            prefill_smem_bytes(dim, row_frags),
        )
    }

    fn blocks_per_sm(&self, function: &CudaFunction, threads: u32, smem_bytes: u32) -> Result<usize> {
        let n = function
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem_bytes as usize, None)
            .map_err(Error::driver("reading a kernel's occupancy"))?;
        Ok((n as usize).max(1))
    }

    /// Waits until all work queued on [`stream`](Self::stream) has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(Error::driver("synchronizing the stream"))
    }
}

/// Grid and block of a launch, with dynamic shared memory.
pub(crate) fn launch_config(grid: (u32, u32), block: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes }
}

/// A device buffer the caller owns, given by address and length in elements of `T`: the raw
/// form of every `run`, for stacks that do not hold their tensors in cudarc buffers.
#[derive(Clone, Copy, Debug)]
pub struct RawSlice<T> {
    ptr: CUdeviceptr,
    len: usize,
    _element: PhantomData<*const T>,
}

impl<T> RawSlice<T> {
    /// # Safety
    /// `ptr` is the address of `len` elements of `T` in device memory of the [`Device`]'s
    /// context (allocated there, or reachable from it), aligned for `T`, and stays allocated
    /// until every launch given this slice has completed.
    pub unsafe fn new(ptr: CUdeviceptr, len: usize) -> Self {
        RawSlice { ptr, len, _element: PhantomData }
    }

    /// The device address.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Elements of `T`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where a launch goes: a cudarc stream (the safe API), or a raw `CUstream` of the device's
/// context (the `unsafe` raw API).
#[derive(Clone, Copy)]
pub(crate) enum LaunchStream<'a> {
    Cudarc(&'a CudaStream),
    Raw(CUstream),
}

impl Device {
    /// Launches `function` with its one by-value parameter block `params`.
    ///
    /// # Safety
    /// Every address in `params` is valid for what the kernel does with it (the plans' checks),
    /// and a raw stream belongs to this device's context.
    pub(crate) unsafe fn launch<P: DeviceRepr>(
        &self,
        function: &CudaFunction,
        cfg: LaunchConfig,
        stream: LaunchStream,
        params: &P,
        what: &'static str,
    ) -> Result<()> {
        match stream {
            LaunchStream::Cudarc(s) => s.launch_builder(function).arg(params).launch(cfg).map(|_| ()),
            LaunchStream::Raw(s) => self.ctx.bind_to_thread().and_then(|()| {
                let mut args = [params as *const P as *mut c_void];
                result::launch_kernel(
                    function.cu_function(),
                    cfg.grid_dim,
                    cfg.block_dim,
                    cfg.shared_mem_bytes,
                    s,
                    &mut args,
                )
            }),
        }
        .map_err(Error::driver(what))
    }
}
