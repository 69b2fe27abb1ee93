//! Gemma 3 text models (HF `modeling_gemma3.py`, `Gemma3ForCausalLM`, `gemma3_text` configs):
//! Gemma 2's parts plus QK-norm, no soft-capping by default, five sliding-window layers to one
//! global layer, and the local layers' own rotary base (`rope_local_base_freq`, unscaled).

use serde_json::{json, Map, Value};

use super::arch::{ArchSpec, Defaults};
use super::gemma2::{read_gemma, write_gemma, GEMMA_DEFAULTS};
use crate::config::{parse_rope_scaling, Fields};

pub const SPEC: ArchSpec = ArchSpec {
    model_types: &["gemma3_text", "gemma3"],
    hf_class: "Gemma3ForCausalLM",
    gguf: Some("gemma3"),
    defaults: Defaults {
        rope_theta: 1_000_000.0,
        ..GEMMA_DEFAULTS
    },
    refuse: |c| match c.0.get("text_config") {
        Some(_) => Err(
            "this is a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); \
             kaizen fine-tunes Gemma 3 text models: use a text-only checkpoint (model_type \
             gemma3_text, e.g. gemma-3-270m or gemma-3-1b) or its GGUF"
                .into(),
        ),
        None => Ok(()),
    },
    read: |c, cfg| {
        read_gemma(c, cfg, None, None)?;
        cfg.qk_norm = true;
        cfg.slide_all_but_every(c.usize("sliding_window_pattern")?.unwrap_or(6));
        cfg.rope_local_theta = Some(c.f64("rope_local_base_freq")?.unwrap_or(10000.0));
        // transformers 5 nests rotary settings per layer type.
        if let Some(Value::Object(p)) = c.0.get("rope_parameters") {
            let kind = |k: &str| match p.get(k) {
                Some(Value::Object(o)) => Ok(Some(Fields(o))),
                None | Some(Value::Null) => Ok(None),
                Some(_) => Err(format!("\"rope_parameters.{k}\" must be an object")),
            };
            if let Some(full) = kind("full_attention")? {
                cfg.rope_scaling = parse_rope_scaling(&full)?;
                cfg.rope_theta = full.f64("rope_theta")?.unwrap_or(cfg.rope_theta);
            }
            if let Some(local) = kind("sliding_attention")? {
                cfg.rope_local_theta = local.f64("rope_theta")?.or(cfg.rope_local_theta);
            }
        }
        Ok(())
    },
    write: |c, m| {
        write_gemma(c, m);
        let local = c.rope_local_theta.unwrap_or(10000.0);
        let mut full = m.remove("rope_parameters").unwrap_or_else(|| json!({}));
        full["rope_theta"] = json!(c.rope_theta);
        let sliding = json!({"rope_type": "default", "rope_theta": local});
        let mut rope = Map::new();
        rope.insert("full_attention".into(), full);
        rope.insert("sliding_attention".into(), sliding);
        m.insert("rope_parameters".into(), Value::Object(rope));
        m.insert("rope_local_base_freq".into(), json!(local));
    },
    ignored: &[".rotary_emb.inv_freq", ".rotary_emb_local.inv_freq"],
    ..super::gemma2::SPEC
};
