//! VeRA (HF PEFT `VERA`): one pair of frozen random projections shared by every targeted layer,
//! `vera_A` (r, largest in_features) and `vera_B` (largest out_features, r), each layer using
//! its top-left slice, and per layer two trained vectors, `vera_lambda_d` (r) and
//! `vera_lambda_b` (out) (`layer.rs`).
//!
//! PEFT draws the projections Kaiming-uniform from torch's generator seeded with
//! `projection_prng_key`; kaizen cannot reproduce torch's draws, so a new adapter draws the same
//! distribution from kaizen's RNG seeded with that key, and the file always holds the
//! projections (PEFT's `save_projection=True`, its default) under PEFT's keys
//! `base_model.vera_A` / `base_model.vera_B`, which PEFT loads as they are. A PEFT adapter saved
//! with `save_projection=False` holds no projections and is refused.

pub mod config;
pub mod layer;

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use config::VeraConfig;
pub use layer::VeraLayer;

use super::lora::{self, PEFT_PREFIX};
use crate::{Error, Model, Result};

/// PEFT's keys of the shared projections in adapter_model.safetensors.
pub const KEY_A: &str = "base_model.vera_A";
pub const KEY_B: &str = "base_model.vera_B";

/// The shared frozen projections: A (r, largest in), B (largest out, r).
#[derive(Debug, Clone)]
pub struct Projections {
    pub a: Tensor,
    pub b: Tensor,
}

impl Projections {
    /// As PEFT saves them.
    pub fn tensors(&self) -> [(String, Tensor); 2] {
        [
            (KEY_A.to_string(), self.a.clone()),
            (KEY_B.to_string(), self.b.clone()),
        ]
    }

    /// PEFT's `_kaiming_init` (gain sqrt 2, fan_in: U(-sqrt(6 / fan_in), sqrt(6 / fan_in))),
    /// A then B, from kaizen's RNG seeded with `projection_prng_key`.
    fn init(r: usize, max_in: usize, max_out: usize, key: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(key);
        let bound = |fan_in: usize| (6.0 / fan_in as f64).sqrt();
        let a = super::init::uniform(r * max_in, bound(max_in), &mut rng);
        let b = super::init::uniform(max_out * r, bound(r), &mut rng);
        Ok(Projections {
            a: Tensor::from_vec(a, (r, max_in), &Device::Cpu)?,
            b: Tensor::from_vec(b, (max_out, r), &Device::Cpu)?,
        })
    }
}

/// Whether `key` is one of the shared projections (not a trainable tensor).
pub fn is_projection(key: &str) -> bool {
    key == KEY_A || key == KEY_B
}

/// Attaches VeRA to the targeted linears. With `weights` (an adapter file's tensors) the
/// projections and every layer's lambdas come from there and every tensor must be used;
/// otherwise the projections are drawn from `projection_prng_key` and the lambdas start as PEFT
/// starts them (`init_weights`; its random variant draws from `seed`). Returns the targets and
/// the shared projections.
pub fn attach(
    model: &mut Model,
    cfg: &VeraConfig,
    mut weights: Option<BTreeMap<String, Tensor>>,
    seed: u64,
) -> Result<(Vec<String>, Projections)> {
    cfg.validate().map_err(Error::Input)?;
    let targets = lora::resolve_targets(model, &cfg.targets())?;
    let dims: Vec<(usize, usize)> = model
        .linears_mut()
        .into_iter()
        .filter(|(p, _)| targets.contains(p))
        .map(|(_, l)| (l.in_features(), l.out_features()))
        .collect();
    // PEFT's `_find_dim`: the largest in and out over the targets size the projections.
    let max_in = dims.iter().map(|d| d.0).max().unwrap_or(0);
    let max_out = dims.iter().map(|d| d.1).max().unwrap_or(0);
    let r = cfg.r;
    let proj = match weights.as_mut() {
        Some(w) => from_file(w, cfg, r, max_in, max_out)?,
        None => Projections::init(r, max_in, max_out, cfg.projection_prng_key)?,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut slices_a, mut slices_b) = (HashMap::new(), HashMap::new());
    for (path, lin) in model.linears_mut() {
        if !targets.contains(&path) {
            continue;
        }
        let (inp, out) = (lin.in_features(), lin.out_features());
        // Layers of one width share one slice (a copy only where A is cut).
        let a = match slices_a.get(&inp) {
            Some(t) => Tensor::clone(t),
            None => proj.a.narrow(1, 0, inp)?.contiguous()?,
        };
        let b = match slices_b.get(&out) {
            Some(t) => Tensor::clone(t),
            None => proj.b.narrow(0, 0, out)?.contiguous()?,
        };
        slices_a.insert(inp, a.clone());
        slices_b.insert(out, b.clone());
        let prefix = format!("{PEFT_PREFIX}{path}");
        let (lambda_b, lambda_d) = match weights.as_mut() {
            Some(w) => (
                lora::take(w, &format!("{prefix}.vera_lambda_b"), &[out])?,
                lora::take(w, &format!("{prefix}.vera_lambda_d"), &[r])?,
            ),
            None if cfg.init_weights => (
                Tensor::zeros(out, candle_core::DType::F32, &Device::Cpu)?,
                Tensor::full(cfg.d_initial as f32, r, &Device::Cpu)?,
            ),
            None => (
                Tensor::ones(out, candle_core::DType::F32, &Device::Cpu)?,
                Tensor::from_vec(super::init::normal(r, 1.0, &mut rng), r, &Device::Cpu)?,
            ),
        };
        lin.adapter = Some(Box::new(VeraLayer {
            prefix,
            a,
            b,
            lambda_b,
            lambda_d,
            dropout: cfg.vera_dropout,
        }));
    }
    lora::all_used(weights)?;
    Ok((targets, proj))
}

/// The projections of an adapter file, shaped as this model's targets need them (PEFT's
/// buffers are sized from the model, and loading checks the file's against them).
fn from_file(
    w: &mut BTreeMap<String, Tensor>,
    cfg: &VeraConfig,
    r: usize,
    max_in: usize,
    max_out: usize,
) -> Result<Projections> {
    if !w.contains_key(KEY_A) || !w.contains_key(KEY_B) {
        return Err(Error::Input(if cfg.save_projection {
            format!("the adapter has no \"{KEY_A}\" / \"{KEY_B}\" tensors (VeRA's shared projections), though its config says save_projection = true")
        } else {
            format!(
                "this VeRA adapter was saved with save_projection = false: its file holds no vera_A / vera_B projections, which PEFT regenerates from torch's random generator seeded with projection_prng_key ({}); kaizen cannot reproduce torch's generator, so re-save the adapter in PEFT with VeraConfig(save_projection=True)",
                cfg.projection_prng_key
            )
        }));
    }
    let mut take = |key: &str, shape: [usize; 2], what: &str| -> Result<Tensor> {
        let t = w.remove(key).expect("checked above");
        if t.dims() != shape {
            return Err(Error::Input(format!(
                "adapter tensor \"{key}\" has shape {:?}, but r = {r} and this model's targeted layers need {shape:?} ({what}); the adapter does not fit these target_modules",
                t.dims()
            )));
        }
        Ok(t)
    };
    Ok(Projections {
        a: take(KEY_A, [r, max_in], "r x the largest in_features")?,
        b: take(KEY_B, [max_out, r], "the largest out_features x r")?,
    })
}
