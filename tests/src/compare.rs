//! Attention outputs against the f64 CPU reference.
//!
//! Error bound: |out − ref| ≤ atol + rtol·|ref| per element, with (atol, rtol) = (2e-3, 1e-2)
//! for f16 and (1e-2, 2e-2) for bf16 outputs (the output rounding dominates); the base-2 LSE
//! within 1e-3 + 1e-4·|ref|, and −∞ exactly where the reference has no key. NaN never passes.
use ferrinfer::{DType, KvDType};

pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F16 => (2e-3, 1e-2),
        _ => (1e-2, 2e-2),
    }
}

/// Whether an output element of `dtype` is within the bound of its reference (NaN is not).
pub fn close(got: f64, want: f64, dtype: DType) -> bool {
    let (atol, rtol) = tolerance(dtype);
    (got - want).abs() <= atol + rtol * want.abs()
}

/// Checks `out` (rows of `heads × head_dim`) and `lse` (rows of `heads`) against the
/// reference; the error names the first bad element by its row (request or token) and head.
pub fn expect_attention_close<T: KvDType>(
    out: &[T],
    want: &[f64],
    lse: &[f32],
    want_lse: &[f64],
    heads: usize,
    head_dim: usize,
    row_name: &str,
) -> Result<(), String> {
    if out.len() != want.len() || lse.len() != want_lse.len() {
        return Err(format!(
            "lengths differ: out {} / {}, lse {} / {}",
            out.len(),
            want.len(),
            lse.len(),
            want_lse.len()
        ));
    }
    for (i, (g, &w)) in out.iter().zip(want).enumerate() {
        let g = g.to_f64();
        if !close(g, w, T::DTYPE) {
            let (row, head) = (i / (heads * head_dim), i / head_dim % heads);
            return Err(format!("out[{i}] ({row_name} {row}, head {head}): GPU {g}, reference {w}"));
        }
    }
    for (i, (&g, &w)) in lse.iter().zip(want_lse).enumerate() {
        let ok =
            if w == f64::NEG_INFINITY { g == f32::NEG_INFINITY } else { (g as f64 - w).abs() <= 1e-3 + 1e-4 * w.abs() };
        if !ok {
            return Err(format!("lse[{i}] ({row_name} {}, head {}): GPU {g}, reference {w}", i / heads, i % heads));
        }
    }
    Ok(())
}
