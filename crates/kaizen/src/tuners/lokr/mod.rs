//! LoKr (HF PEFT `LOKR`, peft/tuners/lokr; LyCORIS's Kronecker adapter): ΔW = kron(w1, w2) ·
//! alpha / r, each factor trained whole or as a rank-r pair, shaped by PEFT's `factorization`.
//! Linear layers only (no conv layers in kaizen's models, so no `lokr_t2`).

pub mod layer;

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde_json::{json, Map, Value};

pub use layer::{factorization, Kron};

use super::lycoris::{Factor, Factors, Init, LycorisConfig};
use crate::config::{shown, Fields};
use crate::{Error, Model, Result};

/// PEFT's `init_weights` for LoKr.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LokrInit {
    /// true (default): w1 (or w1_a) zero, so a new adapter is the identity.
    Default,
    /// "lycoris": w2 (or w2_b) zero instead, as the LyCORIS repository.
    Lycoris,
    /// false: every factor random.
    Random,
}

/// PEFT's `LoKrConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LokrConfig {
    pub lycoris: LycorisConfig,
    /// Also split the left factor w1 into a rank-r pair (when r < max(its shape) / 2).
    pub decompose_both: bool,
    /// `factorization`'s divider: -1 (default) splits each dimension near its square root.
    pub decompose_factor: i64,
    /// Rank dropout's kept rows divided by their mean (default false).
    pub rank_dropout_scale: bool,
    pub init_weights: LokrInit,
}

impl Default for LokrConfig {
    fn default() -> Self {
        LokrConfig {
            lycoris: LycorisConfig::default(),
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            init_weights: LokrInit::Default,
        }
    }
}

impl LokrConfig {
    pub fn validate(&self) -> Result<()> {
        if self.decompose_factor == 0 || self.decompose_factor < -1 {
            return Err(Error::Input(format!(
                "LoKr: decompose_factor must be -1 (near the square root) or at least 1, found {}",
                self.decompose_factor
            )));
        }
        self.lycoris.validate("LoKr")
    }

    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let c = Fields(map);
        let init_weights = match map.get("init_weights") {
            None | Some(Value::Bool(true)) => LokrInit::Default,
            Some(Value::Bool(false)) => LokrInit::Random,
            Some(Value::String(s)) if s == "lycoris" => LokrInit::Lycoris,
            Some(v) => {
                return Err(format!(
                    "\"init_weights\" {} is not one of true, false, \"lycoris\"",
                    shown(v)
                ))
            }
        };
        let decompose_factor = match map.get("decompose_factor") {
            None | Some(Value::Null) => -1,
            Some(v) => v.as_i64().ok_or_else(|| {
                format!(
                    "\"decompose_factor\" must be a whole number, found {}",
                    shown(v)
                )
            })?,
        };
        let cfg = LokrConfig {
            lycoris: LycorisConfig::from_json(map)?,
            decompose_both: c.bool("decompose_both")?.unwrap_or(false),
            decompose_factor,
            rank_dropout_scale: c.bool("rank_dropout_scale")?.unwrap_or(false),
            init_weights,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    pub fn to_json(&self, targets: &[String]) -> Value {
        let mut m = self.lycoris.to_json("LOKR", targets);
        let init = match self.init_weights {
            LokrInit::Default => json!(true),
            LokrInit::Lycoris => json!("lycoris"),
            LokrInit::Random => json!(false),
        };
        m.insert("decompose_both".into(), json!(self.decompose_both));
        m.insert("decompose_factor".into(), json!(self.decompose_factor));
        m.insert("rank_dropout_scale".into(), json!(self.rank_dropout_scale));
        m.insert("init_weights".into(), init);
        Value::Object(m)
    }
}

/// Attaches LoKr to the targeted linears; with `weights` (PEFT keys -> tensors) they are loaded
/// and every tensor must be used, else initialised as PEFT from `seed`. Returns the targets.
pub fn attach(
    model: &mut Model,
    cfg: &LokrConfig,
    weights: Option<BTreeMap<String, Tensor>>,
    seed: u64,
) -> Result<Vec<String>> {
    cfg.validate()?;
    cfg.lycoris
        .attach("LoKr", model, weights, seed, cfg.rank_dropout_scale, |f| {
            kron(cfg, f)
        })
}

/// One layer's factors, as PEFT's `LoKrLayer.update_layer` shapes and initialises them.
fn kron(cfg: &LokrConfig, mut f: Factors<'_>) -> Result<Kron> {
    let (in_m, in_n) = factorization(f.inp, cfg.decompose_factor);
    let (out_l, out_k) = factorization(f.out, cfg.decompose_factor);
    let r = f.r;
    let below_half = |a: usize, b: usize| (r as f64) < a.max(b) as f64 / 2.0;
    let use_w1 = !(cfg.decompose_both && below_half(out_l, in_m));
    let use_w2 = !below_half(out_k, in_n);
    use Init::{Kaiming, Zeros};
    // (w1 or w1_a, w1_b, w2 or w2_a, w2_b) per init_weights
    let (w1, w1a, w1b, w2, w2a, w2b) = match cfg.init_weights {
        LokrInit::Default => (Zeros, Zeros, Kaiming, Kaiming, Kaiming, Kaiming),
        LokrInit::Lycoris => (Kaiming, Kaiming, Kaiming, Zeros, Kaiming, Zeros),
        LokrInit::Random => (Kaiming, Kaiming, Kaiming, Kaiming, Kaiming, Kaiming),
    };
    let w1 = match use_w1 {
        true => Factor::Full(f.tensor("lokr_w1", out_l, in_m, w1)?),
        false => Factor::LowRank(
            f.tensor("lokr_w1_a", out_l, r, w1a)?,
            f.tensor("lokr_w1_b", r, in_m, w1b)?,
        ),
    };
    let w2 = match use_w2 {
        true => Factor::Full(f.tensor("lokr_w2", out_k, in_n, w2)?),
        false => Factor::LowRank(
            f.tensor("lokr_w2_a", out_k, r, w2a)?,
            f.tensor("lokr_w2_b", r, in_n, w2b)?,
        ),
    };
    Ok(Kron {
        w1,
        w2,
        dims: [out_l, out_k, in_m, in_n],
    })
}
