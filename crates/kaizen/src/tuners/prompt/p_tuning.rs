//! P-tuning's MLP prompt encoder (Liu et al. 2021, "GPT Understands, Too"; HF PEFT
//! `peft/tuners/p_tuning/model.py`, `PromptEncoder` with `encoder_reparameterization_type`
//! MLP): virtual tokens = Linear -> ReLU -> Linear -> ReLU -> Linear applied to a learned
//! embedding table. Keys are PEFT's module names (`prompt_encoder.default.mlp_head.0.weight`).

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::models::TokenEncoder;
use crate::nn::Grads;
use crate::{Error, Result};

pub const PREFIX: &str = "prompt_encoder.default.";
const NAMES: [&str; 7] = [
    "embedding.weight",
    "mlp_head.0.weight",
    "mlp_head.0.bias",
    "mlp_head.2.weight",
    "mlp_head.2.bias",
    "mlp_head.4.weight",
    "mlp_head.4.bias",
];

#[derive(Debug)]
pub struct MlpEncoder {
    /// In NAMES order: embedding (n, d), W0 (h, d), b0, W1 (h, h), b1, W2 (d, h), b2.
    p: Vec<Tensor>,
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

impl MlpEncoder {
    /// From tensors keyed `prompt_encoder.default.<name>`; every one must be present.
    pub fn from_weights(w: &BTreeMap<String, Tensor>) -> Result<Self> {
        let p = NAMES
            .iter()
            .map(|n| {
                w.get(&format!("{PREFIX}{n}")).cloned().ok_or_else(|| {
                    Error::Input(format!("P-tuning encoder weights lack \"{PREFIX}{n}\" (only the MLP encoder is supported)"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MlpEncoder { p })
    }

    /// (h0, a0, h1, a1, out)
    fn run(&self) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
        let p = &self.p;
        let h0 = linear(&p[0], &p[1], &p[2])?;
        let a0 = h0.relu()?;
        let h1 = linear(&a0, &p[3], &p[4])?;
        let a1 = h1.relu()?;
        let out = linear(&a1, &p[5], &p[6])?;
        Ok((h0, a0, h1, a1, out))
    }
}

impl TokenEncoder for MlpEncoder {
    fn forward(&self) -> Result<Tensor> {
        Ok(self.run()?.4)
    }

    fn backward(&self, d_out: &Tensor, grads: &mut Grads) -> Result<()> {
        let p = &self.p;
        let (h0, a0, h1, a1, _) = self.run()?; // recomputed: (n, h) is tiny
        let key = |i: usize| format!("{PREFIX}{}", NAMES[i]);
        grads.add(&key(5), d_out.t()?.matmul(&a1)?)?;
        grads.add(&key(6), d_out.sum(0)?)?;
        let dh1 = (d_out.matmul(&p[5])? * h1.gt(0.0)?.to_dtype(h1.dtype())?)?;
        grads.add(&key(3), dh1.t()?.matmul(&a0)?)?;
        grads.add(&key(4), dh1.sum(0)?)?;
        let dh0 = (dh1.matmul(&p[3])? * h0.gt(0.0)?.to_dtype(h0.dtype())?)?;
        grads.add(&key(1), dh0.t()?.matmul(&p[0])?)?;
        grads.add(&key(2), dh0.sum(0)?)?;
        grads.add(&key(0), dh0.matmul(&p[1])?)?;
        Ok(())
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        NAMES
            .iter()
            .zip(&self.p)
            .map(|(n, t)| (format!("{PREFIX}{n}"), t.clone()))
            .collect()
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        match NAMES
            .iter()
            .position(|n| key.strip_prefix(PREFIX) == Some(n))
        {
            Some(i) => {
                self.p[i] = value;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
