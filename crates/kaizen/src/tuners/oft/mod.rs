//! OFT (HF PEFT `OFT`): a learned block-diagonal rotation of each targeted layer's input
//! (`layer.rs`); `rotation.rs` holds the Cayley transform and the block-diagonal products that
//! BOFT shares.

pub mod config;
pub mod layer;
pub mod rotation;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use config::OftConfig;
pub use layer::OftLayer;
use rotation::Cayley;

use super::lora::{all_used, matches, take, TargetModules, PEFT_PREFIX};
use crate::{Error, Model, Result};

/// The targeted linear layers, in model order: `cfg`'s, or the architecture's default (PEFT
/// maps OFT and BOFT to LoRA's defaults). The output head is refused.
pub(crate) fn targets(
    model: &mut Model,
    target_modules: &Option<TargetModules>,
    method: &str,
) -> Result<Vec<String>> {
    let default = model.config().default_qv_modules();
    let targets = target_modules
        .clone()
        .unwrap_or_else(|| TargetModules::Names(default.iter().map(|s| s.to_string()).collect()));
    let head = model.lm_head_name().to_string();
    let mut hit = Vec::new();
    for (path, _) in model.linears_mut() {
        if matches(&targets, &path, &head)? {
            if path == head {
                return Err(Error::Input(format!("{method} on the output head \"{head}\" is not supported; target attention or MLP layers")));
            }
            hit.push(path);
        }
    }
    if hit.is_empty() {
        return Err(Error::Input(format!(
            "{method} target_modules {targets} matches no layer of this model"
        )));
    }
    Ok(hit)
}

/// Attaches an OFT rotation to each targeted layer. With `weights` (PEFT keys -> tensors) every
/// layer takes its `oft_R.weight` from there and every tensor must be used; otherwise PEFT's
/// init: zero (the identity), or with `init_weights` false N(0, 0.1²) from `seed`.
pub fn attach(
    model: &mut Model,
    cfg: &OftConfig,
    mut weights: Option<BTreeMap<String, Tensor>>,
    seed: u64,
) -> Result<Vec<String>> {
    cfg.check().map_err(Error::Input)?;
    let hit = targets(model, &cfg.target_modules, "OFT")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let cayley = match cfg.use_cayley_neumann {
        true => Cayley::Neumann(cfg.num_cayley_neumann_terms),
        false => Cayley::Exact,
    };
    for (path, lin) in model.linears_mut() {
        if !hit.contains(&path) {
            continue;
        }
        let (blocks, b) = cfg
            .blocks_for(lin.in_features(), &path)
            .map_err(Error::Input)?;
        let shape = [if cfg.block_share { 1 } else { blocks }, b * (b - 1) / 2];
        let key = format!("{PEFT_PREFIX}{path}.oft_R.weight");
        let weight = match weights.as_mut() {
            Some(w) => take(w, &key, &shape)?,
            None if cfg.init_weights => {
                Tensor::zeros(&shape, candle_core::DType::F32, &Device::Cpu)?
            }
            None => Tensor::from_vec(
                super::init::normal(shape[0] * shape[1], 0.1, &mut rng),
                &shape,
                &Device::Cpu,
            )?,
        };
        let coft = cfg.coft.then_some(cfg.eps);
        lin.adapter = Some(Box::new(OftLayer::new(
            key, weight, blocks, b, cayley, coft,
        )?));
    }
    all_used(weights)?;
    Ok(hit)
}
