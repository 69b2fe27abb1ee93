//! `kaizen export`: a model (with an adapter merged, optionally) as a GGUF file for llama.cpp and
//! Ollama, or a LoRA adapter alone as llama.cpp's LoRA GGUF (`--lora-only`, for `--lora`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use kaizen::checkpoint::{gguf_export, gguf_lora};

use crate::infer::ModelArg;

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A PEFT adapter directory: merged into the weights (any method kaizen merges), or with
    /// --lora-only written alone as a LoRA GGUF.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Write only the LoRA adapter, as llama.cpp's LoRA GGUF (`llama-cli -m BASE.gguf --lora F`).
    #[arg(long, requires = "adapter")]
    pub lora_only: bool,
    /// The .gguf file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor type: f32, f16 (default), bf16, q8_0, q4_0, q4_k_m (a LoRA: f32, f16, bf16, q8_0).
    #[arg(long = "type", default_value = "f16")]
    pub ty: String,
    /// The quantized base an adapter was trained on (as `train --quantize`); it is
    /// dequantized and the adapter merged in f32.
    #[arg(long)]
    pub quantize: Option<String>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

/// Refuses an --out that cannot be a new GGUF file, before any loading.
fn check_out(a: &ExportArgs) -> Result<()> {
    let out = &a.out;
    if out.file_name().is_none() || out.is_dir() {
        bail!(
            "--out {}: give the path of a .gguf file to write, not a directory",
            out.display()
        );
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!(
            "--out {}: directory {} does not exist; create it first",
            out.display(),
            parent.display()
        );
    }
    if out.exists() && !a.overwrite {
        bail!(
            "--out {} exists; choose a new path or pass --overwrite to replace it",
            out.display()
        );
    }
    let same = |p: &Path| match (p.canonicalize(), out.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same(&a.model.model) {
        bail!(
            "--out {} is the model being read; write somewhere else",
            out.display()
        );
    }
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    let ty = gguf_export::GgufType::parse(&a.ty)?;
    check_out(&a)?;
    let src = &a.model.model;
    if a.lora_only {
        let adapter = a
            .adapter
            .as_deref()
            .context("--lora-only needs --adapter")?;
        let base = kaizen::checkpoint::open(src)
            .with_context(|| format!("cannot read model {}", src.display()))?;
        let done = gguf_lora::write_lora(&base.config, adapter, &a.out, ty)
            .with_context(|| format!("cannot export adapter {}", adapter.display()))?;
        println!(
            "wrote {} (LoRA GGUF for {}): {} tensors, {} bytes",
            a.out.display(),
            done.architecture,
            done.tensors,
            done.bytes
        );
        return Ok(());
    }
    let p = crate::infer::parse_precision(Some("f32"), a.quantize.as_deref(), None, None)?;
    let (mut m, info) = crate::infer::load(src, a.adapter.as_deref(), p)
        .with_context(|| format!("cannot load model {}", src.display()))?;
    // Fail on an architecture llama.cpp lacks before merging.
    gguf_export::llama_cpp_arch(m.model.config())?;
    let mut merged = String::new();
    if let (Some(dir), Some(info)) = (&a.adapter, &info) {
        let n = kaizen::tuners::merge(&mut m.model).with_context(|| {
            format!(
                "cannot merge adapter {} ({})",
                dir.display(),
                info.peft_type
            )
        })?;
        merged = format!(
            " with {} merged into {} layers",
            info.method.label(),
            n.len()
        );
    }
    let done = gguf_export::write_model(&mut m.model, src, &a.out, ty)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    let types: Vec<String> = done.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({}{merged}): {} tensors ({}), {} bytes",
        a.out.display(),
        done.architecture,
        done.tensors,
        types.join(", "),
        done.bytes
    );
    Ok(())
}
