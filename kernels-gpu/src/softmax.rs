//! Online softmax over m16n8k16 accumulator fragments, shared by decode and prefill.
//!
//! A warp holds a 16-row tile; each thread holds rows `g = lane / 4` and `g + 8` of it, and of
//! every 8-key n-fragment of logits `s[n]` the entries `[2h]`, `[2h + 1]` of row `g + 8h`
//! (the C layout of `mma.sync`). Logits are base 2 (log2 e folded into the scale), so one
//! `ex2` per probability; the LSE this yields is base 2, as FlashInfer's.
use crate::gpu::half::Half;
use crate::gpu::math::{computed_here, exp2, fma, log2, rcp};
use crate::gpu::warp::{any, shfl_xor_f32};

const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// Maximum over the four lanes of a quad (the lanes holding one row of an mma tile).
#[inline(always)]
pub fn quad_max(x: f32) -> f32 {
    let x = x.max(shfl_xor_f32(x, 1));
    x.max(shfl_xor_f32(x, 2))
}

/// Sum over the four lanes of a quad.
#[inline(always)]
pub fn quad_sum(x: f32) -> f32 {
    let x = x + shfl_xor_f32(x, 1);
    x + shfl_xor_f32(x, 2)
}

/// Raw dot products to base-2 logits: `pre · dot`, or with a soft cap
/// `post · tanh'(pre · dot)` where `cap · tanh(x / cap)` is computed as
/// `cap · (1 − 2 / (e^{2x / cap} + 1))`, with log2 e folded into both factors.
pub struct LogitScale {
    /// The logits are finished here (a soft cap, or a scale that is not positive), not by a
    /// factor in the exponent.
    in_place: bool,
    soft_cap: bool,
    pre: f32,
    post: f32,
}

impl LogitScale {
    #[inline(always)]
    pub fn new(sm_scale: f32, logits_soft_cap: f32) -> Self {
        let cap = logits_soft_cap;
        if cap > 0.0 {
            LogitScale { in_place: true, soft_cap: true, pre: 2.0 * LOG2_E * sm_scale / cap, post: cap * LOG2_E }
        } else {
            let pre = sm_scale * LOG2_E;
            LogitScale { in_place: pre <= 0.0, soft_cap: false, pre, post: 0.0 }
        }
    }

    /// Turns a tile of `N` n-fragments of raw dot products into base-2 logits up to a positive
    /// factor, which it returns for [`RowState::update`] to fold into its exponent: one fused
    /// multiply-add per element there instead of a multiply here. A soft cap, or a scale that
    /// is not positive (where masking to −∞ must follow the scaling), finishes the logits in
    /// place and returns 1. Which case applies is uniform; the common one costs one branch.
    #[inline(always)]
    pub fn apply<const N: usize>(&self, s: &mut [[f32; 4]; N]) -> f32 {
        if !self.in_place {
            return self.pre;
        }
        if self.soft_cap {
            crate::unroll_to!(n < N, {
                crate::unroll!(c in [0, 1, 2, 3] {
                    s[n][c] = self.post * (1.0 - 2.0 * rcp(exp2(self.pre * s[n][c]) + 1.0));
                });
            });
        } else {
            crate::unroll_to!(n < N, {
                crate::unroll!(c in [0, 1, 2, 3] {
                    s[n][c] *= self.pre;
                });
            });
        }
        1.0
    }
}

/// How far (base 2) a row's maximum may rise above the reference maximum of its running sums
/// before the sums and O are rescaled to it.
pub const RESCALE_MARGIN: f32 = 8.0;

/// Reference maximum `m` (at most [`RESCALE_MARGIN`] below the true running maximum) and sum of
/// rows `g` and `g + 8`.
///
/// Each lane adds its own f32 probabilities and the quad's lanes are summed at the end.
/// FlashInfer takes f16 sums on the tensor cores instead (an mma of P with a B fragment of ones:
/// fewer instructions, but four more registers and four dependent mma a tile); in prefill, at
/// 255 registers, the registers weigh more (docs/perf.md).
pub struct RowState {
    pub m: [f32; 2],
    /// This lane's share of row `g + 8h`'s sum.
    sums: [f32; 2],
}

impl RowState {
    #[inline(always)]
    pub const fn new() -> Self {
        RowState { m: [f32::NEG_INFINITY; 2], sums: [0.0; 2] }
    }

    /// The sum of row `g + 8h`'s probabilities so far, relative to `m[h]`.
    #[inline(always)]
    pub fn row_sum(&self, h: usize) -> f32 {
        quad_sum(self.sums[h])
    }

    /// Folds a tile of base-2 logits, `factor · s` (`N` n-fragments, masked keys at −∞;
    /// `factor` from [`LogitScale::apply`], positive), into the state,
    /// rescaling the first `out_frags` output n-fragments of `acc` when needed (below), and
    /// returns P as `K = N / 2` A fragments for P·V (fragment `kb`: keys `16 kb..16 kb + 16`).
    ///
    /// Rescaling O costs as much as the rest of the update, so it is skipped (for the whole warp
    /// at once, a warp-uniform branch) unless a row's maximum passes the one its sums are
    /// relative to by more than [`RESCALE_MARGIN`]; the probabilities then reach at most
    /// 2^`RESCALE_MARGIN`, harmless in f32 sums and in f16/bf16 P. With typical attention logits
    /// only a row's first tile rescales (FlashAttention-4 uses the same margin).
    #[inline(always)]
    pub fn update<H: Half, const N: usize, const K: usize>(
        &mut self,
        s: &[[f32; 4]; N],
        factor: f32,
        acc: &mut [[[f32; 4]; 2]; 16],
        out_frags: u32,
    ) -> [[u32; 4]; K] {
        self.update_rescaling::<H, N, K>(s, N, factor, |h, rescale| {
            crate::unroll_to!(n < out_frags, {
                acc[n / 2][n % 2][2 * h] *= rescale;
                acc[n / 2][n % 2][2 * h + 1] *= rescale;
            });
        })
    }

    /// [`update`](Self::update) for any accumulator layout: `rescale_rows(h, factor)` multiplies
    /// the thread's output accumulators of row `g + 8h` by `factor`. Only the first `live`
    /// n-fragments (even, a constant where inlined) hold logits: the others count as masked,
    /// and their probabilities are neither computed nor returned (left zero).
    #[inline(always)]
    pub fn update_rescaling<H: Half, const N: usize, const K: usize>(
        &mut self,
        s: &[[f32; 4]; N],
        live: usize,
        factor: f32,
        rescale_rows: impl FnMut(usize, f32),
    ) -> [[u32; 4]; K] {
        self.update_sharing_max::<H, N, K>(s, live, factor, |m| m, rescale_rows)
    }

    /// [`update_rescaling`](Self::update_rescaling) for rows whose tile of keys is split over
    /// several warps (MLA's): `tile_max(own)` turns the maxima of the thread's rows over this
    /// warp's keys into those over the whole tile (exchanged with the other warps), so that
    /// every warp of a row keeps the same reference maximum and their sums add up.
    #[inline(always)]
    pub fn update_sharing_max<H: Half, const N: usize, const K: usize>(
        &mut self,
        s: &[[f32; 4]; N],
        live: usize,
        factor: f32,
        tile_max: impl FnOnce([f32; 2]) -> [f32; 2],
        mut rescale_rows: impl FnMut(usize, f32),
    ) -> [[u32; 4]; K] {
        const { assert!(N == 2 * K && N <= 16) };
        // Pairwise, so that the chain of dependent max instructions between the last mma of S
        // and the exponentials is log2 N deep rather than 2N.
        let row_max = |h: usize| {
            let mut x = [0.0f32; N];
            crate::unroll_to!(n < live.min(N), {
                x[n] = s[n][2 * h].max(s[n][2 * h + 1]);
            });
            crate::unroll!(width in [8, 4, 2, 1] {
                crate::unroll_to!(n < width, {
                    if n + width < live.min(N) {
                        x[n] = x[n].max(x[n + width]);
                    }
                });
            });
            quad_max(x[0]) * factor
        };
        let tile_max = tile_max([row_max(0), row_max(1)]);
        let m_new = [self.m[0].max(tile_max[0]), self.m[1].max(tile_max[1])];
        // All keys so far masked: keep everything at zero rather than computing −∞ − −∞.
        let finite = |m: [f32; 2]| m.map(|x| if x == f32::NEG_INFINITY { 0.0 } else { x });
        if any(m_new[0] > self.m[0] + RESCALE_MARGIN || m_new[1] > self.m[1] + RESCALE_MARGIN) {
            let m_ref = finite(m_new);
            crate::unroll!(h in [0, 1] {
                let rescale = exp2(self.m[h] - m_ref[h]);
                self.sums[h] *= rescale;
                rescale_rows(h, rescale);
            });
            self.m = m_new;
        }
        let mut probs = [[0u32; 4]; K];
        self.sums = exponentials::<H, N, K>(s, live, factor, finite(self.m), self.sums, &mut probs);
        probs
    }

    /// [`update_rescaling`](Self::update_rescaling) without the tile's maxima where they are not
    /// needed: the probabilities are computed against the reference maxima the sums already
    /// have, and kept if none passes 2^[`RESCALE_MARGIN`] (each lane's sum of its own bounds
    /// them, so one comparison a row and a vote test it). Only otherwise, and for rows without
    /// a reference yet (a unit's first tile), are the maxima computed (a tree of `max`, two
    /// shuffles) and everything done as `update_rescaling` does, the probabilities again. Where
    /// the softmax's latency is the tile's (the Hopper prefill's ping-pong: the other
    /// warpgroup's products wait for it) this takes the maxima's chain out of nearly every tile.
    #[inline(always)]
    pub fn update_speculating<H: Half, const N: usize, const K: usize>(
        &mut self,
        s: &[[f32; 4]; N],
        live: usize,
        factor: f32,
        rescale_rows: impl FnMut(usize, f32),
    ) -> [[u32; 4]; K] {
        const { assert!(N == 2 * K && N <= 16) };
        const LIMIT: f32 = 256.0;
        const { assert!(LIMIT == (1u32 << RESCALE_MARGIN as u32) as f32) };
        if !any(self.m[0] == f32::NEG_INFINITY || self.m[1] == f32::NEG_INFINITY) {
            let mut probs = [[0u32; 4]; K];
            let sums = exponentials::<H, N, K>(s, live, factor, self.m, [0.0; 2], &mut probs);
            // Packed here, not after the test (only the path that keeps them uses them): the
            // 16-bit pairs take half the registers of the f32 values, beside S and O.
            crate::unroll_to!(kb < K, {
                probs[kb] = computed_here(probs[kb]);
            });
            if !any(sums[0] > LIMIT || sums[1] > LIMIT) {
                self.sums = [self.sums[0] + sums[0], self.sums[1] + sums[1]];
                return probs;
            }
        }
        self.update_rescaling::<H, N, K>(s, live, factor, rescale_rows)
    }

    /// Moves the state to reference maxima `m` that another warp's [`update_rescaling`]
    /// (Self::update_rescaling) reached from this state's (so `m ≥ self.m`; MLA's warpgroups
    /// taking turns at the tiles): the sums, and through `rescale_rows(h, factor)` the output
    /// of row `g + 8h`, by `2^(self.m − m)` where they differ (0 from a state without keys).
    #[inline(always)]
    pub fn adopt_max(&mut self, m: [f32; 2], mut rescale_rows: impl FnMut(usize, f32)) {
        crate::unroll!(h in [0, 1] {
            if m[h] != self.m[h] {
                let rescale = exp2(self.m[h] - m[h]);
                self.sums[h] *= rescale;
                rescale_rows(h, rescale);
                self.m[h] = m[h];
            }
        });
    }
}

/// The probabilities `2^(factor · s − m_ref)` of the first `live` n-fragments of `s` as P's A
/// fragments in `probs`, and `sums` plus this lane's share of each row's sum of them.
#[inline(always)]
fn exponentials<H: Half, const N: usize, const K: usize>(
    s: &[[f32; 4]; N],
    live: usize,
    factor: f32,
    m_ref: [f32; 2],
    mut sums: [f32; 2],
    probs: &mut [[u32; 4]; K],
) -> [f32; 2] {
    crate::unroll!(h in [0, 1] {
        crate::unroll_to!(kb < live.min(N) / 2, {
            let p = |x: f32| exp2(fma(x, factor, -m_ref[h]));
            let e = [p(s[2 * kb][2 * h]), p(s[2 * kb][2 * h + 1]), p(s[2 * kb + 1][2 * h]), p(s[2 * kb + 1][2 * h + 1])];
            sums[h] += (e[0] + e[1]) + (e[2] + e[3]);
            // A fragment of P: (row g + 8h, keys 2t, 2t + 1) of each 8-key half.
            probs[kb][h] = H::pack2(e[0], e[1]);
            probs[kb][2 + h] = H::pack2(e[2], e[3]);
        });
    });
    sums
}

/// The base-2 sink logit of query head `head` from `sinks` (`*const f32` of natural-log logits,
/// `DecodeParams::sinks`), or −∞ (no sink) when `sinks` is 0.
#[inline(always)]
pub unsafe fn sink_logit(sinks: u64, head: u32) -> f32 {
    if sinks == 0 {
        f32::NEG_INFINITY
    } else {
        *(sinks as *const f32).add(head as usize) * LOG2_E
    }
}

/// A row's normalisation: the factor that turns its output accumulator (relative to reference
/// maximum `m`, probabilities summing to `d`) into the output, and its base-2 LSE. A sink
/// (base-2 logit `sink`, −∞ for none) joins the sum as a key of value zero; a row without keys
/// then gets a zero output and the sink as its LSE.
#[inline(always)]
pub fn finish_row(m: f32, d: f32, sink: f32) -> (f32, f32) {
    if sink == f32::NEG_INFINITY {
        return if d > 0.0 { (rcp(d), m + log2(d)) } else { (0.0, f32::NEG_INFINITY) };
    }
    // d > 0 means m is finite; rescale both terms to the larger maximum.
    let (m_new, keep) = if d > 0.0 {
        let m_new = m.max(sink);
        (m_new, exp2(m - m_new))
    } else {
        (sink, 0.0)
    };
    let total = fma(d, keep, exp2(sink - m_new));
    (keep * rcp(total), m_new + log2(total))
}

/// A normalised output slice `o` of LSE `lse` with the sink `sink` (as in [`finish_row`])
/// folded in: the final output and LSE of a merged split row.
#[inline(always)]
pub fn fold_sink(o: &[f32; 8], lse: f32, sink: f32) -> ([f32; 8], f32) {
    if sink == f32::NEG_INFINITY {
        return (*o, lse);
    }
    let (factor, lse) = finish_row(lse, if lse == f32::NEG_INFINITY { 0.0 } else { 1.0 }, sink);
    (o.map(|x| x * factor), lse)
}
