//! Token embedding lookup, as torch.nn.Embedding. The input-embedding door: prompt and P-tuning
//! prepend their virtual tokens to what this returns.

use candle_core::Tensor;

use super::{Grads, Matrix};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Embedding {
    /// (vocab, hidden)
    pub weight: Matrix,
    /// Full fine-tuning: the HF module path its gradients are kept under; None = frozen.
    pub trainable: Option<String>,
}

impl Embedding {
    pub fn new(weight: impl Into<Matrix>) -> Self {
        Embedding {
            weight: weight.into(),
            trainable: None,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims2().0
    }

    /// ids: (B, T) u32 -> (B, T, hidden)
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.vocab_size() {
            return Err(Error::Input(format!(
                "token id {max} is out of range for a vocabulary of {} (tokenizer and model do not match)",
                self.vocab_size()
            )));
        }
        let flat = self.weight.rows(&ids.flatten_all()?)?; // (B*T, hidden) f32
        Ok(flat.reshape((b, t, self.weight.dims2().1))?)
    }

    /// Full fine-tuning: scatters the gradient of the looked-up rows (B, T, hidden) back into the
    /// table's gradient. Nothing for a frozen table.
    pub fn backward(&self, ids: &Tensor, d_x: &Tensor, grads: &mut Grads) -> Result<()> {
        let Some(path) = &self.trainable else {
            return Ok(());
        };
        let (v, h) = self.weight.dims2();
        let d = Tensor::zeros((v, h), d_x.dtype(), d_x.device())?.index_add(
            &ids.flatten_all()?,
            &d_x.reshape(((), h))?,
            0,
        )?;
        grads.add(&format!("{path}.weight"), d)
    }
}
