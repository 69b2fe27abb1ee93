//! The training engine: loss and gradients of one optimizer step over micro-batches (explicit
//! backward; frozen weights never get a gradient), optimizers, schedules and the training loop.

pub mod optim;
pub mod schedule;
pub mod trainer;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;

use crate::nn::loss::{head_loss_backward, IGNORE_INDEX};
use crate::nn::Grads;
use crate::{Error, Model, Result};

/// A (B, T) batch of token ids with labels (-100 = not a label), row-major.
pub use kaizen_data::Batch;

/// Next-token targets: position t predicts labels[t + 1]; the last position predicts nothing.
pub fn shifted_targets(batch: &Batch) -> Vec<i64> {
    let (b, t) = (batch.batch_size, batch.seq_len);
    let mut out = vec![IGNORE_INDEX; b * t];
    for r in 0..b {
        for c in 0..t.saturating_sub(1) {
            out[r * t + c] = batch.labels[r * t + c + 1];
        }
    }
    out
}

/// Number of scored next-token predictions in a batch.
pub fn label_count(batch: &Batch) -> usize {
    shifted_targets(batch)
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// Result of [`micro_batch_backward`].
pub struct MicroStep {
    /// Sum of NLL over scored tokens.
    pub loss_sum: f64,
    pub tokens: usize,
    /// Gradient w.r.t. the input embeddings (B, T, hidden).
    pub d_embeds: Tensor,
}

/// Forward and backward of one micro-batch. Gradients are of `sum NLL * loss_scale`; pass
/// `1 / (label tokens of the whole optimizer step)` so that accumulation over micro-batches
/// gives the token-weighted mean (not a mean of per-batch means).
pub fn micro_batch_backward(
    model: &Model,
    batch: &Batch,
    loss_scale: f64,
    rng: Option<&mut StdRng>,
    grads: &mut Grads,
) -> Result<MicroStep> {
    let (b, t) = (batch.batch_size, batch.seq_len);
    if batch.input_ids.len() != b * t || batch.labels.len() != b * t {
        return Err(Error::Input(format!(
            "batch of {b}x{t} has {} ids and {} labels",
            batch.input_ids.len(),
            batch.labels.len()
        )));
    }
    let ids = Tensor::from_slice(&batch.input_ids, (b, t), &Device::Cpu)?;
    let x = model.embed(&ids)?;
    let (h, tape) = model.forward_train(&x, rng)?; // (B, T, hidden)
    let hidden = h.dim(2)?;
    let targets = shifted_targets(batch);
    let (loss_sum, tokens, dh) = head_loss_backward(
        model.lm_head(),
        &h.reshape((b * t, hidden))?,
        &targets,
        loss_scale,
    )?;
    let d_embeds = model.backward(&tape, &dh.reshape((b, t, hidden))?, grads)?;
    Ok(MicroStep {
        loss_sum,
        tokens,
        d_embeds,
    })
}

/// Trainable tensors currently attached to the model's linear layers, by PEFT key.
pub fn trainable_params(model: &mut Model) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (_, lin) in model.linears_mut() {
        if let Some(a) = &lin.adapter {
            out.extend(a.params());
        }
    }
    out
}

/// Writes updated tensors back into their adapters.
pub fn set_params(model: &mut Model, updates: Vec<(String, Tensor)>) -> Result<()> {
    let mut linears = model.linears_mut();
    for (key, value) in updates {
        let mut done = false;
        for (_, lin) in linears.iter_mut() {
            if let Some(a) = lin.adapter.as_mut() {
                if a.set_param(&key, value.clone())? {
                    done = true;
                    break;
                }
            }
        }
        if !done {
            return Err(Error::Input(format!(
                "no trainable tensor \"{key}\" in the model"
            )));
        }
    }
    Ok(())
}
