//! `LoraConfig` with HF PEFT's field names and defaults (peft/tuners/lora/config.py), read from
//! and written to `adapter_config.json`.

use std::collections::BTreeMap;

use kaizen_data::quote;
use serde_json::{json, Map, Value};

use crate::config::{bounded, shown, Fields};
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
    /// PiSSA: A, B from the SVD of W, which keeps the residual (`inits.rs`).
    Pissa,
    /// PiSSA from a randomized SVD with this many subspace iterations (`pissa_niter_K`).
    PissaNiter(usize),
    /// OLoRA: A, B from the QR decomposition of W, which keeps the residual.
    Olora,
    /// LoftQ: the base becomes NF4 of W minus a rank-r SVD, alternating `iter` times
    /// (`loftq_config.loftq_iter`; 4 bits only).
    Loftq { iter: usize },
}

impl LoraInit {
    /// The values `--init-lora-weights` takes and PEFT writes as strings.
    pub const NAMES: &'static str = "gaussian, pissa, pissa_niter_K (K >= 0), olora, loftq";

    /// Parses PEFT's string spelling (LoftQ with 1 iteration; see [`LoraConfig::from_json`]).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "gaussian" => LoraInit::Gaussian,
            "pissa" => LoraInit::Pissa,
            "olora" => LoraInit::Olora,
            "loftq" => LoraInit::Loftq { iter: 1 },
            _ => match s.strip_prefix("pissa_niter_").map(str::parse::<usize>) {
                Some(Ok(k)) => LoraInit::PissaNiter(k),
                _ => {
                    return Err(format!(
                        "init_lora_weights {}: unknown (use one of {})",
                        quote(s),
                        Self::NAMES
                    ))
                }
            },
        })
    }

    /// PEFT's spelling.
    pub fn name(self) -> String {
        match self {
            LoraInit::Default => "true".into(),
            LoraInit::Random => "false".into(),
            LoraInit::Gaussian => "gaussian".into(),
            LoraInit::Pissa => "pissa".into(),
            LoraInit::PissaNiter(k) => format!("pissa_niter_{k}"),
            LoraInit::Olora => "olora".into(),
            LoraInit::Loftq { .. } => "loftq".into(),
        }
    }

    /// Whether the init reads (and replaces) the base weight.
    pub fn is_data_driven(self) -> bool {
        matches!(
            self,
            LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora | LoraInit::Loftq { .. }
        )
    }

    /// Whether a trained adapter converts to a plain LoRA on the original base (PEFT's
    /// `path_initial_model_for_weight_conversion`): PiSSA and OLoRA, whose base is W - B0 A0.
    pub fn converts(self) -> bool {
        matches!(
            self,
            LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora
        )
    }
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
        if self.r > MAX_RANK {
            return bad(format!(
                "LoRA rank r is {}; it must be at most {MAX_RANK}",
                self.r
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
        match self.init_lora_weights {
            LoraInit::PissaNiter(k) if k > MAX_ITER => {
                return bad(format!(
                    "init_lora_weights pissa_niter_{k}: at most {MAX_ITER} iterations"
                ))
            }
            LoraInit::Loftq { iter } if iter == 0 || iter > MAX_ITER => {
                return bad(format!(
                    "loftq_iter is {iter}; it must be between 1 and {MAX_ITER}"
                ))
            }
            _ => {}
        }
        if let Some(TargetModules::Names(n)) = &self.target_modules {
            if n.is_empty() {
                return bad("target_modules is empty".into());
            }
        }
        if let Some(TargetModules::Regex(r)) = &self.target_modules {
            compile("target_modules", r, &format!("^(?:{r})$"))?;
        }
        for (k, &r) in &self.rank_pattern {
            if r == 0 || r > MAX_RANK {
                return bad(format!(
                    "rank_pattern[{}] is {r}; ranks must be between 1 and {MAX_RANK}",
                    quote(k)
                ));
            }
            compile("rank_pattern key", k, &pattern_regex(k))?;
        }
        for (k, &a) in &self.alpha_pattern {
            if !(a.is_finite() && a > 0.0) {
                return bad(format!(
                    "alpha_pattern[{}] is {a}; it must be a number above 0",
                    quote(k)
                ));
            }
            compile("alpha_pattern key", k, &pattern_regex(k))?;
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
    /// are errors (rather than silently computing something else), and so is a field of the
    /// wrong type (`"use_dora": "x"` is not false).
    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let c = Fields(map);
        for (key, what) in [
            ("lora_bias", "LoRA bias"),
            ("fan_in_fan_out", "fan_in_fan_out"),
        ] {
            if c.bool(key)? == Some(true) {
                return Err(format!("\"{key}\": {what} adapters are not supported yet"));
            }
        }
        refuse_unsupported(
            map,
            &[
                "modules_to_save",
                "layer_replication",
                "target_parameters",
                "exclude_modules",
                "trainable_token_indices",
            ],
        )?;
        let r = c.req_size("r", MAX_RANK)?;
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
                    "\"target_modules\" must be a list, a string or null, found {}",
                    shown(v)
                ))
            }
        };
        let init = match map.get("init_lora_weights") {
            None | Some(Value::Bool(true)) => LoraInit::Default,
            Some(Value::Bool(false)) => LoraInit::Random,
            Some(Value::String(s)) => match LoraInit::parse(s)? {
                LoraInit::Loftq { .. } => loftq_config(map)?,
                i => i,
            },
            Some(v) => {
                return Err(format!(
                    "\"init_lora_weights\" {} is not supported (true, false, {})",
                    shown(v),
                    LoraInit::NAMES
                ))
            }
        };
        let layers_to_transform = match map.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Number(_)) => Some(vec![layer_index(v)?]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(layer_index)
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Some(v) => {
                return Err(format!(
                    "\"layers_to_transform\" must be a list of layer indices, found {}",
                    shown(v)
                ))
            }
        };
        let pattern = |k: &str| -> std::result::Result<Vec<(String, &Value)>, String> {
            match map.get(k) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::Object(o)) => Ok(o.iter().map(|(n, v)| (n.clone(), v)).collect()),
                Some(v) => Err(format!("\"{k}\" must be an object, found {}", shown(v))),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(n, v)| {
                let r = v.as_u64().ok_or_else(|| {
                    format!(
                        "\"rank_pattern\"[{}] must be a whole number, found {}",
                        quote(&n),
                        shown(v)
                    )
                })?;
                let r = bounded(&format!("rank_pattern[{}]", quote(&n)), r, MAX_RANK)?;
                Ok((n, r))
            })
            .collect::<std::result::Result<_, String>>()?;
        let alpha_pattern = pattern("alpha_pattern")?
            .into_iter()
            .map(|(n, v)| match v.as_f64() {
                Some(a) => Ok((n, a)),
                None => Err(format!(
                    "\"alpha_pattern\"[{}] must be a number, found {}",
                    quote(&n),
                    shown(v)
                )),
            })
            .collect::<std::result::Result<_, String>>()?;
        let cfg = LoraConfig {
            r,
            lora_alpha: c.f64("lora_alpha")?.unwrap_or(8.0),
            lora_dropout: c.f64("lora_dropout")?.unwrap_or(0.0),
            target_modules,
            use_rslora: c.bool("use_rslora")?.unwrap_or(false),
            use_dora: c.bool("use_dora")?.unwrap_or(false),
            init_lora_weights: init,
            layers_to_transform,
            rank_pattern,
            alpha_pattern,
            base_model_name_or_path: c.str("base_model_name_or_path")?,
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
            LoraInit::Random => json!(false),
            i => json!(i.name()),
        };
        let loftq_config = match self.init_lora_weights {
            LoraInit::Loftq { iter } => json!({"loftq_bits": 4, "loftq_iter": iter}),
            _ => json!({}),
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
            "loftq_config": loftq_config,
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

/// Largest LoRA rank accepted from a file (real ones are 4 to 256): a rank sizes the A and B
/// matrices allocated for every targeted layer.
pub const MAX_RANK: usize = 1 << 16;

/// Most iterations of `pissa_niter_K` and `loftq_iter` (each is a decomposition of every
/// targeted weight; PEFT's examples use 1 to 16).
pub const MAX_ITER: usize = 1000;

/// LoftQ's `loftq_config` (PEFT's `LoftQConfig`: `loftq_bits` 4, `loftq_iter` 1 by default).
/// PEFT's options beyond the method itself that kaizen does not implement: each of `keys` set to
/// anything but null, `[]` or `{}`, and a `bias` other than "none", is an error naming the field.
pub(crate) fn refuse_unsupported(
    map: &Map<String, Value>,
    keys: &[&str],
) -> std::result::Result<(), String> {
    for key in keys {
        if map
            .get(*key)
            .is_some_and(|v| !v.is_null() && v != &json!([]) && v != &json!({}))
        {
            return Err(format!(
                "\"{key}\" is set, which kaizen does not support yet"
            ));
        }
    }
    if let Some(b) = Fields(map).str("bias")? {
        if b != "none" {
            return Err(format!(
                "\"bias\": {} is not supported (only \"none\")",
                quote(&b)
            ));
        }
    }
    Ok(())
}

fn loftq_config(map: &Map<String, Value>) -> std::result::Result<LoraInit, String> {
    let Some(Value::Object(lc)) = map.get("loftq_config") else {
        return Err(
            "\"loftq_config\" must be an object when init_lora_weights is \"loftq\"".into(),
        );
    };
    let c = Fields(lc);
    if let Some(bits) = c.f64("loftq_bits")? {
        if bits != 4.0 {
            return Err(format!(
                "\"loftq_config\".\"loftq_bits\" is {bits}; kaizen's LoftQ quantizes to NF4, 4 bits"
            ));
        }
    }
    let iter = c.f64("loftq_iter")?.unwrap_or(1.0);
    if !((1.0..=MAX_ITER as f64).contains(&iter) && iter.fract() == 0.0) {
        return Err(format!(
            "\"loftq_config\".\"loftq_iter\" is {iter}; it must be a whole number from 1 to {MAX_ITER}"
        ));
    }
    Ok(LoraInit::Loftq {
        iter: iter as usize,
    })
}

/// One entry of `layers_to_transform`.
fn layer_index(v: &Value) -> std::result::Result<usize, String> {
    match v.as_u64() {
        Some(i) => Ok(i as usize),
        None => Err(format!(
            "\"layers_to_transform\" holds {}; each entry must be a non-negative layer index \
             (0 is the first layer)",
            shown(v)
        )),
    }
}

/// A regex from adapter_config.json or a flag, compiled as `full` (the pattern wrapped as PEFT
/// matches it); an invalid one is a one-line error naming `what` and the pattern.
pub(crate) fn compile(what: &str, pattern: &str, full: &str) -> Result<regex::Regex> {
    regex::Regex::new(full).map_err(|e| {
        let why = match &e {
            // The syntax message draws the pattern and a caret over several lines; its last
            // line says what is wrong.
            regex::Error::Syntax(s) => s
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("syntax error")
                .trim_start_matches("error: ")
                .to_string(),
            other => other.to_string(),
        };
        Error::Input(format!(
            "{what} {} is not a valid regex: {}",
            quote(pattern),
            kaizen_data::guard::one_line(&why)
        ))
    })
}

/// PEFT's `get_pattern_key` regex for a `rank_pattern` / `alpha_pattern` key: the key must match
/// the module path or a dotted suffix of it.
pub(crate) fn pattern_regex(key: &str) -> String {
    format!(r"^(?:.*\.)?(?:{key})$")
}
