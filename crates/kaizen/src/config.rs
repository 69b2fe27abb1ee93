//! Model hyper-parameters, read from an HF `config.json` (transformers 4.x and 5.x styles) or from
//! GGUF metadata. One struct serves every architecture: the fields every decoder has, then the
//! optional features (biases, QK-norm, sliding windows, soft-capping, ...) that the architecture
//! files in `models/` map from their config keys. Fields a model does not use keep defaults.

use std::path::Path;

use kaizen_data::guard::one_line;
use kaizen_data::quote;
use serde_json::{json, Map, Value};

use crate::models::arch::{self, ArchSpec};
use crate::{Error, Result};

/// The architectures kaizen implements (one small file each under `models/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    GptNeoX,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3,
}

impl Architecture {
    pub const ALL: [Architecture; 8] = [
        Architecture::GptNeoX,
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Phi3,
        Architecture::Gemma2,
        Architecture::Gemma3,
    ];

    /// The parts, names and config mapping of this architecture.
    pub fn spec(self) -> &'static ArchSpec {
        arch::spec(self)
    }

    pub fn name(self) -> &'static str {
        self.spec().model_types[0]
    }

    /// The `model_type` values kaizen reads, for error messages.
    pub fn supported() -> String {
        Architecture::ALL
            .iter()
            .flat_map(|a| a.spec().model_types)
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The architecture whose config.json says `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.spec().model_types.contains(&model_type))
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

#[derive(Debug, Clone, PartialEq)]
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
    /// Sliding-window layers' own rotary base, unscaled (Gemma 3 `rope_local_base_freq`).
    pub rope_local_theta: Option<f64>,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    /// GPT-NeoX: attention and MLP read the same input (true) or run one after the other (false).
    pub use_parallel_residual: bool,
    /// Bias on the q/k/v projections (GPT-NeoX, Qwen 2, `attention_bias`).
    pub attention_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections (`mlp_bias`; GPT-NeoX always).
    pub mlp_bias: bool,
    /// RMSNorm over head_dim on q and k before rotary (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// Keys a sliding-window layer sees: the query's own position and the `window - 1` before it.
    pub sliding_window: Option<usize>,
    /// Per layer: true where the layer attends within `sliding_window` (HF `layer_types`).
    pub sliding_layers: Vec<bool>,
    /// Gemma 2/3: attention scores are scaled by `query_pre_attn_scalar^-0.5` (else head_dim's).
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: scores become `cap * tanh(score / cap)`.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits become `cap * tanh(logit / cap)`.
    pub final_logit_softcapping: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Written back as it was read: some config classes default it to an id beyond a small
    /// vocabulary (Phi-3: 32000).
    pub pad_token_id: Option<u32>,
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
    /// The fields every decoder has are read here; the architecture's file maps the rest.
    pub fn from_hf_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let c = Fields(map);
        let model_type = c.str("model_type")?.ok_or_else(|| {
            format!(
                "no \"model_type\" field; kaizen supports {}",
                Architecture::supported()
            )
        })?;
        let architecture = Architecture::from_model_type(&model_type).ok_or_else(|| {
            format!(
                "model_type {} is not supported; kaizen supports {}",
                quote(&model_type),
                Architecture::supported()
            )
        })?;
        let spec = architecture.spec();
        (spec.refuse)(&c)?;
        let hidden_size = c.req_size("hidden_size", limits::HIDDEN)?;
        let num_attention_heads = c.req_size("num_attention_heads", limits::HEADS)?;
        if hidden_size % num_attention_heads != 0 && c.usize("head_dim")?.is_none() {
            return Err(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads} and no head_dim is given"
            ));
        }
        let head_dim = match c.size("head_dim", limits::HEAD_DIM)? {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };
        let num_key_value_heads = c
            .size("num_key_value_heads", limits::HEADS)?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads {num_key_value_heads}"
            ));
        }
        // Rotary settings: transformers 5.x nests them in `rope_parameters` (per layer type for
        // Gemma 3: the architecture file reads those); 4.x has top-level `rope_theta` /
        // `rotary_emb_base`, `rotary_pct` / `partial_rotary_factor`, `rope_scaling`.
        let rope = match map.get("rope_parameters") {
            Some(Value::Object(p)) if !p.contains_key("full_attention") => Some(p),
            Some(Value::Object(_)) | Some(Value::Null) | None => None,
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
        .unwrap_or(spec.defaults.rope_theta);
        let pct = first_f64(&[
            rp.as_ref()
                .map(|r| r.f64("partial_rotary_factor"))
                .transpose()?
                .flatten(),
            c.f64("partial_rotary_factor")?,
            c.f64("rotary_pct")?,
        ])
        .unwrap_or(spec.defaults.rotary_pct);
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
        let act = match (c.str("hidden_activation")?, c.str("hidden_act")?) {
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => spec.defaults.hidden_act.into(),
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
        let num_hidden_layers = c.req_size("num_hidden_layers", limits::LAYERS)?;
        let mut cfg = ModelConfig {
            architecture,
            vocab_size: c.req_size("vocab_size", limits::VOCAB)?,
            hidden_size,
            intermediate_size: c.req_size("intermediate_size", limits::INTERMEDIATE)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rotary_dim,
            rope_theta,
            rope_scaling,
            rope_local_theta: None,
            max_position_embeddings: c
                .size("max_position_embeddings", limits::CONTEXT)?
                .unwrap_or(2048),
            norm_eps: first_f64(&[c.f64("rms_norm_eps")?, c.f64("layer_norm_eps")?])
                .unwrap_or(1e-5),
            hidden_act: parse_activation(&act)?,
            tie_word_embeddings: c
                .bool("tie_word_embeddings")?
                .unwrap_or(spec.defaults.tie_word_embeddings),
            use_parallel_residual: false,
            attention_bias: c
                .bool("attention_bias")?
                .unwrap_or(spec.defaults.attention_bias),
            o_bias: false,
            mlp_bias: c.bool("mlp_bias")?.unwrap_or(false),
            qk_norm: false,
            sliding_window: c.usize("sliding_window")?,
            sliding_layers: vec![false; num_hidden_layers],
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            bos_token_id: c.usize("bos_token_id")?.map(|v| v as u32),
            eos_token_ids,
            pad_token_id: c.usize("pad_token_id")?.map(|v| v as u32),
            model_type,
        };
        cfg.o_bias = cfg.attention_bias;
        (spec.read)(&c, &mut cfg)?;
        if let Some(types) = c.get("layer_types") {
            cfg.sliding_layers = parse_layer_types(types, num_hidden_layers)?;
        }
        if cfg.sliding_window.is_none() {
            cfg.sliding_layers.fill(false);
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects values no model can run with; the message names the field (HF names: a GGUF's
    /// own keys are checked as they are read, in `checkpoint/gguf.rs`).
    pub fn check(&self) -> std::result::Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("\"{name}\" must be a positive number, found {v}"))
            }
        };
        for (key, v, max) in [
            ("vocab_size", self.vocab_size, limits::VOCAB),
            ("hidden_size", self.hidden_size, limits::HIDDEN),
            (
                "intermediate_size",
                self.intermediate_size,
                limits::INTERMEDIATE,
            ),
            ("num_hidden_layers", self.num_hidden_layers, limits::LAYERS),
            (
                "num_attention_heads",
                self.num_attention_heads,
                limits::HEADS,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                limits::HEADS,
            ),
            ("head_dim", self.head_dim, limits::HEAD_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                limits::CONTEXT,
            ),
        ] {
            bounded(key, v as u64, max)?;
        }
        check_rotary(
            "rotary dims (head_dim x partial_rotary_factor)",
            self.rotary_dim,
            self.head_dim,
        )?;
        check_theta("rope_theta", self.rope_theta)?;
        check_eps("layer_norm_eps / rms_norm_eps", self.norm_eps)?;
        if let Some(t) = self.rope_local_theta {
            check_theta("rope_local_base_freq", t)?;
        }
        for (name, v) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(v) = v {
                positive(name, v)?;
            }
        }
        if self.sliding_window == Some(0) {
            return Err("\"sliding_window\" must be at least 1, found 0".into());
        }
        if self.sliding_layers.len() != self.num_hidden_layers {
            return Err(format!(
                "\"layer_types\" lists {} layers but num_hidden_layers is {}",
                self.sliding_layers.len(),
                self.num_hidden_layers
            ));
        }
        match self.rope_scaling {
            RopeScaling::Linear { factor } => positive("rope_scaling.factor", factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("rope_scaling.factor", factor)?;
                positive("rope_scaling.low_freq_factor", low_freq_factor)?;
                positive("rope_scaling.high_freq_factor", high_freq_factor)?;
                positive(
                    "rope_scaling.original_max_position_embeddings",
                    original_max_position_embeddings,
                )
            }
            RopeScaling::None => Ok(()),
        }
    }

    /// The optional features in use, for people: e.g. "QK-norm, sliding window 512 on 15 of 18
    /// layers (rotary theta 10000 there)"; "none" when there are none.
    pub fn features(&self) -> String {
        let mut f = Vec::new();
        if self.attention_bias {
            f.push(
                if self.o_bias {
                    "q/k/v/o bias"
                } else {
                    "q/k/v bias"
                }
                .to_string(),
            );
        }
        if self.qk_norm {
            f.push("QK-norm".into());
        }
        let sliding = self.sliding_layers.iter().filter(|&&s| s).count();
        if let (Some(w), true) = (self.sliding_window, sliding > 0) {
            let mut s = format!(
                "sliding window {w} on {sliding} of {} layers",
                self.num_hidden_layers
            );
            if let Some(t) = self.rope_local_theta {
                s.push_str(&format!(" (rotary theta {t} there)"));
            }
            f.push(s);
        }
        if let Some(q) = self.query_pre_attn_scalar {
            f.push(format!("query_pre_attn_scalar {q}"));
        }
        if let Some(c) = self.attn_logit_softcapping {
            f.push(format!("attention soft-cap {c}"));
        }
        if let Some(c) = self.final_logit_softcapping {
            f.push(format!("final logit soft-cap {c}"));
        }
        match f.is_empty() {
            true => "none".into(),
            false => f.join(", "),
        }
    }

    /// Every `pattern`-th layer global, the others within the sliding window if there is one
    /// (Gemma 2: 2, Gemma 3: 6).
    pub fn slide_all_but_every(&mut self, pattern: usize) {
        let on = self.sliding_window.is_some();
        for (i, s) in self.sliding_layers.iter_mut().enumerate() {
            *s = on && (i + 1) % pattern.max(1) != 0;
        }
    }

    /// The window of layer `i`, if it attends within one.
    pub fn window(&self, i: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.sliding_layers[i])
    }

    /// An HF `config.json` for this model that transformers 5 loads with the same numerics and
    /// [`ModelConfig::from_hf_json`] reads back to an equal config. Rotary settings are written
    /// both as transformers 5 writes them (`rope_parameters`) and in the 4.x top-level form
    /// (`rope_theta`, `rope_scaling`), with the same values, so readers of either generation
    /// agree; the architecture's file adds its own keys. Weights are described as float32.
    pub fn to_hf_json(&self) -> Value {
        let spec = self.architecture.spec();
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
        let mut rope = scaling.clone();
        rope.insert("rope_theta".into(), json!(self.rope_theta));
        let pct = rotary_fraction(self.rotary_dim, self.head_dim);
        if pct != spec.defaults.rotary_pct || self.rotary_dim != self.head_dim {
            rope.insert("partial_rotary_factor".into(), json!(pct));
        }
        let act = match self.hidden_act {
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut c = json!({
            "architectures": [spec.hf_class],
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
            "pad_token_id": self.pad_token_id,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "dtype": "float32",
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let m = c.as_object_mut().expect("a JSON object");
        if self.rope_scaling != RopeScaling::None {
            m.insert("rope_scaling".into(), Value::Object(scaling));
        }
        if self.rotary_dim != self.head_dim {
            m.insert("partial_rotary_factor".into(), json!(pct));
        }
        m.insert(spec.defaults.eps_key.into(), json!(self.norm_eps));
        if self.sliding_window.is_some() {
            let types: Vec<&str> = self
                .sliding_layers
                .iter()
                .map(|&s| match s {
                    true => "sliding_attention",
                    false => "full_attention",
                })
                .collect();
            m.insert("layer_types".into(), json!(types));
        }
        (spec.write)(self, m);
        c
    }

    /// Names of the modules PEFT's LoRA targets by default
    /// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    pub fn default_qv_modules(&self) -> &'static [&'static str] {
        self.architecture.spec().lora_targets
    }

    /// PEFT's default IA3 targets and feed-forward modules for this architecture
    /// (`TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` / `..._FEEDFORWARD_MODULES_MAPPING`).
    pub fn default_ia3_modules(&self) -> (&'static [&'static str], &'static [&'static str]) {
        self.architecture.spec().ia3_targets
    }

    /// PEFT's default LN-tuning targets for this architecture (empty: none).
    pub fn default_ln_tuning_modules(&self) -> &'static [&'static str] {
        self.architecture.spec().ln_tuning_targets
    }

    /// Where bottleneck adapters sit for this architecture: (the attention output projection,
    /// the MLP output projection). Houlsby adapts both outputs, Pfeiffer the MLP's only.
    pub fn default_bottleneck_modules(&self) -> (String, String) {
        let n = &self.architecture.spec().names;
        (
            format!("{}.{}", n.attn, n.o),
            format!("{}.{}", n.mlp, n.down),
        )
    }

    /// Total parameter count of the dense model (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let spec = self.architecture.spec();
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        let norm = |n: usize| match spec.norm {
            arch::NormKind::Layer => 2 * n,
            _ => n,
        };
        let attn = h * (q + 2 * kv)
            + q * h
            + if self.attention_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 }
            + if self.qk_norm {
                2 * norm(self.head_dim)
            } else {
                0
            };
        let mlp = match spec.mlp {
            arch::MlpKind::Plain => 2 * h * f + if self.mlp_bias { f + h } else { 0 },
            _ => 3 * h * f + if self.mlp_bias { 2 * f + h } else { 0 },
        };
        let norms = if spec.sandwich { 4 } else { 2 };
        let per_layer = attn + mlp + norms * norm(h);
        v * h + head + self.num_hidden_layers * per_layer + norm(h)
    }
}

/// Bounds on the sizes that drive allocations, generous for every released model (the largest
/// known is noted) and small enough that a damaged or hostile file cannot make kaizen allocate
/// terabytes, or loop for hours, before a single tensor is checked. Sizes are also checked
/// against the tensors present before any layer is built (`checkpoint::check_sizes`).
pub mod limits {
    /// Decoder layers (Llama 3.1 405B: 126).
    pub const LAYERS: usize = 1024;
    /// Attention heads, query or key/value (Llama 3.1 405B: 128).
    pub const HEADS: usize = 1024;
    /// Width of one head (Gemma 2: 256).
    pub const HEAD_DIM: usize = 1024;
    /// Hidden size (Llama 3.1 405B: 16384).
    pub const HIDDEN: usize = 1 << 17;
    /// MLP width (Llama 3.1 405B: 53248).
    pub const INTERMEDIATE: usize = 1 << 20;
    /// Vocabulary (Gemma 3: 262144).
    pub const VOCAB: usize = 1 << 22;
    /// Context length (Llama 4 Scout: 10M).
    pub const CONTEXT: usize = 1 << 24;
    /// Largest rotary base (long-context models use up to about 1e8).
    pub const ROPE_THETA: f64 = 1e12;
}

/// `v` for a size `key` that must lie in `1..=max`; the message names the key and the range.
pub(crate) fn bounded(key: &str, v: u64, max: usize) -> std::result::Result<usize, String> {
    match (1..=max as u64).contains(&v) {
        true => Ok(v as usize),
        false => Err(format!("\"{key}\" is {v}; it must be between 1 and {max}")),
    }
}

/// A norm epsilon: finite, above 0 and below 1 (real ones are 1e-5 to 1e-12).
pub(crate) fn check_eps(key: &str, v: f64) -> std::result::Result<(), String> {
    match v > 0.0 && v < 1.0 {
        true => Ok(()),
        false => Err(format!(
            "\"{key}\" is {v}; it must be a number above 0 and below 1 (typically 1e-5 or 1e-6)"
        )),
    }
}

/// A rotary base: between 1 and [`limits::ROPE_THETA`] (real ones are 1e4 to 1e8).
pub(crate) fn check_theta(key: &str, v: f64) -> std::result::Result<(), String> {
    match (1.0..=limits::ROPE_THETA).contains(&v) {
        true => Ok(()),
        false => Err(format!(
            "\"{key}\" is {v}; it must be between 1 and {:e} (typically 10000 to 1e6)",
            limits::ROPE_THETA
        )),
    }
}

/// The number of rotated dims of each head: even, at least 2 and at most `head_dim`.
pub(crate) fn check_rotary(
    key: &str,
    rotary: usize,
    head_dim: usize,
) -> std::result::Result<(), String> {
    match (2..=head_dim).contains(&rotary) && rotary.is_multiple_of(2) {
        true => Ok(()),
        false => Err(format!(
            "\"{key}\" is {rotary}; it must be an even number between 2 and head_dim ({head_dim})"
        )),
    }
}

/// A number as JSON, an integer when it is one (transformers' strict config fields such as
/// Gemma's `query_pre_attn_scalar` refuse `256.0`).
pub fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// HF `layer_types`: "sliding_attention" or "full_attention" per layer.
fn parse_layer_types(v: &Value, layers: usize) -> std::result::Result<Vec<bool>, String> {
    let Value::Array(a) = v else {
        return Err("\"layer_types\" must be a list".into());
    };
    if a.len() != layers {
        return Err(format!(
            "\"layer_types\" lists {} layers but num_hidden_layers is {layers}",
            a.len()
        ));
    }
    a.iter()
        .map(|t| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(format!(
                "\"layer_types\" holds {}; expected \"sliding_attention\" or \"full_attention\"",
                shown(t)
            )),
        })
        .collect()
}

pub(crate) fn parse_rope_scaling(s: &Fields) -> std::result::Result<RopeScaling, String> {
    let kind = match s.str("rope_type")? {
        Some(t) => t,
        None => s.str("type")?.unwrap_or_else(|| "default".into()),
    };
    let factor = |s: &Fields| {
        s.f64("factor")?
            .ok_or_else(|| format!("rope type {} needs \"factor\"", quote(&kind)))
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
                "rope type {} is not supported (supported: default, linear, llama3)",
                quote(other)
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
                "hidden_act {} is not supported (gelu, gelu_new, relu, silu)",
                quote(other)
            ))
        }
    })
}

/// `rotary_dim / head_dim`, nudged up where needed so that `int(head_dim * f)` (how both
/// transformers and [`ModelConfig::from_hf_json`] turn it back into a count) gives `rotary_dim`.
pub(crate) fn rotary_fraction(rotary_dim: usize, head_dim: usize) -> f64 {
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
/// (Architecture files read their own keys through it.)
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    pub fn str(&self, key: &str) -> std::result::Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!(
                "field \"{key}\" must be a string, found {}",
                shown(v)
            )),
        }
    }
    pub fn f64(&self, key: &str) -> std::result::Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("field \"{key}\" must be a number, found {}", shown(v))),
        }
    }
    pub fn usize(&self, key: &str) -> std::result::Result<Option<usize>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                format!(
                    "field \"{key}\" must be a non-negative integer, found {}",
                    shown(v)
                )
            }),
        }
    }
    pub fn req_usize(&self, key: &str) -> std::result::Result<usize, String> {
        match self.usize(key)? {
            Some(0) => Err(format!("field \"{key}\" must be positive, found 0")),
            Some(v) => Ok(v),
            None => Err(format!("missing field \"{key}\"")),
        }
    }
    /// An optional size that must lie in `1..=max` (see [`limits`]).
    pub fn size(&self, key: &str, max: usize) -> std::result::Result<Option<usize>, String> {
        self.usize(key)?
            .map(|v| bounded(key, v as u64, max))
            .transpose()
    }
    /// A required size that must lie in `1..=max` (see [`limits`]).
    pub fn req_size(&self, key: &str, max: usize) -> std::result::Result<usize, String> {
        self.size(key, max)?
            .ok_or_else(|| format!("missing field \"{key}\""))
    }
    pub fn bool(&self, key: &str) -> std::result::Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!(
                "field \"{key}\" must be true or false, found {}",
                shown(v)
            )),
        }
    }
}

/// A JSON value from a file, for an error message: serde_json escapes its control characters;
/// a long one is cut (see [`one_line`]).
pub fn shown(v: &Value) -> String {
    one_line(&v.to_string())
}
