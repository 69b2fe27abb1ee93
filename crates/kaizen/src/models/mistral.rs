//! Mistral (HF `modeling_mistral.py`): Llama's parts with sliding-window attention on every layer
//! when `sliding_window` is set.

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["mistral"],
    hf_class: "MistralForCausalLM",
    gguf: None,
    names: LLAMA_NAMES,
    norm: NormKind::Rms,
    qkv: QkvLayout::Split,
    mlp: MlpKind::Gated,
    sandwich: false,
    embed_scale: false,
    defaults: LLAMA_DEFAULTS,
    refuse: accept,
    read: all_sliding,
    write: write_nothing,
    ignored: &[".rotary_emb.inv_freq"],
    lora_targets: &["q_proj", "v_proj"],
    ia3_targets: (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
};
