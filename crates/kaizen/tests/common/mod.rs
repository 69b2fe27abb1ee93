//! Helpers shared by the parity tests.

use candle_core::Tensor;

/// Relative error used by every parity check: max |a - b| over max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let max_abs = |t: &Tensor| {
        t.abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("f32 tensor") as f64
    };
    max_abs(&(a - b).expect("same shapes")) / max_abs(b)
}
