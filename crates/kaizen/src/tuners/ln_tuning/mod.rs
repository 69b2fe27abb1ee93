//! LN tuning (HF PEFT `LN_TUNING`, Zhao et al. 2023): only the targeted normalisation layers
//! train, every other weight frozen. PEFT wraps each targeted norm with a trainable copy
//! (`ln_tuning_layers`) that replaces it in the forward pass, so "merging" swaps the copy in:
//! kaizen trains and loads the norm itself, under PEFT's key
//! (`base_model.model.<path>.ln_tuning_layers.weight`, `.bias` for LayerNorm), and a loaded
//! adapter is its merged model. It reaches the model through the norms, which train with full
//! fine-tuning's machinery (`Part::trainable_mut`).
//!
//! Targets as PEFT resolves them (a name matches a module path or its dotted suffix, a string is
//! a regex over the whole path; `exclude_modules` likewise); by default PEFT's per-architecture
//! list (`ArchSpec::ln_tuning_targets`), and where PEFT has none (GPT-NeoX, Phi-3) the user names
//! them, as PEFT asks. Unlike PEFT, a target that is not a norm (PEFT would train a copy of any
//! module, "at your own risk") is refused.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};

use super::ia3::config::modules;
use super::lora::{matches, TargetModules, PEFT_PREFIX};
use crate::models::Part;
use crate::{Error, Model, Result};

/// `LNTuningConfig` with PEFT's field names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LnTuningConfig {
    /// None: the architecture's default (PEFT's mapping).
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<TargetModules>,
    pub base_model_name_or_path: Option<String>,
}

impl LnTuningConfig {
    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        if map.get("modules_to_save").is_some_and(|v| !v.is_null()) {
            return Err("\"modules_to_save\" is set, which kaizen does not support yet".into());
        }
        Ok(LnTuningConfig {
            target_modules: modules(map, "target_modules")?,
            exclude_modules: modules(map, "exclude_modules")?,
            base_model_name_or_path: map
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }

    /// adapter_config.json as PEFT writes it, with the resolved module paths.
    pub fn to_json(&self, targets: &[String]) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "exclude_modules": null,
            "inference_mode": true,
            "modules_to_save": null,
            "peft_type": "LN_TUNING",
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
        })
    }
}

/// Marks the targeted norms trainable under their PEFT keys; with `weights` (PEFT keys ->
/// tensors, from an adapter file) each takes its values from there and every tensor must be
/// used. Returns the targeted module paths.
pub fn attach(
    model: &mut Model,
    cfg: &LnTuningConfig,
    mut weights: Option<BTreeMap<String, Tensor>>,
) -> Result<Vec<String>> {
    let defaults = model.config().default_ln_tuning_modules();
    let targets =
        match &cfg.target_modules {
            Some(TargetModules::AllLinear) => return Err(Error::Input(
                "LN tuning: target_modules \"all-linear\" names linear layers; LN tuning trains \
                 norms (name them, e.g. input_layernorm)"
                    .into(),
            )),
            Some(t) => t.clone(),
            None if defaults.is_empty() => {
                return Err(Error::Input(format!(
                "LN tuning: PEFT has no default target_modules for {}; name the norms to train \
                 (--target-modules, e.g. {})",
                model.config().architecture.name(),
                norm_names(model).join(",")
            )))
            }
            None => TargetModules::Names(defaults.iter().map(|s| s.to_string()).collect()),
        };
    let head = model.lm_head_name();
    let mut hit = Vec::new();
    for (path, mut part) in model.parts_mut() {
        if !matches(&targets, &path, head)?
            || match &cfg.exclude_modules {
                Some(x) => matches(x, &path, head)?,
                None => false,
            }
        {
            continue;
        }
        if !matches!(part, Part::Norm(_)) {
            return Err(Error::Input(format!(
                "LN tuning: target_modules {targets} matches {path}, which is not a norm"
            )));
        }
        let key = format!("{PEFT_PREFIX}{path}.ln_tuning_layers");
        if let Some(w) = weights.as_mut() {
            for (suffix, t) in part.tensors_mut() {
                let k = format!("{key}.{suffix}");
                let v = w
                    .remove(&k)
                    .ok_or_else(|| Error::Input(format!("the adapter has no tensor \"{k}\"")))?;
                if v.dims() != t.dims() {
                    return Err(Error::Input(format!(
                        "adapter tensor \"{k}\" has shape {:?}, but this model needs {:?}",
                        v.dims(),
                        t.dims()
                    )));
                }
                *t = v.to_dtype(DType::F32)?;
            }
        }
        *part.trainable_mut() = Some(key);
        hit.push(path);
    }
    if hit.is_empty() {
        return Err(Error::Input(format!(
            "LN tuning: target_modules {targets} matches no norm of this model; its norms are \
             named like {}",
            norm_names(model).join(", ")
        )));
    }
    if let Some(k) = weights.and_then(|w| w.keys().next().cloned()) {
        return Err(Error::Input(format!(
            "the adapter holds tensors that fit no targeted norm, e.g. \"{k}\""
        )));
    }
    Ok(hit)
}

/// The distinct last names of the model's norms (`input_layernorm`, `norm`, ...).
fn norm_names(model: &mut Model) -> Vec<String> {
    let mut names: Vec<String> = model
        .parts_mut()
        .into_iter()
        .filter(|(_, p)| matches!(p, Part::Norm(_)))
        .filter_map(|(path, _)| path.rsplit('.').next().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    names
}
