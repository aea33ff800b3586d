//! Rotary position embeddings (RoPE) over ragged `[token][head][head_dim]` queries and keys:
//! FlashInfer's `apply_rope` (positions from `indptr` and per-request `offsets`),
//! `apply_rope_pos_ids` (a position per token), `apply_llama31_rope` (Llama 3.1 frequency
//! scaling) and `apply_rope_with_cos_sin_cache` (the caller's f32 cos/sin cache), in place or
//! out of place ([`RopePlan`]); and RoPE fused into the append of ragged K/V into the paged
//! cache, keys rotated as they are written and queries rotated in the same launch
//! ([`AppendRopePlan`]).
//!
//! Pairs: NeoX (`interleave: false`) rotates dims `(i, i + rotary_dim / 2)`, GPT-J
//! (`interleave: true`) dims `(2i, 2i + 1)`, by the angle `position · f_i` of pair `i`:
//! `x' = x · cos − y · sin`, `y' = y · cos + x · sin`. Dims from `rotary_dim` on are unchanged.
//! The frequencies are FlashInfer's: `f_i = rope_theta^(−2i / rotary_dim) / rope_scale`
//! (`rope_scale` divides the position), and with Llama 3.1 scaling
//! `f_i = (1 − s) · b_i / rope_scale + s · b_i` where `b_i = rope_theta^(−2i / rotary_dim)` and
//! `s = clamp(b_i · old_context_len / (2π (high − low)) − low / (high − low), 0, 1)`.
//!
//! # Angles and their error
//!
//! The host computes each pair's frequency in f64 and passes it as two f32s (`hi + lo`). The
//! kernel forms `position · (hi + lo)` without losing the product's rounding error (an fma
//! recovers it exactly), reduces it by 2π in two parts (Cody–Waite, each step one fma), and
//! takes `sin.approx`/`cos.approx` of the reduced angle in about `[−π, π]`. The reduced angle is
//! within 2⁻²¹ ≈ 4.8e-7 rad of the f64 angle for every position up to 131072 and frequencies up
//! to 1 (a host test checks every such position against the f64 angle, with the kernel's own
//! arithmetic), and the approximations add at most 2⁻²⁰·⁵ ≈ 6.7e-7, so cos and sin are within
//! 1.2e-6 of exact. (Plain f32 `position · f` would be off by up to 131072 · 2⁻²⁴ ≈ 7.8e-3 rad
//! there.) Each output is then `x · cos ∓ y · sin` in f32, rounded once to the element type:
//! within one unit in the last place of the output type plus `3e-6 · (|x| + |y|)` of the f64
//! rotation, the bound the GPU tests hold at positions up to 131072.
//!
//! Positions are `u32` (below 2²⁴, exact in f32); with a cos/sin cache, below its
//! `max_position`. Every check happens on the host before the launch.
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::cache::layout::CacheShape;
use crate::cache::page_table::{validate_indptr, PageTable};
use crate::cache::paged::PagedKvCache;
use crate::error::{Error, Result};
use crate::ops::page_copy::{append_first_positions, row_offsets};
use crate::plan::{as_bytes, check_lengths, PlanCore, ScratchLayout};
use crate::runtime::abi::{rope_mode, rope_units, FastDiv, RopeParams, RopeTensor, ROPE_GROUP_HEADS, ROPE_THREADS};
use crate::runtime::device::{launch_config, Device, LaunchStream};
use crate::runtime::dtype::KvDType;

/// Positions the kernels compute angles for: below 2²⁴, so each is exact in f32.
pub const MAX_ROPE_POSITION: u32 = (1 << 24) - 1;

/// Where the rotation angles come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeAngles {
    /// FlashInfer's `apply_rope` / `apply_rope_pos_ids`: pair `i` turns by
    /// `position / rope_scale · rope_theta^(−2i / rotary_dim)`.
    Standard {
        /// The base of the frequencies (FlashInfer's default 1e4).
        rope_theta: f64,
        /// Divides the position (FlashInfer's default 1).
        rope_scale: f64,
    },
    /// FlashInfer's `apply_llama31_rope`: Llama 3.1's frequency scaling (module documentation).
    Llama31 {
        /// The base of the frequencies (Llama 3.1: 5e5).
        rope_theta: f64,
        /// Divides the position of the low frequencies (Llama 3.1: 8).
        rope_scale: f64,
        /// Wavelengths above `old_context_len / low_freq_factor` are fully scaled (1).
        low_freq_factor: f64,
        /// Wavelengths below `old_context_len / high_freq_factor` are not scaled (4).
        high_freq_factor: f64,
        /// The original maximum position (8192).
        old_context_len: f64,
    },
    /// FlashInfer's `apply_rope_with_cos_sin_cache`: the caller's f32 cache of
    /// `[max_position][rotary_dim]`, row `p` holding the cos of each pair at position `p`, then
    /// its sin; each run takes it.
    CosSinCache {
        /// Rows of the cache: every position must be below it.
        max_position: usize,
    },
}

/// How queries and keys are rotated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeOptions {
    /// Leading dims of each head that are rotated (even, at most `head_dim`); `None`: all. The
    /// cos/sin cache's rows are this wide.
    pub rotary_dim: Option<usize>,
    /// GPT-J pairs `(2i, 2i + 1)` (FlashInfer's `interleave=True`, `is_neox=False`); NeoX
    /// halves `(i, i + rotary_dim / 2)` when false.
    pub interleave: bool,
    /// Where the angles come from.
    pub angles: RopeAngles,
}

impl Default for RopeOptions {
    /// FlashInfer's defaults: every dim, NeoX, `rope_theta` 1e4, `rope_scale` 1.
    fn default() -> Self {
        RopeOptions {
            rotary_dim: None,
            interleave: false,
            angles: RopeAngles::Standard { rope_theta: 1e4, rope_scale: 1.0 },
        }
    }
}

impl RopeOptions {
    /// FlashInfer's `apply_llama31_rope` defaults: `rope_theta` 5e5, `rope_scale` 8, frequency
    /// factors 1 and 4, original context 8192; every dim, NeoX.
    pub fn llama31() -> Self {
        RopeOptions {
            angles: RopeAngles::Llama31 {
                rope_theta: 5e5,
                rope_scale: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                old_context_len: 8192.0,
            },
            ..Self::default()
        }
    }

    /// The caller's cos/sin cache of `max_position` rows (`is_neox`: NeoX pairs).
    pub fn cos_sin_cache(max_position: usize, rotary_dim: usize, is_neox: bool) -> Self {
        RopeOptions {
            rotary_dim: Some(rotary_dim),
            interleave: !is_neox,
            angles: RopeAngles::CosSinCache { max_position },
        }
    }

    /// The rotated dims of a head of `head_dim`, checked.
    fn rotary_dim(&self, head_dim: usize) -> Result<usize> {
        let rotary_dim = self.rotary_dim.unwrap_or(head_dim);
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(Error::RotaryDim { rotary_dim, head_dim });
        }
        Ok(rotary_dim)
    }
}

/// Each pair's frequency (radians per position) in f64, as FlashInfer defines it; `None` for a
/// cos/sin cache. Rejects parameters that are not finite and positive, and Llama 3.1 factors
/// with `high_freq_factor ≤ low_freq_factor`.
pub(crate) fn frequencies(angles: &RopeAngles, rotary_dim: usize) -> Result<Option<Vec<f64>>> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    let base = |theta: f64| (0..rotary_dim / 2).map(move |i| theta.powf(-2.0 * i as f64 / rotary_dim as f64));
    match *angles {
        RopeAngles::Standard { rope_theta, rope_scale } => {
            if !positive(rope_theta) || !positive(rope_scale) {
                return Err(Error::BadOption { what: "rope_theta and rope_scale must be finite and positive" });
            }
            Ok(Some(base(rope_theta).map(|b| b / rope_scale).collect()))
        }
        RopeAngles::Llama31 { rope_theta, rope_scale, low_freq_factor, high_freq_factor, old_context_len } => {
            if ![rope_theta, rope_scale, low_freq_factor, high_freq_factor, old_context_len].into_iter().all(positive) {
                return Err(Error::BadOption { what: "Llama 3.1 RoPE parameters must be finite and positive" });
            }
            if high_freq_factor <= low_freq_factor {
                return Err(Error::BadOption { what: "Llama 3.1 RoPE needs high_freq_factor > low_freq_factor" });
            }
            let a = old_context_len / (2.0 * std::f64::consts::PI * (high_freq_factor - low_freq_factor));
            let b = -low_freq_factor / (high_freq_factor - low_freq_factor);
            Ok(Some(
                base(rope_theta)
                    .map(|f| {
                        let smooth = (f * a + b).clamp(0.0, 1.0);
                        (1.0 - smooth) * f / rope_scale + smooth * f
                    })
                    .collect(),
            ))
        }
        RopeAngles::CosSinCache { .. } => Ok(None),
    }
}

/// A frequency as the kernels take it: the f64 value split into an f32 and the f32 of the rest.
fn split(f: f64) -> [f32; 2] {
    let hi = f as f32;
    [hi, (f - hi as f64) as f32]
}

/// The query and key heads of a [`RopePlan`]'s ragged tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    /// Query heads per token.
    pub num_qo_heads: usize,
    /// Key heads per token.
    pub num_kv_heads: usize,
    /// Elements per head: a multiple of 8 (16-byte rows).
    pub head_dim: usize,
}

/// The position of each token of a [`RopePlan`]'s ragged batch.
#[derive(Clone, Copy, Debug)]
pub enum RopePositions<'a> {
    /// FlashInfer's `apply_rope`: request `i` owns rows `indptr[i]..indptr[i + 1]`, at positions
    /// `offsets[i], offsets[i] + 1, …`.
    Ragged {
        /// `batch + 1` row offsets, from 0, never decreasing.
        indptr: &'a [u32],
        /// Each request's first position.
        offsets: &'a [u32],
    },
    /// FlashInfer's `apply_rope_pos_ids`: one position per row.
    PerToken(&'a [u32]),
}

impl RopePositions<'_> {
    fn resolve(&self) -> Result<Vec<u64>> {
        match *self {
            RopePositions::PerToken(positions) => Ok(positions.iter().map(|&p| p as u64).collect()),
            RopePositions::Ragged { indptr, offsets } => {
                validate_indptr("indptr", indptr, offsets.len())?;
                let mut positions = Vec::with_capacity(*indptr.last().unwrap_or(&0) as usize);
                for (w, &offset) in indptr.windows(2).zip(offsets) {
                    positions.extend((0..(w[1] - w[0]) as u64).map(|i| offset as u64 + i));
                }
                Ok(positions)
            }
        }
    }
}

/// What both plans share: the validated rotation, the plan core holding the positions, the
/// frequencies and (fused) the row offsets, and the launch.
struct Rotation {
    core: PlanCore,
    head_dim: usize,
    rotary_dim: usize,
    mode: u32,
    /// Rows of the caller's cos/sin cache, when the angles come from one.
    cos_sin_rows: Option<usize>,
    tokens: usize,
    /// Heads of the queries, keys and values (0: no values).
    heads: [usize; 3],
}

impl Rotation {
    /// Validates `options` for `head_dim` and every position, and uploads the positions, the
    /// frequencies and `row_offsets` (empty unless fused).
    fn new(
        device: &Device,
        heads: [usize; 3],
        head_dim: usize,
        positions: &[u64],
        options: &RopeOptions,
        row_offsets: &[u64],
    ) -> Result<Self> {
        for (what, n) in [("num_qo_heads", heads[0]), ("num_kv_heads", heads[1]), ("head_dim", head_dim)] {
            if n == 0 {
                return Err(Error::ZeroDimension { what });
            }
        }
        if !head_dim.is_multiple_of(8) {
            return Err(Error::UnalignedHeadDim { head_dim, dtype: "f16/bf16", bytes: 2 * head_dim });
        }
        let rotary_dim = options.rotary_dim(head_dim)?;
        let cos_sin_rows = match options.angles {
            RopeAngles::CosSinCache { max_position } => Some(max_position),
            _ => None,
        };
        let end =
            cos_sin_rows.map_or(MAX_ROPE_POSITION as u64 + 1, |rows| (rows as u64).min(MAX_ROPE_POSITION as u64 + 1));
        let what = if cos_sin_rows.is_some() { "the cos/sin cache" } else { "the kernels' angle computation" };
        if let Some(token) = positions.iter().position(|&p| p >= end) {
            return Err(Error::PositionOutOfRange { token, position: positions[token], end, what });
        }
        let (mode, tokens) = (rope_mode(options.interleave, rotary_dim as u32), positions.len());
        let threads =
            tokens as u64 * rotation_groups(heads) as u64 * rope_units(mode, head_dim as u32, rotary_dim as u32) as u64;
        if threads > FastDiv::MAX_DIVIDEND as u64 {
            return Err(Error::TooLarge {
                what: "RoPE work (tokens × head groups × units)",
                value: threads as usize,
                max: FastDiv::MAX_DIVIDEND as usize,
            });
        }
        let freqs: Vec<[f32; 2]> =
            frequencies(&options.angles, rotary_dim)?.unwrap_or_default().into_iter().map(split).collect();
        let positions: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let mut core = PlanCore::new(device)?;
        core.replan(&[as_bytes(&positions), as_bytes(&freqs), as_bytes(row_offsets)], ScratchLayout::default())?;
        Ok(Rotation { core, head_dim, rotary_dim, mode, cos_sin_rows, tokens, heads })
    }

    fn elems(&self, tensor: usize) -> usize {
        self.tokens * self.heads[tensor] * self.head_dim
    }

    /// Checks the stream and the cos/sin cache against the plan; returns the kernel for `T`.
    /// (Each run checks its own buffers.)
    fn check<T: KvDType>(
        &self,
        stream: &CudaStream,
        cos_sin_cache: Option<&dyn DevicePtr<f32>>,
    ) -> Result<&cudarc::driver::CudaFunction> {
        let device = self.core.device();
        device.check_stream(stream)?;
        match (self.cos_sin_rows, cos_sin_cache) {
            (Some(rows), Some(cache)) => {
                device.check_buffer("cos_sin_cache", cache)?;
                check_lengths(&[("cos_sin_cache", cache.len(), rows * self.rotary_dim)])?;
            }
            (Some(_), None) => return Err(Error::BadOption { what: "this plan's angles need its cos/sin cache" }),
            (None, Some(_)) => {
                return Err(Error::BadOption { what: "a cos/sin cache was given to a plan that computes its angles" })
            }
            (None, None) => {}
        }
        Ok(&device.kernels().rope(T::DTYPE, self.mode)?.function)
    }

    /// Launches the rotation of `tensors` (their `src`, `dst`, `paged` and `copy_tail` set).
    ///
    /// # Safety
    /// Each tensor's `src` holds `elems(i)` elements of the kernel's type and its `dst` as many,
    /// or is a page pool of `pool` elements in which every row offset plus its heads lies; the
    /// cos/sin cache at `cos_sin` (if any) was checked against the plan; every buffer lives in
    /// the plan's context and outlives the launch's enqueueing; `parts` are the plan's metadata.
    unsafe fn launch(
        &self,
        kernel: &cudarc::driver::CudaFunction,
        stream: &CudaStream,
        mut tensors: [RopeTensor; 3],
        parts: &[u64],
        cos_sin: u64,
        pool_head_stride: usize,
    ) -> Result<()> {
        let units = rope_units(self.mode, self.head_dim as u32, self.rotary_dim as u32);
        let mut first = 0;
        for (t, &heads) in tensors.iter_mut().zip(&self.heads) {
            t.heads = heads as u32;
            t.first_group = if heads == 0 { u32::MAX } else { first };
            first += heads.div_ceil(ROPE_GROUP_HEADS as usize) as u32;
        }
        let total = self.tokens as u32 * first * units;
        if total == 0 {
            return Ok(());
        }
        let params = RopeParams {
            tensors,
            positions: parts[0],
            freqs: if cos_sin == 0 { parts[1] } else { 0 },
            cos_sin,
            row_offsets: parts[2],
            pool_head_stride: pool_head_stride as u32,
            head_dim: self.head_dim as u32,
            rotary_dim: self.rotary_dim as u32,
            units: FastDiv::new(units),
            groups: FastDiv::new(first),
            total,
        };
        let cfg = launch_config((total.div_ceil(ROPE_THREADS), 1), ROPE_THREADS, 0);
        self.core.device().launch(kernel, cfg, LaunchStream::Cudarc(stream), &params, "launching RoPE")
    }
}

/// Head groups of a token over the three tensors.
fn rotation_groups(heads: [usize; 3]) -> usize {
    heads.iter().map(|h| h.div_ceil(ROPE_GROUP_HEADS as usize)).sum()
}

/// The device address of a buffer, checked to be 16-byte aligned.
fn aligned(what: &'static str, address: u64) -> Result<u64> {
    if !address.is_multiple_of(16) {
        return Err(Error::UnalignedBuffer { what, address });
    }
    Ok(address)
}

/// The cos/sin cache's address on `stream` and the guard to hold until the launch is enqueued.
fn cache_ptr<'a>(
    cache: Option<&'a dyn DevicePtr<f32>>,
    stream: &'a CudaStream,
) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
    match cache {
        Some(c) => {
            let (ptr, guard) = c.device_ptr(stream);
            (ptr, Some(guard))
        }
        None => (0, None),
    }
}

/// Rotates ragged queries `[token][num_qo_heads][head_dim]` and keys
/// `[token][num_kv_heads][head_dim]` (FlashInfer's `apply_rope*`): planned once for a batch's
/// positions (validated and uploaded without waiting for the GPU), run once per layer.
///
/// ```no_run
/// use ferrinfer::{f16, Device, RopeOptions, RopePlan, RopePositions, RopeShape};
///
/// let dev = Device::new(0)?;
/// let shape = RopeShape { num_qo_heads: 32, num_kv_heads: 8, head_dim: 128 };
/// // Two requests: 3 new tokens from position 100, 1 from position 7.
/// let positions = RopePositions::Ragged { indptr: &[0, 3, 4], offsets: &[100, 7] };
/// let plan = RopePlan::new(&dev, shape, positions, RopeOptions::llama31())?;
/// let mut q = dev.alloc_zeros::<f16>(plan.q_elems())?;
/// let mut k = dev.alloc_zeros::<f16>(plan.k_elems())?;
/// plan.run(dev.stream(), &mut q, &mut k, None)?; // in place
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct RopePlan(Rotation);

impl RopePlan {
    /// Validates `shape`, `options` and every position (an `Err` names the first bad one),
    /// and uploads the positions and frequencies.
    pub fn new(device: &Device, shape: RopeShape, positions: RopePositions<'_>, options: RopeOptions) -> Result<Self> {
        let positions = positions.resolve()?;
        let heads = [shape.num_qo_heads, shape.num_kv_heads, 0];
        Ok(RopePlan(Rotation::new(device, heads, shape.head_dim, &positions, &options, &[])?))
    }

    /// Tokens (rows) of the batch.
    pub fn tokens(&self) -> usize {
        self.0.tokens
    }

    /// Elements of the queries: `tokens × num_qo_heads × head_dim`.
    pub fn q_elems(&self) -> usize {
        self.0.elems(0)
    }

    /// Elements of the keys: `tokens × num_kv_heads × head_dim`.
    pub fn k_elems(&self) -> usize {
        self.0.elems(1)
    }

    /// Rotates `q` and `k` (f16 or bf16, cudarc slices or views of the plan's lengths, 16-byte
    /// aligned) in place on `stream`; dims from `rotary_dim` on are not touched. A plan with
    /// [`RopeAngles::CosSinCache`] takes the cache here, `max_position × rotary_dim` values.
    pub fn run<T: KvDType>(
        &self,
        stream: &CudaStream,
        q: &mut impl DevicePtrMut<T>,
        k: &mut impl DevicePtrMut<T>,
        cos_sin_cache: Option<&dyn DevicePtr<f32>>,
    ) -> Result<()> {
        let rot = &self.0;
        let kernel = rot.check::<T>(stream, cos_sin_cache)?;
        let device = rot.core.device();
        device.check_buffer("q", &*q)?;
        device.check_buffer("k", &*k)?;
        check_lengths(&[("q", q.len(), rot.elems(0)), ("k", k.len(), rot.elems(1))])?;
        let (q, _g0) = q.device_ptr_mut(stream);
        let (k, _g1) = k.device_ptr_mut(stream);
        let (q, k) = (aligned("q", q)?, aligned("k", k)?);
        let (cos_sin, _g2) = cache_ptr(cos_sin_cache, stream);
        let (parts, _g3) = rot.core.metadata_on(stream)?;
        let in_place = |at| RopeTensor { src: at, dst: at, rotate: 1, ..Default::default() };
        // SAFETY: q and k were checked to hold the plan's elements, be aligned and live in its
        // context; the positions were checked against the cos/sin cache, which was checked
        // against the plan; every buffer outlives the enqueueing (guards above).
        unsafe { rot.launch(kernel, stream, [in_place(q), in_place(k), RopeTensor::default()], &parts, cos_sin, 0) }
    }

    /// Writes the rotated `q` and `k` to `q_out` and `k_out` (dims from `rotary_dim` on
    /// copied), as [`run`](Self::run) otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn run_out_of_place<T: KvDType>(
        &self,
        stream: &CudaStream,
        q: &impl DevicePtr<T>,
        k: &impl DevicePtr<T>,
        q_out: &mut impl DevicePtrMut<T>,
        k_out: &mut impl DevicePtrMut<T>,
        cos_sin_cache: Option<&dyn DevicePtr<f32>>,
    ) -> Result<()> {
        let rot = &self.0;
        let kernel = rot.check::<T>(stream, cos_sin_cache)?;
        let device = rot.core.device();
        device.check_buffer("q", q)?;
        device.check_buffer("k", k)?;
        device.check_buffer("q_out", &*q_out)?;
        device.check_buffer("k_out", &*k_out)?;
        let (nq, nk) = (rot.elems(0), rot.elems(1));
        check_lengths(&[
            ("q", q.len(), nq),
            ("k", k.len(), nk),
            ("q_out", q_out.len(), nq),
            ("k_out", k_out.len(), nk),
        ])?;
        let (q, _g0) = q.device_ptr(stream);
        let (k, _g1) = k.device_ptr(stream);
        let (q_out, _g2) = q_out.device_ptr_mut(stream);
        let (k_out, _g3) = k_out.device_ptr_mut(stream);
        let tensor = |what_src, src, what_dst, dst| -> Result<RopeTensor> {
            Ok(RopeTensor {
                src: aligned(what_src, src)?,
                dst: aligned(what_dst, dst)?,
                rotate: 1,
                copy_tail: 1,
                ..Default::default()
            })
        };
        let tensors = [tensor("q", q, "q_out", q_out)?, tensor("k", k, "k_out", k_out)?, RopeTensor::default()];
        let (cos_sin, _g4) = cache_ptr(cos_sin_cache, stream);
        let (parts, _g5) = rot.core.metadata_on(stream)?;
        // SAFETY: as in `run`; the outputs are distinct buffers (borrowed mutably) of the
        // inputs' lengths.
        unsafe { rot.launch(kernel, stream, tensors, &parts, cos_sin, 0) }
    }
}

/// RoPE fused into the append (FlashInfer's `append_paged_kv_cache` after `apply_rope`, in one
/// launch): sequence `i` appends ragged rows `append_indptr[i]..append_indptr[i + 1]` as its
/// last tokens, their keys rotated for their positions in the sequence
/// (`kv_len(i) − append_len(i)` on) as they are written, values copied, and the same tokens'
/// queries rotated in place. Any page size and either layout; the cache holds the ragged type.
///
/// ```no_run
/// use ferrinfer::{f16, AppendRopePlan, CacheShape, Device, KvLayout, PagedKvCache, PageTable, RopeOptions};
///
/// let dev = Device::new(0)?;
/// let shape = CacheShape { num_pages: 16, page_size: 7, num_kv_heads: 8, head_dim: 128, layout: KvLayout::Nhd };
/// let mut cache = PagedKvCache::<f16>::new(&dev, shape, 1)?;
/// // One sequence of 10 tokens after appending 4.
/// let table = PageTable { kv_indptr: vec![0, 2], kv_indices: vec![4, 1], kv_last_page_len: vec![3] };
/// let plan = AppendRopePlan::new(&dev, &shape, &table, &[0, 4], 32, RopeOptions::default())?;
/// let mut q = dev.alloc_zeros::<f16>(plan.q_elems())?;
/// let (k, v) = (dev.alloc_zeros::<f16>(plan.ragged_elems())?, dev.alloc_zeros::<f16>(plan.ragged_elems())?);
/// plan.run(dev.stream(), &mut q, &k, &v, &mut cache, 0, None)?; // positions 6..10
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct AppendRopePlan {
    rot: Rotation,
    shape: CacheShape,
}

impl AppendRopePlan {
    /// Validates the append as [`ScatterPlan::append`](crate::ScatterPlan::append) does, and
    /// `options` and the positions as [`RopePlan::new`] does; the queries have `num_qo_heads`
    /// heads of the cache's `head_dim`.
    pub fn new(
        device: &Device,
        shape: &CacheShape,
        table: &PageTable,
        append_indptr: &[u32],
        num_qo_heads: usize,
        options: RopeOptions,
    ) -> Result<Self> {
        let first_pos = append_first_positions(shape, table, append_indptr)?;
        let mut positions = Vec::new();
        for (&first, kv_len) in first_pos.iter().zip(table.kv_lens(shape.page_size)) {
            positions.extend((first..kv_len).map(|p| p as u64));
        }
        let offsets = row_offsets(shape, table, &first_pos);
        let heads = [num_qo_heads, shape.num_kv_heads, shape.num_kv_heads];
        let rot = Rotation::new(device, heads, shape.head_dim, &positions, &options, &offsets)?;
        Ok(AppendRopePlan { rot, shape: *shape })
    }

    /// Tokens appended.
    pub fn tokens(&self) -> usize {
        self.rot.tokens
    }

    /// Elements of the queries: `tokens × num_qo_heads × head_dim`.
    pub fn q_elems(&self) -> usize {
        self.rot.elems(0)
    }

    /// Elements of each of the ragged K and V: `tokens × num_kv_heads × head_dim`.
    pub fn ragged_elems(&self) -> usize {
        self.rot.elems(1)
    }

    /// Rotates `q` in place and writes `k` rotated and `v` as it is into layer `layer` of
    /// `cache` on `stream` (f16 or bf16 throughout, ragged buffers 16-byte aligned). A plan
    /// with [`RopeAngles::CosSinCache`] takes the cache here.
    #[allow(clippy::too_many_arguments)]
    pub fn run<T: KvDType>(
        &self,
        stream: &CudaStream,
        q: &mut impl DevicePtrMut<T>,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        cache: &mut PagedKvCache<T>,
        layer: usize,
        cos_sin_cache: Option<&dyn DevicePtr<f32>>,
    ) -> Result<()> {
        let rot = &self.rot;
        let kernel = rot.check::<T>(stream, cos_sin_cache)?;
        let device = rot.core.device();
        device.check_buffer("q", &*q)?;
        device.check_buffer("ragged K", k)?;
        device.check_buffer("ragged V", v)?;
        let n = rot.elems(1);
        check_lengths(&[("q", q.len(), rot.elems(0)), ("ragged K", k.len(), n), ("ragged V", v.len(), n)])?;
        // The cache holds the ragged type: 16 bits, nothing to dequantise.
        let (k_pool, v_pool, _) = cache.pools_for_mut(device, &self.shape, layer)?;
        let (k_pages, _g0) = k_pool.device_ptr_mut(stream);
        let (v_pages, _g1) = v_pool.device_ptr_mut(stream);
        let (q, _g2) = q.device_ptr_mut(stream);
        let (k, _g3) = k.device_ptr(stream);
        let (v, _g4) = v.device_ptr(stream);
        let q = aligned("q", q)?;
        let paged = |what, src, dst, rotate| -> Result<RopeTensor> {
            Ok(RopeTensor { src: aligned(what, src)?, dst, paged: 1, rotate, copy_tail: 1, ..Default::default() })
        };
        let tensors = [
            RopeTensor { src: q, dst: q, rotate: 1, ..Default::default() },
            paged("ragged K", k, k_pages, 1)?,
            paged("ragged V", v, v_pages, 0)?,
        ];
        let (cos_sin, _g5) = cache_ptr(cos_sin_cache, stream);
        let (parts, _g6) = rot.core.metadata_on(stream)?;
        // SAFETY: the table was validated against the cache's shape (and its writes found
        // disjoint) when planning, so every row offset plus a token's heads lies in a pool, and
        // the pools were checked to have that shape's length; q and the ragged buffers were
        // checked against the plan, are aligned and live in its context; the positions were
        // checked against the cos/sin cache, checked against the plan; every buffer outlives
        // the enqueueing (guards above).
        unsafe { rot.launch(kernel, stream, tensors, &parts, cos_sin, self.shape.strides().1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::abi::rope_angle;

    /// The kernel's angle reduction, run here with the same IEEE operations, against the f64
    /// angle mod 2π: within 2⁻²¹ for every position up to 131072, at every frequency of
    /// head_dim 128 with theta 1e4 and 5e5 and with Llama 3.1 scaling (and 2⁻²⁴-spaced
    /// frequencies near 1, the largest angles).
    #[test]
    fn reduced_angles_are_within_2_pow_minus_21_of_the_f64_angle_up_to_position_131072() {
        let mut freqs = Vec::new();
        for angles in [
            RopeAngles::Standard { rope_theta: 1e4, rope_scale: 1.0 },
            RopeAngles::Standard { rope_theta: 5e5, rope_scale: 1.0 },
            RopeOptions::llama31().angles,
        ] {
            freqs.extend(frequencies(&angles, 128).unwrap().unwrap());
        }
        freqs.extend([1.0, 1.0 - 3e-8, 0.999_999_9, 0.5 + 1e-9]);
        let mut worst = 0.0f64;
        // Every position for a spread of frequencies; every 7th position for the rest.
        for (n, &f) in freqs.iter().enumerate() {
            let step = if n % 16 == 0 || n >= freqs.len() - 4 { 1 } else { 7 };
            let parts = split(f);
            for pos in (0..=131072u32).step_by(step) {
                let got = rope_angle(pos as f32, parts, f32::mul_add, f32::round_ties_even) as f64;
                let want = (pos as f64 * f).rem_euclid(std::f64::consts::TAU);
                let diff = (got - want).rem_euclid(std::f64::consts::TAU);
                let err = diff.min(std::f64::consts::TAU - diff);
                worst = worst.max(err);
                assert!(got.abs() < 3.2, "reduced angle {got} of position {pos}, frequency {f}");
            }
        }
        assert!(worst <= 2f64.powi(-21), "worst angle error {worst:e}");
    }

    #[test]
    fn frequencies_follow_flashinfer_and_llama31_bands() {
        let f = frequencies(&RopeAngles::Standard { rope_theta: 1e4, rope_scale: 2.0 }, 8).unwrap().unwrap();
        let want = [0.5, 0.05, 0.005, 0.0005];
        for (g, w) in f.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{g} {w}");
        }
        // Llama 3.1: wavelengths below 8192/4 unscaled, above 8192/1 divided by 8.
        let f = frequencies(&RopeOptions::llama31().angles, 128).unwrap().unwrap();
        let base = |i: usize| 5e5f64.powf(-2.0 * i as f64 / 128.0);
        assert_eq!(f[0], base(0));
        assert!((f[63] - base(63) / 8.0).abs() < 1e-18);
        assert!(f.windows(2).all(|w| w[1] < w[0]), "frequencies decrease");
    }

    #[test]
    fn bad_options_are_errors() {
        let bad = |angles| frequencies(&angles, 64).is_err();
        assert!(bad(RopeAngles::Standard { rope_theta: 0.0, rope_scale: 1.0 }));
        assert!(bad(RopeAngles::Standard { rope_theta: 1e4, rope_scale: f64::NAN }));
        let RopeAngles::Llama31 { rope_theta, rope_scale, old_context_len, .. } = RopeOptions::llama31().angles else {
            unreachable!()
        };
        assert!(bad(RopeAngles::Llama31 {
            rope_theta,
            rope_scale,
            low_freq_factor: 4.0,
            high_freq_factor: 4.0,
            old_context_len
        }));
        for (rd, hd) in [(0, 64), (3, 64), (66, 64)] {
            let o = RopeOptions { rotary_dim: Some(rd), ..Default::default() };
            assert!(matches!(o.rotary_dim(hd), Err(Error::RotaryDim { .. })), "{rd} of {hd}");
        }
        assert_eq!(RopeOptions::default().rotary_dim(96).unwrap(), 96);
    }

    #[test]
    fn ragged_positions_count_from_each_offset() {
        let p = RopePositions::Ragged { indptr: &[0, 2, 2, 5], offsets: &[10, 0, 131070] }.resolve().unwrap();
        assert_eq!(p, [10, 11, 131070, 131071, 131072]);
        assert!(RopePositions::Ragged { indptr: &[0, 2, 1], offsets: &[0, 0] }.resolve().is_err());
        assert!(RopePositions::Ragged { indptr: &[0, 2], offsets: &[0, 0] }.resolve().is_err());
    }
}
