//! A GPU with ferrinfer's kernels loaded: the context, its stream, the module chosen for the
//! device's compute capability (loaded once), the kernel function table, and the staging ring
//! that uploads without stalling. Cloning a `Device` is cheap; the clones share all of it.
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUstream};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DeviceSlice, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::kernels::Kernels;
use super::ptx;
use super::staging::StagingRing;
use crate::error::{Error, Result};

/// An open GPU: its CUDA context, a stream, and ferrinfer's kernels loaded for its architecture.
///
/// Plans, caches and buffers remember the context they were made in; giving a launch a stream
/// or buffer of another context is an [`Error::DeviceMismatch`]. Two `Device`s opened on the
/// same GPU with [`Device::new`] share its primary context and can be mixed freely.
///
/// ```no_run
/// // Where there is no driver this is an `Err` that says so; nothing panics.
/// match ferrinfer::Device::new(0) {
///     Ok(dev) => println!("{} (compute capability {:?})", dev.name(), dev.compute_capability()),
///     Err(e) => println!("no GPU: {e}"),
/// }
/// ```
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
    /// Whether plans may use the architecture-specific kernels (see
    /// [`with_portable_kernels`](Self::with_portable_kernels)).
    arch_specific: bool,
    /// Whether prefill plans take the Hopper kernel for every batch it runs (see
    /// [`with_hopper_prefill`](Self::with_hopper_prefill)).
    hopper_prefill_always: bool,
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
    ptx_arch: &'static str,
    /// The architecture-specific module loaded beside it (`"sm_90a"` on compute capability 9.0).
    specific_arch: Option<&'static str>,
    /// Whether every module came from its prebuilt SASS rather than the driver's compile of its PTX.
    prebuilt: bool,
    multiprocessors: usize,
    kernels: Kernels,
    staging: Mutex<StagingRing>,
}

/// Set to `1`, the kernels are compiled from their PTX by the driver even where a prebuilt cubin
/// would run (to compare the two, or to rule the cubin out).
const FROM_PTX_VAR: &str = "FERRINFER_KERNELS_FROM_PTX";

/// Loads `module` into `ctx`: its cubin where the GPU runs it and the driver accepts it, else
/// its PTX. Returns the module and whether it came from the cubin.
fn load_module(
    ctx: &Arc<CudaContext>,
    module: &ptx::PtxModule,
    (major, minor): (i32, i32),
    from_ptx: bool,
    context: &'static str,
) -> Result<(Arc<CudaModule>, bool)> {
    if !from_ptx && module.cubin_runs_on(major, minor) {
        // A driver older than the cubin's ptxas refuses it (a load error, not a sticky one):
        // the PTX then serves.
        if let Ok(loaded) = ctx.load_module(Ptx::from_binary(module.cubin())) {
            return Ok((loaded, true));
        }
    }
    let loaded = ctx.load_module(Ptx::from_src(module.ptx())).map_err(Error::driver(context))?;
    Ok((loaded, false))
}

impl Device {
    /// Whether a CUDA driver can be loaded on this machine (no context is created).
    pub fn driver_present() -> bool {
        // SAFETY: only tries to dlopen libcuda; loads no symbols.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }

    /// Opens GPU `ordinal` (its primary context, as cudarc and most CUDA code use) and loads
    /// the kernels for its architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !Self::driver_present() {
            return Err(Error::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::driver("creating the CUDA context"))?;
        Self::from_context(ctx)
    }

    /// Loads the kernels into an existing cudarc context (a stack's own, or a non-primary one),
    /// so its buffers and streams can be given to ferrinfer's launches.
    pub fn from_context(ctx: Arc<CudaContext>) -> Result<Self> {
        let name = ctx.name().map_err(Error::driver("reading the device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(Error::driver("reading the compute capability"))?;
        let module = ptx::for_compute_capability(major, minor).ok_or_else(|| Error::UnsupportedDevice {
            name: name.clone(),
            major,
            minor,
        })?;
        let ptx_arch = module.arch;
        let from_ptx = std::env::var_os(FROM_PTX_VAR).is_some_and(|v| v == "1");
        let (module, mut prebuilt) = load_module(&ctx, module, (major, minor), from_ptx, "loading the kernel module")?;
        let specific = ptx::specific_to(major, minor);
        let specific_arch = specific.map(|m| m.arch);
        let specific = match specific {
            Some(m) => {
                let (module, sass) =
                    load_module(&ctx, m, (major, minor), from_ptx, "loading the architecture-specific kernel module")?;
                prebuilt &= sass;
                Some(module)
            }
            None => None,
        };
        let kernels = Kernels::load(&module, specific.as_ref())?;
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(Error::driver("reading the multiprocessor count"))?
            .max(1) as usize;
        // Its own stream rather than the legacy default one, so work on it can be graph-captured.
        let stream = ctx.new_stream().map_err(Error::driver("creating a stream"))?;
        Ok(Device {
            inner: Arc::new(Inner {
                ctx,
                stream,
                name,
                compute_capability: (major, minor),
                ptx_arch,
                specific_arch,
                prebuilt,
                multiprocessors,
                kernels,
                staging: Mutex::new(StagingRing::default()),
            }),
            arch_specific: true,
            hopper_prefill_always: false,
        })
    }

    /// The GPU's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The GPU's compute capability, `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.compute_capability
    }

    /// The architecture of the PTX module loaded for this GPU (e.g. `"sm_90"`).
    pub fn ptx_arch(&self) -> &'static str {
        self.inner.ptx_arch
    }

    /// Whether the kernels were loaded as the SASS prebuilt for this GPU (`host/ptx/*.cubin.zst`),
    /// not compiled from PTX by the driver (26–70 s a process on an H200 whenever the
    /// driver's cache missed). False on GPUs no cubin runs on, where the driver refused the cubin
    /// (one older than the `ptxas` that made it), or with `FERRINFER_KERNELS_FROM_PTX=1`.
    pub fn kernels_prebuilt(&self) -> bool {
        self.inner.prebuilt
    }

    /// The architecture-specific module loaded beside [`ptx_arch`](Self::ptx_arch)'s (`"sm_90a"`,
    /// Hopper's `wgmma` prefill, on compute capability 9.0), if any and if this handle uses it.
    pub fn arch_specific_ptx(&self) -> Option<&'static str> {
        self.inner.specific_arch.filter(|_| self.arch_specific)
    }

    /// A handle on the same GPU, context and stream whose plans use only the portable kernels
    /// (the `sm_80`/`sm_90` module's): on an H100 or H200, prefill on `mma.sync` instead of
    /// `wgmma`. For comparing the two paths; plans made with it keep to it.
    pub fn with_portable_kernels(&self) -> Device {
        Device { inner: self.inner.clone(), arch_specific: false, hopper_prefill_always: false }
    }

    /// A handle on the same GPU, context and stream whose prefill plans (cascade's shared level
    /// included) take the Hopper (`wgmma`) kernel for every batch it can run, whatever its
    /// queries' length: FlashInfer's `backend="fa3"`. Plans made otherwise keep it for batches
    /// of long queries (more than 64 query rows a request and KV head on average) and give
    /// short ones, such as a few draft tokens a request in speculative decoding, the portable
    /// kernel's 64-row blocks. Where the GPU has no Hopper kernel for a batch (another
    /// architecture, a head_dim or cache type it lacks, a custom mask, narrower values) plans
    /// take the portable one as before. For comparing the two paths; plans made with it keep to it.
    pub fn with_hopper_prefill(&self) -> Device {
        Device { inner: self.inner.clone(), arch_specific: true, hopper_prefill_always: true }
    }

    /// Whether prefill plans take the Hopper kernel for every batch it runs
    /// ([`with_hopper_prefill`](Self::with_hopper_prefill)).
    pub(crate) fn hopper_prefill_always(&self) -> bool {
        self.hopper_prefill_always
    }

    /// Whether this handle's prefill plans pick their kernel (a plain handle), rather than keep
    /// to the one the handle asked for ([`with_portable_kernels`](Self::with_portable_kernels),
    /// [`with_hopper_prefill`](Self::with_hopper_prefill)).
    pub(crate) fn chooses_prefill_kernel(&self) -> bool {
        self.arch_specific && !self.hopper_prefill_always
    }

    /// The CUDA context the kernels are loaded in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The device's stream: plans upload their metadata on it, and the convenience calls
    /// (`upload`, `download`, `synchronize`) use it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// A new stream on this device, for concurrent work (ordered after the work queued on
    /// [`stream`](Self::stream) so far).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.inner.stream.fork().map_err(Error::driver("creating a stream"))
    }

    /// A zero-filled device buffer.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.inner.stream.alloc_zeros(len).map_err(Error::driver("allocating device memory"))
    }

    /// Copies `data` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.inner.stream.clone_htod(data).map_err(Error::driver("copying to the device"))
    }

    /// Copies `data` into an existing device buffer of the same length.
    pub fn upload_into<T: DeviceRepr>(&self, data: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        self.check_buffer("upload destination", dst)?;
        if data.len() != dst.len() {
            return Err(Error::BufferLength { what: "upload destination", got: dst.len(), expected: data.len() });
        }
        self.inner.stream.memcpy_htod(data, dst).map_err(Error::driver("copying to the device"))
    }

    /// Copies a device buffer to the host (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, src: &CudaSlice<T>) -> Result<Vec<T>> {
        self.inner.stream.clone_dtoh(src).map_err(Error::driver("copying to the host"))
    }

    /// Streaming multiprocessors on the GPU.
    pub fn multiprocessor_count(&self) -> usize {
        self.inner.multiprocessors
    }

    /// Waits until all work queued on [`stream`](Self::stream) has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(Error::driver("synchronizing the stream"))
    }

    /// The kernel function table.
    pub(crate) fn kernels(&self) -> &Kernels {
        &self.inner.kernels
    }

    /// The Hopper prefill kernel for `dtype` queries over a `kv_dtype` cache and `head_dim`,
    /// when this handle may use it.
    pub(crate) fn prefill_hopper(
        &self,
        dtype: super::dtype::DType,
        kv_dtype: super::dtype::DType,
        head_dim: usize,
    ) -> Option<&super::kernels::Kernel> {
        self.inner.kernels.prefill_hopper(dtype, kv_dtype, head_dim).filter(|_| self.arch_specific)
    }

    /// The Hopper MLA kernel for `dtype` queries over a 16-bit cache of the same type, when
    /// this handle may use it.
    pub(crate) fn mla_hopper(&self, dtype: super::dtype::DType) -> Option<&super::kernels::Kernel> {
        self.inner.kernels.mla_hopper(dtype).filter(|_| self.arch_specific)
    }

    /// The ring of pinned host buffers uploads go through.
    pub(crate) fn staging(&self) -> &Mutex<StagingRing> {
        &self.inner.staging
    }

    /// Whether `ctx` is this device's CUDA context (the same driver context, whichever cudarc
    /// handle holds it).
    pub(crate) fn is_context(&self, ctx: &CudaContext) -> bool {
        ctx.cu_ctx() == self.inner.ctx.cu_ctx()
    }

    /// `Ok` when `stream` belongs to this device's context.
    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        self.check_context("stream", stream.context())
    }

    /// `Ok` when `ctx` is this device's context; else a mismatch naming `what`.
    pub(crate) fn check_context(&self, what: &'static str, ctx: &CudaContext) -> Result<()> {
        if self.is_context(ctx) {
            Ok(())
        } else {
            Err(Error::DeviceMismatch { what })
        }
    }

    /// `Ok` when the cudarc buffer `buffer` was allocated in this device's context.
    pub(crate) fn check_buffer<T>(&self, what: &'static str, buffer: &(impl DeviceSlice<T> + ?Sized)) -> Result<()> {
        self.check_context(what, buffer.stream().context())
    }

    /// `Ok` when the raw stream `stream` belongs to this device's context (the driver says
    /// which context a stream was created in).
    pub(crate) fn check_raw_stream(&self, stream: CUstream) -> Result<()> {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the driver writes the stream's context to `ctx`; an invalid stream is an error.
        unsafe { sys::cuStreamGetCtx(stream, &mut ctx) }
            .result()
            .map_err(Error::driver("reading a stream's context"))?;
        if ctx == self.inner.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::DeviceMismatch { what: "raw stream" })
        }
    }

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
            LaunchStream::Raw(s) => self.inner.ctx.bind_to_thread().and_then(|()| {
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

impl Device {
    /// Whether this device's kernels may be launched programmatically dependent on the kernel
    /// before them ([`launch_dependent`](Self::launch_dependent)): the sm_90 module's kernels
    /// wait for their prerequisites (`griddepcontrol.wait`); the sm_80 module's do not.
    fn programmatic_launches(&self) -> bool {
        self.inner.ptx_arch != "sm_80"
    }

    /// As [`launch`](Self::launch), with programmatic stream serialization (CUDA's programmatic
    /// dependent launch) where this device's kernels wait for their prerequisites
    /// ([`programmatic_launches`](Self::programmatic_launches)): the grid may be scheduled while
    /// the kernel before it on the stream finishes, so its launch overlaps that kernel's last
    /// blocks. Elsewhere an ordinary launch.
    ///
    /// # Safety
    /// As [`launch`](Self::launch); and `function` waits for its prerequisite grids before it
    /// reads anything they write (or writes anything they read).
    pub(crate) unsafe fn launch_dependent<P: DeviceRepr>(
        &self,
        function: &CudaFunction,
        cfg: LaunchConfig,
        stream: LaunchStream,
        params: &P,
        what: &'static str,
    ) -> Result<()> {
        if !self.programmatic_launches() {
            // SAFETY: the caller's contract, which includes `launch`'s.
            return self.launch(function, cfg, stream, params, what);
        }
        let stream = match stream {
            LaunchStream::Cudarc(s) => s.cu_stream(),
            LaunchStream::Raw(s) => s,
        };
        self.inner.ctx.bind_to_thread().map_err(Error::driver(what))?;
        // SAFETY: an all-zero attribute is a valid C value; its id and value are set next.
        let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
        attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream,
            attrs: &mut attribute,
            numAttrs: 1,
        };
        let mut args = [params as *const P as *mut c_void];
        // SAFETY: the caller's contract; `config`, `attribute` and `args` outlive the call.
        sys::cuLaunchKernelEx(&config, function.cu_function(), args.as_mut_ptr(), std::ptr::null_mut())
            .result()
            .map_err(Error::driver(what))
    }
}

/// Grid and block of a launch, with dynamic shared memory.
pub(crate) fn launch_config(grid: (u32, u32), block: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes }
}

/// Where a launch goes: a cudarc stream (the safe API), or a raw `CUstream` of the device's
/// context (the `unsafe` raw API).
#[derive(Clone, Copy)]
pub(crate) enum LaunchStream<'a> {
    Cudarc(&'a CudaStream),
    Raw(CUstream),
}
