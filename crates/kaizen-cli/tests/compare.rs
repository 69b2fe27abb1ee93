//! `kaizen compare`, run as a binary on the tiny committed llama fixture with small JSONL files
//! written to a scratch directory: the report (a row of numbers per method in report.md, the same
//! numbers in report.json, four non-empty PNG charts, each method's own run directory), and bad
//! input (an unknown method, an existing report, a method whose training fails).
//!
//! Every run is two optimizer steps per method on batches of 4 short texts: seconds in all.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const LLAMA: &str = "llama-gqa-tied";
const WORDS: [&str; 8] = [
    "apple", "river", "stone", "cloud", "green", "seven", "tiger", "piano",
];

/// `n` short `{"text"}` lines, varied by `offset`.
fn texts(n: usize, offset: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let words: Vec<_> = (0..2 + i % 4)
                .map(|j| WORDS[(offset + i + j) % 8])
                .collect();
            format!("Item {}: {}.", offset + i, words.join(" "))
        })
        .collect()
}

/// Train, held-out and general-text files in `dir`.
fn data(dir: &Path) -> [PathBuf; 3] {
    let general = vec![
        "the quick brown fox jumps over the lazy dog".to_string(),
        "a river runs through the green valley near the stone bridge".to_string(),
    ];
    [
        write_jsonl(dir, "train.jsonl", &texts(12, 0)),
        write_jsonl(dir, "val.jsonl", &texts(4, 40)),
        write_jsonl(dir, "general.jsonl", &general),
    ]
}

/// `compare --model <LLAMA> --data ... --out <out> --methods <methods> --max-steps 2 extra...`
fn compare(dir: &Path, out: &Path, methods: &str, extra: &[&str]) -> Run {
    compare_on(LLAMA, dir, out, methods, extra)
}

fn compare_on(model: &str, dir: &Path, out: &Path, methods: &str, extra: &[&str]) -> Run {
    let [train, val, general] = data(dir);
    let mut args: Vec<OsString> = vec!["compare".into()];
    for (flag, value) in [
        ("--model", model_path(model)),
        ("--data", train),
        ("--val-data", val),
        ("--general-data", general),
        ("--out", out.to_path_buf()),
    ] {
        args.extend([flag.into(), value.into_os_string()]);
    }
    for a in [
        "--methods",
        methods,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
    ] {
        args.push(a.into());
    }
    args.extend(extra.iter().map(OsString::from));
    kaizen(args)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cells of report.md's table row for `method`.
fn row(report: &str, method: &str) -> Vec<String> {
    let line = report
        .lines()
        .find(|l| l.starts_with(&format!("| {method} |")))
        .unwrap_or_else(|| panic!("no row for {method} in report.md:\n{report}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

fn number(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: expected a number, found {v}"));
    assert!(x.is_finite(), "{what}: {x}");
    x
}

#[test]
fn compare_writes_report_json_charts_and_a_run_per_method() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let stdout = compare(dir.path(), &out, "lora,ia3,prompt", &[]).ok();
    assert!(stdout.contains("report.md"), "{stdout}");

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let header = row(&report, "method");
    for method in ["lora", "ia3", "prompt"] {
        let cells = row(&report, method);
        assert_eq!(cells.len(), header.len(), "{cells:?}");
        // held-out loss "before → after (gain)" and the general-text loss hold numbers.
        for cell in [&cells[6], &cells[7]] {
            let before: f64 = cell.split(' ').next().unwrap().parse().expect(cell);
            assert!(before > 0.0, "{cell}");
        }
        assert!(out.join(method).join("adapter_config.json").is_file());
    }
    assert!(report.contains("| base model |"), "{report}");
    for png in [
        "loss_curves.png",
        "params.png",
        "memory.png",
        "forgetting.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1000,
            "{png}"
        );
        assert!(report.contains(&format!("]({png})")), "{png} not embedded");
    }

    let json = read_json(&out.join("report.json"));
    assert_eq!(json["max_steps"], 2);
    assert!(number(&json["base"]["general_loss"], "base general_loss") > 0.0);
    let methods = json["methods"].as_array().expect("methods array");
    let names: Vec<_> = methods
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lora", "ia3", "prompt"]);
    for m in methods {
        let name = m["method"].as_str().unwrap();
        for field in [
            "trainable_params",
            "all_params",
            "trainable_percent",
            "adapter_bytes",
            "train_tokens_per_sec",
            "wall_seconds",
            "val_loss_before",
            "val_loss_after",
            "task_gain",
            "general_loss_before",
            "general_loss_after",
            "forgetting",
            "train_loss_final",
            "overfit_gap",
            "gen_tokens_per_sec_unmerged",
            "gen_speed_vs_base",
            "lr",
        ] {
            number(&m[field], &format!("{name}.{field}"));
        }
        assert!(m["trainable_params"].as_u64().unwrap() > 0);
        assert!(m["adapter_bytes"].as_u64().unwrap() > 0);
        if cfg!(target_os = "linux") {
            assert!(number(&m["peak_rss_bytes"], "peak_rss_bytes") > 1e6);
        }
        // LoRA and IA3 fold into the weights; prompt tuning adds inputs and cannot.
        let merged = &m["gen_tokens_per_sec_merged"];
        assert_eq!(merged.is_number(), name != "prompt", "{name}: {merged}");
    }
}

/// Every method `compare` knows, in its default order.
const ALL: [&str; 18] = [
    "full",
    "freeze",
    "lora",
    "dora",
    "pissa",
    "olora",
    "adalora",
    "ia3",
    "vera",
    "loha",
    "lokr",
    "ln-tuning",
    "oft",
    "boft",
    "adapter",
    "prefix",
    "p-tuning",
    "prompt",
];

/// Every method side by side on the newer architectures (Gemma 3's sliding windows and QK-norm;
/// Phi-3's fused projections, which `--target-modules` must name for the attention methods).
#[test]
fn compare_runs_every_method_on_gemma3_and_phi3() {
    for model in ["gemma3", "phi3"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cmp");
        compare_on(model, dir.path(), &out, &ALL.join(","), &[]).ok();
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        let json = read_json(&out.join("report.json"));
        let methods = json["methods"].as_array().expect("methods array");
        assert_eq!(methods.len(), ALL.len(), "{model}");
        for (m, name) in methods.iter().zip(ALL) {
            assert_eq!(m["method"], name, "{model}");
            row(&report, name);
            let after = number(&m["val_loss_after"], &format!("{model} {name}"));
            assert!(after > 0.0, "{model} {name}");
        }
    }
}

#[test]
fn compare_unknown_method_names_the_valid_ones_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let err = compare(dir.path(), &out, "lora,qlora", &[]).fails();
    assert_mentions(&err, &[&["qlora"][..], &ALL].concat());
    assert!(!out.exists());
}

#[test]
fn compare_keeps_an_existing_report_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("report.md"), "old report\n").unwrap();
    let err = compare(dir.path(), &out, "ia3", &[]).fails();
    assert_mentions(&err, &["report.md", "--overwrite"]);
    assert_eq!(
        std::fs::read_to_string(out.join("report.md")).unwrap(),
        "old report\n"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    compare(dir.path(), &out, "ia3", &["--overwrite", "--lr", "1e-3"]).ok();
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| ia3 |"), "{report}");
    assert_eq!(
        read_json(&out.join("report.json"))["methods"][0]["lr"],
        1e-3
    );
}

#[test]
fn compare_failed_run_names_the_method_and_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let run = compare(dir.path(), &out, "ia3", &["--template", "nope"]);
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    let last = run.stderr.lines().rev().find(|l| !l.trim().is_empty());
    let last = last.unwrap_or_default();
    assert!(
        last.starts_with("error: ia3: `kaizen train` failed"),
        "{last}"
    );
    assert!(last.contains("nope"), "{last}");
    assert!(!out.join("report.md").exists());
}
