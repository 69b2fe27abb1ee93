//! LayerNorm (GPT-NeoX; torch.nn.LayerNorm, biased variance) and RMSNorm (Llama; HF LlamaRMSNorm,
//! `w * x / sqrt(mean(x^2) + eps)`), with hand-derived backward: the input's gradient, and the
//! weight's (and bias's) only when the norm is `trainable` (full fine-tuning).

use candle_core::{Tensor, D};

use super::Grads;
use crate::Result;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// (hidden,)
    pub weight: Tensor,
    /// (hidden,)
    pub bias: Tensor,
    pub eps: f64,
    /// Full fine-tuning: the HF module path its gradients are kept under; None = frozen.
    pub trainable: Option<String>,
}

/// Saved by LayerNorm / RMSNorm forward: the normalised input and 1/std per row.
pub struct NormCache {
    /// (..., hidden)
    xhat: Tensor,
    /// (..., 1)
    rstd: Tensor,
}

impl LayerNorm {
    /// x: (..., hidden) -> same shape
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x)?.0)
    }

    pub fn forward_t(&self, x: &Tensor) -> Result<(Tensor, NormCache)> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        let y = xhat
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?;
        Ok((y, NormCache { xhat, rstd }))
    }

    /// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w
    pub fn backward(&self, c: &NormCache, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        if let Some(path) = &self.trainable {
            weight_grad(path, c, dy, grads)?;
            grads.add(&format!("{path}.bias"), rows_sum(dy)?)?;
        }
        let g = dy.broadcast_mul(&self.weight)?;
        let mg = g.mean_keepdim(D::Minus1)?;
        let mgx = (&g * &c.xhat)?.mean_keepdim(D::Minus1)?;
        let inner = g.broadcast_sub(&mg)?.sub(&c.xhat.broadcast_mul(&mgx)?)?;
        Ok(inner.broadcast_mul(&c.rstd)?)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (hidden,)
    pub weight: Tensor,
    pub eps: f64,
    /// Full fine-tuning: the HF module path its gradients are kept under; None = frozen.
    pub trainable: Option<String>,
}

impl RmsNorm {
    /// x: (..., hidden) -> same shape
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x)?.0)
    }

    pub fn forward_t(&self, x: &Tensor) -> Result<(Tensor, NormCache)> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (ms + self.eps)?.sqrt()?.recip()?;
        let xhat = x.broadcast_mul(&rstd)?;
        let y = xhat.broadcast_mul(&self.weight)?;
        Ok((y, NormCache { xhat, rstd }))
    }

    /// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w
    pub fn backward(&self, c: &NormCache, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        if let Some(path) = &self.trainable {
            weight_grad(path, c, dy, grads)?;
        }
        let g = dy.broadcast_mul(&self.weight)?;
        let mgx = (&g * &c.xhat)?.mean_keepdim(D::Minus1)?;
        let inner = g.sub(&c.xhat.broadcast_mul(&mgx)?)?;
        Ok(inner.broadcast_mul(&c.rstd)?)
    }
}

/// Sum over every row of (..., hidden) -> (hidden,).
fn rows_sum(t: &Tensor) -> Result<Tensor> {
    let h = t.dim(D::Minus1)?;
    Ok(t.reshape(((), h))?.sum(0)?)
}

/// y = xhat * w (+ b): dw = sum over rows of dy * xhat.
fn weight_grad(path: &str, c: &NormCache, dy: &Tensor, grads: &mut Grads) -> Result<()> {
    grads.add(&format!("{path}.weight"), rows_sum(&(dy * &c.xhat)?)?)
}
