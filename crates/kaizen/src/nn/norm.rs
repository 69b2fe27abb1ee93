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
#[derive(Clone)]
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

    /// The forward's output again, from its tape.
    pub fn output(&self, c: &NormCache) -> Result<Tensor> {
        output(c, &self.weight, Some(&self.bias))
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

    /// The forward's output again, from its tape.
    pub fn output(&self, c: &NormCache) -> Result<Tensor> {
        output(c, &self.gain()?, None)
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

    /// The forward's output again from its tape (f32), bit for bit: `xhat * w (+ b)`, as the
    /// forward computed it. A linear layer that reads the norm's output recomputes its input
    /// this way instead of keeping a second copy on the tape.
    pub fn output(&self, c: &NormCache) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.output(c),
            Norm::Rms(n) => n.output(c),
        }
    }

    /// Whether `other` normalises an input exactly as this norm does (the same kind and epsilon;
    /// only the gains differ): then both share one tape for the same input, and
    /// [`Norm::output`] gives `other`'s output from this norm's tape.
    pub fn same_statistics(&self, other: &Norm) -> bool {
        match (self, other) {
            (Norm::Layer(a), Norm::Layer(b)) => a.eps == b.eps,
            (Norm::Rms(a), Norm::Rms(b)) => a.eps == b.eps,
            _ => false,
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
            }
            affine(y, xh, &ws, bs.as_deref());
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

/// `y = xhat * w (+ b)` for one row.
fn affine(y: &mut [f32], xhat: &[f32], w: &[f32], b: Option<&[f32]>) {
    for i in 0..y.len() {
        y[i] = xhat[i] * w[i] + b.map_or(0.0, |b| b[i]);
    }
}

/// The norm's output from its tape: `xhat * w (+ b)`, row by row in parallel.
fn output(c: &NormCache, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let xhat = values(&c.xhat)?;
    let (ws, bs) = (values(w)?, b.map(values).transpose()?);
    let h = ws.len();
    let mut y = vec![0f32; xhat.len()];
    y.par_chunks_mut(h)
        .zip(xhat.par_chunks(h))
        .for_each(|(y, xh)| affine(y, xh, &ws, bs.as_deref()));
    Ok(Tensor::from_vec(y, c.xhat.shape(), c.xhat.device())?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(n: usize, k: f32, shift: f32) -> Tensor {
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * k).sin() * 3.0 + shift).collect();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    /// `Norm::output` gives the forward's output bit for bit from the tape, and from a second
    /// norm of the same kind and epsilon that norm's own forward output (GPT-NeoX's shared tape).
    #[test]
    fn the_output_from_the_tape_is_the_forwards() {
        let h = 96;
        let x = t(5 * h, 0.731, 0.4).reshape((5, h)).unwrap();
        let layer = |k: f32| {
            Norm::Layer(LayerNorm {
                weight: t(h, k, 1.0),
                bias: t(h, k * 1.7, 0.0),
                eps: 1e-5,
                trainable: None,
            })
        };
        let rms = |plus_one: bool, eps: f64| {
            Norm::Rms(RmsNorm {
                weight: t(h, 0.29, 0.1),
                eps,
                plus_one,
                trainable: None,
            })
        };
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let pairs = [
            (layer(0.13), layer(0.71), true),
            (rms(false, 1e-6), rms(true, 1e-6), true),
            (rms(false, 1e-6), rms(false, 1e-5), false),
            (layer(0.13), rms(false, 1e-5), false),
        ];
        for (a, b, same) in pairs {
            let (ya, ca) = a.forward_t(&x).unwrap();
            assert_eq!(bits(&a.output(&ca).unwrap()), bits(&ya));
            assert_eq!(a.same_statistics(&b), same);
            if same {
                let yb = b.forward(&x).unwrap();
                assert_eq!(bits(&b.output(&ca).unwrap()), bits(&yb));
            }
        }
    }
}
