//! Element-wise activations named by HF's `hidden_act`.

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
