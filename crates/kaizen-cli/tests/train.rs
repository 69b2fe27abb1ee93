//! `kaizen train`, run as a binary on the tiny committed fixture models with small JSONL files
//! written to a scratch directory: what a run writes (the PEFT adapter with PEFT's key names and
//! shapes, metrics.jsonl, loss.png, run.json), that training lowers the held-out loss, that the
//! adapter then works with `eval`, `generate` and `merge`, that `--resume` reproduces an
//! uninterrupted run, that `--config` and flags describe the same run, `--init-adapter`, the
//! token-weighted loss under gradient accumulation, and that each kind of bad input ends in one
//! `error: ...` line naming the file or field (no panic, nothing half-written in --out).
//!
//! Every run is a few optimizer steps on batches of 1-4 sequences, so the file runs in seconds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;
use kaizen::tuners::prompt::p_tuning::ENCODER_FILE;
use serde_json::{json, Value};

const LLAMA: &str = "llama-gqa-tied";
const NEOX: &str = "neox-seq-spiece";

fn s(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// data files

/// Writes one JSON value per line to `dir/name`.
fn write_rows(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, body).expect("write jsonl");
    path
}

const WORDS: [&str; 8] = [
    "apple", "river", "stone", "cloud", "green", "seven", "tiger", "piano",
];

/// `{"instruction", "input"?, "output"}` rows, varied.
fn instruction_rows(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let output = (0..1 + i % 3)
                .map(|j| WORDS[(i + j) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ");
            if i % 2 == 0 {
                json!({"instruction": format!("Name word {i}."), "output": output})
            } else {
                json!({"instruction": "Repeat the input.", "input": WORDS[i % 8], "output": output})
            }
        })
        .collect()
}

/// `{"prompt", "completion"}` rows, varied.
fn completion_rows(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let words: Vec<_> = (0..1 + i % 4).map(|j| WORDS[(i + j) % 8]).collect();
            json!({"prompt": format!("Item {i}:"), "completion": format!(" {}", words.join(" "))})
        })
        .collect()
}

/// `{"text"}` rows: the same sentence again and again (easy to learn).
fn repetitive_text_rows(n: usize) -> Vec<Value> {
    vec![json!({"text": "the cat sat on the mat. the cat sat on the mat."}); n]
}

/// `{"messages"}` rows with two assistant turns, after a system turn if `system`.
fn chat_rows(n: usize, system: bool) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut turns = vec![
                json!({"role": "user", "content": format!("Hi {i}")}),
                json!({"role": "assistant", "content": format!("Hello, {}.", WORDS[i % 8])}),
                json!({"role": "user", "content": "Bye"}),
                json!({"role": "assistant", "content": "Goodbye."}),
            ];
            if system {
                turns.insert(0, json!({"role": "system", "content": "Be brief."}));
            }
            json!({ "messages": turns })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// running `kaizen train`

/// `train --model <fixture> --data <data> --out <out> extra...`
fn train_args(model: &str, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "train".into(),
        "--model".into(),
        s(&model_path(model)),
        "--data".into(),
        s(data),
        "--out".into(),
        s(out),
    ];
    args.extend(extra.iter().map(ToString::to_string));
    args
}

fn train(model: &str, data: &Path, out: &Path, extra: &[&str]) -> Run {
    kaizen(train_args(model, data, out, extra))
}

/// Runs `kaizen train` and expects success; returns stdout.
fn train_ok(model: &str, data: &Path, out: &Path, extra: &[&str]) -> String {
    let stdout = train(model, data, out, extra).ok();
    assert!(
        stdout.contains("trained ") && stdout.contains("adapter written to"),
        "no summary line on stdout: {stdout:?}"
    );
    stdout
}

// ---------------------------------------------------------------------------------------------
// reading what a run wrote

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Every line of OUT/metrics.jsonl, parsed.
fn metrics(out: &Path) -> Vec<Value> {
    let path = out.join("metrics.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics line {l:?}: {e}")))
        .collect()
}

/// The per-step lines (those with "loss").
fn step_lines(out: &Path) -> Vec<Value> {
    metrics(out)
        .into_iter()
        .filter(|v| v.get("loss").is_some())
        .collect()
}

/// (step, eval_loss) of the evaluation lines.
fn eval_losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .into_iter()
        .filter(|v| v.get("eval_loss").is_some())
        .map(|v| (v["step"].as_u64().expect("step"), f64_of(&v["eval_loss"])))
        .collect()
}

/// One tensor of a safetensors file.
struct TensorInfo {
    dtype: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Reads a safetensors file by hand: an 8-byte little-endian header length, the JSON header,
/// then the data. Checks that the offsets tile the data exactly.
fn read_safetensors(path: &Path) -> BTreeMap<String, TensorInfo> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(bytes.len() >= 8, "{}: shorter than 8 bytes", path.display());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(
        8 + n <= bytes.len(),
        "{}: header past the end",
        path.display()
    );
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header is a JSON object");
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    let mut end = 0;
    for (key, info) in header {
        if key == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().expect("dtype").to_string();
        let shape: Vec<usize> = ids(&info["shape"]).iter().map(|&d| d as usize).collect();
        let off = ids(&info["data_offsets"]);
        let (a, b) = (off[0] as usize, off[1] as usize);
        assert!(
            a <= b && b <= data.len(),
            "{key}: offsets {off:?} out of range"
        );
        end = end.max(b);
        let values = if dtype == "F32" {
            assert_eq!(
                b - a,
                4 * shape.iter().product::<usize>(),
                "{key}: byte length"
            );
            data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        } else if dtype == "BF16" {
            // bf16 is an f32's upper half: its values compare exactly with f32 ones.
            data[a..b]
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect()
        } else {
            Vec::new()
        };
        out.insert(
            key,
            TensorInfo {
                dtype,
                shape,
                values,
            },
        );
    }
    assert_eq!(end, data.len(), "{}: data not fully used", path.display());
    out
}

/// Writes F32 tensors as a safetensors file: the inverse of `read_safetensors`.
fn write_safetensors(path: &Path, tensors: &BTreeMap<String, TensorInfo>) {
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (key, t) in tensors {
        let start = data.len();
        data.extend(t.values.iter().flat_map(|x| x.to_le_bytes()));
        let offsets = [start, data.len()];
        header.insert(
            key.clone(),
            json!({"dtype": "F32", "shape": t.shape, "data_offsets": offsets}),
        );
    }
    let header = serde_json::to_vec(&header).unwrap();
    let len = (header.len() as u64).to_le_bytes();
    std::fs::write(path, [&len[..], &header, &data].concat()).unwrap();
}

/// Shape of `<path>.weight` in the fixture's base checkpoint ([out, in]).
fn base_weight_shape(model: &str, path: &str) -> Vec<usize> {
    let file = fixture_dir(model).join("model.safetensors");
    let key = format!("{path}.weight");
    read_safetensors(&file)
        .remove(&key)
        .unwrap_or_else(|| panic!("{model}: no {key} in {}", file.display()))
        .shape
}

fn num_layers(model: &str) -> u64 {
    read_json(&fixture_dir(model).join("config.json"))["num_hidden_layers"]
        .as_u64()
        .expect("num_hidden_layers")
}

/// Checks OUT's adapter against PEFT's layout for rank `r` on `targets` (module paths) and
/// returns its tensors.
fn assert_peft_adapter(
    model: &str,
    out: &Path,
    r: usize,
    targets: &[String],
) -> BTreeMap<String, TensorInfo> {
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    let want: BTreeSet<String> = targets
        .iter()
        .flat_map(|t| {
            [
                format!("base_model.model.{t}.lora_A.weight"),
                format!("base_model.model.{t}.lora_B.weight"),
            ]
        })
        .collect();
    let got: BTreeSet<String> = tensors.keys().cloned().collect();
    assert_eq!(got, want, "adapter_model.safetensors keys");
    for t in targets {
        let w = base_weight_shape(model, t);
        let (out_f, in_f) = (w[0], w[1]);
        let a = &tensors[&format!("base_model.model.{t}.lora_A.weight")];
        let b = &tensors[&format!("base_model.model.{t}.lora_B.weight")];
        assert_eq!(a.shape, [r, in_f], "{t}: lora_A shape is [r, in]");
        assert_eq!(b.shape, [out_f, r], "{t}: lora_B shape is [out, r]");
        assert_eq!((a.dtype.as_str(), b.dtype.as_str()), ("F32", "F32"), "{t}");
        assert!(
            a.values.iter().chain(&b.values).all(|x| x.is_finite()),
            "{t}: non-finite values"
        );
    }
    tensors
}

fn adapter_config(out: &Path) -> Value {
    read_json(&out.join("adapter_config.json"))
}

fn target_list(cfg: &Value) -> Vec<String> {
    cfg["target_modules"]
        .as_array()
        .unwrap_or_else(|| panic!("target_modules is not a list: {cfg}"))
        .iter()
        .map(|t| t.as_str().expect("target name").to_string())
        .collect()
}

fn f32_bits(t: &TensorInfo) -> Vec<u32> {
    t.values.iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// (1) what a run writes

#[test]
fn run_writes_peft_adapter_metrics_chart_and_run_json() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(12));
    let out = tmp.path().join("run");
    train_ok(
        LLAMA,
        &data,
        &out,
        &[
            "--template",
            "alpaca",
            "--r",
            "4",
            "--lora-alpha",
            "16",
            "--target-modules",
            "q_proj,v_proj",
            "--val-split",
            "0.25",
            "--eval-every",
            "2",
            "--max-steps",
            "4",
            "--batch-size",
            "2",
        ],
    );

    // adapter_config.json: PEFT's LoraConfig, targets resolved to module paths.
    let cfg = adapter_config(&out);
    assert_eq!(cfg["peft_type"], "LORA", "{cfg}");
    assert_eq!(cfg["task_type"], "CAUSAL_LM", "{cfg}");
    assert_eq!(cfg["r"].as_u64(), Some(4), "{cfg}");
    assert_eq!(cfg["lora_alpha"].as_f64(), Some(16.0), "{cfg}");
    assert_eq!(
        cfg["base_model_name_or_path"].as_str(),
        Some(s(&model_path(LLAMA)).as_str()),
        "{cfg}"
    );
    let want_targets: Vec<String> = (0..num_layers(LLAMA))
        .flat_map(|i| ["q_proj", "v_proj"].map(|m| format!("model.layers.{i}.self_attn.{m}")))
        .collect();
    let targets = target_list(&cfg);
    assert_eq!(
        targets.iter().collect::<BTreeSet<_>>(),
        want_targets.iter().collect::<BTreeSet<_>>(),
        "target_modules"
    );

    // adapter_model.safetensors: exactly PEFT's keys and shapes; training moved lora_B off 0.
    let tensors = assert_peft_adapter(LLAMA, &out, 4, &targets);
    assert!(
        tensors
            .iter()
            .filter(|(k, _)| k.contains("lora_B"))
            .all(|(_, t)| t.values.iter().any(|&x| x != 0.0)),
        "every lora_B should have been updated from its zero init"
    );

    // metrics.jsonl: one line per step with the documented fields; evals at 0, 2, 4.
    let steps = step_lines(&out);
    assert_eq!(
        steps.iter().map(|v| v["step"].as_u64()).collect::<Vec<_>>(),
        (1..=4).map(Some).collect::<Vec<_>>(),
        "step lines"
    );
    let mut last_elapsed = 0.0;
    for v in &steps {
        for key in [
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_sec",
            "elapsed",
        ] {
            let x = v[key]
                .as_f64()
                .unwrap_or_else(|| panic!("metrics line lacks a numeric {key:?}: {v}"));
            assert!(x.is_finite() && x >= 0.0, "{key} = {x} in {v}");
        }
        assert!(
            f64_of(&v["loss"]) > 0.0 && f64_of(&v["tokens_per_sec"]) > 0.0,
            "{v}"
        );
        assert!(
            f64_of(&v["elapsed"]) >= last_elapsed,
            "elapsed goes back: {v}"
        );
        last_elapsed = f64_of(&v["elapsed"]);
    }
    // The default schedule is linear from --lr (2e-4) down to 0.
    assert_close("lr at step 1", f64_of(&steps[0]["lr"]), 2e-4, 1e-9);
    assert!(
        f64_of(&steps[3]["lr"]) < f64_of(&steps[0]["lr"]),
        "linear decay"
    );
    let evals = eval_losses(&out);
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        [0, 2, 4],
        "eval lines: step 0, every 2, the last"
    );
    assert!(
        evals.iter().all(|e| e.1.is_finite() && e.1 > 0.0),
        "{evals:?}"
    );

    // loss.png is a PNG.
    let png = std::fs::read(out.join("loss.png")).expect("loss.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "loss.png: not a PNG");

    // run.json: the resolved options.
    let run = read_json(&out.join("run.json"));
    assert_eq!(run["model"].as_str(), Some(s(&model_path(LLAMA)).as_str()));
    assert_eq!(run["data"].as_str(), Some(s(&data).as_str()));
    assert_eq!(run["method"], "lora");
    assert_eq!(run["template"], "alpaca");
    assert_eq!(run["batch_size"], 2);
    assert_eq!(run["max_steps"], 4);
    assert_eq!(run["lr"].as_f64(), Some(2e-4));
    assert_eq!(run["adapter"]["r"], 4);
    assert_eq!(run["val_split"].as_f64(), Some(0.25));
    assert!(
        !out.join("checkpoint-2").exists(),
        "no checkpoints without --save-every"
    );
}

#[test]
fn defaults_follow_peft_on_gpt_neox() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(6));
    let out = tmp.path().join("run");
    train_ok(
        NEOX,
        &data,
        &out,
        &["--max-steps", "2", "--batch-size", "3"],
    );
    let cfg = adapter_config(&out);
    assert_eq!(cfg["r"].as_u64(), Some(8), "PEFT's default r: {cfg}");
    assert_eq!(
        cfg["lora_alpha"].as_f64(),
        Some(8.0),
        "PEFT's default alpha: {cfg}"
    );
    assert_eq!(cfg["lora_dropout"].as_f64(), Some(0.0), "{cfg}");
    assert_eq!(cfg["use_rslora"], false, "{cfg}");
    let want: Vec<String> = (0..num_layers(NEOX))
        .map(|i| format!("gpt_neox.layers.{i}.attention.query_key_value"))
        .collect();
    let targets = target_list(&cfg);
    assert_eq!(
        targets.iter().collect::<BTreeSet<_>>(),
        want.iter().collect::<BTreeSet<_>>(),
        "GPT-NeoX default target: query_key_value"
    );
    assert_peft_adapter(NEOX, &out, 8, &targets);
    // No validation set: no eval lines.
    assert!(
        eval_losses(&out).is_empty(),
        "eval lines without a validation set"
    );
    let run = read_json(&out.join("run.json"));
    assert_eq!(run["template"], "alpaca", "no chat template: alpaca");
    assert_eq!(run["optimizer"], "adamw");
    assert_eq!(run["lr_schedule"], "linear");
    assert_eq!(run["max_grad_norm"].as_f64(), Some(1.0));
}

#[test]
fn every_data_shape_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = [
        ("chat.jsonl", chat_rows(4, true)),
        ("chat-nosys.jsonl", chat_rows(4, false)),
        ("inst.jsonl", instruction_rows(4)),
        ("pc.jsonl", completion_rows(4)),
        ("text.jsonl", repetitive_text_rows(4)),
    ];
    for (name, rows) in sets {
        let data = write_rows(tmp.path(), name, &rows);
        // llama-gqa-tied has a chat template (the default); neox-seq-spiece has none.
        for (model, templates) in [
            (LLAMA, &["chat", "plain"][..]),
            (NEOX, &["alpaca", "rinna"]),
        ] {
            for template in templates {
                if *template == "rinna" && name == "chat.jsonl" {
                    continue; // rinna has no system role (an error, tested elsewhere)
                }
                let out = tmp.path().join(format!("{model}-{name}-{template}"));
                train_ok(
                    model,
                    &data,
                    &out,
                    &[
                        "--template",
                        template,
                        "--max-steps",
                        "1",
                        "--batch-size",
                        "4",
                    ],
                );
                let steps = step_lines(&out);
                assert_eq!(steps.len(), 1, "{model} {name} {template}");
                assert!(
                    f64_of(&steps[0]["loss"]).is_finite(),
                    "{model} {name} {template}: {}",
                    steps[0]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (2) training lowers the held-out loss

fn assert_learns(model: &str, rows: &[Value], extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", rows);
    let out = tmp.path().join("run");
    let mut args = vec![
        "--val-split",
        "0.2",
        "--lr",
        "3e-2",
        "--lr-schedule",
        "constant",
        "--max-steps",
        "8",
        "--batch-size",
        "4",
    ];
    args.extend(extra);
    train_ok(model, &data, &out, &args);
    let evals = eval_losses(&out);
    assert_eq!(
        evals.first().map(|e| e.0),
        Some(0),
        "{model}: step-0 eval: {evals:?}"
    );
    assert_eq!(
        evals.last().map(|e| e.0),
        Some(8),
        "{model}: final eval: {evals:?}"
    );
    let (before, after) = (evals[0].1, evals[evals.len() - 1].1);
    assert!(
        after < 0.8 * before,
        "{model}: held-out loss should drop by more than 20%: {before} -> {after}"
    );
}

#[test]
fn training_lowers_held_out_loss_llama_text() {
    assert_learns(LLAMA, &repetitive_text_rows(16), &[]);
}

#[test]
fn training_lowers_held_out_loss_neox_instructions() {
    let rows = vec![json!({"instruction": "Say the fruit.", "output": "banana banana banana"}); 16];
    assert_learns(NEOX, &rows, &["--template", "alpaca"]);
}

// ---------------------------------------------------------------------------------------------
// (3) the trained adapter with eval, generate and merge

fn eval_loss(model: &Path, adapter: Option<&Path>, data: &Path) -> f64 {
    let mut args = vec![
        "eval".to_string(),
        "--model".into(),
        s(model),
        "--data".into(),
        s(data),
        "--json".into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), s(a)]);
    }
    f64_of(&last_json(&kaizen(args).ok())["loss"])
}

fn greedy_ids(model: &Path, adapter: Option<&Path>) -> Vec<u64> {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        s(model),
        "--prompt".into(),
        "the cat".into(),
        "--greedy".into(),
        "--json".into(),
        "--max-new-tokens".into(),
        "8".into(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".into(), s(a)]);
    }
    ids(&last_json(&kaizen(args).ok())["ids"])
}

#[test]
fn trained_adapter_works_with_eval_generate_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(16));
    let val = write_rows(tmp.path(), "val.jsonl", &repetitive_text_rows(3));
    let out = tmp.path().join("run");
    train_ok(
        LLAMA,
        &data,
        &out,
        &[
            "--val-data",
            &s(&val),
            "--lr",
            "3e-2",
            "--lr-schedule",
            "constant",
            "--max-steps",
            "8",
            "--batch-size",
            "4",
        ],
    );
    let base = model_path(LLAMA);
    let before = eval_loss(&base, None, &val);
    let with_adapter = eval_loss(&base, Some(&out), &val);
    assert!(
        with_adapter < 0.8 * before,
        "eval --adapter should score the learned text better: {before} -> {with_adapter}"
    );

    let base_ids = greedy_ids(&base, None);
    let adapter_ids = greedy_ids(&base, Some(&out));
    assert_ne!(
        base_ids, adapter_ids,
        "generate --adapter ignores the adapter"
    );

    let merged = tmp.path().join("merged");
    kaizen([
        "merge",
        "--model",
        &s(&base),
        "--adapter",
        &s(&out),
        "--out",
        &s(&merged),
    ])
    .ok();
    assert_close(
        "merged vs base + adapter",
        eval_loss(&merged, None, &val),
        with_adapter,
        1e-4,
    );
    assert_eq!(
        greedy_ids(&merged, None),
        adapter_ids,
        "merged greedy ids vs base + adapter"
    );
}

// ---------------------------------------------------------------------------------------------
// (4) resume

const RESUME_OPTS: [&str; 12] = [
    "--val-split",
    "0.2",
    "--eval-every",
    "2",
    "--max-steps",
    "6",
    "--batch-size",
    "2",
    "--lr",
    "5e-3",
    "--save-every",
    "3",
];

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    // 8 training examples in batches of 2: 6 steps cross an epoch (a reshuffle).
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(10));
    let whole = tmp.path().join("whole");
    let cut = tmp.path().join("cut");
    train_ok(LLAMA, &data, &whole, &RESUME_OPTS);
    train_ok(LLAMA, &data, &cut, &RESUME_OPTS);
    let ckpt = cut.join("checkpoint-3");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "checkpoint-3 lacks {f}");
    }
    assert_peft_adapter(LLAMA, &ckpt, 8, &target_list(&adapter_config(&ckpt)));
    assert!(
        !cut.join("checkpoint-6").exists(),
        "the final step is the adapter itself, not a checkpoint"
    );
    let final_steps = step_lines(&whole);
    // As if the run had died after its checkpoint: no final adapter.
    std::fs::remove_file(cut.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_file(cut.join("adapter_config.json")).unwrap();
    let mut resumed_args = RESUME_OPTS.to_vec();
    resumed_args.push("--resume");
    let run = train(LLAMA, &data, &cut, &resumed_args);
    assert!(
        run.stderr.contains("checkpoint-3"),
        "should say where it resumes from: {}",
        run.stderr
    );
    run.ok();

    let a = std::fs::read(whole.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed adapter differs from the uninterrupted run's"
    );
    assert_eq!(
        adapter_config(&whole),
        adapter_config(&cut),
        "adapter_config.json"
    );
    // Steps 4-6 of the resumed run log the same losses (the last line of each step).
    let mut resumed: BTreeMap<u64, Value> = BTreeMap::new();
    for v in step_lines(&cut) {
        resumed.insert(v["step"].as_u64().unwrap(), v);
    }
    for v in &final_steps[3..] {
        let step = v["step"].as_u64().unwrap();
        for key in ["loss", "lr", "grad_norm"] {
            assert_eq!(
                resumed[&step][key], v[key],
                "step {step}: {key} after resume"
            );
        }
    }
}

#[test]
fn resume_keeps_one_metrics_line_per_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(10));
    let out = tmp.path().join("run");
    train_ok(LLAMA, &data, &out, &RESUME_OPTS);
    // As if the run had died during step 6: it logged steps 1-5, checkpoint-3 is the last.
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_file(out.join("adapter_config.json")).unwrap();
    let kept: String = metrics(&out)
        .iter()
        .filter(|v| v["step"].as_u64().unwrap() <= 5)
        .map(|v| format!("{v}\n"))
        .collect();
    std::fs::write(out.join("metrics.jsonl"), kept).unwrap();
    let mut args = RESUME_OPTS.to_vec();
    args.push("--resume");
    train_ok(LLAMA, &data, &out, &args);
    let steps: Vec<u64> = step_lines(&out)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=6).collect::<Vec<_>>(),
        "metrics.jsonl after --resume from checkpoint-3 should hold each step once \
         (lines past the checkpoint replaced, as HF Trainer's log_history)"
    );
    let evals: Vec<u64> = eval_losses(&out).iter().map(|e| e.0).collect();
    assert_eq!(evals, [0, 2, 4, 6], "eval lines after --resume");
}

#[test]
fn resume_with_different_options_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(10));
    let out = tmp.path().join("run");
    train_ok(LLAMA, &data, &out, &RESUME_OPTS);
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let mut args = RESUME_OPTS.to_vec();
    args.extend(["--resume", "--seed", "7"]);
    let err = train(LLAMA, &data, &out, &args).fails();
    assert_mentions(&err, &["--resume", "run.json"]);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before,
        "a refused resume must not touch the run"
    );
}

#[test]
fn resume_without_checkpoints_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(4));
    let opts = ["--max-steps", "2", "--batch-size", "2"];
    // A finished run without --save-every has nothing to resume from.
    let out = tmp.path().join("run");
    train_ok(LLAMA, &data, &out, &opts);
    let err = train(LLAMA, &data, &out, &[&opts[..], &["--resume"]].concat()).fails();
    assert_mentions(&err, &["--resume", "checkpoint", "--save-every", &s(&out)]);
    // An empty --out has no run at all.
    let empty = tmp.path().join("empty");
    let err = train(LLAMA, &data, &empty, &[&opts[..], &["--resume"]].concat()).fails();
    assert_mentions(&err, &["--resume", &s(&empty)]);
}

/// Issue 14: two runs on one --out both "succeeded" and cut metrics.jsonl short. While a run
/// holds the directory (here the test holds its lock, through the library function `kaizen
/// train` uses), a second run, fresh or --resume, is refused with one line naming the directory
/// and touches nothing. Once the lock is released, a run proceeds and first removes what a
/// killed run left: a half-written checkpoint, temporary files, a chart being drawn.
#[test]
fn a_second_run_on_the_same_out_is_refused_while_the_first_holds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(10));
    let out = tmp.path().join("run");
    train_ok(LLAMA, &data, &out, &RESUME_OPTS);
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let lock = kaizen::train::out_dir::lock(&out).unwrap();
    let mut resume = RESUME_OPTS.to_vec();
    resume.push("--resume");
    let overwrite = [&RESUME_OPTS[..], &["--overwrite"]].concat();
    for args in [&resume, &overwrite] {
        let err = train(LLAMA, &data, &out, args).fails();
        assert_mentions(&err, &[&s(&out), "another kaizen run"]);
    }
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
        metrics_before,
        "a refused run must not touch the run in --out"
    );
    // As if the holder had been killed mid-save: its leftovers stay until the next run.
    std::fs::create_dir(out.join(".checkpoint-6.tmp")).unwrap();
    for f in [
        ".checkpoint-6.tmp/adapter_model.safetensors",
        ".loss.png.4242.tmp.png",
        "metrics.jsonl.tmp",
        "checkpoint-3/trainer_state.json.tmp",
    ] {
        std::fs::write(out.join(f), b"partial").unwrap();
    }
    drop(lock);
    train_ok(LLAMA, &data, &out, &resume);
    for f in [
        ".checkpoint-6.tmp",
        ".loss.png.4242.tmp.png",
        "metrics.jsonl.tmp",
        "checkpoint-3/trainer_state.json.tmp",
    ] {
        assert!(!out.join(f).exists(), "{f} left behind");
    }
    assert!(out.join("checkpoint-3/trainer_state.json").is_file());
}

/// Issue 14: `--out FILE` said "Not a directory (os error 20)" without the path.
#[test]
fn out_that_is_a_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(4));
    let file = tmp.path().join("run.txt");
    std::fs::write(&file, b"keep me").unwrap();
    for out in [file.clone(), file.join("run")] {
        let err = train(LLAMA, &data, &out, &["--max-steps", "1"]).fails();
        assert_mentions(&err, &[&s(&out), "--out"]);
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

// ---------------------------------------------------------------------------------------------
// (5) --config run.toml

/// A TOML basic string (paths here hold no quotes or control characters).
fn toml_str(p: &Path) -> String {
    format!("\"{}\"", s(p).replace('\\', "\\\\"))
}

fn write_config(dir: &Path, model: &str, data: &Path, extra: &str) -> PathBuf {
    let path = dir.join("run.toml");
    let text = format!(
        "model = {}\ndata = {}\n{extra}",
        toml_str(&model_path(model)),
        toml_str(data)
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn config_file_gives_the_same_run_as_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(8));
    let config = write_config(
        tmp.path(),
        LLAMA,
        &data,
        "r = 4\nlora_alpha = 16\ntarget_modules = \"q_proj,k_proj\"\nlr = 1e-3\n\
         lr_schedule = \"cosine\"\nwarmup_steps = 1\nbatch_size = 2\ngrad_accum = 2\n\
         max_steps = 3\nval_split = 0.25\ntemplate = \"alpaca\"\nseed = 3\n",
    );
    let by_file = tmp.path().join("by-file");
    kaizen(["train", "--config", &s(&config), "--out", &s(&by_file)]).ok();
    let by_flags = tmp.path().join("by-flags");
    train_ok(
        LLAMA,
        &data,
        &by_flags,
        &[
            "--r",
            "4",
            "--lora-alpha",
            "16",
            "--target-modules",
            "q_proj,k_proj",
            "--lr",
            "1e-3",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "1",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--max-steps",
            "3",
            "--val-split",
            "0.25",
            "--template",
            "alpaca",
            "--seed",
            "3",
        ],
    );
    assert_eq!(
        read_json(&by_file.join("run.json")),
        read_json(&by_flags.join("run.json")),
        "run.json of --config vs flags"
    );
    assert!(
        std::fs::read(by_file.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(by_flags.join("adapter_model.safetensors")).unwrap(),
        "the adapters of --config and of the same flags differ"
    );
    let run = read_json(&by_file.join("run.json"));
    assert_eq!(run["lr_schedule"], "cosine");
    assert_eq!(run["grad_accum"], 2);
    assert_eq!(run["adapter"]["r"], 4);
}

#[test]
fn flags_override_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(4));
    let other = write_rows(tmp.path(), "other.jsonl", &completion_rows(6));
    let config = write_config(
        tmp.path(),
        LLAMA,
        &data,
        "r = 4\nlr = 1e-3\nmax_steps = 2\nbatch_size = 2\n",
    );
    let out = tmp.path().join("run");
    kaizen([
        "train",
        "--config",
        &s(&config),
        "--out",
        &s(&out),
        "--r",
        "2",
        "--data",
        &s(&other),
    ])
    .ok();
    assert_eq!(
        adapter_config(&out)["r"].as_u64(),
        Some(2),
        "--r wins over r"
    );
    let run = read_json(&out.join("run.json"));
    assert_eq!(
        run["data"].as_str(),
        Some(s(&other).as_str()),
        "--data wins"
    );
    assert_eq!(run["lr"].as_f64(), Some(1e-3), "lr from the file");
    assert_eq!(run["max_steps"], 2, "max_steps from the file");
    assert_peft_adapter(LLAMA, &out, 2, &target_list(&adapter_config(&out)));
}

#[test]
fn unknown_config_key_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(4));
    let config = write_config(tmp.path(), LLAMA, &data, "r = 4\nlearning_rate = 1e-3\n");
    let out = tmp.path().join("run");
    let err = kaizen(["train", "--config", &s(&config), "--out", &s(&out)]).fails();
    assert_mentions(&err, &["run.toml", "learning_rate"]);
    assert!(!out.exists(), "a bad config must not create --out");
}

// ---------------------------------------------------------------------------------------------
// (6) --init-adapter

#[test]
fn init_adapter_continues_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(10));
    let init = adapter_path(LLAMA);
    let opts = [
        "--val-split",
        "0.2",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
    ];
    let out = tmp.path().join("continued");
    train_ok(
        LLAMA,
        &data,
        &out,
        &[&opts[..], &["--init-adapter", &s(&init)]].concat(),
    );
    let fresh = tmp.path().join("fresh");
    train_ok(LLAMA, &data, &fresh, &opts);

    let cfg = adapter_config(&out);
    let peft_cfg = read_json(&init.join("adapter_config.json"));
    assert_eq!(cfg["r"].as_u64(), Some(4), "r of the PEFT adapter: {cfg}");
    assert_eq!(
        cfg["lora_alpha"].as_f64(),
        Some(8.0),
        "alpha of the PEFT adapter: {cfg}"
    );
    for key in [
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "use_rslora",
    ] {
        assert_eq!(cfg[key], peft_cfg[key], "{key} preserved");
    }
    // Same layers (PEFT's short names or their resolved paths).
    for t in target_list(&cfg) {
        assert!(
            target_list(&peft_cfg)
                .iter()
                .any(|p| t == *p || t.ends_with(&format!(".{p}"))),
            "target {t} is not one of the PEFT adapter's {:?}",
            peft_cfg["target_modules"]
        );
    }
    // Same tensors, moved by training.
    let before = read_safetensors(&init.join("adapter_model.safetensors"));
    let after = assert_peft_adapter(LLAMA, &out, 4, &target_list(&cfg));
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    assert!(
        before
            .iter()
            .any(|(k, t)| t.shape == after[k].shape && f32_bits(t) != f32_bits(&after[k])),
        "training did not change the initial adapter"
    );
    // The run starts from the adapter, not from a fresh (no-op) LoRA: the step-0 held-out
    // loss differs from the fresh run's, which is the base model's.
    let (e_init, e_fresh) = (eval_losses(&out)[0], eval_losses(&fresh)[0]);
    assert_eq!((e_init.0, e_fresh.0), (0, 0));
    assert!(
        (e_init.1 - e_fresh.1).abs() > 1e-4 * e_fresh.1,
        "step-0 eval loss with --init-adapter {} equals the fresh run's {}",
        e_init.1,
        e_fresh.1
    );
}

#[test]
fn init_adapter_with_r_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(4));
    let out = tmp.path().join("run");
    let init = s(&adapter_path(LLAMA));
    for extra in [
        ["--r", "8"],
        ["--lora-alpha", "4"],
        ["--target-modules", "q_proj"],
    ] {
        let err = train(
            LLAMA,
            &data,
            &out,
            &[
                &["--init-adapter", init.as_str(), "--max-steps", "1"][..],
                &extra,
            ]
            .concat(),
        )
        .fails();
        assert_mentions(&err, &["--init-adapter", extra[0]]);
        assert!(
            !out.exists(),
            "{extra:?}: a refused run must not create --out"
        );
    }
}

/// `use_dora = true` (TOML; the flag is `--use-dora`): PEFT's DoRA file (A, B and a magnitude per
/// output row, saved without `.weight`), shown by inspect, and `--init-adapter` continues it from
/// where it stopped (its step-0 held-out loss is the first run's last).
#[test]
fn dora_writes_peft_magnitudes_and_init_adapter_continues_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(10));
    let opts = [
        "--val-split",
        "0.2",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
    ];
    let toml = "r = 4\ntarget_modules = \"q_proj,v_proj\"\nuse_dora = true\nlr = 0.05\n";
    let config = write_config(tmp.path(), LLAMA, &data, toml);
    let out = tmp.path().join("dora");
    kaizen(
        [
            &["train", "--config", &s(&config), "--out", &s(&out)][..],
            &opts[..],
        ]
        .concat(),
    )
    .ok();
    let cfg = adapter_config(&out);
    assert_eq!(cfg["use_dora"], json!(true), "{cfg}");
    let targets = target_list(&cfg);
    assert_eq!(targets.len(), 2 * num_layers(LLAMA) as usize);
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    assert_eq!(
        tensors.len(),
        3 * targets.len(),
        "A, B and a magnitude per layer"
    );
    for t in &targets {
        let w = base_weight_shape(LLAMA, t);
        let shape = |k: &str| tensors[&format!("base_model.model.{t}.{k}")].shape.clone();
        assert_eq!(shape("lora_A.weight"), [4, w[1]], "{t}");
        assert_eq!(shape("lora_B.weight"), [w[0], 4], "{t}");
        assert_eq!(
            shape("lora_magnitude_vector"),
            [w[0]],
            "{t}: (out,), no .weight"
        );
    }
    let adapter = s(&out);
    let shown = kaizen([
        "inspect",
        "--model",
        &s(&model_path(LLAMA)),
        "--adapter",
        &adapter,
    ])
    .ok();
    assert!(shown.contains("LORA (DoRA) on 4 layers"), "{shown}");

    let next = tmp.path().join("continued");
    train_ok(
        LLAMA,
        &data,
        &next,
        &[&opts[..], &["--init-adapter", &adapter]].concat(),
    );
    assert_eq!(adapter_config(&next)["use_dora"], json!(true));
    let after = read_safetensors(&next.join("adapter_model.safetensors"));
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        tensors.keys().collect::<Vec<_>>()
    );
    for (k, t) in &tensors {
        assert_ne!(f32_bits(t), f32_bits(&after[k]), "{k}: not trained further");
    }
    let (end, start) = (*eval_losses(&out).last().unwrap(), eval_losses(&next)[0]);
    assert_eq!((end.0, start.0), (2, 0));
    assert_close(
        "held-out loss where the DoRA run stopped",
        start.1,
        end.1,
        1e-6,
    );

    assert_train_fails(
        LLAMA,
        None,
        &["--method", "ia3", "--use-dora"],
        &["--use-dora", "lora"],
    );
    let err = train(
        LLAMA,
        &data,
        &tmp.path().join("x"),
        &["--init-adapter", &adapter, "--use-dora"],
    )
    .fails();
    assert_mentions(&err, &["--init-adapter", "--use-dora"]);
}

// ---------------------------------------------------------------------------------------------
// (7) gradient accumulation: the loss of a step is the token-weighted mean

/// Loss and grad norm of step 1 (SGD, no shuffling) and the adapter after it.
fn one_step(
    model: &str,
    data: &Path,
    out: &Path,
    batch: &str,
    accum: &str,
) -> (f64, f64, BTreeMap<String, TensorInfo>) {
    train_ok(
        model,
        data,
        out,
        &[
            "--max-steps",
            "1",
            "--no-shuffle",
            "--optimizer",
            "sgd",
            "--lr",
            "0.5",
            "--max-grad-norm",
            "0",
            "--batch-size",
            batch,
            "--grad-accum",
            accum,
        ],
    );
    let steps = step_lines(out);
    assert_eq!(steps.len(), 1);
    (
        f64_of(&steps[0]["loss"]),
        f64_of(&steps[0]["grad_norm"]),
        read_safetensors(&out.join("adapter_model.safetensors")),
    )
}

#[test]
fn grad_accum_gives_the_token_weighted_mean() {
    const TOL: f64 = 1e-5;
    let tmp = tempfile::tempdir().unwrap();
    // Two completions with very different numbers of label tokens.
    let short = json!({"prompt": "Q: colour of the sky?", "completion": " A: blue"});
    let long = json!({"prompt": "Q: fruits?", "completion":
        " A: apple, banana, cherry, and also a few grapes from the garden behind the house"});
    let both = write_rows(tmp.path(), "both.jsonl", &[short.clone(), long.clone()]);
    for model in [LLAMA, NEOX] {
        let dir = tmp.path().join(model);
        let (l_acc, g_acc, w_acc) = one_step(model, &both, &dir.join("accum"), "1", "2");
        let (l_big, g_big, w_big) = one_step(model, &both, &dir.join("batch"), "2", "1");
        assert_close(&format!("{model}: step loss"), l_acc, l_big, TOL);
        assert_close(&format!("{model}: grad norm"), g_acc, g_big, TOL);
        for (k, a) in &w_acc {
            let b = &w_big[k];
            let scale = b.values.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            let diff = a
                .values
                .iter()
                .zip(&b.values)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                (diff / scale) as f64 <= 1e-4,
                "{model}: {k} after one SGD step differs (max |diff| {diff}, max |value| {scale})"
            );
        }
        // The test can tell: the mean of the two per-example means is another number.
        let one = |row: &Value, name: &str| {
            let data = write_rows(&dir, &format!("{name}.jsonl"), std::slice::from_ref(row));
            one_step(model, &data, &dir.join(name), "1", "1").0
        };
        let mean_of_means = 0.5 * (one(&short, "short") + one(&long, "long"));
        assert!(
            (mean_of_means - l_big).abs() > 1e-3 * l_big,
            "{model}: the examples' label counts are too alike to test weighting \
             ({mean_of_means} vs {l_big})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (8) bad input: one `error:` line, nothing written

/// Runs a small training command (`--max-steps 1 --batch-size 2` plus `extra`, which must not
/// repeat those) on `data` (default: valid instruction rows) and expects a clean failure that
/// mentions `needles` and leaves --out uncreated.
fn assert_train_fails(model: &str, data: Option<&Path>, extra: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let default_data;
    let data = match data {
        Some(d) => d,
        None => {
            default_data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(4));
            &default_data
        }
    };
    let out = tmp.path().join("run");
    let mut args = vec!["--max-steps", "1", "--batch-size", "2"];
    args.extend(extra);
    let err = train(model, data, &out, &args).fails();
    assert_mentions(&err, needles);
    assert!(
        !out.exists(),
        "{extra:?}: a refused run must not create --out ({err})"
    );
}

#[test]
#[cfg(not(feature = "mpi"))]
fn several_mpi_ranks_need_the_mpi_build() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(4));
    let out = tmp.path().join("run");
    let args = train_args(LLAMA, &data, &out, &["--max-steps", "1"]);
    let err = kaizen_env(args, &[("OMPI_COMM_WORLD_SIZE", "2")]).fails();
    assert_mentions(&err, &["one of 2 MPI ranks", "--features kaizen-cli/mpi"]);
    assert!(!out.exists());
}

#[test]
fn unknown_method() {
    assert_train_fails(
        LLAMA,
        None,
        &["--method", "dora"],
        &["--method", "dora", "lora"],
    );
}

#[test]
fn rank_zero() {
    assert_train_fails(LLAMA, None, &["--r", "0"], &["rank", "at least 1"]);
}

#[test]
fn lora_alpha_zero() {
    assert_train_fails(LLAMA, None, &["--lora-alpha", "0"], &["lora_alpha", "0"]);
}

#[test]
fn target_modules_matching_nothing_lists_real_layers() {
    assert_train_fails(
        LLAMA,
        None,
        &["--target-modules", "nope"],
        &[
            "nope",
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.down_proj",
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let short = write_rows(tmp.path(), "short.jsonl", &completion_rows(4));
    assert_train_fails(
        NEOX,
        Some(&short),
        &["--target-modules", "nope"],
        &["nope", "gpt_neox.layers.0.attention.query_key_value"],
    );
}

#[test]
fn unknown_lr_schedule() {
    assert_train_fails(
        LLAMA,
        None,
        &["--lr-schedule", "bogus"],
        &["bogus", "schedule", "constant", "linear", "cosine"],
    );
}

#[test]
fn unknown_optimizer() {
    assert_train_fails(
        LLAMA,
        None,
        &["--optimizer", "bogus"],
        &["--optimizer", "bogus", "adamw", "sgd"],
    );
}

#[test]
fn unknown_template() {
    assert_train_fails(
        LLAMA,
        None,
        &["--template", "bogus"],
        &["template", "bogus", "alpaca", "chat"],
    );
}

#[test]
fn chat_template_on_a_model_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "chat.jsonl", &chat_rows(2, false));
    assert_train_fails(
        NEOX,
        Some(&data),
        &["--template", "chat"],
        &["chat template"],
    );
}

#[test]
fn system_turn_under_the_rinna_template_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "chat.jsonl", &chat_rows(2, true));
    assert_train_fails(
        NEOX,
        Some(&data),
        &["--template", "rinna"],
        &[&format!("{}:1", s(&data)), "system", "rinna"],
    );
}

#[test]
fn val_split_out_of_range() {
    assert_train_fails(LLAMA, None, &["--val-split", "1.5"], &["1.5", "validation"]);
}

#[test]
fn zero_batch_size_and_steps() {
    assert_train_fails(LLAMA, None, &["--grad-accum", "0"], &["--grad-accum"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(4));
    let out = tmp.path().join("run");
    let err = train(LLAMA, &data, &out, &["--max-steps", "0"]).fails();
    assert_mentions(&err, &["--max-steps"]);
    let err = train(LLAMA, &data, &out, &["--batch-size", "0"]).fails();
    assert_mentions(&err, &["--batch-size"]);
    assert!(!out.exists());
}

#[test]
fn jsonl_line_without_usable_fields_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = instruction_rows(2);
    rows.push(json!({"question": "where?", "answer": "here"}));
    let data = write_rows(tmp.path(), "bad.jsonl", &rows);
    assert_train_fails(
        LLAMA,
        Some(&data),
        &[],
        &[&format!("{}:3", s(&data)), "question", "\"text\""],
    );
}

#[test]
fn jsonl_field_of_the_wrong_type_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = [
        json!({"text": "fine"}),
        json!({"prompt": "p", "completion": 5}),
    ];
    let data = write_rows(tmp.path(), "bad.jsonl", &rows);
    assert_train_fails(
        LLAMA,
        Some(&data),
        &[],
        &[&format!("{}:2", s(&data)), "completion"],
    );
}

#[test]
fn jsonl_line_that_is_not_json_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": \"cut\n").unwrap();
    assert_train_fails(LLAMA, Some(&data), &[], &[&format!("{}:2", s(&data))]);
}

#[test]
fn empty_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("empty.jsonl");
    std::fs::write(&data, "\n  \n").unwrap();
    assert_train_fails(LLAMA, Some(&data), &[], &[&s(&data), "empty"]);
    let missing = tmp.path().join("missing.jsonl");
    assert_train_fails(LLAMA, Some(&missing), &[], &[&s(&missing)]);
}

#[test]
fn responses_cut_away_by_max_len() {
    let tmp = tempfile::tempdir().unwrap();
    let rows =
        vec![json!({"prompt": "a long prompt that fills the window", "completion": " x"}); 3];
    let data = write_rows(tmp.path(), "long.jsonl", &rows);
    assert_train_fails(LLAMA, Some(&data), &["--max-len", "3"], &[&s(&data), "max"]);
}

#[test]
fn out_with_another_run_needs_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(6));
    let out = tmp.path().join("run");
    let first = ["--max-steps", "4", "--batch-size", "2", "--save-every", "2"];
    train_ok(LLAMA, &data, &out, &first);
    assert!(out.join("checkpoint-2").is_dir());
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();

    let second = ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-3"];
    let err = train(LLAMA, &data, &out, &second).fails();
    assert_mentions(&err, &[&s(&out), "--overwrite", "--resume"]);
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before,
        "a refused run must leave the old one alone"
    );
    assert_eq!(read_json(&out.join("run.json"))["max_steps"], 4);

    train_ok(
        LLAMA,
        &data,
        &out,
        &[&second[..], &["--overwrite"]].concat(),
    );
    let run = read_json(&out.join("run.json"));
    assert_eq!(run["max_steps"], 2, "run.json of the new run");
    assert_eq!(run["lr"].as_f64(), Some(1e-3));
    assert_eq!(
        step_lines(&out).len(),
        2,
        "metrics.jsonl of the new run only"
    );
    assert!(
        !out.join("checkpoint-2").exists(),
        "--overwrite should drop the old run's checkpoints"
    );
    assert_ne!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before,
        "the new adapter"
    );
}

#[test]
fn max_len_beyond_the_context_warns_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(4));
    let out = tmp.path().join("run");
    let ctx = read_json(&fixture_dir(NEOX).join("config.json"))["max_position_embeddings"]
        .as_u64()
        .unwrap();
    let run = train(
        NEOX,
        &data,
        &out,
        &[
            "--max-len",
            "100000",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
        ],
    );
    let warning = run
        .stderr
        .lines()
        .find(|l| l.starts_with("warning: ") && l.contains("100000"))
        .unwrap_or_else(|| panic!("no warning about --max-len 100000:\n{}", run.stderr))
        .to_string();
    assert_mentions(&warning, &["context", &ctx.to_string()]);
    run.ok();
    assert_eq!(
        read_json(&out.join("run.json"))["max_len"].as_u64(),
        Some(ctx),
        "max_len is cut to the context"
    );
    assert_eq!(step_lines(&out).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// other methods: IA3, prompt tuning, P-tuning, prefix tuning

/// IA3, VeRA, the prompt methods and bottleneck adapters train, lower the held-out loss, write
/// PEFT files of their own type, and serve `eval` / `generate` through `--adapter`; IA3 and VeRA
/// merge, the others refuse to.
#[test]
fn ia3_and_prompt_methods_train_evaluate_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(12));
    let cases: [(&str, &[&str], &str, &str); 9] = [
        (
            "prefix",
            &["--method", "prefix", "--num-virtual-tokens", "3"],
            "PREFIX_TUNING",
            "prompt_embeddings",
        ),
        (
            "prefix-projection",
            &[
                "--method",
                "prefix",
                "--num-virtual-tokens",
                "3",
                "--prefix-projection",
                "--encoder-hidden-size",
                "8",
            ],
            "PREFIX_TUNING",
            "prompt_embeddings",
        ),
        (
            "p-tuning",
            &[
                "--method",
                "p-tuning",
                "--num-virtual-tokens",
                "3",
                "--encoder-hidden-size",
                "8",
            ],
            "P_TUNING",
            "prompt_embeddings",
        ),
        (
            "p-tuning-lstm",
            &[
                "--method",
                "p-tuning",
                "--encoder-reparameterization-type",
                "lstm",
                "--num-virtual-tokens",
                "3",
                "--encoder-hidden-size",
                "8",
            ],
            "P_TUNING",
            "prompt_embeddings",
        ),
        ("ia3", &["--method", "ia3"], "IA3", ".ia3_l"),
        (
            "vera",
            &["--method", "vera", "--r", "16"],
            "VERA",
            ".vera_lambda_",
        ),
        (
            "bottleneck-houlsby",
            &["--method", "adapter", "--adapter-type", "houlsby"],
            "BOTTLENECK",
            ".adapter_down.",
        ),
        (
            "bottleneck-pfeiffer",
            &[
                "--method",
                "adapter",
                "--adapter-type",
                "pfeiffer",
                "--reduction-factor",
                "8",
                "--non-linearity",
                "gelu",
            ],
            "BOTTLENECK",
            ".adapter_down.",
        ),
        (
            "prompt",
            &["--method", "prompt", "--num-virtual-tokens", "3"],
            "PROMPT_TUNING",
            "prompt_embeddings",
        ),
    ];
    for (name, flags, peft_type, key) in cases {
        let out = tmp.path().join(name);
        let mut extra = vec![
            "--max-steps",
            "8",
            "--batch-size",
            "4",
            "--lr",
            "5e-2",
            "--val-split",
            "0.25",
        ];
        extra.extend(flags);
        let stdout = train_ok(LLAMA, &data, &out, &extra);
        assert!(stdout.contains("held-out loss"), "{name}: {stdout}");
        let cfg = read_json(&out.join("adapter_config.json"));
        assert_eq!(cfg["peft_type"], peft_type, "{name}");
        let evals: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|v| v["eval_loss"].as_f64())
            .collect();
        assert!(
            evals.last().unwrap() < &evals[0],
            "{name}: held-out loss did not drop: {evals:?}"
        );
        let header = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        assert!(
            String::from_utf8_lossy(&header[..200.min(header.len())]).contains(key),
            "{name}: no {key} tensor"
        );
        let model = s(&model_path(LLAMA));
        let adapter = s(&out);
        kaizen([
            "eval",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--data",
            &s(&data),
            "--json",
        ])
        .ok();
        kaizen([
            "generate",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--prompt",
            "the cat",
            "--greedy",
            "--max-new-tokens",
            "3",
        ])
        .ok();
        let merged = s(&tmp.path().join(format!("{name}-merged")));
        let run = kaizen([
            "merge",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--out",
            &merged,
        ]);
        if name == "ia3" || name == "vera" {
            run.ok();
        } else if name.starts_with("bottleneck") {
            assert_mentions(
                &run.fails(),
                &["bottleneck", "cannot be merged", "--adapter"],
            );
        } else {
            assert_mentions(&run.fails(), &["cannot be merged"]);
        }
    }
}

/// Every method on every newer architecture (QK-norm, sandwich norms, sliding windows shorter
/// than the texts, soft-caps, fused projections): training lowers the held-out loss, the KV-cached
/// `generate --adapter` runs, and a merged LoRA, LoHa or LoKr scores as base + adapter.
#[test]
fn every_method_trains_on_every_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(12));
    let methods: [(&str, &[&str]); 16] = [
        ("lora", &["--target-modules", "all-linear", "--lr", "3e-2"]),
        ("vera", &["--method", "vera", "--r", "16", "--lr", "3e-2"]),
        ("loha", &["--method", "loha", "--lr", "3e-2"]),
        (
            "lokr",
            &["--method", "lokr", "--decompose-both", "--lr", "3e-2"],
        ),
        (
            "adalora",
            &[
                "--method",
                "adalora",
                "--init-r",
                "4",
                "--target-r",
                "2",
                "--lr",
                "3e-2",
            ],
        ),
        (
            "ln-tuning",
            &[
                "--method",
                "ln-tuning",
                "--target-modules",
                "input_layernorm,post_attention_layernorm",
                "--lr",
                "3e-2",
            ],
        ),
        ("dora", &["--use-dora", "--lr", "3e-2"]),
        ("ia3", &["--method", "ia3", "--lr", "3e-2"]),
        (
            "oft",
            &["--method", "oft", "--oft-block-size", "8", "--lr", "3e-2"],
        ),
        (
            "boft",
            &[
                "--method",
                "boft",
                "--boft-block-size",
                "4",
                "--boft-n-butterfly-factor",
                "2",
                "--lr",
                "3e-2",
            ],
        ),
        (
            "prompt",
            &[
                "--method",
                "prompt",
                "--num-virtual-tokens",
                "3",
                "--lr",
                "3e-2",
            ],
        ),
        (
            "p-tuning",
            &[
                "--method",
                "p-tuning",
                "--num-virtual-tokens",
                "3",
                "--encoder-hidden-size",
                "8",
            ],
        ),
        (
            "prefix",
            &[
                "--method",
                "prefix",
                "--num-virtual-tokens",
                "3",
                "--lr",
                "3e-2",
            ],
        ),
        ("adapter", &["--method", "adapter", "--lr", "3e-2"]),
        ("full", &["--method", "full", "--lr", "3e-3"]),
        (
            "freeze",
            &[
                "--method",
                "freeze",
                "--freeze-trainable-layers",
                "1",
                "--lr",
                "3e-3",
            ],
        ),
    ];
    for arch in ["gemma3", "gemma2", "qwen2", "qwen3", "mistral", "phi3"] {
        for (method, flags) in methods {
            let name = format!("{arch}-{method}");
            let out = tmp.path().join(&name);
            let mut extra = vec![
                "--max-steps",
                "6",
                "--batch-size",
                "4",
                "--val-split",
                "0.25",
            ];
            extra.extend(flags);
            train_ok(arch, &data, &out, &extra);
            let evals: Vec<f64> = eval_losses(&out).into_iter().map(|e| e.1).collect();
            assert!(
                evals.last().unwrap() < &evals[0],
                "{name}: held-out loss did not drop: {evals:?}"
            );
            let (model, adapter) = match method {
                "full" | "freeze" => (out.clone(), None),
                _ => (model_path(arch), Some(out.as_path())),
            };
            assert_eq!(greedy_ids(&model, adapter).len(), 8, "{name}");
            if matches!(method, "lora" | "loha" | "lokr") {
                let merged = tmp.path().join(format!("{name}-merged"));
                merged_scores_as_adapter(arch, &out, &merged, &data, 1e-4);
            }
        }
    }
}

#[test]
fn virtual_tokens_none_or_beyond_the_context() {
    for method in ["prompt", "p-tuning", "prefix"] {
        for n in ["0", "100000"] {
            assert_train_fails(
                LLAMA,
                None,
                &["--method", method, "--num-virtual-tokens", n],
                &["num_virtual_tokens", n, "context"],
            );
        }
    }
}

/// Recomputing activations in backward changes memory, not results: the same adapter bits,
/// with LoRA dropout (the recomputation replays the RNG) and with a prefix.
#[test]
fn gradient_checkpointing_gives_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(8));
    let methods: [&[&str]; 2] = [
        &["--lora-dropout", "0.2"],
        &["--method", "prefix", "--num-virtual-tokens", "2"],
    ];
    for (i, flags) in methods.iter().enumerate() {
        let opts = [&["--max-steps", "2", "--batch-size", "4"], *flags].concat();
        let plain = tmp.path().join(format!("plain-{i}"));
        let ckpt = tmp.path().join(format!("ckpt-{i}"));
        train_ok(LLAMA, &data, &plain, &opts);
        train_ok(
            LLAMA,
            &data,
            &ckpt,
            &[&opts[..], &["--gradient-checkpointing"]].concat(),
        );
        let a = std::fs::read(plain.join("adapter_model.safetensors")).unwrap();
        let b = std::fs::read(ckpt.join("adapter_model.safetensors")).unwrap();
        assert!(a == b, "{flags:?}: checkpointing changed the adapter");
        assert_eq!(
            read_json(&ckpt.join("run.json"))["gradient_checkpointing"],
            true
        );
    }
}

/// `--init-adapter` continues kaizen's prefix adapters (with a projection: through the encoder
/// weights kept beside PEFT's file) and bottleneck adapters: the continued run starts where the
/// first one ended.
#[test]
fn init_adapter_continues_a_prefix_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(10));
    let opts = [
        "--val-split",
        "0.2",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "5e-2",
    ];
    let methods: [&[&str]; 3] = [
        &["--method", "prefix", "--num-virtual-tokens", "2"],
        &[
            "--method",
            "prefix",
            "--num-virtual-tokens",
            "2",
            "--prefix-projection",
        ],
        &[
            "--method",
            "adapter",
            "--adapter-type",
            "pfeiffer",
            "--bottleneck-size",
            "3",
            "--non-linearity",
            "swish",
        ],
    ];
    for (i, flags) in methods.iter().enumerate() {
        let first = tmp.path().join(format!("first-{i}"));
        train_ok(LLAMA, &data, &first, &[&opts[..], flags].concat());
        let next = tmp.path().join(format!("next-{i}"));
        train_ok(
            LLAMA,
            &data,
            &next,
            &[&opts[..], &["--init-adapter", &s(&first)]].concat(),
        );
        let (ended, started) = (*eval_losses(&first).last().unwrap(), eval_losses(&next)[0]);
        assert!(
            (ended.1 - started.1).abs() <= 1e-6 * ended.1,
            "{flags:?}: the continued run starts at {started:?}, the first ended at {ended:?}"
        );
        assert_eq!(adapter_config(&next), adapter_config(&first), "{flags:?}");
    }
}

/// Bottleneck adapters: a width that rounds to zero, an unknown placement or non-linearity, and
/// their flags with another method are refused before anything is written.
#[test]
fn bad_bottleneck_options() {
    let adapter = |extra: &[&'static str]| [&["--method", "adapter"][..], extra].concat();
    assert_train_fails(
        LLAMA,
        None,
        &adapter(&["--reduction-factor", "1000"]),
        &["reduction_factor 1000", "zero-width bottleneck"],
    );
    assert_train_fails(
        LLAMA,
        None,
        &adapter(&["--adapter-type", "parallel"]),
        &["--adapter-type", "parallel", "houlsby", "pfeiffer"],
    );
    assert_train_fails(
        LLAMA,
        None,
        &adapter(&["--non-linearity", "tanh"]),
        &["tanh", "relu", "gelu", "swish"],
    );
    assert_train_fails(
        LLAMA,
        None,
        &["--method", "ia3", "--reduction-factor", "4"],
        &["--reduction-factor", "adapter"],
    );
}

#[test]
fn lora_flags_with_other_methods() {
    assert_train_fails(
        LLAMA,
        None,
        &["--method", "ia3", "--r", "4"],
        &["--r", "lora"],
    );
    assert_train_fails(
        LLAMA,
        None,
        &["--method", "lora", "--num-virtual-tokens", "4"],
        &["--num-virtual-tokens", "prompt"],
    );
}

#[test]
fn text_init_without_text() {
    assert_train_fails(
        LLAMA,
        None,
        &["--method", "prompt", "--prompt-tuning-init", "text"],
        &["--prompt-tuning-init-text"],
    );
}

/// PEFT saves P-tuning's and the prefix projection's output, not the encoder: inference only.
#[test]
fn peft_encoder_output_files_are_inference_only() {
    for (fixture, model, what) in [
        ("p_tuning/llama-gqa-tied", LLAMA, "P-tuning"),
        (
            "prefix_tuning/neox-par-bpe",
            "neox-par-bpe",
            "prefix-projection",
        ),
    ] {
        let adapter = s(&repo_root().join(format!("tests/fixtures/peft/{fixture}/adapter")));
        assert_train_fails(
            model,
            None,
            &["--init-adapter", &adapter],
            &[what, "inference"],
        );
    }
}

/// `kaizen train --method p-tuning` with `--encoder-reparameterization-type ty` and `extra`.
fn p_tuning_opts<'a>(ty: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut opts = vec![
        "--method",
        "p-tuning",
        "--encoder-reparameterization-type",
        ty,
        "--num-virtual-tokens",
        "3",
        "--encoder-hidden-size",
        "8",
    ];
    opts.extend(P_TUNING_RUN);
    opts.extend(extra);
    opts
}

const P_TUNING_RUN: [&str; 10] = [
    "--val-split",
    "0.2",
    "--max-steps",
    "2",
    "--batch-size",
    "4",
    "--lr",
    "5e-2",
    "--save-every",
    "1",
];

/// Both P-tuning encoders keep their weights beside PEFT's file under PEFT's names; from them
/// `--resume` reproduces the uninterrupted run and `--init-adapter` continues where it ended.
#[test]
fn p_tuning_encoders_resume_and_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(10));
    for (ty, name) in [
        ("MLP", "mlp_head.4.weight"),
        ("lstm", "lstm_head.weight_hh_l1_reverse"),
    ] {
        let out = tmp.path().join(ty);
        train_ok(LLAMA, &data, &out, &p_tuning_opts(ty, &[]));
        let cfg = adapter_config(&out);
        assert_eq!(cfg["encoder_reparameterization_type"], ty.to_uppercase());
        let encoder = read_safetensors(&out.join(ENCODER_FILE));
        assert!(
            encoder.contains_key(&format!("prompt_encoder.default.{name}")),
            "{ty}: {ENCODER_FILE} holds {:?}",
            encoder.keys()
        );
        // As if the run had died after checkpoint-1: --resume writes the same files.
        let files = ["adapter_model.safetensors", ENCODER_FILE];
        let whole: Vec<Vec<u8>> = files
            .iter()
            .map(|f| std::fs::read(out.join(f)).unwrap())
            .collect();
        for f in files.iter().chain(&["adapter_config.json"]) {
            std::fs::remove_file(out.join(f)).unwrap();
        }
        train_ok(LLAMA, &data, &out, &p_tuning_opts(ty, &["--resume"]));
        for (f, w) in files.iter().zip(&whole) {
            assert!(
                std::fs::read(out.join(f)).unwrap() == *w,
                "{ty}: {f} after --resume differs from the uninterrupted run's"
            );
        }
        let next = tmp.path().join(format!("{ty}-next"));
        let init = s(&out);
        train_ok(
            LLAMA,
            &data,
            &next,
            &[&P_TUNING_RUN[..], &["--init-adapter", &init]].concat(),
        );
        let (ended, started) = (*eval_losses(&out).last().unwrap(), eval_losses(&next)[0]);
        assert!(
            (ended.1 - started.1).abs() <= 1e-6 * ended.1,
            "{ty}: the continued run starts at {started:?}, the first ended at {ended:?}"
        );
        assert_eq!(adapter_config(&next), cfg, "{ty}");
    }
}

/// An encoder file lacking a tensor that adapter_config.json's encoder needs: --init-adapter
/// and --resume name the file and the tensor.
#[test]
fn p_tuning_encoder_file_lacking_a_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(10));
    let out = tmp.path().join("run");
    train_ok(LLAMA, &data, &out, &p_tuning_opts("LSTM", &[]));
    let key = "prompt_encoder.default.lstm_head.weight_ih_l1_reverse";
    for dir in [out.clone(), out.join("checkpoint-1")] {
        let file = dir.join(ENCODER_FILE);
        let mut tensors = read_safetensors(&file);
        tensors.remove(key).unwrap();
        write_safetensors(&file, &tensors);
    }
    let init = s(&out);
    assert_train_fails(
        LLAMA,
        Some(&data),
        &["--init-adapter", &init],
        &[ENCODER_FILE, key],
    );
    // The checkpoint is read after the run's summary lines: the error is the last line.
    let run = train(LLAMA, &data, &out, &p_tuning_opts("LSTM", &["--resume"]));
    assert!(run.code.is_some_and(|c| c != 0), "{}", run.stderr);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && !run.stderr.contains("panicked"),
        "{}",
        run.stderr
    );
    assert_mentions(last, &["checkpoint-1", ENCODER_FILE, key]);
}

// ---------------------------------------------------------------------------------------------
// full fine-tuning

/// `--method full` trains every weight and leaves an HF model directory that `eval` and
/// `generate` load as a model; the held-out loss drops, and `--resume` reproduces the
/// uninterrupted run's weights.
#[test]
fn full_fine_tuning_writes_a_model_directory_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(12));
    for model in [LLAMA, NEOX] {
        let opts = [
            "--method",
            "full",
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--val-split",
            "0.25",
            "--save-every",
            "2",
        ];
        let out = tmp.path().join(format!("full-{model}"));
        let stdout = train_ok(model, &data, &out, &opts);
        assert!(stdout.contains("held-out loss"), "{model}: {stdout}");
        let evals = eval_losses(&out);
        assert!(
            evals.last().unwrap().1 < evals[0].1,
            "{model}: held-out loss did not drop: {evals:?}"
        );
        for f in ["config.json", "model.safetensors"] {
            assert!(out.join(f).is_file(), "{model}: no {f}");
        }
        assert!(!out.join("adapter_config.json").exists());
        // Every weight moved (a tied head is stored once, as the embeddings).
        let before = read_safetensors(&model_path(model).join("model.safetensors"));
        let after = read_safetensors(&out.join("model.safetensors"));
        for (name, t) in &after {
            if let Some(b) = before.get(name) {
                assert!(f32_bits(b) != f32_bits(t), "{model}: {name} did not train");
            }
        }
        let base = eval_loss(&model_path(model), None, &data);
        let tuned = eval_loss(&out, None, &data);
        assert!(
            tuned < base,
            "{model}: eval of the written model {tuned} vs base {base}"
        );
        kaizen([
            "generate",
            "--model",
            &s(&out),
            "--prompt",
            "the cat",
            "--greedy",
            "--max-new-tokens",
            "3",
        ])
        .ok();
        // Resume from checkpoint-2 gives the same weights as the uninterrupted run.
        assert_resumes_to(model, &data, &opts, &out);
    }
}

/// A run of `opts` whose final model file is removed, then resumed from its last checkpoint,
/// writes the same model.safetensors, byte for byte, as the uninterrupted run in `out`.
fn assert_resumes_to(model: &str, data: &Path, opts: &[&str], out: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("cut");
    train_ok(model, data, &cut, opts);
    std::fs::remove_file(cut.join("model.safetensors")).unwrap();
    train_ok(model, data, &cut, &[opts, &["--resume"]].concat());
    let a = std::fs::read(out.join("model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("model.safetensors")).unwrap();
    assert!(a == b, "{model}: the resumed run differs");
}

/// `--method freeze` (LLaMA-Factory's freeze tuning) trains exactly the weights its options
/// choose and leaves an HF model directory; `--resume` reproduces the uninterrupted run; options
/// outside the model are one error naming the flag.
#[test]
fn freeze_tuning_trains_the_chosen_weights_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(12));
    let opts = [
        "--method",
        "freeze",
        "--freeze-trainable-layers",
        "-1",
        "--freeze-trainable-modules",
        "mlp",
        "--freeze-extra-modules",
        "norm",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
    ];
    let out = tmp.path().join("freeze");
    train_ok(LLAMA, &data, &out, &opts);
    let before = read_safetensors(&model_path(LLAMA).join("model.safetensors"));
    let after = read_safetensors(&out.join("model.safetensors"));
    assert_eq!(before.len(), after.len());
    for (name, t) in &after {
        // Layer 0's MLP, and (names match as substrings) every norm.
        let chosen = name.contains(".0.mlp") || name.contains("norm");
        let moved = f32_bits(&before[name]) != f32_bits(t);
        assert_eq!(moved, chosen, "{name}: moved {moved}, chosen {chosen}");
    }
    assert_resumes_to(LLAMA, &data, &opts, &out);
    for (flags, want) in [
        (
            &["--freeze-trainable-layers", "5"][..],
            &["--freeze-trainable-layers 5", "the model has 2 layers"][..],
        ),
        (
            &["--freeze-trainable-modules", "ffn"][..],
            &["--freeze-trainable-modules", "\"ffn\"", "mlp"][..],
        ),
    ] {
        assert_train_fails(
            LLAMA,
            None,
            &[&["--method", "freeze"][..], flags].concat(),
            want,
        );
    }
    assert_train_fails(
        LLAMA,
        None,
        &["--freeze-trainable-layers", "1"],
        &["--freeze-trainable-layers applies to --method freeze"],
    );
}

/// `--method ln-tuning` (PEFT's LN_TUNING) trains only the targeted norms (PEFT's defaults for
/// llama) and saves them under PEFT's keys; `merge` writes a model that scores as base + adapter;
/// GPT-NeoX, for which PEFT has no default, is asked to name its norms.
#[test]
fn ln_tuning_trains_the_norms_saves_peft_keys_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(12));
    let out = tmp.path().join("ln");
    let flags = [
        "--method",
        "ln-tuning",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
    ];
    train_ok(LLAMA, &data, &out, &flags);
    let config = read_json(&out.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LN_TUNING");
    let saved = read_safetensors(&out.join("adapter_model.safetensors"));
    let mut want: Vec<String> = ["0", "1"]
        .iter()
        .flat_map(|i| {
            ["input_layernorm", "post_attention_layernorm"]
                .map(|n| format!("base_model.model.model.layers.{i}.{n}.ln_tuning_layers.weight"))
        })
        .chain(["base_model.model.model.norm.ln_tuning_layers.weight".to_string()])
        .collect();
    want.sort();
    assert_eq!(saved.keys().cloned().collect::<Vec<_>>(), want);
    let with_adapter =
        merged_scores_as_adapter(LLAMA, &out, &tmp.path().join("merged"), &data, 1e-5);
    assert!(with_adapter < eval_loss(&model_path(LLAMA), None, &data));
    assert_train_fails(
        NEOX,
        None,
        &["--method", "ln-tuning"],
        &[
            "no default target_modules",
            "--target-modules",
            "input_layernorm",
        ],
    );
}

/// `--method vera` (PEFT's VERA) trains only the per-layer vectors and saves them with the
/// shared projections under PEFT's keys; a run resumed from its checkpoint (the projections come
/// back from the checkpoint's file) ends with the uninterrupted run's bytes; range errors name
/// the field.
#[test]
fn vera_saves_projections_resumes_and_checks_its_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &completion_rows(10));
    let opts = [
        &RESUME_OPTS[..],
        &[
            "--method",
            "vera",
            "--r",
            "16",
            "--vera-d-initial",
            "0.5",
            "--projection-prng-key",
            "3",
            "--target-modules",
            "q_proj,k_proj,down_proj",
        ],
    ]
    .concat();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    train_ok(LLAMA, &data, &whole, &opts);
    let config = read_json(&whole.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "VERA");
    assert_eq!(config["r"], 16);
    assert_eq!(config["d_initial"], 0.5);
    assert_eq!(config["projection_prng_key"], 3);
    assert_eq!(config["save_projection"], true);
    let saved = read_safetensors(&whole.join("adapter_model.safetensors"));
    // q_proj 64 -> 64, k_proj 64 -> 32, down_proj 128 -> 64: A (16, 128), B (64, 16)
    assert_eq!(saved["base_model.vera_A"].shape, [16, 128]);
    assert_eq!(saved["base_model.vera_B"].shape, [64, 16]);
    let k = "base_model.model.model.layers.1.self_attn.k_proj";
    assert_eq!(saved[&format!("{k}.vera_lambda_b")].shape, [32]);
    assert_eq!(saved[&format!("{k}.vera_lambda_d")].shape, [16]);
    assert_eq!(saved.len(), 2 + 2 * 6);
    let d = &saved[&format!("{k}.vera_lambda_d")].values;
    assert!(d.iter().all(|&x| x != 0.5), "lambda_d did not train: {d:?}");

    train_ok(LLAMA, &data, &cut, &opts);
    std::fs::remove_file(cut.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_file(cut.join("adapter_config.json")).unwrap();
    train_ok(LLAMA, &data, &cut, &[&opts[..], &["--resume"]].concat());
    assert!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(cut.join("adapter_model.safetensors")).unwrap(),
        "resumed adapter differs from the uninterrupted run's"
    );

    let vera = ["--method", "vera"];
    for (flags, needles) in [
        (&["--r", "0"][..], &["VeRA r is 0", "between 1 and"][..]),
        (&["--vera-dropout", "1"], &["vera_dropout", "[0, 1)"]),
        (&["--vera-d-initial", "inf"], &["d_initial", "finite"]),
    ] {
        assert_train_fails(LLAMA, None, &[&vera[..], flags].concat(), needles);
    }
    assert_train_fails(
        LLAMA,
        None,
        &["--vera-d-initial", "0.5"],
        &["--vera-d-initial applies to --method vera, not lora"],
    );
}

/// `--method oft` and `--method boft` (PEFT's OFT, BOFT): train and save PEFT's keys and shapes,
/// resume to the uninterrupted run's adapter, merge to a model that scores as base + adapter; a
/// config field out of range is one error naming it.
#[test]
fn oft_and_boft_train_resume_merge_and_check_their_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(12));
    let key = "base_model.model.model.layers.0.self_attn.q_proj";
    // (method, flags, (tensor, shape) on layer 0's q_proj)
    type Run<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a [usize])]);
    let runs: [Run; 2] = [
        (
            "oft",
            &[
                "--method",
                "oft",
                "--oft-block-size",
                "16",
                "--coft",
                "--eps",
                "0.5",
            ],
            &[("oft_R.weight", &[4, 120])],
        ),
        (
            "boft",
            &[
                "--method",
                "boft",
                "--boft-block-size",
                "8",
                "--boft-n-butterfly-factor",
                "2",
                "--boft-dropout",
                "0.25",
            ],
            &[("boft_R", &[2, 8, 8, 8]), ("boft_s", &[64, 1])],
        ),
    ];
    for (method, flags, tensors) in runs {
        let (whole, cut) = (
            tmp.path().join(method),
            tmp.path().join(format!("{method}-cut")),
        );
        let opts = [&RESUME_OPTS[..], flags].concat();
        train_ok(LLAMA, &data, &whole, &opts);
        assert_eq!(adapter_config(&whole)["peft_type"], method.to_uppercase());
        let saved = read_safetensors(&whole.join("adapter_model.safetensors"));
        for (name, shape) in tensors {
            assert_eq!(
                saved[&format!("{key}.{name}")].shape,
                *shape,
                "{method}: {name}"
            );
        }
        // Interrupted after checkpoint-3 and resumed: the same adapter, bit for bit.
        train_ok(LLAMA, &data, &cut, &opts);
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::remove_file(cut.join(f)).unwrap();
        }
        train_ok(LLAMA, &data, &cut, &[&opts[..], &["--resume"]].concat());
        let (a, b) = (
            whole.join("adapter_model.safetensors"),
            cut.join("adapter_model.safetensors"),
        );
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{method}: resumed adapter differs"
        );
        let merged = tmp.path().join(format!("{method}-merged"));
        kaizen([
            "merge",
            "--model",
            &s(&model_path(LLAMA)),
            "--adapter",
            &s(&whole),
            "--out",
            &s(&merged),
        ])
        .ok();
        let with_adapter = eval_loss(&model_path(LLAMA), Some(&whole), &data);
        assert_close(method, eval_loss(&merged, None, &data), with_adapter, 1e-4);
        assert!(
            with_adapter < eval_loss(&model_path(LLAMA), None, &data),
            "{method}: no gain"
        );
    }
    let fails: [(&[&str], &[&str]); 7] = [
        (
            &["--method", "oft", "--oft-block-size", "7"],
            &["oft_block_size 7", "does not divide", "64"],
        ),
        (
            &["--method", "oft", "--r", "4", "--oft-block-size", "16"],
            &["r (4)", "oft_block_size (16)", "only one"],
        ),
        (
            &["--method", "oft", "--module-dropout", "1.5"],
            &["module_dropout", "[0, 1)"],
        ),
        (
            &["--method", "oft", "--coft", "--eps", "0"],
            &["eps", "> 0"],
        ),
        (
            &["--method", "boft", "--boft-block-size", "6"],
            &["boft_block_size 6", "does not divide"],
        ),
        (
            &[
                "--method",
                "boft",
                "--boft-block-size",
                "8",
                "--boft-n-butterfly-factor",
                "5",
            ],
            &["boft_n_butterfly_factor 5", "too large"],
        ),
        (
            &["--method", "lora", "--boft-block-size", "8"],
            &["--boft-block-size applies to --method boft"],
        ),
    ];
    for (flags, needles) in fails {
        assert_train_fails(LLAMA, None, flags, needles);
    }
}

/// `--loraplus-lr-ratio`: LoRA+ steps lora_B at --lr times the ratio (parity with PEFT's
/// optimizer is in kaizen's adapter_parity.rs); run.json records it, and it is refused for other
/// methods and outside (0, inf).
#[test]
fn loraplus_ratio_moves_b_faster_and_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(8));
    let base = ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-3"];
    let (plain, plus) = (tmp.path().join("plain"), tmp.path().join("plus"));
    train_ok(LLAMA, &data, &plain, &base);
    train_ok(
        LLAMA,
        &data,
        &plus,
        &[&base[..], &["--loraplus-lr-ratio", "16"]].concat(),
    );
    assert_eq!(read_json(&plus.join("run.json"))["loraplus_lr_ratio"], 16.0);
    let (a, b) = (
        read_safetensors(&plain.join("adapter_model.safetensors")),
        read_safetensors(&plus.join("adapter_model.safetensors")),
    );
    let norm = |t: &TensorInfo| t.values.iter().map(|x| x * x).sum::<f32>().sqrt();
    for (key, t) in &b {
        // lora_B starts at 0: after the same steps at 16x the rate it is ~16x larger.
        if key.contains("lora_B") {
            let ratio = norm(t) / norm(&a[key]);
            assert!(ratio > 8.0, "{key}: |B| grew only {ratio}x");
        }
    }
    assert_train_fails(
        LLAMA,
        None,
        &["--method", "ia3", "--loraplus-lr-ratio", "16"],
        &["--loraplus-lr-ratio applies to --method lora"],
    );
    assert_train_fails(
        LLAMA,
        None,
        &["--loraplus-lr-ratio", "-1"],
        &["--loraplus-lr-ratio must be > 0"],
    );
}

/// `kaizen merge`s `adapter` into `model` at `merged`, which must score on `data` as the model
/// with the adapter does (`tol` relative); returns that loss.
fn merged_scores_as_adapter(
    model: &str,
    adapter: &Path,
    merged: &Path,
    data: &Path,
    tol: f64,
) -> f64 {
    let (m, a) = (s(&model_path(model)), s(adapter));
    kaizen(["merge", "--model", &m, "--adapter", &a, "--out", &s(merged)]).ok();
    let with_adapter = eval_loss(&model_path(model), Some(adapter), data);
    assert_close("merged", eval_loss(merged, None, data), with_adapter, tol);
    with_adapter
}

/// `--method loha` / `lokr` (LyCORIS, PEFT's LOHA/LOKR): training with rank and module dropout
/// saves PEFT's keys, `--resume` reproduces the uninterrupted run (the dropout draws included), a
/// merged model scores as base + adapter, and a config field out of range is one error naming it.
#[test]
fn loha_and_lokr_train_resume_merge_and_check_their_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(12));
    let targets = ["--target-modules", "q_proj,down_proj"];
    let runs: [(&str, &[&str], &[&str]); 2] = [
        (
            "loha",
            &[
                "--method",
                "loha",
                "--r",
                "4",
                "--alpha",
                "8",
                "--module-dropout",
                "0.3",
            ],
            &["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
        ),
        (
            // r 2 < 8 / 2: with --decompose-both both Kronecker factors are rank-2 pairs
            "lokr",
            &[
                "--method",
                "lokr",
                "--r",
                "2",
                "--lora-alpha",
                "4",
                "--decompose-both",
            ],
            &["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"],
        ),
    ];
    for (name, flags, suffixes) in runs {
        let opts: Vec<&str> = RESUME_OPTS
            .iter()
            .chain(flags)
            .chain(&targets)
            .chain(&["--rank-dropout", "0.2"])
            .copied()
            .collect();
        let (whole, cut) = (
            tmp.path().join(name),
            tmp.path().join(format!("{name}-cut")),
        );
        train_ok(LLAMA, &data, &whole, &opts);
        train_ok(LLAMA, &data, &cut, &opts);
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::remove_file(cut.join(f)).unwrap();
        }
        train_ok(LLAMA, &data, &cut, &[&opts[..], &["--resume"]].concat());
        let file = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
        assert!(
            file(&whole) == file(&cut),
            "{name}: resumed adapter differs"
        );
        let config = read_json(&whole.join("adapter_config.json"));
        assert_eq!(config["peft_type"], name.to_uppercase());
        assert_eq!(config["rank_dropout"], 0.2);
        let saved = read_safetensors(&whole.join("adapter_model.safetensors"));
        assert_eq!(
            saved.len(),
            2 * 2 * suffixes.len(),
            "{name}: {:?}",
            saved.keys()
        );
        for key in saved.keys() {
            assert!(
                suffixes
                    .iter()
                    .any(|x| key.ends_with(&format!("_proj.{x}"))),
                "{name}: {key}"
            );
        }
        let more = tmp.path().join(format!("{name}-more"));
        train_ok(
            LLAMA,
            &data,
            &more,
            &["--init-adapter", &s(&whole), "--max-steps", "1"],
        );
        assert_eq!(
            read_json(&more.join("adapter_config.json")),
            config,
            "{name}"
        );
        let merged = tmp.path().join(format!("{name}-merged"));
        let with_adapter = merged_scores_as_adapter(LLAMA, &whole, &merged, &data, 1e-5);
        assert!(
            with_adapter < eval_loss(&model_path(LLAMA), None, &data),
            "{name}"
        );
    }
    for (flags, needles) in [
        (
            &["--method", "loha", "--r", "0"][..],
            &["r must be at least 1"][..],
        ),
        (
            &["--method", "lokr", "--rank-dropout", "1"],
            &["rank_dropout", "[0, 1)"],
        ),
        (
            &["--method", "loha", "--module-dropout", "1.5"],
            &["module_dropout"],
        ),
        (
            &["--method", "lokr", "--decompose-factor", "0"],
            &["decompose_factor", "-1"],
        ),
        (
            &["--method", "lokr", "--decompose-factor", "-2"],
            &["decompose_factor"],
        ),
        (
            &["--method", "loha", "--decompose-both"],
            &["--decompose-both", "lokr"],
        ),
        (
            &["--rank-dropout", "0.1"],
            &["--rank-dropout", "loha, lokr"],
        ),
    ] {
        assert_train_fails(LLAMA, None, flags, needles);
    }
}

/// `--method adalora` (PEFT's ADALORA): the budget falls from init_r to target_r per layer on
/// average while it trains; the saved config carries the final rank_pattern and the tensors are
/// cut to it, as PEFT saves; the adapter evaluates and merges; `--resume` (a full-rank checkpoint
/// plus the allocator's state) reproduces the uninterrupted run; bad schedules are one error
/// naming the field.
#[test]
fn adalora_reallocates_ranks_saves_as_peft_merges_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(12));
    let opts = [
        "--method",
        "adalora",
        "--init-r",
        "4",
        "--target-r",
        "2",
        "--tinit",
        "1",
        "--tfinal",
        "1",
        "--lora-alpha",
        "8",
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "2e-2",
        "--save-every",
        "2",
    ];
    let out = tmp.path().join("ada");
    train_ok(LLAMA, &data, &out, &opts);
    let config = read_json(&out.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "ADALORA");
    assert_eq!(
        config["total_step"], 6,
        "total_step defaults to the run's steps"
    );
    let pattern = config["rank_pattern"].as_object().expect("a rank pattern");
    assert_eq!(pattern.len(), 4, "q_proj and v_proj of two layers");
    let saved = read_safetensors(&out.join("adapter_model.safetensors"));
    let mut kept_total = 0;
    for (key, keep) in pattern {
        let kept = keep
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b == &&Value::Bool(true))
            .count();
        kept_total += kept;
        let path = key.strip_suffix(".lora_E").unwrap();
        let a = &saved[&format!("base_model.model.{path}.lora_A")];
        assert_eq!(a.shape[0], kept, "{key}: lora_A cut to the pattern");
    }
    assert!(
        (1..=8).contains(&kept_total),
        "budget 4 layers x target_r 2: {kept_total} kept"
    );
    let with_adapter = eval_loss(&model_path(LLAMA), Some(&out), &data);
    assert!(with_adapter < eval_loss(&model_path(LLAMA), None, &data));
    let merged = tmp.path().join("merged");
    kaizen([
        "merge",
        "--model",
        &s(&model_path(LLAMA)),
        "--adapter",
        &s(&out),
        "--out",
        &s(&merged),
    ])
    .ok();
    assert_close(
        "merged",
        eval_loss(&merged, None, &data),
        with_adapter,
        1e-5,
    );
    assert_train_fails(
        LLAMA,
        None,
        &["--init-adapter", &s(&out)],
        &["rank_pattern", "--resume"],
    );

    let cut = tmp.path().join("cut");
    train_ok(LLAMA, &data, &cut, &opts);
    std::fs::remove_file(cut.join("adapter_model.safetensors")).unwrap();
    train_ok(LLAMA, &data, &cut, &[&opts[..], &["--resume"]].concat());
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let (a, b) = (
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(cut.join(f)).unwrap(),
        );
        assert!(a == b, "the resumed run's {f} differs");
    }

    for (flags, want) in [
        (
            &["--init-r", "4", "--target-r", "6"][..],
            &["target_r", "init_r"][..],
        ),
        (&["--init-r", "0"][..], &["init_r"][..]),
        (&["--tinit", "1"][..], &["tinit", "total_step"][..]),
        (
            &["--total-step", "3", "--tfinal", "3"][..],
            &["tfinal", "total_step"][..],
        ),
        (&["--beta1", "1.5"][..], &["beta1"][..]),
        (&["--orth-reg-weight=-1"][..], &["orth_reg_weight"][..]),
        (&["--r", "4"][..], &["--r applies to --method lora"][..]),
    ] {
        assert_train_fails(
            LLAMA,
            None,
            &[&["--method", "adalora"][..], flags].concat(),
            want,
        );
    }
}

/// The estimate a run prints ("memory: about X MiB (...)"), in MiB.
fn estimate_mib(stderr: &str) -> f64 {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("memory: about "))
        .unwrap_or_else(|| panic!("no memory line in {stderr}"));
    let (n, unit) = line.split_once(' ').unwrap();
    let n: f64 = n.parse().unwrap();
    match &unit[..3] {
        "MiB" => n,
        "GiB" => n * 1024.0,
        other => panic!("unit {other} in {line}"),
    }
}

/// The memory guard: every run prints its estimate; one over --max-memory is refused before any
/// data is read or --out is made, with the estimate and a change that would fit, which then
/// runs; weights that alone exceed it are refused before they are read.
#[test]
fn runs_that_would_not_fit_are_refused_with_the_estimate_and_a_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(4));
    let shape = ["--max-steps", "1", "--batch-size", "8", "--max-len", "512"];
    let gc = [&shape[..], &["--gradient-checkpointing"]].concat();
    let stderr = |out: &str, args: &[&str]| {
        let run = train(LLAMA, &data, &tmp.path().join(out), args);
        let stderr = run.stderr.clone();
        run.ok();
        stderr
    };
    let (plain, less) = (
        estimate_mib(&stderr("a", &shape)),
        estimate_mib(&stderr("b", &gc)),
    );
    assert!(
        less < plain,
        "gradient checkpointing: {less} MiB vs {plain} MiB"
    );
    let budget = format!("{}", (plain + less) / 2.0 / 1024.0);
    let refused = tmp.path().join("c");
    let err = train(
        LLAMA,
        &data,
        &refused,
        &[&shape[..], &["--max-memory", &budget]].concat(),
    )
    .fails();
    assert_mentions(
        &err,
        &[
            "this run needs about",
            "--gradient-checkpointing",
            "available",
        ],
    );
    assert!(!refused.exists(), "a refused run made --out");
    train_ok(
        LLAMA,
        &data,
        &refused,
        &[&gc[..], &["--max-memory", &budget]].concat(),
    );

    for method in [
        "lora",
        "ia3",
        "loha",
        "lokr",
        "ln-tuning",
        "oft",
        "boft",
        "prompt",
        "p-tuning",
        "prefix",
        "adapter",
        "full",
        "freeze",
    ] {
        assert_train_fails(
            LLAMA,
            None,
            &["--method", method, "--max-memory", "0.002"],
            &["this run needs about", "2.0 MiB is available"],
        );
    }
    assert_train_fails(
        LLAMA,
        None,
        &["--method", "full", "--max-memory", "0.002"],
        &["--method lora"],
    );
    assert_train_fails(
        LLAMA,
        None,
        &["--max-memory", "0.0002"],
        &["weights alone", "--dtype bf16", "--quantize nf4"],
    );
    assert_train_fails(
        LLAMA,
        None,
        &["--max-memory", "0"],
        &["--max-memory", "> 0"],
    );
}

/// `--dtype bf16`: the base is stored in bf16, the adapter and its file stay f32, training
/// still learns, run.json records the dtype, and the adapter evaluates under either dtype to
/// nearly the same loss. `--method full` refuses it and an unknown dtype lists the valid ones.
#[test]
fn bf16_base_trains_an_f32_adapter() {
    assert_learns(LLAMA, &repetitive_text_rows(16), &["--dtype", "bf16"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(8));
    let out = tmp.path().join("run");
    train_ok(
        NEOX,
        &data,
        &out,
        &["--dtype", "bf16", "--max-steps", "2", "--batch-size", "2"],
    );
    assert_eq!(read_json(&out.join("run.json"))["dtype"], "bf16");
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    assert!(!tensors.is_empty() && tensors.values().all(|t| t.dtype == "F32"));
    let loss = |dtype: &str| {
        let stdout = kaizen(vec![
            "eval".into(),
            "--model".into(),
            s(&model_path(NEOX)),
            "--adapter".into(),
            s(&out),
            "--data".into(),
            s(&data),
            "--json".into(),
            "--dtype".into(),
            dtype.into(),
        ])
        .ok();
        let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        f64_of(&last["loss"])
    };
    let (l32, l16) = (loss("f32"), loss("bf16"));
    assert!(
        (l32 - l16).abs() / l32 < 1e-2,
        "eval f32 {l32} vs bf16 {l16}"
    );

    let err = train(
        NEOX,
        &data,
        &tmp.path().join("full"),
        &["--method", "full", "--dtype", "bf16"],
    )
    .fails();
    assert!(
        err.contains("--method full") && err.contains("--dtype"),
        "{err}"
    );
    let err = train(NEOX, &data, &tmp.path().join("f16"), &["--dtype", "f16"]).fails();
    assert!(
        err.contains("--dtype f16") && err.contains("f32, bf16"),
        "{err}"
    );
    assert!(!tmp.path().join("full").exists() && !tmp.path().join("f16").exists());
}

/// `--quantize`: LoRA learns on an NF4 and a Q8_0 base (products in bf16 by default; NF4 also
/// with `--compute int8`, its levels rounded to 8-bit codes), run.json
/// records the type, the adapter stays f32 and evaluates on the quantized base close to the
/// dense one, `inspect` reports the resident bytes, and `merge --quantize` writes bf16 weights
/// and reports the loss difference. Bad combinations fail before anything is written.
#[test]
fn quantized_base_trains_evaluates_and_merges() {
    assert_learns(LLAMA, &repetitive_text_rows(16), &["--quantize", "nf4"]);
    assert_learns(
        LLAMA,
        &repetitive_text_rows(16),
        &["--quantize", "nf4", "--compute", "int8"],
    );
    // 64-wide rows are not whole 256-value blocks: Q4_K falls back to Q5_0, as llama.cpp does.
    let info = kaizen([
        "inspect",
        "--model",
        &s(&model_path(LLAMA)),
        "--quantize",
        "q4_k",
    ])
    .ok();
    assert!(info.contains("Q5_0") && !info.contains("Q4_K"), "{info}");
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &repetitive_text_rows(8));
    let out = tmp.path().join("run");
    let q = ["--quantize", "q8_0"];
    train_ok(
        LLAMA,
        &data,
        &out,
        &[&q[..], &["--max-steps", "2"]].concat(),
    );
    assert_eq!(read_json(&out.join("run.json"))["quantize"], "q8_0");
    let tensors = read_safetensors(&out.join("adapter_model.safetensors"));
    assert!(!tensors.is_empty() && tensors.values().all(|t| t.dtype == "F32"));
    let loss = |extra: &[&str]| {
        let mut args: Vec<String> = ["eval", "--model", &s(&model_path(LLAMA)), "--adapter"]
            .map(String::from)
            .to_vec();
        args.extend([s(&out), "--data".into(), s(&data), "--json".into()]);
        args.extend(extra.iter().map(|x| x.to_string()));
        f64_of(&last_json(&kaizen(args).ok())["loss"])
    };
    let (dense, quant) = (loss(&[]), loss(&q));
    assert!(
        (dense - quant).abs() / dense < 2e-2,
        "dense {dense} vs q8_0 {quant}"
    );

    let info = kaizen([
        "inspect",
        "--model",
        &s(&model_path(LLAMA)),
        "--quantize",
        "nf4",
    ])
    .ok();
    assert!(info.contains("NF4") && info.contains("resident"), "{info}");
    // --quantize-embeddings: the tied table (and so the head) in Q4_0 beside Q8_0 blocks.
    let info = kaizen([
        "inspect",
        "--model",
        &s(&model_path(LLAMA)),
        "--quantize",
        "q8_0",
        "--quantize-embeddings",
        "q4_0",
    ])
    .ok();
    let resident = info.lines().find(|l| l.starts_with("resident:")).unwrap();
    assert!(
        resident.contains("Q4_0 0.000 GB (1 matrices)") && !resident.contains("BF16"),
        "{info}"
    );

    let merged = tmp.path().join("merged");
    let stdout = kaizen([
        "merge",
        "--model",
        &s(&model_path(LLAMA)),
        "--adapter",
        &s(&out),
        "--out",
        &s(&merged),
        "--quantize",
        "q8_0",
        "--dtype",
        "bf16",
        "--data",
        &s(&data),
    ])
    .ok();
    assert!(
        stdout.contains("in bf16") && stdout.contains("difference"),
        "{stdout}"
    );
    assert_eq!(
        read_json(&merged.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    let tensors = read_safetensors(&merged.join("model.safetensors"));
    assert!(tensors.values().all(|t| t.dtype == "BF16"));

    // Gemma 3's fixture has 96-wide MLP rows: not whole 64-value NF4 blocks.
    let cases: [(&str, &[&str], &[&str]); 6] = [
        (
            "gemma3",
            &["--quantize", "nf4"],
            &["nf4", "64", "mlp.down_proj"],
        ),
        (LLAMA, &["--quantize", "q3"], &["--quantize q3", "nf4"]),
        (
            LLAMA,
            &["--compute", "int8"],
            &["--compute int8", "--quantize"],
        ),
        (
            LLAMA,
            &["--method", "full", "--quantize", "q8_0"],
            &["--method full", "--quantize"],
        ),
        (
            LLAMA,
            &["--quantize-embeddings", "q4_0"],
            &["--quantize-embeddings q4_0", "add --quantize"],
        ),
        (
            LLAMA,
            &[
                "--quantize",
                "q8_0",
                "--quantize-embeddings",
                "q4_0,q8_0,q6_k",
            ],
            &["TYPE,HEAD_TYPE"],
        ),
    ];
    for (model, extra, needles) in cases {
        let dir = tmp.path().join("bad");
        let err = train(model, &data, &dir, extra).fails();
        assert!(needles.iter().all(|n| err.contains(n)), "{extra:?}: {err}");
        assert!(!dir.exists(), "{extra:?} left {}", dir.display());
    }
}

/// Ctrl-C (SIGINT) ends a run after its step: checkpoint-N written, exit code 130, a line that
/// says how to continue; `--resume` then continues from that step.
#[cfg(target_os = "linux")]
#[test]
fn sigint_stops_with_a_checkpoint_and_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = repo_root().join("tests/fixtures/ui/train.jsonl");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "train".into(),
            "--model".into(),
            s(&model_path(LLAMA)),
            "--data".into(),
            s(&data),
            "--out".into(),
            s(&out),
            "--max-steps".into(),
            "100000".into(),
            "--batch-size".into(),
            "2".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kaizen"))
        .args(args(&[]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "no steps logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{stderr}");
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("stopped after step "), "{stderr}");
    let step: usize = last["stopped after step ".len()..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(out.join(format!("checkpoint-{step}")).is_dir(), "{stderr}");
    assert!(
        !out.join("adapter_config.json").exists(),
        "a stopped run wrote its adapter"
    );
    // Resume: continues after that step (stopped again, so the test stays short).
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kaizen"))
        .args(args(&["--resume"]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let past = |t: &str| {
        t.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|m| m["step"].as_u64().is_some_and(|s| s as usize > step + 2))
    };
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| past(&t)) {
        assert!(
            t0.elapsed().as_secs() < 240,
            "the resumed run logged no step"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "resuming from {}",
            s(&out.join(format!("checkpoint-{step}")))
        )),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// LoRA's data-driven inits (PEFT's init_lora_weights pissa, pissa_niter_K, olora, loftq)

/// Each init trains and is written into adapter_config.json as PEFT writes it. A PiSSA adapter
/// evaluates with `kaizen eval` (which recomputes the residual base, as PEFT's loader does) to
/// the same loss as the same run saved with --convert-to-lora: PEFT's plain LoRA of rank 2r
/// (alpha doubled) for the original base.
#[test]
fn data_driven_lora_inits_train_and_pissa_converts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_rows(tmp.path(), "train.jsonl", &instruction_rows(6));
    let run = |init: &str, extra: &[&str]| {
        let out = tmp.path().join(init.replace(' ', "_"));
        let mut args = vec!["--init-lora-weights", init, "--r", "4", "--lora-alpha", "8"];
        args.extend(["--max-steps", "2", "--batch-size", "2", "--lr", "1e-2"]);
        args.extend(extra);
        train_ok(LLAMA, &data, &out, &args);
        out
    };
    for init in ["pissa", "pissa_niter_2", "olora"] {
        let out = run(init, &[]);
        assert_eq!(adapter_config(&out)["init_lora_weights"], json!(init));
    }
    let loftq = run("loftq", &["--quantize", "nf4", "--loftq-iter", "2"]);
    let cfg = adapter_config(&loftq);
    assert_eq!(cfg["init_lora_weights"], json!("loftq"));
    assert_eq!(
        cfg["loftq_config"],
        json!({"loftq_bits": 4, "loftq_iter": 2})
    );

    let pissa = tmp.path().join("pissa");
    let converted = tmp.path().join("converted");
    let mut args = vec![
        "--init-lora-weights",
        "pissa",
        "--convert-to-lora",
        "--r",
        "4",
    ];
    args.extend([
        "--lora-alpha",
        "8",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
    ]);
    train_ok(LLAMA, &data, &converted, &args);
    let cfg = adapter_config(&converted);
    assert_eq!(
        (&cfg["init_lora_weights"], &cfg["r"], &cfg["lora_alpha"]),
        (&json!(true), &json!(8), &json!(16.0))
    );
    let (base, val) = (model_path(LLAMA), tmp.path().join("val.jsonl"));
    write_rows(tmp.path(), "val.jsonl", &repetitive_text_rows(2));
    let (with_pissa, with_converted) = (
        eval_loss(&base, Some(&pissa), &val),
        eval_loss(&base, Some(&converted), &val),
    );
    assert_close(
        "eval loss of the converted adapter on the original base",
        with_converted,
        with_pissa,
        1e-4,
    );
    assert!(
        (with_pissa - eval_loss(&base, None, &val)).abs() > 1e-3,
        "training changed the model"
    );
}

#[test]
fn bad_lora_init_flags_are_one_error_naming_the_flag() {
    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["--init-lora-weights", "svd"],
            &["--init-lora-weights svd", "pissa_niter_K"],
        ),
        (
            &["--init-lora-weights", "pissa_niter_x"],
            &["pissa_niter_x", "unknown"],
        ),
        (
            &["--init-lora-weights", "loftq"],
            &["loftq", "--quantize nf4"],
        ),
        (
            &[
                "--init-lora-weights",
                "loftq",
                "--quantize",
                "nf4",
                "--loftq-iter",
                "0",
            ],
            &["--loftq-iter"],
        ),
        (
            &["--init-lora-weights", "olora", "--loftq-iter", "2"],
            &["--loftq-iter", "loftq"],
        ),
        (&["--convert-to-lora"], &["--convert-to-lora", "pissa"]),
        (
            &["--init-lora-weights", "pissa", "--r", "40"],
            &["rank r 40", "v_proj", "r <= 32"],
        ),
    ];
    for (extra, needles) in cases {
        assert_train_fails(LLAMA, None, extra, needles);
    }
    assert_train_fails(
        LLAMA,
        None,
        &["--init-lora-weights", "pissa", "--quantize", "nf4"],
        &["PiSSA", "--quantize"],
    );
    assert_train_fails(
        LLAMA,
        None,
        &["--method", "ia3", "--init-lora-weights", "pissa"],
        &["--init-lora-weights", "lora"],
    );
}
