//! Merging attention states (FlashInfer's `merge_state`, `merge_state_in_place` and
//! `merge_states`): attention outputs over disjoint sets of keys, each with its base-2 LSE
//! `log2 Σ exp(s)`, combine into the output over all the keys:
//! `v = Σ_k 2^(s_k − s) v_k`, `s = log2 Σ_k 2^(s_k)`. An empty state (LSE −∞) contributes
//! nothing; all empty gives zeros and −∞. Cascade attention merges a shared prefix's result with
//! each request's own this way. Every LSE ferrinfer's kernels return is in this base.
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use crate::cache::layout::MAX_INDEX;
use crate::error::{Error, Result};
use crate::plan::check_lengths;
use crate::runtime::abi::{merge_rows_per_warp, MergeStatesParams, MERGE_THREADS};
use crate::runtime::device::{launch_config, Device, LaunchStream};
use crate::runtime::dtype::KvDType;

/// Heads and head_dim of the states, checked once.
#[derive(Clone, Copy, Debug)]
pub struct StateShape {
    /// Attention heads per token.
    pub heads: usize,
    /// Elements per head: a multiple of 8 (16-byte rows).
    pub head_dim: usize,
}

impl StateShape {
    /// Tokens of an LSE buffer of `lse_len` entries per state, after checking the shape.
    fn tokens(&self, lse_len: usize, num_states: usize) -> Result<usize> {
        if self.heads == 0 || num_states == 0 {
            return Err(Error::ZeroDimension { what: "heads and num_states" });
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) {
            return Err(Error::UnalignedHeadDim {
                head_dim: self.head_dim,
                dtype: "f16/bf16",
                bytes: 2 * self.head_dim,
            });
        }
        let rows = lse_len / num_states;
        if rows * num_states != lse_len || !rows.is_multiple_of(self.heads) {
            return Err(Error::BufferLength {
                what: "lse",
                got: lse_len,
                expected: rows.div_ceil(self.heads) * self.heads * num_states,
            });
        }
        if rows > MAX_INDEX {
            return Err(Error::TooLarge { what: "merged rows (tokens × heads)", value: rows, max: MAX_INDEX });
        }
        Ok(rows / self.heads)
    }
}

/// Merges state `a` and state `b` (`v`: `[tokens][heads][head_dim]`, `s`: `[tokens][heads]`)
/// into `v_out` and, if given, `s_out`.
#[allow(clippy::too_many_arguments)]
pub fn merge_state<T: KvDType>(
    device: &Device,
    stream: &CudaStream,
    shape: StateShape,
    v_a: &impl DevicePtr<T>,
    s_a: &impl DevicePtr<f32>,
    v_b: &impl DevicePtr<T>,
    s_b: &impl DevicePtr<f32>,
    v_out: &mut impl DevicePtrMut<T>,
    s_out: Option<&mut dyn DevicePtrMut<f32>>,
) -> Result<()> {
    check_contexts(device, stream, &[("v_a", v_a.stream()), ("s_a", s_a.stream()), ("v_b", v_b.stream())])?;
    check_contexts(device, stream, &[("s_b", s_b.stream()), ("v_out", v_out.stream())])?;
    if let Some(s) = &s_out {
        check_contexts(device, stream, &[("s_out", s.stream())])?;
    }
    let tokens = shape.tokens(s_a.len(), 1)?;
    let elems = tokens * shape.heads * shape.head_dim;
    let rows = tokens * shape.heads;
    check_lengths(&[
        ("v_a", v_a.len(), elems),
        ("s_b", s_b.len(), rows),
        ("v_b", v_b.len(), elems),
        ("v_out", v_out.len(), elems),
        ("s_out", s_out.as_ref().map_or(rows, |s| s.len()), rows),
    ])?;
    let ((va, _g0), (sa, _g1), (vb, _g2), (sb, _g3)) =
        (v_a.device_ptr(stream), s_a.device_ptr(stream), v_b.device_ptr(stream), s_b.device_ptr(stream));
    let (out, _g4) = v_out.device_ptr_mut(stream);
    let (s_out, _g5) = optional_ptr_mut(stream, s_out);
    let params = two_states::<T>(shape, tokens, [va, sa, vb, sb], out, s_out);
    // SAFETY: both states and the outputs hold `tokens` rows (checked), and live until after
    // the launch (guards above).
    unsafe { launch::<T>(device, stream, &params) }
}

/// [`merge_state`] into state `a`'s own buffers (`v`, `s`).
pub fn merge_state_in_place<T: KvDType>(
    device: &Device,
    stream: &CudaStream,
    shape: StateShape,
    v: &mut (impl DevicePtrMut<T> + ?Sized),
    s: &mut (impl DevicePtrMut<f32> + ?Sized),
    v_other: &impl DevicePtr<T>,
    s_other: &impl DevicePtr<f32>,
) -> Result<()> {
    check_contexts(device, stream, &[("v", v.stream()), ("s", s.stream())])?;
    check_contexts(device, stream, &[("v_other", v_other.stream()), ("s_other", s_other.stream())])?;
    let tokens = shape.tokens(s.len(), 1)?;
    let (elems, rows) = (tokens * shape.heads * shape.head_dim, tokens * shape.heads);
    check_lengths(&[("v", v.len(), elems), ("v_other", v_other.len(), elems), ("s_other", s_other.len(), rows)])?;
    let ((vb, _g2), (sb, _g3)) = (v_other.device_ptr(stream), s_other.device_ptr(stream));
    let (va, _g0) = v.device_ptr_mut(stream);
    let (sa, _g1) = s.device_ptr_mut(stream);
    let params = two_states::<T>(shape, tokens, [va, sa, vb, sb], va, sa);
    // SAFETY: as `merge_state`; the kernel reads each slice and LSE before writing it.
    unsafe { launch::<T>(device, stream, &params) }
}

/// Merges `num_states` states per row, `v`: `[tokens][num_states][heads][head_dim]`, `s`:
/// `[tokens][num_states][heads]`, into `v_out` (`[tokens][heads][head_dim]`) and, if given,
/// `s_out` (`[tokens][heads]`).
#[allow(clippy::too_many_arguments)]
pub fn merge_states<T: KvDType>(
    device: &Device,
    stream: &CudaStream,
    shape: StateShape,
    num_states: usize,
    v: &impl DevicePtr<T>,
    s: &impl DevicePtr<f32>,
    v_out: &mut impl DevicePtrMut<T>,
    s_out: Option<&mut dyn DevicePtrMut<f32>>,
) -> Result<()> {
    check_contexts(device, stream, &[("v", v.stream()), ("s", s.stream()), ("v_out", v_out.stream())])?;
    if let Some(s) = &s_out {
        check_contexts(device, stream, &[("s_out", s.stream())])?;
    }
    let tokens = shape.tokens(s.len(), num_states)?;
    let (elems, rows) = (tokens * shape.heads * shape.head_dim, tokens * shape.heads);
    check_lengths(&[
        ("v", v.len(), elems * num_states),
        ("v_out", v_out.len(), elems),
        ("s_out", s_out.as_ref().map_or(rows, |s| s.len()), rows),
    ])?;
    let ((v, _g0), (s, _g1)) = (v.device_ptr(stream), s.device_ptr(stream));
    let (out, _g2) = v_out.device_ptr_mut(stream);
    let (s_out, _g3) = optional_ptr_mut(stream, s_out);
    let params = merge_states_params(shape, num_states, tokens, [v, s, out, s_out]);
    // SAFETY: every buffer was checked against the shape and lives until after the launch.
    unsafe { launch::<T>(device, stream, &params) }
}

/// The parameter block of [`merge_states`] over `tokens` tokens of `num_states` states in one
/// buffer each (`v` `[tokens][num_states][heads][head_dim]`, `s` `[tokens][num_states][heads]`)
/// into `out` and `s_out` (0 for none): what its launch passes (and, through `internals`, what
/// the CPU emulator's launch passes).
pub fn merge_states_params(
    shape: StateShape,
    num_states: usize,
    tokens: usize,
    [v, s, out, s_out]: [u64; 4],
) -> MergeStatesParams {
    let (row, heads) = ((shape.heads * shape.head_dim) as i64, shape.heads as i64);
    MergeStatesParams {
        v,
        s,
        v_out: out,
        s_out,
        token_stride: num_states as i64 * row,
        state_stride: row,
        s_token_stride: num_states as i64 * heads,
        s_state_stride: heads,
        tokens: tokens as u32,
        heads: shape.heads as u32,
        num_states: num_states as u32,
        head_dim: shape.head_dim as u32,
    }
}

/// Blocks of a merge-states launch over `params` (of `MERGE_THREADS` threads, no shared memory).
pub fn merge_states_blocks(params: &MergeStatesParams) -> u32 {
    let rows_per_block = MERGE_THREADS / 32 * merge_rows_per_warp(params.head_dim);
    (params.tokens * params.heads).div_ceil(rows_per_block)
}

/// Two separate buffers as states 0 and 1 of one view: state 1 sits `b − a` bytes after
/// state 0 (a signed distance, whole elements since both are element-aligned).
fn two_states<T: KvDType>(
    shape: StateShape,
    tokens: usize,
    [va, sa, vb, sb]: [u64; 4],
    out: u64,
    s_out: u64,
) -> MergeStatesParams {
    let elems_between = |a: u64, b: u64, size: usize| b.wrapping_sub(a) as i64 / size as i64;
    MergeStatesParams {
        v: va,
        s: sa,
        v_out: out,
        s_out,
        token_stride: (shape.heads * shape.head_dim) as i64,
        state_stride: elems_between(va, vb, T::DTYPE.size_bytes()),
        s_token_stride: shape.heads as i64,
        s_state_stride: elems_between(sa, sb, 4),
        tokens: tokens as u32,
        heads: shape.heads as u32,
        num_states: 2,
        head_dim: shape.head_dim as u32,
    }
}

/// `Ok` when `stream` and every buffer (given by its cudarc stream) belong to `device`.
fn check_contexts(device: &Device, stream: &CudaStream, buffers: &[(&'static str, &CudaStream)]) -> Result<()> {
    device.check_stream(stream)?;
    buffers.iter().try_for_each(|&(what, s)| device.check_context(what, s.context()))
}

/// The address of an optional output (0 when absent) and its stream-ordering guard.
fn optional_ptr_mut<'a, 'b: 'a>(
    stream: &'a CudaStream,
    buffer: Option<&'a mut (dyn DevicePtrMut<f32> + 'b)>,
) -> (u64, Option<SyncOnDrop<'a>>) {
    match buffer {
        Some(b) => {
            let (p, g) = b.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// # Safety
/// `params` addresses only inside live buffers of this device.
unsafe fn launch<T: KvDType>(device: &Device, stream: &CudaStream, params: &MergeStatesParams) -> Result<()> {
    let kernel = device.kernels().merge_states(T::DTYPE)?;
    let rows = params.tokens * params.heads;
    if rows == 0 {
        return Ok(());
    }
    let cfg = launch_config((merge_states_blocks(params), 1), MERGE_THREADS, 0);
    device.launch(&kernel.function, cfg, LaunchStream::Cudarc(stream), params, "merging attention states")
}
