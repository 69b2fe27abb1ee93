//! A dense layer `y = x W^T + b`, as torch.nn.Linear. Weights are stored `(out, in)` exactly as
//! in checkpoint files. This is the "named linear layer" door: a tuner (LoRA, IA3, ...) attaches
//! a [`LinearAdapter`] here; the model around it never knows which method it is. Full
//! fine-tuning instead marks the layer `trainable`, and backward then also yields dW and db.

use std::fmt::Debug;

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::gemm::{with_slice, PackCache};
use super::{Grads, Matrix, Recast};
use crate::Result;

/// A trainable method wrapped around a frozen linear layer. The adapter runs the whole layer:
/// it calls [`Linear::base_forward`] / [`Linear::base_backward`] for the frozen part, so it can
/// add to the output (LoRA), scale the output or the input (IA3), or reshape the weight (DoRA).
pub trait LinearAdapter: Debug + Send + Sync {
    /// x: (N, in) -> (y (N, out), what backward needs besides x). `rng` is Some in training.
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// dy: (N, out) -> dx (N, in); the adapter's own gradients accumulate into `grads`.
    fn backward(
        &self,
        base: &Linear,
        x: &Tensor,
        saved: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor>;
    /// Trainable tensors with their PEFT keys.
    fn params(&self) -> Vec<(String, Tensor)>;
    /// Replaces a trainable tensor (optimizer step, loading). Returns false if the key is not ours.
    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool>;
    /// The base weight and bias with this adapter folded in; None if it cannot be merged.
    fn merged(&self, base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>>;
    /// f32 values [`LinearAdapter::forward`] saves per input row in training (besides x), for
    /// the memory guard.
    fn saved_per_row(&self, base: &Linear) -> usize;
    /// Serving several adapters in one batch: this layer's output (N, out) for decoding rows x
    /// (N, in) given the frozen product `wx = x Wᵀ` (N, out, no bias) computed once for the
    /// rows of every adapter. Each row must come out as [`LinearAdapter::forward`] (inference)
    /// computes it for that row alone. None (the default): the adapter needs its own product
    /// (DoRA's recombined weight), and the caller runs `forward`.
    fn forward_on_product(
        &self,
        _base: &Linear,
        _x: &Tensor,
        _wx: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Serving: when this adapter's whole effect is on the layer's input (IA3 on a feed-forward
    /// input), the rows x (N, in) to put into the shared product instead; the layer's output is
    /// then that product plus the bias. None (the default): not such an adapter.
    fn shared_input(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[derive(Debug)]
pub struct Linear {
    /// (out, in): dense, or quantized (`--quantize`, a GGUF's own types)
    pub weight: Matrix,
    /// (out,)
    pub bias: Option<Tensor>,
    pub adapter: Option<Box<dyn LinearAdapter>>,
    /// Full fine-tuning: the HF module path its gradients are kept under (`<path>.weight`,
    /// `<path>.bias`); None = frozen, the default.
    pub trainable: Option<String>,
    /// The weight's packings when it is an LM head multiplied many rows at a time (`loss.rs`).
    pub head_pack: PackCache,
}

/// What [`Linear::backward`] needs from the forward.
pub struct LinearCache {
    /// (N, in), kept only when an adapter or the weight's own gradient needs it.
    x: Option<Tensor>,
    /// The input was needed but dropped, for the layer's caller to recompute it before backward
    /// ([`LinearCache::forget_input`], [`LinearCache::give_input`]).
    forgotten: bool,
    saved: Option<Tensor>,
    in_dims: Vec<usize>,
}

impl LinearCache {
    /// The kept input in `r`'s dtype; what the adapter saved stays as it is.
    pub fn recast(&self, r: &mut Recast) -> Result<Self> {
        Ok(LinearCache {
            x: r.opt(&self.x)?,
            forgotten: self.forgotten,
            saved: self.saved.clone(),
            in_dims: self.in_dims.clone(),
        })
    }

    /// Drops the kept input when the caller can compute it again (a norm's output from the
    /// norm's tape, an activation from its input): the tape does not hold it a second time.
    pub fn forget_input(&mut self) {
        self.forgotten |= self.x.take().is_some();
    }

    /// Gives a forgotten input back for backward: x (..., in), the input the forward was given.
    pub fn give_input(&mut self, x: &Tensor) -> Result<()> {
        if std::mem::take(&mut self.forgotten) {
            let n = self.in_dims[self.in_dims.len() - 1];
            self.x = Some(x.reshape(((), n))?);
        }
        Ok(())
    }

    /// [`LinearCache::give_input`] for layers that read one input (q, k and v; gate and up):
    /// `x()` is called once, only when one of them forgot it.
    pub fn give_inputs(
        caches: &mut [LinearCache],
        x: impl FnOnce() -> Result<Tensor>,
    ) -> Result<()> {
        if caches.iter().any(LinearCache::needs_input) {
            let x = x()?;
            for c in caches {
                c.give_input(&x)?;
            }
        }
        Ok(())
    }

    /// Whether backward needs [`LinearCache::give_input`] first.
    pub fn needs_input(&self) -> bool {
        self.forgotten
    }
}

impl Linear {
    pub fn new(weight: impl Into<Matrix>, bias: Option<Tensor>) -> Self {
        Linear {
            weight: weight.into(),
            bias,
            adapter: None,
            trainable: None,
            head_pack: PackCache::default(),
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims2().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims2().0
    }

    /// The weight in f32 (a copy when it is stored in bf16 or quantized), for adapters that
    /// compute with it.
    pub fn weight_f32(&self) -> Result<Tensor> {
        self.weight.to_f32()
    }

    /// The frozen layer alone. x: (N, in) -> (N, out), on kaizen's kernels in the weight's
    /// precision (see [`Matrix::product`]).
    pub fn base_forward(&self, x: &Tensor) -> Result<Tensor> {
        self.add_bias(self.weight.product(x, true)?)
    }

    /// `wx (N, out) + bias`: the frozen layer's output from its product.
    pub fn add_bias(&self, wx: Tensor) -> Result<Tensor> {
        self.output(wx, None)
    }

    /// `wx + bias + h bᵀ`: the frozen layer's output from its product `wx` (..., out), plus a
    /// rank-r term when given (`h` (N, r), `b` (out, r): LoRA's `(x Aᵀ s) Bᵀ`), in one
    /// parallel pass over the rows; the rank-r product is never materialised (candle's matmul
    /// and two adds were three passes over (N, out) and two more tensors of its size).
    pub fn output(&self, wx: Tensor, low_rank: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let out = wx.dims().last().copied().unwrap_or(0);
        if (self.bias.is_none() && low_rank.is_none()) || wx.elem_count() == 0 || out == 0 {
            return Ok(wx);
        }
        let f32s = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let bias = self.bias.as_ref().map(f32s).transpose()?;
        // h (N, r) and bᵀ (r, out), rows of bᵀ added to each output row scaled by h's.
        let (h, bt, rank) = match low_rank {
            Some((h, b)) => (f32s(h)?, f32s(&b.t()?)?, b.dim(1)?),
            None => (Vec::new(), Vec::new(), 0),
        };
        let wx = wx.to_dtype(DType::F32)?.contiguous()?;
        let mut y = vec![0f32; wx.elem_count()];
        with_slice::<f32, _>(&wx, |wx| {
            y.par_chunks_mut(out)
                .zip(wx.par_chunks(out))
                .enumerate()
                .for_each(|(i, (y, wx))| {
                    y.copy_from_slice(wx);
                    if let Some(b) = &bias {
                        y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                    }
                    for (&s, bt) in h[i * rank..(i + 1) * rank].iter().zip(bt.chunks(out)) {
                        y.iter_mut().zip(bt).for_each(|(y, b)| *y += s * b);
                    }
                })
        })?;
        Ok(Tensor::from_vec(y, wx.dims(), wx.device())?)
    }

    /// Input gradient of the frozen layer alone: dy (N, out) -> dx (N, in). No weight gradient.
    pub fn base_backward(&self, dy: &Tensor) -> Result<Tensor> {
        self.weight.product(dy, false)
    }

    /// x: (..., in) -> (..., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_t(x, None)?.0)
    }

    /// Forward that also returns what backward needs. x: (..., in) -> (..., out)
    pub fn forward_t(&self, x: &Tensor, rng: Option<&mut StdRng>) -> Result<(Tensor, LinearCache)> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.in_features()))?; // (N, in)
        let (y, saved, keep_x) = match &self.adapter {
            Some(a) => {
                let (y, saved) = a.forward(self, &x2, rng)?;
                (y, saved, true)
            }
            None => (self.base_forward(&x2)?, None, self.trainable.is_some()),
        };
        let mut out_dims = dims.clone();
        *out_dims.last_mut().expect("x has at least one dim") = self.out_features();
        let cache = LinearCache {
            x: keep_x.then_some(x2),
            forgotten: false,
            saved,
            in_dims: dims,
        };
        Ok((y.reshape(out_dims)?, cache))
    }

    /// dy: (..., out) -> dx (..., in). The frozen weight and bias get no gradient.
    /// dW = dyᵀ x, db = column sums of dy, into `grads` under `<path>.weight` / `<path>.bias`.
    fn weight_grads(&self, path: &str, x: &Tensor, dy: &Tensor, grads: &mut Grads) -> Result<()> {
        grads.add(&format!("{path}.weight"), dy.t()?.matmul(x)?)?;
        if self.bias.is_some() {
            grads.add(&format!("{path}.bias"), dy.sum(0)?)?;
        }
        Ok(())
    }

    pub fn backward(&self, c: &LinearCache, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        if c.forgotten {
            return Err(crate::Error::Input(
                "linear backward: the tape's input was forgotten and not given back".into(),
            ));
        }
        let rows: usize = c.in_dims[..c.in_dims.len() - 1].iter().product();
        let dy2 = dy.reshape((rows, self.out_features()))?; // (N, out)
        if let (Some(path), Some(x)) = (&self.trainable, &c.x) {
            self.weight_grads(path, x, &dy2, grads)?;
        }
        let dx = match (&self.adapter, &c.x) {
            (Some(a), Some(x)) => a.backward(self, x, c.saved.as_ref(), &dy2, grads)?,
            _ => self.base_backward(&dy2)?,
        };
        Ok(dx.reshape(c.in_dims.clone())?)
    }
}
