//! Qwen 3 (HF `modeling_qwen3.py`): Llama's parts with QK-norm (RMSNorm over head_dim on q and k
//! before rotary) and an explicit head_dim; sliding windows as Qwen 2.

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["qwen3"],
    hf_class: "Qwen3ForCausalLM",
    gguf: None,
    names: LLAMA_NAMES,
    norm: NormKind::Rms,
    qkv: QkvLayout::Split,
    mlp: MlpKind::Gated,
    sandwich: false,
    embed_scale: false,
    defaults: LLAMA_DEFAULTS,
    refuse: accept,
    read: |c, cfg| {
        cfg.qk_norm = true;
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
