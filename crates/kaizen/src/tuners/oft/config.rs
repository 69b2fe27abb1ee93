//! `OFTConfig` with HF PEFT 0.21's field names and defaults (peft/tuners/oft/config.py).

use serde_json::{json, Map, Value};

use crate::tuners::ia3::config::modules;
use crate::tuners::lora::TargetModules;

#[derive(Debug, Clone, PartialEq)]
pub struct OftConfig {
    /// Blocks per layer (0: from `oft_block_size`). Exactly one of the two is non-zero.
    pub r: usize,
    /// Block width (0: from `r`); r · oft_block_size = the layer's input width.
    pub oft_block_size: usize,
    /// Stored as PEFT stores it; PEFT 0.21's Linear forward never applies it (nor does kaizen).
    pub module_dropout: f64,
    /// None: the architecture's default (PEFT's mapping: LoRA's).
    pub target_modules: Option<TargetModules>,
    /// Constrained OFT: each block's skew matrix is projected to within `eps / sqrt(blocks)`.
    pub coft: bool,
    pub eps: f64,
    /// One block shared by every position of the diagonal.
    pub block_share: bool,
    pub use_cayley_neumann: bool,
    pub num_cayley_neumann_terms: usize,
    /// true: the identity rotation (zero parameters), PEFT's default.
    pub init_weights: bool,
    pub base_model_name_or_path: Option<String>,
}

impl Default for OftConfig {
    fn default() -> Self {
        OftConfig {
            r: 0,
            oft_block_size: 32,
            module_dropout: 0.0,
            target_modules: None,
            coft: false,
            eps: 6e-5,
            block_share: false,
            use_cayley_neumann: true,
            num_cayley_neumann_terms: 5,
            init_weights: true,
            base_model_name_or_path: None,
        }
    }
}

/// The fields kaizen does not implement (PEFT's options beyond the method itself).
pub(crate) fn refuse_unsupported(map: &Map<String, Value>) -> Result<(), String> {
    for key in [
        "modules_to_save",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    ] {
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
    match map.get("bias").and_then(Value::as_str) {
        None | Some("none") => Ok(()),
        Some(b) => Err(format!(
            "\"bias\": \"{}\" (training the base biases) is not supported; use \"none\"",
            kaizen_data::quote(b)
        )),
    }
}

/// `base_model_name_or_path` as the file holds it.
pub(crate) fn base_model(map: &Map<String, Value>) -> Option<String> {
    map.get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from)
}

/// PEFT's rule for a pair of sizes whose product is the width: exactly one is given.
pub(crate) fn exactly_one(a: (&str, usize), b: (&str, usize)) -> Result<(), String> {
    let both = format!("{} x {} = the layer's input width", a.0, b.0);
    match (a.1, b.1) {
        (0, 0) => Err(format!(
            "{} and {} are both 0; set one of them ({both})",
            a.0, b.0
        )),
        (x, y) if x != 0 && y != 0 => Err(format!(
            "{} ({x}) and {} ({y}) are both set; set only one ({both})",
            a.0, b.0
        )),
        _ => Ok(()),
    }
}

/// A size field that must divide a layer's input width.
pub(crate) fn divides(field: &str, v: usize, width: usize, path: &str) -> Result<(), String> {
    if v == 0 || v > width || !width.is_multiple_of(v) {
        return Err(format!("{field} {v} does not divide the input width {width} of {path}; choose a divisor of {width}"));
    }
    Ok(())
}

/// A dropout probability field.
pub(crate) fn probability(field: &str, p: f64) -> Result<(), String> {
    if !(0.0..1.0).contains(&p) {
        return Err(format!("{field} must be in [0, 1), found {p}"));
    }
    Ok(())
}

impl OftConfig {
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, String> {
        refuse_unsupported(map)?;
        let c = crate::config::Fields(map);
        let d = OftConfig::default();
        let cfg = OftConfig {
            r: c.usize("r")?.unwrap_or(d.r),
            oft_block_size: c.usize("oft_block_size")?.ok_or(
                "\"oft_block_size\" is missing: an OFT adapter from PEFT before 0.14 (a different parameterisation); retrain it with a newer PEFT",
            )?,
            module_dropout: c.f64("module_dropout")?.unwrap_or(d.module_dropout),
            target_modules: modules(map, "target_modules")?,
            coft: c.bool("coft")?.unwrap_or(d.coft),
            eps: c.f64("eps")?.unwrap_or(d.eps),
            block_share: c.bool("block_share")?.unwrap_or(d.block_share),
            use_cayley_neumann: c.bool("use_cayley_neumann")?.unwrap_or(d.use_cayley_neumann),
            num_cayley_neumann_terms: c
                .usize("num_cayley_neumann_terms")?
                .unwrap_or(d.num_cayley_neumann_terms),
            init_weights: c.bool("init_weights")?.unwrap_or(d.init_weights),
            base_model_name_or_path: base_model(map),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// PEFT's `__post_init__` checks, plus the ranges PEFT leaves to torch.
    pub fn check(&self) -> Result<(), String> {
        exactly_one(("r", self.r), ("oft_block_size", self.oft_block_size))?;
        probability("module_dropout", self.module_dropout)?;
        if self.coft && !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("eps must be > 0, found {}", self.eps));
        }
        if self.use_cayley_neumann && self.num_cayley_neumann_terms == 0 {
            return Err("num_cayley_neumann_terms must be at least 1".into());
        }
        if self.num_cayley_neumann_terms > 64 {
            return Err(format!(
                "num_cayley_neumann_terms must be at most 64, found {}",
                self.num_cayley_neumann_terms
            ));
        }
        Ok(())
    }

    /// (blocks, block width) for a layer of input width `width`: PEFT adjusts a block size
    /// that does not divide the width (with a warning); kaizen refuses it, naming the field.
    pub fn blocks_for(&self, width: usize, path: &str) -> Result<(usize, usize), String> {
        let (field, v) = if self.r != 0 {
            ("r", self.r)
        } else {
            ("oft_block_size", self.oft_block_size)
        };
        divides(field, v, width, path)?;
        Ok(if self.r != 0 {
            (v, width / v)
        } else {
            (width / v, v)
        })
    }

    /// adapter_config.json as PEFT writes it, with the resolved module names.
    pub fn to_json(&self, targets: &[String]) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "block_share": self.block_share,
            "coft": self.coft,
            "eps": self.eps,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_weights": self.init_weights,
            "layers_pattern": null,
            "layers_to_transform": null,
            "module_dropout": self.module_dropout,
            "modules_to_save": null,
            "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
            "oft_block_size": self.oft_block_size,
            "peft_type": "OFT",
            "peft_version": "0.21.2",
            "r": self.r,
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_cayley_neumann": self.use_cayley_neumann,
        })
    }
}
