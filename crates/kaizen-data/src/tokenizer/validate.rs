//! What the `tokenizers` crate would panic on, or spend unbounded time on, checked before a
//! tokenizer file reaches it (all found by mutating real files):
//!
//! - a `TemplateProcessing` post-processor whose template names a special token it does not
//!   define (or `$B` in the single-sequence template) deserializes, then panics on every encode
//!   (`processors/template.rs` indexes its map unchecked);
//! - a `Precompiled` normalizer whose `precompiled_charsmap` does not parse panics at load
//!   (`normalizers/mod.rs`: `expect("Precompiled")`); one that parses but whose trie points
//!   outside itself, or into the middle of a character, panics on encode (`spm_precompiled`
//!   indexes unchecked);
//! - added tokens are matched with an Aho-Corasick DFA whose construction time grows with the
//!   square of a token's length (one 20,000-character token: 7 s); no real tokenizer has one
//!   longer than a few dozen bytes, so they are bounded by [`MAX_ADDED_TOKEN_BYTES`].
//!
//! Anything these checks miss is still caught: loading and encoding run under
//! [`crate::guard::catch_panic`].

use std::collections::HashSet;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::guard::quote;

/// Longest added / control / user-defined token accepted, in bytes.
pub(crate) const MAX_ADDED_TOKEN_BYTES: usize = 512;

/// Fails if an added token's text is longer than [`MAX_ADDED_TOKEN_BYTES`]; `what` names the
/// field it came from.
pub(crate) fn check_added_token(source: &str, what: &str, content: &str) -> Result<()> {
    if content.len() <= MAX_ADDED_TOKEN_BYTES {
        return Ok(());
    }
    Err(Error::bad_tokenizer(
        source,
        format!(
            "{what} {} is {} bytes long; added and special tokens may be at most \
             {MAX_ADDED_TOKEN_BYTES} bytes (the file is damaged or not a real tokenizer)",
            quote(content),
            content.len()
        ),
    ))
}

/// Checks a parsed tokenizer.json (see the module header). Returns the token ids its
/// post-processor adds, to be checked against the vocabulary once the tokenizer is built.
pub(crate) fn check_tokenizer_json(source: &str, json: &Value) -> Result<Vec<u32>> {
    let bad = |what: String| Error::bad_tokenizer(source, what);
    if let Some(Value::Array(list)) = json.get("added_tokens") {
        for t in list {
            if let Some(content) = t.get("content").and_then(Value::as_str) {
                check_added_token(source, "added_tokens entry", content)?;
            }
        }
    }
    let mut result = Ok(());
    each_step(json.get("normalizer"), "normalizers", &mut |n| {
        if result.is_ok() && n.get("type").and_then(Value::as_str) == Some("Precompiled") {
            result = check_precompiled(n).map_err(|m| bad(format!("normalizer Precompiled: {m}")));
        }
    });
    result?;
    let mut ids = Vec::new();
    let mut result = Ok(());
    each_step(json.get("post_processor"), "processors", &mut |p| {
        if result.is_err() {
            return;
        }
        result = match p.get("type").and_then(Value::as_str) {
            Some("TemplateProcessing") => check_template(p, &mut ids),
            Some("BertProcessing" | "RobertaProcessing") => {
                for key in ["sep", "cls"] {
                    if let Some(id) = p.get(key).and_then(|v| v.get(1)).and_then(Value::as_u64) {
                        ids.push(id.min(u32::MAX as u64) as u32);
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
        .map_err(|m| bad(format!("post_processor: {m}")));
    });
    result?;
    Ok(ids)
}

/// Calls `f` on `step` and, for a `Sequence`, on each step listed under `list_key`, recursively.
fn each_step(step: Option<&Value>, list_key: &str, f: &mut impl FnMut(&Value)) {
    let Some(step) = step.filter(|s| s.is_object()) else {
        return;
    };
    f(step);
    if step.get("type").and_then(Value::as_str) == Some("Sequence") {
        if let Some(Value::Array(steps)) = step.get(list_key) {
            for s in steps {
                each_step(Some(s), list_key, f);
            }
        }
    }
}

/// A `TemplateProcessing`: every special token its templates name is defined, with as many ids
/// as tokens; the single-sequence template uses only `$A`.
fn check_template(p: &Value, ids: &mut Vec<u32>) -> std::result::Result<(), String> {
    let mut defined = HashSet::new();
    if let Some(Value::Object(tokens)) = p.get("special_tokens") {
        for (name, t) in tokens {
            let n_ids = t.get("ids").and_then(Value::as_array);
            let n_tokens = t.get("tokens").and_then(Value::as_array);
            if let (Some(i), Some(s)) = (n_ids, n_tokens) {
                if i.len() != s.len() {
                    return Err(format!(
                        "special token {} lists {} ids but {} tokens",
                        quote(name),
                        i.len(),
                        s.len()
                    ));
                }
                ids.extend(
                    i.iter()
                        .filter_map(Value::as_u64)
                        .map(|id| id.min(u32::MAX as u64) as u32),
                );
            }
            defined.insert(name.as_str());
        }
    }
    for which in ["single", "pair"] {
        let Some(Value::Array(pieces)) = p.get(which) else {
            continue;
        };
        for piece in pieces {
            if let Some(id) = piece
                .get("SpecialToken")
                .and_then(|s| s.get("id"))
                .and_then(Value::as_str)
            {
                if !defined.contains(id) {
                    return Err(format!(
                        "the {which} template names special token {} but \"special_tokens\" does \
                         not define it",
                        quote(id)
                    ));
                }
            }
            let seq = piece
                .get("Sequence")
                .and_then(|s| s.get("id"))
                .and_then(Value::as_str);
            if which == "single" && seq == Some("B") {
                return Err("the single template uses the second sequence $B".into());
            }
        }
    }
    Ok(())
}

/// A `Precompiled` normalizer's charsmap, checked as `spm_precompiled` reads it:
/// `[u32 trie bytes][trie: u32 units][UTF-8 replacements, NUL-separated]`, and every trie
/// walk it can make from any input stays inside the trie and lands on a character boundary.
fn check_precompiled(n: &Value) -> std::result::Result<(), String> {
    let text = n
        .get("precompiled_charsmap")
        .and_then(Value::as_str)
        .ok_or("no \"precompiled_charsmap\" string")?;
    let bytes = base64_decode(text).ok_or("precompiled_charsmap is not valid base64")?;
    let malformed = |why: &str| format!("precompiled_charsmap is malformed ({why})");
    let size = bytes
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize / 4)
        .ok_or_else(|| malformed(&format!("{} bytes", bytes.len())))?;
    let trie_end = 4 + 4 * size;
    if trie_end > bytes.len() || size == 0 {
        return Err(malformed("its trie size does not fit the data"));
    }
    let units: Vec<usize> = bytes[4..trie_end]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let normalized = std::str::from_utf8(&bytes[trie_end..])
        .map_err(|_| malformed("replacements are not UTF-8"))?;
    check_trie(&units, normalized).map_err(|why| malformed(&why))
}

/// Walks every state of a Darts double array as `spm_precompiled`'s `common_prefix_search`
/// would for some input, failing where it would index out of bounds.
fn check_trie(units: &[usize], normalized: &str) -> std::result::Result<(), String> {
    let offset = |u: usize| (u >> 10) << ((u & (1 << 9)) >> 6);
    let label = |u: usize| u & ((1 << 31) | 0xFF);
    let has_leaf = |u: usize| (u >> 8) & 1 == 1;
    let mut seen = HashSet::new();
    let mut todo = vec![offset(units[0])];
    while let Some(pos) = todo.pop() {
        if !seen.insert(pos) {
            continue;
        }
        for c in 1..=255usize {
            let child = pos ^ c;
            let unit = *units.get(child).ok_or("a trie index is out of range")?;
            if label(unit) != c {
                continue;
            }
            let next = child ^ offset(unit);
            if has_leaf(unit) {
                let value = *units.get(next).ok_or("a trie leaf is out of range")?;
                let index = value & ((1 << 31) - 1);
                if !normalized.is_char_boundary(index) {
                    return Err("a replacement starts outside the text".into());
                }
            }
            todo.push(next);
        }
    }
    Ok(())
}

/// Standard base64 with optional `=` padding; None on any other character.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let n = chunk.len() - 1; // bytes this chunk holds
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("AAAA").unwrap(), [0, 0, 0]);
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a$==").is_none());
    }

    #[test]
    fn a_trie_pointing_outside_itself_is_refused() {
        // Root offset 1024 >> 10 = 1: state 1, whose children 1 ^ c lie past a 2-unit trie.
        let units = [1 << 10, 0];
        assert!(check_trie(&units, "").is_err());
        // 256 units, no labels: every walk ends at once.
        let units = vec![0usize; 256];
        assert!(check_trie(&units, "").is_ok());
    }
}
