//! `kaizen compare`: full fine-tuning and every PEFT method on the same model, data, steps and
//! seed, one after the other, each measured the same way; then OUT/report.md, report.json and
//! charts (written by `compare/report.rs`).
//!
//! Each method trains in a child `kaizen train` process (`compare/child.rs`; its output in
//! OUT/<method>), so its peak RSS is its own. Once every child has finished, the rest is measured
//! here with the library: the loss on general text (forgetting) and generation speed of the base
//! model and of each trained one, unmerged and, where the adapter folds into the weights, merged.

mod child;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use kaizen::generate::{generate, GenerateConfig};
use kaizen::Architecture;
use serde::Serialize;

use crate::plot::Points;
use child::{self_peak_rss, train_child, Child};

#[derive(Args)]
pub struct CompareArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Training JSONL (any format `kaizen train` reads).
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out JSONL in the same format: the task's loss before and after training.
    #[arg(long)]
    pub val_data: PathBuf,
    /// JSONL of {"text"} lines unrelated to the task: forgetting is the change of loss on them.
    #[arg(long)]
    pub general_data: PathBuf,
    /// Comma-separated methods, run in this order.
    #[arg(
        long,
        default_value = "full,freeze,lora,dora,pissa,olora,adalora,ia3,vera,loha,lokr,ln-tuning,oft,boft,adapter,prefix,p-tuning,prompt"
    )]
    pub methods: String,
    /// Optimizer steps of every method.
    #[arg(long, default_value_t = 20)]
    pub max_steps: usize,
    /// Output directory: report.md, report.json, charts and one run directory per method.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an earlier comparison in --out (and each method's run directory).
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Truncate training examples and general-text lines to this many tokens.
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// One learning rate for every method (default: each method's own, listed in the report).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Evaluate on --val-data every N steps (default: max-steps / 2).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Prompt template for `kaizen train`: alpaca, rinna, chat or plain.
    #[arg(long)]
    pub template: Option<String>,
}

/// One method of the comparison: how `kaizen train` runs it.
#[derive(Debug)]
pub struct Spec {
    pub name: &'static str,
    /// Default learning rate: prompt methods move a few embeddings and need large steps, full
    /// fine-tuning moves every weight and needs small ones.
    pub lr: f64,
    /// `kaizen train` flags, separated by spaces.
    pub flags: &'static str,
    /// Whether `--target-modules` (the attention projections) is added.
    pub attention_targets: bool,
}

pub const SPECS: [Spec; 18] = [
    spec("full", 5e-5, "--method full", false),
    spec(
        "freeze",
        5e-5,
        "--method freeze --freeze-trainable-layers 2",
        false,
    ),
    spec("lora", 2e-3, "--method lora --r 16 --lora-alpha 32", true),
    spec(
        "dora",
        2e-3,
        "--method lora --use-dora --r 16 --lora-alpha 32",
        true,
    ),
    spec(
        "pissa",
        2e-3,
        "--method lora --init-lora-weights pissa --r 16 --lora-alpha 32",
        true,
    ),
    spec(
        "olora",
        2e-3,
        "--method lora --init-lora-weights olora --r 16 --lora-alpha 32",
        true,
    ),
    spec(
        "adalora",
        2e-3,
        "--method adalora --init-r 12 --target-r 8 --lora-alpha 32",
        true,
    ),
    spec("ia3", 2e-2, "--method ia3", false),
    spec("vera", 1e-2, "--method vera --r 256", true),
    spec("loha", 2e-3, "--method loha --r 8 --lora-alpha 16", true),
    spec("lokr", 2e-3, "--method lokr --r 8 --lora-alpha 16", true),
    spec(
        "ln-tuning",
        2e-2,
        "--method ln-tuning --target-modules input_layernorm,post_attention_layernorm",
        false,
    ),
    spec("oft", 2e-3, "--method oft --oft-block-size 32", true),
    spec(
        "boft",
        2e-3,
        "--method boft --boft-block-size 8 --boft-n-butterfly-factor 2",
        true,
    ),
    spec(
        "adapter",
        2e-3,
        "--method adapter --adapter-type houlsby",
        false,
    ),
    spec(
        "prefix",
        3e-3,
        "--method prefix --num-virtual-tokens 20 --prefix-projection",
        false,
    ),
    spec(
        "p-tuning",
        3e-3,
        "--method p-tuning --num-virtual-tokens 20 --encoder-hidden-size 128",
        false,
    ),
    spec(
        "prompt",
        3e-2,
        "--method prompt --num-virtual-tokens 20 --prompt-tuning-init sample_vocab",
        false,
    ),
];

const fn spec(name: &'static str, lr: f64, flags: &'static str, attention_targets: bool) -> Spec {
    Spec {
        name,
        lr,
        flags,
        attention_targets,
    }
}

/// Generation speed: batch 1, greedy, this many new tokens (EOS suppressed) after this prompt,
/// best of this many runs.
pub const GEN_TOKENS: usize = 32;
pub const GEN_PROMPT: &str = "The history of the printing press begins";
pub const GEN_REPEATS: usize = 3;
/// The final train loss is the mean of this many last step losses.
pub const TRAIN_TAIL: usize = 5;

/// The base model's numbers, measured once.
#[derive(Serialize)]
pub struct Base {
    pub params: usize,
    pub general_loss: f64,
    pub gen_tokens_per_sec: f64,
    /// Peak RSS of this process after loading the base model and measuring it (inference only).
    pub peak_rss_bytes: Option<u64>,
    /// Peak RSS of this process when it started the training children: each child's figure
    /// includes at least this much (Linux carries the parent's over into the child's).
    pub rss_at_spawn_bytes: Option<u64>,
}

/// One method's row of the report.
#[derive(Serialize)]
pub struct MethodResult {
    pub method: String,
    pub lr: f64,
    pub train_args: Vec<String>,
    pub trainable_params: usize,
    pub all_params: usize,
    pub trainable_percent: f64,
    pub adapter_bytes: u64,
    pub adapter_files: Vec<String>,
    pub peak_rss_bytes: Option<u64>,
    pub train_tokens_per_sec: f64,
    pub wall_seconds: f64,
    pub val_loss_before: f64,
    pub val_loss_after: f64,
    pub task_gain: f64,
    pub general_loss_before: f64,
    pub general_loss_after: f64,
    pub forgetting: f64,
    pub train_loss_final: f64,
    pub overfit_gap: f64,
    pub gen_tokens_per_sec_unmerged: Option<f64>,
    pub gen_tokens_per_sec_merged: Option<f64>,
    /// Why there is no merged speed, if there is none.
    pub merge_note: Option<String>,
    /// Generation speed (merged if it merges) over the base model's.
    pub gen_speed_vs_base: f64,
    #[serde(skip)]
    pub train_curve: Points,
    #[serde(skip)]
    pub eval_curve: Points,
}

pub fn run(a: CompareArgs) -> Result<()> {
    let specs = parse_methods(&a.methods)?;
    check_args(&a)?;
    let general = kaizen_data::jsonl::read_texts(&a.general_data)?;
    // Only the config and tokenizer (weights load lazily): Linux counts the parent's peak RSS
    // at spawn into each child's `ru_maxrss`, so this process stays small until training is done.
    let arch = kaizen::checkpoint::open(&a.model)?.config.architecture;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    // An older report would describe runs that are about to be replaced.
    for name in report::FILES {
        let _ = std::fs::remove_file(a.out.join(name));
    }
    let rss_at_spawn = self_peak_rss();
    let runs = train_all(&a, &specs, arch)?;
    eprintln!("base model: loss on general text, generation speed");
    let base = measure_base(&a, &general, rss_at_spawn)?;
    let mut results = Vec::new();
    for (spec, args, child) in runs {
        eprintln!("{}: loss on general text, generation speed", spec.name);
        results.push(measure_method(&a, spec, args, child, &general, &base)?);
    }
    for w in report::write(&a, &base, &results)? {
        eprintln!("warning: {w}");
    }
    println!(
        "compared {} methods: {}",
        results.len(),
        a.out.join(report::REPORT_MD).display()
    );
    Ok(())
}

/// Trains each method in turn in its own child process; stops at the first that fails.
fn train_all(
    a: &CompareArgs,
    specs: &[&'static Spec],
    arch: Architecture,
) -> Result<Vec<(&'static Spec, Vec<String>, Child)>> {
    let mut runs = Vec::new();
    for (i, &spec) in specs.iter().enumerate() {
        let args = train_args(a, spec, arch);
        let n = specs.len();
        eprintln!("[{}/{n}] {}: kaizen {}", i + 1, spec.name, args.join(" "));
        let child = train_child(spec.name, &args, &a.out)?;
        eprintln!(
            "    {}: {:.1}s, peak RSS {}",
            spec.name,
            child.wall_seconds,
            report::fmt_rss(child.peak_rss_bytes)
        );
        runs.push((spec, args, child));
    }
    Ok(runs)
}

/// The methods named in `--methods`, in order; an unknown or repeated name is an error that
/// lists the valid ones.
pub fn parse_methods(list: &str) -> Result<Vec<&'static Spec>> {
    let valid = || SPECS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ");
    let mut out: Vec<&'static Spec> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let Some(spec) = SPECS.iter().find(|s| s.name == name) else {
            bail!("--methods: unknown method {name:?} (valid: {})", valid());
        };
        if out.iter().any(|s| s.name == name) {
            bail!("--methods: {name} is listed twice");
        }
        out.push(spec);
    }
    if out.is_empty() {
        bail!("--methods is empty: name one or more of {}", valid());
    }
    Ok(out)
}

/// Everything that can be checked before the first (long) run, touching nothing.
fn check_args(a: &CompareArgs) -> Result<()> {
    let report = a.out.join(report::REPORT_MD);
    if report.exists() && !a.overwrite {
        bail!(
            "{} already holds a comparison ({}); pass --overwrite to replace it, or choose another --out",
            a.out.display(),
            report.display()
        );
    }
    if a.max_steps == 0 || a.batch_size == 0 || a.max_len == 0 || a.eval_every == Some(0) {
        bail!("--max-steps, --batch-size, --max-len and --eval-every must be at least 1");
    }
    if let Some(lr) = a.lr.filter(|lr| lr.is_nan() || *lr <= 0.0) {
        bail!("--lr must be > 0, found {lr}");
    }
    for (flag, path) in [("--data", &a.data), ("--val-data", &a.val_data)] {
        if !path.is_file() {
            bail!("{flag} {}: no such file", path.display());
        }
    }
    Ok(())
}

/// The `kaizen train` arguments of one method's run.
fn train_args(a: &CompareArgs, spec: &Spec, arch: Architecture) -> Vec<String> {
    let eval_every = a.eval_every.unwrap_or((a.max_steps / 2).max(1));
    let mut args: Vec<String> = vec!["train".into()];
    let mut flag = |k: &str, v: String| args.extend([k.to_string(), v]);
    flag("--model", a.model.display().to_string());
    flag("--data", a.data.display().to_string());
    flag("--val-data", a.val_data.display().to_string());
    flag("--out", a.out.join(spec.name).display().to_string());
    flag("--max-steps", a.max_steps.to_string());
    flag("--seed", a.seed.to_string());
    flag("--batch-size", a.batch_size.to_string());
    flag("--max-len", a.max_len.to_string());
    flag("--eval-every", eval_every.to_string());
    flag("--lr", format!("{:e}", a.lr.unwrap_or(spec.lr)));
    if let Some(t) = &a.template {
        flag("--template", t.clone());
    }
    args.extend(spec.flags.split_whitespace().map(String::from));
    if spec.attention_targets {
        let targets = arch.spec().attention_linears().join(",");
        args.extend(["--target-modules".to_string(), targets]);
    }
    if a.overwrite {
        args.push("--overwrite".into());
    }
    args
}

fn measure_base(a: &CompareArgs, general: &[String], rss_at_spawn: Option<u64>) -> Result<Base> {
    let m = kaizen::load(&a.model)?;
    let cfg = m.model.config();
    let general_loss = general_loss(&m, general, a.max_len)?;
    Ok(Base {
        params: cfg.num_parameters(),
        general_loss,
        gen_tokens_per_sec: gen_speed(&m)?,
        peak_rss_bytes: self_peak_rss(),
        rss_at_spawn_bytes: rss_at_spawn,
    })
}

fn general_loss(m: &kaizen::Loaded, general: &[String], max_len: usize) -> Result<f64> {
    let max_len = max_len.min(m.model.config().max_position_embeddings);
    let r = kaizen::eval::eval_texts(&m.model, &m.tokenizer, general, max_len)
        .context("--general-data")?;
    Ok(r.loss)
}

/// Tokens per second of greedy generation, best of [`GEN_REPEATS`].
fn gen_speed(m: &kaizen::Loaded) -> Result<f64> {
    let ids = m.tokenizer.encode(GEN_PROMPT, true)?;
    let cfg = GenerateConfig {
        max_new_tokens: GEN_TOKENS,
        min_new_tokens: GEN_TOKENS,
        greedy: true,
        ..GenerateConfig::default()
    };
    let mut best: f64 = 0.0;
    for _ in 0..GEN_REPEATS {
        let start = Instant::now();
        let out = generate(&m.model, &m.tokenizer, &ids, &cfg, &mut |_| {})?;
        best = best.max(out.ids.len() as f64 / start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Everything about one method once its child has finished.
fn measure_method(
    a: &CompareArgs,
    spec: &Spec,
    train_args: Vec<String>,
    child: Child,
    general: &[String],
    base: &Base,
) -> Result<MethodResult> {
    let dir = a.out.join(spec.name);
    let (train_curve, eval_curve) = crate::plot::read_losses(&dir.join("metrics.jsonl"))?;
    let (val_loss_before, val_loss_after) = match (eval_curve.first(), eval_curve.last()) {
        (Some(b), Some(e)) => (b.1, e.1),
        _ => bail!("{}: no eval_loss in metrics.jsonl", dir.display()),
    };
    let tail = &train_curve[train_curve.len().saturating_sub(TRAIN_TAIL)..];
    let train_loss_final = tail.iter().map(|p| p.1).sum::<f64>() / tail.len().max(1) as f64;
    let (adapter_bytes, adapter_files) = saved_files(&dir)?;

    let (mut m, info) = load_trained(&a.model, &dir)?;
    let general_loss_after = general_loss(&m, general, a.max_len)?;
    let (unmerged, merged, merge_note) = match &info {
        // Full fine-tuning: the trained model is a plain model, as a merged adapter would be.
        None => (None, Some(gen_speed(&m)?), None),
        Some(_) => {
            let unmerged = gen_speed(&m)?;
            match kaizen::tuners::merge(&mut m.model) {
                Ok(_) => (Some(unmerged), Some(gen_speed(&m)?), None),
                Err(e) => (Some(unmerged), None, Some(e.to_string())),
            }
        }
    };
    let computed = match &info {
        Some(i) => (i.trainable_params, base.params + i.trainable_params),
        None => (base.params, base.params),
    };
    let (trainable_params, all_params) = trainable_line(&child.output).unwrap_or(computed);
    let speed = merged.or(unmerged).unwrap_or(f64::NAN);
    Ok(MethodResult {
        method: spec.name.to_string(),
        lr: a.lr.unwrap_or(spec.lr),
        train_args,
        trainable_params,
        all_params,
        trainable_percent: 100.0 * trainable_params as f64 / all_params.max(1) as f64,
        adapter_bytes,
        adapter_files,
        peak_rss_bytes: child.peak_rss_bytes,
        train_tokens_per_sec: mean_tokens_per_sec(&dir.join("metrics.jsonl"))?,
        wall_seconds: child.wall_seconds,
        val_loss_before,
        val_loss_after,
        task_gain: val_loss_before - val_loss_after,
        general_loss_before: base.general_loss,
        general_loss_after,
        forgetting: general_loss_after - base.general_loss,
        train_loss_final,
        overfit_gap: val_loss_after - train_loss_final,
        gen_tokens_per_sec_unmerged: unmerged,
        gen_tokens_per_sec_merged: merged,
        merge_note,
        gen_speed_vs_base: speed / base.gen_tokens_per_sec,
        train_curve,
        eval_curve,
    })
}

/// The trained model: base + the adapter in `dir`, or, without adapter_config.json there (full
/// fine-tuning), the HF model directory `dir` itself.
fn load_trained(
    model: &Path,
    dir: &Path,
) -> Result<(kaizen::Loaded, Option<kaizen::tuners::AdapterInfo>)> {
    if dir.join("adapter_config.json").is_file() {
        crate::infer::load(model, Some(dir), kaizen::Precision::default())
    } else {
        crate::infer::load(dir, None, kaizen::Precision::default())
    }
}

/// Total size and names of the `*.safetensors` files directly in `dir`: the saved adapter (and a
/// P-tuning encoder beside it), or the fully fine-tuned model. Checkpoints are not counted.
fn saved_files(dir: &Path) -> Result<(u64, Vec<String>)> {
    let mut files = Vec::new();
    let mut total = 0;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && entry.file_type()?.is_file() {
            total += entry.metadata()?.len();
            files.push(name);
        }
    }
    files.sort();
    Ok((total, files))
}

/// `(trainable, all)` from `kaizen train`'s line
/// `trainable params: X || all params: Y || trainable%: Z`.
fn trainable_line(output: &str) -> Option<(usize, usize)> {
    let line = output[output.rfind("trainable params: ")?..]
        .lines()
        .next()?;
    let mut fields = line
        .split("||")
        .map(|f| f.rsplit(':').next().map(str::trim));
    let trainable = fields.next()??.parse().ok()?;
    let all = fields.next()??.parse().ok()?;
    Some((trainable, all))
}

/// Mean `tokens_per_sec` over the step lines of a metrics file.
fn mean_tokens_per_sec(metrics: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    let rates: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("tokens_per_sec").and_then(serde_json::Value::as_f64))
        .collect();
    Ok(rates.iter().sum::<f64>() / rates.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_methods_parse_in_order_and_reject_unknown_or_repeated() {
        let names: Vec<_> = parse_methods(" lora, prompt ,ia3").unwrap();
        let names: Vec<_> = names.iter().map(|s| s.name).collect();
        assert_eq!(names, ["lora", "prompt", "ia3"]);
        let err = parse_methods("lora,qlora").unwrap_err().to_string();
        assert!(
            err.contains("\"qlora\"") && err.contains("p-tuning, prompt"),
            "{err}"
        );
        assert!(parse_methods("lora,lora").is_err());
        assert!(parse_methods(" , ").is_err());
    }

    #[test]
    fn compare_reads_the_trainable_line() {
        let out = "12 examples for training, 3 for validation; 2 steps; trainable params: 4096 || all params: 140000 || trainable%: 2.9257\ntrained 2 steps";
        assert_eq!(trainable_line(out), Some((4096, 140000)));
        assert_eq!(trainable_line("nothing here"), None);
    }
}
