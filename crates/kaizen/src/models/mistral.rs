//! Mistral (HF `modeling_mistral.py`): Llama's parts with sliding-window attention on every layer
//! when `sliding_window` is set.

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["mistral"],
    hf_class: "MistralForCausalLM",
    gguf: None,
    read: all_sliding,
    write: write_nothing,
    ..super::llama::SPEC
};
