//! Fixture access for kaizen-data's tests. The fixtures are written by
//! scripts/fixtures/gen_tokenizers.py (Python sentencepiece / tokenizers / transformers are the
//! reference); the tests need neither Python nor network.
#![allow(dead_code)]

pub mod gguf_file;

use std::path::PathBuf;

use kaizen_data::{TextStream, Tokenizer};
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/tokenizers")
}

pub fn cases() -> Value {
    let path = fixtures().join("cases.json");
    let text = std::fs::read_to_string(&path).expect("read tests/fixtures/tokenizers/cases.json");
    serde_json::from_str(&text).expect("parse cases.json")
}

/// The cases of one tokenizer in cases.json.
pub fn cases_of(name: &str) -> Vec<Value> {
    cases()[name].as_array().cloned().unwrap_or_default()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn spiece() -> Tokenizer {
    Tokenizer::from_spiece_file(&fixtures().join("spiece.model")).expect("load spiece.model")
}

pub fn spiece_prefix() -> Tokenizer {
    Tokenizer::from_spiece_file(&fixtures().join("spiece_prefix.model"))
        .expect("load spiece_prefix.model")
}

pub fn bpe() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("bpe")).expect("load bpe/")
}

/// Asserts `tok` encodes every case's text to its reference ids, and decodes them back to the
/// reference decode; reports all mismatches at once.
pub fn check_cases(tok: &Tokenizer, cases: &[Value], add_special_tokens: bool, decoded_key: &str) {
    assert!(!cases.is_empty(), "no cases");
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        let got = tok.encode(text, add_special_tokens).expect("encode");
        if got != want {
            failures.push(format!(
                "encode {text:?}\n   got  {got:?}\n   want {want:?}"
            ));
            continue;
        }
        let skip = decoded_key == "decoded_skip_special";
        let decoded = tok.decode(&want, skip).expect("decode");
        let want_text = case[decoded_key].as_str().expect("decoded");
        if decoded != want_text {
            failures.push(format!(
                "decode {want:?}\n   got  {decoded:?}\n   want {want_text:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Every case's ids (with and without default special tokens) and decodes against a reference
/// from transformers (`ids`, `ids_no_special`; `decoded`: `ids_no_special` decoded as they are;
/// `decoded_skip_special`: `ids` decoded skipping special tokens; `decoded` again through a
/// [`TextStream`]); reports all mismatches at once.
pub fn check_reference(tok: &Tokenizer, cases: &[Value], what: &str) {
    assert!(!cases.is_empty(), "{what}: no cases");
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        for (key, special) in [("ids", true), ("ids_no_special", false)] {
            let want = ids(&case[key]);
            let got = tok.encode(text, special).unwrap();
            if got != want {
                failures.push(format!("{key} {text:?}\n   got  {got:?}\n   want {want:?}"));
            }
        }
        for (key, ids_key, skip) in [
            ("decoded", "ids_no_special", false),
            ("decoded_skip_special", "ids", true),
        ] {
            let want = case[key].as_str().unwrap();
            let got = tok.decode(&ids(&case[ids_key]), skip).unwrap();
            if got != want {
                failures.push(format!("{key} {text:?}\n   got  {got:?}\n   want {want:?}"));
            }
        }
        // Streamed one id at a time, the chunks join to the same text.
        let mut stream = TextStream::new(tok);
        let mut streamed = String::new();
        for &id in &ids(&case["ids_no_special"]) {
            streamed.push_str(&stream.push(id).unwrap());
        }
        streamed.push_str(&stream.finish().unwrap());
        let want = case["decoded"].as_str().unwrap();
        if streamed != want {
            failures.push(format!(
                "stream {text:?}\n   got  {streamed:?}\n   want {want:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
