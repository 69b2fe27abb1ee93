//! LayerNorm (GPT-NeoX; torch.nn.LayerNorm, biased variance) and RMSNorm (Llama; HF LlamaRMSNorm,
//! `w * x / sqrt(mean(x^2) + eps)`; Gemma's `(1 + w) * ...`, HF Gemma3RMSNorm, all in f32), with
//! hand-derived backward: the input's gradient, and the weight's (and bias's) only when the norm
//! is `trainable` (full fine-tuning). [`Norm`] is either, as a decoder part.

use candle_core::{Tensor, D};
use rayon::prelude::*;

use super::{Grads, Recast};
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

impl NormCache {
    /// The normalised input in `r`'s dtype; 1/std stays f32.
    pub fn recast(&self, r: &mut Recast) -> Result<Self> {
        Ok(NormCache {
            xhat: r.tensor(&self.xhat)?,
            rstd: self.rstd.clone(),
        })
    }

    /// [`NormCache::recast`] of an optional norm's cache.
    pub fn recast_opt(c: &Option<NormCache>, r: &mut Recast) -> Result<Option<NormCache>> {
        c.as_ref().map(|c| c.recast(r)).transpose()
    }
}

impl LayerNorm {
    /// x: (..., hidden) -> same shape
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x)?.0)
    }

    pub fn forward_t(&self, x: &Tensor) -> Result<(Tensor, NormCache)> {
        fused_forward(x, &self.weight, Some(&self.bias), self.eps, true)
    }

    /// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w
    pub fn backward(&self, c: &NormCache, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        if let Some(path) = &self.trainable {
            weight_grad(path, c, dy, grads)?;
            grads.add(&format!("{path}.bias"), rows_sum(dy)?)?;
        }
        fused_backward(c, dy, &self.weight, true)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (hidden,)
    pub weight: Tensor,
    pub eps: f64,
    /// Gemma: the gain is `1 + weight` (the checkpoint stores the offset from 1).
    pub plus_one: bool,
    /// Full fine-tuning: the HF module path its gradients are kept under; None = frozen.
    pub trainable: Option<String>,
}

impl RmsNorm {
    /// x: (..., hidden) -> same shape
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x)?.0)
    }

    pub fn forward_t(&self, x: &Tensor) -> Result<(Tensor, NormCache)> {
        fused_forward(x, &self.gain()?, None, self.eps, false)
    }

    /// The multiplier applied to the normalised input.
    fn gain(&self) -> Result<Tensor> {
        Ok(if self.plus_one {
            (&self.weight + 1.0)?
        } else {
            self.weight.clone()
        })
    }

    /// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w
    pub fn backward(&self, c: &NormCache, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        if let Some(path) = &self.trainable {
            weight_grad(path, c, dy, grads)?;
        }
        fused_backward(c, dy, &self.gain()?, false)
    }
}

/// A normalisation layer of a decoder: LayerNorm or RMSNorm.
#[derive(Debug, Clone)]
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    /// x: (..., hidden) -> same shape
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x)?.0)
    }

    pub fn forward_t(&self, x: &Tensor) -> Result<(Tensor, NormCache)> {
        match self {
            Norm::Layer(n) => n.forward_t(x),
            Norm::Rms(n) => n.forward_t(x),
        }
    }

    pub fn backward(&self, c: &NormCache, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.backward(c, dy, grads),
            Norm::Rms(n) => n.backward(c, dy, grads),
        }
    }

    /// An optional norm (Gemma's sandwich norms, QK-norm): the identity when absent.
    pub fn forward_opt(n: Option<&Norm>, x: Tensor) -> Result<(Tensor, Option<NormCache>)> {
        match n {
            Some(n) => {
                let (y, c) = n.forward_t(&x)?;
                Ok((y, Some(c)))
            }
            None => Ok((x, None)),
        }
    }

    /// Backward of [`Norm::forward_opt`].
    pub fn backward_opt(
        n: Option<&Norm>,
        c: Option<&NormCache>,
        dy: Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        match (n, c) {
            (Some(n), Some(c)) => n.backward(c, &dy, grads),
            _ => Ok(dy),
        }
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1()?)
}

/// One parallel pass over the rows of x (..., hidden): `xhat = (x - mean) * rstd` (no mean
/// subtracted for RMSNorm: `center` false), `y = xhat * w (+ b)`.
fn fused_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    eps: f64,
    center: bool,
) -> Result<(Tensor, NormCache)> {
    let dims = x.dims().to_vec();
    let h = *dims.last().expect("norm input has a hidden dim");
    let (xs, ws) = (values(x)?, values(w)?);
    let bs = b.map(values).transpose()?;
    let mut y = vec![0f32; xs.len()];
    let mut xhat = vec![0f32; xs.len()];
    let mut rstd = vec![0f32; xs.len() / h];
    (
        y.par_chunks_mut(h),
        xhat.par_chunks_mut(h),
        rstd.par_iter_mut(),
        xs.par_chunks(h),
    )
        .into_par_iter()
        .for_each(|(y, xh, r, x)| {
            let mean = if center {
                x.iter().sum::<f32>() / h as f32
            } else {
                0.0
            };
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            *r = 1.0 / (var + eps as f32).sqrt();
            for i in 0..h {
                xh[i] = (x[i] - mean) * *r;
                y[i] = xh[i] * ws[i] + bs.as_ref().map_or(0.0, |b| b[i]);
            }
        });
    let mut rdims = dims.clone();
    *rdims.last_mut().expect("checked") = 1;
    let dev = x.device();
    Ok((
        Tensor::from_vec(y, dims.as_slice(), dev)?,
        NormCache {
            xhat: Tensor::from_vec(xhat, dims.as_slice(), dev)?,
            rstd: Tensor::from_vec(rstd, rdims.as_slice(), dev)?,
        },
    ))
}

/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, g = dy * w (no mean(g) for RMSNorm).
fn fused_backward(c: &NormCache, dy: &Tensor, w: &Tensor, center: bool) -> Result<Tensor> {
    let dims = dy.dims().to_vec();
    let h = *dims.last().expect("norm gradient has a hidden dim");
    let (xhat, rstd, ws) = (values(&c.xhat)?, values(&c.rstd)?, values(w)?);
    let mut dx = values(dy)?;
    (dx.par_chunks_mut(h), xhat.par_chunks(h), rstd.par_iter())
        .into_par_iter()
        .for_each(|(d, xh, &r)| {
            let (mut sg, mut sgx) = (0f32, 0f32);
            for i in 0..h {
                let g = d[i] * ws[i];
                sg += g;
                sgx += g * xh[i];
            }
            let mg = if center { sg / h as f32 } else { 0.0 };
            let mgx = sgx / h as f32;
            for i in 0..h {
                d[i] = (d[i] * ws[i] - mg - xh[i] * mgx) * r;
            }
        });
    Ok(Tensor::from_vec(dx, dims.as_slice(), dy.device())?)
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
