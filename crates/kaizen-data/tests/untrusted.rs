//! Tokenizer files from strangers (issue 14): what made the `tokenizers` crate panic, or made
//! loading take time in the square of a token's length, is refused with one error line naming
//! the file and the field. The damaged files are built here from the committed fixtures.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fixtures;
use kaizen_data::Tokenizer;
use sentencepiece_model::SentencePieceModel;
use serde_json::{json, Value};

fn bpe_json() -> Value {
    let text = std::fs::read_to_string(fixtures().join("bpe/tokenizer.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn write_json(dir: &Path, json: &Value) -> PathBuf {
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn load_err(path: &Path) -> String {
    match Tokenizer::from_json_file(path) {
        Ok(_) => panic!("{} loaded, but should have been refused", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}; got:\n{err}");
    }
    assert!(!err.contains('\n'), "one line expected:\n{err}");
}

#[test]
fn unedited_fixture_loads_and_encodes() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::from_json_file(&write_json(tmp.path(), &bpe_json())).unwrap();
    assert!(!tok.encode("hello", true).unwrap().is_empty());
}

#[test]
fn template_naming_an_unknown_special_token_is_refused() {
    // It deserialized, then panicked inside `tokenizers` (processors/template.rs) on encode.
    let tmp = tempfile::tempdir().unwrap();
    let mut json = bpe_json();
    json["post_processor"]["single"][0]["SpecialToken"]["id"] = json!("<|nope|>");
    let path = write_json(tmp.path(), &json);
    let err = load_err(&path);
    assert_mentions(
        &err,
        &[
            &path.display().to_string(),
            "post_processor",
            "\"<|nope|>\"",
            "special_tokens",
        ],
    );
}

#[test]
fn single_template_using_the_second_sequence_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut json = bpe_json();
    json["post_processor"]["single"][1]["Sequence"]["id"] = json!("B");
    let err = load_err(&write_json(tmp.path(), &json));
    assert_mentions(&err, &["post_processor", "$B"]);
}

#[test]
fn template_special_token_outside_the_vocabulary_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut json = bpe_json();
    let tokens = json["post_processor"]["special_tokens"]
        .as_object_mut()
        .unwrap();
    let (_, first) = tokens.iter_mut().next().unwrap();
    first["ids"] = json!([4_000_000_000u32]);
    let err = load_err(&write_json(tmp.path(), &json));
    assert_mentions(
        &err,
        &["post_processor", "4000000000", "outside the vocabulary"],
    );
}

fn with_precompiled(charsmap: &str) -> Value {
    let mut json = bpe_json();
    json["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": charsmap});
    json
}

#[test]
fn precompiled_normalizer_with_a_bad_charsmap_is_refused() {
    // "AAAA" panicked inside `tokenizers` (normalizers/mod.rs: expect("Precompiled")).
    let tmp = tempfile::tempdir().unwrap();
    for bad in ["AAAA", "not base64!", "/////w==", "AQAAAA=="] {
        let path = write_json(tmp.path(), &with_precompiled(bad));
        let err = load_err(&path);
        assert_mentions(&err, &[&path.display().to_string(), "precompiled_charsmap"]);
    }
    // Inside a Sequence too.
    let mut json = bpe_json();
    json["normalizer"] = json!({"type": "Sequence", "normalizers": [
        {"type": "NFC"},
        {"type": "Precompiled", "precompiled_charsmap": "AAAA"},
    ]});
    assert_mentions(
        &load_err(&write_json(tmp.path(), &json)),
        &["precompiled_charsmap"],
    );
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |a, (i, &b)| a | ((b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            match i <= c.len() {
                true => out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char),
                false => out.push('='),
            }
        }
    }
    out
}

#[test]
fn a_real_precompiled_charsmap_passes_the_checks() {
    // The nmt_nfkc charsmap of the committed spiece.model, as HF writes it into tokenizer.json:
    // the trie walk the checks make must accept a real one.
    let model = SentencePieceModel::from_file(fixtures().join("spiece.model")).unwrap();
    let charsmap = model.normalizer().unwrap().precompiled_charsmap();
    assert!(charsmap.len() > 1000, "the fixture has a charsmap");
    let tmp = tempfile::tempdir().unwrap();
    let json = with_precompiled(&base64(charsmap));
    let tok = Tokenizer::from_json_file(&write_json(tmp.path(), &json)).unwrap();
    // Full-width letters are folded by NFKC.
    assert_eq!(
        tok.encode("ｈｅｌｌｏ", false).unwrap(),
        tok.encode("hello", false).unwrap()
    );
}

#[test]
fn added_token_longer_than_the_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut json = bpe_json();
    json["added_tokens"][0]["content"] = json!("x".repeat(20_000));
    let err = load_err(&write_json(tmp.path(), &json));
    assert_mentions(&err, &["added_tokens", "20000 bytes", "at most 512"]);
}

/// A protobuf `SentencePiece` (piece = 1, score = 2, type = 3) as one more entry of
/// `ModelProto.pieces` (field 1), appended to a model's bytes: repeated fields may come in any
/// order, so the result is the fixture plus that piece.
fn with_piece(piece: &str, ty: u8) -> Vec<u8> {
    fn varint(mut v: usize, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut msg = vec![0x0A];
    varint(piece.len(), &mut msg);
    msg.extend_from_slice(piece.as_bytes());
    msg.push(0x15);
    msg.extend_from_slice(&0f32.to_le_bytes());
    msg.extend_from_slice(&[0x18, ty]);
    let mut bytes = std::fs::read(fixtures().join("spiece.model")).unwrap();
    bytes.push(0x0A);
    varint(msg.len(), &mut bytes);
    bytes.extend_from_slice(&msg);
    bytes
}

const CONTROL: u8 = 3;
const USER_DEFINED: u8 = 4;

#[test]
fn spiece_piece_of_20000_chars_is_refused_at_once() {
    // Loading took 7 s for 20k characters and over 20 s for 40k (time in L^2).
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("spiece.model");
    for (ty, what) in [
        (USER_DEFINED, "user-defined piece"),
        (CONTROL, "control piece"),
    ] {
        std::fs::write(&path, with_piece(&"ab".repeat(10_000), ty)).unwrap();
        let start = Instant::now();
        let err = match Tokenizer::from_spiece_file(&path) {
            Ok(_) => panic!("a 20,000-byte {what} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_mentions(
            &err,
            &[
                &path.display().to_string(),
                what,
                "20000 bytes",
                "at most 512",
            ],
        );
    }
}

#[test]
fn spiece_piece_at_the_limit_loads_quickly_and_matches_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("spiece.model");
    let piece = "ab".repeat(256);
    std::fs::write(&path, with_piece(&piece, USER_DEFINED)).unwrap();
    let start = Instant::now();
    let tok = Tokenizer::from_spiece_file(&path).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let id = tok
        .token_to_id(&piece)
        .expect("the piece is in the vocabulary");
    assert!(tok
        .encode(&format!("x{piece}"), false)
        .unwrap()
        .contains(&id));
}

/// `added_tokens_decoder` in tokenizer_config.json with 20,000 new tokens: each used to be added
/// by its own call into `tokenizers`, which rebuilds its matcher over every added token (time in
/// the square of their number); they are now added in one call, and keep their ids.
#[test]
fn many_added_tokens_load_in_linear_time() {
    let tmp = tempfile::tempdir().unwrap();
    let qwen = fixtures().join("qwen-bpe");
    std::fs::copy(
        qwen.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let base = Tokenizer::from_json_file(&qwen.join("tokenizer.json"))
        .unwrap()
        .vocab_size() as u32;
    let n = 20_000u32;
    let decoder: serde_json::Map<String, Value> = (0..n)
        .map(|i| {
            let entry = json!({"content": format!("<extra_{i}>"), "special": i % 2 == 0});
            ((base + i).to_string(), entry)
        })
        .collect();
    let config = json!({"added_tokens_decoder": decoder});
    std::fs::write(tmp.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let start = Instant::now();
    let tok = Tokenizer::from_dir(tmp.path()).unwrap();
    let took = start.elapsed();
    assert_eq!(tok.token_to_id("<extra_0>"), Some(base));
    assert_eq!(tok.token_to_id("<extra_19999>"), Some(base + n - 1));
    assert_eq!(tok.vocab_size() as u32, base + n);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
