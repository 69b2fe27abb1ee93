//! LoHa (HF PEFT `LOHA`, peft/tuners/loha; FedPara, Hyeon-Woo et al. 2022, as LyCORIS implements
//! it): ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r beside the targeted linear layers. Linear
//! layers only (no conv layers in kaizen's models, so no `hada_t1`/`hada_t2`).

pub mod layer;

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde_json::{json, Map, Value};

pub use layer::Hadamard;

use super::lycoris::{Factor, Init, LycorisConfig};
use crate::config::Fields;
use crate::{Model, Result};

/// PEFT's `LoHaConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LohaConfig {
    pub lycoris: LycorisConfig,
    /// true (PEFT's default): w2_b starts at zero, so a new adapter is the identity; false:
    /// all four factors random.
    pub init_weights: bool,
}

impl Default for LohaConfig {
    fn default() -> Self {
        LohaConfig {
            lycoris: LycorisConfig::default(),
            init_weights: true,
        }
    }
}

impl LohaConfig {
    pub fn validate(&self) -> Result<()> {
        self.lycoris.validate("LoHa")
    }

    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let cfg = LohaConfig {
            lycoris: LycorisConfig::from_json(map)?,
            init_weights: Fields(map).bool("init_weights")?.unwrap_or(true),
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    pub fn to_json(&self, targets: &[String]) -> Value {
        let mut m = self.lycoris.to_json("LOHA", targets);
        m.insert("init_weights".into(), json!(self.init_weights));
        Value::Object(m)
    }
}

/// Attaches LoHa to the targeted linears; with `weights` (PEFT keys -> tensors) they are loaded
/// and every tensor must be used, else initialised as PEFT (`hada_w1_a`, `hada_w1_b`,
/// `hada_w2_a` Kaiming-uniform, `hada_w2_b` zero) from `seed`. Returns the targets.
pub fn attach(
    model: &mut Model,
    cfg: &LohaConfig,
    weights: Option<BTreeMap<String, Tensor>>,
    seed: u64,
) -> Result<Vec<String>> {
    let last = match cfg.init_weights {
        true => Init::Zeros,
        false => Init::Kaiming,
    };
    cfg.lycoris
        .attach("LoHa", model, weights, seed, true, |mut f| {
            let (r, out, inp) = (f.r, f.out, f.inp);
            // PEFT's creation (and draw) order: w1_a, w1_b, w2_a, w2_b.
            let w1 = Factor::LowRank(
                f.tensor("hada_w1_a", out, r, Init::Kaiming)?,
                f.tensor("hada_w1_b", r, inp, Init::Kaiming)?,
            );
            let w2 = Factor::LowRank(
                f.tensor("hada_w2_a", out, r, Init::Kaiming)?,
                f.tensor("hada_w2_b", r, inp, last)?,
            );
            Ok(Hadamard { w1, w2 })
        })
}
