//! Token embedding lookup, as torch.nn.Embedding. The input-embedding door: prompt and P-tuning
//! prepend their virtual tokens to what this returns.

use candle_core::Tensor;

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Embedding {
    /// (vocab, hidden)
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(weight: Tensor) -> Self {
        Embedding { weight }
    }

    pub fn vocab_size(&self) -> usize {
        self.weight.dims()[0]
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
        let flat = self.weight.index_select(&ids.flatten_all()?, 0)?; // (B*T, hidden)
        Ok(flat.reshape((b, t, self.weight.dims()[1]))?)
    }
}
