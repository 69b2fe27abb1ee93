//! Qwen 2 / 2.5 (HF `modeling_qwen2.py`): Llama's parts with biases on q, k and v (not o);
//! sliding windows per `layer_types` (or `use_sliding_window` from `max_window_layers` on).

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["qwen2"],
    hf_class: "Qwen2ForCausalLM",
    gguf: None,
    names: LLAMA_NAMES,
    norm: NormKind::Rms,
    qkv: QkvLayout::Split,
    mlp: MlpKind::Gated,
    sandwich: false,
    embed_scale: false,
    defaults: Defaults {
        attention_bias: true,
        ..LLAMA_DEFAULTS
    },
    refuse: accept,
    read: |c, cfg| {
        cfg.attention_bias = true;
        cfg.o_bias = false;
        qwen_sliding(c, cfg)
    },
    write: |c, m| {
        m.insert(
            "use_sliding_window".into(),
            c.sliding_layers.contains(&true).into(),
        );
    },
    ignored: &[".rotary_emb.inv_freq"],
    lora_targets: &["q_proj", "v_proj"],
    ia3_targets: (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
};
