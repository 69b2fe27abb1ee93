//! `kaizen merge`: fold a LoRA adapter into the base weights and write an HF model directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kaizen::checkpoint::export;

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
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let src = &a.model.model;
    // Refuse a bad --out before spending time on loading.
    export::check_destination(src, &a.out, a.overwrite)?;
    let mut m =
        kaizen::load(src).with_context(|| format!("cannot load model {}", src.display()))?;
    let mut merged = String::new();
    if let Some(dir) = &a.adapter {
        let info = kaizen::tuners::load_adapter(&mut m.model, dir)
            .with_context(|| format!("cannot apply adapter {}", dir.display()))?;
        let n = kaizen::tuners::merge(&mut m.model).with_context(|| {
            format!(
                "cannot merge adapter {} ({}) into the weights of {}",
                dir.display(),
                info.peft_type,
                src.display()
            )
        })?;
        merged = format!(
            " with {} merged into {} layers",
            info.method.label(),
            n.len()
        );
    }
    let out = export::write_hf_dir(&mut m.model, &m.tokenizer, src, &a.out, a.overwrite)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    println!(
        "wrote {}{merged}: {} tensors, {} parameters in f32; files: {}",
        a.out.display(),
        out.tensors,
        out.parameters,
        out.files.join(", ")
    );
    Ok(())
}
