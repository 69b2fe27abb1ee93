//! An HF model directory with tokenizer.json + tokenizer_config.json (the byte-level BPE fixture).

mod common;

use common::{bpe, cases_of, check_cases, fixtures, ids};
use kaizen_data::{Tokenizer, TokenizerKind};

#[test]
fn ids_match_python_tokenizers_with_special_tokens() {
    check_cases(&bpe(), &cases_of("bpe"), true, "decoded");
}

#[test]
fn decode_skipping_special_tokens_matches() {
    check_cases(&bpe(), &cases_of("bpe"), true, "decoded_skip_special");
}

#[test]
fn ids_without_special_tokens_match() {
    let tok = bpe();
    for case in cases_of("bpe") {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids_no_special"]),
            "{text:?}"
        );
    }
}

#[test]
fn config_supplies_names_and_template() {
    let tok = bpe();
    assert_eq!(tok.kind(), TokenizerKind::HfJson);
    assert_eq!(tok.to_string(), "tokenizer.json (BPE)");
    assert_eq!(tok.vocab_size(), 600);
    assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
    // eos_token is given in the {"content": ...} form.
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(0), Some(2)));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    // The post-processor prepends BOS.
    assert_eq!(tok.encode("Hi", true).unwrap()[0], 0);
    assert_ne!(tok.encode("Hi", false).unwrap()[0], 0);
}

/// A copy of the fixture directory with tokenizer_config.json replaced.
fn dir_with_config(config: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("bpe/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn explicit_add_bos_add_eos_replace_the_post_processor() {
    let dir = dir_with_config(serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "add_bos_token": false, "add_eos_token": true,
    }));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let plain = tok.encode("Hi there", false).unwrap();
    let mut want = plain.clone();
    want.push(2);
    assert_eq!(tok.encode("Hi there", true).unwrap(), want);
}

#[test]
fn chat_template_list_takes_default() {
    let dir = dir_with_config(serde_json::json!({
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ messages[0]['content'] }}!"},
        ],
    }));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let msgs = [kaizen_data::chat::Message::new("user", "hey")];
    assert_eq!(tok.apply_chat_template(&msgs, false).unwrap(), "hey!");

    let dir = dir_with_config(serde_json::json!({
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}],
    }));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let err = tok
        .apply_chat_template(&msgs, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tool_use") && err.contains("\"default\""),
        "{err}"
    );
}

#[test]
fn chat_template_jinja_file_wins() {
    let dir = dir_with_config(serde_json::json!({"chat_template": "from config"}));
    std::fs::write(dir.path().join("chat_template.jinja"), "from file").unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template(), Some("from file"));
}

#[test]
fn unknown_bos_token_is_an_error_naming_the_file() {
    let dir = dir_with_config(serde_json::json!({"bos_token": "<s>"}));
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("\"<s>\""),
        "{err}"
    );
}

#[test]
fn directory_without_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("spiece.model"),
        "{err}"
    );
}

#[test]
fn spiece_directory_with_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("spiece.model"),
        dir.path().join("spiece.model"),
    )
    .unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_eos_token": true,
        "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}<NL>{% endfor %}",
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::SentencePiece);
    let ids = tok.encode("こんにちは", true).unwrap();
    assert_eq!(ids.last(), Some(&3));
    let msgs = [kaizen_data::chat::Message::new("ユーザー", "こんにちは")];
    assert_eq!(
        tok.apply_chat_template(&msgs, false).unwrap(),
        "ユーザー: こんにちは<NL>"
    );
}
