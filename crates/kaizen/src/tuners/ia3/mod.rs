//! IA3 (HF PEFT `IA3`): learned scaling vectors on the outputs of `target_modules` and on the
//! inputs of `feedforward_modules`.

pub mod config;
pub mod layer;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

pub use config::Ia3Config;
pub use layer::Ia3Layer;

use super::lora::{matches, TargetModules, PEFT_PREFIX};
use crate::{Error, Model, Result};

/// Attaches IA3 vectors; with `weights` (PEFT keys -> tensors) they are loaded and every tensor
/// must be used. Returns (targets, feed-forward targets) as module paths.
pub fn attach(
    model: &mut Model,
    cfg: &Ia3Config,
    mut weights: Option<BTreeMap<String, Tensor>>,
) -> Result<(Vec<String>, Vec<String>)> {
    let (dt, df) = model.config().default_ia3_modules();
    let names = |d: &[&str]| TargetModules::Names(d.iter().map(|s| s.to_string()).collect());
    let targets = cfg.target_modules.clone().unwrap_or_else(|| names(dt));
    let ff = cfg.feedforward_modules.clone().unwrap_or_else(|| names(df));
    let head = model.lm_head_name();
    let (mut hit, mut hit_ff) = (Vec::new(), Vec::new());
    for (path, lin) in model.linears_mut() {
        let is_ff = matches(&ff, &path, head)?;
        if !matches(&targets, &path, head)? {
            if is_ff {
                return Err(Error::Input(format!("feedforward_modules must be a subset of target_modules, but {path} is not a target")));
            }
            continue;
        }
        let key = format!("{PEFT_PREFIX}{path}.ia3_l");
        let shape = if is_ff {
            vec![1, lin.in_features()]
        } else {
            vec![lin.out_features(), 1]
        };
        let ia3_l = match weights.as_mut() {
            Some(w) => {
                let t = w
                    .remove(&key)
                    .ok_or_else(|| Error::Input(format!("the adapter has no tensor \"{key}\"")))?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::Input(format!(
                        "adapter tensor \"{key}\" has shape {:?}, but this model needs {shape:?}",
                        t.dims()
                    )));
                }
                t
            }
            None if cfg.init_ia3_weights => {
                Tensor::ones(shape.as_slice(), candle_core::DType::F32, &Device::Cpu)?
            }
            None => {
                return Err(Error::Input(
                    "init_ia3_weights = false (random IA3 vectors) is not supported".into(),
                ))
            }
        };
        lin.adapter = Some(Box::new(Ia3Layer {
            key,
            ia3_l,
            feedforward: is_ff,
        }));
        if is_ff {
            hit_ff.push(path.clone());
        }
        hit.push(path);
    }
    if hit.is_empty() {
        return Err(Error::Input(format!(
            "IA3 target_modules {targets} matches no layer of this model"
        )));
    }
    if let Some(k) = weights.and_then(|w| w.keys().next().cloned()) {
        return Err(Error::Input(format!(
            "the adapter holds tensors that fit no targeted layer, e.g. \"{k}\""
        )));
    }
    Ok((hit, hit_ff))
}
