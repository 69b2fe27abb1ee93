//! Gemma 2 (HF `modeling_gemma2.py`): Gemma's RMSNorm (`1 + w`), sandwich norms, embeddings
//! scaled by sqrt(hidden), GeGLU, scores scaled by `query_pre_attn_scalar^-0.5` and soft-capped,
//! final logits soft-capped, sliding-window attention on alternate layers (the first local).

use serde_json::{Map, Value};

use super::arch::*;
use crate::config::{Fields, ModelConfig};

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["gemma2"],
    hf_class: "Gemma2ForCausalLM",
    gguf: Some("gemma2"),
    names: Names {
        mlp_norm: "pre_feedforward_layernorm",
        ..LLAMA_NAMES
    },
    norm: NormKind::RmsPlusOne,
    qkv: QkvLayout::Split,
    mlp: MlpKind::Gated,
    sandwich: true,
    embed_scale: true,
    defaults: GEMMA_DEFAULTS,
    refuse: accept,
    read: |c, cfg| {
        read_gemma(c, cfg, Some(50.0), Some(30.0))?;
        cfg.slide_all_but_every(2);
        Ok(())
    },
    write: write_gemma,
    ignored: &[".rotary_emb.inv_freq"],
    lora_targets: &["q_proj", "v_proj"],
    ia3_targets: (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
    ln_tuning_targets: &[
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
};

pub const GEMMA_DEFAULTS: Defaults = Defaults {
    hidden_act: "gelu_pytorch_tanh",
    tie_word_embeddings: true,
    ..LLAMA_DEFAULTS
};

/// An optional number whose default applies only when the key is absent (null switches it off).
fn opt_f64(c: &Fields, key: &str, default: Option<f64>) -> Result<Option<f64>, String> {
    match c.0.get(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(_) => c.f64(key),
    }
}

/// The keys Gemma 2 and 3 share, with the given soft-capping defaults.
pub fn read_gemma(
    c: &Fields,
    cfg: &mut ModelConfig,
    attn_cap: Option<f64>,
    final_cap: Option<f64>,
) -> Result<(), String> {
    cfg.query_pre_attn_scalar = Some(c.f64("query_pre_attn_scalar")?.unwrap_or(256.0));
    cfg.attn_logit_softcapping = opt_f64(c, "attn_logit_softcapping", attn_cap)?;
    cfg.final_logit_softcapping = opt_f64(c, "final_logit_softcapping", final_cap)?;
    if c.0.get("sliding_window").is_none() {
        cfg.sliding_window = Some(4096);
    }
    Ok(())
}

pub fn write_gemma(c: &ModelConfig, m: &mut Map<String, Value>) {
    let act = m.remove("hidden_act").unwrap_or(Value::Null);
    m.insert("hidden_activation".into(), act);
    m.insert(
        "query_pre_attn_scalar".into(),
        c.query_pre_attn_scalar.map(crate::config::number).into(),
    );
    m.insert(
        "attn_logit_softcapping".into(),
        c.attn_logit_softcapping.into(),
    );
    m.insert(
        "final_logit_softcapping".into(),
        c.final_logit_softcapping.into(),
    );
}
