//! One file per architecture. Models never name a tuner: methods reach them through named linear
//! layers, the KV cache and the input embeddings.

pub mod gpt_neox;
pub mod llama;

use candle_core::{Device, Tensor};

use crate::checkpoint::Weights;
use crate::config::{Architecture, ModelConfig};
use crate::nn::KvCache;
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

    /// Embeddings (B, T, hidden) -> logits (B, T, vocab); with a cache, positions continue after it.
    pub fn forward_embeds(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        match self {
            Model::GptNeoX(m) => m.forward_embeds(x, cache),
            Model::Llama(m) => m.forward_embeds(x, cache),
        }
    }

    /// ids: (B, T) -> logits (B, T, vocab).
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_embeds(&self.embed(ids)?, cache)
    }

    /// Logits for one sequence of ids, batch 1: (T, vocab).
    pub fn logits(&self, ids: &[u32], cache: Option<&mut KvCache>) -> Result<Tensor> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device())?;
        Ok(self.forward(&t, cache)?.squeeze(0)?)
    }
}
