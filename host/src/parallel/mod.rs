//! The tensor-parallel layer: attention over several GPUs of one process, on top of the
//! single-GPU algorithms (which it does not change). Each GPU holds a slice of the heads —
//! query and KV heads split alike: GPU `r` of `n` the KV heads `r·k/n..(r+1)·k/n` and their
//! query heads — in a cache of its own whose pages mean the same tokens on every GPU, so one
//! [`SequenceAllocator`](crate::SequenceAllocator) and one page table serve all of them. Each
//! step's plans are made once per GPU from that table and run on each GPU's stream
//! ([`TensorParallel::on_each`], whose errors name the GPU); the outputs are all-gathered
//! through NCCL ([`TensorParallel::all_gather_heads`]) into the single-GPU layout on every GPU.
//!
//! NCCL comes from cudarc, loaded at run time like the driver (`libnccl.so`; where only
//! `libnccl.so.2` is installed, as in PyTorch's wheels, a `libnccl.so` link to it on the
//! library path), so building needs no NCCL; without it [`TensorParallel::new`] is
//! [`Error::NoNccl`].
use cudarc::driver::{sys, CudaSlice, DevicePtr, DevicePtrMut};
use cudarc::nccl::{Comm, NcclType};

use crate::cache::layout::CacheShape;
use crate::error::{Error, Result};
use crate::runtime::device::Device;
use crate::runtime::dtype::KvDType;

/// NCCL communicators over GPUs of this process, one [`Device`] each, in rank order.
///
/// ```no_run
/// use ferrinfer::{f16, BatchDecodePlan, CacheShape, DecodeOptions, Device, KvLayout, PagedKvCache, PageTable, TensorParallel};
///
/// // Two GPUs, 64 query heads over 16 KV heads: 32 over 8 on each.
/// let tp = TensorParallel::new(vec![Device::new(0)?, Device::new(1)?])?;
/// let shape = CacheShape { num_pages: 4096, page_size: 16, num_kv_heads: 16, head_dim: 128, layout: KvLayout::Nhd };
/// let shard = tp.shard_shape(&shape)?;
/// let caches = tp.on_each(|_, dev| PagedKvCache::<f16>::new(dev, shard, 1))?;
/// let table = PageTable { kv_indptr: vec![0, 2], kv_indices: vec![7, 3], kv_last_page_len: vec![5] };
/// // The same table on every GPU; each plans its own heads.
/// let heads = tp.shard_heads(&shape, 64)?;
/// let mut plans = tp.on_each(|_, dev| BatchDecodePlan::new(dev, &shard, heads, &table, DecodeOptions::default()))?;
/// let q = tp.on_each(|_, dev| dev.alloc_zeros::<f16>(heads * 128))?; // this GPU's heads of the token
/// let mut local = tp.on_each(|_, dev| dev.alloc_zeros::<f16>(heads * 128))?;
/// for (r, plan) in plans.iter_mut().enumerate() {
///     let dev = &tp.devices()[r];
///     plan.run(dev.stream(), &q[r], &caches[r], 0, &mut local[r], None).map_err(|e| e.on_gpu(r))?;
/// }
/// // Every GPU gets the whole [token][64 heads][128] output.
/// let mut staging = tp.on_each(|_, dev| dev.alloc_zeros::<f16>(64 * 128))?;
/// let mut out = tp.on_each(|_, dev| dev.alloc_zeros::<f16>(64 * 128))?;
/// tp.all_gather_heads(1, &local, &mut staging, &mut out)?;
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct TensorParallel {
    devices: Vec<Device>,
    comms: Vec<Comm>,
}

impl TensorParallel {
    /// GPUs the driver sees (0 without a driver).
    pub fn gpu_count() -> usize {
        if !Device::driver_present() {
            return 0;
        }
        cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }

    /// Whether NCCL can be loaded on this machine.
    pub fn nccl_present() -> bool {
        // SAFETY: only tries to dlopen libnccl; loads no symbols.
        unsafe { cudarc::nccl::sys::is_culib_present() }
    }

    /// Communicators over `devices` (rank `r` is `devices[r]`), each on its device's stream,
    /// created together as one process's clique (`ncclCommInitAll`). Two handles on one GPU
    /// are an error, as is no device, or no NCCL.
    pub fn new(devices: Vec<Device>) -> Result<Self> {
        if devices.is_empty() {
            return Err(Error::ZeroDimension { what: "devices" });
        }
        for (second, dev) in devices.iter().enumerate() {
            if let Some(first) = devices[..second].iter().position(|d| d.context().ordinal() == dev.context().ordinal())
            {
                return Err(Error::SameGpuTwice { first, second });
            }
        }
        if !Self::nccl_present() {
            return Err(Error::NoNccl);
        }
        let streams = devices.iter().map(|d| d.stream().clone()).collect();
        let comms = Comm::from_devices(streams).map_err(nccl("creating the communicators"))?;
        Ok(TensorParallel { devices, comms })
    }

    /// GPUs in the group.
    pub fn world_size(&self) -> usize {
        self.devices.len()
    }

    /// The devices, in rank order.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The cache shape each GPU holds of a model whose cache is `shape`: its KV heads split
    /// evenly (every page on every GPU).
    pub fn shard_shape(&self, shape: &CacheShape) -> Result<CacheShape> {
        let num_kv_heads = self.split("num_kv_heads", shape.num_kv_heads)?;
        Ok(CacheShape { num_kv_heads, ..*shape })
    }

    /// The query heads each GPU runs of `num_qo_heads` over a cache of `shape`: split as the KV
    /// heads are, so every GPU keeps whole groups.
    pub fn shard_heads(&self, shape: &CacheShape, num_qo_heads: usize) -> Result<usize> {
        self.shard_shape(shape)?;
        if num_qo_heads == 0 || !num_qo_heads.is_multiple_of(shape.num_kv_heads) {
            return Err(Error::GroupSize { num_qo_heads, num_kv_heads: shape.num_kv_heads });
        }
        self.split("num_qo_heads", num_qo_heads)
    }

    /// `count` split over the GPUs.
    fn split(&self, what: &'static str, count: usize) -> Result<usize> {
        let gpus = self.world_size();
        if count == 0 || !count.is_multiple_of(gpus) {
            return Err(Error::UnevenShards { what, count, gpus });
        }
        Ok(count / gpus)
    }

    /// Runs `f(rank, device)` for every GPU in rank order and collects the results; the first
    /// error stops it, named by its GPU ([`Error::Gpu`]).
    pub fn on_each<R>(&self, mut f: impl FnMut(usize, &Device) -> Result<R>) -> Result<Vec<R>> {
        self.devices.iter().enumerate().map(|(rank, dev)| f(rank, dev).map_err(|e| e.on_gpu(rank))).collect()
    }

    /// All-gathers attention outputs along the heads: `local[r]`, GPU `r`'s output of `rows`
    /// rows (tokens) of its heads (`[rows][local heads][head_dim]`, the same length on every
    /// GPU), becomes on every GPU `out[r]`: `[rows][heads][head_dim]` with GPU `s`'s heads at
    /// `s · local heads` — the single-GPU layout. NCCL gathers rank after rank into
    /// `staging[r]` (as long as `out[r]`), and a strided copy interleaves the ranks' rows; all on
    /// each device's stream, in order after the work queued there (the attention that wrote
    /// `local`), so nothing waits for the host. Each buffer lives on its rank's GPU.
    pub fn all_gather_heads<T: KvDType + NcclType>(
        &self,
        rows: usize,
        local: &[CudaSlice<T>],
        staging: &mut [CudaSlice<T>],
        out: &mut [CudaSlice<T>],
    ) -> Result<()> {
        let gpus = self.world_size();
        for (what, got) in [("local outputs", local.len()), ("staging buffers", staging.len()), ("outputs", out.len())]
        {
            if got != gpus {
                return Err(Error::BufferLength { what, got, expected: gpus });
            }
        }
        let local_elems = local[0].len();
        if rows == 0 || local_elems == 0 {
            return Ok(());
        }
        if !local_elems.is_multiple_of(rows) {
            return Err(Error::BufferLength {
                what: "local output (rows × local heads × head_dim)",
                got: local_elems,
                expected: local_elems.next_multiple_of(rows),
            });
        }
        self.on_each(|r, dev| {
            dev.check_buffer("local output", &local[r])?;
            dev.check_buffer("staging buffer", &staging[r])?;
            dev.check_buffer("output", &out[r])?;
            crate::plan::check_lengths(&[
                ("local output", local[r].len(), local_elems),
                ("staging buffer", staging[r].len(), gpus * local_elems),
                ("output", out[r].len(), gpus * local_elems),
            ])
        })?;
        // One thread drives every rank: NCCL needs the calls grouped, or the first would wait for
        // the others forever.
        cudarc::nccl::group_start().map_err(nccl("starting a group"))?;
        let gathered = (0..gpus).try_for_each(|r| {
            self.comms[r]
                .all_gather(&local[r], &mut staging[r])
                .map(|_| ())
                .map_err(|e| nccl("all-gathering")(e).on_gpu(r))
        });
        let ended = cudarc::nccl::group_end().map_err(nccl("ending a group"));
        gathered?;
        ended?;
        let row_bytes = local_elems / rows * std::mem::size_of::<T>();
        self.on_each(|r, dev| {
            let stream = dev.stream();
            let (src, _g0) = staging[r].device_ptr(stream);
            let (dst, _g1) = out[r].device_ptr_mut(stream);
            dev.context().bind_to_thread().map_err(Error::driver("binding the context"))?;
            for s in 0..gpus {
                // Rank s's rows (contiguous in the staging buffer) into its columns of every row.
                let copy = sys::CUDA_MEMCPY2D {
                    srcXInBytes: 0,
                    srcY: 0,
                    srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    srcHost: std::ptr::null(),
                    srcDevice: src + (s * rows * row_bytes) as u64,
                    srcArray: std::ptr::null_mut(),
                    srcPitch: row_bytes,
                    dstXInBytes: 0,
                    dstY: 0,
                    dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    dstHost: std::ptr::null_mut(),
                    dstDevice: dst + (s * row_bytes) as u64,
                    dstArray: std::ptr::null_mut(),
                    dstPitch: gpus * row_bytes,
                    WidthInBytes: row_bytes,
                    Height: rows,
                };
                // SAFETY: both regions lie inside the buffers, whose lengths were checked
                // (`rows` rows of `gpus · row_bytes` bytes), on this GPU; the stream is the
                // device's and the guards above order the buffers' other users around it.
                unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
                    .result()
                    .map_err(Error::driver("interleaving the gathered heads"))?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// Wraps an NCCL error with what ferrinfer was doing.
fn nccl(context: &'static str) -> impl FnOnce(cudarc::nccl::result::NcclError) -> Error {
    move |e| Error::Nccl { context, code: format!("{:?}", e.0) }
}
