//! The training loop: batches in, loss, backward, clip, step, schedule, log, checkpoint. One
//! visible function ([`train`]); everything it calls is small and named.
//!
//! Output directory: the final PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`),
//! `metrics.jsonl` (one line per step; eval lines carry `eval_loss`), and `checkpoint-N/` every
//! `save_every` steps (the adapter, `optimizer.safetensors`, `trainer_state.json`), each
//! written to a temporary name and renamed, so an interrupted or failed run leaves the last good
//! checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use kaizen_data::{collate, Batches, Example};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use super::comm::{all_reduce_step, broadcast_f32, Communicator, StepSums};
use super::optim::{clip_grad_norm, Optimizer, OptimizerKind};
use super::schedule::Schedule;
use super::{micro_batch_backward, set_params, targets_after_virtual, trainable_params, Batch};
use crate::checkpoint::adapter::{write_atomic, write_dir_atomic, write_safetensors};
use crate::nn::loss::{token_nll, IGNORE_INDEX};
use crate::nn::Grads;
use crate::tuners::Method;
use crate::{Error, Model, Result};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    /// LoRA+: `lora_B` and 1-D tensors step at `lr` times this (see `Optimizer`).
    pub loraplus_lr_ratio: Option<f64>,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Total optimizer steps (resolved from max_steps or epochs by the caller).
    pub total_steps: usize,
    /// Gradient clipping threshold; 0 disables.
    pub max_grad_norm: f64,
    pub seed: u64,
    pub shuffle: bool,
    /// Evaluate on the validation set every N steps (0: only at the end).
    pub eval_every: usize,
    /// Write checkpoint-N/ every N steps (0: never).
    pub save_every: usize,
    /// Set from outside (a signal handler): the loop finishes its step, writes checkpoint-N/
    /// and returns early, so the run can be resumed from there.
    pub stop: Option<Arc<AtomicBool>>,
}

/// What the loop reports to its caller (progress bar, logs).
pub enum Event<'a> {
    Step(&'a StepLog),
    Eval { step: usize, loss: f64 },
    Checkpoint(&'a Path),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub elapsed: f64,
    /// Seconds in the step's all-reduce (several ranks only; waiting for the slowest included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_seconds: Option<f64>,
}

/// Tokenized examples for a run.
pub struct TrainData<'a> {
    pub train: &'a [Example],
    pub val: &'a [Example],
    /// Id used for right padding (never attended to by real tokens, never a label).
    pub pad_id: u32,
}

pub struct Summary {
    pub steps: usize,
    pub final_loss: f64,
    /// Held-out loss before the first update (fresh runs only) and after the last.
    pub initial_eval_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub tokens_per_sec: f64,
    /// `TrainConfig::stop` ended the run after `steps` steps; the adapter was not written,
    /// `checkpoint-<steps>/` was.
    pub stopped: bool,
}

/// Trains the adapter attached to `model` and writes it to `out`. `resume_from` is a
/// checkpoint directory written by an earlier run with the same data and config.
///
/// Data parallel over `comm`'s ranks: an optimizer step takes `grad_accum * size` micro-batches
/// in data order, rank r the r-th block of `grad_accum`; each rank sums its NLL gradients, one
/// all-reduce sums them with the label-token counts over ranks, and every rank then takes the
/// same clip and optimizer step on the token-weighted mean. Rank 0 alone reads `resume_from`'s
/// tensors and optimizer state (broadcast), evaluates, and writes `out`; the method's own state
/// there (AdaLoRA's allocator, see [`Method::resume`]) every rank reads.
///
/// Method hooks: [`Method::regularize`] adds the method's loss term and its gradient once per
/// step, before clipping; [`Method::after_step`] runs after the optimizer step with the step's
/// (clipped) gradients, as PEFT's `update_and_allocate` after `optimizer.step()`.
#[allow(clippy::too_many_arguments)] // the loop's inputs, each named at the one call site
pub fn train(
    model: &mut Model,
    method: &Method,
    data: &TrainData,
    cfg: &TrainConfig,
    out: &Path,
    resume_from: Option<&Path>,
    comm: &dyn Communicator,
    on: &mut dyn FnMut(Event),
) -> Result<Summary> {
    let (train_set, val_set, pad_id) = (data.train, data.val, data.pad_id);
    if train_set.is_empty() {
        return Err(Error::Input("the training set is empty".into()));
    }
    let lead = comm.rank() == 0;
    let mut opt = Optimizer::new(cfg.optimizer);
    opt.loraplus_lr_ratio = cfg.loraplus_lr_ratio;
    if let Some(dir) = resume_from {
        // The method's own state (AdaLoRA's allocator), read by every rank: each runs it.
        method.resume(dir)?;
    }
    let first_step = match resume_from {
        Some(dir) if lead => load_checkpoint(model, &mut opt, dir)?,
        _ => 0,
    };
    let first_step = share_state(comm, model, &mut opt, first_step)?;
    let keys: Vec<(String, Vec<usize>)> = trainable_params(model)
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    let per_step = cfg.grad_accum * comm.size(); // micro-batches per optimizer step, all ranks
    let mut order = MicroBatches::new(train_set.len(), cfg, first_step * per_step);
    let mut metrics = match lead {
        true => Some(MetricsLog::open(&out.join("metrics.jsonl"), first_step)?),
        false => None,
    };
    let start = Instant::now();
    let (mut last_loss, mut eval_loss, mut tok_rate) = (f64::NAN, None, 0.0);
    let mut initial_eval_loss = None;
    if first_step == 0 && !val_set.is_empty() && lead {
        // The held-out loss before any update: the baseline the run is judged against.
        let l = evaluate(model, val_set, pad_id, cfg.batch_size)?;
        log(
            &mut metrics,
            &json!({"step": 0, "eval_loss": l, "elapsed": 0.0}),
        )?;
        on(Event::Eval { step: 0, loss: l });
        initial_eval_loss = Some(l);
    }
    for step in first_step..cfg.total_steps {
        let t0 = Instant::now();
        // 1. Batches in: this rank's grad_accum micro-batches of the step, right-padded.
        let mine = comm.rank() * cfg.grad_accum..(comm.rank() + 1) * cfg.grad_accum;
        let micro: Vec<(usize, Batch)> = (0..per_step)
            .map(|j| (j, order.next_batch()))
            .filter(|(j, _)| mine.contains(j))
            .map(|(j, idx)| {
                let rows: Vec<&Example> = idx.iter().map(|&i| &train_set[i]).collect();
                (j, collate(&rows, pad_id))
            })
            .collect();
        // 2. Loss and backward: gradients of the summed NLL, summed over ranks, then divided
        // by the step's label tokens: the token-weighted mean over the whole step.
        let mut grads = Grads::new();
        let mut sums = StepSums::default();
        for (j, b) in &micro {
            let mut rng = StdRng::seed_from_u64(micro_seed(cfg.seed, step, *j));
            let m = micro_batch_backward(model, b, 1.0, Some(&mut rng), &mut grads)?;
            sums.loss_sum += m.loss_sum;
            sums.tokens += m.tokens;
            sums.positions += b.batch_size * b.seq_len;
        }
        sums.stop = cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
        let t_reduce = Instant::now();
        let sums = all_reduce_step(comm, &keys, &mut grads, sums)?;
        let allreduce_seconds = (comm.size() > 1).then(|| t_reduce.elapsed().as_secs_f64());
        if sums.tokens == 0 {
            return Err(Error::Input(format!(
                "step {}: the batches hold no label tokens",
                step + 1
            )));
        }
        grads.scale(1.0 / sums.tokens as f64)?;
        // The method's own loss term (AdaLoRA's regulariser), once per step, on every rank.
        let loss = sums.loss_sum / sums.tokens as f64 + method.regularize(model, &mut grads)?;
        // 3. Clip, 4. step with the scheduled learning rate.
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::Input(format!(
                "training diverged at step {}: loss {loss}, grad norm {grad_norm}; the last checkpoint in {} is intact \
                 (try a lower --lr or --max-grad-norm)",
                step + 1,
                out.display()
            )));
        }
        let lr = cfg
            .schedule
            .lr(cfg.lr, cfg.warmup_steps, cfg.total_steps, step);
        opt.update_each(trainable_params(model), &grads, lr, |batch| {
            set_params(model, batch)
        })?;
        method.after_step(model, &grads, step)?;
        // 5. Log (rank 0): positions of all ranks over this step's time.
        tok_rate = sums.positions as f64 / t0.elapsed().as_secs_f64();
        last_loss = loss;
        let log_line = StepLog {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            tokens_per_sec: tok_rate,
            elapsed: start.elapsed().as_secs_f64(),
            allreduce_seconds,
        };
        if lead {
            let v = serde_json::to_value(&log_line).map_err(|e| Error::Input(e.to_string()))?;
            log(&mut metrics, &v)?;
            on(Event::Step(&log_line));
        }
        // 6. Evaluate and checkpoint on schedule (rank 0; the others wait in the next step's
        // all-reduce).
        let last = step + 1 == cfg.total_steps;
        let eval_due = last || (cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0);
        if lead && !val_set.is_empty() && eval_due {
            let l = evaluate(model, val_set, pad_id, cfg.batch_size)?;
            log(
                &mut metrics,
                &json!({"step": step + 1, "eval_loss": l, "elapsed": start.elapsed().as_secs_f64()}),
            )?;
            on(Event::Eval {
                step: step + 1,
                loss: l,
            });
            eval_loss = Some(l);
        }
        let stop = !last && sums.stop;
        if lead && !last && (stop || (cfg.save_every > 0 && (step + 1) % cfg.save_every == 0)) {
            let dir = save_checkpoint(model, method, &opt, out, step + 1)?;
            on(Event::Checkpoint(&dir));
        }
        if stop {
            return Ok(Summary {
                steps: step + 1,
                final_loss: last_loss,
                initial_eval_loss,
                eval_loss,
                tokens_per_sec: tok_rate,
                stopped: true,
            });
        }
    }
    if lead {
        method.save(model, out)?;
    }
    Ok(Summary {
        steps: cfg.total_steps,
        final_loss: last_loss,
        initial_eval_loss,
        eval_loss,
        tokens_per_sec: tok_rate,
        stopped: false,
    })
}

/// The dropout seed of micro-batch `j` of optimizer step `step`: the same whichever rank
/// computes it (micro-batch 0 keeps the seed steps had before data parallelism).
fn micro_seed(seed: u64, step: usize, j: usize) -> u64 {
    seed ^ (step as u64).wrapping_mul(0x9E37_79B9) ^ (j as u64).wrapping_mul(0x85EB_CA6B) << 32
}

fn log(metrics: &mut Option<MetricsLog>, v: &serde_json::Value) -> Result<()> {
    metrics.as_mut().map_or(Ok(()), |m| m.write(v))
}

/// Makes every rank start from rank 0's state: its trainable tensors (fresh or resumed), the
/// optimizer's step count and moments, and the step to continue from, which it returns.
fn share_state(
    comm: &dyn Communicator,
    model: &mut Model,
    opt: &mut Optimizer,
    first_step: usize,
) -> Result<usize> {
    if comm.size() == 1 {
        return Ok(first_step);
    }
    let params = trainable_params(model);
    let head = [first_step as u64, opt.step, !opt.state().is_empty() as u64];
    let mut bytes: Vec<u8> = head.iter().flat_map(|x| x.to_le_bytes()).collect();
    comm.broadcast(&mut bytes)?;
    let head: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    let mut values = Vec::new();
    for (_, t) in &params {
        values.extend(t.flatten_all()?.to_vec1::<f32>()?);
    }
    let moments = head[2] != 0;
    if moments {
        for (key, t) in &params {
            let n = t.elem_count();
            let (m, v) = opt
                .state()
                .get(key)
                .cloned()
                .unwrap_or((vec![0.0; n], vec![0.0; n]));
            values.extend(m.into_iter().chain(v));
        }
    }
    broadcast_f32(comm, &mut values)?;
    let (mut at, mut updates, mut state) = (0, Vec::new(), BTreeMap::new());
    for (key, t) in &params {
        let n = t.elem_count();
        updates.push((
            key.clone(),
            Tensor::from_slice(&values[at..at + n], t.dims(), &Device::Cpu)?,
        ));
        at += n;
    }
    for (key, t) in params.iter().filter(|_| moments) {
        let n = t.elem_count();
        state.insert(
            key.clone(),
            (
                values[at..at + n].to_vec(),
                values[at + n..at + 2 * n].to_vec(),
            ),
        );
        at += 2 * n;
    }
    set_params(model, updates)?;
    opt.restore(head[1], state);
    Ok(head[0] as usize)
}

/// Token-weighted mean next-token loss over `examples`, batched, no gradients.
pub fn evaluate(
    model: &Model,
    examples: &[Example],
    pad_id: u32,
    batch_size: usize,
) -> Result<f64> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let b = collate(&chunk.iter().collect::<Vec<_>>(), pad_id);
        let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &Device::Cpu)?;
        let (x, n) = model.embed_input(&ids, true)?;
        let h = model.forward_hidden(&x, None)?; // (B, n + T, hidden)
        let targets = targets_after_virtual(&b, n);
        let rows: Vec<u32> = (0..targets.len())
            .filter(|&i| targets[i] != IGNORE_INDEX)
            .map(|i| i as u32)
            .collect();
        if rows.is_empty() {
            continue;
        }
        // The LM head only on scored rows: prompts can be most of a sequence.
        let h = h
            .reshape((b.batch_size * (n + b.seq_len), h.dim(2)?))?
            .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?;
        let picked = model.head_logits(&h)?; // (rows, V)
        let t: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
        let nll = token_nll(&picked, &t)?;
        sum += nll.iter().map(|&x| x as f64).sum::<f64>();
        count += nll.len();
    }
    if count == 0 {
        return Err(Error::Input(
            "the validation set holds no label tokens".into(),
        ));
    }
    Ok(sum / count as f64)
}

/// Endless sequence of micro-batches over epochs, resumable at any optimizer step.
struct MicroBatches {
    n: usize,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    epoch: usize,
    current: Batches,
}

impl MicroBatches {
    /// Starts after the first `skip` micro-batches.
    fn new(n: usize, cfg: &TrainConfig, skip: usize) -> Self {
        let bs = cfg.batch_size.max(1);
        let mut s = MicroBatches {
            n,
            batch_size: bs,
            shuffle: cfg.shuffle,
            seed: cfg.seed,
            epoch: 0,
            current: Batches::new(n, bs, cfg.shuffle, cfg.seed, 0),
        };
        for _ in 0..skip {
            s.next_batch();
        }
        s
    }

    fn next_batch(&mut self) -> Vec<usize> {
        loop {
            if let Some(b) = self.current.next() {
                return b;
            }
            self.epoch += 1;
            self.current =
                Batches::new(self.n, self.batch_size, self.shuffle, self.seed, self.epoch);
        }
    }
}

/// Optimizer steps per epoch for `n` examples.
pub fn steps_per_epoch(n: usize, batch_size: usize, grad_accum: usize) -> usize {
    n.div_ceil(batch_size.max(1))
        .div_ceil(grad_accum.max(1))
        .max(1)
}

struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// A fresh log, or, when resuming from `resume_step`, the old log without the lines of
    /// steps after that checkpoint (they are about to be redone).
    fn open(path: &Path, resume_step: usize) -> Result<Self> {
        let kept = if resume_step > 0 {
            let old = std::fs::read_to_string(path).unwrap_or_default();
            old.lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= resume_step)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        } else {
            String::new()
        };
        write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))
    }
}

/// Writes `out/checkpoint-{step}` via `.checkpoint-{step}.tmp` and a rename; a failed write
/// (a full disk) removes the temporary directory and leaves earlier checkpoints intact.
fn save_checkpoint(
    model: &mut Model,
    method: &Method,
    opt: &Optimizer,
    out: &Path,
    step: usize,
) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{step}"));
    write_dir_atomic(&dir, |tmp| {
        method.save_resumable(model, tmp)?;
        let mut state = HashMap::new();
        for (k, (m, v)) in opt.state() {
            state.insert(
                format!("exp_avg.{k}"),
                Tensor::from_slice(m, m.len(), &Device::Cpu)?,
            );
            state.insert(
                format!("exp_avg_sq.{k}"),
                Tensor::from_slice(v, v.len(), &Device::Cpu)?,
            );
        }
        if !state.is_empty() {
            write_safetensors(&tmp.join("optimizer.safetensors"), &state)?;
        }
        write_atomic(
            &tmp.join("trainer_state.json"),
            json!({"global_step": step, "optimizer_step": opt.step})
                .to_string()
                .as_bytes(),
        )?;
        Ok(())
    })?;
    Ok(dir)
}

/// Restores adapter tensors and optimizer state; returns the step to continue from.
fn load_checkpoint(model: &mut Model, opt: &mut Optimizer, dir: &Path) -> Result<usize> {
    use crate::checkpoint::adapter;
    let model_file = dir.join("model.safetensors");
    let full = model_file.is_file() && !dir.join(adapter::CONFIG_FILE).is_file();
    let (mut weights, mut file) = if full {
        // Full fine-tuning: the checkpoint is an HF model directory.
        (adapter::load_tensors(&model_file)?, model_file)
    } else {
        (adapter::read(dir)?.1, dir.join(adapter::WEIGHTS_FILE))
    };
    let encoder_file = dir.join(crate::tuners::prompt::p_tuning::ENCODER_FILE);
    if encoder_file.is_file() {
        // P-tuning, prefix projection: the trainable tensors are the encoder's; the adapter file
        // holds its output.
        weights = adapter::load_tensors(&encoder_file)?;
        file = encoder_file;
    }
    // VeRA's shared projections are frozen: the resumed run drew the same ones from its
    // projection_prng_key (resume refuses changed flags), and the final file holds them again.
    weights.retain(|k, _| !crate::tuners::vera::is_projection(k));
    let trainable = trainable_params(model);
    if full {
        // Freeze tuning trains some of the weights the checkpoint holds; the rest stay as loaded.
        weights.retain(|k, _| trainable.iter().any(|(key, _)| key == k));
    }
    // Every trainable tensor must come back: one left at its fresh init would train on silently.
    for (key, t) in trainable {
        let msg = match weights.get(&key) {
            None => format!("no tensor \"{key}\", which the run trains; the checkpoint is incomplete or from another run"),
            Some(w) if w.dims() != t.dims() => {
                format!("\"{key}\" has shape {:?}, the run's is {:?}", w.dims(), t.dims())
            }
            Some(_) => continue,
        };
        return Err(Error::checkpoint(&file, msg));
    }
    set_params(model, weights.into_iter().collect())?;
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(&state_path, e.to_string()))?;
    let step = state["global_step"]
        .as_u64()
        .ok_or_else(|| Error::config(&state_path, "no global_step"))? as usize;
    let opt_step = state["optimizer_step"].as_u64().unwrap_or(step as u64);
    let mut moments: BTreeMap<String, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
    let opt_path = dir.join("optimizer.safetensors");
    if opt_path.is_file() {
        let t = candle_core::safetensors::load(&opt_path, &Device::Cpu)
            .map_err(|e| Error::checkpoint(&opt_path, e.to_string()))?;
        for (k, m) in &t {
            if let Some(key) = k.strip_prefix("exp_avg.") {
                let v = t.get(&format!("exp_avg_sq.{key}")).ok_or_else(|| {
                    Error::checkpoint(&opt_path, format!("no exp_avg_sq for {key}"))
                })?;
                moments.insert(key.to_string(), (m.to_vec1()?, v.to_vec1()?));
            }
        }
    }
    opt.restore(opt_step, moments);
    Ok(step)
}

/// The newest `checkpoint-N` directory in `out`, if any.
pub fn last_checkpoint(out: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(out).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("checkpoint-")?
                .parse::<usize>()
                .ok()
                .map(|n| (n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}
