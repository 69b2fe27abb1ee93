//! Tokenizers built from GGUF metadata.

mod common;

use common::{bpe, cases_of, fixtures, ids};
use kaizen_data::{GgufVocab, Tokenizer, TokenizerKind};
use serde_json::Value;

/// A GGUF-style vocabulary (what llama.cpp's converter writes) built from the fixture
/// tokenizer.json: tokens by id, "a b" merges, control types for the special tokens.
fn gguf_from_fixture(pre: &str) -> GgufVocab {
    let path = fixtures().join("bpe/tokenizer.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (tok, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = tok.clone();
    }
    let merges = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
            other => panic!("merge {other}"),
        })
        .collect();
    let token_types = tokens
        .iter()
        .map(|t| if t.starts_with("<|") { 3 } else { 1 })
        .collect();
    GgufVocab {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        token_types: Some(token_types),
        merges: Some(merges),
        bos_id: Some(0),
        eos_id: Some(2),
        add_bos: Some(true),
        chat_template: Some("{{ bos_token }}".into()),
        ..Default::default()
    }
}

#[test]
fn gpt2_vocab_gives_the_same_ids_as_tokenizer_json() {
    let tok = Tokenizer::from_gguf(gguf_from_fixture("smollm")).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::GgufBpe);
    assert_eq!(tok.to_string(), "GGUF gpt2 (byte-level BPE, pre=smollm)");
    let reference = bpe();
    for case in cases_of("bpe") {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
        let got = tok.decode(&ids(&case["ids"]), true).unwrap();
        assert_eq!(got, reference.decode(&ids(&case["ids"]), true).unwrap());
    }
    assert_eq!(tok.vocab_size(), 600);
    assert_eq!(
        (tok.bos_token(), tok.eos_token()),
        (Some("<|endoftext|>"), Some("<|im_end|>"))
    );
    assert_eq!(
        tok.apply_chat_template(&[], false).unwrap(),
        "<|endoftext|>"
    );
}

#[test]
fn gpt2_adds_bos_only_when_the_file_says_so() {
    let mut vocab = gguf_from_fixture("smollm");
    vocab.add_bos = None;
    let tok = Tokenizer::from_gguf(vocab).unwrap();
    assert_eq!(
        tok.encode("Hi", true).unwrap(),
        tok.encode("Hi", false).unwrap()
    );
    let mut vocab = gguf_from_fixture("smollm");
    vocab.add_eos = Some(true);
    let tok = Tokenizer::from_gguf(vocab).unwrap();
    let ids = tok.encode("Hi", true).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (0, 2));
}

#[test]
fn smollm_splits_digits_and_default_does_not() {
    // With "smollm" every digit is its own pre-token; GPT-2's default keeps "12" together,
    // so a "1 2"-style merge could apply. Both must still round-trip.
    for pre in ["smollm", "default", "llama-bpe"] {
        let tok = Tokenizer::from_gguf(gguf_from_fixture(pre)).unwrap();
        let ids = tok.encode("year 2024, 12 o'clock", false).unwrap();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "year 2024, 12 o'clock",
            "{pre}"
        );
    }
}

#[test]
fn special_tokens_are_matched_whole() {
    let tok = Tokenizer::from_gguf(gguf_from_fixture("smollm")).unwrap();
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

/// A SentencePiece-style (`llama`) vocabulary: the spiece fixture's pieces and scores.
fn llama_vocab() -> GgufVocab {
    let tokens: Vec<String> = (0..600)
        .map(|i| common::spiece_prefix().id_to_token(i).unwrap())
        .collect();
    let types = tokens
        .iter()
        .map(|t| match t.as_str() {
            "<unk>" => 2,
            "<s>" | "</s>" => 3,
            t if t.starts_with("<0x") => 6,
            _ => 1,
        })
        .collect();
    GgufVocab {
        model: "llama".into(),
        scores: Some((0..tokens.len()).map(|i| -(i as f32)).collect()),
        tokens,
        token_types: Some(types),
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        ..Default::default()
    }
}

#[test]
fn llama_vocab_adds_bos_by_default_and_falls_back_to_bytes() {
    let tok = Tokenizer::from_gguf(llama_vocab()).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::GgufSentencePiece);
    let text = "Hello world 龘🙂";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids[0], 1, "{ids:?}");
    assert!(!ids.contains(&0), "no <unk> with byte fallback: {ids:?}");
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    // The prefix space is added once, at the start.
    let pieces: Vec<String> = tok
        .encode("Hello", false)
        .unwrap()
        .iter()
        .map(|&i| tok.id_to_token(i).unwrap())
        .collect();
    assert!(pieces[0].starts_with('\u{2581}'), "{pieces:?}");
    let mut vocab = llama_vocab();
    vocab.add_bos = Some(false);
    let tok = Tokenizer::from_gguf(vocab).unwrap();
    assert_ne!(tok.encode(text, true).unwrap()[0], 1);
}

#[test]
fn bad_metadata_is_a_clear_error() {
    let mut vocab = gguf_from_fixture("smollm");
    vocab.bos_id = Some(600);
    let err = Tokenizer::from_gguf(vocab).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.bos_token_id is 600") && err.contains("600 tokens"),
        "{err}"
    );
    let mut vocab = gguf_from_fixture("smollm");
    vocab.model = "bert".into();
    let err = Tokenizer::from_gguf(vocab).unwrap_err().to_string();
    assert!(err.contains("\"bert\"") && err.contains("gpt2"), "{err}");
    let mut vocab = gguf_from_fixture("smollm");
    vocab.merges = Some(vec!["nospace".into()]);
    let err = Tokenizer::from_gguf(vocab).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.merges[0]"), "{err}");
}

/// Real GGUF tokenizers (SmolLM2-135M-Instruct: gpt2/smollm; Gemma 3 270M: llama/Gemma)
/// against transformers' GGUF loader, when the generator found the GGUFs in the cache
/// (cache/*_gguf_tokenizer.json, not committed).
#[test]
fn real_gguf_tokenizers_match_transformers_when_cached() {
    for (file, vocab_size, bos, eos) in [
        ("smollm2_gguf_tokenizer.json", 49152, 1, 2),
        ("gemma3_gguf_tokenizer.json", 262144, 2, 1),
    ] {
        let path = common::repo_root().join("cache").join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!(
                "skipped: {} not present (run scripts/fixtures/gen_tokenizers.py)",
                path.display()
            );
            continue;
        };
        let reference: Value = serde_json::from_str(&text).unwrap();
        let tok = Tokenizer::from_gguf(vocab_from_metadata(&reference["metadata"])).unwrap();
        assert_eq!(tok.vocab_size(), vocab_size, "{file}");
        assert_eq!(
            (tok.bos_id(), tok.eos_id()),
            (Some(bos), Some(eos)),
            "{file}"
        );
        for case in reference["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["ids"]);
            assert_eq!(tok.encode(text, true).unwrap(), want, "{file}: {text:?}");
            let plain = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&plain, false).unwrap(), text, "{file}");
        }
        if let Some(chat) = reference["chat"].as_str() {
            let msgs = [kaizen_data::chat::Message::new("user", "Hi")];
            assert_eq!(
                tok.apply_chat_template(&msgs, true).unwrap(),
                chat,
                "{file}"
            );
        }
    }
}

/// What a GGUF reader would fill in, from the `tokenizer.*` metadata as gguf-py dumps it.
fn vocab_from_metadata(m: &Value) -> GgufVocab {
    let strings = |k: &str| -> Option<Vec<String>> {
        m[k].as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
    };
    let id = |k: &str| m[k].as_u64().map(|v| v as u32);
    GgufVocab {
        model: m["tokenizer.ggml.model"].as_str().unwrap().into(),
        pre: m["tokenizer.ggml.pre"].as_str().map(Into::into),
        tokens: strings("tokenizer.ggml.tokens").unwrap(),
        scores: m["tokenizer.ggml.scores"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_f64().unwrap() as f32).collect()),
        token_types: m["tokenizer.ggml.token_type"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_i64().unwrap() as i32).collect()),
        merges: strings("tokenizer.ggml.merges"),
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        unk_id: id("tokenizer.ggml.unknown_token_id"),
        pad_id: id("tokenizer.ggml.padding_token_id"),
        add_bos: m["tokenizer.ggml.add_bos_token"].as_bool(),
        add_eos: m["tokenizer.ggml.add_eos_token"].as_bool(),
        chat_template: m["tokenizer.chat_template"].as_str().map(Into::into),
    }
}
