//! The only place that knows checkpoint file names, formats and key prefixes. A checkpoint opens
//! into a [`ModelConfig`], a [`Tokenizer`] and a [`Weights`] store keyed by HF tensor names, so
//! models load the same way whether the file was an HF directory or a GGUF.

pub mod adapter;
pub mod export;
mod gguf;
pub mod gguf_export;
mod gguf_kquants;
pub mod gguf_lora;
mod gguf_vocab;
mod gguf_write;
mod hf_dir;
mod safetensors_file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use kaizen_data::{quote, Tokenizer};

use crate::config::ModelConfig;
use crate::models::arch::Names;
use crate::nn::quant::{QFormat, QMatrix};
use crate::nn::{Linear, Matrix};
use crate::{Error, Result};

/// Everything read from `--model`.
pub struct Checkpoint {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub weights: Weights,
    /// e.g. "safetensors (BF16)" or "GGUF (F32, Q4_1, Q8_0)".
    pub format: String,
}

/// Opens an HF model directory (config.json + safetensors) or a `.gguf` file.
pub fn open(path: &Path) -> Result<Checkpoint> {
    if path.is_dir() {
        hf_dir::open(path)
    } else if path.is_file() {
        gguf::open(path)
    } else {
        Err(Error::Input(format!(
            "{}: no such file or directory; --model takes an HF model directory (config.json + \
             model.safetensors) or a .gguf file",
            path.display()
        )))
    }
}

/// Runs a dependency's reading of `path` so that a panic inside it (a case the checks before it
/// missed) becomes an error naming the file instead of a crash.
fn guarded<T>(path: &Path, doing: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    kaizen_data::guard::catch_panic_with(f).map_err(|msg| {
        Error::checkpoint(
            path,
            format!(
                "a library crashed while {doing} ({}); the file is damaged",
                quote(&msg)
            ),
        )
    })?
}

/// The config keys that size the model, as its file names them (for error messages).
struct SizeKeys<'a> {
    layers: &'a str,
    vocab: &'a str,
    hidden: &'a str,
}

/// Checks the sizes that drive allocations against the tensors present, before any layer is
/// built: the layer count against the layers the weights hold, vocab and hidden sizes against
/// the embedding table. The message names `file` (the one holding the keys).
fn check_sizes(
    config: &ModelConfig,
    weights: &Weights,
    keys: &SizeKeys,
    file: &Path,
) -> Result<()> {
    let n = &config.architecture.spec().names;
    let bad = |msg: String| Err(Error::config(file, msg));
    let prefix = format!("{}.", n.layers);
    let held = weights
        .entries
        .keys()
        .filter_map(|k| {
            k.strip_prefix(&prefix)?
                .split('.')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .map_or(0, |i| i.saturating_add(1));
    let layers = config.num_hidden_layers as u64;
    if layers > held {
        return bad(format!(
            "\"{}\" is {layers} but the weights hold {held} layers (no tensor named {prefix}{held}.*); the config does not match its weights",
            keys.layers
        ));
    }
    if layers < held {
        return bad(format!(
            "\"{}\" is {layers} but the weights hold {held} layers ({prefix}{layers}.* and on would be left over); the config does not match its weights",
            keys.layers
        ));
    }
    let embed = format!("{}.weight", n.embed);
    let want = [config.vocab_size, config.hidden_size];
    match weights.entries.get(&embed) {
        Some(Entry { shape, .. }) if shape[..] != want[..] => bad(format!(
            "\"{}\" {} and \"{}\" {} imply an embedding table of {want:?}, but tensor \"{embed}\" has shape {shape:?}",
            keys.vocab, config.vocab_size, keys.hidden, config.hidden_size
        )),
        _ => Ok(()),
    }
}

/// Source of one tensor, read on demand so ignored tensors are never decoded: `keep` =
/// Some(compute dtype) asks a quantized GGUF tensor to stay quantized; otherwise it comes dense
/// (f32, or the file's float dtype).
type Loader = Box<dyn Fn(Option<DType>) -> Result<Matrix>>;

struct Entry {
    shape: Vec<usize>,
    /// Resident bytes when the file's own quantized type is kept (a GGUF's quantized tensor).
    quantized_bytes: Option<u64>,
    load: Loader,
}

/// What a frozen matrix is to the model, which decides its quantization
/// ([`Weights::take_matrix`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    /// A linear layer inside the blocks.
    Block,
    /// The token embedding table.
    Embedding,
    /// The output head (untied).
    Head,
}

/// Tensors of a checkpoint keyed by HF name. Loading is strict: a model takes each tensor it
/// needs with its expected shape, and [`Weights::finish`] fails if anything is left over.
pub struct Weights {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
    /// The dtype 2-D tensors (linear layers, embeddings) are kept in: f32, or bf16 for
    /// `--dtype bf16`, narrowed one tensor at a time so the f32 model never exists whole. It is
    /// also the compute precision of quantized matrices.
    pub matrices: DType,
    /// `--quantize`: the linear layers inside the blocks are quantized as they are read, one
    /// at a time; a GGUF's quantized tensors keep their own types.
    pub quantize: Option<QFormat>,
    /// `--quantize-embeddings`: the embedding table's and the LM head's formats (a tied head is
    /// the table); without it they keep the load dtype, as transformers' `load_in_4bit`.
    pub quantize_embeddings: Option<[QFormat; 2]>,
    /// `--compute int8` for the quantized matrices.
    pub int8: bool,
}

impl Weights {
    fn new(path: PathBuf) -> Self {
        Weights {
            path,
            entries: BTreeMap::new(),
            matrices: DType::F32,
            quantize: None,
            quantize_embeddings: None,
            int8: false,
        }
    }

    fn insert(
        &mut self,
        name: String,
        shape: Vec<usize>,
        quantized_bytes: Option<u64>,
        load: Loader,
    ) {
        let entry = Entry {
            shape,
            quantized_bytes,
            load,
        };
        self.entries.insert(name, entry);
    }

    /// The bytes the weights will hold once loaded as [`Weights::take`] and
    /// [`Weights::take_matrix`] store them (`names`: the architecture's, which say what the
    /// blocks, the embedding table and the head are), for the memory guard before anything is
    /// read.
    pub fn resident_estimate(&self, names: &Names) -> u64 {
        let dense = self.matrices.size_in_bytes() as u64;
        let prefix = format!("{}.", names.layers);
        let (embed, head) = (
            format!("{}.weight", names.embed),
            format!("{}.weight", names.head),
        );
        let role = |name: &str| match name {
            _ if name.starts_with(&prefix) => Some(Role::Block),
            _ if name == embed => Some(Role::Embedding),
            _ if name == head => Some(Role::Head),
            _ => None,
        };
        self.entries
            .iter()
            .filter(|(name, _)| !name.starts_with("gguf:"))
            .map(|(name, e)| {
                let n: u64 = e.shape.iter().map(|&d| d as u64).product();
                let [rows, cols] = e.shape[..] else {
                    return 4 * n;
                };
                let format = role(name).and_then(|r| self.format_for(r));
                let quantized = match (self.quantize, e.quantized_bytes, format) {
                    (Some(_), Some(b), _) => Some(b),
                    (_, _, Some(f)) => f.matrix_bytes(rows, cols),
                    _ => None,
                };
                quantized.unwrap_or(dense * n)
            })
            .sum()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Removes `name` and returns it as f32 (a 2-D tensor as `matrices`), checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let load = self.entry(name, shape)?;
        let dtype = if shape.len() == 2 {
            self.matrices
        } else {
            DType::F32
        };
        match load(None)? {
            Matrix::Dense(t) => Ok(t.to_dtype(dtype)?),
            Matrix::Quant(q) => Ok(q.to_f32()?.to_dtype(dtype)?),
        }
    }

    /// The format a float matrix in `role` is quantized to: `--quantize` for the blocks' linear
    /// layers, `--quantize-embeddings` for the embedding table and the head.
    fn format_for(&self, role: Role) -> Option<QFormat> {
        match role {
            Role::Block => self.quantize,
            Role::Embedding => self.quantize_embeddings.map(|[e, _]| e),
            Role::Head => self.quantize_embeddings.map(|[_, h]| h),
        }
    }

    /// A frozen 2-D matrix (out, in). Under `--quantize`, a GGUF's quantized tensor stays as it
    /// is, and a float one is quantized as its `role` says ([`Weights::format_for`]: the
    /// embedding table and the head keep the load dtype unless `--quantize-embeddings`).
    pub fn take_matrix(&mut self, name: &str, shape: &[usize], role: Role) -> Result<Matrix> {
        let load = self.entry(name, shape)?;
        let keep = self.quantize.map(|_| self.matrices);
        let mut q = match (load(keep)?, self.format_for(role)) {
            (Matrix::Quant(q), _) => q,
            (Matrix::Dense(t), Some(format)) => std::sync::Arc::new(
                QMatrix::quantize(&t, format, self.matrices, name)
                    .map_err(|e| Error::checkpoint(&self.path, e.to_string()))?,
            ),
            (Matrix::Dense(t), _) => return Ok(Matrix::Dense(t.to_dtype(self.matrices)?)),
        };
        if let Some(q) = std::sync::Arc::get_mut(&mut q) {
            q.int8 = self.int8;
        }
        Ok(Matrix::Quant(q))
    }

    /// Removes `name`'s loader, checking its shape.
    fn entry(&mut self, name: &str, shape: &[usize]) -> Result<Loader> {
        let Some(Entry {
            shape: found, load, ..
        }) = self.entries.remove(name)
        else {
            let last = name.rsplit('.').next().unwrap_or(name);
            let near: Vec<String> = self
                .entries
                .keys()
                .filter(|k| k.ends_with(last))
                .take(4)
                .map(|k| quote(k))
                .collect();
            return Err(Error::checkpoint(
                &self.path,
                format!("missing tensor \"{name}\" (some tensors present: [{}]); is this checkpoint for the architecture its config names?", near.join(", ")),
            ));
        };
        if found != shape {
            return Err(Error::checkpoint(
                &self.path,
                format!("tensor \"{name}\" has shape {found:?}, but the config implies {shape:?}"),
            ));
        }
        Ok(load)
    }

    /// Like [`Weights::take`] for tensors that may be absent (biases, tied heads).
    pub fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Takes `{name}.weight` (out, in) and, if `bias`, `{name}.bias` (out,) as a frozen linear
    /// layer inside the blocks (quantized under `--quantize`).
    pub fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = self.take_matrix(&format!("{name}.weight"), &[out, inp], Role::Block)?;
        let bias = match bias {
            true => Some(self.take(&format!("{name}.bias"), &[out])?),
            false => None,
        };
        Ok(Linear::new(weight, bias))
    }

    /// Fails unless every tensor was taken or its name ends with one of `ignored_suffixes`.
    pub fn finish(self, ignored_suffixes: &[&str]) -> Result<()> {
        let left: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !ignored_suffixes.iter().any(|s| k.ends_with(s)))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = left.iter().take(8).map(|k| quote(k)).collect();
        Err(Error::checkpoint(
            &self.path,
            format!(
                "{} tensor(s) were not used by the model, e.g. [{}]; the checkpoint does not \
                 match its config (wrong num_hidden_layers or model_type?)",
                left.len(),
                shown.join(", ")
            ),
        ))
    }
}
