//! SentencePiece `.model` files in pure Rust, id-for-id with the C++ `sentencepiece` library.
//!
//! Mirrors HF `convert_slow_tokenizer.py` (`SpmConverter`): the pieces and scores become a
//! `tokenizers` Unigram (byte fallback and unk id from the trainer spec), control pieces become
//! special added tokens and user-defined pieces plain added tokens (matched whole), and the
//! decoder is `Replace("▁", " ")`, `ByteFallback`, `Fuse` (+ `Strip` of the dummy prefix).
//!
//! Deviation, on purpose: normalisation does not go through `tokenizers` normalizers. HF's
//! `Precompiled` normalizer works per grapheme (so `か` + U+3099 is not composed the way
//! sentencepiece does), and its `Metaspace` prefix / `Strip` run per added-token segment (so text
//! around `<NL>`, or text that starts with a space, comes out differently). [`SpNormalizer`] is a
//! port of sentencepiece's `Normalizer::Normalize` (normalizer.cc) instead: longest-match over
//! the precompiled charsmap, user-defined symbols copied verbatim, then the whitespace rules, on
//! the whole text. The normalized text goes to a `tokenizers` pipeline with no normalizer and
//! no pre-tokenizer.

use sentencepiece_model::{ModelType, NormalizerSpec, SentencePieceModel, TrainerSpec, Type};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Replace;
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper};

use super::merges::generate_merges;
use super::validate::check_added_token;
use crate::error::{Error, Result};

const SPACE_SYMBOL: &str = "\u{2581}";

/// What [`build`] made of a `.model` file.
pub(crate) struct Spiece {
    pub inner: tokenizers::Tokenizer,
    pub normalizer: SpNormalizer,
    /// "unigram" or "BPE".
    pub model_type: &'static str,
    pub bos: Option<String>,
    pub eos: Option<String>,
}

pub(crate) fn build(model: &SentencePieceModel, name: &str) -> Result<Spiece> {
    let default_trainer = TrainerSpec::default();
    let trainer = model.trainer().unwrap_or(&default_trainer);
    let default_norm = NormalizerSpec::default();
    let norm = model.normalizer().unwrap_or(&default_norm);
    if trainer.treat_whitespace_as_suffix() {
        return Err(Error::bad_tokenizer(
            name,
            "trainer_spec.treat_whitespace_as_suffix=true is not supported; convert the model to \
             a tokenizer.json with HF transformers and load that instead",
        ));
    }
    let pieces = model.pieces();
    if pieces.is_empty() {
        return Err(Error::bad_tokenizer(name, "the model has no pieces"));
    }
    let piece_at = |id: i32| -> Option<String> {
        usize::try_from(id)
            .ok()
            .and_then(|i| pieces.get(i))
            .map(|p| p.piece().to_string())
    };
    let (model_wrapper, model_type) = build_model(model, trainer, name)?;
    let mut inner = tokenizers::Tokenizer::new(model_wrapper);
    inner.with_decoder(Some(decoder(norm.add_dummy_prefix(), name)?));
    let added = added_tokens(model, name)?;
    inner.add_tokens(&added);
    Ok(Spiece {
        inner,
        normalizer: SpNormalizer::new(model, name)?,
        model_type,
        bos: piece_at(trainer.bos_id()),
        eos: piece_at(trainer.eos_id()),
    })
}

fn build_model(
    model: &SentencePieceModel,
    trainer: &TrainerSpec,
    name: &str,
) -> Result<(ModelWrapper, &'static str)> {
    let pieces = model.pieces();
    let unk_id = usize::try_from(trainer.unk_id())
        .ok()
        .filter(|&i| i < pieces.len());
    let bad = |e: tokenizers::Error| Error::bad_tokenizer(name, e.to_string());
    match trainer.model_type() {
        ModelType::Unigram => {
            let vocab = pieces
                .iter()
                .map(|p| (p.piece().to_string(), f64::from(p.score())))
                .collect();
            let unigram = Unigram::from(vocab, unk_id, trainer.byte_fallback()).map_err(bad)?;
            Ok((unigram.into(), "unigram"))
        }
        ModelType::Bpe => {
            // As HF's SpmConverter: merges recovered from the vocabulary, ranked by score.
            let tokens: Vec<String> = pieces.iter().map(|p| p.piece().to_string()).collect();
            let scores: Vec<f32> = pieces.iter().map(|p| p.score()).collect();
            let vocab: Vocab = tokens.iter().cloned().zip(0u32..).collect();
            let merges = generate_merges(&tokens, &scores);
            let mut builder = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .fuse_unk(true)
                .byte_fallback(trainer.byte_fallback());
            if let Some(unk) = unk_id {
                builder = builder.unk_token(tokens[unk].clone());
            }
            Ok((builder.build().map_err(bad)?.into(), "BPE"))
        }
        other => Err(Error::bad_tokenizer(
            name,
            format!(
                "trainer_spec.model_type is {other:?}; only UNIGRAM and BPE SentencePiece models \
                 are supported"
            ),
        )),
    }
}

/// Control pieces are special added tokens, user-defined pieces plain ones (matched whole).
/// Each is at most `MAX_ADDED_TOKEN_BYTES` long: `tokenizers` builds its matcher for added
/// tokens in time that grows with the square of the longest one.
fn added_tokens(model: &SentencePieceModel, name: &str) -> Result<Vec<AddedToken>> {
    let mut out = Vec::new();
    for p in model.pieces() {
        let (special, what) = match p.r#type() {
            Type::Control => (true, "control piece"),
            Type::UserDefined => (false, "user-defined piece"),
            _ => continue,
        };
        check_added_token(name, what, p.piece())?;
        out.push(AddedToken::from(p.piece(), special).normalized(false));
    }
    Ok(out)
}

/// sentencepiece's decoder: "▁" back to spaces, `<0xNN>` pieces back to bytes, and one leading
/// space dropped when the model adds a dummy prefix.
pub(crate) fn decoder(strip_dummy_prefix: bool, name: &str) -> Result<DecoderWrapper> {
    let replace =
        Replace::new(SPACE_SYMBOL, " ").map_err(|e| Error::bad_tokenizer(name, e.to_string()))?;
    let mut steps: Vec<DecoderWrapper> = vec![
        replace.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if strip_dummy_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}

/// A port of sentencepiece's `Normalizer` (normalizer.cc) for one model.
#[derive(Clone, Debug)]
pub(crate) struct SpNormalizer {
    charsmap: Option<CharsMap>,
    /// User-defined pieces, longest first; matched before the charsmap and copied verbatim.
    user_defined: Vec<String>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

impl SpNormalizer {
    fn new(model: &SentencePieceModel, name: &str) -> Result<Self> {
        let default_norm = NormalizerSpec::default();
        let spec = model.normalizer().unwrap_or(&default_norm);
        let blob = spec.precompiled_charsmap();
        let charsmap = if blob.is_empty() {
            None
        } else {
            Some(CharsMap::parse(blob).ok_or_else(|| {
                Error::bad_tokenizer(
                    name,
                    "normalizer_spec.precompiled_charsmap is malformed; the .model file is damaged",
                )
            })?)
        };
        let mut user_defined: Vec<String> = model
            .pieces()
            .iter()
            .filter(|p| p.r#type() == Type::UserDefined && !p.piece().is_empty())
            .map(|p| p.piece().to_string())
            .collect();
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(SpNormalizer {
            charsmap,
            user_defined,
            add_dummy_prefix: spec.add_dummy_prefix(),
            remove_extra_whitespaces: spec.remove_extra_whitespaces(),
            escape_whitespaces: spec.escape_whitespaces(),
        })
    }

    /// One normalisation step at the start of `input`: (replacement, bytes consumed).
    fn normalize_prefix<'s>(&'s self, input: &'s str) -> (&'s str, usize) {
        if let Some(sym) = self
            .user_defined
            .iter()
            .find(|s| input.starts_with(s.as_str()))
        {
            return (&input[..sym.len()], sym.len());
        }
        if let Some((replacement, len)) = self.charsmap.as_ref().and_then(|m| m.longest(input)) {
            return (replacement, len);
        }
        let len = input.chars().next().map_or(0, char::len_utf8);
        (&input[..len], len)
    }

    /// sentencepiece's `Normalizer::Normalize`.
    pub(crate) fn normalize(&self, text: &str) -> String {
        let space = if self.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
        let mut input = text;
        if self.remove_extra_whitespaces {
            loop {
                let (piece, len) = self.normalize_prefix(input);
                if len == 0 || piece != " " {
                    break;
                }
                input = &input[len..];
            }
        }
        let mut out = String::with_capacity(input.len() * 3);
        if input.is_empty() {
            return out;
        }
        if self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut is_prev_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut piece, len) = self.normalize_prefix(input);
            if len == 0 {
                break;
            }
            while is_prev_space && piece.starts_with(' ') {
                piece = &piece[1..];
            }
            if !piece.is_empty() {
                for c in piece.chars() {
                    match c {
                        ' ' => out.push_str(space),
                        c => out.push(c),
                    }
                }
                is_prev_space = piece.ends_with(' ');
            }
            input = &input[len..];
            if !self.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }
}

/// sentencepiece's `precompiled_charsmap`: a Darts double-array trie over UTF-8 bytes whose
/// values point into a blob of NUL-terminated replacement strings.
/// Layout: `[u32 trie size in bytes][trie: u32 units][replacement blob]` (little-endian).
#[derive(Clone, Debug)]
struct CharsMap {
    units: Vec<u32>,
    blob: Vec<u8>,
}

impl CharsMap {
    fn parse(bytes: &[u8]) -> Option<Self> {
        let size = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let trie = bytes.get(4..4usize.checked_add(size)?)?;
        let units = trie
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Some(CharsMap {
            units,
            blob: bytes[4 + size..].to_vec(),
        })
    }

    /// The longest key that prefixes `input`: (its replacement, its length in bytes).
    fn longest<'s>(&'s self, input: &str) -> Option<(&'s str, usize)> {
        let mut best = None;
        self.common_prefix_search(input.as_bytes(), |value, len| best = Some((value, len)));
        let (value, len) = best?;
        let tail = self.blob.get(value..)?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let replacement = std::str::from_utf8(&tail[..end]).ok()?;
        // A match must end on a char boundary of the input to be usable.
        input.is_char_boundary(len).then_some((replacement, len))
    }

    /// Darts `commonPrefixSearch`: calls `found(value, length)` for each key that prefixes `key`,
    /// shortest first.
    fn common_prefix_search(&self, key: &[u8], mut found: impl FnMut(usize, usize)) {
        let unit = |pos: usize| self.units.get(pos).copied();
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let label = |u: u32| u & ((1 << 31) | 0xFF);
        let has_leaf = |u: u32| (u >> 8) & 1 == 1;
        let Some(root) = unit(0) else { return };
        let mut pos = offset(root);
        for (i, &c) in key.iter().enumerate() {
            if c == 0 {
                return;
            }
            pos ^= c as usize;
            let Some(u) = unit(pos) else { return };
            if label(u) != u32::from(c) {
                return;
            }
            pos ^= offset(u);
            if has_leaf(u) {
                if let Some(leaf) = unit(pos) {
                    found((leaf & ((1 << 31) - 1)) as usize, i + 1);
                }
            }
        }
    }
}
