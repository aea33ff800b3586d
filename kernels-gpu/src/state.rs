//! The online-softmax attention state: running maximum `m` and denominator `d` of base-2
//! logits, and the unnormalised output slice `acc`. States over disjoint key sets merge exactly.
use crate::gpu::math::{exp2, log2, rcp};

/// Elements of a head's output one thread owns (one 16-byte vector of f16/bf16).
pub const SLICE: usize = 8;

#[derive(Clone, Copy)]
pub struct AttentionState {
    pub m: f32,
    pub d: f32,
    pub acc: [f32; SLICE],
}

impl AttentionState {
    #[inline(always)]
    pub fn empty() -> Self {
        AttentionState { m: f32::NEG_INFINITY, d: 0.0, acc: [0.0; SLICE] }
    }

    /// Adds one key with base-2 logit `s` and value slice `v`.
    #[inline(always)]
    pub fn push(&mut self, s: f32, v: &[f32; SLICE]) {
        let m = self.m.max(s);
        let scale = exp2(self.m - m);
        let p = exp2(s - m);
        self.d = self.d * scale + p;
        for i in 0..SLICE {
            self.acc[i] = self.acc[i] * scale + p * v[i];
        }
        self.m = m;
    }

    /// Combines with a state over other keys.
    #[inline(always)]
    pub fn merge(&mut self, other: &AttentionState) {
        if other.d == 0.0 {
            return;
        }
        let m = self.m.max(other.m);
        let (a, b) = (exp2(self.m - m), exp2(other.m - m));
        self.d = self.d * a + other.d * b;
        for i in 0..SLICE {
            self.acc[i] = self.acc[i] * a + other.acc[i] * b;
        }
        self.m = m;
    }

    /// The normalised output slice (zeros when no key was seen).
    #[inline(always)]
    pub fn output(&self) -> [f32; SLICE] {
        let inv = if self.d > 0.0 { rcp(self.d) } else { 0.0 };
        let mut o = [0.0; SLICE];
        for i in 0..SLICE {
            o[i] = self.acc[i] * inv;
        }
        o
    }

    /// `log2 Σ 2^s` over the keys seen; −∞ when none.
    #[inline(always)]
    pub fn lse(&self) -> f32 {
        if self.d > 0.0 {
            self.m + log2(self.d)
        } else {
            f32::NEG_INFINITY
        }
    }
}
