//! `merge` + HF export on the committed fixtures: a LoRA (or DoRA) adapter folded into the weights and
//! written as an HF directory loads back with kaizen to the same logits (1e-4 relative) and the
//! same token ids as base + adapter unmerged; a GGUF converts the same way; the config survives
//! `to_hf_json` -> `from_hf_json`; a non-empty destination is refused; a failed export leaves
//! nothing behind. (scripts/fixtures/check_merged.py checks the same directories with
//! transformers: tests/fixtures/merge_crosscheck.json.)

mod common;
use common::rel_err;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use kaizen::checkpoint::export::write_hf_dir;
use kaizen::config::ModelConfig;
use kaizen::tuners::load_adapter;
use kaizen::{Loaded, Model};

const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

fn adapter_path(name: &str) -> PathBuf {
    root()
        .join("tests/fixtures/lora")
        .join(name)
        .join("adapter")
}

fn texts() -> Vec<String> {
    kaizen_data::jsonl::read_texts(&root().join("tests/fixtures/lora/eval.jsonl")).unwrap()
}

fn load(path: &Path, adapter: Option<&Path>) -> Loaded {
    let mut m = kaizen::load(path).unwrap();
    if let Some(dir) = adapter {
        load_adapter(&mut m.model, dir).unwrap();
    }
    m
}

fn logits(m: &Loaded) -> Vec<Tensor> {
    texts()
        .iter()
        .map(|t| {
            let ids = m.tokenizer.encode(t, true).unwrap();
            m.model.logits(&ids, None).unwrap()
        })
        .collect()
}

/// Tensor names of the source checkpoint (all shards), less the buffers models ignore.
fn source_names(dir: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let file = p.file_name().unwrap().to_string_lossy().to_string();
        if file.starts_with("model") && file.ends_with(".safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            names.extend(st.names().into_iter().map(String::from));
        }
    }
    let ignored: Vec<&str> = kaizen::Architecture::ALL
        .iter()
        .flat_map(|a| a.spec().ignored)
        .copied()
        .collect();
    names.retain(|n| !ignored.iter().any(|s| n.ends_with(s)));
    names
}

fn written_names(dir: &Path) -> BTreeSet<String> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect()
}

/// Merges `adapter` into `model` (or only converts), writes, reloads, and compares with base +
/// adapter unmerged. Returns the temp dir holding `merged/`.
fn check(model: &str, adapter: Option<&str>) -> tempfile::TempDir {
    let src = model_path(model);
    let adapter = adapter.map(adapter_path);
    let unmerged = load(&src, adapter.as_deref());
    let expected = logits(&unmerged);

    let mut m = load(&src, adapter.as_deref());
    if adapter.is_some() {
        assert!(!kaizen::tuners::merge(&mut m.model).unwrap().is_empty());
        let base = logits(&load(&src, None));
        assert!(
            rel_err(&base[0], &expected[0]) > 1e-3,
            "{model}: the adapter changes nothing"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let exported = write_hf_dir(&mut m.model, &m.tokenizer, &src, &out, false).unwrap();
    assert!(exported.files.contains(&"config.json".to_string()));
    assert!(exported.files.contains(&"model.safetensors".to_string()));

    let back = kaizen::load(&out).unwrap();
    assert!(back.format.contains("F32"), "{}", back.format);
    assert_eq!(
        back.model.config().to_hf_json(),
        m.model.config().to_hf_json()
    );
    for (t, (got, want)) in texts().iter().zip(logits(&back).iter().zip(&expected)) {
        assert_eq!(
            back.tokenizer.encode(t, true).unwrap(),
            unmerged.tokenizer.encode(t, true).unwrap(),
            "{model}: token ids of {t:?}"
        );
        let err = rel_err(got, want);
        assert!(
            err < TOL,
            "{model}: logits of {t:?} differ by {err:e} (relative)"
        );
    }
    assert_eq!(
        back.tokenizer.chat_template(),
        unmerged.tokenizer.chat_template()
    );
    assert_eq!(back.tokenizer.eos_token(), unmerged.tokenizer.eos_token());
    if src.is_dir() {
        assert_eq!(
            written_names(&out),
            source_names(&src),
            "{model}: tensor names"
        );
    }
    tmp
}

#[test]
fn gpt_neox_sequential_partial_rotary_spiece() {
    let tmp = check("neox-seq-spiece", Some("neox-seq-spiece"));
    // SentencePiece: the .model file is copied, not rewritten.
    assert!(tmp.path().join("merged/spiece.model").is_file());
    assert!(!tmp.path().join("merged/tokenizer.json").exists());
}

#[test]
fn gpt_neox_parallel_sharded_rank_pattern() {
    check("neox-par-bpe", Some("neox-par-bpe"));
}

#[test]
fn llama_gqa_tied_llama3_rope() {
    let tmp = check("llama-gqa-tied", Some("llama-gqa-tied"));
    let names = written_names(&tmp.path().join("merged"));
    assert!(names.contains("model.embed_tokens.weight") && !names.contains("lm_head.weight"));
}

#[test]
fn llama_all_linear_rslora_linear_rope() {
    check("llama-mha-linear", Some("llama-mha-linear"));
}

/// DoRA: the merged weight is `(m / ||W + s B A||_row) (W + s B A)`, the bias unchanged (NeoX's
/// query_key_value has one); Llama with every linear targeted.
#[test]
fn dora_merges_into_the_weights() {
    check("neox-seq-spiece", Some("dora-neox-seq-spiece"));
    check("llama-gqa-tied", Some("dora-llama-gqa-tied"));
}

/// Every newer architecture: its LoRA merged, exported and reloaded gives the unmerged logits
/// (QK-norm, sandwich norms, sliding windows, soft-caps, fused projections in config.json).
#[test]
fn newer_architectures_merge_and_round_trip() {
    for name in NEWER {
        check(name, Some(name));
    }
}

const NEWER: [&str; 6] = ["gemma3", "gemma2", "qwen2", "qwen3", "mistral", "phi3"];

#[test]
fn gguf_converts_to_hf_dir() {
    let tmp = check("llama-gguf/model.gguf", None);
    let dir = tmp.path().join("merged");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    assert!(cfg["chat_template"].is_string() && cfg["eos_token"].is_string());
    assert!(dir.join("tokenizer.json").is_file());
}

#[test]
fn config_round_trips_through_hf_json() {
    for name in [
        "neox-seq-spiece",
        "neox-par-bpe",
        "llama-gqa-tied",
        "llama-mha-linear",
        "gemma3",
        "gemma2",
        "qwen2",
        "qwen3",
        "mistral",
        "phi3",
    ] {
        let cfg = ModelConfig::from_hf_file(&model_path(name).join("config.json")).unwrap();
        let json = cfg.to_hf_json();
        let back = ModelConfig::from_hf_json(json.as_object().unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"), "{name}");
    }
    // Every even rotary width survives the fraction (transformers reads int(head_dim * f)).
    let mut cfg =
        ModelConfig::from_hf_file(&model_path("neox-par-bpe").join("config.json")).unwrap();
    for head_dim in 2..=160 {
        for rotary_dim in (2..=head_dim).step_by(2) {
            (cfg.head_dim, cfg.rotary_dim) = (head_dim, rotary_dim);
            cfg.hidden_size = head_dim * cfg.num_attention_heads;
            let back = ModelConfig::from_hf_json(cfg.to_hf_json().as_object().unwrap()).unwrap();
            assert_eq!(back.rotary_dim, rotary_dim, "head_dim {head_dim}");
        }
    }
}

fn merged_model(name: &str) -> Loaded {
    let mut m = load(&model_path(name), Some(&adapter_path(name)));
    kaizen::tuners::merge(&mut m.model).unwrap();
    m
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect()
}

#[test]
fn refuses_non_empty_out_unless_overwrite() {
    let mut m = merged_model("llama-gqa-tied");
    let src = model_path("llama-gqa-tied");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = write_hf_dir(&mut m.model, &m.tokenizer, &src, &out, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(entries(&out), BTreeSet::from(["keep.txt".to_string()]));
    assert_eq!(entries(tmp.path()), BTreeSet::from(["merged".to_string()]));

    write_hf_dir(&mut m.model, &m.tokenizer, &src, &out, true).unwrap();
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").is_file());
    assert_eq!(entries(tmp.path()), BTreeSet::from(["merged".to_string()]));

    // An existing empty directory is filled; parents are created.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    write_hf_dir(&mut m.model, &m.tokenizer, &src, &empty, false).unwrap();
    let nested = tmp.path().join("a/b/c");
    write_hf_dir(&mut m.model, &m.tokenizer, &src, &nested, false).unwrap();
    kaizen::load(&nested).unwrap();
}

#[test]
fn refuses_to_overwrite_its_own_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("model");
    std::fs::create_dir(&src).unwrap();
    for f in entries(&model_path("llama-mha-linear")) {
        std::fs::copy(model_path("llama-mha-linear").join(&f), src.join(&f)).unwrap();
    }
    let mut m = load(&src, None);
    let before = entries(&src);
    let err = write_hf_dir(&mut m.model, &m.tokenizer, &src, &src, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds the model being read"), "{err}");
    assert_eq!(entries(&src), before);
}

#[test]
fn failed_export_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");

    // Fails after config.json and model.safetensors are written: a tokenizer "file" that is a
    // directory.
    let mut m = merged_model("neox-par-bpe");
    let bad_src = tmp.path().join("src");
    std::fs::create_dir_all(bad_src.join("tokenizer.json")).unwrap();
    let err = write_hf_dir(&mut m.model, &m.tokenizer, &bad_src, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected a tokenizer file"), "{err}");
    assert_eq!(entries(tmp.path()), BTreeSet::from(["src".to_string()]));

    // A source directory without tokenizer files.
    std::fs::remove_dir(bad_src.join("tokenizer.json")).unwrap();
    let err = write_hf_dir(&mut m.model, &m.tokenizer, &bad_src, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tokenizer files"), "{err}");
    assert_eq!(entries(tmp.path()), BTreeSet::from(["src".to_string()]));

    // An adapter still attached: refused before anything is written.
    let src = model_path("neox-par-bpe");
    let mut unmerged = load(&src, Some(&adapter_path("neox-par-bpe")));
    let err = write_hf_dir(&mut unmerged.model, &unmerged.tokenizer, &src, &out, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unmerged adapter"), "{err}");
    assert_eq!(entries(tmp.path()), BTreeSet::from(["src".to_string()]));
}

#[test]
fn named_weights_cover_the_parameter_count() {
    let names = ["neox-seq-spiece", "llama-gqa-tied", "llama-mha-linear"];
    for name in names.into_iter().chain(NEWER) {
        let mut m: Model = kaizen::load(&model_path(name)).unwrap().model;
        let n: usize = m
            .named_weights()
            .unwrap()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(n, m.config().num_parameters(), "{name}");
    }
}
