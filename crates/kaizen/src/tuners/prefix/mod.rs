//! Prefix tuning (Li & Liang 2021; HF PEFT `PREFIX_TUNING`, `peft/tuners/prefix_tuning/`):
//! per layer, `num_virtual_tokens` learned keys and values placed in the KV cache ahead of the
//! real tokens, which then take positions n, n+1, ... The keys are used as stored (no rotary).
//! With grouped-query attention the prefix has the model's key/value heads, so PEFT's
//! `token_dim` is `num_key_value_heads * head_dim`.
//!
//! Saved as one tensor, `prompt_embeddings` (n, layers * 2 * token_dim), each row
//! `[layer][key|value][kv_head][head_dim]`. With `prefix_projection` the table is the output of
//! Embedding -> Linear -> Tanh -> Linear ([`ProjectionEncoder`]); PEFT saves only that output, so
//! kaizen also keeps the encoder's weights in `prompt_encoder.safetensors` to resume training.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Map, Value};

use super::init;
use super::prompt::{p_tuning::ENCODER_FILE, KEY};
use crate::models::{Model, TokenEncoder, VirtualTokens};
use crate::nn::Grads;
use crate::{Error, Result};

/// PEFT's names of the projection's parameters.
pub const ENCODER_PREFIX: &str = "prompt_encoder.default.";
const NAMES: [&str; 5] = [
    "embedding.weight",
    "transform.0.weight",
    "transform.0.bias",
    "transform.2.weight",
    "transform.2.bias",
];

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixTuningConfig {
    pub num_virtual_tokens: usize,
    pub prefix_projection: bool,
    /// Hidden size of the projection; PEFT's default is `token_dim`.
    pub encoder_hidden_size: Option<usize>,
    pub base_model_name_or_path: Option<String>,
}

impl PrefixTuningConfig {
    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let n = super::prompt::num_virtual_tokens(map)?;
        let c = crate::config::Fields(map);
        Ok(PrefixTuningConfig {
            num_virtual_tokens: n,
            prefix_projection: c.bool("prefix_projection")?.unwrap_or(false),
            encoder_hidden_size: c
                .size("encoder_hidden_size", crate::config::limits::INTERMEDIATE)?,
            base_model_name_or_path: map
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }

    /// adapter_config.json as PEFT writes it for `model` (GQA: kv heads and their width).
    pub fn to_json(&self, model: &Model) -> Value {
        let c = model.config();
        let token_dim = c.num_key_value_heads * c.head_dim;
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "encoder_hidden_size": self.encoder_hidden_size.unwrap_or(token_dim),
            "inference_mode": true,
            "init_weights": null,
            "modules_to_save": null,
            "num_attention_heads": c.num_key_value_heads,
            "num_layers": c.num_hidden_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "PREFIX_TUNING",
            "prefix_projection": self.prefix_projection,
            "revision": null,
            "task_type": "CAUSAL_LM",
            "token_dim": token_dim,
        })
    }
}

/// (token_dim, row width) of the model's prefix table.
fn dims(model: &Model) -> (usize, usize) {
    let c = model.config();
    let token_dim = c.num_key_value_heads * c.head_dim;
    (token_dim, c.num_hidden_layers * 2 * token_dim)
}

/// Sets the model's prefix: `table` from an adapter file, else a new one initialised as PEFT
/// does (the table, or with `prefix_projection` a new encoder).
pub fn attach(
    model: &mut Model,
    cfg: &PrefixTuningConfig,
    table: Option<Tensor>,
    seed: u64,
) -> Result<()> {
    let n = cfg.num_virtual_tokens;
    super::prompt::check_num_virtual_tokens(n, model)?;
    let (token_dim, width) = dims(model);
    let mut rng = StdRng::seed_from_u64(seed);
    let (table, encoder) = match table {
        Some(t) if t.dims() == [n, width] => (t, None),
        Some(t) => {
            let c = model.config();
            return Err(Error::Input(format!(
                "\"{KEY}\" has shape {:?}, but this model needs [{n}, {width}] (num_virtual_tokens {n}; {} layers x key and value x {} kv heads x head_dim {}): was the adapter made for another model?",
                t.dims(), c.num_hidden_layers, c.num_key_value_heads, c.head_dim
            )));
        }
        None if cfg.prefix_projection => {
            let hidden = cfg.encoder_hidden_size.unwrap_or(token_dim);
            let enc = ProjectionEncoder::new(n, token_dim, hidden, width, &mut rng)?;
            (enc.forward()?, Some(Box::new(enc) as Box<dyn TokenEncoder>))
        }
        None => {
            let v = init::normal(n * width, 1.0, &mut rng); // torch.nn.Embedding
            (Tensor::from_vec(v, (n, width), &Device::Cpu)?, None)
        }
    };
    model.prefix = Some(VirtualTokens {
        key: KEY.into(),
        table,
        encoder,
    });
    Ok(())
}

/// Loads the projection's weights (kaizen's `prompt_encoder.safetensors`) as the source of the
/// model's prefix, which must already be attached.
pub fn attach_encoder(model: &mut Model, dir: &std::path::Path) -> Result<()> {
    let path = dir.join(ENCODER_FILE);
    let w = crate::checkpoint::adapter::load_tensors(&path)?;
    let p = NAMES
        .iter()
        .map(|name| {
            w.get(&format!("{ENCODER_PREFIX}{name}"))
                .cloned()
                .ok_or_else(|| {
                    Error::checkpoint(
                        &path,
                        format!("no \"{ENCODER_PREFIX}{name}\": not a prefix projection's weights"),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let enc = ProjectionEncoder { p };
    let table = enc.forward().map_err(|e| {
        Error::checkpoint(
            &path,
            format!("the projection's weights do not fit together: {e}"),
        )
    })?;
    let prefix = model
        .prefix
        .as_mut()
        .ok_or_else(|| Error::Input("attach the prefix before its encoder".into()))?;
    if table.dims() != prefix.table.dims() {
        return Err(Error::checkpoint(
            &path,
            format!(
                "the projection produces {:?}, but the adapter's \"{KEY}\" is {:?}",
                table.dims(),
                prefix.table.dims()
            ),
        ));
    }
    prefix.table = table;
    prefix.encoder = Some(Box::new(enc));
    Ok(())
}

/// PEFT's `PrefixEncoder` with `prefix_projection`: Embedding (n, token_dim) -> Linear
/// (token_dim -> hidden) -> Tanh -> Linear (hidden -> layers * 2 * token_dim).
#[derive(Debug)]
pub struct ProjectionEncoder {
    /// In NAMES order: embedding, W0 (hidden, token_dim), b0, W1 (width, hidden), b1.
    p: Vec<Tensor>,
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

impl ProjectionEncoder {
    /// As PEFT initialises it: embedding N(0, 1), linears torch's default uniform.
    fn new(
        n: usize,
        token_dim: usize,
        hidden: usize,
        width: usize,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let t = |shape: &[usize], v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        };
        let emb = t(&[n, token_dim], init::normal(n * token_dim, 1.0, rng))?;
        let b0 = 1.0 / (token_dim as f64).sqrt();
        let b1 = 1.0 / (hidden as f64).sqrt();
        let p = vec![
            emb,
            t(
                &[hidden, token_dim],
                init::uniform(hidden * token_dim, b0, rng),
            )?,
            t(&[hidden], init::uniform(hidden, b0, rng))?,
            t(&[width, hidden], init::uniform(width * hidden, b1, rng))?,
            t(&[width], init::uniform(width, b1, rng))?,
        ];
        Ok(ProjectionEncoder { p })
    }

    /// The tanh activations (n, hidden).
    fn hidden(&self) -> Result<Tensor> {
        Ok(linear(&self.p[0], &self.p[1], &self.p[2])?.tanh()?)
    }
}

impl TokenEncoder for ProjectionEncoder {
    fn forward(&self) -> Result<Tensor> {
        linear(&self.hidden()?, &self.p[3], &self.p[4])
    }

    fn backward(&self, d_out: &Tensor, grads: &mut Grads) -> Result<()> {
        let p = &self.p;
        let a = self.hidden()?; // recomputed: (n, hidden) is tiny
        let key = |i: usize| format!("{ENCODER_PREFIX}{}", NAMES[i]);
        grads.add(&key(3), d_out.t()?.matmul(&a)?)?;
        grads.add(&key(4), d_out.sum(0)?)?;
        let dh = (d_out.matmul(&p[3])? * (1.0 - a.sqr()?)?)?; // tanh' = 1 - tanh^2
        grads.add(&key(1), dh.t()?.matmul(&p[0])?)?;
        grads.add(&key(2), dh.sum(0)?)?;
        grads.add(&key(0), dh.matmul(&p[1])?)?;
        Ok(())
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        NAMES
            .iter()
            .zip(&self.p)
            .map(|(n, t)| (format!("{ENCODER_PREFIX}{n}"), t.clone()))
            .collect()
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        match NAMES
            .iter()
            .position(|n| key.strip_prefix(ENCODER_PREFIX) == Some(n))
        {
            Some(i) => {
                self.p[i] = value;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
