//! `BottleneckConfig`: kaizen's `adapter_config.json` for bottleneck adapters (`peft_type`
//! "BOTTLENECK", a kaizen extension of PEFT's envelope). Field names follow the `adapters`
//! library's `BnConfig` where it has one (`reduction_factor`, `non_linearity`).

use serde_json::{json, Map, Value};

use crate::config::{shown, Activation};
use crate::tuners::ia3::config::modules;
use crate::tuners::lora::TargetModules;

/// Where the adapters sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterType {
    /// Houlsby et al. 2019: after the attention output projection and after the MLP output.
    Houlsby,
    /// Pfeiffer et al. 2020: after the MLP output only.
    Pfeiffer,
}

impl AdapterType {
    pub fn name(self) -> &'static str {
        match self {
            AdapterType::Houlsby => "houlsby",
            AdapterType::Pfeiffer => "pfeiffer",
        }
    }
}

impl std::str::FromStr for AdapterType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "houlsby" => Ok(AdapterType::Houlsby),
            "pfeiffer" => Ok(AdapterType::Pfeiffer),
            other => Err(format!(
                "adapter_type \"{other}\" is unknown (available: houlsby, pfeiffer)"
            )),
        }
    }
}

/// `non_linearity` names and the activation each is.
const NON_LINEARITIES: [(&str, Activation); 3] = [
    ("relu", Activation::Relu),
    ("gelu", Activation::Gelu),
    ("swish", Activation::Silu),
];

/// `non_linearity` "relu", "gelu" (exact erf, torch's `nn.GELU()`) or "swish" (SiLU).
pub fn parse_non_linearity(s: &str) -> Result<Activation, String> {
    NON_LINEARITIES
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, a)| *a)
        .ok_or(format!(
            "non_linearity \"{s}\" is unknown (available: relu, gelu, swish)"
        ))
}

fn non_linearity_name(act: Activation) -> &'static str {
    NON_LINEARITIES
        .iter()
        .find(|(_, a)| *a == act)
        .map_or("relu", |(n, _)| n)
}

#[derive(Debug, Clone, PartialEq)]
pub struct BottleneckConfig {
    pub adapter_type: AdapterType,
    /// Bottleneck width = a layer's output width // reduction_factor (default 16) ...
    pub reduction_factor: usize,
    /// ... unless this is set.
    pub bottleneck_size: Option<usize>,
    pub non_linearity: Activation,
    /// None: the architecture's output projections for `adapter_type`.
    pub target_modules: Option<TargetModules>,
    pub base_model_name_or_path: Option<String>,
}

impl Default for BottleneckConfig {
    fn default() -> Self {
        BottleneckConfig {
            adapter_type: AdapterType::Houlsby,
            reduction_factor: 16,
            bottleneck_size: None,
            non_linearity: Activation::Relu,
            target_modules: None,
            base_model_name_or_path: None,
        }
    }
}

impl BottleneckConfig {
    /// The bottleneck width for a layer with `out` output features; an error when it is zero.
    pub fn width(&self, out: usize, path: &str) -> Result<usize, String> {
        if let Some(b) = self.bottleneck_size {
            return match b {
                0 => Err("bottleneck_size must be at least 1".into()),
                b => Ok(b),
            };
        }
        let rf = self.reduction_factor;
        match out.checked_div(rf).unwrap_or(0) {
            0 => Err(format!(
                "reduction_factor {rf} leaves a zero-width bottleneck on {path} ({out} features // {rf} = 0); use a reduction factor between 1 and {out}, or set bottleneck_size"
            )),
            b => Ok(b),
        }
    }

    pub fn from_json(map: &Map<String, Value>) -> Result<Self, String> {
        let d = BottleneckConfig::default();
        let size = |key: &str| -> Result<Option<usize>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| format!("\"{key}\" must be a whole number, found {}", shown(v))),
            }
        };
        let name = |key: &str| -> Result<Option<&str>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(v) => Err(format!("\"{key}\" must be a string, found {}", shown(v))),
            }
        };
        Ok(BottleneckConfig {
            adapter_type: name("adapter_type")?
                .ok_or("missing \"adapter_type\" (houlsby or pfeiffer)")?
                .parse()?,
            reduction_factor: size("reduction_factor")?.unwrap_or(d.reduction_factor),
            bottleneck_size: size("bottleneck_size")?,
            non_linearity: name("non_linearity")?
                .map_or(Ok(d.non_linearity), parse_non_linearity)?,
            target_modules: modules(map, "target_modules")?,
            base_model_name_or_path: name("base_model_name_or_path")?.map(String::from),
        })
    }

    /// adapter_config.json with the resolved module paths.
    pub fn to_json(&self, targets: &[String]) -> Value {
        json!({
            "adapter_type": self.adapter_type.name(),
            "base_model_name_or_path": self.base_model_name_or_path,
            "bottleneck_size": self.bottleneck_size,
            "inference_mode": true,
            "non_linearity": non_linearity_name(self.non_linearity),
            "peft_type": "BOTTLENECK",
            "reduction_factor": self.reduction_factor,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
        })
    }
}
