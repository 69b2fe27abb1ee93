//! The training engine: loss and gradients of one optimizer step over micro-batches (explicit
//! backward; frozen weights never get a gradient), optimizers, schedules and the training loop.

pub mod comm;
pub mod optim;
pub mod out_dir;
pub mod schedule;
pub mod trainer;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;

use crate::models::{Part, VirtualTokens};
use crate::nn::loss::{head_loss_backward, IGNORE_INDEX};
use crate::nn::Grads;
use crate::{Error, Model, Result};

/// A (B, T) batch of token ids with labels (-100 = not a label), row-major.
pub use kaizen_data::Batch;

/// Next-token targets: position t predicts labels[t + 1]; the last position predicts nothing.
pub fn shifted_targets(batch: &Batch) -> Vec<i64> {
    targets_after_virtual(batch, 0)
}

/// Targets for a batch whose rows are preceded by `n` virtual tokens (label -100), over all
/// n + T positions: as PEFT, the last virtual position predicts the first real token's label.
pub fn targets_after_virtual(batch: &Batch, n: usize) -> Vec<i64> {
    let (b, t) = (batch.batch_size, batch.seq_len);
    let full = n + t;
    let mut out = vec![IGNORE_INDEX; b * full];
    for r in 0..b {
        for c in 0..full - 1 {
            // position c predicts extended label c + 1, i.e. real label c + 1 - n
            if c + 1 >= n {
                out[r * full + c] = batch.labels[r * t + c + 1 - n];
            }
        }
    }
    out
}

/// Number of scored next-token predictions in a batch preceded by `n_virtual` virtual tokens.
pub fn label_count(batch: &Batch, n_virtual: usize) -> usize {
    targets_after_virtual(batch, n_virtual)
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
    let (x, n) = model.embed_input(&ids, true)?; // (B, n + T, hidden): n virtual tokens first
    let (h, tape) = model.forward_train(&x, rng)?;
    let (full, hidden) = (n + t, h.dim(2)?);
    let targets = targets_after_virtual(batch, n);
    let (loss_sum, tokens, dh) = head_loss_backward(
        model.lm_head(),
        &h.reshape((b * full, hidden))?,
        &targets,
        loss_scale,
        model.config().final_logit_softcapping,
        grads,
    )?;
    let (dx, d_prefix) = model.backward(&tape, &dh.reshape((b, full, hidden))?, grads)?; // (B, n + T, hidden)
    if let Some(v) = &model.virtual_tokens {
        let d_table = dx.narrow(1, 0, n)?.sum(0)?; // every sequence shares the table
        table_backward(v, d_table, grads)?;
    }
    if let (Some(p), Some(d_table)) = (&model.prefix, d_prefix) {
        table_backward(p, d_table, grads)?;
    }
    let d_embeds = dx.narrow(1, n, t)?;
    model.embed_backward(&ids, &d_embeds, grads)?;
    Ok(MicroStep {
        loss_sum,
        tokens,
        d_embeds,
    })
}

/// Gradient of a learned-token table into its encoder's parameters, or the table itself.
fn table_backward(v: &VirtualTokens, d_table: Tensor, grads: &mut Grads) -> Result<()> {
    match &v.encoder {
        Some(e) => e.backward(&d_table, grads),
        None => grads.add(&v.key, d_table),
    }
}

/// How many values and tensors train. The clones [`trainable_params`] hands out are dropped
/// here: held through a run, they would keep full fine-tuning's original weights alive beside
/// the updated ones.
pub fn trainable_count(model: &mut Model) -> (usize, usize) {
    let params = trainable_params(model);
    let values = params.iter().map(|(_, t)| t.elem_count()).sum();
    (values, params.len())
}

/// Trainable tensors currently attached to the model, by PEFT key.
pub fn trainable_params(model: &mut Model) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for v in model.learned_tokens() {
        match &v.encoder {
            Some(e) => out.extend(e.params()),
            None => out.push((v.key.clone(), v.table.clone())),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (_, mut part) in model.parts_mut() {
        if let Part::Linear(lin) = &part {
            if let Some(a) = &lin.adapter {
                out.extend(a.params());
            }
        }
        // Full fine-tuning: the weights themselves, a tied head once (as the embeddings).
        if let Some(path) = part.trainable_mut().clone() {
            for (suffix, t) in part.tensors_mut() {
                let key = format!("{path}.{suffix}");
                if seen.insert(key.clone()) {
                    out.push((key, t.clone()));
                }
            }
        }
    }
    out
}

/// Writes updated tensors back into their adapters (encoders then recompute their tables once).
pub fn set_params(model: &mut Model, updates: Vec<(String, Tensor)>) -> Result<()> {
    let mut linear_updates = Vec::new();
    for (key, value) in updates {
        let mut taken = false;
        for v in model.learned_tokens_mut() {
            taken = match v.encoder.as_mut() {
                None if key == v.key => {
                    v.table = value.clone();
                    true
                }
                None => false,
                Some(e) => e.set_param(&key, value.clone())?,
            };
            if taken {
                break;
            }
        }
        if !taken {
            linear_updates.push((key, value));
        }
    }
    for v in model.learned_tokens_mut() {
        if let Some(e) = &v.encoder {
            v.table = e.forward()?;
        }
    }
    // Full fine-tuning: base weights by HF name (a tied head takes the embeddings' value too).
    let mut rest: std::collections::HashMap<String, Tensor> = linear_updates.into_iter().collect();
    let mut used = std::collections::HashSet::new();
    for (_, mut part) in model.parts_mut() {
        let Some(path) = part.trainable_mut().clone() else {
            continue;
        };
        for (suffix, t) in part.tensors_mut() {
            let key = format!("{path}.{suffix}");
            if let Some(v) = rest.get(&key) {
                *t = v.clone();
                used.insert(key);
            }
        }
    }
    rest.retain(|k, _| !used.contains(k));
    for (key, value) in rest {
        let mut linears = model.linears_mut();
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
