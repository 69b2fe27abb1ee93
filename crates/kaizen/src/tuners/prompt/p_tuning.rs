//! P-tuning's MLP prompt encoder (Liu et al. 2021, "GPT Understands, Too"; HF PEFT
//! `peft/tuners/p_tuning/model.py`, `PromptEncoder` with `encoder_reparameterization_type`
//! MLP): virtual tokens = Linear -> ReLU -> Linear -> ReLU -> Linear applied to a learned
//! embedding table. Keys are PEFT's module names (`prompt_encoder.default.mlp_head.0.weight`).

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::models::{Model, TokenEncoder};
use crate::nn::Grads;
use crate::{Error, Result};

pub const PREFIX: &str = "prompt_encoder.default.";
/// kaizen's file beside adapter_model.safetensors holding the encoder's weights.
pub const ENCODER_FILE: &str = "prompt_encoder.safetensors";
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

/// Loads the encoder weights from `path` and makes them the source of the model's virtual tokens.
pub fn attach_encoder(model: &mut Model, path: &std::path::Path) -> Result<()> {
    let w = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| Error::checkpoint(path, crate::error::brief(&e)))?;
    let enc = MlpEncoder::from_weights(&w.into_iter().collect())?;
    set_encoder(model, enc)
}

/// Makes `enc` the source of the model's virtual tokens (their count must match).
pub fn set_encoder(model: &mut Model, enc: MlpEncoder) -> Result<()> {
    let table = enc.forward()?;
    let n = table.dim(0)?;
    let hidden = model.config().hidden_size;
    if table.dims() != [n, hidden] {
        return Err(Error::Input(format!(
            "the P-tuning encoder produces {:?}, but the model needs [n, {hidden}]",
            table.dims()
        )));
    }
    model.virtual_tokens = Some(crate::models::VirtualTokens {
        key: super::KEY.into(),
        table,
        encoder: Some(Box::new(enc)),
    });
    Ok(())
}

/// A new encoder as PEFT initialises one: embedding N(0, 1), linears torch's default
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
pub fn new_encoder(n: usize, token_dim: usize, hidden: usize, seed: u64) -> Result<MlpEncoder> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dev = candle_core::Device::Cpu;
    let emb = Tensor::from_vec(
        super::super::init::normal(n * token_dim, 1.0, &mut rng),
        (n, token_dim),
        &dev,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut uniform = |shape: &[usize], fan_in: usize| -> Result<Tensor> {
        let b = 1.0 / (fan_in as f64).sqrt();
        let v = super::super::init::uniform(shape.iter().product(), b, &mut rng);
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let p = vec![
        emb,
        uniform(&[hidden, token_dim], token_dim)?,
        uniform(&[hidden], token_dim)?,
        uniform(&[hidden, hidden], hidden)?,
        uniform(&[hidden], hidden)?,
        uniform(&[token_dim, hidden], hidden)?,
        uniform(&[token_dim], hidden)?,
    ];
    Ok(MlpEncoder { p })
}

/// adapter_config.json for a P-tuning (MLP) adapter, as PEFT writes it.
pub fn config_json(
    model: &Model,
    n: usize,
    encoder_hidden: usize,
    base: Option<String>,
) -> serde_json::Value {
    let c = model.config();
    serde_json::json!({
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "encoder_dropout": 0.0,
        "encoder_hidden_size": encoder_hidden,
        "encoder_num_layers": 2,
        "encoder_reparameterization_type": "MLP",
        "inference_mode": true,
        "modules_to_save": null,
        "num_attention_heads": c.num_attention_heads,
        "num_layers": c.num_hidden_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": n,
        "peft_type": "P_TUNING",
        "revision": null,
        "task_type": "CAUSAL_LM",
        "token_dim": c.hidden_size,
    })
}
