//! `kaizen merge`: fold a LoRA adapter into the base weights and write an HF model directory.
//! A quantized base (`--quantize`, the one the adapter was trained on) is dequantized and the
//! adapter merged in f32; `--data` then reports the loss of the unmerged quantized model beside
//! the written one's, so a merge that changes outputs is seen, not silent.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use kaizen::checkpoint::export;
use kaizen::{DType, Precision};

use crate::infer::ModelArg;

#[derive(Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A PEFT LoRA adapter directory to fold into the weights. Without it the model is only
    /// converted (e.g. a .gguf file to an HF directory with f32 weights).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Directory to write (config.json, model.safetensors, tokenizer files); created if absent.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists and is not empty.
    #[arg(long)]
    pub overwrite: bool,
    /// The dtype the weights are written in: f32 (default), bf16 or f16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// The quantized base the adapter was trained on (as `train --quantize`); it is
    /// dequantized and the adapter merged in f32.
    #[arg(long)]
    pub quantize: Option<String>,
    /// JSONL of {"text"} lines: report the loss of the unmerged model and of the written one.
    #[arg(long)]
    pub data: Option<PathBuf>,
}

fn out_dtype(s: Option<&str>) -> Result<DType> {
    Ok(match s.unwrap_or("f32") {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("--dtype {other}: unknown dtype (available: f32, bf16, f16)"),
    })
}

/// Token-weighted mean loss of `texts` under `model`.
fn loss(m: &kaizen::Loaded, texts: &[String]) -> Result<f64> {
    let ctx = m.model.config().max_position_embeddings;
    Ok(kaizen::eval::eval_texts(&m.model, &m.tokenizer, texts, ctx)?.loss)
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let src = &a.model.model;
    let dtype = out_dtype(a.dtype.as_deref())?;
    // Refuse a bad --out before spending time on loading.
    export::check_destination(src, &a.out, a.overwrite)?;
    let texts = match &a.data {
        Some(p) => Some(kaizen_data::jsonl::read_texts(p)?),
        None => None,
    };
    // The base as it was trained (quantized), computed in f32: merging is exact in f32, so the
    // losses below differ only by what the written dtype rounds.
    let p = crate::infer::parse_precision(Some("f32"), a.quantize.as_deref(), None, None)?;
    let (mut m, _) = crate::infer::load(src, None, p)
        .with_context(|| format!("cannot load model {}", src.display()))?;
    let info = match &a.adapter {
        Some(dir) => Some(
            kaizen::tuners::load_adapter(&mut m.model, dir)
                .with_context(|| format!("cannot apply adapter {}", dir.display()))?,
        ),
        None => None,
    };
    let before = match &texts {
        Some(t) => Some(loss(&m, t)?),
        None => None,
    };
    let mut merged = String::new();
    if let (Some(dir), Some(info)) = (&a.adapter, &info) {
        let n = kaizen::tuners::merge(&mut m.model).with_context(|| {
            format!(
                "cannot merge adapter {} ({}) into the weights of {}",
                dir.display(),
                info.peft_type,
                src.display()
            )
        })?;
        // LN tuning's norms took their trained values when loaded: they are its merged layers.
        let layers = match info.method {
            kaizen::tuners::Method::LnTuning { .. } => info.targets.len(),
            _ => n.len(),
        };
        merged = format!(" with {} merged into {layers} layers", info.method.label());
    }
    let out = export::write_hf_dir_as(&mut m.model, &m.tokenizer, src, &a.out, a.overwrite, dtype)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    println!(
        "wrote {}{merged}: {} tensors, {} parameters in {}; files: {}",
        a.out.display(),
        out.tensors,
        out.parameters,
        format!("{dtype:?}").to_lowercase(),
        out.files.join(", ")
    );
    if let (Some(texts), Some(before)) = (&texts, before) {
        report(&a.out, texts, before, a.quantize.is_some())?;
    }
    Ok(())
}

/// Loss of the written model (computed in f32) beside the unmerged one's.
fn report(out: &Path, texts: &[String], before: f64, quantized: bool) -> Result<()> {
    let written = kaizen::load_with(out, Precision::default())?;
    let after = loss(&written, texts)?;
    let base = if quantized { "quantized base" } else { "base" };
    println!(
        "loss on {} lines: unmerged ({base} + adapter) {before:.6}, merged as written {after:.6}, \
         difference {:+.6} ({:+.4}%)",
        texts.len(),
        after - before,
        100.0 * (after - before) / before
    );
    Ok(())
}
