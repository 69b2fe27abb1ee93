//! Element-wise activations named by HF's `hidden_act`, with their derivatives.

use candle_core::Tensor;

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
            // s (1 + x (1 - s)), s = sigmoid(x)
            let s = (x.neg()?.exp()? + 1.0)?.recip()?;
            let one_minus = (s.neg()? + 1.0)?;
            (&s * ((x * one_minus)? + 1.0)?)?
        }
    };
    Ok((dy * d)?)
}
