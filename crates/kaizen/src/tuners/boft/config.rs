//! `BOFTConfig` with HF PEFT 0.21's field names and defaults (peft/tuners/boft/config.py), and
//! the per-layer checks of its `update_layer`.

use serde_json::{json, Map, Value};

use crate::tuners::ia3::config::modules;
use crate::tuners::lora::TargetModules;
use crate::tuners::oft::config::{
    base_model, divides, exactly_one, probability, refuse_unsupported,
};

#[derive(Debug, Clone, PartialEq)]
pub struct BoftConfig {
    /// Block width (0: from `boft_block_num`). Exactly one of the two is non-zero.
    pub boft_block_size: usize,
    /// Blocks per butterfly factor (0: from `boft_block_size`).
    pub boft_block_num: usize,
    /// Butterfly factors (1: plain block-diagonal OFT).
    pub boft_n_butterfly_factor: usize,
    /// In training, the fraction of one random factor's blocks replaced by the identity.
    pub boft_dropout: f64,
    /// None: the architecture's default (PEFT's mapping: LoRA's).
    pub target_modules: Option<TargetModules>,
    /// true: identity rotations and unit scales, PEFT's default.
    pub init_weights: bool,
    pub base_model_name_or_path: Option<String>,
}

impl Default for BoftConfig {
    fn default() -> Self {
        BoftConfig {
            boft_block_size: 4,
            boft_block_num: 0,
            boft_n_butterfly_factor: 1,
            boft_dropout: 0.0,
            target_modules: None,
            init_weights: true,
            base_model_name_or_path: None,
        }
    }
}

/// A layer's BOFT shape: factors, blocks per factor, block width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub factors: usize,
    pub blocks: usize,
    pub block_size: usize,
}

impl BoftConfig {
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, String> {
        refuse_unsupported(map)?;
        let c = crate::config::Fields(map);
        let d = BoftConfig::default();
        let cfg = BoftConfig {
            boft_block_size: c.usize("boft_block_size")?.unwrap_or(d.boft_block_size),
            boft_block_num: c.usize("boft_block_num")?.unwrap_or(d.boft_block_num),
            boft_n_butterfly_factor: c
                .usize("boft_n_butterfly_factor")?
                .unwrap_or(d.boft_n_butterfly_factor),
            boft_dropout: c.f64("boft_dropout")?.unwrap_or(d.boft_dropout),
            target_modules: modules(map, "target_modules")?,
            init_weights: c.bool("init_weights")?.unwrap_or(d.init_weights),
            base_model_name_or_path: base_model(map),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// PEFT's `__post_init__` checks, plus the ranges PEFT leaves to torch.
    pub fn check(&self) -> Result<(), String> {
        exactly_one(
            ("boft_block_size", self.boft_block_size),
            ("boft_block_num", self.boft_block_num),
        )?;
        if self.boft_n_butterfly_factor == 0 {
            return Err("boft_n_butterfly_factor must be at least 1 (1: no butterfly)".into());
        }
        if self.boft_n_butterfly_factor > 16 {
            return Err(format!(
                "boft_n_butterfly_factor must be at most 16, found {}",
                self.boft_n_butterfly_factor
            ));
        }
        probability("boft_dropout", self.boft_dropout)
    }

    /// The shape for a layer of input width `width`, with PEFT's `update_layer` checks.
    pub fn shape_for(&self, width: usize, path: &str) -> Result<Shape, String> {
        let f = self.boft_n_butterfly_factor - 1; // the paper's count, PEFT's internal one
        let pow = 1usize << f;
        let (size, num) = (self.boft_block_size, self.boft_block_num);
        let shape = |blocks: usize, block_size: usize| Shape {
            factors: f + 1,
            blocks,
            block_size,
        };
        let s = if size == 0 {
            divides("boft_block_num", num, width, path)?;
            if f > 0 && (f > num.ilog2() as usize || !num.is_multiple_of(pow)) {
                return Err(format!("boft_n_butterfly_factor {} is too large for boft_block_num {num}: the block count must be a multiple of 2^(factor - 1) = {pow}", f + 1));
            }
            shape(num, width / num)
        } else {
            divides("boft_block_size", size, width, path)?;
            if f > 0 && !width.is_multiple_of(size * pow) {
                return Err(format!("boft_n_butterfly_factor {} is too large for boft_block_size {size} on {path}: the input width {width} must be a multiple of boft_block_size x 2^(factor - 1) = {}", f + 1, size * pow));
            }
            shape(width / size, size)
        };
        if f > 0 && (!s.blocks.is_multiple_of(2) || !s.block_size.is_multiple_of(2)) {
            return Err(format!("with boft_n_butterfly_factor {} the block count ({}) and boft_block_size ({}) must be even on {path}", f + 1, s.blocks, s.block_size));
        }
        Ok(s)
    }

    /// adapter_config.json as PEFT writes it, with the resolved module names.
    pub fn to_json(&self, targets: &[String]) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "boft_block_num": self.boft_block_num,
            "boft_block_size": self.boft_block_size,
            "boft_dropout": self.boft_dropout,
            "boft_n_butterfly_factor": self.boft_n_butterfly_factor,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_weights": self.init_weights,
            "layers_pattern": null,
            "layers_to_transform": null,
            "modules_to_save": null,
            "peft_type": "BOFT",
            "peft_version": "0.21.2",
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
        })
    }
}
