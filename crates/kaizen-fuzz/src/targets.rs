//! The fuzz targets: each writes the input where kaizen would find it (a file of a model,
//! tokenizer or adapter directory whose other files are the committed fixtures) and drives the
//! same loading code the CLI runs, then uses what loaded (encode, decode, render, a forward).
//! An `Err` is a refused input, as it should be; a panic, a hang or a huge allocation is a
//! finding (the runner's business).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kaizen::{DType, Precision, QFormat};
use kaizen_data::chat::{render_chat_template, Message};
use kaizen_data::{load_dataset, DataOptions, Template, TextStream, Tokenizer};

use crate::Target;

macro_rules! fixture {
    ($path:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/",
            $path
        ))
        .as_slice()
    };
}

/// The base model every model-level target completes (a llama with GQA and a tied head).
const LLAMA: &[(&str, &[u8])] = &[
    ("config.json", fixture!("models/llama-gqa-tied/config.json")),
    (
        "model.safetensors",
        fixture!("models/llama-gqa-tied/model.safetensors"),
    ),
    (
        "tokenizer.json",
        fixture!("models/llama-gqa-tied/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        fixture!("models/llama-gqa-tied/tokenizer_config.json"),
    ),
];

const BPE_CONFIG: &[u8] = fixture!("tokenizers/bpe/tokenizer_config.json");
const QWEN_JSON: &[u8] = fixture!("tokenizers/qwen-bpe/tokenizer.json");
const QWEN_CONFIG: &[u8] = fixture!("tokenizers/qwen-bpe/tokenizer_config.json");

/// Adapter weights for llama-gqa-tied by `peft_type`, for the adapter_config.json target.
const ADAPTERS: &[(&str, &[u8])] = &[
    (
        "LORA",
        fixture!("lora/llama-gqa-tied/adapter/adapter_model.safetensors"),
    ),
    (
        "IA3",
        fixture!("peft/ia3/llama-gqa-tied/adapter/adapter_model.safetensors"),
    ),
    (
        "VERA",
        fixture!("peft/vera/llama-gqa-tied/adapter/adapter_model.safetensors"),
    ),
    (
        "BOTTLENECK",
        fixture!("bottleneck/llama-gqa-tied/adapter/adapter_model.safetensors"),
    ),
    (
        "PROMPT_TUNING",
        fixture!("peft/prompt_tuning/llama-gqa-tied/adapter/adapter_model.safetensors"),
    ),
    (
        "P_TUNING",
        fixture!("peft/p_tuning/llama-gqa-tied/adapter/adapter_model.safetensors"),
    ),
    (
        "PREFIX_TUNING",
        fixture!("peft/prefix_tuning/llama-gqa-tied/adapter/adapter_model.safetensors"),
    ),
];
const LORA_CONFIG: &[u8] = fixture!("lora/llama-gqa-tied/adapter/adapter_config.json");

/// Text that reaches byte fallback, added tokens, normalizers and pre-tokenizers.
const TEXT: &str = "Hello wörld! 12345 <|im_start|>user\n ｈｅｌｌｏ 👍🏽\t\u{0}  x▁y</s><s>";

fn messages() -> Vec<Message> {
    vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Hi <|im_end|> {{ x }}"),
        Message::new("assistant", "Hello."),
        Message::new("user", "And?"),
    ]
}

thread_local! {
    /// One working directory per target and thread: the fixture files are written once, the
    /// fuzzed file before each case.
    static DIRS: RefCell<HashMap<(Target, &'static str), tempfile::TempDir>> =
        RefCell::new(HashMap::new());
}

/// A directory holding `files`, made once per thread, with `name` then (over)written to `data`.
fn dir_with(
    target: Target,
    role: &'static str,
    files: &[(&str, &[u8])],
    name: &str,
    data: &[u8],
) -> Result<PathBuf, String> {
    DIRS.with(|dirs| {
        let mut dirs = dirs.borrow_mut();
        let dir = match dirs.entry((target, role)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let d = tempfile::Builder::new()
                    .prefix(&format!("kaizen-fuzz-{}-", target.name()))
                    .tempdir()
                    .map_err(|e| format!("cannot make a work directory: {e}"))?;
                v.insert(d)
            }
        };
        let path = dir.path().to_path_buf();
        // Rewrite the fixture files each time: a case may not leave a changed directory behind.
        for (f, bytes) in files {
            if *f != name {
                write_if_changed(&path.join(f), bytes)?;
            }
        }
        if !name.is_empty() {
            std::fs::write(path.join(name), data)
                .map_err(|e| format!("cannot write {name}: {e}"))?;
        }
        Ok(path)
    })
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let same = std::fs::metadata(path).is_ok_and(|m| m.len() == bytes.len() as u64);
    if !same {
        std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Runs one input through `target`'s loading code.
pub fn run(target: Target, data: &[u8]) -> Result<(), String> {
    match target {
        Target::Safetensors => model_dir(target, "model.safetensors", data),
        Target::ConfigJson => model_dir(target, "config.json", data),
        Target::Gguf => gguf(data),
        Target::AdapterConfig => adapter(target, data, None),
        Target::AdapterSafetensors => adapter(target, LORA_CONFIG, Some(data)),
        Target::TokenizerJson => {
            let files = [("tokenizer_config.json", BPE_CONFIG)];
            let dir = dir_with(target, "dir", &files, "tokenizer.json", data)?;
            use_tokenizer(&Tokenizer::from_dir(&dir).map_err(err)?)
        }
        Target::TokenizerConfig => {
            let files = [("tokenizer.json", QWEN_JSON)];
            let dir = dir_with(target, "dir", &files, "tokenizer_config.json", data)?;
            use_tokenizer(&Tokenizer::from_dir(&dir).map_err(err)?)
        }
        Target::Spiece => {
            let dir = dir_with(target, "dir", &[], "spiece.model", data)?;
            use_tokenizer(&Tokenizer::from_dir(&dir).map_err(err)?)
        }
        Target::Jsonl => jsonl(data),
        Target::ChatTemplate => {
            let template = String::from_utf8_lossy(data);
            render_chat_template(&template, &messages(), true, Some("<s>"), Some("</s>"))
                .map(drop)
                .map_err(err)
        }
    }
}

/// An HF model directory with one file replaced, loaded as `kaizen infer --model DIR` does.
fn model_dir(target: Target, name: &str, data: &[u8]) -> Result<(), String> {
    let dir = dir_with(target, "model", LLAMA, name, data)?;
    let loaded = kaizen::load_with(&dir, precision(data)).map_err(err)?;
    use_model(&loaded.model, &loaded.tokenizer)
}

/// Half the inputs load in f32, the others as bf16 or quantized (`--dtype`, `--quantize`),
/// chosen by the input's length so a case replays the same way.
fn precision(data: &[u8]) -> Precision {
    let mut p = Precision::default();
    match data.len() % 4 {
        1 => p.dtype = DType::BF16,
        2 => p.quantize = QFormat::parse("q8_0").ok(),
        3 => p.quantize = QFormat::parse("nf4").ok(),
        _ => {}
    }
    p
}

fn gguf(data: &[u8]) -> Result<(), String> {
    let dir = dir_with(Target::Gguf, "file", &[], "model.gguf", data)?;
    let loaded = kaizen::load_with(&dir.join("model.gguf"), precision(data)).map_err(err)?;
    use_model(&loaded.model, &loaded.tokenizer)
}

/// A PEFT adapter directory attached to the base model, as `--adapter DIR` does.
fn adapter(target: Target, config: &[u8], weights: Option<&[u8]>) -> Result<(), String> {
    let base = dir_with(target, "model", LLAMA, "config.json", LLAMA[0].1)?;
    let mut loaded = kaizen::load(&base).expect("the committed fixture model loads");
    let weights = weights.unwrap_or_else(|| {
        let peft_type = serde_json::from_slice::<serde_json::Value>(config)
            .ok()
            .and_then(|v| v.get("peft_type")?.as_str().map(str::to_string));
        ADAPTERS
            .iter()
            .find(|(t, _)| Some(*t) == peft_type.as_deref())
            .map_or(ADAPTERS[0].1, |(_, w)| w)
    });
    let files = [
        ("adapter_config.json", config),
        ("adapter_model.safetensors", weights),
    ];
    let dir = dir_with(target, "adapter", &files, "", &[])?;
    kaizen::tuners::load_adapter(&mut loaded.model, &dir).map_err(err)?;
    use_model(&loaded.model, &loaded.tokenizer)
}

fn jsonl(data: &[u8]) -> Result<(), String> {
    let files = [
        ("tokenizer.json", QWEN_JSON),
        ("tokenizer_config.json", QWEN_CONFIG),
    ];
    let tok_dir = dir_with(Target::Jsonl, "tokenizer", &files, "", &[])?;
    let tok = Tokenizer::from_dir(&tok_dir).expect("the committed fixture tokenizer loads");
    let dir = dir_with(Target::Jsonl, "data", &[], "data.jsonl", data)?;
    let path = dir.join("data.jsonl");
    let _ = kaizen_data::jsonl::read_texts(&path);
    let template = [Template::Chat, Template::Alpaca][data.len() % 2];
    let opts = DataOptions {
        template: Some(template),
        max_len: 64,
    };
    load_dataset(&path, &tok, &opts).map(drop).map_err(err)
}

/// What `kaizen eval` and `generate` do first: tokenize, score, detokenize.
fn use_model(model: &kaizen::Model, tok: &Tokenizer) -> Result<(), String> {
    let ids = tok.encode(TEXT, true).map_err(err)?;
    let ids: Vec<u32> = ids.into_iter().take(8).collect();
    kaizen::eval::score_ids(model, &ids).map_err(err)?;
    tok.decode(&ids, true).map_err(err)?;
    Ok(())
}

fn use_tokenizer(tok: &Tokenizer) -> Result<(), String> {
    let ids = tok.encode(TEXT, true).map_err(err)?;
    tok.encode("", false).map_err(err)?;
    tok.decode(&ids, false).map_err(err)?;
    tok.decode(&ids, true).map_err(err)?;
    let mut stream = TextStream::new(tok);
    for &id in &ids {
        stream.push(id).map_err(err)?;
    }
    stream.finish().map_err(err)?;
    // Ids a model's vocabulary may hold beyond the tokenizer's.
    let _ = tok.decode(&[0, 1, u32::MAX, tok.vocab_size() as u32], false);
    if tok.chat_template().is_some() {
        tok.apply_chat_template(&messages(), true).map_err(err)?;
    }
    let _ = tok.to_json_string();
    Ok(())
}
