//! Qwen 3 (HF `modeling_qwen3.py`): Llama's parts with QK-norm (RMSNorm over head_dim on q and k
//! before rotary) and an explicit head_dim; sliding windows as Qwen 2.

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["qwen3"],
    hf_class: "Qwen3ForCausalLM",
    gguf: Some("qwen3"),
    read: |c, cfg| {
        cfg.qk_norm = true;
        qwen_sliding(c, cfg)
    },
    write: write_qwen,
    ln_tuning_targets: &["post_attention_layernorm"],
    ..super::llama::SPEC
};
