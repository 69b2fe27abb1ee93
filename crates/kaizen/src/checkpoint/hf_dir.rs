//! HF model directories: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and the tokenizer files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kaizen_data::Tokenizer;

use super::safetensors_file::{read, Index};
use super::{check_sizes, Checkpoint, SizeKeys, Weights};
use crate::config::ModelConfig;
use crate::nn::Matrix;
use crate::{Error, Result};

pub fn open(dir: &Path) -> Result<Checkpoint> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::Input(format!(
            "{}: no config.json; an HF model directory needs config.json and model.safetensors",
            dir.display()
        )));
    }
    let config = ModelConfig::from_hf_file(&config_path)?;
    let files = weight_files(dir)?;
    let mut weights = Weights::new(dir.to_path_buf());
    let mut dtypes = BTreeSet::new();
    for file in files {
        let index = Index::open(&file)?;
        let file = Arc::new(file);
        for e in index.entries {
            dtypes.insert(e.dtype.clone());
            let (name, shape, file) = (e.name.clone(), e.shape.clone(), file.clone());
            let loader = Box::new(move |_keep| read(&file, &e).map(Matrix::Dense));
            weights.insert(name, shape, None, loader);
        }
    }
    let keys = SizeKeys {
        layers: "num_hidden_layers",
        vocab: "vocab_size",
        hidden: "hidden_size",
    };
    check_sizes(&config, &weights, &keys, &config_path)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let dtypes: Vec<String> = dtypes.into_iter().collect();
    Ok(Checkpoint {
        config,
        tokenizer,
        weights,
        format: format!("safetensors ({})", dtypes.join(", ")),
    })
}

/// `model.safetensors`, or the shards that `model.safetensors.index.json` lists.
/// Whether `f` names a file directly in a directory: one plain component, no `..`, no root.
fn is_file_name(f: &str) -> bool {
    let mut parts = Path::new(f).components();
    matches!(parts.next(), Some(std::path::Component::Normal(_))) && parts.next().is_none()
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(Error::Input(format!(
            "{}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported; convert .bin files first)",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::checkpoint(&index, "no \"weight_map\" object"))?;
    let mut shards = BTreeSet::new();
    for (k, v) in map {
        // A shard is a file in this directory: a path (`../x`, `/etc/x`, `a/b`) would read
        // files the model directory does not hold.
        let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        let f = v.as_str().filter(|f| is_file_name(f)).ok_or_else(|| {
            Error::checkpoint(
                &index,
                format!(
                    "weight_map[{}] is {}, not the name of a file in the model directory",
                    kaizen_data::quote(k),
                    kaizen_data::quote(&shown)
                ),
            )
        })?;
        shards.insert(f.to_string());
    }
    shards
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::checkpoint(
                    &index,
                    format!(
                        "lists shard {}, which does not exist",
                        kaizen_data::quote(&f)
                    ),
                ))
            }
        })
        .collect()
}
