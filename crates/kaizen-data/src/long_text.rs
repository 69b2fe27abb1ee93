//! Long texts: tokenize only what `max_len` tokens can use, not the whole line.
//!
//! Tokenizing costs memory in proportion to the text (a 10 MB line took 2.4 GB), while only the
//! first `max_len` tokens are kept. So a text is cut, on a character boundary, at
//! [`BYTES_PER_TOKEN`] bytes per token wanted before it is tokenized; when the cut text gives
//! fewer than `max_len` + [`MARGIN`] tokens (a text of unusually long tokens), the cut moves four
//! times further, up to the whole text. The cost is then that of the tokens kept, and the first
//! `max_len` tokens are the whole text's: the cut changes at most the tokens at its end, which
//! lie past the margin.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Bytes per token of the first cut (text in any language averages well under this).
pub const BYTES_PER_TOKEN: usize = 8;
/// Tokens past `max_len` a cut text must still give.
pub const MARGIN: usize = 64;

/// The ids of `text` (as [`Tokenizer::encode`]) of which at least the first `max_len` are those
/// of the whole text; the caller keeps `max_len` of them.
pub fn encode_prefix(
    tok: &Tokenizer,
    text: &str,
    add_special_tokens: bool,
    max_len: usize,
) -> Result<Vec<u32>> {
    let want = max_len.saturating_add(MARGIN);
    let mut cap = want.saturating_mul(BYTES_PER_TOKEN);
    loop {
        if text.len() <= cap {
            return tok.encode(text, add_special_tokens);
        }
        let ids = tok.encode(cut(text, cap), add_special_tokens)?;
        if ids.len() >= want {
            return Ok(ids);
        }
        cap = cap.saturating_mul(4);
    }
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on a character boundary.
pub fn cut(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn cuts_on_character_boundaries() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("abc", 2), "ab");
        // "吾" is 3 bytes: a cut inside it drops the whole character.
        assert_eq!(cut("a吾b", 2), "a");
        assert_eq!(cut("a吾b", 3), "a");
        assert_eq!(cut("a吾b", 4), "a吾");
        assert_eq!(cut("吾", 0), "");
    }
}
