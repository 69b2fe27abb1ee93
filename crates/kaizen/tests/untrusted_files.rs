//! Model, config and adapter files from strangers (issue 14): each damaged value found by
//! mutating the committed fixtures gives one error line naming the file and the key (and the
//! allowed range), instead of a panic, an allocation abort, a hang, or silently wrong numbers.
//! The damaged inputs are built here from the fixtures' bytes: GGUF metadata is rewritten with
//! candle's GGUF writer, JSON files are edited, safetensors headers patched in place.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use kaizen::tuners::lora::LoraConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

/// The error of loading `path`, which must fail.
fn load_err(path: &Path) -> String {
    match kaizen::load(path) {
        Ok(_) => panic!("{} loaded, but should have been refused", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Asserts one line naming every needle, short and free of control characters.
fn assert_clean(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}; got:\n{err}");
    }
    assert!(
        !err.chars().any(|c| c.is_control()) && err.len() < 1500,
        "error must be one short printable line; got {} bytes:\n{err:?}",
        err.len()
    );
}

/// llama-gguf rewritten with `edit` applied to its metadata and `rename` to its tensor names.
fn edited_gguf(
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, Value>),
    rename: impl Fn(&str) -> String,
) -> PathBuf {
    let src = fixture("llama-gguf").join("model.gguf");
    let mut f = File::open(&src).unwrap();
    let content = Content::read(&mut f).unwrap();
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| (rename(n), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let mut md = content.metadata.clone();
    edit(&mut md);
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let path = dir.join("model.gguf");
    gguf_file::write(&mut File::create(&path).unwrap(), &md, &tensors).unwrap();
    path
}

fn gguf_with(dir: &Path, key: &str, v: Value) -> PathBuf {
    edited_gguf(
        dir,
        |md| {
            md.insert(key.to_string(), v);
        },
        str::to_string,
    )
}

#[test]
fn rewritten_gguf_fixture_still_loads() {
    // The rewrite itself changes nothing: the refusals below come from the edited values.
    let tmp = tempfile::tempdir().unwrap();
    let path = edited_gguf(tmp.path(), |_| {}, str::to_string);
    kaizen::load(&path).expect("an unedited rewrite loads");
    let path = gguf_with(tmp.path(), "llama.rope.dimension_count", Value::U32(8));
    kaizen::load(&path).expect("an even rotary count within head_dim loads");
}

#[test]
fn gguf_rope_dimension_count_must_be_even_and_within_head_dim() {
    // head_dim is 16. 32 panicked in nn/rotary.rs ("mid > len"); 2^31-1 took 4.3 GB and hung;
    // the others were accepted silently.
    let tmp = tempfile::tempdir().unwrap();
    for bad in [32, (1u32 << 31) - 1, 0, 1, 3, 7, 17] {
        let path = gguf_with(tmp.path(), "llama.rope.dimension_count", Value::U32(bad));
        let err = load_err(&path);
        assert_clean(
            &err,
            &[
                &path.display().to_string(),
                "\"llama.rope.dimension_count\"",
                &format!("is {bad}"),
                "even number between 2 and head_dim (16)",
            ],
        );
    }
}

#[test]
fn gguf_block_count_is_bounded_and_matched_to_the_tensors() {
    // 2^31-1 aborted with "memory allocation of 1013612281384 bytes failed".
    let tmp = tempfile::tempdir().unwrap();
    let path = gguf_with(tmp.path(), "llama.block_count", Value::U32(u32::MAX >> 1));
    let err = load_err(&path);
    assert_clean(
        &err,
        &["\"llama.block_count\" is 2147483647", "between 1 and 1024"],
    );
    let path = gguf_with(tmp.path(), "llama.block_count", Value::U64(1 << 63));
    assert_clean(
        &load_err(&path),
        &["\"llama.block_count\"", "between 1 and 1024"],
    );
    // In range, but the file holds 2 layers: refused before any layer is built.
    let path = gguf_with(tmp.path(), "llama.block_count", Value::U32(900));
    assert_clean(
        &load_err(&path),
        &["\"llama.block_count\" is 900", "the weights hold 2 layers"],
    );
}

#[test]
fn gguf_sizes_that_drive_allocations_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    for key in [
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.attention.key_length",
        "llama.context_length",
        "llama.vocab_size",
    ] {
        let path = gguf_with(tmp.path(), key, Value::U64(u64::MAX / 3));
        assert_clean(&load_err(&path), &[&format!("\"{key}\""), "between 1 and"]);
    }
}

#[test]
fn gguf_absurd_epsilon_and_rope_base_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (key, v, range) in [
        (
            "llama.attention.layer_norm_rms_epsilon",
            1e30,
            "above 0 and below 1",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            f32::NAN,
            "above 0 and below 1",
        ),
        ("llama.rope.freq_base", 1e-30, "between 1 and"),
        ("llama.rope.freq_base", f32::INFINITY, "between 1 and"),
    ] {
        let path = gguf_with(tmp.path(), key, Value::F32(v));
        assert_clean(&load_err(&path), &[&format!("\"{key}\""), range]);
    }
}

#[test]
fn gguf_general_alignment_zero_is_an_error_not_a_panic() {
    // candle's reader divides by the alignment; the panic is caught and named.
    let tmp = tempfile::tempdir().unwrap();
    let path = gguf_with(tmp.path(), "general.alignment", Value::U32(0));
    assert_clean(&load_err(&path), &[&path.display().to_string(), "crashed"]);
}

#[test]
fn gguf_tensor_name_of_20000_bytes_is_quoted_escaped_and_cut() {
    // The error used to print ~9 KB of raw file bytes, NULs and terminal escapes included.
    let tmp = tempfile::tempdir().unwrap();
    let long = format!("\0\x1b[31m{}.weight", "A".repeat(20_000));
    let path = edited_gguf(
        tmp.path(),
        |_| {},
        |n| match n {
            "output_norm.weight" => long.clone(),
            other => other.to_string(),
        },
    );
    let err = load_err(&path);
    assert_clean(&err, &[r#""gguf:\0\u{1b}[31mAAAA"#, "bytes)"]);
}

fn config_with(dir: &Path, key: &str, v: serde_json::Value) -> PathBuf {
    let to = dir.join("model");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(fixture("llama-gqa-tied")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let cfg = to.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json[key] = v;
    std::fs::write(&cfg, json.to_string()).unwrap();
    to
}

#[test]
fn config_json_sizes_are_bounded_before_anything_is_allocated() {
    // num_hidden_layers 2^40 aborted in `inspect`; 2^63 panicked with "capacity overflow".
    let tmp = tempfile::tempdir().unwrap();
    for (key, v) in [
        ("num_hidden_layers", 1u64 << 40),
        ("num_hidden_layers", 1 << 63),
        ("vocab_size", 1 << 40),
        ("hidden_size", 1 << 40),
        ("intermediate_size", 1 << 40),
        ("num_attention_heads", 1 << 40),
        ("num_key_value_heads", 1 << 40),
        ("head_dim", 1 << 40),
        ("max_position_embeddings", 1 << 40),
    ] {
        let dir = config_with(tmp.path(), key, v.into());
        let file = dir.join("config.json").display().to_string();
        assert_clean(
            &load_err(&dir),
            &[&file, &format!("\"{key}\" is {v}"), "between 1 and"],
        );
    }
}

/// A sharded checkpoint's index names its shards; one that is a path (outside the model
/// directory, or below it) is refused before anything is read.
#[test]
fn weight_map_entries_must_be_files_in_the_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = config_with(tmp.path(), "model_type", "llama".into());
    std::fs::rename(
        dir.join("model.safetensors"),
        tmp.path().join("outside.safetensors"),
    )
    .unwrap();
    let index = dir.join("model.safetensors.index.json");
    for shard in [
        "../outside.safetensors",
        "/etc/passwd",
        "sub/model.safetensors",
        "..",
    ] {
        let json = serde_json::json!({"weight_map": {"model.embed_tokens.weight": shard}});
        std::fs::write(&index, json.to_string()).unwrap();
        let err = load_err(&dir);
        assert_clean(
            &err,
            &[
                &index.display().to_string(),
                "not the name of a file in the model directory",
            ],
        );
        assert!(err.contains(&format!("{shard:?}")), "{err}");
    }
}

#[test]
fn config_json_layer_count_must_match_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = config_with(tmp.path(), "num_hidden_layers", 1000.into());
    let file = dir.join("config.json").display().to_string();
    assert_clean(
        &load_err(&dir),
        &[&file, "\"num_hidden_layers\" is 1000", "hold 2 layers"],
    );
}

#[test]
fn config_json_absurd_epsilon_and_rope_theta_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (key, v, range) in [
        ("rms_norm_eps", 1e30, "above 0 and below 1"),
        ("rms_norm_eps", 0.0, "above 0 and below 1"),
        ("rope_theta", 1e-30, "between 1 and"),
        ("rope_theta", 1e300, "between 1 and"),
    ] {
        let dir = config_with(tmp.path(), key, v.into());
        assert_clean(&load_err(&dir), &["config.json", key, range]);
    }
}

/// `dir/file` with the first `from` in its safetensors header replaced by `to` (same length).
fn patch_header(file: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = bytes[8..8 + n]
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("pattern in the header")
        + 8;
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn model_tensor_relabelled_as_integers_is_refused() {
    // Converted silently, it evaluated to a loss of 2e9 with exit code 0.
    let tmp = tempfile::tempdir().unwrap();
    let dir = config_with(tmp.path(), "model_type", "llama".into());
    patch_header(
        &dir.join("model.safetensors"),
        "\"dtype\":\"BF16\"",
        "\"dtype\":\"I16\" ",
    );
    assert_clean(
        &load_err(&dir),
        &["model.safetensors", "\"I16\"", "floating point"],
    );
}

fn adapter_copy(dir: &Path) -> PathBuf {
    let to = dir.join("adapter");
    std::fs::create_dir_all(&to).unwrap();
    let from = root().join("tests/fixtures/lora/llama-gqa-tied/adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to
}

fn adapter_err(adapter: &Path) -> String {
    let mut m = kaizen::load(&fixture("llama-gqa-tied")).unwrap().model;
    match kaizen::tuners::load_adapter(&mut m, adapter) {
        Ok(_) => panic!("the adapter loaded, but should have been refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn adapter_tensor_relabelled_as_integers_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter_copy(tmp.path());
    patch_header(
        &a.join("adapter_model.safetensors"),
        "\"dtype\":\"F32\"",
        "\"dtype\":\"I32\"",
    );
    assert_clean(
        &adapter_err(&a),
        &["adapter_model.safetensors", "I32", "floating point"],
    );
}

/// The fixture's adapter_config.json with `key` set to `v`, through [`LoraConfig::from_json`].
fn lora_config_err(key: &str, v: serde_json::Value) -> String {
    let path = root().join("tests/fixtures/lora/llama-gqa-tied/adapter/adapter_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    LoraConfig::from_json(json.as_object().unwrap()).expect("the fixture's config reads");
    json[key] = v;
    LoraConfig::from_json(json.as_object().unwrap()).expect_err("the edited config must fail")
}

#[test]
fn adapter_config_flags_of_the_wrong_type_are_errors() {
    // "x" and 5 used to count as false.
    for (key, v) in [
        ("use_dora", serde_json::json!("x")),
        ("use_rslora", serde_json::json!(5)),
        ("fan_in_fan_out", serde_json::json!("yes")),
    ] {
        let err = lora_config_err(key, v);
        assert_clean(&err, &[&format!("\"{key}\""), "true or false"]);
    }
    let err = lora_config_err("lora_alpha", serde_json::json!("16"));
    assert_clean(&err, &["\"lora_alpha\"", "must be a number"]);
    let err = lora_config_err("r", serde_json::json!(1u64 << 40));
    assert_clean(&err, &["\"r\"", "between 1 and 65536"]);
}

#[test]
fn adapter_config_invalid_pattern_regex_is_one_line() {
    for key in ["alpha_pattern", "rank_pattern"] {
        let err = lora_config_err(key, serde_json::json!({"q_proj[": 8}));
        assert_clean(
            &err,
            &[
                key,
                "\"q_proj[\"",
                "is not a valid regex",
                "unclosed character class",
            ],
        );
    }
    let err = lora_config_err("target_modules", serde_json::json!("(q_proj"));
    assert_clean(&err, &["target_modules", "is not a valid regex"]);
}

#[test]
fn adapter_config_negative_layer_index_is_named_as_such() {
    for v in [serde_json::json!([-1]), serde_json::json!(-1)] {
        let err = lora_config_err("layers_to_transform", v);
        assert_clean(
            &err,
            &["layers_to_transform", "-1", "non-negative layer index"],
        );
    }
}

/// Found by fuzzing (`crates/kaizen-fuzz`, config_json): a size given as a long string with
/// control characters (DEL, an escape sequence) was printed whole and raw into the error. It is
/// now escaped and cut, as file content in every other error; kaizen's bottleneck
/// adapter_config.json fields likewise.
#[test]
fn config_values_of_the_wrong_type_are_quoted_escaped_and_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = format!("{}\u{7f}\u{1b}[31m", "x".repeat(4000));
    let dir = config_with(tmp.path(), "hidden_size", junk.clone().into());
    assert_clean(
        &load_err(&dir),
        &["\"hidden_size\" must be a non-negative integer, found \"xxx"],
    );
    let adapter = tmp.path().join("bottleneck");
    std::fs::create_dir_all(&adapter).unwrap();
    let from = root().join("tests/fixtures/bottleneck/llama-gqa-tied/adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), adapter.join(f)).unwrap();
    }
    for key in ["bottleneck_size", "non_linearity"] {
        let cfg = adapter.join("adapter_config.json");
        let mut json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(from.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        json[key] = serde_json::json!([junk]);
        std::fs::write(&cfg, json.to_string()).unwrap();
        assert_clean(&adapter_err(&adapter), &[key, "found [\"xxx"]);
    }
}
