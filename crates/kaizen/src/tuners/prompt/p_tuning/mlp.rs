//! P-tuning's MLP prompt encoder (HF PEFT `PromptEncoder`, `encoder_reparameterization_type`
//! MLP): virtual tokens = Linear -> ReLU -> Linear -> ReLU -> Linear (`mlp_head.{0,2,4}`,
//! token_dim -> h -> h -> token_dim) applied to the embedding table (n, token_dim). PEFT
//! ignores `encoder_num_layers` and `encoder_dropout` here; so does kaizen.

use candle_core::Tensor;

use super::{relu_mlp, relu_mlp_backward, Params, Spec};
use crate::models::TokenEncoder;
use crate::nn::Grads;
use crate::Result;

/// The parameters after `embedding.weight`.
pub(super) fn specs(token_dim: usize, hidden: usize) -> Vec<Spec> {
    [
        Spec::linear("mlp_head.0", token_dim, hidden),
        Spec::linear("mlp_head.2", hidden, hidden),
        Spec::linear("mlp_head.4", hidden, token_dim),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[derive(Debug)]
pub struct MlpEncoder {
    /// embedding (n, d), then mlp_head W0 (h, d), b0, W2 (h, h), b2, W4 (d, h), b4.
    p: Params,
}

impl MlpEncoder {
    pub(super) fn new(p: Params) -> Self {
        MlpEncoder { p }
    }
}

impl TokenEncoder for MlpEncoder {
    fn forward(&self) -> Result<Tensor> {
        Ok(relu_mlp(&self.p.t[0], &self.p.t[1..])?.1)
    }

    fn backward(&self, d_table: &Tensor, grads: &mut Grads) -> Result<()> {
        let (p, keys) = (&self.p.t, &self.p.keys);
        let (inputs, _) = relu_mlp(&p[0], &p[1..])?; // recomputed: (n, h) is tiny
        let d_emb = relu_mlp_backward(d_table, &p[1..], &keys[1..], &inputs, grads)?;
        grads.add(&keys[0], d_emb)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        self.p.list()
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        Ok(self.p.set(key, value))
    }
}
