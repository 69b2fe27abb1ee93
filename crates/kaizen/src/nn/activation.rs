//! Element-wise activations named by HF's `hidden_act`, with their derivatives. GELU (both
//! forms) and SiLU run as one fused parallel pass each way on [`super::math`]'s vectorised
//! `erf`/`exp` (candle's `gelu_erf` is a libm call per element, and its backward composed of
//! candle ops is six passes over a (tokens, intermediate) tensor).

use std::f32::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

use candle_core::Tensor;
use rayon::prelude::*;

use super::gemm::with_slice;
use super::math::{erf, exp, sigmoid, tanh};
use crate::config::Activation;
use crate::Result;

/// Elements per parallel task.
const CHUNK: usize = 4096;
/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const INV_SQRT_2PI: f32 = FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5;
/// `sqrt(2 / pi)` and the cubic coefficient of the tanh approximation of GELU.
const TANH_C: f32 = FRAC_2_SQRT_PI * FRAC_1_SQRT_2;
const TANH_A: f32 = 0.044715;

pub fn apply(act: Activation, x: &Tensor) -> Result<Tensor> {
    // One closure per activation rather than `act_value(act, x)`: a constant activation lets
    // each pass vectorise (a match per element kept the backward scalar).
    Ok(match act {
        Activation::Gelu => map(x, None, |x, _| gelu(x))?,
        Activation::GeluTanh => map(x, None, |x, _| 0.5 * x * (1.0 + tanh(gelu_tanh_u(x))))?,
        Activation::Relu => x.relu()?,
        Activation::Silu => map(x, None, |x, _| x * sigmoid(x))?,
    })
}

/// dy * act'(x)
pub fn backward(act: Activation, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::Relu => (dy * x.gt(0.0)?.to_dtype(x.dtype())?)?,
        _ => map(x, Some(dy), |x, dy| dy * derivative(act, x))?,
    })
}

/// `0.5 x (1 + erf(x / sqrt 2))`
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `sqrt(2 / pi) (x + 0.044715 x^3)`
#[inline(always)]
fn gelu_tanh_u(x: f32) -> f32 {
    TANH_C * (x + TANH_A * x * x * x)
}

/// act'(x)
#[inline(always)]
fn derivative(act: Activation, x: f32) -> f32 {
    match act {
        // 0.5 (1 + erf(x / sqrt 2)) + x * exp(-x^2 / 2) / sqrt(2 pi)
        Activation::Gelu => {
            0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * exp(-0.5 * x * x) * INV_SQRT_2PI
        }
        // y = 0.5 x (1 + tanh(u)): 0.5 (1 + t) + 0.5 x (1 - t^2) u'
        Activation::GeluTanh => {
            let t = tanh(gelu_tanh_u(x));
            let du = TANH_C * (1.0 + 3.0 * TANH_A * x * x);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
        }
        Activation::Relu => f32::from(x > 0.0),
        // s (1 + x (1 - s)), s = sigmoid(x)
        Activation::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
    }
}

/// `f(x, y)` element by element over f32 tensors of one shape (`y` absent: `f(x, 0)`), in one
/// parallel pass that reads both in place and writes a new tensor.
fn map(x: &Tensor, y: Option<&Tensor>, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    let x = x.contiguous()?;
    let mut out = vec![0f32; x.elem_count()];
    with_slice::<f32, _>(&x, |xs| match y {
        Some(y) => with_slice::<f32, _>(&y.contiguous()?, |ys| {
            out.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK).zip(ys.par_chunks(CHUNK)))
                .for_each(|(o, (x, y))| {
                    for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                        *o = f(x, y);
                    }
                })
        }),
        None => {
            out.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK))
                .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x, 0.0)));
            Ok(())
        }
    })??;
    Ok(Tensor::from_vec(out, x.dims(), x.device())?)
}

/// Gated MLP (SwiGLU, GeGLU): `act(gate) * up` in one parallel pass.
pub fn glu(act: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if act == Activation::Relu {
        return Ok((gate.relu()? * up)?);
    }
    map(gate, Some(up), |x, u| u * act_value(act, x))
}

/// act(x) for the fused passes.
#[inline(always)]
fn act_value(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => gelu(x),
        Activation::GeluTanh => 0.5 * x * (1.0 + tanh(gelu_tanh_u(x))),
        Activation::Relu => x.max(0.0),
        Activation::Silu => x * sigmoid(x),
    }
}

/// Backward of [`glu`]: (d_gate, d_up) from the product's gradient; the activation is
/// recomputed rather than kept (one (tokens, intermediate) tensor less per layer).
pub fn glu_backward(
    act: Activation,
    gate: &Tensor,
    up: &Tensor,
    d_prod: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if act == Activation::Relu {
        let d_gate = backward(act, gate, &(d_prod * up)?)?;
        return Ok((d_gate, (d_prod * gate.relu()?)?));
    }
    let (gate, up, d_prod) = (gate.contiguous()?, up.contiguous()?, d_prod.contiguous()?);
    let mut d_gate = vec![0f32; d_prod.elem_count()];
    let mut d_up = vec![0f32; d_gate.len()];
    with_slice::<f32, _>(&gate, |g| {
        with_slice::<f32, _>(&up, |u| {
            with_slice::<f32, _>(&d_prod, |dp| {
                d_gate
                    .par_chunks_mut(CHUNK)
                    .zip(d_up.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                    .zip(dp.par_chunks(CHUNK))
                    .for_each(|(((dg, du), (g, u)), dp)| {
                        for i in 0..dg.len() {
                            du[i] = dp[i] * act_value(act, g[i]);
                            dg[i] = dp[i] * u[i] * derivative(act, g[i]);
                        }
                    })
            })
        })
    })???;
    let dev = d_prod.device();
    Ok((
        Tensor::from_vec(d_gate, d_prod.dims(), dev)?,
        Tensor::from_vec(d_up, d_prod.dims(), dev)?,
    ))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// act(x) and act'(x) in f64 through candle's own ops (exact erf/tanh), the reference.
    fn reference(act: Activation, x: &Tensor) -> (Tensor, Tensor) {
        let x = x.to_dtype(DType::F64).unwrap();
        let pi = std::f64::consts::PI;
        let (y, d) = match act {
            Activation::Gelu => {
                let cdf =
                    (((&x / 2f64.sqrt()).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5).unwrap();
                let pdf = ((x.sqr().unwrap() * -0.5).unwrap().exp().unwrap()
                    * (1.0 / (2.0 * pi).sqrt()))
                .unwrap();
                ((&x * &cdf).unwrap(), (cdf + (&x * pdf).unwrap()).unwrap())
            }
            Activation::GeluTanh => {
                let c = (2.0 / pi).sqrt();
                let u = ((&x + (x.powf(3.0).unwrap() * 0.044715).unwrap()).unwrap() * c).unwrap();
                let t = u.tanh().unwrap();
                let du =
                    (((x.sqr().unwrap() * (3.0 * 0.044715)).unwrap() + 1.0).unwrap() * c).unwrap();
                let sech2 = (t.sqr().unwrap().neg().unwrap() + 1.0).unwrap();
                let half = ((&t + 1.0).unwrap() * 0.5).unwrap();
                let y = (&x * &half).unwrap();
                let d = &half + ((&x * 0.5).unwrap() * sech2).unwrap().mul(&du).unwrap();
                (y, d.unwrap())
            }
            Activation::Silu => {
                let s = (x.neg().unwrap().exp().unwrap() + 1.0)
                    .unwrap()
                    .recip()
                    .unwrap();
                let one_minus = (s.neg().unwrap() + 1.0).unwrap();
                let d = (&s * ((&x * one_minus).unwrap() + 1.0).unwrap()).unwrap();
                ((&x * &s).unwrap(), d)
            }
            Activation::Relu => (
                x.relu().unwrap(),
                x.gt(0.0).unwrap().to_dtype(DType::F64).unwrap(),
            ),
        };
        (y, d)
    }

    fn worst(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b): (Vec<f64>, Vec<f64>) = (
            a.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        a.iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0, f64::max)
    }

    /// Every activation's fused forward, backward and gated forms against the f64 reference,
    /// on values from -12 to 12 (both tails and the steep middle).
    #[test]
    fn fused_passes_match_exact_math() {
        let n = 48_001;
        let xs: Vec<f32> = (0..n)
            .map(|i| -12.0 + 24.0 * i as f32 / (n - 1) as f32)
            .collect();
        let x = Tensor::from_vec(xs, (n,), &Device::Cpu).unwrap();
        let dy = (Tensor::ones((n,), DType::F32, &Device::Cpu).unwrap() * 0.75).unwrap();
        let up = (&x * 0.5).unwrap();
        for act in [
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Silu,
            Activation::Relu,
        ] {
            let (y, d) = reference(act, &x);
            let y_err = worst(&apply(act, &x).unwrap(), &y);
            let d_err = worst(
                &backward(act, &x, &dy).unwrap(),
                &(d.clone() * 0.75).unwrap(),
            );
            assert!(
                y_err < 2e-6 && d_err < 2e-6,
                "{act:?}: forward {y_err}, backward {d_err}"
            );
            // The gated forms multiply the activation's error by `up` (|up| <= 6 here).
            let tol = 6.0 * 2e-6;
            let up64 = up.to_dtype(DType::F64).unwrap();
            let prod = glu(act, &x, &up).unwrap();
            let g_err = worst(&prod, &(&y * &up64).unwrap());
            let (dg, du) = glu_backward(act, &x, &up, &dy).unwrap();
            let dg_err = worst(&dg, &((d * 0.75).unwrap() * &up64).unwrap());
            let du_err = worst(&du, &(y * 0.75).unwrap());
            assert!(
                g_err < tol && dg_err < tol && du_err < 2e-6,
                "{act:?}: glu {g_err}, d_gate {dg_err}, d_up {du_err}"
            );
        }
    }
}
