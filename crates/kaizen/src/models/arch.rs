//! What an architecture is, in data: which decoder parts it uses, the checkpoint's module names,
//! its config keys and defaults, and PEFT's default targets. Each architecture file holds one
//! [`ArchSpec`]; the decoder (`decoder.rs`) builds any of them from the same parts.

use serde_json::{Map, Value};

use super::{gemma2, gemma3, gpt_neox, llama, mistral, phi3, qwen2, qwen3};
use crate::config::{Architecture, Fields, ModelConfig};

/// The normalisation layers of a decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// LayerNorm with bias (GPT-NeoX).
    Layer,
    /// RMSNorm, gain `w` (Llama and most others).
    Rms,
    /// Gemma's RMSNorm, gain `1 + w`, computed in f32.
    RmsPlusOne,
}

/// How q, k and v come out of the checkpoint's projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// Three layers, `q_proj`, `k_proj`, `v_proj`.
    Split,
    /// One layer whose rows are grouped per head as `[q_h; k_h; v_h]` (GPT-NeoX).
    Interleaved,
    /// One layer whose rows are all q, then all k, then all v (Phi-3 `qkv_proj`).
    Concat,
}

/// The feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(act(up(x)))` (GPT-NeoX).
    Plain,
    /// `down(act(gate(x)) * up(x))`: SwiGLU, GeGLU.
    Gated,
    /// The same with gate and up in one layer, gate rows first (Phi-3 `gate_up_proj`).
    GatedFused,
}

/// The checkpoint's module names: model-level paths, and within layer `i` (`{layers}.{i}`) the
/// norms, the attention module and its projections, the MLP module and its projections. A name
/// the architecture's parts do not use is never read.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    pub embed: &'static str,
    pub layers: &'static str,
    pub final_norm: &'static str,
    pub head: &'static str,
    /// Before attention.
    pub attn_norm: &'static str,
    /// After attention, before the residual add (Gemma's sandwich norms).
    pub attn_post_norm: &'static str,
    /// Before the MLP.
    pub mlp_norm: &'static str,
    /// After the MLP, before the residual add (Gemma).
    pub mlp_post_norm: &'static str,
    pub attn: &'static str,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    /// The fused projection (`Interleaved` / `Concat`).
    pub qkv: &'static str,
    pub o: &'static str,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    pub mlp: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    /// The fused gate and up projection (`GatedFused`).
    pub gate_up: &'static str,
}

/// HF's Llama names, which most architectures share.
pub const LLAMA_NAMES: Names = Names {
    embed: "model.embed_tokens",
    layers: "model.layers",
    final_norm: "model.norm",
    head: "lm_head",
    attn_norm: "input_layernorm",
    attn_post_norm: "post_attention_layernorm",
    mlp_norm: "post_attention_layernorm",
    mlp_post_norm: "post_feedforward_layernorm",
    attn: "self_attn",
    q: "q_proj",
    k: "k_proj",
    v: "v_proj",
    qkv: "qkv_proj",
    o: "o_proj",
    q_norm: "q_norm",
    k_norm: "k_norm",
    mlp: "mlp",
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
    gate_up: "gate_up_proj",
};

/// Values a config.json may leave out, as the architecture's transformers config class
/// defaults them.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub rope_theta: f64,
    pub rotary_pct: f64,
    pub hidden_act: &'static str,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// The config key of the norms' epsilon.
    pub eps_key: &'static str,
}

pub const LLAMA_DEFAULTS: Defaults = Defaults {
    rope_theta: 10000.0,
    rotary_pct: 1.0,
    hidden_act: "silu",
    tie_word_embeddings: false,
    attention_bias: false,
    eps_key: "rms_norm_eps",
};

/// One architecture: the decoder's parts it uses, its names and its config mapping.
pub struct ArchSpec {
    /// config.json `model_type` values, the canonical one first.
    pub model_types: &'static [&'static str],
    /// transformers' class, written into `architectures` of an exported config.json.
    pub hf_class: &'static str,
    /// llama.cpp's `general.architecture` for GGUF files of this architecture.
    pub gguf: Option<&'static str>,
    pub names: Names,
    pub norm: NormKind,
    pub qkv: QkvLayout,
    pub mlp: MlpKind,
    /// Norms after attention and after the MLP too (Gemma 2/3).
    pub sandwich: bool,
    /// Embeddings multiplied by sqrt(hidden) (Gemma).
    pub embed_scale: bool,
    pub defaults: Defaults,
    /// Refuses configs this architecture's file knows kaizen cannot run, before anything else.
    pub refuse: fn(&Fields) -> Result<(), String>,
    /// Maps the architecture's own config keys onto `ModelConfig` (after the common fields).
    pub read: fn(&Fields, &mut ModelConfig) -> Result<(), String>,
    /// Writes those keys back for an exported config.json.
    pub write: fn(&ModelConfig, &mut Map<String, Value>),
    /// Suffixes of checkpoint buffers the model recomputes instead of reading.
    pub ignored: &'static [&'static str],
    /// PEFT's default LoRA targets.
    pub lora_targets: &'static [&'static str],
    /// PEFT's default IA3 targets and feed-forward modules.
    pub ia3_targets: (&'static [&'static str], &'static [&'static str]),
    /// PEFT's default LN-tuning targets (`TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING`;
    /// empty where PEFT has none and asks for `target_modules`).
    pub ln_tuning_targets: &'static [&'static str],
}

impl ArchSpec {
    /// The attention module's linear layers: the q/k/v projection(s) and the output.
    pub fn attention_linears(&self) -> Vec<&'static str> {
        let n = &self.names;
        match self.qkv {
            QkvLayout::Split => vec![n.q, n.k, n.v, n.o],
            _ => vec![n.qkv, n.o],
        }
    }
}

/// Nothing to refuse, read or write beyond the common fields.
pub fn accept(_: &Fields) -> Result<(), String> {
    Ok(())
}
pub fn read_nothing(_: &Fields, _: &mut ModelConfig) -> Result<(), String> {
    Ok(())
}
pub fn write_nothing(_: &ModelConfig, _: &mut Map<String, Value>) {}

pub fn spec(a: Architecture) -> &'static ArchSpec {
    match a {
        Architecture::GptNeoX => &gpt_neox::SPEC,
        Architecture::Llama => &llama::SPEC,
        Architecture::Mistral => &mistral::SPEC,
        Architecture::Qwen2 => &qwen2::SPEC,
        Architecture::Qwen3 => &qwen3::SPEC,
        Architecture::Phi3 => &phi3::SPEC,
        Architecture::Gemma2 => &gemma2::SPEC,
        Architecture::Gemma3 => &gemma3::SPEC,
    }
}

/// Layers `i >= max_window_layers` use the window when `use_sliding_window` (Qwen 2/3's rule
/// for configs without `layer_types`).
pub fn qwen_sliding(c: &Fields, cfg: &mut ModelConfig) -> Result<(), String> {
    let on = c.bool("use_sliding_window")?.unwrap_or(false);
    let from = c
        .usize("max_window_layers")?
        .unwrap_or(cfg.num_hidden_layers);
    for (i, s) in cfg.sliding_layers.iter_mut().enumerate() {
        *s = on && i >= from;
    }
    Ok(())
}

/// Qwen's `use_sliding_window`, derived from the layers.
pub fn write_qwen(c: &ModelConfig, m: &mut Map<String, Value>) {
    m.insert(
        "use_sliding_window".into(),
        c.sliding_layers.contains(&true).into(),
    );
}

/// Every layer uses the window when one is set (Mistral, Phi-3).
pub fn all_sliding(_: &Fields, cfg: &mut ModelConfig) -> Result<(), String> {
    cfg.sliding_layers.fill(true);
    Ok(())
}
