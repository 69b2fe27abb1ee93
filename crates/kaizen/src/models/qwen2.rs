//! Qwen 2 / 2.5 (HF `modeling_qwen2.py`): Llama's parts with biases on q, k and v (not o);
//! sliding windows per `layer_types` (or `use_sliding_window` from `max_window_layers` on).

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["qwen2"],
    hf_class: "Qwen2ForCausalLM",
    gguf: Some("qwen2"),
    defaults: Defaults {
        attention_bias: true,
        ..LLAMA_DEFAULTS
    },
    read: |c, cfg| {
        cfg.attention_bias = true;
        cfg.o_bias = false;
        qwen_sliding(c, cfg)
    },
    write: write_qwen,
    ln_tuning_targets: &["post_attention_layernorm"],
    ..super::llama::SPEC
};
