//! Prompt tuning (Lester et al. 2021; HF PEFT `PROMPT_TUNING`,
//! `peft/tuners/prompt_tuning/{config,model}.py`): a learned table of `num_virtual_tokens`
//! embeddings prepended to every sequence's input embeddings. Virtual positions carry no label;
//! real tokens take positions n, n+1, ... (PEFT passes no position ids). Saved as one tensor,
//! `prompt_embeddings` (n, hidden).

pub mod p_tuning;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::models::VirtualTokens;
use crate::{Error, Model, Result, Tokenizer};

/// PEFT's key for the table in adapter_model.safetensors.
pub const KEY: &str = "prompt_embeddings";

/// PEFT `PromptTuningInit`.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInit {
    /// N(0, 1), as torch.nn.Embedding.
    Random,
    /// Rows of the word embeddings of the tokenized text, repeated/truncated to n.
    Text(String),
    /// Rows of randomly chosen vocabulary tokens.
    SampleVocab,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: usize,
    pub init: PromptInit,
    pub base_model_name_or_path: Option<String>,
}

/// Virtual tokens take positions ahead of the real ones: at least one, and fewer than the context.
pub fn check_num_virtual_tokens(n: usize, model: &Model) -> Result<()> {
    let ctx = model.config().max_position_embeddings;
    if n == 0 || n >= ctx {
        return Err(Error::Input(format!(
            "num_virtual_tokens must be between 1 and the context ({ctx}) minus 1, found {n}"
        )));
    }
    Ok(())
}

/// `num_virtual_tokens` of a prompt-learning config (PEFT's `PromptLearningConfig`), which for a
/// causal LM has one transformer submodule.
pub fn num_virtual_tokens(map: &Map<String, Value>) -> std::result::Result<usize, String> {
    let c = crate::config::Fields(map);
    if c.usize("num_transformer_submodules")?.unwrap_or(1) != 1 {
        return Err("\"num_transformer_submodules\" must be 1 for causal LMs".into());
    }
    c.req_size("num_virtual_tokens", crate::config::limits::CONTEXT)
}

impl PromptTuningConfig {
    pub fn from_json(map: &Map<String, Value>) -> std::result::Result<Self, String> {
        let n = num_virtual_tokens(map)?;
        let init = match map
            .get("prompt_tuning_init")
            .and_then(Value::as_str)
            .unwrap_or("RANDOM")
        {
            "RANDOM" => PromptInit::Random,
            "SAMPLE_VOCAB" => PromptInit::SampleVocab,
            "TEXT" => PromptInit::Text(
                map.get("prompt_tuning_init_text")
                    .and_then(Value::as_str)
                    .ok_or("prompt_tuning_init TEXT needs \"prompt_tuning_init_text\"")?
                    .to_string(),
            ),
            other => {
                return Err(format!(
                    "\"prompt_tuning_init\" {other} is not supported (RANDOM, TEXT, SAMPLE_VOCAB)"
                ))
            }
        };
        Ok(PromptTuningConfig {
            num_virtual_tokens: n,
            init,
            base_model_name_or_path: map
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
        })
    }

    pub fn to_json(&self, model: &Model) -> Value {
        let c = model.config();
        let (init, text) = match &self.init {
            PromptInit::Random => ("RANDOM", None),
            PromptInit::Text(t) => ("TEXT", Some(t.clone())),
            PromptInit::SampleVocab => ("SAMPLE_VOCAB", None),
        };
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "modules_to_save": null,
            "num_attention_heads": c.num_attention_heads,
            "num_layers": c.num_hidden_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": init,
            "prompt_tuning_init_text": text,
            "revision": null,
            "task_type": "CAUSAL_LM",
            "token_dim": c.hidden_size,
            "tokenizer_kwargs": null,
            "tokenizer_name_or_path": self.base_model_name_or_path,
        })
    }
}

/// Sets the model's virtual tokens: from `table` (an adapter file), else initialised per
/// `cfg.init` (the tokenizer is needed for TEXT).
pub fn attach(
    model: &mut Model,
    cfg: &PromptTuningConfig,
    table: Option<Tensor>,
    tok: Option<&Tokenizer>,
    seed: u64,
) -> Result<()> {
    let (n, hidden) = (cfg.num_virtual_tokens, model.config().hidden_size);
    check_num_virtual_tokens(n, model)?;
    let table = match table {
        Some(t) if t.dims() == [n, hidden] => t,
        Some(t) => {
            return Err(Error::Input(format!(
                "\"{KEY}\" has shape {:?}, but num_virtual_tokens {n} and hidden size {hidden} need [{n}, {hidden}]",
                t.dims()
            )))
        }
        None => init_table(model, cfg, tok, seed)?,
    };
    model.virtual_tokens = Some(VirtualTokens {
        key: KEY.into(),
        table,
        encoder: None,
    });
    Ok(())
}

fn init_table(
    model: &Model,
    cfg: &PromptTuningConfig,
    tok: Option<&Tokenizer>,
    seed: u64,
) -> Result<Tensor> {
    let (n, hidden) = (cfg.num_virtual_tokens, model.config().hidden_size);
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = |ids: Vec<u32>| -> Result<Tensor> {
        model
            .embed(&Tensor::from_vec(ids, (1, n), &Device::Cpu)?)?
            .squeeze(0)
            .map_err(Error::from)
    };
    match &cfg.init {
        PromptInit::Random => {
            let v = super::init::normal(n * hidden, 1.0, &mut rng);
            Ok(Tensor::from_vec(v, (n, hidden), &Device::Cpu)?)
        }
        PromptInit::SampleVocab => {
            let vocab = model.config().vocab_size as u32;
            rows((0..n).map(|_| rng.random_range(0..vocab)).collect())
        }
        PromptInit::Text(text) => {
            let tok = tok.ok_or_else(|| Error::Input("TEXT init needs the tokenizer".into()))?;
            // PEFT: tokenize without special tokens, then repeat/truncate to n.
            let ids = tok.encode(text, false)?;
            if ids.is_empty() {
                return Err(Error::Input(
                    "prompt_tuning_init_text is empty: give the text to initialise from".into(),
                ));
            }
            rows(ids.iter().cycle().take(n).copied().collect())
        }
    }
    .and_then(|t| Ok(t.to_dtype(DType::F32)?))
}
