//! kaizen: parameter-efficient fine-tuning of causal language models.
//!
//! Layout: `nn/` shared layers, `models/` one decoder and a small spec per architecture,
//! `tuners/` one folder per PEFT method, `checkpoint/` the only code that knows file formats,
//! `eval` and `generate` the inference entry points. Tokenizing, templates and JSONL live in
//! the `kaizen-data` crate.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod generate;
pub mod memory;
pub mod models;
pub mod nn;
pub mod serve;
pub mod train;
pub mod tuners;

use std::path::Path;

pub use candle_core::DType;
pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use kaizen_data::Tokenizer;
pub use models::Model;
pub use nn::quant::QFormat;

/// A model ready for inference, with its tokenizer.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// Where the weights came from and in which dtypes, e.g. "GGUF (F32, Q4_1, Q8_0)".
    pub format: String,
}

/// Loads `--model`: an HF model directory or a `.gguf` file. Weights are computed in f32.
pub fn load(path: &Path) -> Result<Loaded> {
    load_as(path, DType::F32)
}

/// [`load`] with the frozen matrices (linear layers, embeddings, LM head) stored as `dtype`,
/// each narrowed as it is read (`--dtype bf16`: half their memory, products on kaizen's bf16
/// kernels with f32 accumulation). Norms, biases, adapters and optimizer state stay f32, as
/// PEFT's autocast; a tied head shares the narrowed table.
pub fn load_as(path: &Path, dtype: DType) -> Result<Loaded> {
    load_with(
        path,
        Precision {
            dtype,
            ..Precision::default()
        },
    )
}

/// How the frozen base is held: `dtype` stores dense matrices and is the compute precision of
/// products; `quantize` (`--quantize`) keeps the linear layers inside the blocks quantized
/// (a GGUF's quantized tensors, embeddings and head included, keep their own types).
#[derive(Debug, Clone, Copy)]
pub struct Precision {
    pub dtype: DType,
    pub quantize: Option<QFormat>,
    /// `--quantize-embeddings`: the embedding table's and the LM head's formats (llama.cpp's
    /// Q4_K_M files: Q4_K and Q6_K); None keeps them in `dtype`, as transformers'
    /// `load_in_4bit`. A tied head is the table, in its format.
    pub quantize_embeddings: Option<[QFormat; 2]>,
    /// `--compute int8`: forward products through quantized matrices quantize the activations
    /// to 8 bits and take integer dot products (as llama.cpp computes; NF4 through its levels
    /// rounded to 8-bit codes); input gradients of many rows run on 8-bit codes too.
    pub int8: bool,
}

impl Default for Precision {
    fn default() -> Self {
        Precision {
            dtype: DType::F32,
            quantize: None,
            quantize_embeddings: None,
            int8: false,
        }
    }
}

/// [`load`] with the base held as `p` says, one matrix at a time (never the f32 model whole).
pub fn load_with(path: &Path, p: Precision) -> Result<Loaded> {
    load_within(path, p, None)
}

/// [`load_with`], refusing before any weight is read when the weights alone would need more
/// than `budget` bytes (the memory guard; None: no limit), with what `--dtype bf16` and
/// `--quantize nf4` would need instead.
pub fn load_within(path: &Path, p: Precision, budget: Option<u64>) -> Result<Loaded> {
    let mut ck = checkpoint::open(path)?;
    ck.weights.matrices = p.dtype;
    ck.weights.quantize = p.quantize;
    ck.weights.quantize_embeddings = p.quantize_embeddings;
    ck.weights.int8 = p.int8;
    if let Some(have) = budget {
        check_weights_fit(path, &mut ck, have)?;
    }
    // Weights::take narrows each 2-D tensor; a tied head shares the narrowed table.
    let model = Model::load(&ck.config, ck.weights)?;
    let (tv, mv) = (ck.tokenizer.vocab_size(), ck.config.vocab_size);
    if tv > mv {
        return Err(Error::Input(format!(
            "{}: the tokenizer has {tv} tokens but the model's vocab_size is {mv}; they do not belong together",
            path.display()
        )));
    }
    Ok(Loaded {
        model,
        tokenizer: ck.tokenizer,
        format: ck.format,
    })
}

fn check_weights_fit(path: &Path, ck: &mut checkpoint::Checkpoint, have: u64) -> Result<()> {
    let names = &ck.config.architecture.spec().names;
    let w = &mut ck.weights;
    let need = w.resident_estimate(names);
    if need <= have {
        return Ok(());
    }
    let (dtype, quantize) = (w.matrices, w.quantize);
    let mut smaller = Vec::new();
    if dtype == DType::F32 {
        w.matrices = DType::BF16;
        smaller.push(format!(
            "--dtype bf16 (about {})",
            memory::gib(w.resident_estimate(names))
        ));
    }
    if quantize.is_none() {
        (w.matrices, w.quantize) = (
            DType::BF16,
            Some(QFormat::Nf4 {
                double_quant: false,
            }),
        );
        smaller.push(format!(
            "--quantize nf4 (about {})",
            memory::gib(w.resident_estimate(names))
        ));
    }
    let held = quantize.map_or(format!("{dtype:?}").to_uppercase(), |q| format!("{q}"));
    Err(Error::Input(format!(
        "{}: the weights alone need about {} held as {held}, but {} is available{}",
        path.display(),
        memory::gib(need),
        memory::gib(have),
        match smaller.is_empty() {
            true => "; use a machine with more memory".to_string(),
            false => format!("; hold them in less: {}", smaller.join(", ")),
        }
    )))
}
