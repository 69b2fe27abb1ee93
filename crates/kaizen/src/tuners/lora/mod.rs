//! LoRA (HF PEFT `LORA`): low-rank A/B beside frozen linear layers, chosen by `target_modules`;
//! with `use_dora`, DoRA's magnitude/direction split of the same layers.

pub mod config;
pub mod dora;
pub mod inits;
pub mod layer;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use config::{LoraConfig, LoraInit, TargetModules};
pub use layer::LoraLayer;

use crate::{Error, Model, Result};

/// Prefix PEFT puts before module paths in adapter files (`PeftModel.base_model.model`).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Module paths of `model` that `cfg` targets, in model order. Errors list real layer names
/// when nothing matches.
pub fn resolve_targets(model: &mut Model, cfg: &LoraConfig) -> Result<Vec<String>> {
    let head = model.lm_head_name();
    let default_targets = model.config().default_qv_modules();
    let targets = cfg.target_modules.clone().unwrap_or_else(|| {
        TargetModules::Names(default_targets.iter().map(|s| s.to_string()).collect())
    });
    let regex = match &targets {
        TargetModules::Regex(r) => {
            Some(config::compile("target_modules", r, &format!("^(?:{r})$"))?)
        }
        _ => None,
    };
    let paths: Vec<String> = model.linears_mut().into_iter().map(|(p, _)| p).collect();
    let mut out = Vec::new();
    for p in &paths {
        let hit = match &targets {
            TargetModules::AllLinear => p != head,
            TargetModules::Names(n) => n.iter().any(|t| p == t || p.ends_with(&format!(".{t}"))),
            TargetModules::Regex(_) => regex.as_ref().is_some_and(|r| r.is_match(p)),
        };
        let layer_ok = match (&cfg.layers_to_transform, layer_index(p)) {
            (Some(ls), Some(i)) => ls.contains(&i),
            (Some(_), None) => false,
            (None, _) => true,
        };
        if hit && layer_ok {
            if p == head {
                return Err(Error::Input(format!(
                    "LoRA on the output head \"{head}\" is not supported; target attention or MLP layers"
                )));
            }
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        let sample: Vec<&String> = paths.iter().filter(|p| layer_index(p) == Some(0)).collect();
        return Err(Error::Input(format!(
            "target_modules {targets} matches no layer of this model; its linear layers are named like {sample:?}"
        )));
    }
    Ok(out)
}

/// PEFT's `check_target_module_exists` for one module path: a list entry matches the path or
/// its dotted suffix, a regex must match the whole path, `all-linear` is every linear but the head.
pub fn matches(targets: &TargetModules, path: &str, head: &str) -> Result<bool> {
    Ok(match targets {
        TargetModules::AllLinear => path != head,
        TargetModules::Names(n) => n
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}"))),
        TargetModules::Regex(r) => {
            config::compile("target_modules", r, &format!("^(?:{r})$"))?.is_match(path)
        }
    })
}

/// Layer index from a path like `model.layers.3.self_attn.q_proj`.
fn layer_index(path: &str) -> Option<usize> {
    let rest = &path[path.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// PEFT's `get_pattern_key`: the first pattern `k` with `^(.*\.)?(k)$` matching the path.
pub(crate) fn pattern_value<T: Copy>(
    patterns: &BTreeMap<String, T>,
    path: &str,
) -> Result<Option<T>> {
    for (k, v) in patterns {
        let re = config::compile("pattern key", k, &config::pattern_regex(k))?;
        if re.is_match(path) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

/// What [`attach`] did: the targets, and for a data-driven init (PiSSA, OLoRA, LoftQ) each
/// layer's initial A and B by their PEFT keys (what [`convert`] subtracts).
#[derive(Debug, Clone, Default)]
pub struct Attached {
    pub targets: Vec<String>,
    pub initial: BTreeMap<String, Tensor>,
}

/// Attaches LoRA layers to the targeted linears. A data-driven `cfg.init_lora_weights` first
/// computes its A/B from the base weight and replaces that weight (`inits.rs`), as PEFT does
/// also when it loads such an adapter. With `weights` (PEFT keys -> tensors, e.g. from an
/// adapter file) every layer then takes its A/B (and DoRA magnitude) from there and every tensor
/// must be used; otherwise they are the init's (random ones from `seed`), and a DoRA magnitude,
/// as PEFT, the row norms of `W + scale B A`.
pub fn attach(
    model: &mut Model,
    cfg: &LoraConfig,
    mut weights: Option<BTreeMap<String, Tensor>>,
    seed: u64,
) -> Result<Attached> {
    cfg.validate()?;
    let targets = resolve_targets(model, cfg)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut initial = BTreeMap::new();
    for (path, lin) in model.linears_mut() {
        if !targets.contains(&path) {
            continue;
        }
        let r = pattern_value(&cfg.rank_pattern, &path)?.unwrap_or(cfg.r);
        let alpha = pattern_value(&cfg.alpha_pattern, &path)?.unwrap_or(cfg.lora_alpha);
        let scale = if cfg.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let prefix = format!("{PEFT_PREFIX}{path}");
        let (inp, out) = (lin.in_features(), lin.out_features());
        let data = inits::apply(cfg.init_lora_weights, lin, r, scale, &path)?;
        let (key_a, key_b) = (
            format!("{prefix}.lora_A.weight"),
            format!("{prefix}.lora_B.weight"),
        );
        let (a, b) = match (weights.as_mut(), data) {
            (Some(w), data) => {
                if let Some((a0, b0)) = data {
                    initial.insert(key_a.clone(), a0);
                    initial.insert(key_b.clone(), b0);
                }
                (take(w, &key_a, &[r, inp])?, take(w, &key_b, &[out, r])?)
            }
            (None, Some((a0, b0))) => {
                initial.insert(key_a, a0.clone());
                initial.insert(key_b, b0.clone());
                (a0, b0)
            }
            (None, None) => init(cfg.init_lora_weights, r, inp, out, &mut rng)?,
        };
        let magnitude = match (cfg.use_dora, weights.as_mut()) {
            (false, _) => None,
            (true, Some(w)) => Some(take(w, &format!("{prefix}.lora_magnitude_vector"), &[out])?),
            (true, None) => Some(dora::initial_magnitude(lin, &a, &b, scale)?),
        };
        lin.adapter = Some(Box::new(LoraLayer {
            prefix,
            lora_a: a,
            lora_b: b,
            scale,
            dropout: cfg.lora_dropout,
            magnitude,
        }));
    }
    all_used(weights)?;
    Ok(Attached { targets, initial })
}

/// PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` for a trained
/// PiSSA/OLoRA adapter: the plain LoRA of rank 2r on the original base (`inits::convert` per
/// layer) and its config as PEFT writes it (init_lora_weights true; r, lora_alpha and the
/// patterns doubled; with rsLoRA alpha times sqrt 2, which keeps alpha / sqrt(r)).
pub fn convert(
    cfg: &LoraConfig,
    trained: &[(String, Tensor)],
    initial: &BTreeMap<String, Tensor>,
) -> Result<(LoraConfig, Vec<(String, Tensor)>)> {
    if !cfg.init_lora_weights.converts() {
        return Err(Error::Input(format!(
            "converting to a plain LoRA applies to PiSSA and OLoRA adapters (their base is W - B0 A0), not to init_lora_weights {}",
            cfg.init_lora_weights.name()
        )));
    }
    if cfg.use_dora {
        return Err(Error::Input("converting to a plain LoRA is not defined for DoRA (its magnitude normalises the whole weight); save the DoRA adapter as it is".into()));
    }
    if cfg.use_rslora && !(cfg.rank_pattern.is_empty() && cfg.alpha_pattern.is_empty()) {
        return Err(Error::Input("converting to a plain LoRA is not supported with use_rslora together with rank_pattern/alpha_pattern (as in PEFT)".into()));
    }
    let trained: BTreeMap<&str, &Tensor> = trained.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = Vec::new();
    for (key_a, a0) in initial
        .iter()
        .filter(|(k, _)| k.ends_with(".lora_A.weight"))
    {
        let key_b = key_a.replace(".lora_A.weight", ".lora_B.weight");
        let get = |k: &str| {
            trained.get(k).copied().ok_or_else(|| {
                Error::Input(format!("converting to a plain LoRA: no trained tensor {k}"))
            })
        };
        let (a, b) = inits::convert(get(key_a)?, get(&key_b)?, a0, &initial[&key_b])?;
        out.push((key_a.clone(), a));
        out.push((key_b, b));
    }
    let alpha = if cfg.use_rslora { 2f64.sqrt() } else { 2.0 };
    let converted = LoraConfig {
        r: 2 * cfg.r,
        lora_alpha: cfg.lora_alpha * alpha,
        init_lora_weights: LoraInit::Default,
        rank_pattern: cfg
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), 2 * v))
            .collect(),
        alpha_pattern: cfg
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), 2.0 * v))
            .collect(),
        ..cfg.clone()
    };
    Ok((converted, out))
}

/// After attaching from a file: every tensor must have found its layer.
pub(crate) fn all_used(weights: Option<BTreeMap<String, Tensor>>) -> Result<()> {
    if let Some(w) = weights {
        if let Some(k) = w.keys().next() {
            return Err(Error::Input(format!(
                "the adapter holds {} tensor(s) that fit no targeted layer, e.g. {}; was it trained for another model?",
                w.len(),
                kaizen_data::quote(k)
            )));
        }
    }
    Ok(())
}

/// Removes `key` from an adapter's tensors, checking its shape.
pub(crate) fn take(w: &mut BTreeMap<String, Tensor>, key: &str, shape: &[usize]) -> Result<Tensor> {
    let t = w
        .remove(key)
        .ok_or_else(|| Error::Input(format!("the adapter has no tensor \"{key}\"")))?;
    if t.dims() != shape {
        return Err(Error::Input(format!(
            "adapter tensor \"{key}\" has shape {:?}, but this model needs {shape:?}; the adapter does not fit the model",
            t.dims()
        )));
    }
    Ok(t)
}

/// PEFT's initialisations: A Kaiming-uniform(a = sqrt 5), i.e. U(-1/sqrt(in), 1/sqrt(in)), or
/// N(0, 1/r); B zero (both random for `Random`).
fn init(
    kind: LoraInit,
    r: usize,
    inp: usize,
    out: usize,
    rng: &mut StdRng,
) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (inp as f64).sqrt();
    let uniform = |n: usize, rng: &mut StdRng, bound: f64| super::init::uniform(n, bound, rng);
    let a = match kind {
        LoraInit::Gaussian => {
            let std = 1.0 / r as f64;
            super::init::normal(r * inp, std, rng)
        }
        _ => uniform(r * inp, rng, bound),
    };
    let b = match kind {
        LoraInit::Random => uniform(out * r, rng, 1.0 / (r as f64).sqrt()),
        _ => vec![0.0; out * r],
    };
    Ok((
        Tensor::from_vec(a, (r, inp), &Device::Cpu)?,
        Tensor::from_vec(b, (out, r), &Device::Cpu)?,
    ))
}
