//! BOFT (HF PEFT `BOFT`): butterfly-factorised orthogonal rotations of each targeted layer's
//! input and a scale of its output (`layer.rs`), on OFT's shared Cayley and block-diagonal math
//! (`tuners/oft/rotation.rs`).

pub mod config;
pub mod layer;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use config::BoftConfig;
pub use layer::BoftLayer;

use super::lora::{all_used, take, PEFT_PREFIX};
use crate::{Error, Model, Result};

/// Attaches BOFT to each targeted layer. With `weights` (PEFT keys -> tensors) every layer takes
/// its `boft_R` and `boft_s` from there and every tensor must be used; otherwise PEFT's init:
/// `boft_R` zero and `boft_s` one (the identity), or with `init_weights` false N(0, 0.1²) and
/// N(1, 0.1²) from `seed`.
pub fn attach(
    model: &mut Model,
    cfg: &BoftConfig,
    mut weights: Option<BTreeMap<String, Tensor>>,
    seed: u64,
) -> Result<Vec<String>> {
    cfg.check().map_err(Error::Input)?;
    let hit = super::oft::targets(model, &cfg.target_modules, "BOFT")?;
    let mut rng = StdRng::seed_from_u64(seed);
    for (path, lin) in model.linears_mut() {
        if !hit.contains(&path) {
            continue;
        }
        let (width, out) = (lin.in_features(), lin.out_features());
        let s = cfg.shape_for(width, &path).map_err(Error::Input)?;
        let prefix = format!("{PEFT_PREFIX}{path}");
        let r_shape = [s.factors, s.blocks, s.block_size, s.block_size];
        let (boft_r, boft_s) = match weights.as_mut() {
            Some(w) => (
                take(w, &format!("{prefix}.boft_R"), &r_shape)?,
                take(w, &format!("{prefix}.boft_s"), &[out, 1])?,
            ),
            None if cfg.init_weights => (
                Tensor::zeros(&r_shape, DType::F32, &Device::Cpu)?,
                Tensor::ones((out, 1), DType::F32, &Device::Cpu)?,
            ),
            None => {
                let n = r_shape.iter().product();
                let r = super::init::normal(n, 0.1, &mut rng);
                let s = super::init::normal(out, 0.1, &mut rng);
                (
                    Tensor::from_vec(r, &r_shape, &Device::Cpu)?,
                    (Tensor::from_vec(s, (out, 1), &Device::Cpu)? + 1.0)?,
                )
            }
        };
        let perms = (0..s.factors)
            .map(|i| layer::Perm::new(width, s, i))
            .collect::<Result<_>>()?;
        lin.adapter = Some(Box::new(BoftLayer {
            prefix,
            boft_r,
            boft_s,
            perms,
            boft_dropout: cfg.boft_dropout,
        }));
    }
    all_used(weights)?;
    Ok(hit)
}
