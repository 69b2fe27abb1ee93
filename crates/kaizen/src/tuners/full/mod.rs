//! Full fine-tuning, the baseline every PEFT method is compared with: every weight trains
//! (embeddings, norms, every linear layer, the LM head; a tied head is the embedding table, one
//! tensor), with gradients and optimizer state for all, and the result is an HF model directory.
//! The layers compute their weight gradients themselves once marked `trainable`; this module
//! marks them and saves (`memory.rs` estimates the memory a run needs).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::checkpoint::export::write_model_files;
use crate::models::Part;
use crate::nn::Matrix;
use crate::{DType, Error, Model, Result, Tokenizer};

/// What a full fine-tuning run saves with: the tokenizer and the model's source (tokenizer files
/// are copied from an HF directory, written from the tokenizer for a GGUF); with `freeze`, only
/// the modules it selects train (freeze tuning), and the whole model is saved all the same.
#[derive(Clone)]
pub struct FullFineTuning {
    pub source: PathBuf,
    pub tokenizer: Tokenizer,
    pub freeze: Option<crate::tuners::freeze::FreezeConfig>,
}

impl std::fmt::Debug for FullFineTuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FullFineTuning({})", self.source.display())
    }
}

impl FullFineTuning {
    /// What run.json records as the "adapter".
    pub fn config_json(&self) -> Value {
        match &self.freeze {
            None => {
                json!({"method": "full", "trains": "every weight", "saved_as": "HF model directory"})
            }
            Some(f) => f.to_json(),
        }
    }

    /// Writes the model as an HF directory into `dir` (config.json, model.safetensors, tokenizer).
    pub fn save(&self, model: &mut Model, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        write_model_files(dir, model, &self.tokenizer, &self.source, DType::F32)?;
        Ok(())
    }
}

/// Marks every weight of `model` trainable under its HF name; returns the number of trainable
/// values (a tied head counted once).
pub fn attach(model: &mut Model) -> Result<usize> {
    attach_where(model, |_| true)
}

/// Marks the weights of the modules whose HF path `select` accepts trainable (freeze tuning
/// chooses some); a tied head trains with the embeddings, as the one tensor it is. Returns the
/// number of trainable values (a tied head counted once).
pub fn attach_where(model: &mut Model, select: impl Fn(&str) -> bool) -> Result<usize> {
    if model.learned_tokens().next().is_some()
        || model.linears_mut().iter().any(|(_, l)| l.adapter.is_some())
    {
        return Err(Error::Input(
            "full fine-tuning trains the model itself; load it without an adapter".into(),
        ));
    }
    if let Some((path, _)) = model
        .linears_mut()
        .into_iter()
        .find(|(path, l)| select(path) && matches!(l.weight, Matrix::Quant(_)))
    {
        return Err(Error::Input(format!(
            "{path} would train but is quantized (--quantize, or a quantized GGUF); train an \
             adapter on a quantized base (e.g. --method lora), or load the model without \
             --quantize"
        )));
    }
    let (head, tied) = (model.lm_head_name(), model.tied_head());
    let mut parts = model.parts_mut();
    let embeddings = parts
        .iter()
        .find(|(_, p)| matches!(p, Part::Embedding(_)))
        .map(|(path, _)| path.clone())
        .ok_or_else(|| Error::Input("the model has no embedding table".into()))?;
    let mut count = 0;
    for (path, part) in parts.iter_mut() {
        let key = if tied && path == head {
            if !select(&embeddings) {
                continue;
            }
            embeddings.clone() // the same tensor: its gradients add up under one name
        } else if select(path) {
            count += part
                .tensors_mut()
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum::<usize>();
            path.clone()
        } else {
            continue;
        };
        *part.trainable_mut() = Some(key);
    }
    Ok(count)
}
