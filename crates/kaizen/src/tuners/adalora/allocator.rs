//! PEFT's `RankAllocator` and `AdaLoraModel.update_and_allocate` (peft/tuners/adalora/layer.py,
//! model.py): after each optimizer step, with that step's (clipped) gradients, the importance
//! |p · grad| of every AdaLoRA value is smoothed (EMA beta1) with its uncertainty (EMA beta2 of
//! |ipt - ema|); a triplet's score is its singular value's score plus the mean scores of its
//! row of lora_A and its column of lora_B; on a budget step every triplet at or below the
//! (init_bgt - budget)-th smallest score has its singular value set to zero.
//!
//! The step passed in is 0-based (PEFT's example loop and the HF Trainer's `global_step` before
//! its increment). One deviation: where PEFT's `torch.kthvalue` would fail because the budget
//! still equals the initial one (k = 0), nothing is masked.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use super::config::{AdaLoraConfig, RankPattern};
use super::PEFT_PREFIX;
use crate::nn::Grads;
use crate::train::{set_params, trainable_params};
use crate::{Error, Model, Result};

#[derive(Debug, Default)]
pub struct RankAllocator {
    /// PEFT key -> EMA of the importance, and of its uncertainty (f32 as torch keeps them).
    exp_avg_ipt: BTreeMap<String, Vec<f32>>,
    exp_avg_unc: BTreeMap<String, Vec<f32>>,
    /// The last allocation (PEFT's `config.rank_pattern`), keyed `<module path>.lora_E`.
    pub rank_pattern: Option<RankPattern>,
}

/// One layer's three tensors as the allocator reads them.
struct Triplet {
    /// `<module path>` (no PEFT prefix)
    path: String,
    a: Tensor,
    e: Tensor,
    b: Tensor,
}

/// The AdaLoRA layers of `model` (sorted by module path, as PEFT's `name_set`).
fn triplets(model: &mut Model) -> Result<Vec<Triplet>> {
    let params: BTreeMap<String, Tensor> = trainable_params(model).into_iter().collect();
    let mut out = Vec::new();
    for (key, e) in &params {
        let Some(prefix) = key.strip_suffix(".lora_E") else {
            continue;
        };
        let get = |part: &str| {
            params
                .get(&format!("{prefix}.{part}"))
                .cloned()
                .ok_or_else(|| Error::Input(format!("AdaLoRA layer {prefix} has no {part}")))
        };
        out.push(Triplet {
            path: prefix
                .strip_prefix(PEFT_PREFIX)
                .unwrap_or(prefix)
                .to_string(),
            a: get("lora_A")?,
            e: e.clone(),
            b: get("lora_B")?,
        });
    }
    Ok(out)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1()?)
}

impl RankAllocator {
    /// PEFT's `budget_schedule`: (budget, whether this step masks).
    fn budget(
        cfg: &AdaLoraConfig,
        step: usize,
        init_bgt: usize,
        target_bgt: usize,
    ) -> (usize, bool) {
        if step <= cfg.tinit {
            (init_bgt, false)
        } else if step > cfg.total_step - cfg.tfinal {
            (target_bgt, true)
        } else {
            let span = (cfg.total_step - cfg.tfinal - cfg.tinit) as f64;
            let mul = 1.0 - (step - cfg.tinit) as f64 / span;
            let b = (init_bgt as f64 - target_bgt as f64) * mul.powi(3) + target_bgt as f64;
            (b as usize, step.is_multiple_of(cfg.delta_t))
        }
    }

    /// `update_and_allocate(step)`, after the optimizer step; `grads` are the step's gradients.
    pub fn after_step(
        &mut self,
        cfg: &AdaLoraConfig,
        model: &mut Model,
        grads: &Grads,
        step: usize,
    ) -> Result<()> {
        let end = cfg.total_step - cfg.tfinal;
        let layers = triplets(model)?;
        if step > end {
            // Final phase: the optimizer moved masked values; PEFT masks them again.
            return match &self.rank_pattern {
                Some(p) => mask(model, &layers, |path| {
                    p.get(&format!("{path}.lora_E")).cloned()
                }),
                None => Ok(()),
            };
        }
        if step < end {
            self.update_ipt(cfg, &layers, grads)?;
        }
        let init_bgt: usize = layers.iter().map(|l| l.e.dims()[0]).sum();
        let target_bgt = cfg.target_r * layers.len();
        let (budget, due) = Self::budget(cfg, step, init_bgt, target_bgt);
        if due || step == end {
            self.rank_pattern =
                Some(self.mask_to_budget(model, &layers, init_bgt - budget.min(init_bgt))?);
        }
        if step == end {
            self.exp_avg_ipt.clear();
            self.exp_avg_unc.clear();
        }
        Ok(())
    }

    /// PEFT's `update_ipt`: the EMAs in f32, as torch computes them (the betas as f32 scalars).
    fn update_ipt(&mut self, cfg: &AdaLoraConfig, layers: &[Triplet], grads: &Grads) -> Result<()> {
        let (b1, c1) = (cfg.beta1 as f32, (1.0 - cfg.beta1) as f32);
        let (b2, c2) = (cfg.beta2 as f32, (1.0 - cfg.beta2) as f32);
        for l in layers {
            for (part, t) in [("lora_A", &l.a), ("lora_E", &l.e), ("lora_B", &l.b)] {
                let key = format!("{PEFT_PREFIX}{}.{part}", l.path);
                let p = values(t)?;
                let g = match grads.get(&key) {
                    Some(g) => values(g)?,
                    None => vec![0.0; p.len()],
                };
                let ema = self
                    .exp_avg_ipt
                    .entry(key.clone())
                    .or_insert_with(|| vec![0.0; p.len()]);
                let unc = self
                    .exp_avg_unc
                    .entry(key)
                    .or_insert_with(|| vec![0.0; p.len()]);
                for i in 0..p.len() {
                    let ipt = (p[i] * g[i]).abs();
                    ema[i] = b1 * ema[i] + c1 * ipt;
                    unc[i] = b2 * unc[i] + c2 * (ipt - ema[i]).abs();
                }
            }
        }
        Ok(())
    }

    /// Element scores (EMA of importance times EMA of uncertainty) of one tensor, f64.
    fn scores(&self, key: &str, n: usize) -> Vec<f64> {
        match (self.exp_avg_ipt.get(key), self.exp_avg_unc.get(key)) {
            (Some(i), Some(u)) => i.iter().zip(u).map(|(&i, &u)| (i * u) as f64).collect(),
            _ => vec![0.0; n],
        }
    }

    /// PEFT's `mask_to_budget`: masks the `k` lowest-scoring triplets (and any tied with the
    /// k-th) over all layers; returns the kept pattern.
    fn mask_to_budget(
        &self,
        model: &mut Model,
        layers: &[Triplet],
        k: usize,
    ) -> Result<RankPattern> {
        let mut triplet_scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for l in layers {
            let (r, inp) = l.a.dims2()?;
            let out = l.b.dims()[0];
            let key = |part: &str| format!("{PEFT_PREFIX}{}.{part}", l.path);
            let a = self.scores(&key("lora_A"), r * inp);
            let b = self.scores(&key("lora_B"), out * r);
            let e = self.scores(&key("lora_E"), r);
            let s = (0..r)
                .map(|i| {
                    let a_mean = a[i * inp..(i + 1) * inp].iter().sum::<f64>() / inp as f64;
                    let b_mean = (0..out).map(|o| b[o * r + i]).sum::<f64>() / out as f64;
                    e[i] + (a_mean + b_mean)
                })
                .collect();
            triplet_scores.insert(l.path.clone(), s);
        }
        let threshold = if k == 0 {
            f64::NEG_INFINITY
        } else {
            let mut all: Vec<f64> = triplet_scores.values().flatten().copied().collect();
            all.sort_by(f64::total_cmp);
            all[k.min(all.len()) - 1]
        };
        let pattern: RankPattern = triplet_scores
            .into_iter()
            .map(|(path, s)| {
                (
                    format!("{path}.lora_E"),
                    s.iter().map(|&x| x > threshold).collect(),
                )
            })
            .collect();
        mask(model, layers, |path| {
            pattern.get(&format!("{path}.lora_E")).cloned()
        })?;
        Ok(pattern)
    }
}

/// Sets the singular values a pattern drops to zero.
fn mask(
    model: &mut Model,
    layers: &[Triplet],
    keep: impl Fn(&str) -> Option<Vec<bool>>,
) -> Result<()> {
    let mut updates = Vec::new();
    for l in layers {
        let Some(keep) = keep(&l.path) else { continue };
        let e: Vec<f32> = values(&l.e)?
            .into_iter()
            .zip(&keep)
            .map(|(v, &k)| if k { v } else { 0.0 })
            .collect();
        let n = e.len();
        updates.push((
            format!("{PEFT_PREFIX}{}.lora_E", l.path),
            Tensor::from_vec(e, (n, 1), &Device::Cpu)?,
        ));
    }
    set_params(model, updates)
}

/// The allocator's state in a checkpoint (beside a full-rank adapter), so a resumed run
/// allocates as the uninterrupted one: `exp_avg_ipt.<key>`, `exp_avg_unc.<key>` and
/// `rank_pattern.<path>.lora_E` (1 kept, 0 dropped).
pub const STATE_FILE: &str = "adalora_state.safetensors";

impl RankAllocator {
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        let mut t = std::collections::HashMap::new();
        for (name, map) in [
            ("exp_avg_ipt", &self.exp_avg_ipt),
            ("exp_avg_unc", &self.exp_avg_unc),
        ] {
            for (k, v) in map {
                t.insert(
                    format!("{name}.{k}"),
                    Tensor::from_slice(v, v.len(), &Device::Cpu)?,
                );
            }
        }
        for (k, keep) in self.rank_pattern.iter().flatten() {
            let bits: Vec<f32> = keep.iter().map(|&b| f32::from(u8::from(b))).collect();
            t.insert(
                format!("rank_pattern.{k}"),
                Tensor::from_vec(bits, keep.len(), &Device::Cpu)?,
            );
        }
        crate::checkpoint::adapter::write_safetensors(&dir.join(STATE_FILE), &t)
    }

    /// Restores what [`RankAllocator::save`] wrote (nothing if the checkpoint has no such file).
    pub fn load(&mut self, dir: &std::path::Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        if !path.is_file() {
            return Ok(());
        }
        let mut pattern = RankPattern::new();
        for (k, v) in crate::checkpoint::adapter::load_tensors(&path)? {
            let v = values(&v)?;
            if let Some(key) = k.strip_prefix("exp_avg_ipt.") {
                self.exp_avg_ipt.insert(key.to_string(), v);
            } else if let Some(key) = k.strip_prefix("exp_avg_unc.") {
                self.exp_avg_unc.insert(key.to_string(), v);
            } else if let Some(key) = k.strip_prefix("rank_pattern.") {
                pattern.insert(key.to_string(), v.iter().map(|&x| x != 0.0).collect());
            } else {
                return Err(Error::checkpoint(
                    &path,
                    format!("unexpected tensor \"{k}\""),
                ));
            }
        }
        self.rank_pattern = (!pattern.is_empty()).then_some(pattern);
        Ok(())
    }
}
