//! Tokenizers built from GGUF metadata.

mod common;

use common::{bpe, cases_of, check_reference, fixtures, gguf_file, ids};
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

/// The real SmolLM2-135M-Instruct GGUF tokenizer (gpt2/smollm) against transformers' GGUF
/// loader, when the generator found the GGUF in the cache (cache/*_gguf_tokenizer.json, not
/// committed). Gemma 3: `gemma3_270m_gguf_matches_transformers_when_present`.
#[test]
fn real_gguf_tokenizers_match_transformers_when_cached() {
    for (file, vocab_size, bos, eos) in [("smollm2_gguf_tokenizer.json", 49152, 1, 2)] {
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
        architecture: m["general.architecture"].as_str().map(Into::into),
    }
}

/// Builds a Gemma-style GGUF tokenizer and checks its vocabulary size, BOS/EOS and every
/// reference case against transformers'.
fn check_gemma(vocab: GgufVocab, reference: &Value, name: &str) -> Tokenizer {
    let tok = Tokenizer::from_gguf(vocab).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::GgufSentencePiece);
    let id = |k: &str| reference[k].as_u64().unwrap();
    assert_eq!(tok.vocab_size() as u64, id("vocab_size"));
    assert_eq!(
        (tok.bos_id(), tok.eos_id()),
        (Some(id("bos_id") as u32), Some(id("eos_id") as u32))
    );
    check_reference(&tok, reference["cases"].as_array().unwrap(), name);
    tok
}

/// The real Gemma 3 270M GGUF (not committed: `KAIZEN_GEMMA3_GGUF`, or
/// `<repo>/cache/gemma-3-270m-q4_k_m.gguf`) against the ids transformers' GGUF loader gives
/// (tests/fixtures/tokenizers/gemma3-270m.json, from scripts/fixtures/gen_gemma_tokenizer.py).
#[test]
fn gemma3_270m_gguf_matches_transformers_when_present() {
    let path = std::env::var_os("KAIZEN_GEMMA3_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("cache/gemma-3-270m-q4_k_m.gguf"));
    if !path.is_file() {
        eprintln!(
            "skipped: {} not present (set KAIZEN_GEMMA3_GGUF to the file, or put it in cache/)",
            path.display()
        );
        return;
    }
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gemma3-270m.json")).unwrap(),
    )
    .unwrap();
    let vocab = gguf_file::vocab(&gguf_file::read_metadata(&path));
    let start = std::time::Instant::now();
    let tok = check_gemma(vocab, &reference, "gemma3-270m");
    eprintln!(
        "Gemma 3 tokenizer built and checked in {:.2?}",
        start.elapsed()
    );
    assert_eq!(
        tok.chat_template().is_some(),
        reference["has_chat_template"].as_bool().unwrap()
    );
    // Thousands more texts, when the generator wrote them into the cache (not committed).
    let fuzz = common::repo_root().join("cache/gemma3_fuzz.json");
    if let Ok(text) = std::fs::read_to_string(&fuzz) {
        let cases: Vec<(String, Vec<u32>, Vec<u32>, String)> = serde_json::from_str(&text).unwrap();
        let bad: Vec<&String> = cases
            .iter()
            .filter(|(text, with, without, decoded)| {
                tok.encode(text, true).unwrap() != *with
                    || tok.encode(text, false).unwrap() != *without
                    || tok.decode(without, false).unwrap() != *decoded
            })
            .map(|c| &c.0)
            .collect();
        assert!(
            bad.is_empty(),
            "{} of {} fuzz texts differ: {bad:?}",
            bad.len(),
            cases.len()
        );
        eprintln!("{}: all {} texts match", fuzz.display(), cases.len());
    }
}

/// A tiny GGUF with Gemma 3's `tokenizer.*` layout (its own vocabulary: control and user-defined
/// tokens, runs of real spaces, byte tokens, no merges, no prefix space) against transformers'
/// GGUF loader: the code path of the real file, in CI.
#[test]
fn gemma_style_gguf_matches_transformers() {
    let dir = fixtures().join("gemma-gguf");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let vocab = gguf_file::vocab(&gguf_file::read_metadata(&dir.join("tokenizer.gguf")));
    // The shape of the real file: SentencePiece-style, no merges, BOS flag set, control,
    // user-defined and byte tokens, runs of real spaces.
    assert_eq!(
        (vocab.model.as_str(), vocab.pre.as_deref()),
        ("llama", Some("default"))
    );
    assert!(vocab.merges.is_none() && vocab.scores.is_some());
    assert_eq!((vocab.add_bos, vocab.add_eos), (Some(true), Some(false)));
    let types = vocab.token_types.as_deref().unwrap();
    assert!([3, 4, 6].iter().all(|t| types.contains(t)));
    assert!(vocab.tokens.iter().any(|t| t == "   "));
    let tok = check_gemma(vocab, &reference, "gemma-gguf");
    let mut n = 0;
    for case in reference["chat"].as_array().unwrap() {
        let msgs: Vec<kaizen_data::chat::Message> =
            serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tok.apply_chat_template(&msgs, gen).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{case}");
        assert_eq!(
            tok.encode(&rendered, false).unwrap(),
            ids(&case["ids"]),
            "{case}"
        );
        n += 1;
    }
    assert_eq!(n, 4);
}
