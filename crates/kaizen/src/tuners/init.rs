//! Seeded random initialisations shared by the methods (torch's defaults, drawn with Rust's RNG).

use rand::rngs::StdRng;
use rand::Rng;

/// `n` draws from N(0, std^2) (Box-Muller).
pub fn normal(n: usize, std: f64, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2) = (rng.random::<f64>().max(1e-300), rng.random::<f64>());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// `n` draws from U(-bound, bound): torch's Kaiming-uniform(a = sqrt 5) with bound 1/sqrt(fan_in).
pub fn uniform(n: usize, bound: f64, rng: &mut StdRng) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

/// Inverted dropout of an adapter branch's input: `(x * mask, mask)` in training (`rng` given and
/// `p > 0`), else `(x, None)`. The mask is saved for backward, already scaled by 1/(1-p).
pub fn dropout_input(
    x: &candle_core::Tensor,
    p: f64,
    rng: Option<&mut StdRng>,
) -> crate::Result<(candle_core::Tensor, Option<candle_core::Tensor>)> {
    match rng {
        Some(rng) if p > 0.0 => {
            let mask = dropout_mask(x.dims(), p, rng)?;
            Ok(((x * &mask)?, Some(mask)))
        }
        _ => Ok((x.clone(), None)),
    }
}

/// Inverted dropout's mask for an input of shape `dims`: each value kept with probability
/// 1 - p and then scaled by 1 / (1 - p), else 0.
pub fn dropout_mask(
    dims: &[usize],
    p: f64,
    rng: &mut StdRng,
) -> crate::Result<candle_core::Tensor> {
    let keep = 1.0 - p;
    let n: usize = dims.iter().product();
    let m: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    Ok(candle_core::Tensor::from_vec(
        m,
        dims,
        &candle_core::Device::Cpu,
    )?)
}
