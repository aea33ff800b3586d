//! The plan core: what every plan owns and every run does, written once. A plan holds its
//! [`Device`]; its metadata (page indices, work items, row offsets) in one device allocation,
//! uploaded asynchronously through pinned staging on the device's stream and re-used by the
//! next `replan`; and its split-KV scratch. A run checks that the stream and every operand
//! belong to the plan's context and have the planned lengths, takes every buffer through
//! cudarc's stream tracking (operands read or written as the kernel does; the metadata read;
//! the scratch *written*, so two runs of one plan on two streams are ordered), and launches.
//! The algorithms supply their work split and parameter block only ([`AttentionLaunch`]).
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop};

use crate::cache::layout::CacheShape;
use crate::cache::paged::{KvScales, LayerDequant};
use crate::error::{Error, Result};
use crate::runtime::abi::{FastDiv, KvHeadScale, PagedCacheParams, SplitScratch};
use crate::runtime::device::{launch_config, Device, LaunchStream};
use crate::runtime::dtype::{DType, KvDType};
use crate::runtime::kernels::{Kernel, Kernels};
use crate::runtime::raw::RawSlice;

/// Alignment of each metadata part and scratch region (the kernels load work items as 16-byte
/// vectors; 256 keeps every part on its own cache lines).
const ALIGN: usize = 256;

/// The byte view of plain `#[repr(C)]` ABI data, for uploading.
pub(crate) fn as_bytes<T: DeviceRepr>(data: &[T]) -> &[u8] {
    // SAFETY: `DeviceRepr` types are plain data without padding the kernels read, or padding
    // they never read; any initialised value's bytes may be viewed as `u8`.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// Where a plan's split-KV scratch regions lie: merge counters first (kept zero between
/// launches), then the partial outputs and their LSEs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ScratchLayout {
    /// Merge counters (`u32`).
    pub counters: usize,
    /// Partial rows of `head_dim` f32 values, each with an f32 LSE.
    pub partial_rows: usize,
    pub head_dim: usize,
}

impl ScratchLayout {
    fn partial_out_offset(&self) -> usize {
        (4 * self.counters).next_multiple_of(ALIGN)
    }
    fn partial_lse_offset(&self) -> usize {
        self.partial_out_offset() + (4 * self.partial_rows * self.head_dim).next_multiple_of(ALIGN)
    }
    fn bytes(&self) -> usize {
        self.partial_lse_offset() + 4 * self.partial_rows
    }
    /// The regions' addresses in scratch at `base`.
    pub fn at(&self, base: u64) -> SplitScratch {
        SplitScratch {
            merge_counters: base,
            partial_out: base + self.partial_out_offset() as u64,
            partial_lse: base + self.partial_lse_offset() as u64,
        }
    }
}

/// Device addresses of an attention launch's operands.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    /// Queries.
    pub q: u64,
    /// The cache layer's K pool.
    pub k: u64,
    /// The cache layer's V pool.
    pub v: u64,
    /// Output rows.
    pub out: u64,
    /// 0 when no LSE is wanted.
    pub lse: u64,
    /// The query heads' attention sinks; 0 for none.
    pub sinks: u64,
    /// The cache layer's dequantisation scales (1 for a 16-bit cache).
    pub scales: KvScales,
    /// The cache layer's per-KV-head scales (`*const KvHeadScale`); 0 for none.
    pub head_scales: u64,
}

/// What an attention algorithm (decode, prefill) supplies to the shared run.
pub(crate) trait AttentionLaunch {
    /// The kernel's parameter block.
    type Params: DeviceRepr;
    /// The operation, for errors: e.g. `"decode attention"`.
    const WHAT: &'static str;
    /// Rows of `q` and `out` (tokens × query heads), each `head_dim` elements.
    fn rows(&self) -> usize;
    /// Query heads per token (the length of the sinks).
    fn num_qo_heads(&self) -> usize;
    fn head_dim(&self) -> usize;
    /// Elements of each row of `out` (and of V's rows): `head_dim` unless values are narrower.
    fn head_dim_vo(&self) -> usize {
        self.head_dim()
    }
    /// Elements of K (and of V, unless its rows are narrower) the launch addresses.
    fn kv_elems(&self) -> usize;
    /// Elements of V the launch addresses.
    fn v_elems(&self) -> usize {
        self.kv_elems()
    }
    /// The kernel variant for the queries' element type and the cache's.
    fn kernel<'k>(&self, kernels: &'k Kernels, dtype: DType, kv_dtype: DType) -> Result<&'k Kernel>;
    /// The cache element type the plan was made for; `None`: the queries' own.
    fn kv_dtype(&self) -> Option<DType>;
    /// Blocks of the launch; 0 launches nothing.
    fn blocks(&self) -> u32;
    /// The parameter block, for operands `ops`, metadata parts at `parts` and scratch `split`.
    fn params(&self, ops: &Addresses, parts: &[u64], split: SplitScratch) -> Self::Params;
}

/// The paged cache as the attention kernels address it: pools at `k` and `v`, the page table's
/// indices at `kv_indices`, and `shape`'s geometry.
pub(crate) fn paged_cache_params(shape: &CacheShape, k: u64, v: u64, kv_indices: u64) -> PagedCacheParams {
    let (slot_stride, head_stride) = shape.strides();
    PagedCacheParams {
        k_pages: k,
        v_pages: v,
        kv_indices,
        page_size: FastDiv::new(shape.page_size as u32),
        page_elems: shape.page_elems() as u32,
        slot_stride: slot_stride as u32,
        head_stride: head_stride as u32,
    }
}

/// Checks a cache of `got` against the element type `launch` was planned for (queries of
/// `query`) and that the pair has kernels, returning the kernel.
fn kernel_for<'k, L: AttentionLaunch>(
    launch: &L,
    kernels: &'k Kernels,
    query: DType,
    got: DType,
) -> Result<&'k Kernel> {
    let planned = launch.kv_dtype().unwrap_or(query);
    if got != planned {
        return Err(Error::KvDTypeMismatch { planned: planned.name(), got: got.name() });
    }
    launch.kernel(kernels, query, got)
}

/// A cache layer's per-KV-head scales, if it has them, tracked for a read on `stream`: the
/// address (0 for none) and the guard to hold until the launch is enqueued.
pub(crate) fn head_scales_on<'a>(
    heads: Option<CudaView<'a, KvHeadScale>>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match heads {
        Some(h) => {
            let (ptr, guard) = h.view_ptr(stream);
            (ptr, Some(guard))
        }
        None => (0, None),
    }
}

/// A new buffer's device address (fixed for its lifetime), taken on the stream that made it.
fn base_address(buffer: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    let (ptr, _record) = buffer.device_ptr(stream);
    ptr
}

pub(crate) use crate::error::check_lengths;

/// A plan's device, metadata and scratch (see the module's documentation).
pub(crate) struct PlanCore {
    device: Device,
    /// Every array the kernels read, parts laid end to end at `ALIGN`ed offsets.
    metadata: CudaSlice<u8>,
    /// Byte offset of each part of the last upload.
    offsets: Vec<usize>,
    /// Recorded on the device's stream after the last upload, for raw runs on other streams.
    uploaded: CudaEvent,
    scratch: CudaSlice<u8>,
    /// The buffers' addresses, for raw runs (whose callers order them).
    metadata_base: u64,
    scratch_base: u64,
    layout: ScratchLayout,
    /// Bytes at the start of `scratch` known to be zero between launches.
    zeroed: usize,
    /// False while a replan is changing the device buffers, and after one that failed there.
    usable: bool,
}

impl PlanCore {
    /// An empty core on `device` (buffers grow on the first upload).
    pub fn new(device: &Device) -> Result<Self> {
        let uploaded = device.context().new_event(None).map_err(Error::driver("creating an event"))?;
        let (metadata, scratch) = (device.alloc_zeros(ALIGN)?, device.alloc_zeros(ALIGN)?);
        Ok(PlanCore {
            device: device.clone(),
            metadata_base: base_address(&metadata, device.stream()),
            scratch_base: base_address(&scratch, device.stream()),
            metadata,
            offsets: Vec::new(),
            uploaded,
            scratch,
            layout: ScratchLayout::default(),
            zeroed: ALIGN,
            usable: false,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Uploads `parts` (each at an `ALIGN`ed offset) as the plan's metadata and sizes the
    /// scratch for `layout`, zeroing merge counters not known to be zero. Asynchronous: on the
    /// device's stream, from pinned staging, nothing waits for the GPU; cudarc's tracking
    /// orders the copy after earlier runs still reading the buffers, and later runs after it.
    pub fn replan(&mut self, parts: &[&[u8]], layout: ScratchLayout) -> Result<()> {
        self.usable = false;
        let mut offsets = Vec::with_capacity(parts.len());
        let mut len = 0;
        for part in parts {
            offsets.push(len);
            len = (len + part.len()).next_multiple_of(ALIGN);
        }
        let stream = self.device.stream().clone();
        if self.metadata.len() < len {
            self.metadata = self.device.alloc_zeros(len.next_power_of_two())?;
            self.metadata_base = base_address(&self.metadata, &stream);
        }
        let fill = |host: &mut [u8]| {
            for (part, &at) in parts.iter().zip(&offsets) {
                host[at..at + part.len()].copy_from_slice(part);
            }
        };
        let ctx = self.device.context().clone();
        self.device.staging().lock().unwrap_or_else(|e| e.into_inner()).upload(
            &ctx,
            &stream,
            len,
            fill,
            &mut self.metadata,
        )?;
        self.uploaded.record(&stream).map_err(Error::driver("recording an event"))?;
        self.offsets = offsets;

        let counters = 4 * layout.counters;
        if self.scratch.len() < layout.bytes() {
            self.scratch = self.device.alloc_zeros(layout.bytes().next_power_of_two())?;
            self.scratch_base = base_address(&self.scratch, &stream);
        } else if counters > self.zeroed {
            stream
                .memset_zeros(&mut self.scratch.slice_mut(..counters))
                .map_err(Error::driver("zeroing merge counters"))?;
        }
        // Launches leave their counters zero; partial outputs may overwrite the rest.
        self.zeroed = counters;
        self.layout = layout;
        self.usable = true;
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        if self.usable {
            Ok(())
        } else {
            Err(Error::PlanUnusable)
        }
    }

    /// The metadata parts' device addresses from base address `base`.
    fn part_addresses(&self, base: u64) -> Vec<u64> {
        self.offsets.iter().map(|&at| base + at as u64).collect()
    }

    /// Runs `launch` on `stream` over cudarc buffers: checks the context of the stream and of
    /// every operand, the element types (the cache's `C` the planned one), and every length
    /// (`q`, `out`: `rows × head_dim`; `lse`: `rows`; `k`, `v`: `kv_elems`), then launches with
    /// every buffer tracked. `dequant` is the cache layer's (its scales checked when they were
    /// set, its head scales `num_kv_heads` long); `sinks`, if given, one per query head.
    #[allow(clippy::too_many_arguments)]
    pub fn run_attention<T: KvDType, C: KvDType, L: AttentionLaunch>(
        &mut self,
        launch: &L,
        stream: &CudaStream,
        q: &(impl DevicePtr<T> + ?Sized),
        k: &(impl DevicePtr<C> + ?Sized),
        v: &(impl DevicePtr<C> + ?Sized),
        dequant: LayerDequant<'_>,
        sinks: Option<&dyn DevicePtr<f32>>,
        out: &mut (impl DevicePtrMut<T> + ?Sized),
        lse: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<()> {
        self.check_usable()?;
        let dev = &self.device;
        dev.check_stream(stream)?;
        dev.check_buffer("q", q)?;
        dev.check_buffer("k", k)?;
        dev.check_buffer("v", v)?;
        dev.check_buffer("out", out)?;
        if let Some(lse) = &lse {
            dev.check_buffer("lse", &**lse)?;
        }
        if let Some(sinks) = sinks {
            dev.check_buffer("sinks", sinks)?;
        }
        let kernel = kernel_for(launch, dev.kernels(), T::DTYPE, C::DTYPE)?;
        let (rows, elems, kv) = (launch.rows(), launch.rows() * launch.head_dim(), launch.kv_elems());
        let (out_elems, v_elems) = (rows * launch.head_dim_vo(), launch.v_elems());
        let heads = launch.num_qo_heads();
        check_lengths(&[
            ("q", q.len(), elems),
            ("out", out.len(), out_elems),
            ("lse", lse.as_ref().map_or(rows, |l| l.len()), rows),
            ("sinks", sinks.map_or(heads, |s| s.len()), heads),
            ("k", k.len(), kv),
            ("v", v.len(), v_elems),
        ])?;
        if launch.blocks() == 0 {
            return Ok(());
        }
        let (q, _g0) = q.device_ptr(stream);
        let (k, _g1) = k.device_ptr(stream);
        let (v, _g2) = v.device_ptr(stream);
        let (out, _g3) = out.device_ptr_mut(stream);
        let (lse, _g4) = match lse {
            Some(l) => {
                let (p, g) = l.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (sinks, _g7) = match sinks {
            Some(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (head_scales, _g8) = head_scales_on(dequant.heads, stream);
        let (metadata, _g5) = self.metadata.device_ptr(stream);
        let parts = self.part_addresses(metadata);
        let (scratch, _g6) = self.scratch.device_ptr_mut(stream);
        let ops = Addresses { q, k, v, out, lse, sinks, scales: dequant.scales, head_scales };
        let params = launch.params(&ops, &parts, self.layout.at(scratch));
        let cfg = launch_config((launch.blocks(), 1), kernel.threads, kernel.smem_bytes);
        // SAFETY: the plan validated its work against its shape, so the kernel reads K/V only
        // below `kv_elems` (V: `v_elems`) elements, q and out only below `rows × head_dim` (out:
        // `head_dim_vo`), sinks only below
        // `num_qo_heads`, and its metadata and
        // scratch only inside what it uploaded and sized; every operand was checked to have
        // those lengths and to live in this context, and every buffer outlives the launch's
        // enqueueing (the guards above record cudarc's events after it).
        unsafe { dev.launch(&kernel.function, cfg, LaunchStream::Cudarc(stream), &params, L::WHAT) }
    }

    /// [`run_attention`](Self::run_attention) for raw device addresses on a raw stream.
    ///
    /// # Safety
    /// The slices satisfy [`RawSlice::new`]'s contract and stay as they are until the launch has
    /// completed; runs of the plan are ordered on the GPU, and the plan is neither replanned nor
    /// dropped before the launch has completed.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_attention_raw<T: KvDType, L: AttentionLaunch>(
        &mut self,
        launch: &L,
        stream: CUstream,
        q: RawSlice<T>,
        k: RawSlice<T>,
        v: RawSlice<T>,
        out: RawSlice<T>,
        lse: Option<RawSlice<f32>>,
    ) -> Result<()> {
        self.check_usable()?;
        let dev = &self.device;
        dev.check_raw_stream(stream)?;
        let kernel = kernel_for(launch, dev.kernels(), T::DTYPE, T::DTYPE)?;
        let (rows, elems, kv) = (launch.rows(), launch.rows() * launch.head_dim(), launch.kv_elems());
        let (out_elems, v_elems) = (rows * launch.head_dim_vo(), launch.v_elems());
        check_lengths(&[
            ("q", q.len(), elems),
            ("out", out.len(), out_elems),
            ("lse", lse.map_or(rows, |l| l.len()), rows),
            ("k", k.len(), kv),
            ("v", v.len(), v_elems),
        ])?;
        if launch.blocks() == 0 {
            return Ok(());
        }
        self.order_after_upload(stream)?;
        let ops = Addresses {
            q: q.ptr(),
            k: k.ptr(),
            v: v.ptr(),
            out: out.ptr(),
            lse: lse.map_or(0, |l| l.ptr()),
            sinks: 0,
            scales: KvScales::default(),
            head_scales: 0,
        };
        let params = launch.params(&ops, &self.part_addresses(self.metadata_base), self.layout.at(self.scratch_base));
        let cfg = launch_config((launch.blocks(), 1), kernel.threads, kernel.smem_bytes);
        // SAFETY: as in `run_attention` for the plan's own buffers; the caller vouches for the
        // operands (lengths checked here) and for the ordering of runs.
        dev.launch(&kernel.function, cfg, LaunchStream::Raw(stream), &params, L::WHAT)
    }

    /// Makes raw stream `stream` wait for the plan's last upload.
    pub fn order_after_upload(&self, stream: CUstream) -> Result<()> {
        // SAFETY: `stream` is a stream of this context (checked by the caller); the event is ours.
        unsafe {
            cudarc::driver::result::stream::wait_event(
                stream,
                self.uploaded.cu_event(),
                cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(Error::driver("ordering a raw stream after the plan's upload"))
    }

    /// The metadata tracked for a read on `stream`: its parts' addresses and the guard to hold
    /// until the launch is enqueued.
    pub fn metadata_on<'a>(&'a self, stream: &'a CudaStream) -> Result<(Vec<u64>, cudarc::driver::SyncOnDrop<'a>)> {
        self.check_usable()?;
        let (base, guard) = self.metadata.device_ptr(stream);
        Ok((self.part_addresses(base), guard))
    }

    /// The metadata tracked for a read and the scratch for a write on `stream`, for a run of
    /// several launches (MLA's attention and merge): the parts' addresses, the scratch regions,
    /// and the guards to hold until the launches are enqueued.
    pub fn buffers_on<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> Result<(Vec<u64>, SplitScratch, [cudarc::driver::SyncOnDrop<'a>; 2])> {
        self.check_usable()?;
        let (base, read) = self.metadata.device_ptr(stream);
        let parts = self.part_addresses(base);
        let (scratch, written) = self.scratch.device_ptr_mut(stream);
        Ok((parts, self.layout.at(scratch), [read, written]))
    }

    /// The metadata parts' addresses for a raw run (checks the plan is usable).
    pub fn raw_parts(&self) -> Result<Vec<u64>> {
        self.check_usable()?;
        Ok(self.part_addresses(self.metadata_base))
    }
}
