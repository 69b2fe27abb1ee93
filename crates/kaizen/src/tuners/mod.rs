//! PEFT methods, one folder each. Each reaches a model only through a named linear layer, the KV
//! cache or the input embeddings; none names an architecture.

pub mod lora;

use std::path::Path;

use serde_json::Value;

use crate::checkpoint::adapter;
use crate::{Error, Model, Result};

/// What an adapter directory held, once attached.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    /// PEFT's `peft_type`, e.g. "LORA".
    pub peft_type: String,
    /// Module paths that carry the adapter.
    pub targets: Vec<String>,
    /// Number of trainable values in the adapter.
    pub trainable_params: usize,
}

/// Reads a PEFT adapter directory and attaches it (unmerged) to `model`.
pub fn load_adapter(model: &mut Model, dir: &Path) -> Result<AdapterInfo> {
    let (config, weights) = adapter::read(dir)?;
    let cfg_path = dir.join(adapter::CONFIG_FILE);
    let peft_type = config
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let trainable_params = weights.values().map(|t| t.elem_count()).sum();
    let targets = match peft_type.as_str() {
        "LORA" => {
            let cfg =
                lora::LoraConfig::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
            lora::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::config(&cfg_path, e.to_string()))?
        }
        other => {
            return Err(Error::config(
                &cfg_path,
                format!("peft_type \"{other}\" is not supported (supported: LORA)"),
            ))
        }
    };
    Ok(AdapterInfo {
        peft_type,
        targets,
        trainable_params,
    })
}
