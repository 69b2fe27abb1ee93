//! `AdaLoraConfig` with HF PEFT's field names and defaults (peft/tuners/adalora/config.py, which
//! extends `LoraConfig`), read from and written to `adapter_config.json`.

use std::collections::BTreeMap;

use kaizen_data::quote;
use serde_json::{json, Map, Value};

use crate::config::{shown, Fields};
use crate::tuners::ia3::config::modules;
use crate::tuners::lora::config::MAX_RANK;
use crate::tuners::lora::TargetModules;
use crate::{Error, Result};

/// Which of a layer's `init_r` triplets (rows of lora_A / lora_E, columns of lora_B) are kept,
/// keyed `<module path>.lora_E` as PEFT saves it.
pub type RankPattern = BTreeMap<String, Vec<bool>>;

#[derive(Debug, Clone, PartialEq)]
pub struct AdaLoraConfig {
    /// Every layer's rank at the start (PEFT `init_r`).
    pub init_r: usize,
    /// The average rank the budget schedule ends at.
    pub target_r: usize,
    /// Warm-up steps with the whole budget.
    pub tinit: usize,
    /// Final steps at the target budget (the mask fixed).
    pub tfinal: usize,
    /// Mask every `delta_t` steps while the budget falls (PEFT `deltaT`).
    pub delta_t: usize,
    /// EMA of the sensitivity |p · grad| and of its uncertainty.
    pub beta1: f64,
    pub beta2: f64,
    pub orth_reg_weight: f64,
    /// The schedule's length (PEFT requires it; kaizen's CLI defaults it to the run's steps).
    pub total_step: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// None: the architecture's default (PEFT's AdaLoRA mapping equals LoRA's q/v one here).
    pub target_modules: Option<TargetModules>,
    /// The allocation PEFT saved with a trained adapter (tensors cut to it).
    pub rank_pattern: Option<RankPattern>,
    pub base_model_name_or_path: Option<String>,
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        AdaLoraConfig {
            init_r: 12,
            target_r: 8,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: 0,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            rank_pattern: None,
            base_model_name_or_path: None,
        }
    }
}

impl AdaLoraConfig {
    /// PEFT's checks (`__post_init__`, RankAllocator's beta asserts) plus kaizen's: ranks in
    /// range and `target_r <= init_r`. Each message names the field.
    pub fn validate(&self) -> Result<()> {
        self.check_layers()?;
        let bad = |m: String| Err(Error::Input(m));
        if self.total_step == 0 {
            return bad("AdaLoRA total_step must be at least 1".into());
        }
        if self.tinit + self.tfinal >= self.total_step {
            return bad(format!(
                "AdaLoRA tinit ({}) + tfinal ({}) must be below total_step ({}): the schedule leaves no budgeting phase; decrease tinit/tfinal or increase total_step",
                self.tinit, self.tfinal, self.total_step
            ));
        }
        Ok(())
    }

    /// The checks that do not depend on the schedule's length (`total_step` may still be unset
    /// while a run attaches its layers).
    pub fn check_layers(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if self.init_r == 0 || self.init_r > MAX_RANK {
            return bad(format!(
                "AdaLoRA init_r is {}; it must be between 1 and {MAX_RANK}",
                self.init_r
            ));
        }
        if self.target_r > self.init_r {
            return bad(format!(
                "AdaLoRA target_r ({}) must not exceed init_r ({}): the budget only shrinks",
                self.target_r, self.init_r
            ));
        }
        if self.delta_t == 0 {
            return bad("AdaLoRA deltaT must be at least 1".into());
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return bad(format!("AdaLoRA {name} must be in (0, 1), found {b}"));
            }
        }
        if !(self.orth_reg_weight.is_finite() && self.orth_reg_weight >= 0.0) {
            return bad(format!(
                "AdaLoRA orth_reg_weight must be >= 0, found {}",
                self.orth_reg_weight
            ));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad(format!("lora_alpha must be > 0, found {}", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout must be in [0, 1), found {}",
                self.lora_dropout
            ));
        }
        if let Some(TargetModules::Names(n)) = &self.target_modules {
            if n.is_empty() {
                return bad("target_modules is empty".into());
            }
        }
        for (k, v) in self.rank_pattern.iter().flatten() {
            if v.len() != self.init_r {
                return bad(format!(
                    "rank_pattern[{}] has {} entries; init_r is {}",
                    quote(k),
                    v.len(),
                    self.init_r
                ));
            }
        }
        Ok(())
    }

    /// Reads PEFT's adapter_config.json fields (unsupported LoRA features set are errors).
    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let c = Fields(map);
        for key in ["fan_in_fan_out", "use_dora", "lora_bias"] {
            if c.bool(key)? == Some(true) {
                return Err(format!("\"{key}\": true is not supported for AdaLoRA"));
            }
        }
        crate::tuners::lora::config::refuse_unsupported(
            map,
            &[
                "modules_to_save",
                "exclude_modules",
                "layers_to_transform",
                "layer_replication",
                "target_parameters",
                "trainable_token_indices",
            ],
        )?;
        let d = AdaLoraConfig::default();
        let rank_pattern = match map.get("rank_pattern") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(
                o.iter()
                    .map(|(k, v)| {
                        let bits = v.as_array().and_then(|a| {
                            a.iter().map(Value::as_bool).collect::<Option<Vec<bool>>>()
                        });
                        bits.map(|b| (k.clone(), b)).ok_or_else(|| {
                            format!(
                                "\"rank_pattern\"[{}] must be a list of true/false, found {}",
                                quote(k),
                                shown(v)
                            )
                        })
                    })
                    .collect::<std::result::Result<_, String>>()?,
            ),
            Some(v) => {
                return Err(format!(
                    "\"rank_pattern\" must be an object, found {}",
                    shown(v)
                ))
            }
        };
        let cfg = AdaLoraConfig {
            init_r: c.usize("init_r")?.unwrap_or(d.init_r),
            target_r: c.usize("target_r")?.unwrap_or(d.target_r),
            tinit: c.usize("tinit")?.unwrap_or(d.tinit),
            tfinal: c.usize("tfinal")?.unwrap_or(d.tfinal),
            delta_t: c.usize("deltaT")?.unwrap_or(d.delta_t),
            beta1: c.f64("beta1")?.unwrap_or(d.beta1),
            beta2: c.f64("beta2")?.unwrap_or(d.beta2),
            orth_reg_weight: c.f64("orth_reg_weight")?.unwrap_or(d.orth_reg_weight),
            total_step: c.usize("total_step")?.unwrap_or(0),
            lora_alpha: c.f64("lora_alpha")?.unwrap_or(d.lora_alpha),
            lora_dropout: c.f64("lora_dropout")?.unwrap_or(d.lora_dropout),
            target_modules: modules(map, "target_modules")?,
            rank_pattern,
            base_model_name_or_path: c.str("base_model_name_or_path")?,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// adapter_config.json as PEFT writes it: `targets` are the resolved module names,
    /// `rank_pattern` the allocation the saved tensors are cut to (None: all `init_r`).
    pub fn to_json(&self, targets: &[String], rank_pattern: Option<&RankPattern>) -> Value {
        let target_modules = match &self.target_modules {
            Some(TargetModules::Regex(r)) => json!(r),
            _ => json!(targets),
        };
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "bias": "none",
            "deltaT": self.delta_t,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "init_r": self.init_r,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": self.lora_alpha,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "orth_reg_weight": self.orth_reg_weight,
            "peft_type": "ADALORA",
            "r": 8,
            "rank_pattern": rank_pattern,
            "revision": null,
            "target_modules": target_modules,
            "target_r": self.target_r,
            "task_type": "CAUSAL_LM",
            "tfinal": self.tfinal,
            "tinit": self.tinit,
            "total_step": self.total_step,
            "use_dora": false,
            "use_rslora": false,
        })
    }
}
