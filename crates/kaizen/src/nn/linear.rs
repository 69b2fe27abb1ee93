//! A dense layer `y = x W^T + b`, as torch.nn.Linear. Weights are stored `(out, in)` exactly as
//! in checkpoint files. This is the "named linear layer" door through which LoRA/IA3 attach.

use candle_core::Tensor;

use crate::Result;

#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
    /// (out,)
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x: (..., in) -> (..., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, self.in_features()))?; // (N, in)
        let mut y = x2.matmul(&self.weight.t()?)?; // (N, out)
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has at least one dim") = self.out_features();
        Ok(y.reshape(out_dims)?)
    }
}
