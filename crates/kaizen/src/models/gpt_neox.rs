//! GPT-NeoX (EleutherAI; rinna/japanese-gpt-neox-3.6b; HF `modeling_gpt_neox.py`): fused
//! per-head-interleaved `query_key_value`, partial rotary, LayerNorm with bias, exact GELU,
//! parallel or sequential residual, untied `embed_out`.

use super::arch::*;

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["gpt_neox"],
    hf_class: "GPTNeoXForCausalLM",
    gguf: Some("gptneox"),
    names: Names {
        embed: "gpt_neox.embed_in",
        layers: "gpt_neox.layers",
        final_norm: "gpt_neox.final_layer_norm",
        head: "embed_out",
        attn: "attention",
        qkv: "query_key_value",
        o: "dense",
        up: "dense_h_to_4h",
        down: "dense_4h_to_h",
        ..LLAMA_NAMES
    },
    norm: NormKind::Layer,
    qkv: QkvLayout::Interleaved,
    mlp: MlpKind::Plain,
    sandwich: false,
    embed_scale: false,
    defaults: Defaults {
        rotary_pct: 0.25,
        hidden_act: "gelu",
        attention_bias: true,
        eps_key: "layer_norm_eps",
        ..LLAMA_DEFAULTS
    },
    refuse: accept,
    read: |c, cfg| {
        cfg.use_parallel_residual = c.bool("use_parallel_residual")?.unwrap_or(true);
        cfg.mlp_bias = true;
        Ok(())
    },
    write: |c, m| {
        let pct = crate::config::rotary_fraction(c.rotary_dim, c.head_dim);
        m.insert(
            "use_parallel_residual".into(),
            c.use_parallel_residual.into(),
        );
        m.insert("rotary_emb_base".into(), c.rope_theta.into());
        m.insert("rotary_pct".into(), pct.into());
    },
    ignored: &[
        ".attention.bias",
        ".attention.masked_bias",
        ".rotary_emb.inv_freq",
    ],
    lora_targets: &["query_key_value"],
    ia3_targets: (&["query_key_value", "dense_4h_to_h"], &["dense_4h_to_h"]),
    ln_tuning_targets: &[],
};
