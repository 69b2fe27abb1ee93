//! What `kaizen compare` writes: report.md (header, table, learning rates, how to read each
//! column, charts), report.json (the same numbers) and four charts. Every file is written
//! beside its final name and renamed; report.md comes last, so its presence means a complete
//! comparison.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{Base, CompareArgs, MethodResult, GEN_PROMPT, GEN_REPEATS, GEN_TOKENS, TRAIN_TAIL};
use crate::plot::{bar_chart, curves_chart, Curve};

pub const REPORT_MD: &str = "report.md";
pub const REPORT_JSON: &str = "report.json";
const LOSS_PNG: &str = "loss_curves.png";
const PARAMS_PNG: &str = "params.png";
const MEMORY_PNG: &str = "memory.png";
const FORGETTING_PNG: &str = "forgetting.png";
/// Every file of a comparison besides the run directories.
pub const FILES: [&str; 6] = [
    REPORT_MD,
    REPORT_JSON,
    LOSS_PNG,
    PARAMS_PNG,
    MEMORY_PNG,
    FORGETTING_PNG,
];

/// Writes the charts, report.json and report.md into `a.out`; returns warnings for the user.
pub fn write(a: &CompareArgs, base: &Base, results: &[MethodResult]) -> Result<Vec<String>> {
    let warnings = charts(&a.out, base, results)?;
    let header = Header::new(a);
    let json = serde_json::to_string_pretty(&report_json(a, &header, base, results))?;
    write_atomic(&a.out.join(REPORT_JSON), &json)?;
    write_atomic(&a.out.join(REPORT_MD), &markdown(a, &header, base, results))?;
    Ok(warnings)
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    kaizen::checkpoint::adapter::write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn charts(out: &Path, base: &Base, results: &[MethodResult]) -> Result<Vec<String>> {
    let mut curves = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let curve = |name: &str, points: &crate::plot::Points, dots_only| Curve {
            name: name.to_string(),
            points: points.clone(),
            color: i,
            dots_only,
        };
        curves.push(curve(&r.method, &r.train_curve, false));
        curves.push(curve("", &r.eval_curve, true));
    }
    let bars = |f: &dyn Fn(&MethodResult) -> f64| -> Vec<(String, f64)> {
        results.iter().map(|r| (r.method.clone(), f(r))).collect()
    };
    let rss = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64);
    // The base model last, so each method keeps its colour from the other charts.
    let mut memory = bars(&|r| rss(r.peak_rss_bytes));
    memory.push(("base (inference)".to_string(), rss(base.peak_rss_bytes)));
    let bytes = |v: f64| fmt_bytes(v as u64);
    let drawn = [
        curves_chart(
            &out.join(LOSS_PNG),
            "Train loss (lines) and held-out loss (dots)",
            "step",
            "loss",
            &curves,
        )?,
        bar_chart(
            &out.join(PARAMS_PNG),
            "Trainable parameters (log scale)",
            "trainable parameters",
            &bars(&|r| r.trainable_params as f64),
            true,
            &|v| fmt_count(v.round() as u64),
        )?,
        bar_chart(
            &out.join(MEMORY_PNG),
            "Peak RSS while training",
            "peak RSS",
            &memory,
            false,
            &bytes,
        )?,
        bar_chart(
            &out.join(FORGETTING_PNG),
            "Forgetting: change of loss on general text (lower is better)",
            "general-text loss after - before",
            &bars(&|r| r.forgetting),
            false,
            &|v| match v {
                v if v.abs() < 5e-4 => "0".to_string(),
                v => format!("{v:+.3}"),
            },
        )?,
    ];
    Ok(drawn.into_iter().flatten().collect())
}

/// The run's circumstances, shared by report.md and report.json.
struct Header {
    date: String,
    cpus: usize,
    cpu_model: String,
    files: [(&'static str, String); 3],
}

impl Header {
    fn new(a: &CompareArgs) -> Header {
        Header {
            date: utc_now(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpu_model(),
            files: [
                ("train", describe_file(&a.data)),
                ("held-out", describe_file(&a.val_data)),
                ("general text", describe_file(&a.general_data)),
            ],
        }
    }
}

fn report_json(a: &CompareArgs, h: &Header, base: &Base, results: &[MethodResult]) -> Value {
    json!({
        "model": a.model,
        "data": a.data,
        "val_data": a.val_data,
        "general_data": a.general_data,
        "max_steps": a.max_steps,
        "seed": a.seed,
        "batch_size": a.batch_size,
        "max_len": a.max_len,
        "lr_override": a.lr,
        "generation": {"prompt": GEN_PROMPT, "new_tokens": GEN_TOKENS, "best_of": GEN_REPEATS},
        "machine": {"cpus": h.cpus, "cpu_model": h.cpu_model},
        "date": h.date,
        "base": base,
        "methods": results,
    })
}

fn markdown(a: &CompareArgs, h: &Header, base: &Base, results: &[MethodResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# kaizen compare\n");
    let _ = writeln!(s, "- model: `{}`", a.model.display());
    for (what, desc) in &h.files {
        let _ = writeln!(s, "- {what} data: {desc}");
    }
    let _ = writeln!(
        s,
        "- {} optimizer steps per method, batch size {}, max length {}, seed {}",
        a.max_steps, a.batch_size, a.max_len, a.seed
    );
    let _ = writeln!(s, "- machine: {} CPUs, {}", h.cpus, h.cpu_model);
    let _ = writeln!(s, "- date: {}\n", h.date);
    table(&mut s, base, results);
    learning_rates(&mut s, a, results);
    how_to_read(&mut s, base);
    let _ = writeln!(s, "## Charts\n");
    for (png, alt) in [
        (LOSS_PNG, "loss curves"),
        (PARAMS_PNG, "trainable parameters"),
        (MEMORY_PNG, "peak RSS"),
        (FORGETTING_PNG, "forgetting"),
    ] {
        let _ = writeln!(s, "![{alt}]({png})\n");
    }
    s
}

fn table(s: &mut String, base: &Base, results: &[MethodResult]) {
    let _ = writeln!(s, "## Results\n");
    let _ = writeln!(
        s,
        "| method | trainable params (% of model) | saved size | peak RSS | train tok/s | wall | \
         held-out loss before → after (gain) | general loss before → after (forgetting) | \
         final train loss | gap (held-out − train) | gen tok/s unmerged | gen tok/s merged | vs base |"
    );
    let _ = writeln!(s, "|{}", "---|".repeat(13));
    let opt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.1}"));
    let _ = writeln!(
        s,
        "| base model | {} (100%) | — | {} (inference) | — | — | — | {:.3} | — | — | — | {:.1} | 1.00x |",
        fmt_count(base.params as u64),
        fmt_rss(base.peak_rss_bytes),
        base.general_loss,
        base.gen_tokens_per_sec
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} ({:.3}%) | {} | {} | {:.0} | {} | {:.3} → {:.3} ({:+.3}) | {:.3} → {:.3} ({:+.3}) | {:.3} | {:+.3} | {} | {} | {:.2}x |",
            r.method,
            fmt_count(r.trainable_params as u64),
            r.trainable_percent,
            fmt_bytes(r.adapter_bytes),
            fmt_rss(r.peak_rss_bytes),
            r.train_tokens_per_sec,
            fmt_secs(r.wall_seconds),
            r.val_loss_before,
            r.val_loss_after,
            r.task_gain,
            r.general_loss_before,
            r.general_loss_after,
            r.forgetting,
            r.train_loss_final,
            r.overfit_gap,
            opt(r.gen_tokens_per_sec_unmerged),
            opt(r.gen_tokens_per_sec_merged),
            r.gen_speed_vs_base,
        );
    }
    let _ = writeln!(s);
}

fn learning_rates(s: &mut String, a: &CompareArgs, results: &[MethodResult]) {
    let _ = writeln!(s, "## Learning rates and flags\n");
    let why = match a.lr {
        Some(lr) => format!("All methods used `--lr {lr:e}` (given on the command line)."),
        None => "Each method uses its own default learning rate: methods that move a few \
                 embeddings or scaling vectors need far larger steps than ones that move every \
                 weight (give `--lr` to use one rate for all)."
            .to_string(),
    };
    let _ = writeln!(
        s,
        "{why} Schedule: `kaizen train`'s default (linear decay, no warmup), AdamW.\n"
    );
    let _ = writeln!(s, "| method | lr | `kaizen train` flags |\n|---|---|---|");
    for r in results {
        let flags = method_flags(&r.train_args);
        let _ = writeln!(s, "| {} | {:e} | `{}` |", r.method, r.lr, flags);
    }
    let _ = writeln!(s);
}

/// The method-specific part of a run's arguments: from `--method` on, `--overwrite` left out.
fn method_flags(args: &[String]) -> String {
    let from = args
        .iter()
        .position(|x| x == "--method")
        .unwrap_or(args.len());
    let flags: Vec<&str> = args[from..]
        .iter()
        .map(String::as_str)
        .filter(|x| *x != "--overwrite")
        .collect();
    flags.join(" ")
}

fn how_to_read(s: &mut String, base: &Base) {
    let _ = writeln!(s, "## How to read the columns\n");
    for line in [
        "**trainable params**: values the optimizer updates, and their share of all parameters (PEFT's `trainable%`).".to_string(),
        "**saved size**: the `*.safetensors` files the run leaves (the adapter; the whole model for `full`).".to_string(),
        format!("**peak RSS**: the training process's maximum resident memory (`wait4`'s `ru_maxrss`), model load included; Linux counts the parent's peak at spawn into it, here {}. The base row is the peak of a process that loaded the base model and evaluated and generated with it.", fmt_rss(base.rss_at_spawn_bytes)),
        "**train tok/s**: mean over steps of (batch × padded length) / step time. **wall**: the whole `kaizen train` run, model load and evaluations included.".to_string(),
        "**held-out loss**: mean loss on the label tokens of `--val-data` (the answers; prompts are masked) before the first step and after the last; gain = before − after (higher is better).".to_string(),
        "**general loss**: mean next-token loss on `--general-data`, unrelated text, with the base model and with the trained one; forgetting = after − before (above zero: the method damaged what the model knew).".to_string(),
        format!("**final train loss**: mean of the last {TRAIN_TAIL} step losses. **gap** = held-out − train: large and growing means over-fitting the small training set."),
        format!("**gen tok/s**: greedy generation, batch 1, {GEN_TOKENS} new tokens, best of {GEN_REPEATS}; unmerged = adapter applied on the fly, merged = folded into the weights (LoRA, DoRA, IA3; `full` is a plain model). **vs base**: merged (else unmerged) speed over the base model's; merged should be 1.00x within noise."),
    ] {
        let _ = writeln!(s, "- {line}");
    }
    let _ = writeln!(s);
}

/// `path (12.3 kB, 1070 lines)`.
fn describe_file(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let lines = bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            format!(
                "`{}` ({}, {lines} lines)",
                path.display(),
                fmt_bytes(bytes.len() as u64)
            )
        }
        Err(_) => format!("`{}`", path.display()),
    }
}

/// The first `model name` of /proc/cpuinfo, or "unknown CPU".
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// The current time as `YYYY-MM-DD HH:MM UTC` (civil-from-days, H. Hinnant).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m) = (rem / 3600, rem % 3600 / 60);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02} UTC")
}

/// 950, 12.3k, 1.84M, 135M.
fn fmt_count(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.3}B", n / 1e9),
        n if n >= 1e8 => format!("{:.0}M", n / 1e6),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

/// Decimal units: 512 B, 48.0 kB, 1.2 MB, 1.05 GB.
fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

pub fn fmt_rss(b: Option<u64>) -> String {
    b.map_or_else(|| "n/a".to_string(), fmt_bytes)
}

fn fmt_secs(s: f64) -> String {
    if s < 59.95 {
        format!("{s:.1} s")
    } else {
        let t = s.round() as u64;
        format!("{}m {:02}s", t / 60, t % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_formats_counts_bytes_and_seconds() {
        assert_eq!(fmt_count(950), "950");
        assert_eq!(fmt_count(12_288), "12.3k");
        assert_eq!(fmt_count(1_843_200), "1.84M");
        assert_eq!(fmt_count(134_515_008), "135M");
        assert_eq!(fmt_bytes(48_000), "48.0 kB");
        assert_eq!(fmt_bytes(1_200_000), "1.2 MB");
        assert_eq!(fmt_secs(12.34), "12.3 s");
        assert_eq!(fmt_secs(185.0), "3m 05s");
    }

    #[test]
    fn compare_date_is_civil_utc() {
        let d = utc_now();
        assert_eq!(d.len(), "2025-01-01 00:00 UTC".len(), "{d}");
        assert!(d.starts_with("20") && d.ends_with(" UTC"), "{d}");
    }

    #[test]
    fn compare_method_flags_start_at_method() {
        let args: Vec<String> = ["train", "--lr", "1e-3", "--method", "ia3", "--overwrite"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(method_flags(&args), "--method ia3");
    }
}
