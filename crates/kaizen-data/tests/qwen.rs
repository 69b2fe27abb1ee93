//! A Qwen2/2.5/3-style directory (byte-level BPE tokenizer.json with Qwen's NFC normalizer, split
//! regex and added tokens; tokenizer_config.json as Qwen2.5-Instruct's, ChatML template) against
//! transformers' `AutoTokenizer` (a `Qwen2Tokenizer`), from scripts/fixtures/gen_qwen_tokenizer.py.

mod common;

use common::{check_reference, fixtures, ids};
use kaizen_data::chat::{render_chat_template, Message};
use kaizen_data::{Tokenizer, TokenizerKind};
use serde_json::Value;

fn qwen() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("qwen-bpe")).expect("load qwen-bpe/")
}

fn reference() -> Value {
    let path = fixtures().join("qwen-bpe/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn id_or_none(v: &Value) -> Option<u32> {
    v.as_u64().map(|i| i as u32)
}

#[test]
fn ids_and_decodes_match_transformers() {
    check_reference(
        &qwen(),
        reference()["cases"].as_array().unwrap(),
        "qwen-bpe",
    );
}

#[test]
fn special_tokens_and_vocabulary_match_transformers() {
    let tok = qwen();
    let reference = reference();
    assert_eq!(tok.kind(), TokenizerKind::HfJson);
    assert_eq!(tok.to_string(), "tokenizer.json (BPE)");
    assert_eq!(
        tok.vocab_size() as u64,
        reference["vocab_size"].as_u64().unwrap()
    );
    // bos_token is null (and add_bos_token false): no BOS id, nothing prepended.
    assert_eq!(tok.bos_id(), id_or_none(&reference["bos_id"]));
    assert_eq!(tok.eos_id(), id_or_none(&reference["eos_id"]));
    assert_eq!(
        tok.token_to_id("<|endoftext|>"),
        id_or_none(&reference["pad_id"])
    );
}

#[test]
fn digits_are_split_one_by_one() {
    let tok = qwen();
    let ids = tok.encode("2024", false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["2", "0", "2", "4"]);
}

/// The directory's template (Qwen2.5's, "qwen2.5"), and a Qwen3-style one ("qwen3-style":
/// namespace, reversed slice, `is string`, `split`/`strip` with arguments) given explicitly.
#[test]
fn chat_templates_render_as_transformers() {
    let tok = qwen();
    let reference = reference();
    let mut n = 0;
    for case in reference["chat"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = match case["template"].as_str().unwrap() {
            "qwen2.5" => tok.apply_chat_template(&msgs, gen).unwrap(),
            name => {
                let template = reference["chat_templates"][name].as_str().unwrap();
                render_chat_template(template, &msgs, gen, tok.bos_token(), tok.eos_token())
                    .unwrap()
            }
        };
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{case}");
        assert_eq!(
            tok.encode(&rendered, false).unwrap(),
            ids(&case["ids"]),
            "{case}"
        );
        n += 1;
    }
    assert_eq!(n, 16);
}
