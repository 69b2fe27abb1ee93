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

/// The architecture-specific network.
pub enum Arch {
    GptNeoX(GptNeoX),
    Llama(Llama),
}

/// A causal LM plus the input-embedding door: learned virtual-token embeddings that are
/// prepended to the token embeddings of a fresh sequence (prompt tuning, P-tuning).
pub struct Model {
    pub arch: Arch,
    pub virtual_tokens: Option<VirtualTokens>,
}

/// Embeddings of `n` virtual tokens, saved under a PEFT key (`prompt_embeddings`). Trained
/// directly (prompt tuning) or produced by a trainable `encoder` (P-tuning).
#[derive(Debug)]
pub struct VirtualTokens {
    pub key: String,
    /// (n, hidden); the encoder's output when there is an encoder.
    pub table: Tensor,
    pub encoder: Option<Box<dyn TokenEncoder>>,
}

/// A trainable network whose output is the virtual-token table (P-tuning's prompt encoder).
pub trait TokenEncoder: std::fmt::Debug + Send + Sync {
    /// The table (n, hidden).
    fn forward(&self) -> Result<Tensor>;
    /// Accumulates the encoder's gradients given the table's gradient (n, hidden).
    fn backward(&self, d_table: &Tensor, grads: &mut Grads) -> Result<()>;
    fn params(&self) -> Vec<(String, Tensor)>;
    /// Replaces a parameter; false if the key is not the encoder's.
    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool>;
}

impl Model {
    /// Builds the model from `weights`, taking every tensor it needs; then checks nothing is left.
    pub fn load(config: &ModelConfig, mut weights: Weights) -> Result<Self> {
        let (arch, ignored) = match config.architecture {
            Architecture::GptNeoX => (
                Arch::GptNeoX(GptNeoX::load(config, &mut weights)?),
                gpt_neox::IGNORED,
            ),
            Architecture::Llama => (
                Arch::Llama(Llama::load(config, &mut weights)?),
                llama::IGNORED,
            ),
        };
        weights.finish(ignored)?;
        Ok(Model {
            arch,
            virtual_tokens: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        match &self.arch {
            Arch::GptNeoX(m) => &m.config,
            Arch::Llama(m) => &m.config,
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
        match &self.arch {
            Arch::GptNeoX(m) => m.embed(ids),
            Arch::Llama(m) => m.embed(ids),
        }
    }

    /// Embeddings (B, T, hidden) -> final normalised hidden states (B, T, hidden); with a cache,
    /// positions continue after it.
    pub fn forward_hidden(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        match &self.arch {
            Arch::GptNeoX(m) => m.forward_hidden(x, cache),
            Arch::Llama(m) => m.forward_hidden(x, cache),
        }
    }

    /// Embeddings (B, T, hidden) -> logits (B, T, vocab).
    pub fn forward_embeds(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.lm_head().forward(&self.forward_hidden(x, cache)?)
    }

    /// Number of virtual tokens prepended to a fresh sequence.
    pub fn num_virtual_tokens(&self) -> usize {
        self.virtual_tokens
            .as_ref()
            .map_or(0, |v| v.table.dim(0).unwrap_or(0))
    }

    /// Input embeddings of ids (B, T): with virtual tokens and `fresh` (nothing cached yet),
    /// they are prepended -> (B, n + T, hidden); returns the embeddings and n.
    pub fn embed_input(&self, ids: &Tensor, fresh: bool) -> Result<(Tensor, usize)> {
        let x = self.embed(ids)?;
        match (&self.virtual_tokens, fresh) {
            (Some(v), true) => {
                let (b, _, h) = x.dims3()?;
                let n = v.table.dim(0)?;
                let prompt = v.table.unsqueeze(0)?.broadcast_as((b, n, h))?;
                Ok((Tensor::cat(&[&prompt, &x], 1)?, n))
            }
            _ => Ok((x, 0)),
        }
    }

    /// Final hidden states of the real tokens of ids (B, T) -> (B, T, hidden).
    pub fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let fresh = cache.as_ref().is_none_or(|c| c.is_empty());
        let (x, n) = self.embed_input(ids, fresh)?;
        let h = self.forward_hidden(&x, cache)?;
        Ok(h.narrow(1, n, h.dim(1)? - n)?)
    }

    /// ids: (B, T) -> logits (B, T, vocab) of the real tokens.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.lm_head().forward(&self.hidden(ids, cache)?)
    }

    /// Logits of the last position only (what decoding needs), for one sequence of ids.
    pub fn next_logits(&self, ids: &[u32], cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device())?;
        let h = self.hidden(&t, cache)?; // (1, T, hidden)
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
        match &mut self.arch {
            Arch::GptNeoX(m) => m.linears_mut(),
            Arch::Llama(m) => m.linears_mut(),
        }
    }

    /// Every weight under its HF tensor name, as an HF checkpoint stores it (tied embeddings
    /// once, no `lm_head.weight`); attached adapters are not included.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        match &self.arch {
            Arch::GptNeoX(m) => m.named_weights(),
            Arch::Llama(m) => m.named_weights(),
        }
    }

    /// HF module path of the output projection (never a LoRA target under "all-linear").
    pub fn lm_head_name(&self) -> &'static str {
        match &self.arch {
            Arch::GptNeoX(_) => "embed_out",
            Arch::Llama(_) => "lm_head",
        }
    }

    pub fn lm_head(&self) -> &Linear {
        match &self.arch {
            Arch::GptNeoX(m) => &m.embed_out,
            Arch::Llama(m) => &m.lm_head,
        }
    }

    /// Training forward from embeddings (B, T, hidden) to final normalised hidden states; `rng`
    /// drives dropout in adapters.
    pub fn forward_train(&self, x: &Tensor, rng: Option<&mut StdRng>) -> Result<(Tensor, Tape)> {
        Ok(match &self.arch {
            Arch::GptNeoX(m) => {
                let (h, t) = m.forward_train(x, rng)?;
                (h, Tape::GptNeoX(t))
            }
            Arch::Llama(m) => {
                let (h, t) = m.forward_train(x, rng)?;
                (h, Tape::Llama(t))
            }
        })
    }

    /// Backward from the gradient of the final hidden states to the input embeddings;
    /// adapter gradients accumulate into `grads`.
    pub fn backward(&self, tape: &Tape, d_h: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        match (&self.arch, tape) {
            (Arch::GptNeoX(m), Tape::GptNeoX(t)) => m.backward(t, d_h, grads),
            (Arch::Llama(m), Tape::Llama(t)) => m.backward(t, d_h, grads),
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
