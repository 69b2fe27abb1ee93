//! Optimizers over trainable tensors keyed by PEFT key, matching torch: `AdamW` (decoupled weight
//! decay; eps added after the bias-corrected sqrt(v), as `torch.optim.AdamW`) and plain `SGD`.
//! State lives in f32 vectors; the tensors are small (adapters), so this is not a hot path.

use std::collections::BTreeMap;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::nn::Grads;
use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    Sgd,
}

impl OptimizerKind {
    /// HF Trainer's AdamW defaults.
    pub fn adamw() -> Self {
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct Optimizer {
    pub kind: OptimizerKind,
    /// LoRA+ (PEFT's `create_loraplus_optimizer`): `lora_B` matrices and every 1-D tensor (DoRA's
    /// magnitudes) step at the learning rate times this ratio, the rest at the learning rate.
    pub loraplus_lr_ratio: Option<f64>,
    /// Completed steps.
    pub step: u64,
    /// key -> (first moment, second moment)
    state: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
}

/// Bytes of updated values [`Optimizer::update_each`] gathers before handing them on.
pub const UPDATE_BATCH_BYTES: usize = 64 << 20;

impl Optimizer {
    pub fn new(kind: OptimizerKind) -> Self {
        Optimizer {
            kind,
            loraplus_lr_ratio: None,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Returns the updated value of every parameter that has a gradient.
    pub fn update(
        &mut self,
        params: &[(String, Tensor)],
        grads: &Grads,
        lr: f64,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(params.len());
        self.update_each(params.to_vec(), grads, lr, |batch| {
            out.extend(batch);
            Ok(())
        })?;
        Ok(out)
    }

    /// One step, handing the updated values to `set` in batches of about [`UPDATE_BATCH_BYTES`]
    /// as they are computed (each parameter's old value dropped here once handed on): the
    /// caller puts them in the model, so full fine-tuning never holds a second copy of every
    /// weight.
    pub fn update_each(
        &mut self,
        params: Vec<(String, Tensor)>,
        grads: &Grads,
        lr: f64,
        mut set: impl FnMut(Vec<(String, Tensor)>) -> Result<()>,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (mut out, mut bytes) = (Vec::new(), 0);
        for (key, p) in params {
            if bytes >= UPDATE_BATCH_BYTES {
                set(std::mem::take(&mut out))?;
                bytes = 0;
            }
            let Some(g) = grads.get(&key) else { continue };
            let lr = match self.loraplus_lr_ratio {
                Some(ratio) if key.contains("lora_B") || p.rank() == 1 => lr * ratio,
                _ => lr,
            };
            let mut w: Vec<f32> = p.flatten_all()?.to_vec1()?;
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            match self.kind {
                OptimizerKind::Sgd => w
                    .iter_mut()
                    .zip(&g)
                    .for_each(|(w, g)| *w -= (lr * *g as f64) as f32),
                OptimizerKind::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let (m, v) = self
                        .state
                        .entry(key.clone())
                        .or_insert_with(|| (vec![0.0; w.len()], vec![0.0; w.len()]));
                    let bc1 = 1.0 - beta1.powi(t);
                    let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
                    let step_size = lr / bc1;
                    // Element-wise, so chunks run in parallel (full fine-tuning updates every
                    // weight) with the same results.
                    const CHUNK: usize = 1 << 16;
                    w.par_chunks_mut(CHUNK)
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(((w, m), v), g)| {
                            for i in 0..w.len() {
                                let gi = g[i] as f64;
                                m[i] = (beta1 * m[i] as f64 + (1.0 - beta1) * gi) as f32;
                                v[i] = (beta2 * v[i] as f64 + (1.0 - beta2) * gi * gi) as f32;
                                let mut wi = w[i] as f64 * (1.0 - lr * weight_decay);
                                let denom = (v[i] as f64).sqrt() / bc2_sqrt + eps;
                                wi -= step_size * m[i] as f64 / denom;
                                w[i] = wi as f32;
                            }
                        });
                }
            }
            bytes += 4 * w.len();
            out.push((key, Tensor::from_vec(w, p.dims(), p.device())?));
        }
        set(out)
    }

    /// Moments for checkpointing (key -> (m, v)).
    pub fn state(&self) -> &BTreeMap<String, (Vec<f32>, Vec<f32>)> {
        &self.state
    }

    pub fn restore(&mut self, step: u64, state: BTreeMap<String, (Vec<f32>, Vec<f32>)>) {
        self.step = step;
        self.state = state;
    }
}

/// torch `clip_grad_norm_`: scales all gradients by max_norm / (norm + 1e-6) when that is < 1.
/// Returns the pre-clip global norm. `max_norm <= 0` disables clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = grads.global_norm()?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            grads.scale(coef)?;
        }
    }
    Ok(norm)
}
