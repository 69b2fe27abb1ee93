//! `LoraConfig` with HF PEFT's field names and defaults (peft/tuners/lora/config.py), read from
//! and written to `adapter_config.json`.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// Which modules get LoRA (PEFT `target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names; a path matches if it equals a name or ends with ".name".
    Names(Vec<String>),
    /// A regex that must match the whole module path.
    Regex(String),
    /// Every linear layer except the output head.
    AllLinear,
}

impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetModules::Names(n) => write!(f, "[{}]", n.join(", ")),
            TargetModules::Regex(r) => write!(f, "regex \"{r}\""),
            TargetModules::AllLinear => write!(f, "all-linear"),
        }
    }
}

/// PEFT `init_lora_weights`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraInit {
    /// Kaiming-uniform A, zero B (PEFT's `true`): a new adapter is the identity.
    Default,
    /// A ~ N(0, 1/r), zero B.
    Gaussian,
    /// Random A and B (PEFT's `false`): not the identity; for tests.
    Random,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// None: the architecture's default (GPT-NeoX `query_key_value`, Llama `q_proj`,`v_proj`).
    pub target_modules: Option<TargetModules>,
    pub use_rslora: bool,
    /// DoRA (Liu et al. 2024): a trainable magnitude per output row times the direction of
    /// `W + scale B A` (see `dora.rs`).
    pub use_dora: bool,
    pub init_lora_weights: LoraInit,
    pub layers_to_transform: Option<Vec<usize>>,
    /// Module-name regex -> rank / alpha overrides.
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            use_rslora: false,
            use_dora: false,
            init_lora_weights: LoraInit::Default,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model_name_or_path: None,
        }
    }
}

impl LoraConfig {
    /// Checks values a user can get wrong; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if self.r == 0 {
            return bad("LoRA rank r must be at least 1".into());
        }
        if self.lora_alpha.is_nan() || self.lora_alpha <= 0.0 {
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
        for (k, &r) in &self.rank_pattern {
            if r == 0 {
                return bad(format!(
                    "rank_pattern[\"{k}\"] is 0; ranks must be at least 1"
                ));
            }
        }
        Ok(())
    }

    /// Parses a `target_modules` flag: `all-linear`, a comma-separated list, or a regex (a
    /// value with regex metacharacters other than '.' and '_').
    pub fn parse_targets(s: &str) -> TargetModules {
        let s = s.trim();
        if s == "all-linear" {
            TargetModules::AllLinear
        } else if s.chars().any(|c| "*+?()[]|^$\\{}".contains(c)) {
            TargetModules::Regex(s.to_string())
        } else {
            TargetModules::Names(
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            )
        }
    }

    /// Reads PEFT's adapter_config.json fields. Unsupported features set to non-default values
    /// are errors (rather than silently computing something else).
    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        for (key, what) in [
            ("lora_bias", "LoRA bias"),
            ("fan_in_fan_out", "fan_in_fan_out"),
        ] {
            if map.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(format!("\"{key}\": {what} adapters are not supported yet"));
            }
        }
        for key in [
            "modules_to_save",
            "layer_replication",
            "target_parameters",
            "exclude_modules",
            "trainable_token_indices",
        ] {
            if map
                .get(key)
                .is_some_and(|v| !v.is_null() && v != &json!([]) && v != &json!({}))
            {
                return Err(format!(
                    "\"{key}\" is set, which kaizen does not support yet"
                ));
            }
        }
        if let Some(b) = map.get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(format!(
                    "\"bias\": \"{b}\" is not supported (only \"none\")"
                ));
            }
        }
        let num = |k: &str| map.get(k).and_then(Value::as_f64);
        let r = map
            .get("r")
            .and_then(Value::as_u64)
            .ok_or("missing or invalid \"r\"")? as usize;
        let target_modules = match map.get("target_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "all-linear" => Some(TargetModules::AllLinear),
            Some(Value::String(s)) => Some(TargetModules::Regex(s.clone())),
            Some(Value::Array(a)) => Some(TargetModules::Names(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(String::from)
                            .ok_or("target_modules holds a non-string")
                    })
                    .collect::<std::result::Result<_, _>>()?,
            )),
            Some(v) => {
                return Err(format!(
                    "\"target_modules\" must be a list, a string or null, found {v}"
                ))
            }
        };
        let init = match map.get("init_lora_weights") {
            None | Some(Value::Bool(true)) => LoraInit::Default,
            Some(Value::Bool(false)) => LoraInit::Random,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            Some(v) => {
                return Err(format!(
                    "\"init_lora_weights\" {v} is not supported (true, false, \"gaussian\")"
                ))
            }
        };
        let layers_to_transform = match map.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                Some(vec![n.as_u64().ok_or("bad layers_to_transform")? as usize])
            }
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_u64()
                            .map(|x| x as usize)
                            .ok_or("layers_to_transform holds a non-integer")
                    })
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Some(v) => {
                return Err(format!(
                    "\"layers_to_transform\" must be a list of layer indices, found {v}"
                ))
            }
        };
        let pattern = |k: &str| -> std::result::Result<Vec<(String, f64)>, String> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::Object(o)) => o
                    .iter()
                    .map(|(n, v)| {
                        v.as_f64()
                            .map(|x| (n.clone(), x))
                            .ok_or_else(|| format!("\"{k}\"[\"{n}\"] is not a number"))
                    })
                    .collect(),
                Some(v) => Err(format!("\"{k}\" must be an object, found {v}")),
            }
        };
        let cfg = LoraConfig {
            r,
            lora_alpha: num("lora_alpha").unwrap_or(8.0),
            lora_dropout: num("lora_dropout").unwrap_or(0.0),
            target_modules,
            use_rslora: map
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            use_dora: map
                .get("use_dora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            init_lora_weights: init,
            layers_to_transform,
            rank_pattern: pattern("rank_pattern")?
                .into_iter()
                .map(|(k, v)| (k, v as usize))
                .collect(),
            alpha_pattern: pattern("alpha_pattern")?.into_iter().collect(),
            base_model_name_or_path: map
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// adapter_config.json as PEFT writes it. `targets` are the resolved module names.
    pub fn to_json(&self, targets: &[String]) -> Value {
        let target_modules = match &self.target_modules {
            Some(TargetModules::Regex(r)) => json!(r),
            _ => json!(targets),
        };
        let init = match self.init_lora_weights {
            LoraInit::Default => json!(true),
            LoraInit::Gaussian => json!("gaussian"),
            LoraInit::Random => json!(false),
        };
        json!({
            "alpha_pattern": self.alpha_pattern,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": init,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": self.lora_alpha,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": self.rank_pattern,
            "revision": null,
            "target_modules": target_modules,
            "task_type": "CAUSAL_LM",
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        })
    }
}
