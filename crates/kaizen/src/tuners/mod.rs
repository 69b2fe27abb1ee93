//! PEFT methods, one folder each. Each reaches a model only through a named linear layer, the KV
//! cache or the input embeddings; none names an architecture.

pub mod adalora;
pub mod boft;
pub mod bottleneck;
pub mod freeze;
pub mod full;
pub mod ia3;
pub mod init;
pub mod ln_tuning;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
pub mod oft;
pub mod prefix;
pub mod prompt;
pub mod vera;

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use serde_json::Value;

use crate::checkpoint::adapter;
use crate::nn::{Grads, LinearAdapter, Matrix};
use crate::{Error, Model, Result};

/// A PEFT method with its resolved configuration: what `adapter_config.json` describes.
#[derive(Debug, Clone)]
pub enum Method {
    Lora {
        cfg: lora::LoraConfig,
        targets: Vec<String>,
        /// A data-driven init's initial A/B by PEFT key (empty for the random inits).
        initial: std::collections::BTreeMap<String, Tensor>,
    },
    Ia3 {
        cfg: ia3::Ia3Config,
        targets: Vec<String>,
        feedforward: Vec<String>,
    },
    /// VeRA: per-layer vectors over shared frozen projections (saved with them).
    Vera {
        cfg: vera::VeraConfig,
        targets: Vec<String>,
        projections: vera::Projections,
    },
    /// LyCORIS LoHa: Hadamard product of two low-rank pairs.
    Loha {
        cfg: loha::LohaConfig,
        targets: Vec<String>,
    },
    /// LyCORIS LoKr: Kronecker product of two (optionally low-rank) factors.
    Lokr {
        cfg: lokr::LokrConfig,
        targets: Vec<String>,
    },
    /// OFT: a block-diagonal rotation of each targeted layer's input.
    Oft {
        cfg: oft::OftConfig,
        targets: Vec<String>,
    },
    /// BOFT: butterfly-factorised rotations of each targeted layer's input, scaled outputs.
    Boft {
        cfg: boft::BoftConfig,
        targets: Vec<String>,
    },
    /// LN tuning: the targeted norms train (their trained values replace them when loaded).
    LnTuning {
        cfg: ln_tuning::LnTuningConfig,
        targets: Vec<String>,
    },
    /// AdaLoRA: SVD-form LoRA whose ranks the allocator reallocates after each step (shared
    /// by the clones of this method the training loop and the saver hold).
    AdaLora {
        cfg: adalora::AdaLoraConfig,
        targets: Vec<String>,
        allocator: Arc<Mutex<adalora::RankAllocator>>,
    },
    /// Bottleneck adapters (kaizen's "BOTTLENECK" files, PEFT's envelope).
    Bottleneck {
        cfg: bottleneck::BottleneckConfig,
        targets: Vec<String>,
    },
    PromptTuning {
        cfg: prompt::PromptTuningConfig,
        /// adapter_config.json (depends on model dims).
        json: Value,
    },
    /// A P-tuning adapter as PEFT saves it: only the encoder's output, so inference only.
    PTuningInference { json: Value },
    /// P-tuning with its prompt encoder (MLP or LSTM), trainable; saved as PEFT does (the
    /// encoder's output) plus the encoder's weights beside it (`prompt_encoder.safetensors`).
    PTuning { json: Value },
    /// Prefix tuning; with `prefix_projection`, trainable only with the encoder's weights beside
    /// the file (else, as PEFT saves it, inference only).
    PrefixTuning {
        cfg: prefix::PrefixTuningConfig,
        json: Value,
        trainable: bool,
    },
    /// Full fine-tuning: every weight trains; saved as an HF model directory.
    Full(Box<full::FullFineTuning>),
}

impl Method {
    /// PEFT's `peft_type`.
    pub fn peft_type(&self) -> &'static str {
        match self {
            Method::Lora { .. } => "LORA",
            Method::Ia3 { .. } => "IA3",
            Method::Vera { .. } => "VERA",
            Method::Loha { .. } => "LOHA",
            Method::Lokr { .. } => "LOKR",
            Method::LnTuning { .. } => "LN_TUNING",
            Method::AdaLora { .. } => "ADALORA",
            Method::Oft { .. } => "OFT",
            Method::Boft { .. } => "BOFT",
            Method::Bottleneck { .. } => "BOTTLENECK",
            Method::PromptTuning { .. } => "PROMPT_TUNING",
            Method::PTuningInference { .. } | Method::PTuning { .. } => "P_TUNING",
            Method::PrefixTuning { .. } => "PREFIX_TUNING",
            Method::Full(_) => "FULL",
        }
    }

    /// PEFT's type with the variant a reader needs: "LORA (DoRA)", "BOTTLENECK (houlsby)".
    pub fn label(&self) -> String {
        match self {
            Method::Lora { cfg, .. } if cfg.use_dora => "LORA (DoRA)".into(),
            Method::Full(f) if f.freeze.is_some() => "FULL (freeze)".into(),
            Method::Bottleneck { cfg, .. } => {
                format!("BOTTLENECK ({})", cfg.adapter_type.name())
            }
            m => m.peft_type().into(),
        }
    }

    /// The adapter_config.json contents.
    pub fn config_json(&self) -> Value {
        match self {
            Method::Lora { cfg, targets, .. } => cfg.to_json(targets),
            Method::Ia3 {
                cfg,
                targets,
                feedforward,
            } => cfg.to_json(targets, feedforward),
            Method::Bottleneck { cfg, targets } => cfg.to_json(targets),
            Method::Vera { cfg, targets, .. } => cfg.to_json(targets),
            Method::Loha { cfg, targets } => cfg.to_json(targets),
            Method::Lokr { cfg, targets } => cfg.to_json(targets),
            Method::LnTuning { cfg, targets } => cfg.to_json(targets),
            Method::AdaLora { cfg, targets, .. } => {
                cfg.to_json(targets, self.rank_pattern().as_ref())
            }
            Method::Oft { cfg, targets } => cfg.to_json(targets),
            Method::Boft { cfg, targets } => cfg.to_json(targets),
            Method::PromptTuning { json, .. }
            | Method::PTuningInference { json }
            | Method::PTuning { json }
            | Method::PrefixTuning { json, .. } => json.clone(),
            Method::Full(f) => f.config_json(),
        }
    }

    /// Writes the model's current adapter tensors and this config as a PEFT adapter directory.
    pub fn save(&self, model: &mut Model, dir: &Path) -> Result<()> {
        if let Method::Full(f) = self {
            return f.save(model, dir);
        }
        if let Method::AdaLora { .. } = self {
            let cut = adalora::saved_tensors(
                crate::train::trainable_params(model),
                self.rank_pattern().as_ref(),
            )?;
            return adapter::write(dir, &self.config_json(), &cut);
        }
        // P-tuning, prefix projection: PEFT's file holds the encoder's output; its weights go
        // beside it.
        let encoded = model
            .learned_tokens()
            .find(|v| v.encoder.is_some())
            .map(|v| v.table.clone());
        if let Some(table) = encoded {
            let encoder: std::collections::HashMap<String, Tensor> =
                crate::train::trainable_params(model).into_iter().collect();
            adapter::write(
                dir,
                &self.config_json(),
                &[(prompt::KEY.to_string(), table)],
            )?;
            return adapter::write_safetensors(&dir.join(prompt::p_tuning::ENCODER_FILE), &encoder);
        }
        let mut tensors = crate::train::trainable_params(model);
        if let Method::Vera { projections, .. } = self {
            tensors.extend(projections.tensors());
        }
        adapter::write(dir, &self.config_json(), &tensors)
    }

    /// A checkpoint a run can resume from: [`Method::save`], but AdaLoRA keeps its full-rank
    /// tensors (masked values are zero, so the adapter computes the same) and writes its
    /// allocator's state beside them.
    pub fn save_resumable(&self, model: &mut Model, dir: &Path) -> Result<()> {
        let Method::AdaLora {
            cfg,
            targets,
            allocator,
        } = self
        else {
            return self.save(model, dir);
        };
        adapter::write(
            dir,
            &cfg.to_json(targets, None),
            &crate::train::trainable_params(model),
        )?;
        adalora::lock(allocator)?.save(dir)
    }

    /// Resuming from a checkpoint [`Method::save_resumable`] wrote: the method's own state.
    pub fn resume(&self, dir: &Path) -> Result<()> {
        match self {
            Method::AdaLora { allocator, .. } => adalora::lock(allocator)?.load(dir),
            _ => Ok(()),
        }
    }

    /// A new AdaLoRA method (its allocator fresh).
    pub fn adalora(cfg: adalora::AdaLoraConfig, targets: Vec<String>) -> Method {
        Method::AdaLora {
            cfg,
            targets,
            allocator: Arc::default(),
        }
    }

    /// AdaLoRA's current allocation: the allocator's once it has masked, else the loaded one.
    fn rank_pattern(&self) -> Option<adalora::RankPattern> {
        match self {
            Method::AdaLora { cfg, allocator, .. } => allocator
                .lock()
                .ok()
                .and_then(|a| a.rank_pattern.clone())
                .or_else(|| cfg.rank_pattern.clone()),
            _ => None,
        }
    }

    /// Training: the method's own term of the loss with its gradient added to `grads` (AdaLoRA's
    /// orthogonality regulariser); 0 for the others. Called once per optimizer step.
    pub fn regularize(&self, model: &mut Model, grads: &mut Grads) -> Result<f64> {
        match self {
            Method::AdaLora { cfg, .. } => adalora::regularize(cfg, model, grads),
            _ => Ok(0.0),
        }
    }

    /// Training: called after optimizer step `step` (0-based) with that step's gradients
    /// (AdaLoRA's `update_and_allocate`); nothing for the others.
    pub fn after_step(&self, model: &mut Model, grads: &Grads, step: usize) -> Result<()> {
        match self {
            Method::AdaLora { cfg, allocator, .. } => {
                adalora::lock(allocator)?.after_step(cfg, model, grads, step)
            }
            _ => Ok(()),
        }
    }
}

/// What an adapter directory held, once attached.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    pub method: Method,
    /// PEFT's `peft_type`, e.g. "LORA".
    pub peft_type: String,
    /// Module paths that carry the adapter.
    pub targets: Vec<String>,
    /// Number of trainable values in the adapter.
    pub trainable_params: usize,
}

/// Reads a PEFT adapter directory and attaches it (unmerged) to `model`.
pub fn load_adapter(model: &mut Model, dir: &Path) -> Result<AdapterInfo> {
    let (config, weights) = adapter::read(dir)?;
    let cfg_path = dir.join(adapter::CONFIG_FILE);
    let peft_type = config
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let trainable_params = weights
        .iter()
        .filter(|(k, _)| !vera::is_projection(k))
        .map(|(_, t)| t.elem_count())
        .sum();
    let method = match peft_type.as_str() {
        "LORA" => {
            let cfg =
                lora::LoraConfig::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
            let lora::Attached { targets, initial } = lora::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::Lora {
                cfg,
                targets,
                initial,
            }
        }
        "IA3" => {
            let cfg =
                ia3::Ia3Config::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
            let (targets, feedforward) = ia3::attach(model, &cfg, Some(weights))
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::Ia3 {
                cfg,
                targets,
                feedforward,
            }
        }
        "VERA" => {
            let cfg =
                vera::VeraConfig::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
            let (targets, projections) = vera::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::Vera {
                cfg,
                targets,
                projections,
            }
        }
        "LOHA" => {
            let cfg =
                loha::LohaConfig::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
            let targets = loha::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::Loha { cfg, targets }
        }
        "LOKR" => {
            let cfg =
                lokr::LokrConfig::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
            let targets = lokr::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::Lokr { cfg, targets }
        }
        "LN_TUNING" => {
            let cfg = ln_tuning::LnTuningConfig::from_json(&config)
                .map_err(|m| Error::config(&cfg_path, m))?;
            let targets = ln_tuning::attach(model, &cfg, Some(weights))
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::LnTuning { cfg, targets }
        }
        "ADALORA" => {
            let cfg = adalora::AdaLoraConfig::from_json(&config)
                .map_err(|m| Error::config(&cfg_path, m))?;
            let targets = adalora::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::adalora(cfg, targets)
        }
        "OFT" => {
            let cfg =
                oft::OftConfig::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
            let targets = oft::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::Oft { cfg, targets }
        }
        "BOFT" => {
            let cfg =
                boft::BoftConfig::from_json(&config).map_err(|m| Error::config(&cfg_path, m))?;
            let targets = boft::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::Boft { cfg, targets }
        }
        "BOTTLENECK" => {
            let cfg = bottleneck::BottleneckConfig::from_json(&config)
                .map_err(|m| Error::config(&cfg_path, m))?;
            let targets = bottleneck::attach(model, &cfg, Some(weights), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            Method::Bottleneck { cfg, targets }
        }
        "PROMPT_TUNING" => {
            let cfg = prompt::PromptTuningConfig::from_json(&config)
                .map_err(|m| Error::config(&cfg_path, m))?;
            let table = only_table(dir, weights)?;
            prompt::attach(model, &cfg, Some(table), None, 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            let json = cfg.to_json(model);
            Method::PromptTuning { cfg, json }
        }
        "P_TUNING" => {
            // PEFT saves the encoder's output as "prompt_embeddings": the same table as prompt
            // tuning at inference time.
            let cfg = prompt::PromptTuningConfig::from_json(&config)
                .map_err(|m| Error::config(&cfg_path, m))?;
            let table = only_table(dir, weights)?;
            prompt::attach(model, &cfg, Some(table), None, 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            let json = Value::Object(config.clone());
            let encoder_file = dir.join(prompt::p_tuning::ENCODER_FILE);
            if encoder_file.is_file() {
                // Written by kaizen beside PEFT's file: the encoder can keep training.
                let enc = prompt::p_tuning::EncoderConfig::from_json(&config)
                    .map_err(|m| Error::config(&cfg_path, m))?;
                prompt::p_tuning::attach_encoder(model, &encoder_file, &enc)?;
                Method::PTuning { json }
            } else {
                Method::PTuningInference { json }
            }
        }
        "PREFIX_TUNING" => {
            let cfg = prefix::PrefixTuningConfig::from_json(&config)
                .map_err(|m| Error::config(&cfg_path, m))?;
            let table = only_table(dir, weights)?;
            prefix::attach(model, &cfg, Some(table), 0)
                .map_err(|e| Error::Input(format!("{}: {e}", dir.display())))?;
            // PEFT saves a projection's output only; kaizen keeps its weights beside it.
            let trainable = !cfg.prefix_projection
                || dir.join(prompt::p_tuning::ENCODER_FILE).is_file();
            if cfg.prefix_projection && trainable {
                prefix::attach_encoder(model, dir)?;
            }
            let json = Value::Object(config.clone());
            Method::PrefixTuning {
                cfg,
                json,
                trainable,
            }
        }
        other => {
            return Err(Error::config(
                &cfg_path,
                format!(
                    "peft_type {} is not supported (supported: LORA, ADALORA, IA3, VERA, LOHA, LOKR, LN_TUNING, OFT, BOFT, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, and kaizen's BOTTLENECK)",
                    kaizen_data::quote(other)
                ),
            ))
        }
    };
    let targets = match &method {
        Method::Lora { targets, .. }
        | Method::Ia3 { targets, .. }
        | Method::Vera { targets, .. }
        | Method::Loha { targets, .. }
        | Method::Lokr { targets, .. }
        | Method::LnTuning { targets, .. }
        | Method::AdaLora { targets, .. }
        | Method::Oft { targets, .. }
        | Method::Boft { targets, .. }
        | Method::Bottleneck { targets, .. } => targets.clone(),
        Method::PromptTuning { .. }
        | Method::PTuningInference { .. }
        | Method::PTuning { .. }
        | Method::PrefixTuning { .. }
        | Method::Full(_) => vec![],
    };
    Ok(AdapterInfo {
        method,
        peft_type,
        targets,
        trainable_params,
    })
}

/// The one tensor of a prompt-method adapter, `prompt_embeddings`.
fn only_table(
    dir: &Path,
    mut weights: std::collections::BTreeMap<String, Tensor>,
) -> Result<Tensor> {
    let table = weights.remove(prompt::KEY).ok_or_else(|| {
        Error::Input(format!(
            "{}: the adapter has no \"{}\" tensor",
            dir.display(),
            prompt::KEY
        ))
    })?;
    if let Some(k) = weights.keys().next() {
        return Err(Error::Input(format!(
            "{}: unexpected tensor \"{k}\" beside \"{}\"",
            dir.display(),
            prompt::KEY
        )));
    }
    Ok(table)
}

/// What [`merge`] took out of the model, so [`unmerge`] can put it back exactly.
pub struct Merged {
    layers: Vec<MergedLayer>,
}

struct MergedLayer {
    path: String,
    weight: Matrix,
    bias: Option<Tensor>,
    adapter: Box<dyn LinearAdapter>,
}

impl Merged {
    /// Number of layers that were merged.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

/// Folds every adapter into its base weight and bias (LoRA `W += scale * B A`, IA3 scalings,
/// VeRA `W += (lambda_b B)(lambda_d A)`,
/// LoHa/LoKr `W += ΔW`)
/// and removes it: zero added inference latency. All-or-nothing: if one layer cannot merge
/// (a bottleneck adapter's `merged` says why), the model is left unchanged.
pub fn merge(model: &mut Model) -> Result<Merged> {
    if model.learned_tokens().next().is_some() {
        return Err(Error::Input(
            "virtual-token adapters (prompt tuning, P-tuning, prefix tuning) add inputs rather than change weights, so they cannot be merged; use --adapter instead".into(),
        ));
    }
    let mut folded = Vec::new();
    for (path, lin) in model.linears_mut() {
        if let Some(a) = &lin.adapter {
            let wb = a.merged(lin)?.ok_or_else(|| {
                Error::Input(format!(
                    "the adapter on {path} cannot be merged into the weights"
                ))
            })?;
            folded.push((path, wb));
        }
    }
    let mut layers = Vec::with_capacity(folded.len());
    let mut linears = model.linears_mut();
    for (path, (w, b)) in folded {
        let (_, lin) = linears
            .iter_mut()
            .find(|(p, _)| *p == path)
            .expect("path from this model");
        let adapter = lin.adapter.take().expect("checked above");
        // Folded in f32, kept in the layer's dtype (bf16 under --dtype bf16); a quantized
        // weight becomes a dense one in its compute dtype.
        let w = lin.weight.like(w)?;
        let weight = std::mem::replace(&mut lin.weight, w);
        let bias = std::mem::replace(&mut lin.bias, b);
        layers.push(MergedLayer {
            path,
            weight,
            bias,
            adapter,
        });
    }
    Ok(Merged { layers })
}

/// Undoes [`merge`]: restores the original weights and re-attaches the adapters unmerged.
pub fn unmerge(model: &mut Model, merged: Merged) -> Result<()> {
    let mut linears = model.linears_mut();
    for l in merged.layers {
        let (_, lin) = linears
            .iter_mut()
            .find(|(p, _)| *p == l.path)
            .ok_or_else(|| Error::Input(format!("unmerge: no layer {} in this model", l.path)))?;
        lin.weight = l.weight;
        lin.bias = l.bias;
        lin.adapter = Some(l.adapter);
    }
    Ok(())
}
