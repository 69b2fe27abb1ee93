//! SentencePiece `.model` files: ids identical to Python `sentencepiece` (sp.encode / sp.decode).

mod common;

use common::{cases_of, check_cases, ids, spiece, spiece_prefix};
use kaizen_data::TokenizerKind;

#[test]
fn rinna_style_model_matches_sentencepiece() {
    // byte fallback, no dummy prefix, whitespace kept, user-defined <NL>, nmt_nfkc charsmap.
    // Japanese, English, emoji, tabs/newlines, runs of spaces, full-width, <NL>, unseen kanji.
    check_cases(&spiece(), &cases_of("spiece"), false, "decoded");
}

#[test]
fn default_settings_model_matches_sentencepiece() {
    // add_dummy_prefix and remove_extra_whitespaces on, empty charsmap.
    check_cases(
        &spiece_prefix(),
        &cases_of("spiece_prefix"),
        false,
        "decoded",
    );
}

#[test]
fn special_tokens_and_metadata() {
    let tok = spiece();
    assert_eq!(tok.kind(), TokenizerKind::SentencePiece);
    assert_eq!(tok.to_string(), "spiece.model (unigram)");
    assert_eq!(tok.vocab_size(), 1000);
    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.eos_token(), Some("</s>"));
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(2), Some(3)));
    assert_eq!(tok.token_to_id("<unk>"), Some(1));
    assert_eq!(tok.token_to_id("<NL>"), Some(4));
    assert_eq!(tok.token_to_id("<0x00>"), Some(5));
    // A bare .model adds no special tokens, as HF's converted tokenizers do not either.
    assert_eq!(
        tok.encode("テスト", true).unwrap(),
        tok.encode("テスト", false).unwrap()
    );
    // Control tokens decode as text unless skipped.
    assert_eq!(tok.decode(&[2, 4, 3], false).unwrap(), "<s><NL></s>");
    assert_eq!(tok.decode(&[2, 4, 3], true).unwrap(), "<NL>");
}

#[test]
fn nl_is_matched_whole_inside_words() {
    let tok = spiece();
    let ids = tok.encode("abc<NL>def", false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 4).count(), 1, "{ids:?}");
}

#[test]
fn decode_round_trips_japanese_and_bytes() {
    let tok = spiece();
    for text in [
        "鬱蒼とした龘の森で𠮷野家を見た",
        "一行目<NL>二行目",
        "  two  spaces  ",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let err = spiece().decode(&[5, 1000], false).unwrap_err().to_string();
    assert!(
        err.contains("token id 1000") && err.contains("1000 tokens"),
        "{err}"
    );
}

#[test]
fn not_a_model_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spiece.model");
    std::fs::write(&path, b"\xff\xff\xff not protobuf").unwrap();
    let err = kaizen_data::Tokenizer::from_spiece_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spiece.model") && err.contains("not a SentencePiece model"),
        "{err}"
    );
}

/// Thousands of held-out manpages-ja lines and noisy variants, when the generator's cache is
/// present (cache/tokenizer_fuzz.json, not committed).
#[test]
fn fuzz_against_sentencepiece_when_cached() {
    let path = common::repo_root().join("cache/tokenizer_fuzz.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!(
            "skipped: {} not present (run scripts/fixtures/gen_tokenizers.py)",
            path.display()
        );
        return;
    };
    let fuzz: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (name, tok) in [("spiece", spiece()), ("spiece_prefix", spiece_prefix())] {
        let cases = fuzz[name].as_array().unwrap();
        let mut bad = Vec::new();
        for case in cases {
            let text = case[0].as_str().unwrap();
            let want = ids(&case[1]);
            let got = tok.encode(text, false).unwrap();
            if got != want {
                bad.push(format!("{text:?}\n   got  {got:?}\n   want {want:?}"));
            }
        }
        assert!(
            bad.is_empty(),
            "{name}: {} of {} differ:\n{}",
            bad.len(),
            cases.len(),
            bad[..bad.len().min(10)].join("\n")
        );
    }
}
