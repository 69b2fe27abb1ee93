//! TextStream: streaming detokenisation without U+FFFD mid-stream.

mod common;

use kaizen_data::{TextStream, Tokenizer};

/// Pushes `ids` one by one; returns the chunks (finish's last) and checks they join to `decode`.
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut s = TextStream::new(tok);
    let mut chunks: Vec<String> = ids.iter().map(|&id| s.push(id).unwrap()).collect();
    chunks.push(s.finish().unwrap());
    assert_eq!(chunks.concat(), tok.decode(ids, false).unwrap());
    chunks
}

#[test]
fn japanese_byte_fallback_is_emitted_whole_characters() {
    let tok = common::spiece();
    let text = "東京都渋谷区で鬱蒼とした龘の森<NL>𠮷野家 🙂です";
    let ids = tok.encode(text, false).unwrap();
    assert!(
        ids.iter().any(|&i| (5..=260).contains(&i)),
        "text should use byte pieces"
    );
    let chunks = stream(&tok, &ids);
    assert_eq!(chunks.concat(), text);
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    // Byte pieces of one character produce nothing until its last byte.
    assert!(chunks.iter().any(String::is_empty));
    assert!(chunks.contains(&"東".to_string()), "{chunks:?}");
}

#[test]
fn byte_level_bpe_japanese_and_emoji() {
    let tok = common::bpe();
    let text = "絵文字🙂👍🏽とカタカナ";
    let ids = tok.encode(text, false).unwrap();
    let chunks = stream(&tok, &ids);
    assert_eq!(chunks.concat(), text);
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
}

#[test]
fn spaces_survive_with_a_dummy_prefix() {
    let tok = common::spiece_prefix();
    let text = "I had a sister who was three years older";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(stream(&tok, &ids).concat(), text);
}

#[test]
fn cut_off_character_shows_at_finish_and_stream_resets() {
    let tok = common::spiece();
    let ids = tok.encode("龘", false).unwrap();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let mut s = TextStream::new(&tok);
    assert_eq!(s.push(ids[0]).unwrap(), "");
    assert_eq!(s.push(ids[1]).unwrap(), "");
    assert!(s.finish().unwrap().contains('\u{FFFD}'));
    // Reusable after finish.
    let ids = tok.encode("ok", false).unwrap();
    let out: String =
        ids.iter().map(|&i| s.push(i).unwrap()).collect::<String>() + &s.finish().unwrap();
    assert_eq!(out, "ok");
}

#[test]
fn special_tokens_can_be_skipped() {
    let tok = common::bpe();
    let ids = tok.encode("<|im_start|>Hi<|im_end|>", false).unwrap();
    let mut s = TextStream::new(&tok).skip_special_tokens(true);
    let out: String =
        ids.iter().map(|&i| s.push(i).unwrap()).collect::<String>() + &s.finish().unwrap();
    assert_eq!(out, "Hi");
}
