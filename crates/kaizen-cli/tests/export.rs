//! `kaizen export`, run as a binary on the committed fixtures: the f32 GGUF of a fixture reads
//! back (kaizen) to the source's greedy ids, an adapter merges into it, a LoRA adapter exports
//! alone; bad input (an unknown --type, an architecture llama.cpp export lacks, a DoRA adapter
//! with --lora-only, an --out that cannot be written, a tokenizer llama.cpp would not split the
//! same way) fails with one `error:` line, a nonzero exit and no file left behind. That llama.cpp
//! itself runs these files is checked by scripts/export/check_llamacpp.sh, and their bytes
//! against llama.cpp's converter by crates/kaizen/tests/gguf_export.rs.

mod common;
use common::*;

use std::path::Path;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn greedy(model: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "hello world",
        "--greedy",
    ];
    args.extend_from_slice(&["--max-new-tokens", "8", "--min-new-tokens", "8", "--json"]);
    args.extend_from_slice(extra);
    last_json(&kaizen(args).ok())["ids"].clone()
}

#[test]
fn f32_export_reads_back_to_the_same_greedy_ids() {
    let dir = tempfile::tempdir().unwrap();
    // (llama-mha-linear: kaizen does not read a GGUF's Llama 3 `rope_freqs` back yet.)
    let src = s(&model_path("llama-mha-linear"));
    let out = dir.path().join("m.gguf");
    let stdout = kaizen([
        "export",
        "--model",
        &src,
        "--out",
        &s(&out),
        "--type",
        "f32",
    ])
    .ok();
    assert_mentions(&stdout, &["llama", "F32"]);
    assert_eq!(greedy(&s(&out), &[]), greedy(&src, &[]));
}

#[test]
fn merged_adapter_export_matches_unmerged_generation() {
    let dir = tempfile::tempdir().unwrap();
    let src = s(&model_path("qwen2"));
    let adapter = s(&adapter_path("qwen2"));
    let out = dir.path().join("merged.gguf");
    let stdout = kaizen([
        "export",
        "--model",
        &src,
        "--adapter",
        &adapter,
        "--out",
        &s(&out),
        "--type",
        "f32",
    ])
    .ok();
    assert_mentions(&stdout, &["qwen2", "merged into"]);
    assert_eq!(
        greedy(&s(&out), &[]),
        greedy(&src, &["--adapter", &adapter])
    );
}

#[test]
fn lora_only_writes_an_adapter_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let src = s(&model_path("llama-gqa-tied"));
    let adapter = s(&adapter_path("llama-gqa-tied"));
    let out = dir.path().join("lora.gguf");
    let stdout = kaizen([
        "export",
        "--model",
        &src,
        "--adapter",
        &adapter,
        "--lora-only",
        "--out",
        &s(&out),
    ])
    .ok();
    assert_mentions(&stdout, &["LoRA GGUF", "llama"]);
    assert_eq!(listing(dir.path()), ["lora.gguf"]);
}

#[test]
fn bad_input_fails_with_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = s(&dir.path().join("x.gguf"));
    let llama = s(&model_path("llama-gqa-tied"));
    let err = kaizen(["export", "--model", &llama, "--out", &out, "--type", "q3_k"]).fails();
    assert_mentions(&err, &["--type", "q3_k", "q4_k_m"]);
    let dora = s(&adapter_path("dora-llama-gqa-tied"));
    let err = kaizen([
        "export",
        "--model",
        &llama,
        "--adapter",
        &dora,
        "--lora-only",
        "--out",
        &out,
    ])
    .fails();
    assert_mentions(&err, &["use_dora", "merged model"]);
    let missing = s(&dir.path().join("no/such/dir/x.gguf"));
    let err = kaizen(["export", "--model", &llama, "--out", &missing]).fails();
    assert_mentions(&err, &["does not exist"]);
    let err = kaizen(["export", "--model", &llama, "--out", &s(dir.path())]).fails();
    assert_mentions(&err, &["not a directory"]);
    // A tokenizer whose pre-tokenizer llama.cpp has no name for is refused after loading,
    // before anything is written.
    let copy = copy_fixture("llama-gqa-tied", &dir.path().join("odd"));
    let tok_path = copy.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    tok["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = false.into();
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let err = kaizen(["export", "--model", &s(&copy), "--out", &out]).fails();
    assert_mentions(&err, &["tokenizer.json", "pre_tokenizer"]);
    assert_eq!(
        listing(dir.path()),
        ["odd"],
        "a failed export left files behind"
    );
}

#[test]
fn an_existing_file_is_replaced_only_with_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    std::fs::write(&out, b"keep").unwrap();
    let src = s(&model_path("llama-gqa-tied"));
    let err = kaizen(["export", "--model", &src, "--out", &s(&out)]).fails();
    assert_mentions(&err, &["exists", "--overwrite"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    kaizen([
        "export",
        "--model",
        &src,
        "--out",
        &s(&out),
        "--overwrite",
        "--type",
        "q8_0",
    ])
    .ok();
    assert!(file_len(&out) > 4);
    assert_eq!(listing(dir.path()), ["m.gguf"]);
}
