//! `IA3Config` with HF PEFT's field names (peft/tuners/ia3/config.py).

use serde_json::{json, Map, Value};

use crate::tuners::lora::TargetModules;

#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    /// None: the architecture's default (PEFT's mapping).
    pub target_modules: Option<TargetModules>,
    /// Modules whose input (not output) is scaled; must also be targets.
    pub feedforward_modules: Option<TargetModules>,
    /// true: vectors start at one (the identity), as PEFT's default.
    pub init_ia3_weights: bool,
    pub base_model_name_or_path: Option<String>,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Ia3Config {
            target_modules: None,
            feedforward_modules: None,
            init_ia3_weights: true,
            base_model_name_or_path: None,
        }
    }
}

/// A module list as PEFT writes it: a list of names, a regex string, "all-linear", or null.
pub(crate) fn modules(
    map: &Map<String, Value>,
    key: &str,
) -> Result<Option<TargetModules>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "all-linear" => Ok(Some(TargetModules::AllLinear)),
        Some(Value::String(s)) => Ok(Some(TargetModules::Regex(s.clone()))),
        Some(Value::Array(a)) => Ok(Some(TargetModules::Names(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or(format!("\"{key}\" holds a non-string"))
                })
                .collect::<Result<_, _>>()?,
        ))),
        Some(v) => Err(format!(
            "\"{key}\" must be a list, a string or null, found {}",
            crate::config::shown(v)
        )),
    }
}

impl Ia3Config {
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, String> {
        for key in ["modules_to_save", "exclude_modules"] {
            if map.get(key).is_some_and(|v| !v.is_null()) {
                return Err(format!(
                    "\"{key}\" is set, which kaizen does not support yet"
                ));
            }
        }
        let c = crate::config::Fields(map);
        if c.bool("fan_in_fan_out")? == Some(true) {
            return Err("\"fan_in_fan_out\": true is not supported for these architectures".into());
        }
        Ok(Ia3Config {
            target_modules: modules(map, "target_modules")?,
            feedforward_modules: modules(map, "feedforward_modules")?,
            init_ia3_weights: c.bool("init_ia3_weights")?.unwrap_or(true),
            base_model_name_or_path: map
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }

    /// adapter_config.json as PEFT writes it, with the resolved module names.
    pub fn to_json(&self, targets: &[String], feedforward: &[String]) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "feedforward_modules": feedforward,
            "inference_mode": true,
            "init_ia3_weights": self.init_ia3_weights,
            "modules_to_save": null,
            "peft_type": "IA3",
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
        })
    }
}
