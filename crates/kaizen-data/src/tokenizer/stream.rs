//! Incremental detokenisation for streaming generation.
//!
//! Same idea as `tokenizers`' `DecodeStream` (tokenizer/mod.rs): decode a short window of recent
//! ids, emit only what the window adds beyond what was already emitted, and hold text back while
//! it ends in U+FFFD -- a UTF-8 character split over byte-fallback tokens (`<0xE3>`) or byte-level
//! BPE tokens is emitted once its last byte arrives. Decoding a window (not single ids) keeps
//! decoder context right: spaces between SentencePiece pieces, the stripped dummy prefix.

use super::Tokenizer;
use crate::error::Result;

const REPLACEMENT: char = '\u{FFFD}';

pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The window: ids whose text was already emitted (`..emitted_ids`) and pending ids after.
    ids: Vec<u32>,
    /// Number of ids at the start of the window whose text is `emitted`.
    emitted_ids: usize,
    /// The decoded text of `ids[..emitted_ids]`.
    emitted: String,
}

impl<'a> TextStream<'a> {
    /// A stream that keeps special tokens in the text (as HF's `TextStreamer` does by default).
    pub fn new(tok: &'a Tokenizer) -> Self {
        TextStream {
            tok,
            skip_special_tokens: false,
            ids: Vec::new(),
            emitted_ids: 0,
            emitted: String::new(),
        }
    }

    /// Leave special tokens (bos, eos, `<|im_end|>`, ...) out of the text.
    pub fn skip_special_tokens(mut self, skip: bool) -> Self {
        self.skip_special_tokens = skip;
        self
    }

    /// Adds one id; returns the text it completes (often empty while a character is split).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip_special_tokens)?;
        if text.ends_with(REPLACEMENT) || text.len() <= self.emitted.len() {
            return Ok(String::new());
        }
        let new = new_text(&self.emitted, &text);
        // Slide the window: what was pending becomes the context for the next id.
        self.ids.drain(..self.emitted_ids);
        self.emitted_ids = self.ids.len();
        self.emitted = self.tok.decode(&self.ids, self.skip_special_tokens)?;
        Ok(new)
    }

    /// The text of ids still held back (a character cut off at the end shows as U+FFFD), and a
    /// reset, so the stream can be reused.
    pub fn finish(&mut self) -> Result<String> {
        let rest = if self.ids.len() > self.emitted_ids {
            let text = self.tok.decode(&self.ids, self.skip_special_tokens)?;
            new_text(&self.emitted, &text)
        } else {
            String::new()
        };
        self.ids.clear();
        self.emitted_ids = 0;
        self.emitted.clear();
        Ok(rest)
    }
}

/// `text` minus the already emitted `prefix`. Should a decoder rewrite earlier text (none of
/// ours does), fall back to what follows the common part, so nothing is emitted twice.
fn new_text(prefix: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(text.len()), |((i, _), _)| i);
    text.get(common..).unwrap_or("").to_string()
}
