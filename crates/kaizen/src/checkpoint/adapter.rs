//! HF PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, keys as PEFT
//! writes them (`base_model.model.<module path>.lora_A.weight`). Writes are atomic per file
//! (temp file, then rename), and an adapter with no tensors is never written.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use kaizen_data::quote;
use serde_json::{Map, Value};

use crate::{Error, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Every tensor of a safetensors file, by name, in its dtype; an unreadable file, or a tensor that is
/// not floating point (an integer tensor converted would run the model on garbage), is an error
/// naming the file.
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let raw = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::checkpoint(
            path,
            format!(
                "not a readable safetensors file ({})",
                crate::error::brief(&e)
            ),
        )
    })?;
    let mut tensors = BTreeMap::new();
    for (k, t) in raw {
        if !matches!(
            t.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {} has dtype {:?}; adapter weights must be floating point (F32, F16, BF16 or F64)",
                    quote(&k),
                    t.dtype()
                ),
            ));
        }
        tensors.insert(k, t);
    }
    Ok(tensors)
}

/// Reads an adapter directory: its config object and its tensors (as f32).
pub fn read(dir: &Path) -> Result<(Map<String, Value>, BTreeMap<String, Tensor>)> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(Error::Input(format!(
            "{}: no {CONFIG_FILE}; --adapter takes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let Value::Object(config) = serde_json::from_str(&text)
        .map_err(|e| Error::config(&cfg_path, format!("not valid JSON: {e}")))?
    else {
        return Err(Error::config(&cfg_path, "expected a JSON object"));
    };
    let w_path = dir.join(WEIGHTS_FILE);
    if !w_path.is_file() {
        return Err(Error::Input(format!(
            "{}: no {WEIGHTS_FILE} (only safetensors adapters are supported; convert adapter_model.bin first)",
            dir.display()
        )));
    }
    let mut tensors = load_tensors(&w_path)?;
    for t in tensors.values_mut() {
        *t = t.to_dtype(DType::F32)?;
    }
    Ok((config, tensors))
}

/// Writes an adapter directory (created if needed).
pub fn write(dir: &Path, config: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
    if tensors.is_empty() {
        return Err(Error::Input(
            "refusing to save an adapter with no tensors".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    write_safetensors(&dir.join(WEIGHTS_FILE), &map)?;
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Input(e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Safetensors with `{"format": "pt"}` metadata, as transformers and PEFT expect.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = tmp_path(path);
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let data: Vec<(&String, &Tensor)> = tensors.iter().collect();
    safetensors::serialize_to_file(data, Some(meta), &tmp)
        .map_err(|e| Error::checkpoint(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}
