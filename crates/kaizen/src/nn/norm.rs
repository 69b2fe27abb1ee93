//! LayerNorm (GPT-NeoX; torch.nn.LayerNorm, biased variance) and RMSNorm (Llama; HF LlamaRMSNorm,
//! `w * x / sqrt(mean(x^2) + eps)`). Statistics in f32.

use candle_core::{Tensor, D};

use crate::Result;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// (hidden,)
    pub weight: Tensor,
    /// (hidden,)
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// x: (..., hidden) -> same shape
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        Ok(xc
            .broadcast_mul(&inv)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (hidden,)
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// x: (..., hidden) -> same shape
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)?)
    }
}
