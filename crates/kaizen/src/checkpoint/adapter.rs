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
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let data: Vec<(&String, &Tensor)> = tensors.iter().collect();
    replace_with(path, |tmp| {
        safetensors::serialize_to_file(data, Some(meta), tmp)
            .map_err(|e| Error::checkpoint(tmp, e.to_string()))
    })
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `path` through `write` into `NAME.tmp` beside it, then renames that over `path`. On
/// any failure (a full disk, say) the temporary file is removed and `path` is left as it was.
fn replace_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let done =
        write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Writes the directory `dir` through `write` into `.NAME.tmp` beside it, then renames that to
/// `dir` (replacing an older `dir`). On any failure the temporary directory is removed, so a
/// failed save leaves no `.tmp` and every earlier directory intact.
pub fn write_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    let done = write(&tmp).and_then(|()| {
        if dir.is_dir() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    });
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done
}

fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A write that fails half-way (what a full disk does) leaves no `.tmp` and the previous
    /// file as it was; so does a rename that fails.
    #[test]
    fn failed_file_writes_leave_no_tmp() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("trainer_state.json");
        write_atomic(&path, b"old").unwrap();
        let err = replace_with(&path, |t| {
            std::fs::write(t, b"half").unwrap();
            Err(Error::io(
                t,
                std::io::Error::other("No space left on device"),
            ))
        });
        assert!(err.is_err());
        assert_eq!(names(tmp.path()), ["trainer_state.json"]);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        // The rename fails: the target is a non-empty directory.
        let target = tmp.path().join("busy");
        std::fs::create_dir_all(target.join("inside")).unwrap();
        let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert!(write_atomic(&target, b"x").is_err());
        assert!(write_safetensors(&target, &[("t".to_string(), t)].into()).is_err());
        assert_eq!(names(tmp.path()), ["busy", "trainer_state.json"]);
    }

    /// A checkpoint directory whose save fails leaves no `.checkpoint-N.tmp` and earlier
    /// checkpoints intact, whether the writing or the final rename fails.
    #[test]
    fn failed_directory_writes_leave_no_tmp() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        write_dir_atomic(&out.join("checkpoint-2"), |t| {
            std::fs::create_dir_all(t).unwrap();
            write_atomic(&t.join("trainer_state.json"), b"2")
        })
        .unwrap();
        let err = write_dir_atomic(&out.join("checkpoint-4"), |t| {
            std::fs::create_dir_all(t).unwrap();
            write_atomic(&t.join("trainer_state.json"), b"4")?;
            write_atomic(&out.join("no-such-dir/optimizer.safetensors"), b"4")
        });
        assert!(err.is_err());
        assert_eq!(names(out), ["checkpoint-2"]);
        // The rename fails: checkpoint-6 exists as a file.
        std::fs::write(out.join("checkpoint-6"), b"file").unwrap();
        let err = write_dir_atomic(&out.join("checkpoint-6"), |t| {
            std::fs::create_dir_all(t).unwrap();
            write_atomic(&t.join("trainer_state.json"), b"6")
        });
        assert!(err.is_err());
        assert_eq!(names(out), ["checkpoint-2", "checkpoint-6"]);
        assert_eq!(
            std::fs::read(out.join("checkpoint-2/trainer_state.json")).unwrap(),
            b"2"
        );
    }
}
