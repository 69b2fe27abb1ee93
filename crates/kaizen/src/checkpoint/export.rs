//! Writes a model in memory as an HF model directory: `config.json` ([`ModelConfig::to_hf_json`]),
//! `model.safetensors` (f32, HF tensor names, tied embeddings once) and the tokenizer files. This
//! is what `kaizen merge` produces; transformers and kaizen both load it.
//!
//! The directory is built beside its destination as `DIR.tmp-XXXXXXXX`, opened again to check
//! that it reads back as the same config and tokenizer, and only then renamed to `DIR`. A failed
//! export removes its temporary directory, so `DIR` is either absent, untouched, or complete.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use kaizen_data::Tokenizer;
use serde_json::json;

use super::adapter::{write_atomic, write_safetensors};
use crate::{Error, Model, Result};

/// Tokenizer files copied from an HF source directory when present (kaizen reads the first
/// five; the rest are for transformers and other tools).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// What [`write_hf_dir`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// File names in the directory, sorted.
    pub files: Vec<String>,
    pub tensors: usize,
    /// Number of values in model.safetensors.
    pub parameters: usize,
}

/// Writes `model` with `tokenizer` as an HF directory `out`. `source` is the path the model was
/// loaded from: an HF directory has its tokenizer files copied; for a `.gguf` file,
/// `tokenizer.json` and `tokenizer_config.json` are written from `tokenizer`. `out` must be absent
/// or empty unless `overwrite` is set. Adapters must already be merged: `&mut` is only needed to
/// check that none is still attached (one would otherwise be silently dropped).
pub fn write_hf_dir(
    model: &mut Model,
    tokenizer: &Tokenizer,
    source: &Path,
    out: &Path,
    overwrite: bool,
) -> Result<Exported> {
    write_hf_dir_as(model, tokenizer, source, out, overwrite, DType::F32)
}

/// [`write_hf_dir`] with the weights written as `dtype` (f32, bf16 or f16: `kaizen merge
/// --dtype`); quantized weights are dequantized first.
pub fn write_hf_dir_as(
    model: &mut Model,
    tokenizer: &Tokenizer,
    source: &Path,
    out: &Path,
    overwrite: bool,
    dtype: DType,
) -> Result<Exported> {
    check_destination(source, out, overwrite)?;
    if let Some((path, _)) = model
        .linears_mut()
        .into_iter()
        .find(|(_, l)| l.adapter.is_some())
    {
        return Err(Error::Input(format!(
            "{path} still carries an unmerged adapter; merge it into the weights \
             (tuners::merge) before writing the model"
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = sibling(out, "tmp")?;
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = write_model_files(&tmp, model, tokenizer, source, dtype)
        .and_then(|exported| verify(&tmp, model, tokenizer).map(|()| exported))
        .and_then(|exported| move_into_place(&tmp, out).map(|()| exported));
    if written.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    written
}

/// Refuses a destination that is a file, a non-empty directory (without `overwrite`), or the
/// directory the model is being read from. [`write_hf_dir`] checks this itself; callers can check
/// first to fail before any loading work.
pub fn check_destination(source: &Path, out: &Path, overwrite: bool) -> Result<()> {
    if out.file_name().is_none() {
        return Err(Error::Input(format!(
            "--out {}: give the path of a directory to create, e.g. out/merged",
            out.display()
        )));
    }
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::Input(format!(
            "--out {} exists and is not a directory; choose another path",
            out.display()
        )));
    }
    let (src, dst) = (source.canonicalize(), out.canonicalize());
    if let (Ok(src), Ok(dst)) = (src, dst) {
        if src.starts_with(&dst) {
            return Err(Error::Input(format!(
                "--out {} holds the model being read ({}); write the result somewhere else",
                out.display(),
                source.display()
            )));
        }
    }
    let mut entries = fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    if entries.next().is_some() && !overwrite {
        return Err(Error::Input(format!(
            "--out {} exists and is not empty; choose a new directory or pass --overwrite to replace it",
            out.display()
        )));
    }
    Ok(())
}

/// `DIR.<tag>-XXXXXXXX` next to `out`.
fn sibling(out: &Path, tag: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::Input(format!("--out {}: not a directory name", out.display())))?;
    let mut name = name.to_os_string();
    name.push(format!(".{tag}-{:08x}", rand::random::<u32>()));
    Ok(out.with_file_name(name))
}

/// Writes config.json, model.safetensors and the tokenizer files (copied from an HF `source`
/// directory, else written from `tokenizer`) into the existing directory `dir`, each file
/// atomically; other files in `dir` stay.
pub fn write_model_files(
    dir: &Path,
    model: &mut Model,
    tokenizer: &Tokenizer,
    source: &Path,
    dtype: DType,
) -> Result<Exported> {
    let mut config = model.config().to_hf_json();
    let torch = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    config["dtype"] = torch.into();
    config["torch_dtype"] = torch.into();
    let config = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Input(format!("cannot serialise config.json: {e}")))?;
    write_atomic(&dir.join("config.json"), format!("{config}\n").as_bytes())?;
    let mut tensors = HashMap::new();
    let mut parameters = 0;
    for (name, t) in model.named_weights()? {
        parameters += t.elem_count();
        tensors.insert(name, t.to_dtype(dtype)?.contiguous()?);
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    if source.is_dir() {
        copy_tokenizer_files(source, dir)?;
    } else {
        write_tokenizer(dir, tokenizer)?;
    }
    let mut files: Vec<String> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    Ok(Exported {
        files,
        tensors: tensors.len(),
        parameters,
    })
}

fn copy_tokenizer_files(source: &Path, dir: &Path) -> Result<()> {
    let mut copied = 0;
    for name in TOKENIZER_FILES {
        let from = source.join(name);
        if !from.exists() {
            continue;
        }
        if !from.is_file() {
            return Err(Error::Input(format!(
                "{}: expected a tokenizer file, found something else (a directory?)",
                from.display()
            )));
        }
        let to = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let done = fs::copy(&from, &tmp)
            .map_err(|e| Error::io(&from, e))
            .and_then(|_| fs::rename(&tmp, &to).map_err(|e| Error::io(&to, e)));
        if done.is_err() {
            // A full disk must not leave a partial copy behind.
            let _ = fs::remove_file(&tmp);
        }
        done?;
        copied += 1;
    }
    if copied == 0 {
        return Err(Error::Input(format!(
            "{}: no tokenizer files to copy (expected some of {TOKENIZER_FILES:?})",
            source.display()
        )));
    }
    Ok(())
}

/// tokenizer.json from the in-memory pipeline, and the tokenizer_config.json fields kaizen and
/// transformers read (special tokens come from tokenizer.json's post-processor, so no
/// `add_bos_token` is written: transformers 5 would rebuild the post-processor from it).
fn write_tokenizer(dir: &Path, tokenizer: &Tokenizer) -> Result<()> {
    write_atomic(
        &dir.join("tokenizer.json"),
        tokenizer.to_json_string()?.as_bytes(),
    )?;
    let mut config = json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    let fields = [
        ("bos_token", tokenizer.bos_token()),
        ("eos_token", tokenizer.eos_token()),
        ("chat_template", tokenizer.chat_template()),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            config[key] = json!(v);
        }
    }
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Input(format!("cannot serialise tokenizer_config.json: {e}")))?;
    write_atomic(
        &dir.join("tokenizer_config.json"),
        format!("{text}\n").as_bytes(),
    )
}

/// Opens the written directory as `kaizen::load` would (config, tokenizer, tensor index) and
/// checks it describes the model in memory.
fn verify(dir: &Path, model: &mut Model, tokenizer: &Tokenizer) -> Result<()> {
    let ck = super::open(dir)?;
    let bug = |what: String| {
        Error::checkpoint(
            dir,
            format!(
                "the written model does not read back ({what}); this is a bug in kaizen's export"
            ),
        )
    };
    let (wrote, read) = (model.config().to_hf_json(), ck.config.to_hf_json());
    if wrote != read {
        return Err(bug(format!("config.json: wrote {wrote}, read {read}")));
    }
    let (a, b) = (tokenizer.vocab_size(), ck.tokenizer.vocab_size());
    if a != b {
        return Err(bug(format!("tokenizer: {a} tokens became {b}")));
    }
    let names: Vec<(String, Tensor)> = model.named_weights()?;
    if let Some((n, _)) = names.iter().find(|(n, _)| !ck.weights.contains(n)) {
        return Err(bug(format!("model.safetensors lacks \"{n}\"")));
    }
    Ok(())
}

/// Renames `tmp` to `out`. An existing `out` (empty, or replaced under `overwrite`) is moved aside
/// first and deleted only once the new directory is in place.
fn move_into_place(tmp: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        return fs::rename(tmp, out).map_err(|e| Error::io(out, e));
    }
    let old = sibling(out, "old")?;
    fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
    if let Err(e) = fs::rename(tmp, out) {
        let _ = fs::rename(&old, out);
        return Err(Error::io(out, e));
    }
    fs::remove_dir_all(&old).map_err(|e| {
        Error::Input(format!(
            "the new model is in {}, but the old one could not be removed from {}: {e}",
            out.display(),
            old.display()
        ))
    })
}
