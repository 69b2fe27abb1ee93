//! Freeze tuning, as LLaMA-Factory's `finetuning_type: freeze` (`_setup_freeze_tuning` in its
//! `model/adapter.py`): full fine-tuning of a chosen part of the model, the rest frozen, saved as
//! a whole HF model directory. The training itself is full fine-tuning's (`full::attach_where`).
//!
//! The choice is LLaMA-Factory's, option for option and name for name:
//! - `freeze_trainable_layers` N: the last N layers (N > 0) or the first -N (N < 0);
//! - `freeze_trainable_modules`: in those layers, every module (`all`) or the named ones (the
//!   name after the layer index: `self_attn`, `mlp`, `input_layernorm`, ...);
//! - `freeze_extra_modules`: modules outside the layers (`embed_tokens`, `norm`, `lm_head`).
//!
//! A parameter trains when its name contains `.{i}.{module}` (`.{i}.` for `all`) for a chosen
//! layer `i`, or an extra module's name. As there, the names match as substrings: `norm` as an
//! extra module selects the final norm and every layer's `*_layernorm` too; kaizen keeps that so
//! the same options train the same tensors. Unlike LLaMA-Factory, N beyond the model's layer
//! count is an error (it trains every layer then), and LLaMA Pro's `use_llama_pro` is not offered.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::models::Part;
use crate::nn::Norm;
use crate::tuners::full;
use crate::{Error, Model, Result};

/// LLaMA-Factory's freeze options.
#[derive(Clone, Debug, PartialEq)]
pub struct FreezeConfig {
    pub trainable_layers: i64,
    pub trainable_modules: Vec<String>,
    pub extra_modules: Vec<String>,
}

impl Default for FreezeConfig {
    /// LLaMA-Factory's defaults: the last 2 layers, every module in them, nothing else.
    fn default() -> Self {
        FreezeConfig {
            trainable_layers: 2,
            trainable_modules: vec!["all".into()],
            extra_modules: vec![],
        }
    }
}

impl FreezeConfig {
    /// What run.json records as the "adapter".
    pub fn to_json(&self) -> Value {
        json!({
            "method": "freeze",
            "freeze_trainable_layers": self.trainable_layers,
            "freeze_trainable_modules": self.trainable_modules.join(","),
            "freeze_extra_modules": self.extra_modules.join(","),
            "saved_as": "HF model directory",
        })
    }
}

/// Marks the parameters `cfg` chooses trainable; returns the number of trainable values.
pub fn attach(model: &mut Model, cfg: &FreezeConfig) -> Result<usize> {
    let layers = model.config().num_hidden_layers as i64;
    let n = cfg.trainable_layers;
    if n == 0 || n.abs() > layers {
        return Err(Error::Input(format!(
            "--freeze-trainable-layers {n}: the model has {layers} layers; give 1..={layers} \
             (the last N layers) or -{layers}..=-1 (the first N)"
        )));
    }
    let ids = if n > 0 { layers - n..layers } else { 0..-n };
    let names = param_names(model);
    let (mut inner, mut outer) = (BTreeSet::new(), BTreeSet::new());
    for name in names.iter().flat_map(|(_, n)| n) {
        if let Some((_, rest)) = name.rsplit_once(".0.").or_else(|| name.rsplit_once(".1.")) {
            inner.insert(rest.split('.').next().unwrap_or(rest).to_string());
        }
        let parts: Vec<&str> = name.split('.').collect();
        let in_layer = parts.len() > 2
            && parts[1..parts.len() - 1]
                .iter()
                .any(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
        if !in_layer && parts.len() >= 2 {
            outer.insert(parts[parts.len() - 2].to_string());
        }
    }
    let choose = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(", ");
    let mut patterns = Vec::new();
    for m in &cfg.trainable_modules {
        if m != "all" && !inner.contains(m) {
            return Err(Error::Input(format!(
                "--freeze-trainable-modules: no module \"{m}\" in the layers (choose from all, {})",
                choose(&inner)
            )));
        }
        let m = if m == "all" { "" } else { m.as_str() };
        patterns.extend(ids.clone().map(|i| format!(".{i}.{m}")));
    }
    for m in &cfg.extra_modules {
        if !outer.contains(m) {
            return Err(Error::Input(format!(
                "--freeze-extra-modules: no module \"{m}\" outside the layers (choose from {})",
                choose(&outer)
            )));
        }
        patterns.push(m.clone());
    }
    let chosen: BTreeSet<String> = names
        .into_iter()
        .filter(|(_, names)| {
            names
                .iter()
                .any(|n| patterns.iter().any(|p| n.contains(p.as_str())))
        })
        .map(|(path, _)| path)
        .collect();
    full::attach_where(model, |path| chosen.contains(path))
}

/// Every module with the names of its parameters, as `named_parameters()` lists them in
/// transformers (a tied head not at all: it is the embeddings).
fn param_names(model: &mut Model) -> Vec<(String, Vec<String>)> {
    let skip = model.tied_head().then(|| model.lm_head_name());
    model
        .parts_mut()
        .into_iter()
        .filter(|(path, _)| Some(path.as_str()) != skip)
        .map(|(path, part)| {
            let suffixes: &[&str] = match &part {
                Part::Linear(l) if l.bias.is_some() => &["weight", "bias"],
                Part::Norm(Norm::Layer(_)) => &["weight", "bias"],
                _ => &["weight"],
            };
            let names = suffixes.iter().map(|s| format!("{path}.{s}")).collect();
            (path, names)
        })
        .collect()
}
