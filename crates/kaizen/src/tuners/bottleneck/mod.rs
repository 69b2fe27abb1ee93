//! Bottleneck adapters (`peft_type` "BOTTLENECK", a kaizen extension of PEFT's file envelope):
//! a small down-projection, non-linearity and up-projection with its own skip connection on the
//! output of a block's attention output projection and MLP output projection (Houlsby et al.
//! 2019) or of the MLP output projection only (Pfeiffer et al. 2020, "AdapterFusion").
//! Applied to that branch's output before the residual add, so the placement is the same for
//! sequential and parallel residual blocks. Not mergeable: the adapter is a new function, not a
//! change of weights.

pub mod config;
pub mod layer;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use config::{AdapterType, BottleneckConfig};
pub use layer::BottleneckLayer;

use super::lora::{all_used, matches, take, TargetModules, PEFT_PREFIX};
use crate::{Error, Model, Result};

/// The targets `cfg` names, or by default the architecture's output projections for its
/// `adapter_type`.
fn targets_of(model: &Model, cfg: &BottleneckConfig) -> TargetModules {
    let (attention, mlp) = model.config().default_bottleneck_modules();
    cfg.target_modules.clone().unwrap_or_else(|| {
        TargetModules::Names(match cfg.adapter_type {
            AdapterType::Houlsby => vec![attention, mlp],
            AdapterType::Pfeiffer => vec![mlp],
        })
    })
}

/// Attaches an adapter to each targeted layer's output. With `weights` (PEFT-style keys ->
/// tensors, e.g. from an adapter file) every adapter takes its tensors from there and every
/// tensor must be used; otherwise `adapter_down` is torch's `nn.Linear` init (U(-1/sqrt(out),
/// 1/sqrt(out)) for weight and bias, from `seed`) and `adapter_up` zero. Returns the targets.
pub fn attach(
    model: &mut Model,
    cfg: &BottleneckConfig,
    mut weights: Option<BTreeMap<String, Tensor>>,
    seed: u64,
) -> Result<Vec<String>> {
    let targets = targets_of(model, cfg);
    let head = model.lm_head_name();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut hit = Vec::new();
    for (path, lin) in model.linears_mut() {
        if !matches(&targets, &path, head)? {
            continue;
        }
        if path == head {
            return Err(Error::Input(format!(
                "a bottleneck adapter on the output head \"{head}\" is not supported; target attention or MLP output projections"
            )));
        }
        let out = lin.out_features();
        let b = cfg.width(out, &path).map_err(Error::Input)?;
        let prefix = format!("{PEFT_PREFIX}{path}");
        let shapes: [&[usize]; 4] = [&[b, out], &[b], &[out, b], &[out]];
        let [down_weight, down_bias, up_weight, up_bias] = match weights.as_mut() {
            Some(w) => {
                let mut t = Vec::with_capacity(4);
                for (name, shape) in layer::NAMES.iter().zip(shapes) {
                    t.push(take(w, &format!("{prefix}.{name}"), shape)?);
                }
                <[Tensor; 4]>::try_from(t).expect("four names")
            }
            None => initial(b, out, &mut rng)?,
        };
        lin.adapter = Some(Box::new(BottleneckLayer {
            prefix,
            down_weight,
            down_bias,
            up_weight,
            up_bias,
            non_linearity: cfg.non_linearity,
        }));
        hit.push(path);
    }
    if hit.is_empty() {
        return Err(Error::Input(format!(
            "bottleneck target_modules {targets} matches no layer of this model"
        )));
    }
    all_used(weights)?;
    Ok(hit)
}

/// A new adapter: down as torch's `nn.Linear(out, b)` default init, up zero (the identity).
fn initial(b: usize, out: usize, rng: &mut StdRng) -> Result<[Tensor; 4]> {
    let bound = 1.0 / (out as f64).sqrt();
    let down_weight = super::init::uniform(b * out, bound, rng);
    let down_bias = super::init::uniform(b, bound, rng);
    let (f32, cpu) = (candle_core::DType::F32, &Device::Cpu);
    Ok([
        Tensor::from_vec(down_weight, (b, out), cpu)?,
        Tensor::from_vec(down_bias, b, cpu)?,
        Tensor::zeros((out, b), f32, cpu)?,
        Tensor::zeros(out, f32, cpu)?,
    ])
}
