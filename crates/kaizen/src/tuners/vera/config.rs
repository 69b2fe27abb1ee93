//! `VeraConfig` with HF PEFT's field names and defaults (peft/tuners/vera/config.py).

use serde_json::{json, Map, Value};

use crate::config::Fields;
use crate::tuners::lora::{config::MAX_RANK, LoraConfig, TargetModules};

#[derive(Debug, Clone, PartialEq)]
pub struct VeraConfig {
    /// Rows of the shared `vera_A` (and columns of `vera_B`); PEFT's default 256.
    pub r: usize,
    /// None: the architecture's default (PEFT's VeRA mapping is LoRA's).
    pub target_modules: Option<TargetModules>,
    pub layers_to_transform: Option<Vec<usize>>,
    /// PEFT seeds torch's generator with it for `vera_A`/`vera_B`; kaizen cannot reproduce
    /// torch's draws, so it seeds its own RNG with it for a new adapter and always saves the
    /// projections (see [`super`]).
    pub projection_prng_key: u64,
    /// Whether the file holds `vera_A`/`vera_B` (PEFT's default true). kaizen writes them
    /// always and refuses a file without them.
    pub save_projection: bool,
    pub vera_dropout: f64,
    /// `vera_lambda_d`'s initial value (PEFT's default 0.1).
    pub d_initial: f64,
    /// true: PEFT's init (lambda_b zero, lambda_d = d_initial); false: lambda_b one, lambda_d
    /// N(0, 1) (PEFT's `torch.randn`, drawn with kaizen's RNG).
    pub init_weights: bool,
    pub base_model_name_or_path: Option<String>,
}

impl Default for VeraConfig {
    fn default() -> Self {
        VeraConfig {
            r: 256,
            target_modules: None,
            layers_to_transform: None,
            projection_prng_key: 0,
            save_projection: true,
            vera_dropout: 0.0,
            d_initial: 0.1,
            init_weights: true,
            base_model_name_or_path: None,
        }
    }
}

impl VeraConfig {
    /// Range checks, each naming its field.
    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 || self.r > MAX_RANK {
            return Err(format!(
                "VeRA r is {}; it must be between 1 and {MAX_RANK}",
                self.r
            ));
        }
        if !(0.0..1.0).contains(&self.vera_dropout) {
            return Err(format!(
                "vera_dropout must be in [0, 1), found {}",
                self.vera_dropout
            ));
        }
        if !self.d_initial.is_finite() {
            return Err(format!(
                "d_initial must be a finite number, found {}",
                self.d_initial
            ));
        }
        Ok(())
    }

    /// The fields VeRA shares with LoRA (`target_modules`, `layers_to_transform`, `bias`,
    /// `fan_in_fan_out`, `modules_to_save`, ...) are read and checked by `LoraConfig`'s reader.
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, String> {
        let c = Fields(map);
        if map.get("layers_pattern").is_some_and(|v| !v.is_null()) {
            return Err("\"layers_pattern\" is set, which kaizen does not support yet".into());
        }
        let r = c.usize("r")?.unwrap_or(256);
        let key = match map.get("projection_prng_key") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().ok_or_else(|| {
                format!(
                    "\"projection_prng_key\" must be a non-negative whole number, found {}",
                    crate::config::shown(v)
                )
            })?,
        };
        let cfg = VeraConfig {
            r,
            target_modules: None,
            layers_to_transform: None,
            projection_prng_key: key,
            save_projection: c.bool("save_projection")?.unwrap_or(true),
            vera_dropout: c.f64("vera_dropout")?.unwrap_or(0.0),
            d_initial: c.f64("d_initial")?.unwrap_or(0.1),
            init_weights: c.bool("init_weights")?.unwrap_or(true),
            base_model_name_or_path: c.str("base_model_name_or_path")?,
        };
        cfg.validate()?;
        let mut shared = map.clone();
        shared.entry("r").or_insert(json!(r));
        let lora = LoraConfig::from_json(&shared)?;
        Ok(VeraConfig {
            target_modules: lora.target_modules,
            layers_to_transform: lora.layers_to_transform,
            ..cfg
        })
    }

    /// The LoRA view of the shared fields, for `lora::resolve_targets`.
    pub(crate) fn targets(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            target_modules: self.target_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            ..LoraConfig::default()
        }
    }

    /// adapter_config.json as PEFT writes it, with the resolved module names.
    pub fn to_json(&self, targets: &[String]) -> Value {
        let target_modules = match &self.target_modules {
            Some(TargetModules::Regex(r)) => json!(r),
            _ => json!(targets),
        };
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "d_initial": self.d_initial,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_weights": self.init_weights,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "modules_to_save": null,
            "peft_type": "VERA",
            "projection_prng_key": self.projection_prng_key,
            "r": self.r,
            "revision": null,
            "save_projection": true,
            "target_modules": target_modules,
            "task_type": "CAUSAL_LM",
            "vera_dropout": self.vera_dropout,
        })
    }
}
