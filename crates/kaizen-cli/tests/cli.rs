//! The `kaizen` binary's contract, run on the committed fixtures: the flags and output lines other
//! tools depend on (ids, eval JSON, generate JSON, inspect's parameter lines) match what HF
//! transformers / PEFT computed (each fixture's reference.json), and every kind of bad input ends
//! in one `error: ...` line naming the file or field, a nonzero exit code, no panic and no hang.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Relative tolerance on losses, as in crates/kaizen/tests/parity.rs.
const TOL: f64 = 1e-4;

fn s(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// tokenize

#[test]
fn tokenize_text_prints_reference_ids() {
    for name in MODELS {
        let r = reference(name);
        for (i, text) in texts(name).iter().enumerate() {
            let out = kaizen(["tokenize", "--model", &s(&model_path(name)), "--text", text]).ok();
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 1, "{name}: one line per text, got {out:?}");
            let got: Value = serde_json::from_str(lines[0]).expect("a JSON array");
            assert_eq!(
                ids(&got),
                ids(&r["input_ids"][i]),
                "{name}: ids of text {i}"
            );
        }
    }
}

#[test]
fn tokenize_data_prints_one_array_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let r = reference(name);
        let data = write_jsonl(tmp.path(), &format!("{name}.jsonl"), &texts(name));
        let out = kaizen([
            "tokenize",
            "--model",
            &s(&model_path(name)),
            "--data",
            &s(&data),
        ])
        .ok();
        let lines: Vec<&str> = out.lines().collect();
        let want = r["input_ids"].as_array().unwrap();
        assert_eq!(lines.len(), want.len(), "{name}: one line per JSONL line");
        for (i, line) in lines.iter().enumerate() {
            let got: Value = serde_json::from_str(line).expect("a JSON array");
            assert_eq!(ids(&got), ids(&want[i]), "{name}: ids of line {}", i + 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// eval

fn eval_json(model: &Path, data: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "eval".to_string(),
        "--model".into(),
        s(model),
        "--data".into(),
        s(data),
        "--json".into(),
    ];
    args.extend(extra.iter().map(ToString::to_string));
    let v = last_json(&kaizen(args).ok());
    for key in ["loss", "perplexity", "tokens"] {
        assert!(v.get(key).is_some(), "eval JSON lacks {key:?}: {v}");
    }
    v
}

#[test]
fn eval_json_matches_reference_mean_loss() {
    let tmp = tempfile::tempdir().unwrap();
    for name in MODELS {
        let r = reference(name);
        let data = write_jsonl(tmp.path(), &format!("{name}.jsonl"), &texts(name));
        let v = eval_json(&model_path(name), &data, &[]);
        let loss = f64_of(&v["loss"]);
        assert_close(name, loss, f64_of(&r["mean_loss"]), TOL);
        assert_close(name, f64_of(&v["perplexity"]), loss.exp(), 1e-9);
        let want: u64 = ids(&r["token_counts"]).iter().sum();
        assert_eq!(v["tokens"].as_u64(), Some(want), "{name}: tokens");
    }
}

#[test]
fn eval_max_len_truncates_each_line() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["neox-par-bpe", "neox-seq-spiece", "llama-gguf"] {
        let r = reference(name);
        let data = write_jsonl(tmp.path(), &format!("{name}.jsonl"), &texts(name));
        let lens: Vec<u64> = r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| ids(x).len() as u64)
            .collect();
        // A line of n tokens cut to N scores min(n, N) - 1 next-token predictions.
        for max_len in [2u64, 10] {
            let v = eval_json(
                &model_path(name),
                &data,
                &["--max-len", &max_len.to_string()],
            );
            let want: u64 = lens.iter().map(|&n| n.min(max_len) - 1).sum();
            assert_eq!(
                v["tokens"].as_u64(),
                Some(want),
                "{name} --max-len {max_len}"
            );
        }
        // Cutting at the longest line changes nothing.
        let longest = lens.iter().max().unwrap().to_string();
        let v = eval_json(&model_path(name), &data, &["--max-len", &longest]);
        assert_close(name, f64_of(&v["loss"]), f64_of(&r["mean_loss"]), TOL);
    }
}

#[test]
fn eval_with_adapter_matches_peft_reference() {
    for name in ADAPTERS {
        let r = lora_reference(name);
        let want = &r["eval"];
        let adapter = s(&adapter_path(name));
        let v = eval_json(
            &model_path(name),
            &lora_eval_data(),
            &["--adapter", &adapter],
        );
        assert_close(name, f64_of(&v["loss"]), f64_of(&want["loss"]), TOL);
        assert_eq!(v["tokens"], want["tokens"], "{name}: tokens");
    }
}

#[test]
fn eval_max_len_zero_is_an_error() {
    let line = kaizen([
        "eval",
        "--model",
        &s(&model_path("neox-par-bpe")),
        "--data",
        &s(&lora_eval_data()),
        "--max-len",
        "0",
    ])
    .fails();
    assert_mentions(&line, &["--max-len"]);
}

// ---------------------------------------------------------------------------------------------
// generate

fn generate_json(name: &str, prompt: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        s(&model_path(name)),
        "--prompt".into(),
        prompt.into(),
        "--max-new-tokens".into(),
        "12".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(ToString::to_string));
    let v = last_json(&kaizen(args).ok());
    assert!(v["ids"].is_array(), "generate JSON lacks \"ids\": {v}");
    assert!(v["text"].is_string(), "generate JSON lacks \"text\": {v}");
    v
}

#[test]
fn generate_greedy_matches_reference_continuation() {
    for name in MODELS {
        let g = &reference(name)["greedy"];
        let prompt = g["prompt"].as_str().unwrap();
        assert_eq!(prompt, "After the meal,");
        let v = generate_json(name, prompt, &["--greedy"]);
        assert_eq!(ids(&v["ids"]), ids(&g["new_ids"]), "{name}: greedy ids");
    }
}

#[test]
fn generate_streams_the_same_text_as_json() {
    let name = "neox-par-bpe";
    let v = generate_json(name, "After the meal,", &["--greedy"]);
    let out = kaizen([
        "generate",
        "--model",
        &s(&model_path(name)),
        "--prompt",
        "After the meal,",
        "--max-new-tokens",
        "12",
        "--greedy",
    ])
    .ok();
    assert_eq!(out.trim_end_matches('\n'), v["text"].as_str().unwrap());
}

#[test]
fn generate_seed_makes_sampling_reproducible() {
    let name = "neox-par-bpe";
    let sample = |seed: &str| {
        let flags = [
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            seed,
        ];
        ids(&generate_json(name, "After the meal,", &flags)["ids"])
    };
    let a = sample("7");
    assert!(!a.is_empty());
    assert_eq!(a, sample("7"), "same seed, same ids");
    assert_ne!(a, sample("8"), "another seed should sample differently");
    // Plain sampling (temperature 1, no filters) too.
    let plain = |seed: &str| ids(&generate_json(name, "After the meal,", &["--seed", seed])["ids"]);
    assert_eq!(plain("1"), plain("1"));
}

#[test]
fn generate_temperature_zero_without_greedy_is_an_error() {
    let line = kaizen([
        "generate",
        "--model",
        &s(&model_path("neox-par-bpe")),
        "--prompt",
        "After the meal,",
        "--temperature",
        "0",
    ])
    .fails();
    assert_mentions(&line, &["temperature", "--greedy"]);
}

#[test]
fn generate_chat_applies_the_template() {
    // neox-par-bpe's tokenizer_config.json holds a ChatML template; the GGUF embeds one.
    for name in ["neox-par-bpe", "llama-gguf"] {
        let plain = ids(&reference(name)["greedy"]["new_ids"]);
        let a = generate_json(name, "After the meal,", &["--chat", "--greedy"]);
        let b = generate_json(name, "After the meal,", &["--chat", "--greedy"]);
        assert_eq!(a["ids"], b["ids"], "{name}: greedy chat is deterministic");
        assert_ne!(ids(&a["ids"]), plain, "{name}: --chat changed nothing");
    }
    // The chat prompt is the rendered template tokenized without an added BOS.
    let name = "neox-par-bpe";
    let rendered = "<|im_start|>user\nAfter the meal,<|im_end|>\n<|im_start|>assistant\n";
    let out = kaizen([
        "tokenize",
        "--model",
        &s(&model_path(name)),
        "--text",
        rendered,
    ])
    .ok();
    let with_bos = ids(&serde_json::from_str(out.trim()).unwrap());
    let v = generate_json(name, "After the meal,", &["--chat", "--greedy"]);
    if let Some(n) = v.get("prompt_tokens") {
        assert_eq!(
            n.as_u64(),
            Some(with_bos.len() as u64 - 1),
            "{name}: chat prompt"
        );
    }
}

#[test]
fn generate_chat_without_template_is_an_error() {
    let line = kaizen([
        "generate",
        "--model",
        &s(&model_path("neox-seq-spiece")),
        "--prompt",
        "Hello",
        "--chat",
    ])
    .fails();
    assert_mentions(&line, &["chat template"]);
}

#[test]
fn generate_stop_string_ends_early() {
    // The greedy continuation of neox-par-bpe is " su関�˗ ha�ith�� ha" (12 tokens); "ha" first
    // appears after 6 of them.
    let name = "neox-par-bpe";
    let full = ids(&reference(name)["greedy"]["new_ids"]);
    let v = generate_json(name, "After the meal,", &["--greedy", "--stop", "ha"]);
    let got = ids(&v["ids"]);
    assert!(
        !got.is_empty() && got.len() < full.len() && full.starts_with(&got),
        "--stop should cut the greedy ids {full:?} short, got {got:?}"
    );
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains("ha"),
        "text {text:?} should reach the stop string"
    );
    let out = kaizen([
        "generate",
        "--model",
        &s(&model_path(name)),
        "--prompt",
        "After the meal,",
        "--max-new-tokens",
        "12",
        "--greedy",
        "--stop",
        "ha",
    ])
    .ok();
    assert_eq!(
        out.trim_end_matches('\n'),
        text,
        "streamed text with --stop"
    );
}

// ---------------------------------------------------------------------------------------------
// inspect

/// Whether `n` appears in `text` as a whole number.
fn has_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|w| w == n.to_string())
}

#[test]
fn inspect_prints_architecture_and_parameter_count() {
    for name in MODELS {
        let c = &reference(name)["config_summary"];
        let out = kaizen(["inspect", "--model", &s(&model_path(name))]).ok();
        let model_type = c["model_type"].as_str().unwrap();
        assert!(
            out.contains(model_type),
            "{name}: no {model_type:?} in\n{out}"
        );
        let params = c["params"].as_u64().unwrap();
        assert!(has_number(&out, params), "{name}: no {params} in\n{out}");
    }
}

#[test]
fn inspect_adapter_prints_peft_trainable_line() {
    for name in ADAPTERS {
        let r = lora_reference(name);
        let out = kaizen([
            "inspect",
            "--model",
            &s(&model_path(name)),
            "--adapter",
            &s(&adapter_path(name)),
        ])
        .ok();
        let line = out
            .lines()
            .find(|l| l.starts_with("trainable params: "))
            .unwrap_or_else(|| panic!("{name}: no `trainable params:` line in\n{out}"));
        let parts: Vec<&str> = line.split(" || ").collect();
        assert_eq!(parts.len(), 3, "{name}: {line:?}");
        // Each part is `label: value`.
        let value = |p: &str, label: &str| -> String {
            p.strip_prefix(label)
                .unwrap_or_else(|| panic!("{name}: {p:?} should start with {label:?}"))
                .trim()
                .to_string()
        };
        let trainable = r["trainable_params"].as_u64().unwrap();
        let all = r["all_params"].as_u64().unwrap();
        assert_eq!(value(parts[0], "trainable params:"), trainable.to_string());
        assert_eq!(value(parts[1], "all params:"), all.to_string());
        let pct: f64 = value(parts[2], "trainable%:")
            .parse()
            .expect("trainable% number");
        let want = 100.0 * trainable as f64 / all as f64;
        assert!(
            (pct - want).abs() < 1e-4,
            "{name}: trainable% {pct} vs {want}"
        );
    }
}

#[test]
fn help_lists_the_subcommands() {
    let out = kaizen(["--help"]).ok();
    assert_mentions(&out, &["tokenize", "eval", "generate", "inspect"]);
}

// ---------------------------------------------------------------------------------------------
// bad input: models

/// Runs inspect, eval and generate on `model`; each must fail cleanly and mention `needles`.
fn assert_load_fails(model: &Path, needles: &[&str]) {
    let m = s(model);
    let data = s(&lora_eval_data());
    let runs: [Vec<&str>; 3] = [
        vec!["inspect", "--model", &m],
        vec!["eval", "--model", &m, "--data", &data],
        vec![
            "generate",
            "--model",
            &m,
            "--prompt",
            "After the meal,",
            "--max-new-tokens",
            "2",
        ],
    ];
    for args in runs {
        let line = kaizen(&args).fails();
        assert_mentions(&line, needles);
    }
}

fn assert_tokenize_fails(model: &Path, needles: &[&str]) {
    let line = kaizen(["tokenize", "--model", &s(model), "--text", "hello"]).fails();
    assert_mentions(&line, needles);
}

#[test]
fn nonexistent_model_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model");
    assert_load_fails(&missing, &[&s(&missing)]);
    assert_tokenize_fails(&missing, &[&s(&missing)]);
}

#[test]
fn directory_without_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    assert_load_fails(tmp.path(), &["config.json", &s(tmp.path())]);
    assert_tokenize_fails(tmp.path(), &["config.json"]);
}

#[test]
fn config_json_that_is_not_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    assert_load_fails(&dir, &[&s(&dir.join("config.json")), "JSON"]);
}

#[test]
fn config_json_with_unknown_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("neox-par-bpe", tmp.path());
    edit_config(&dir, |c| {
        c.insert("model_type".into(), "falcon".into());
    });
    let cfg = s(&dir.join("config.json"));
    assert_load_fails(&dir, &[&cfg, "falcon", "gpt_neox", "llama"]);
}

#[test]
fn config_json_with_zero_sliding_window() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("mistral", tmp.path());
    edit_config(&dir, |c| {
        c.insert("sliding_window".into(), 0.into());
    });
    assert_load_fails(&dir, &[&s(&dir.join("config.json")), "sliding_window"]);
}

#[test]
fn config_json_whose_heads_do_not_divide_hidden() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("qwen2", tmp.path());
    edit_config(&dir, |c| {
        c.insert("num_attention_heads".into(), 5.into());
        c.remove("head_dim");
    });
    let cfg = s(&dir.join("config.json"));
    assert_load_fails(&dir, &[&cfg, "num_attention_heads 5", "head_dim"]);
}

#[test]
fn config_json_with_bad_layer_types() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("gemma3", tmp.path());
    edit_config(&dir, |c| {
        c.insert(
            "layer_types".into(),
            serde_json::json!(["sliding_attention"]),
        );
    });
    assert_load_fails(&dir, &[&s(&dir.join("config.json")), "layer_types"]);
}

#[test]
fn multimodal_gemma3_config_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("gemma3", tmp.path());
    edit_config(&dir, |c| {
        c.insert("model_type".into(), "gemma3".into());
        c.insert("text_config".into(), serde_json::json!({}));
    });
    assert_load_fails(&dir, &["multimodal", "gemma3_text"]);
}

#[test]
fn config_json_missing_hidden_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    edit_config(&dir, |c| {
        c.remove("hidden_size");
    });
    assert_load_fails(&dir, &[&s(&dir.join("config.json")), "hidden_size"]);
}

#[test]
fn config_json_with_zero_context() {
    // max_position_embeddings 0 is a broken config, not a bad --max-len.
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    edit_config(&dir, |c| {
        c.insert("max_position_embeddings".into(), 0.into());
    });
    assert_load_fails(&dir, &["max_position_embeddings"]);
}

#[test]
fn config_json_with_zero_rope_theta() {
    // rope_theta 0 makes every rotary frequency NaN; it must not load (and eval must never
    // print {"loss": null}).
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    edit_config(&dir, |c| {
        c.insert("rope_theta".into(), 0.0.into());
    });
    assert_load_fails(&dir, &["rope_theta"]);
}

#[test]
fn safetensors_truncated_to_half() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    let file = dir.join("model.safetensors");
    truncate(&file, file_len(&file) / 2);
    assert_load_fails(&dir, &[&s(&file)]);
    assert_tokenize_fails(&dir, &[&s(&file)]);
}

#[test]
fn safetensors_shard_truncated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("neox-par-bpe", tmp.path());
    let file = dir.join("model-00002-of-00002.safetensors");
    truncate(&file, file_len(&file) / 2);
    assert_load_fails(&dir, &[&s(&file)]);
}

#[test]
fn safetensors_shard_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("neox-par-bpe", tmp.path());
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    assert_load_fails(&dir, &["model-00002-of-00002.safetensors"]);
}

#[test]
fn safetensors_header_length_past_end_of_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let too_long = (bytes.len() as u64) * 2;
    bytes[..8].copy_from_slice(&too_long.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
    assert_load_fails(&dir, &[&s(&file)]);
}

#[test]
fn weight_shape_does_not_match_config() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    edit_config(&dir, |c| {
        c.insert("hidden_size".into(), 32.into());
    });
    assert_load_fails(&dir, &[&s(&dir), "shape", "model."]);
}

#[test]
fn config_has_more_layers_than_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    edit_config(&dir, |c| {
        c.insert("num_hidden_layers".into(), 3.into());
    });
    assert_load_fails(&dir, &[&s(&dir), "model.layers.2."]);
}

#[test]
fn weights_hold_unexpected_tensors() {
    // One layer in the config, two in the files: layer 1's tensors are left over.
    for (name, prefix) in [
        ("llama-gqa-tied", "model.layers.1."),
        ("neox-par-bpe", "gpt_neox.layers.1."),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy_fixture(name, tmp.path());
        edit_config(&dir, |c| {
            c.insert("num_hidden_layers".into(), 1.into());
        });
        assert_load_fails(&dir, &[&s(&dir), prefix]);
    }
}

#[test]
fn missing_tokenizer_files() {
    for (name, file) in [
        ("llama-gqa-tied", "tokenizer.json"),
        ("neox-seq-spiece", "spiece.model"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy_fixture(name, tmp.path());
        std::fs::remove_file(dir.join(file)).unwrap();
        assert_load_fails(&dir, &[&s(&dir), "tokenizer"]);
        assert_tokenize_fails(&dir, &[&s(&dir), "tokenizer"]);
    }
}

#[test]
fn truncated_spiece_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("neox-seq-spiece", tmp.path());
    let file = dir.join("spiece.model");
    truncate(&file, 1000);
    assert_load_fails(&dir, &[&s(&file)]);
    assert_tokenize_fails(&dir, &[&s(&file)]);
}

fn truncated_gguf(tmp: &Path, len: impl Fn(u64) -> u64) -> std::path::PathBuf {
    let file = tmp.join("model.gguf");
    std::fs::copy(model_path("llama-gguf"), &file).unwrap();
    truncate(&file, len(file_len(&file)));
    file
}

#[test]
fn gguf_truncated_in_the_middle() {
    let tmp = tempfile::tempdir().unwrap();
    // Half-way cuts into the tensor data; 1000 bytes cuts into the metadata.
    for cut in [|n: u64| n / 2, |_| 1000, |n: u64| n - 100] {
        let file = truncated_gguf(tmp.path(), cut);
        assert_load_fails(&file, &[&s(&file)]);
    }
}

#[test]
fn tokenize_rejects_gguf_truncated_in_the_tensor_data() {
    // A half-downloaded GGUF must be reported by every command, as a truncated safetensors is.
    let tmp = tempfile::tempdir().unwrap();
    let file = truncated_gguf(tmp.path(), |n| n / 2);
    assert_tokenize_fails(&file, &[&s(&file)]);
}

/// A GGUF whose metadata disagrees with its tensors (feed_forward_length 128 -> 96): one error
/// line naming the file, the tensor and both shapes.
#[test]
fn gguf_metadata_disagreeing_with_tensor_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.gguf");
    let mut bytes = std::fs::read(model_path("gemma3-gguf")).unwrap();
    // A GGUF key is followed by its value type (u32 4 = UINT32) and the value, little-endian.
    let key = b"gemma3.feed_forward_length";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(bytes[at..at + 8], [4, 0, 0, 0, 128, 0, 0, 0]);
    bytes[at + 4] = 96;
    std::fs::write(&file, bytes).unwrap();
    assert_load_fails(
        &file,
        &[&s(&file), "has shape", "[96, 256]", "the config implies"],
    );
}

/// Deterministic noise (xorshift), so no test depends on an RNG crate.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn random_bytes_named_model_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.gguf");
    std::fs::write(&file, noise(8192)).unwrap();
    assert_load_fails(&file, &[&s(&file), "GGUF"]);
    assert_tokenize_fails(&file, &[&s(&file), "GGUF"]);
}

#[test]
fn errors_stay_one_line_when_rust_backtrace_is_set() {
    // Many Rust users export RUST_BACKTRACE=1; a bad file must still give one `error:` line,
    // not a library's captured backtrace.
    let tmp = tempfile::tempdir().unwrap();
    let random = tmp.path().join("random.gguf");
    std::fs::write(&random, noise(8192)).unwrap();
    let half = truncated_gguf(tmp.path(), |n| n / 2);
    let st = copy_fixture("llama-gqa-tied", tmp.path());
    truncate(&st.join("model.safetensors"), 1000);
    for model in [&random, &half, &st] {
        for var in ["RUST_BACKTRACE", "RUST_LIB_BACKTRACE"] {
            let line = kaizen_env(["inspect", "--model", &s(model)], &[(var, "1")]).fails();
            assert_mentions(&line, &[&s(model)]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// bad input: data, prompts, adapters

/// Runs eval and tokenize --data on `data`; each must fail cleanly and mention `needles`.
fn assert_data_fails(data: &Path, needles: &[&str]) {
    let m = s(&model_path("neox-par-bpe"));
    let d = s(data);
    for args in [
        ["eval", "--model", &m, "--data", &d],
        ["tokenize", "--model", &m, "--data", &d],
    ] {
        let line = kaizen(args).fails();
        assert_mentions(&line, needles);
    }
}

#[test]
fn jsonl_with_an_invalid_line_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap();
    assert_data_fails(&data, &[&format!("{}:2", data.display()), "JSON"]);
}

#[test]
fn jsonl_line_without_text_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("notext.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n\n{\"content\": \"x\"}\n").unwrap();
    assert_data_fails(&data, &[&format!("{}:3", data.display()), "\"text\""]);

    let data = tmp.path().join("number.jsonl");
    std::fs::write(&data, "{\"text\": 5}\n").unwrap();
    assert_data_fails(&data, &[&format!("{}:1", data.display()), "\"text\""]);
}

#[test]
fn empty_jsonl_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, body) in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n")] {
        let data = tmp.path().join(name);
        std::fs::write(&data, body).unwrap();
        assert_data_fails(&data, &[&s(&data), "empty"]);
    }
}

#[test]
fn nonexistent_jsonl_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("missing.jsonl");
    assert_data_fails(&data, &[&s(&data)]);
    // The OS reason is said once, not repeated by the error chain.
    let m = s(&model_path("neox-par-bpe"));
    let line = kaizen(["eval", "--model", &m, "--data", &s(&data)]).fails();
    let parts: Vec<&str> = line.split(": ").collect();
    assert!(
        parts.windows(2).all(|w| w[0] != w[1]),
        "the error repeats itself: {line}"
    );
}

#[test]
fn empty_prompt() {
    for prompt in ["", "   "] {
        let line = kaizen([
            "generate",
            "--model",
            &s(&model_path("neox-par-bpe")),
            "--prompt",
            prompt,
        ])
        .fails();
        assert_mentions(&line, &["prompt"]);
    }
}

/// Runs inspect, eval and generate with `--adapter adapter` on `model`; each must fail cleanly.
fn assert_adapter_fails(model: &Path, adapter: &Path, needles: &[&str]) {
    let m = s(model);
    let a = s(adapter);
    let data = s(&lora_eval_data());
    let runs: [Vec<&str>; 3] = [
        vec!["inspect", "--model", &m, "--adapter", &a],
        vec!["eval", "--model", &m, "--adapter", &a, "--data", &data],
        vec!["generate", "--model", &m, "--adapter", &a, "--prompt", "Hi"],
    ];
    for args in runs {
        let line = kaizen(&args).fails();
        assert_mentions(&line, needles);
    }
}

#[test]
fn adapter_dir_without_adapter_config() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(
        adapter_path("neox-par-bpe").join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let model = model_path("neox-par-bpe");
    assert_adapter_fails(&model, &adapter, &[&s(&adapter), "adapter_config.json"]);
    let missing = tmp.path().join("no-such-adapter");
    assert_adapter_fails(&model, &missing, &[&s(&missing)]);
}

#[test]
fn adapter_for_another_architecture() {
    // Targets q_proj/v_proj, which a GPT-NeoX model does not have.
    let adapter = adapter_path("llama-gqa-tied");
    assert_adapter_fails(&model_path("neox-par-bpe"), &adapter, &[&s(&adapter)]);
}

#[test]
fn adapter_tensor_shapes_do_not_fit_the_model() {
    // Same layer names, other sizes: llama-mha-linear's head_dim 32 vs llama-gqa-tied's GQA.
    for (model, adapter) in [
        ("llama-gqa-tied", "llama-mha-linear"),
        ("llama-mha-linear", "llama-gqa-tied"),
    ] {
        let a = adapter_path(adapter);
        assert_adapter_fails(&model_path(model), &a, &[&s(&a), "shape", "lora_"]);
    }
}

#[test]
fn prompt_embeddings_of_the_wrong_shape_for_the_model() {
    // Prefix tables made for other models (layers x key/value x kv heads x head_dim differ).
    let root = repo_root().join("tests/fixtures/peft/prefix_tuning");
    for (made_for, model) in [
        ("llama-gqa-tied", "llama-mha-linear"),
        ("neox-seq-spiece", "llama-gqa-tied"),
    ] {
        let a = root.join(made_for).join("adapter");
        assert_adapter_fails(
            &model_path(model),
            &a,
            &[&s(&a), "prompt_embeddings", "shape"],
        );
    }
    // A prompt-tuning table must be (num_virtual_tokens, hidden): here a prefix table.
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("adapter");
    std::fs::create_dir(&a).unwrap();
    let from = root.join("llama-gqa-tied/adapter");
    std::fs::copy(
        from.join("adapter_model.safetensors"),
        a.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(from.join("adapter_config.json")).unwrap();
    std::fs::write(
        a.join("adapter_config.json"),
        cfg.replace("PREFIX_TUNING", "PROMPT_TUNING"),
    )
    .unwrap();
    assert_adapter_fails(
        &model_path("llama-gqa-tied"),
        &a,
        &[&s(&a), "prompt_embeddings", "shape"],
    );
}
