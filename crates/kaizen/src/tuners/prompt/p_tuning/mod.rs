//! P-tuning (Liu et al. 2021, "GPT Understands, Too"; HF PEFT `peft/tuners/p_tuning/
//! {config,model}.py`, `PromptEncoderConfig` / `PromptEncoder`): the virtual tokens are the output
//! of a trainable prompt encoder applied to a learned embedding table, either an MLP (`mlp.rs`) or
//! a bidirectional LSTM followed by an MLP head (`lstm.rs`), chosen by
//! `encoder_reparameterization_type`. Keys are PEFT's module names
//! (`prompt_encoder.default.mlp_head.0.weight`). PEFT saves only the encoder's output (as prompt
//! tuning's `prompt_embeddings`); kaizen also writes the encoder's weights beside it, in
//! `prompt_encoder.safetensors`, so that training can continue.

mod lstm;
mod mlp;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{Map, Value};

pub use lstm::LstmEncoder;
pub use mlp::MlpEncoder;

use crate::models::{Model, TokenEncoder};
use crate::tuners::init;
use crate::{Error, Result};

pub const PREFIX: &str = "prompt_encoder.default.";
/// kaizen's file beside adapter_model.safetensors holding the encoder's weights.
pub const ENCODER_FILE: &str = "prompt_encoder.safetensors";

/// PEFT `PromptEncoderReparameterizationType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderType {
    Mlp,
    Lstm,
}

impl EncoderType {
    /// The name in adapter_config.json.
    pub fn peft_name(self) -> &'static str {
        match self {
            EncoderType::Mlp => "MLP",
            EncoderType::Lstm => "LSTM",
        }
    }
}

impl std::str::FromStr for EncoderType {
    type Err = String;
    /// PEFT's names, in any case.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "MLP" => Ok(EncoderType::Mlp),
            "LSTM" => Ok(EncoderType::Lstm),
            _ => Err(format!(
                "encoder_reparameterization_type \"{s}\" is not one of MLP, LSTM"
            )),
        }
    }
}

/// The encoder part of PEFT's `PromptEncoderConfig` (field names as in adapter_config.json).
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub encoder_reparameterization_type: EncoderType,
    pub num_virtual_tokens: usize,
    /// The model's hidden size: the width of the table and of the encoder's input.
    pub token_dim: usize,
    pub encoder_hidden_size: usize,
    /// LSTM layers; PEFT ignores it for the MLP (always 3 linears).
    pub encoder_num_layers: usize,
    /// Between LSTM layers, in training only; PEFT ignores it for the MLP.
    pub encoder_dropout: f64,
    pub base_model_name_or_path: Option<String>,
}

impl EncoderConfig {
    /// From adapter_config.json, with PEFT's defaults (MLP, 2 layers, dropout 0; a missing
    /// encoder_hidden_size, None in PEFT, is taken as token_dim).
    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let c = crate::config::Fields(map);
        let uint = |k: &str| c.size(k, crate::config::limits::INTERMEDIATE);
        let token_dim = uint("token_dim")?.ok_or("missing \"token_dim\"")?;
        let cfg = EncoderConfig {
            encoder_reparameterization_type: map
                .get("encoder_reparameterization_type")
                .and_then(Value::as_str)
                .unwrap_or("MLP")
                .parse()?,
            num_virtual_tokens: super::num_virtual_tokens(map)?,
            token_dim,
            encoder_hidden_size: uint("encoder_hidden_size")?.unwrap_or(token_dim),
            encoder_num_layers: c
                .size("encoder_num_layers", crate::config::limits::LAYERS)?
                .unwrap_or(2),
            encoder_dropout: c.f64("encoder_dropout")?.unwrap_or(0.0),
            base_model_name_or_path: map
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
        };
        if cfg.encoder_hidden_size == 0 || cfg.encoder_num_layers == 0 {
            return Err(
                "\"encoder_hidden_size\" and \"encoder_num_layers\" must be at least 1".into(),
            );
        }
        Ok(cfg)
    }

    /// adapter_config.json for a P-tuning adapter, as PEFT writes it.
    pub fn to_json(&self, model: &Model) -> Value {
        let c = model.config();
        serde_json::json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "encoder_dropout": self.encoder_dropout,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_reparameterization_type": self.encoder_reparameterization_type.peft_name(),
            "inference_mode": true,
            "modules_to_save": null,
            "num_attention_heads": c.num_attention_heads,
            "num_layers": c.num_hidden_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "P_TUNING",
            "revision": null,
            "task_type": "CAUSAL_LM",
            "token_dim": self.token_dim,
        })
    }

    /// The encoder's parameters in PEFT's state-dict order.
    fn specs(&self) -> Vec<Spec> {
        let (n, d, h) = (
            self.num_virtual_tokens,
            self.token_dim,
            self.encoder_hidden_size,
        );
        let mut specs = vec![Spec::new("embedding.weight", &[n, d], Init::Normal)];
        specs.extend(match self.encoder_reparameterization_type {
            EncoderType::Mlp => mlp::specs(d, h),
            EncoderType::Lstm => lstm::specs(d, h, self.encoder_num_layers),
        });
        specs
    }

    fn build(&self, p: Params) -> Box<dyn TokenEncoder> {
        match self.encoder_reparameterization_type {
            EncoderType::Mlp => Box::new(MlpEncoder::new(p)),
            EncoderType::Lstm => Box::new(LstmEncoder::new(p, self)),
        }
    }

    /// A new encoder as PEFT initialises one: embedding N(0, 1), the rest torch's defaults.
    pub fn init(&self, seed: u64) -> Result<Box<dyn TokenEncoder>> {
        let dev = Device::Cpu;
        // Two streams, so the embedding does not depend on the encoder's size.
        let mut normal = StdRng::seed_from_u64(seed);
        let mut uniform = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut p = Params::default();
        for s in self.specs() {
            let len = s.shape.iter().product();
            let v = match s.init {
                Init::Normal => init::normal(len, 1.0, &mut normal),
                Init::Uniform(b) => init::uniform(len, b, &mut uniform),
            };
            p.push(s.name, Tensor::from_vec(v, s.shape, &dev)?);
        }
        Ok(self.build(p))
    }

    /// The encoder from `weights` (keyed `prompt_encoder.default.<name>`, read from `source`).
    pub fn from_weights(
        &self,
        weights: &BTreeMap<String, Tensor>,
        source: &Path,
    ) -> Result<Box<dyn TokenEncoder>> {
        Ok(self.build(self.checked(weights, source)?))
    }

    /// Every tensor this config needs, with its shape, and nothing else.
    fn checked(&self, w: &BTreeMap<String, Tensor>, source: &Path) -> Result<Params> {
        let what = format!(
            "the {} encoder adapter_config.json describes (encoder_hidden_size {}, encoder_num_layers {}, num_virtual_tokens {}, token_dim {})",
            self.encoder_reparameterization_type.peft_name(),
            self.encoder_hidden_size,
            self.encoder_num_layers,
            self.num_virtual_tokens,
            self.token_dim
        );
        let mut p = Params::default();
        for s in self.specs() {
            let key = format!("{PREFIX}{}", s.name);
            let t = w.get(&key).ok_or_else(|| {
                Error::checkpoint(source, format!("no tensor \"{key}\", which {what} needs; the file does not belong to this adapter_config.json, or is incomplete"))
            })?;
            if t.dims() != s.shape.as_slice() {
                return Err(Error::checkpoint(
                    source,
                    format!(
                        "\"{key}\" has shape {:?}, but {what} needs {:?}",
                        t.dims(),
                        s.shape
                    ),
                ));
            }
            p.push(s.name, t.clone());
        }
        if let Some(extra) = w.keys().find(|k| !p.keys.contains(k)) {
            return Err(Error::checkpoint(
                source,
                format!("unexpected tensor \"{extra}\": not part of {what}"),
            ));
        }
        Ok(p)
    }
}

/// Loads the encoder `cfg` describes from `path` and makes it the source of the model's virtual
/// tokens.
pub fn attach_encoder(model: &mut Model, path: &Path, cfg: &EncoderConfig) -> Result<()> {
    let enc = cfg.from_weights(&crate::checkpoint::adapter::load_tensors(path)?, path)?;
    set_encoder(model, enc)
}

/// Makes `enc` the source of the model's virtual tokens (their count must match).
pub fn set_encoder(model: &mut Model, enc: Box<dyn TokenEncoder>) -> Result<()> {
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
        encoder: Some(enc),
    });
    Ok(())
}

/// How torch initialises a parameter.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(0, 1), as `nn.Embedding`.
    Normal,
    /// U(-b, b), as `nn.Linear` (b = 1/sqrt(fan_in)) and `nn.LSTM` (b = 1/sqrt(hidden)).
    Uniform(f64),
}

/// One parameter of an encoder: its name under PREFIX, shape and initialisation.
struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl Spec {
    fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Spec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }

    /// `nn.Linear(inp, out)` named `name`: weight (out, inp) and bias (out).
    fn linear(name: &str, inp: usize, out: usize) -> [Spec; 2] {
        let init = Init::Uniform(1.0 / (inp as f64).sqrt());
        [
            Spec::new(format!("{name}.weight"), &[out, inp], init),
            Spec::new(format!("{name}.bias"), &[out], init),
        ]
    }
}

/// An encoder's tensors in PEFT's state-dict order, under their full keys.
#[derive(Debug, Default)]
struct Params {
    keys: Vec<String>,
    t: Vec<Tensor>,
}

impl Params {
    fn push(&mut self, name: String, t: Tensor) {
        self.keys.push(format!("{PREFIX}{name}"));
        self.t.push(t);
    }

    fn list(&self) -> Vec<(String, Tensor)> {
        self.keys
            .iter()
            .cloned()
            .zip(self.t.iter().cloned())
            .collect()
    }

    /// Replaces the tensor under `key`; false if there is none.
    fn set(&mut self, key: &str, value: Tensor) -> bool {
        match self.keys.iter().position(|k| k == key) {
            Some(i) => {
                self.t[i] = value;
                true
            }
            None => false,
        }
    }
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

/// Linear -> ReLU -> ... -> Linear over `p` = [w0, b0, w1, b1, ...]: `mlp_head` in both
/// encoders. Returns the input of each Linear (for the backward) and the output.
fn relu_mlp(x: &Tensor, p: &[Tensor]) -> Result<(Vec<Tensor>, Tensor)> {
    let mut inputs = vec![x.clone()];
    let mut y = x.clone();
    for (i, wb) in p.chunks(2).enumerate() {
        y = linear(&y, &wb[0], &wb[1])?;
        if 2 * (i + 1) < p.len() {
            y = y.relu()?;
            inputs.push(y.clone());
        }
    }
    Ok((inputs, y))
}

/// Backward of `relu_mlp` given the output's gradient; `keys` name `p`. Returns d x.
fn relu_mlp_backward(
    d_out: &Tensor,
    p: &[Tensor],
    keys: &[String],
    inputs: &[Tensor],
    grads: &mut crate::nn::Grads,
) -> Result<Tensor> {
    let mut d = d_out.clone();
    for i in (0..inputs.len()).rev() {
        let a = &inputs[i];
        grads.add(&keys[2 * i], d.t()?.matmul(a)?)?;
        grads.add(&keys[2 * i + 1], d.sum(0)?)?;
        d = d.matmul(&p[2 * i])?;
        if i > 0 {
            // a = relu(h): a > 0 exactly where h > 0.
            d = (d * a.gt(0.0)?.to_dtype(a.dtype())?)?;
        }
    }
    Ok(d)
}
