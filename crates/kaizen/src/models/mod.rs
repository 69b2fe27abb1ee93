//! One file per architecture. Models never name a tuner: methods reach them through named linear
//! layers, the KV cache and the input embeddings.

pub mod gpt_neox;
pub mod llama;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;

use crate::checkpoint::Weights;
use crate::config::{Architecture, ModelConfig};
use crate::nn::{Grads, KvCache, Linear};
use crate::Result;

pub use gpt_neox::GptNeoX;
pub use llama::Llama;

pub enum Model {
    GptNeoX(GptNeoX),
    Llama(Llama),
}

impl Model {
    /// Builds the model from `weights`, taking every tensor it needs; then checks nothing is left.
    pub fn load(config: &ModelConfig, mut weights: Weights) -> Result<Self> {
        let (model, ignored) = match config.architecture {
            Architecture::GptNeoX => (
                Model::GptNeoX(GptNeoX::load(config, &mut weights)?),
                gpt_neox::IGNORED,
            ),
            Architecture::Llama => (
                Model::Llama(Llama::load(config, &mut weights)?),
                llama::IGNORED,
            ),
        };
        weights.finish(ignored)?;
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Model::GptNeoX(m) => &m.config,
            Model::Llama(m) => &m.config,
        }
    }

    pub fn device(&self) -> Device {
        Device::Cpu
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config().num_hidden_layers)
    }

    /// ids: (B, T) u32 -> input embeddings (B, T, hidden).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Model::GptNeoX(m) => m.embed(ids),
            Model::Llama(m) => m.embed(ids),
        }
    }

    /// Embeddings (B, T, hidden) -> final normalised hidden states (B, T, hidden); with a cache,
    /// positions continue after it.
    pub fn forward_hidden(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        match self {
            Model::GptNeoX(m) => m.forward_hidden(x, cache),
            Model::Llama(m) => m.forward_hidden(x, cache),
        }
    }

    /// Embeddings (B, T, hidden) -> logits (B, T, vocab).
    pub fn forward_embeds(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.lm_head().forward(&self.forward_hidden(x, cache)?)
    }

    /// ids: (B, T) -> logits (B, T, vocab).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_embeds(&self.embed(ids)?, cache)
    }

    /// Logits of the last position only (what decoding needs), for one sequence of ids.
    pub fn next_logits(&self, ids: &[u32], cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device())?;
        let h = self.forward_hidden(&self.embed(&t)?, cache)?; // (1, T, hidden)
        let last = h.squeeze(0)?.narrow(0, ids.len() - 1, 1)?; // (1, hidden)
        Ok(self.lm_head().forward(&last)?.squeeze(0)?.to_vec1()?)
    }

    /// Logits for one sequence of ids, batch 1: (T, vocab).
    pub fn logits(&self, ids: &[u32], cache: Option<&mut KvCache>) -> Result<Tensor> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device())?;
        Ok(self.forward(&t, cache)?.squeeze(0)?)
    }

    /// Every linear layer with its HF module path, e.g. `model.layers.0.self_attn.q_proj`; the
    /// LM head last.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        match self {
            Model::GptNeoX(m) => m.linears_mut(),
            Model::Llama(m) => m.linears_mut(),
        }
    }

    /// Every weight under its HF tensor name, as an HF checkpoint stores it (tied embeddings
    /// once, no `lm_head.weight`); attached adapters are not included.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        match self {
            Model::GptNeoX(m) => m.named_weights(),
            Model::Llama(m) => m.named_weights(),
        }
    }

    /// HF module path of the output projection (never a LoRA target under "all-linear").
    pub fn lm_head_name(&self) -> &'static str {
        match self {
            Model::GptNeoX(_) => "embed_out",
            Model::Llama(_) => "lm_head",
        }
    }

    pub fn lm_head(&self) -> &Linear {
        match self {
            Model::GptNeoX(m) => &m.embed_out,
            Model::Llama(m) => &m.lm_head,
        }
    }

    /// Training forward from embeddings (B, T, hidden) to final normalised hidden states; `rng`
    /// drives dropout in adapters.
    pub fn forward_train(&self, x: &Tensor, rng: Option<&mut StdRng>) -> Result<(Tensor, Tape)> {
        Ok(match self {
            Model::GptNeoX(m) => {
                let (h, t) = m.forward_train(x, rng)?;
                (h, Tape::GptNeoX(t))
            }
            Model::Llama(m) => {
                let (h, t) = m.forward_train(x, rng)?;
                (h, Tape::Llama(t))
            }
        })
    }

    /// Backward from the gradient of the final hidden states to the input embeddings;
    /// adapter gradients accumulate into `grads`.
    pub fn backward(&self, tape: &Tape, d_h: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        match (self, tape) {
            (Model::GptNeoX(m), Tape::GptNeoX(t)) => m.backward(t, d_h, grads),
            (Model::Llama(m), Tape::Llama(t)) => m.backward(t, d_h, grads),
            _ => Err(crate::Error::Input(
                "tape from a different architecture".into(),
            )),
        }
    }
}

/// Activations saved by [`Model::forward_train`].
pub enum Tape {
    GptNeoX(gpt_neox::Tape),
    Llama(llama::Tape),
}
