//! `kaizen merge`, run as a binary on the committed fixtures: the merged directory scores
//! tests/fixtures/lora/eval.jsonl like base + adapter unmerged and like PEFT (the fixture's
//! reference.json "eval"); a GGUF converts without an adapter; a non-empty --out is refused
//! unless --overwrite; an adapter that does not fit fails with one error line and writes nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> String {
    s(&root().join("tests/fixtures/models").join(name))
}

fn adapter(name: &str) -> String {
    s(&root()
        .join("tests/fixtures/lora")
        .join(name)
        .join("adapter"))
}

fn eval_data() -> String {
    s(&root().join("tests/fixtures/lora/eval.jsonl"))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn kaizen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kaizen"))
        .args(args)
        .output()
        .expect("the kaizen binary runs")
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = kaizen(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kaizen {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects failure with one `error: ...` line and no panic; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = kaizen(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "kaizen {args:?}: {stderr}");
    assert!(
        stderr.starts_with("error: ") && !stderr.contains("panicked"),
        "{stderr}"
    );
    stderr
}

/// `kaizen eval --json` loss on eval.jsonl.
fn eval_loss(model: &str, adapter: Option<&str>) -> f64 {
    let data = eval_data();
    let mut args = vec!["eval", "--model", model, "--data", &data, "--json"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    let out = ok(&args);
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    last["loss"].as_f64().unwrap()
}

fn assert_close(got: f64, want: f64, what: &str) {
    let err = (got - want).abs() / want.abs();
    assert!(err < TOL, "{what}: {got} vs {want} (relative {err:e})");
}

/// `fixture`: a directory under tests/fixtures/lora for the base model `name`.
fn merged_scores_like_unmerged(fixture: &str, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = s(&tmp.path().join("merged"));
    let stdout = ok(&[
        "merge",
        "--model",
        &model(name),
        "--adapter",
        &adapter(fixture),
        "--out",
        &out,
    ]);
    assert!(
        stdout.contains("model.safetensors") && stdout.contains("config.json"),
        "{stdout}"
    );
    let merged = eval_loss(&out, None);
    assert_close(
        merged,
        eval_loss(&model(name), Some(&adapter(fixture))),
        fixture,
    );
    let reference = root()
        .join("tests/fixtures/lora")
        .join(fixture)
        .join("reference.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    assert_close(merged, r["eval"]["loss"].as_f64().unwrap(), "vs PEFT");
}

#[test]
fn merge_gpt_neox_scores_like_unmerged() {
    merged_scores_like_unmerged("neox-seq-spiece", "neox-seq-spiece");
}

#[test]
fn merge_llama_scores_like_unmerged() {
    merged_scores_like_unmerged("llama-gqa-tied", "llama-gqa-tied");
}

#[test]
fn merge_dora_scores_like_unmerged_and_like_peft() {
    merged_scores_like_unmerged("dora-neox-seq-spiece", "neox-seq-spiece");
    merged_scores_like_unmerged("dora-llama-gqa-tied", "llama-gqa-tied");
}

#[test]
fn merge_without_adapter_converts_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let out = s(&tmp.path().join("converted"));
    let gguf = s(&root().join("tests/fixtures/models/llama-gguf/model.gguf"));
    ok(&["merge", "--model", &gguf, "--out", &out]);
    assert_close(eval_loss(&out, None), eval_loss(&gguf, None), "gguf");
    let inspect = ok(&["inspect", "--model", &out]);
    assert!(inspect.contains("safetensors (F32)"), "{inspect}");
}

#[test]
fn non_empty_out_needs_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let out = s(&tmp.path().join("merged"));
    let (m, a) = (model("llama-mha-linear"), adapter("llama-mha-linear"));
    let args = ["merge", "--model", &m, "--adapter", &a, "--out", &out];
    ok(&args);
    let err = fails(&args);
    assert!(
        err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );
    ok(&[&args[..], &["--overwrite"]].concat());
    assert_close(
        eval_loss(&out, None),
        eval_loss(&m, Some(&a)),
        "after --overwrite",
    );
}

#[test]
fn adapter_for_another_model_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let err = fails(&[
        "merge",
        "--model",
        &model("llama-gqa-tied"),
        "--adapter",
        &adapter("neox-par-bpe"),
        "--out",
        &s(&out),
    ]);
    assert!(err.contains("cannot apply adapter"), "{err}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
