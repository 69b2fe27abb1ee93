//! Element-wise activations named by HF's `hidden_act`, with their derivatives.

use candle_core::Tensor;
use rayon::prelude::*;

use super::math::sigmoid;
use crate::config::Activation;
use crate::Result;

pub fn apply(act: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Relu => x.relu()?,
        Activation::Silu => x.silu()?,
    })
}

/// dy * act'(x)
pub fn backward(act: Activation, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let d = match act {
        Activation::Gelu => {
            // 0.5 (1 + erf(x / sqrt 2)) + x * exp(-x^2 / 2) / sqrt(2 pi)
            let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
            let pdf = ((x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt()))?;
            (cdf? + (x * pdf)?)?
        }
        Activation::GeluTanh => {
            // y = 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3)
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let u = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
            let t = u.tanh()?;
            let du = ((x.sqr()? * (3.0 * 0.044715))? + 1.0)? * c;
            let sech2 = (t.sqr()?.neg()? + 1.0)?;
            (((t + 1.0)? * 0.5)? + ((x * 0.5)? * sech2)?.mul(&du?)?)?
        }
        Activation::Relu => x.gt(0.0)?.to_dtype(x.dtype())?,
        Activation::Silu => {
            // dy * s (1 + x (1 - s)), s = sigmoid(x): one fused parallel pass.
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let mut d: Vec<f32> = dy.flatten_all()?.to_vec1()?;
            d.par_chunks_mut(4096)
                .zip(xs.par_chunks(4096))
                .for_each(|(d, x)| {
                    for (d, &x) in d.iter_mut().zip(x) {
                        let s = sigmoid(x);
                        *d *= s * (1.0 + x * (1.0 - s));
                    }
                });
            return Ok(Tensor::from_vec(d, dy.dims(), dy.device())?);
        }
    };
    Ok((dy * d)?)
}

/// Gated MLP (SwiGLU): `act(gate) * up`, one fused parallel pass for SiLU.
pub fn glu(act: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if act != Activation::Silu {
        return Ok((apply(act, gate)? * up)?);
    }
    let g: Vec<f32> = gate.flatten_all()?.to_vec1()?;
    let mut p: Vec<f32> = up.flatten_all()?.to_vec1()?;
    p.par_chunks_mut(4096)
        .zip(g.par_chunks(4096))
        .for_each(|(p, g)| {
            for (p, &x) in p.iter_mut().zip(g) {
                *p *= x * sigmoid(x);
            }
        });
    Ok(Tensor::from_vec(p, up.dims(), up.device())?)
}

/// Backward of [`glu`]: (d_gate, d_up) from the product's gradient; the activation is
/// recomputed rather than kept (one (tokens, intermediate) tensor less per layer).
pub fn glu_backward(
    act: Activation,
    gate: &Tensor,
    up: &Tensor,
    d_prod: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if act != Activation::Silu {
        let d_gate = backward(act, gate, &(d_prod * up)?)?;
        return Ok((d_gate, (d_prod * apply(act, gate)?)?));
    }
    let (g, u): (Vec<f32>, Vec<f32>) =
        (gate.flatten_all()?.to_vec1()?, up.flatten_all()?.to_vec1()?);
    let mut d_gate: Vec<f32> = d_prod.flatten_all()?.to_vec1()?;
    let mut d_up = vec![0f32; d_gate.len()];
    d_gate
        .par_chunks_mut(4096)
        .zip(d_up.par_chunks_mut(4096))
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|((dg, du), (g, u))| {
            for i in 0..dg.len() {
                let (x, dp) = (g[i], dg[i]);
                let s = sigmoid(x);
                du[i] = dp * (x * s);
                dg[i] = dp * u[i] * (s * (1.0 + x * (1.0 - s)));
            }
        });
    let dev = d_prod.device();
    Ok((
        Tensor::from_vec(d_gate, d_prod.dims(), dev)?,
        Tensor::from_vec(d_up, d_prod.dims(), dev)?,
    ))
}
