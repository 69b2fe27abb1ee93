//! A dense layer `y = x W^T + b`, as torch.nn.Linear. Weights are stored `(out, in)` exactly as
//! in checkpoint files. This is the "named linear layer" door: a tuner (LoRA, IA3, ...) attaches
//! a [`LinearAdapter`] here; the model around it never knows which method it is.

use std::fmt::Debug;

use candle_core::Tensor;
use rand::rngs::StdRng;

use super::Grads;
use crate::Result;

/// A trainable addition to a frozen linear layer.
pub trait LinearAdapter: Debug + Send + Sync {
    /// x: (N, in), y: (N, out) = the base output. Returns the adapted output and what backward
    /// needs besides x (e.g. a dropout-masked input). `rng` is Some in training mode.
    fn forward(
        &self,
        x: &Tensor,
        y: Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// dy: (N, out). Accumulates the adapter's own gradients into `grads` and returns its extra
    /// contribution to dx (N, in), if any.
    fn backward(
        &self,
        x: &Tensor,
        saved: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>>;
    /// Trainable tensors with their PEFT keys.
    fn params(&self) -> Vec<(String, Tensor)>;
    /// Replaces a trainable tensor (optimizer step, loading). Returns false if the key is not ours.
    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool>;
    /// The dense weight delta this adapter adds, for merging; None if it cannot be merged.
    fn delta_weight(&self) -> Result<Option<Tensor>>;
}

#[derive(Debug)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
    /// (out,)
    pub bias: Option<Tensor>,
    pub adapter: Option<Box<dyn LinearAdapter>>,
}

/// What [`Linear::backward`] needs from the forward.
pub struct LinearCache {
    /// (N, in), kept only when an adapter needs it.
    x: Option<Tensor>,
    saved: Option<Tensor>,
    in_dims: Vec<usize>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            adapter: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
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
        let mut y = x2.matmul(&self.weight.t()?)?; // (N, out)
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let (y, saved, keep_x) = match &self.adapter {
            Some(a) => {
                let (y, saved) = a.forward(&x2, y, rng)?;
                (y, saved, true)
            }
            None => (y, None, false),
        };
        let mut out_dims = dims.clone();
        *out_dims.last_mut().expect("x has at least one dim") = self.out_features();
        let cache = LinearCache {
            x: keep_x.then_some(x2),
            saved,
            in_dims: dims,
        };
        Ok((y.reshape(out_dims)?, cache))
    }

    /// dy: (..., out) -> dx (..., in). The frozen weight and bias get no gradient.
    pub fn backward(&self, c: &LinearCache, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let rows: usize = c.in_dims[..c.in_dims.len() - 1].iter().product();
        let dy2 = dy.reshape((rows, self.out_features()))?; // (N, out)
        let mut dx = dy2.matmul(&self.weight)?; // (N, in)
        if let (Some(a), Some(x)) = (&self.adapter, &c.x) {
            if let Some(extra) = a.backward(x, c.saved.as_ref(), &dy2, grads)? {
                dx = (dx + extra)?;
            }
        }
        Ok(dx.reshape(c.in_dims.clone())?)
    }
}
