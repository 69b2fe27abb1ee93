//! Tokenizers described by GGUF metadata (`tokenizer.ggml.*`).
//!
//! Mirrors HF transformers' GGUF converter (`integrations/gguf/gguf_tokenizer_mapping.py`,
//! formerly `GGUFGPTConverter` / `GGUFLlamaConverter` in `integrations/ggml.py`):
//! - `gpt2`: byte-level BPE (`GPT2Tokenizer`) from the tokens and merges; the pre-tokenizer
//!   follows `tokenizer.ggml.pre` as llama.cpp's `llama-vocab.cpp` does. Deviation from
//!   transformers: `smollm` (and the other `\p{N}` + GPT-2 presets) get `Digits` before
//!   `ByteLevel`, as SmolLM2's own tokenizer.json and llama.cpp have it; transformers uses plain
//!   GPT-2 splitting there.
//! - `llama`: SentencePiece-style BPE with byte fallback (`LlamaTokenizer`), merges from the file
//!   or recovered from the scores. Gemma vocabularies (spelled with real spaces, no merges) get
//!   transformers' Gemma treatment: spaces respelled as "▁", merges ranked by vocabulary order,
//!   no prefix space.
//! - control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
//!   tokens, so both are matched whole; bos/eos/unk/pad become special tokens too.
//! - BOS is added when `tokenizer.ggml.add_bos_token` says so, defaulting to true for `llama`
//!   (llama.cpp's default) and false for `gpt2`; EOS when `add_eos_token` says so.

use std::collections::HashSet;

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::Replace;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Model, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::merges::generate_merges;
use super::spiece;
use super::validate::check_added_token;
use crate::error::{Error, Result};

/// Tokenizer metadata read from a GGUF file (filled by the caller from its GGUF reader).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style).
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. "smollm", "llama-bpe", "default".
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`, each "left right".
    pub merges: Option<Vec<String>>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// `general.architecture`: transformers converts the tokenizers of the `gemma*` ones with
    /// its Gemma rules.
    pub architecture: Option<String>,
}

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

pub(crate) const NAME: &str = "GGUF tokenizer";

/// The inner tokenizer, and whether it is byte-level BPE.
pub(crate) fn build(vocab: &GgufVocab) -> Result<(tokenizers::Tokenizer, bool)> {
    if vocab.tokens.is_empty() {
        return Err(Error::bad_tokenizer(
            NAME,
            "tokenizer.ggml.tokens is empty; the GGUF file carries no vocabulary",
        ));
    }
    let (mut tok, byte_level) = match vocab.model.as_str() {
        "gpt2" => (byte_level_bpe(vocab)?, true),
        "llama" => (sentencepiece_bpe(vocab)?, false),
        other => {
            return Err(Error::bad_tokenizer(
                NAME,
                format!(
                    "tokenizer.ggml.model is {}; supported: \"gpt2\" (byte-level BPE) and \
                     \"llama\" (SentencePiece-style BPE)",
                    crate::guard::quote(other)
                ),
            ))
        }
    };
    add_special_tokens(&mut tok, vocab, byte_level)?;
    Ok((tok, byte_level))
}

fn bad(e: impl std::fmt::Display) -> Error {
    Error::bad_tokenizer(NAME, e.to_string())
}

fn byte_level_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    // Tokens should already be spelled in GPT-2's byte alphabet; respell any that are not.
    let alphabet = byte_alphabet();
    let spelled: HashSet<char> = alphabet.iter().copied().collect();
    let tokens: Vec<String> = vocab
        .tokens
        .iter()
        .map(|t| {
            if t.chars().all(|c| spelled.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            }
        })
        .collect();
    let merges =
        match (&vocab.merges, &vocab.scores) {
            (Some(m), _) => parse_merges(m)?,
            (None, Some(scores)) => generate_merges(&tokens, scores),
            (None, None) => return Err(Error::bad_tokenizer(
                NAME,
                "tokenizer.ggml.model is \"gpt2\" but the file has neither tokenizer.ggml.merges \
                 nor tokenizer.ggml.scores to rank merges by",
            )),
        };
    let bpe = BPE::builder()
        .vocab_and_merges(index(&tokens), merges)
        .build()
        .map_err(bad)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(byte_level_pre_tokenizer(vocab.pre.as_deref())?));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

fn sentencepiece_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let gemma = is_gemma(vocab);
    let tokens: Vec<String> = if gemma {
        // Gemma stores tokens of two or more spaces with real spaces; its text has "▁".
        vocab
            .tokens
            .iter()
            .map(|t| {
                if t.chars().count() >= 2 && t.chars().all(|c| c == ' ') {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect()
    } else {
        vocab.tokens.clone()
    };
    let merges =
        match (&vocab.merges, &vocab.scores) {
            (Some(m), _) => parse_merges(m)?,
            // Gemma's scores do not follow its merge order; its token order does.
            _ if gemma => {
                let positions: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
                generate_merges(&tokens, &positions)
            }
            (None, Some(scores)) => generate_merges(&tokens, scores),
            (None, None) => return Err(Error::bad_tokenizer(
                NAME,
                "tokenizer.ggml.model is \"llama\" but the file has neither tokenizer.ggml.merges \
                 nor tokenizer.ggml.scores",
            )),
        };
    let mut builder = BPE::builder()
        .vocab_and_merges(index(&tokens), merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = vocab.unk_id.and_then(|i| tokens.get(i as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let mut tok = tokenizers::Tokenizer::new(builder.build().map_err(bad)?);
    if gemma {
        tok.with_normalizer(Some(Replace::new(" ", "\u{2581}").map_err(bad)?));
        tok.with_decoder(Some(spiece::decoder(false, NAME)?));
    } else {
        tok.with_pre_tokenizer(Some(Metaspace::new(
            '\u{2581}',
            PrependScheme::First,
            false,
        )));
        tok.with_decoder(Some(spiece::decoder(true, NAME)?));
    }
    Ok(tok)
}

/// A Gemma file (`general.architecture` gemma*, as transformers decides); without the
/// architecture, a vocabulary with `<start_of_turn>` or tokens made of real spaces.
fn is_gemma(vocab: &GgufVocab) -> bool {
    match &vocab.architecture {
        Some(a) => a.starts_with("gemma"),
        None => vocab.tokens.iter().any(|t| {
            t == "<start_of_turn>" || (t.chars().count() >= 2 && t.chars().all(|c| c == ' '))
        }),
    }
}

fn index(tokens: &[String]) -> Vocab {
    // Later duplicates win, as in transformers' dict comprehension.
    tokens.iter().cloned().zip(0u32..).collect()
}

fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .ok_or_else(|| {
                    Error::bad_tokenizer(
                        NAME,
                        format!(
                            "tokenizer.ggml.merges[{i}] is {}; expected \"left right\"",
                            crate::guard::quote(m)
                        ),
                    )
                })
        })
        .collect()
}

// llama.cpp's split regexes (llama-vocab.cpp), as transformers' GGUF_PRE_TOKENIZER_SPLITS has them.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "megrez" => QWEN2_SPLIT,
        "gpt-4o" | "llama4" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// The `tokenizer.ggml.pre` name llama.cpp gives a byte-level BPE whose tokenizer.json
/// `pre_tokenizer` is `pre`, for the shapes [`byte_level_pre_tokenizer`] builds back: GPT-2's
/// ByteLevel regex alone (`gpt-2`), single digits split off first (`smollm`), or a Split on the
/// Llama 3 / Qwen 2 / GPT-4o regex before a regex-free ByteLevel. llama.cpp's converter
/// (`get_vocab_base_pre`) recognises a tokenizer by a hash of its ids on a test text instead,
/// which knows only published tokenizers; the shape gives the same name for those and also
/// names a tokenizer trained anew with one of these pre-tokenizers. `None`: not one of them.
pub fn llama_cpp_pre_name(pre: &serde_json::Value) -> Option<&'static str> {
    let ty = |v: &serde_json::Value| v.get("type").and_then(|t| t.as_str()).map(str::to_owned);
    let byte_level = |v: &serde_json::Value, regex: bool| {
        ty(v).as_deref() == Some("ByteLevel")
            && v.get("use_regex").and_then(|r| r.as_bool()).unwrap_or(true) == regex
    };
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let steps = pre.get("pretokenizers")?.as_array()?;
    match steps.as_slice() {
        [d, b] if ty(d).as_deref() == Some("Digits") && byte_level(b, true) => {
            let single = d.get("individual_digits").and_then(|x| x.as_bool());
            (single == Some(true)).then_some("smollm")
        }
        [s, b] if ty(s).as_deref() == Some("Split") && byte_level(b, false) => {
            let regex = s.get("pattern")?.get("Regex")?.as_str()?;
            [
                ("llama-bpe", LLAMA3_SPLIT),
                ("qwen2", QWEN2_SPLIT),
                ("gpt-4o", GPT4O_SPLIT),
            ]
            .into_iter()
            .find(|(_, r)| *r == regex)
            .map(|(name, _)| name)
        }
        _ => None,
    }
}

fn byte_level_pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let pre = pre.unwrap_or("default");
    if let Some(regex) = split_regex(pre) {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(bad)?;
        let steps: Vec<PreTokenizerWrapper> =
            vec![split.into(), ByteLevel::new(false, true, false).into()];
        return Ok(PreSequence::new(steps).into());
    }
    // llama.cpp: these presets split every digit off ("\p{N}") before GPT-2's regex.
    if matches!(
        pre,
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
    ) {
        let steps: Vec<PreTokenizerWrapper> = vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ];
        return Ok(PreSequence::new(steps).into());
    }
    Ok(ByteLevel::new(false, true, true).into())
}

/// Control tokens special, user-defined ones plain, named special tokens special; all whole.
fn add_special_tokens(
    tok: &mut tokenizers::Tokenizer,
    vocab: &GgufVocab,
    byte_level: bool,
) -> Result<()> {
    let spelled: HashSet<char> = byte_alphabet().into_iter().collect();
    let types = vocab.token_types.as_deref().unwrap_or(&[]);
    let typed = |want: i32| {
        vocab
            .tokens
            .iter()
            .zip(types)
            .filter(move |(_, &ty)| ty == want)
            .map(|(t, _)| t)
    };
    for t in typed(CONTROL).chain(typed(USER_DEFINED)) {
        check_added_token(NAME, "control/user-defined token", t)?;
    }
    // A control token outside the byte alphabet of a byte-level vocabulary is a llama.cpp
    // mislabel; adding it would grow the vocabulary, so it is skipped (as transformers does).
    let control: Vec<AddedToken> = typed(CONTROL)
        .filter(|t| !byte_level || t.chars().all(|c| spelled.contains(&c)))
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(&control);
    // Only those the vocabulary spells as they are (Gemma's respelled space runs are not).
    let user: Vec<AddedToken> = typed(USER_DEFINED)
        .filter(|t| tok.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tok.add_tokens(&user);
    // Only names the model's vocabulary spells the same way; anything else would grow it.
    let named: Vec<AddedToken> = [vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id]
        .into_iter()
        .flatten()
        .filter_map(|id| vocab.tokens.get(id as usize))
        .filter(|t| tok.get_model().token_to_id(t).is_some())
        .filter(|t| !tok.get_added_vocabulary().get_vocab().contains_key(*t))
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(&named);
    Ok(())
}

/// GPT-2's `bytes_to_unicode`: byte -> the char that spells it in a byte-level vocabulary.
pub(crate) fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}
