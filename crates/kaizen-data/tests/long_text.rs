//! Long texts are tokenized only as far as `max_len` tokens reach (issue 14: one 10 MB line
//! took 2.4 GB because the whole line was tokenized before `--max-len` applied).

mod common;

use kaizen_data::long_text::{encode_prefix, MARGIN};
use kaizen_data::{load_dataset, DataOptions, Tokenizer};

/// The first `max_len` ids equal the whole text's, while only a prefix of the text was
/// tokenized (far fewer ids than the whole text gives).
fn check(tok: &Tokenizer, text: &str, max_len: usize) {
    let full = tok.encode(text, true).unwrap();
    let ids = encode_prefix(tok, text, true, max_len).unwrap();
    assert_eq!(
        ids[..max_len],
        full[..max_len],
        "{tok}: first {max_len} ids"
    );
    assert!(
        ids.len() >= max_len + MARGIN && ids.len() * 4 < full.len(),
        "{tok}: {} ids of {} tokenized",
        ids.len(),
        full.len()
    );
}

#[test]
fn a_long_text_is_tokenized_only_as_far_as_max_len_reaches() {
    let english = "Kiyo said I was a fine boy, and she praised me. ".repeat(2000);
    let japanese =
        "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。".repeat(2000);
    // A word of one 15-byte token: the first cut gives too few tokens and is moved further.
    let runs = "オプション".repeat(20_000);
    for tok in [common::bpe(), common::spiece()] {
        for text in [&english, &japanese, &runs] {
            check(&tok, text, 100);
        }
    }
}

/// A short text is tokenized whole, as before.
#[test]
fn a_short_text_is_tokenized_whole() {
    let tok = common::bpe();
    let text = "Kiyo said I was a fine boy.";
    assert_eq!(
        encode_prefix(&tok, text, true, 4).unwrap(),
        tok.encode(text, true).unwrap()
    );
}

/// Training data: a 4 MB line gives its first `max_len` tokens, with the truncation warning.
#[test]
fn a_long_training_line_gives_its_first_tokens() {
    let tok = common::bpe();
    let text = "Kiyo said I was a fine boy, and she praised me. ".repeat(80_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.jsonl");
    std::fs::write(&path, serde_json::json!({ "text": text }).to_string()).unwrap();
    let ds = load_dataset(
        &path,
        &tok,
        &DataOptions {
            template: None,
            max_len: 32,
        },
    )
    .unwrap();
    assert_eq!(
        ds.examples[0].input_ids,
        tok.encode(&text[..2000], true).unwrap()[..32]
    );
    assert!(
        ds.warnings[0].contains("longer than 32 tokens"),
        "{:?}",
        ds.warnings
    );
}
