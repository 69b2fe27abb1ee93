//! Llama 2/3 and SmolLM2 (HF `modeling_llama.py`): RMSNorm, grouped-query attention, rotary
//! with `linear` / `llama3` scaling, SwiGLU, tied or untied head, optional `attention_bias` and
//! `mlp_bias`.

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["llama"],
    hf_class: "LlamaForCausalLM",
    gguf: Some("llama"),
    names: LLAMA_NAMES,
    norm: NormKind::Rms,
    qkv: QkvLayout::Split,
    mlp: MlpKind::Gated,
    sandwich: false,
    embed_scale: false,
    defaults: LLAMA_DEFAULTS,
    refuse: accept,
    read: read_nothing,
    write: |c, m| {
        m.insert("mlp_bias".into(), c.mlp_bias.into());
    },
    ignored: &[".rotary_emb.inv_freq"],
    lora_targets: &["q_proj", "v_proj"],
    ia3_targets: (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
    ln_tuning_targets: &["input_layernorm", "post_attention_layernorm", "norm"],
};
