//! Phi-3 (HF `modeling_phi3.py`): one `qkv_proj` (all q rows, then k, then v) and one
//! `gate_up_proj` (gate rows first), optional partial rotary, sliding window on every layer when
//! `sliding_window` is set. `longrope` scaling (the 128k variants) is refused by the rope parser.

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["phi3"],
    hf_class: "Phi3ForCausalLM",
    gguf: Some("phi3"),
    qkv: QkvLayout::Concat,
    mlp: MlpKind::GatedFused,
    read: all_sliding,
    write: write_nothing,
    lora_targets: &["qkv_proj"],
    ia3_targets: (&["qkv_proj", "down_proj"], &["down_proj"]),
    ln_tuning_targets: &[],
    ..super::llama::SPEC
};
