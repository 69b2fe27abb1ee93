//! AdaLoRA (HF PEFT `ADALORA`, Zhang et al. 2023): LoRA in SVD form, B diag(E) A, whose rank
//! budget is reallocated during training by importance scores, with an orthogonality
//! regulariser on A and B added to the loss. `layer.rs` is the linear adapter, `allocator.rs`
//! the budget schedule and masking that the training loop runs after each optimizer step.

pub mod allocator;
pub mod config;
pub mod layer;

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use allocator::RankAllocator;
pub use config::{AdaLoraConfig, RankPattern};
pub use layer::AdaLoraLayer;

pub use super::lora::PEFT_PREFIX;
use super::lora::{all_used, resolve_targets, take, LoraConfig};
use crate::nn::Grads;
use crate::train::trainable_params;
use crate::{Error, Model, Result};

/// The allocator a method shares between the training loop and the saver.
pub fn lock(a: &Mutex<RankAllocator>) -> Result<MutexGuard<'_, RankAllocator>> {
    a.lock().map_err(|_| {
        Error::Input("the AdaLoRA allocator was left inconsistent by an earlier failure".into())
    })
}

/// PEFT's `SVDLinear` scale: lora_alpha / (ranknum + 1e-5), with ranknum = init_r.
fn scale(cfg: &AdaLoraConfig) -> f64 {
    cfg.lora_alpha / (cfg.init_r as f64 + 1e-5)
}

/// Attaches AdaLoRA layers to the targeted linears. With `weights` (PEFT keys -> tensors) each
/// layer takes its tensors from there, at the rank `cfg.rank_pattern` keeps for it (PEFT's
/// `resize_modules_by_rank_pattern`; `init_r` without a pattern) and every tensor must be used;
/// otherwise they start as PEFT's init does: E zero, A and B from N(0, 0.02²), drawn from `seed`.
pub fn attach(
    model: &mut Model,
    cfg: &AdaLoraConfig,
    mut weights: Option<BTreeMap<String, Tensor>>,
    seed: u64,
) -> Result<Vec<String>> {
    cfg.check_layers()?;
    let lora = LoraConfig {
        target_modules: cfg.target_modules.clone(),
        ..LoraConfig::default()
    };
    let targets = resolve_targets(model, &lora)?;
    if let Some(p) = &cfg.rank_pattern {
        if let Some(k) = p.keys().find(|k| {
            !targets
                .iter()
                .any(|t| k.strip_suffix(".lora_E") == Some(t.as_str()))
        }) {
            return Err(Error::Input(format!(
                "rank_pattern names {}, which is not a targeted layer's lora_E",
                kaizen_data::quote(k)
            )));
        }
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for (path, lin) in model.linears_mut() {
        if !targets.contains(&path) {
            continue;
        }
        let r = match cfg
            .rank_pattern
            .as_ref()
            .and_then(|p| p.get(&format!("{path}.lora_E")))
        {
            Some(keep) => keep.iter().filter(|&&k| k).count(),
            None => cfg.init_r,
        };
        let prefix = format!("{PEFT_PREFIX}{path}");
        let (inp, out) = (lin.in_features(), lin.out_features());
        let (a, e, b) = match weights.as_mut() {
            Some(w) => (
                take(w, &format!("{prefix}.lora_A"), &[r, inp])?,
                take(w, &format!("{prefix}.lora_E"), &[r, 1])?,
                take(w, &format!("{prefix}.lora_B"), &[out, r])?,
            ),
            None => {
                let normal = |n, rng: &mut StdRng| super::init::normal(n, 0.02, rng);
                (
                    Tensor::from_vec(normal(r * inp, &mut rng), (r, inp), &Device::Cpu)?,
                    Tensor::zeros((r, 1), DType::F32, &Device::Cpu)?,
                    Tensor::from_vec(normal(out * r, &mut rng), (out, r), &Device::Cpu)?,
                )
            }
        };
        lin.adapter = Some(Box::new(AdaLoraLayer {
            prefix,
            lora_a: a,
            lora_e: e,
            lora_b: b,
            scale: scale(cfg),
            dropout: cfg.lora_dropout,
        }));
    }
    all_used(weights)?;
    Ok(targets)
}

/// `orth_reg_weight` times PEFT's regulariser, the mean over every lora_A and lora_B of
/// ||A Aᵀ - I||_F and ||Bᵀ B - I||_F; its gradient (2 w/n · G A and 2 w/n · B G with
/// G = M / ||M||_F) is added to `grads`. Returns the term added to the loss.
pub fn regularize(cfg: &AdaLoraConfig, model: &mut Model, grads: &mut Grads) -> Result<f64> {
    let params: Vec<(String, Tensor)> = trainable_params(model)
        .into_iter()
        .filter(|(k, _)| k.ends_with(".lora_A") || k.ends_with(".lora_B"))
        .collect();
    if params.is_empty() || cfg.orth_reg_weight == 0.0 {
        return Ok(0.0);
    }
    let w = cfg.orth_reg_weight / params.len() as f64;
    let mut sum = 0.0;
    for (key, p) in &params {
        let is_a = key.ends_with(".lora_A");
        let cov = if is_a {
            p.matmul(&p.t()?)?
        } else {
            p.t()?.matmul(p)?
        };
        let r = cov.dims()[0];
        if r == 0 {
            continue;
        }
        let m = (cov - Tensor::eye(r, DType::F32, &Device::Cpu)?)?;
        let norm = f64::from(m.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
        sum += norm;
        if norm > 0.0 {
            let g = (m * (2.0 * w / norm))?;
            grads.add(key, if is_a { g.matmul(p)? } else { p.matmul(&g)? })?;
        }
    }
    Ok(cfg.orth_reg_weight * sum / params.len() as f64)
}

/// The tensors PEFT saves: with a rank pattern, each layer cut to the triplets it keeps
/// (PEFT's `resize_state_dict_by_rank_pattern`).
pub fn saved_tensors(
    params: Vec<(String, Tensor)>,
    pattern: Option<&RankPattern>,
) -> Result<Vec<(String, Tensor)>> {
    let Some(pattern) = pattern else {
        return Ok(params);
    };
    params
        .into_iter()
        .map(|(key, t)| {
            let (prefix, part) = key.rsplit_once('.').unwrap_or((&key, ""));
            let path = prefix.strip_prefix(PEFT_PREFIX).unwrap_or(prefix);
            let Some(keep) = pattern.get(&format!("{path}.lora_E")) else {
                return Ok((key, t));
            };
            let idx: Vec<u32> = (0..keep.len() as u32)
                .filter(|&i| keep[i as usize])
                .collect();
            let dim = if part == "lora_B" { 1 } else { 0 };
            if idx.len() == t.dims()[dim] {
                return Ok((key, t));
            }
            let cut = if idx.is_empty() {
                let mut dims = t.dims().to_vec();
                dims[dim] = 0;
                Tensor::zeros(dims, DType::F32, &Device::Cpu)?
            } else {
                t.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, dim)?
            };
            Ok((key, cut))
        })
        .collect()
}
