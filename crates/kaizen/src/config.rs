//! Model hyper-parameters, read from an HF `config.json` (transformers 4.x and 5.x styles) or from
//! GGUF metadata. One struct serves both architectures; fields a model does not use keep defaults.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// The architectures kaizen implements (one file each under `models/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    GptNeoX,
    Llama,
}

impl Architecture {
    /// `model_type` values accepted in config.json and what each maps to.
    pub const SUPPORTED: &'static str =
        "gpt_neox, llama, mistral (without sliding window), qwen2 (without sliding window)";

    pub fn name(self) -> &'static str {
        match self {
            Architecture::GptNeoX => "gpt_neox",
            Architecture::Llama => "llama",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU (HF "gelu").
    Gelu,
    /// tanh-approximated GELU (HF "gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
    /// SiLU / swish, used gated in Llama's SwiGLU.
    Silu,
}

/// Frequency scaling of rotary embeddings (HF `rope_scaling` / `rope_parameters.rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// `model_type` as written in the file.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Number of leading dims of each head that rotary embeddings rotate (even).
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    /// GPT-NeoX: attention and MLP read the same input (true) or run one after the other (false).
    pub use_parallel_residual: bool,
    /// Bias on the attention projections (GPT-NeoX: all four; qwen2: q/k/v only).
    pub attention_bias: bool,
    /// Bias on the Llama MLP projections (`mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            Error::config(
                path,
                format!("not valid JSON ({e}); expected an HF config.json"),
            )
        })?;
        let Value::Object(map) = json else {
            return Err(Error::config(path, "expected a JSON object"));
        };
        Self::from_hf_json(&map).map_err(|msg| Error::config(path, msg))
    }

    /// Parses the fields of an HF config.json object; the error is a message without the path.
    pub fn from_hf_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let c = Fields(map);
        let model_type = c.str("model_type")?.ok_or_else(|| {
            format!(
                "no \"model_type\" field; kaizen supports {}",
                Architecture::SUPPORTED
            )
        })?;
        let architecture = match model_type.as_str() {
            "gpt_neox" => Architecture::GptNeoX,
            "llama" | "mistral" | "qwen2" => Architecture::Llama,
            other => {
                return Err(format!(
                    "model_type \"{other}\" is not supported; kaizen supports {}",
                    Architecture::SUPPORTED
                ))
            }
        };
        if matches!(model_type.as_str(), "mistral" | "qwen2") {
            let window = c.usize("sliding_window")?;
            let enabled = c
                .bool("use_sliding_window")?
                .unwrap_or(model_type == "mistral");
            if window.is_some() && enabled {
                return Err(format!(
                    "{model_type} with sliding-window attention is not supported (sliding_window is set)"
                ));
            }
        }
        let hidden_size = c.req_usize("hidden_size")?;
        let num_attention_heads = c.req_usize("num_attention_heads")?;
        if num_attention_heads == 0
            || hidden_size % num_attention_heads != 0 && c.usize("head_dim")?.is_none()
        {
            return Err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads} and no head_dim is given"
            ));
        }
        let head_dim = c
            .usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);
        let num_key_value_heads = c
            .usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads {num_key_value_heads}"
            ));
        }
        // Rotary settings: transformers 5.x nests them in `rope_parameters`; 4.x has top-level
        // `rope_theta`/`rotary_emb_base`, `rotary_pct`/`partial_rotary_factor`, `rope_scaling`.
        let rope = match map.get("rope_parameters") {
            Some(Value::Object(p)) => Some(p),
            Some(Value::Null) | None => None,
            Some(_) => return Err("\"rope_parameters\" must be an object".into()),
        };
        let rp = rope.map(Fields);
        let rope_theta = first_f64(&[
            rp.as_ref()
                .map(|r| r.f64("rope_theta"))
                .transpose()?
                .flatten(),
            c.f64("rope_theta")?,
            c.f64("rotary_emb_base")?,
        ])
        .unwrap_or(10000.0);
        let default_pct = if architecture == Architecture::GptNeoX {
            0.25
        } else {
            1.0
        };
        let pct = first_f64(&[
            rp.as_ref()
                .map(|r| r.f64("partial_rotary_factor"))
                .transpose()?
                .flatten(),
            c.f64("partial_rotary_factor")?,
            c.f64("rotary_pct")?,
        ])
        .unwrap_or(default_pct);
        if !(pct > 0.0 && pct <= 1.0) {
            return Err(format!("rotary fraction {pct} must be in (0, 1]"));
        }
        let rotary_dim = ((head_dim as f64 * pct) as usize) & !1;
        let scaling_obj = match (rope, map.get("rope_scaling")) {
            (Some(p), _) => Some(p),
            (None, Some(Value::Object(s))) => Some(s),
            (None, Some(Value::Null) | None) => None,
            (None, Some(_)) => return Err("\"rope_scaling\" must be an object or null".into()),
        };
        let rope_scaling = match scaling_obj {
            Some(s) => parse_rope_scaling(&Fields(s))?,
            None => RopeScaling::None,
        };
        let act = c.str("hidden_act")?.unwrap_or_else(|| match architecture {
            Architecture::GptNeoX => "gelu".into(),
            Architecture::Llama => "silu".into(),
        });
        let hidden_act = parse_activation(&act)?;
        let eps_key = match architecture {
            Architecture::GptNeoX => "layer_norm_eps",
            Architecture::Llama => "rms_norm_eps",
        };
        let eos_token_ids = match map.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: c.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.req_usize("intermediate_size")?,
            num_hidden_layers: c.req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            rope_theta,
            rope_scaling,
            max_position_embeddings: c.usize("max_position_embeddings")?.unwrap_or(2048),
            norm_eps: c.f64(eps_key)?.unwrap_or(1e-5),
            hidden_act,
            tie_word_embeddings: c.bool("tie_word_embeddings")?.unwrap_or(false),
            use_parallel_residual: c.bool("use_parallel_residual")?.unwrap_or(true),
            attention_bias: match architecture {
                Architecture::GptNeoX => c.bool("attention_bias")?.unwrap_or(true),
                Architecture::Llama => {
                    model_type == "qwen2" || c.bool("attention_bias")?.unwrap_or(false)
                }
            },
            mlp_bias: c.bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: c.usize("bos_token_id")?.map(|v| v as u32),
            eos_token_ids,
            model_type,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects values no model can run with; the message names the field.
    pub fn check(&self) -> std::result::Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("\"{name}\" must be a positive number, found {v}"))
            }
        };
        positive(
            "max_position_embeddings",
            self.max_position_embeddings as f64,
        )?;
        positive("rope_theta", self.rope_theta)?;
        positive("layer_norm_eps / rms_norm_eps", self.norm_eps)?;
        match self.rope_scaling {
            RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } => {
                positive("rope_scaling.factor", factor)
            }
            RopeScaling::None => Ok(()),
        }
    }

    /// An HF `config.json` for this model that transformers 5 loads with the same numerics and
    /// [`ModelConfig::from_hf_json`] reads back to an equal config. Rotary settings are written
    /// both as transformers 5 writes them (`rope_parameters`) and in the 4.x top-level form
    /// (`rope_theta`, `rope_scaling`; GPT-NeoX `rotary_emb_base`, `rotary_pct`), with the same
    /// values, so readers of either generation agree. Weights are described as float32.
    pub fn to_hf_json(&self) -> Value {
        let neox = self.architecture == Architecture::GptNeoX;
        let mut rope = Map::new();
        let mut scaling = Map::new();
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                scaling.insert("factor".into(), json!(factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                scaling.insert("factor".into(), json!(factor));
                scaling.insert("low_freq_factor".into(), json!(low_freq_factor));
                scaling.insert("high_freq_factor".into(), json!(high_freq_factor));
                let omax = *original_max_position_embeddings;
                let omax = if omax.fract() == 0.0 {
                    json!(omax as u64)
                } else {
                    json!(omax)
                };
                scaling.insert("original_max_position_embeddings".into(), omax);
            }
        }
        let rope_type = match self.rope_scaling {
            RopeScaling::None => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
        };
        scaling.insert("rope_type".into(), json!(rope_type));
        rope.extend(scaling.clone());
        rope.insert("rope_theta".into(), json!(self.rope_theta));
        let pct = rotary_fraction(self.rotary_dim, self.head_dim);
        if neox || self.rotary_dim != self.head_dim {
            rope.insert("partial_rotary_factor".into(), json!(pct));
        }
        let act = match self.hidden_act {
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        };
        let architectures = match self.model_type.as_str() {
            "gpt_neox" => "GPTNeoXForCausalLM",
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut c = json!({
            "architectures": [architectures],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "dtype": "float32",
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let m = c.as_object_mut().expect("a JSON object");
        if self.rope_scaling != RopeScaling::None {
            m.insert("rope_scaling".into(), Value::Object(scaling));
        }
        if neox {
            m.insert("layer_norm_eps".into(), json!(self.norm_eps));
            m.insert(
                "use_parallel_residual".into(),
                json!(self.use_parallel_residual),
            );
            m.insert("rotary_emb_base".into(), json!(self.rope_theta));
            m.insert("rotary_pct".into(), json!(pct));
        } else {
            m.insert("rms_norm_eps".into(), json!(self.norm_eps));
            m.insert("mlp_bias".into(), json!(self.mlp_bias));
            if self.rotary_dim != self.head_dim {
                m.insert("partial_rotary_factor".into(), json!(pct));
            }
            if self.model_type != "llama" {
                // kaizen reads these models only without sliding-window attention.
                m.insert("use_sliding_window".into(), json!(false));
                m.insert("sliding_window".into(), Value::Null);
            }
        }
        c
    }

    /// Names of the attention query and value projections: PEFT's default LoRA targets
    /// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    pub fn default_qv_modules(&self) -> &'static [&'static str] {
        match self.architecture {
            Architecture::GptNeoX => &["query_key_value"],
            Architecture::Llama => &["q_proj", "v_proj"],
        }
    }

    /// PEFT's default IA3 targets and feed-forward modules for this architecture
    /// (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` / `..._FEEDFORWARD_MODULES_MAPPING`).
    pub fn default_ia3_modules(&self) -> (&'static [&'static str], &'static [&'static str]) {
        match self.architecture {
            Architecture::GptNeoX => (&["query_key_value", "dense_4h_to_h"], &["dense_4h_to_h"]),
            Architecture::Llama => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
        }
    }

    /// Where bottleneck adapters sit for this architecture: (the attention output projection,
    /// the MLP output projection). Houlsby adapts both outputs, Pfeiffer the MLP's only.
    pub fn default_bottleneck_modules(&self) -> (&'static str, &'static str) {
        match self.architecture {
            Architecture::GptNeoX => ("attention.dense", "mlp.dense_4h_to_h"),
            Architecture::Llama => ("self_attn.o_proj", "mlp.down_proj"),
        }
    }

    /// Total parameter count of the dense model (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        let per_layer = match self.architecture {
            Architecture::GptNeoX => {
                // qkv + dense (+ biases), two LayerNorms, MLP with biases.
                (h * 3 * q + 3 * q) + (q * h + h) + 4 * h + (h * f + f) + (f * h + h)
            }
            Architecture::Llama => {
                let bias = if self.attention_bias { q + 2 * kv } else { 0 };
                let mlp_bias = if self.mlp_bias { 2 * f + h } else { 0 };
                h * q + 2 * h * kv + q * h + bias + 2 * h + 3 * h * f + mlp_bias
            }
        };
        let final_norm = match self.architecture {
            Architecture::GptNeoX => 2 * h,
            Architecture::Llama => h,
        };
        v * h + head + self.num_hidden_layers * per_layer + final_norm
    }
}

fn parse_rope_scaling(s: &Fields) -> std::result::Result<RopeScaling, String> {
    let kind = match s.str("rope_type")? {
        Some(t) => t,
        None => s.str("type")?.unwrap_or_else(|| "default".into()),
    };
    let factor = |s: &Fields| {
        s.f64("factor")?
            .ok_or_else(|| format!("rope type \"{kind}\" needs \"factor\""))
    };
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor(s)? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor(s)?,
            low_freq_factor: s
                .f64("low_freq_factor")?
                .ok_or("llama3 rope needs low_freq_factor")?,
            high_freq_factor: s
                .f64("high_freq_factor")?
                .ok_or("llama3 rope needs high_freq_factor")?,
            original_max_position_embeddings: s
                .f64("original_max_position_embeddings")?
                .ok_or("llama3 rope needs original_max_position_embeddings")?,
        },
        other => {
            return Err(format!(
                "rope type \"{other}\" is not supported (supported: default, linear, llama3)"
            ))
        }
    })
}

pub(crate) fn parse_activation(name: &str) -> std::result::Result<Activation, String> {
    Ok(match name {
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "relu" => Activation::Relu,
        "silu" | "swish" => Activation::Silu,
        other => {
            return Err(format!(
                "hidden_act \"{other}\" is not supported (gelu, gelu_new, relu, silu)"
            ))
        }
    })
}

/// `rotary_dim / head_dim`, nudged up where needed so that `int(head_dim * f)` (how both
/// transformers and [`ModelConfig::from_hf_json`] turn it back into a count) gives `rotary_dim`.
fn rotary_fraction(rotary_dim: usize, head_dim: usize) -> f64 {
    let mut f = rotary_dim as f64 / head_dim as f64;
    while ((head_dim as f64 * f) as usize) < rotary_dim {
        f = f64::from_bits(f.to_bits() + 1);
    }
    f
}

fn first_f64(options: &[Option<f64>]) -> Option<f64> {
    options.iter().flatten().next().copied()
}

/// Typed access to a JSON object with messages that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn str(&self, key: &str) -> std::result::Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!("field \"{key}\" must be a string, found {v}")),
        }
    }
    fn f64(&self, key: &str) -> std::result::Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("field \"{key}\" must be a number, found {v}")),
        }
    }
    fn usize(&self, key: &str) -> std::result::Result<Option<usize>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                format!("field \"{key}\" must be a non-negative integer, found {v}")
            }),
        }
    }
    fn req_usize(&self, key: &str) -> std::result::Result<usize, String> {
        match self.usize(key)? {
            Some(0) => Err(format!("field \"{key}\" must be positive, found 0")),
            Some(v) => Ok(v),
            None => Err(format!("missing field \"{key}\"")),
        }
    }
    fn bool(&self, key: &str) -> std::result::Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("field \"{key}\" must be true or false, found {v}")),
        }
    }
}
