//! One tokenizer type over the three places a tokenizer comes from: an HF `tokenizer.json`, a
//! SentencePiece `.model` (no tokenizer.json, e.g. rinna/japanese-gpt-neox-3.6b), and GGUF
//! metadata. All three end up as a `tokenizers` pipeline; SentencePiece adds its own normaliser
//! in front (see `spiece.rs`).
//!
//! `encode(text, add_special_tokens=true)` adds what HF adds by default: the tokenizer.json's
//! post-processor, replaced (as transformers v5 does) by bos/eos from `add_bos_token` /
//! `add_eos_token` when tokenizer_config.json sets either; nothing for a bare `.model`; for GGUF
//! `tokenizer.ggml.add_bos_token` / `add_eos_token`.

mod config;
mod gguf;
mod merges;
mod spiece;
mod stream;
mod validate;

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

use sentencepiece_model::SentencePieceModel;
use tokenizers::{ModelWrapper, PostProcessorWrapper};

pub use gguf::{llama_cpp_pre_name, GgufVocab};
pub use stream::TextStream;

use crate::chat::{render_chat_template, Message};
use crate::error::{Error, Result};
use crate::guard;
use config::TokenizerConfig;
use spiece::SpNormalizer;

/// SentencePiece file names an HF model directory may use, in the order they are looked for.
const SPIECE_FILES: [&str; 3] = ["spiece.model", "tokenizer.model", "sentencepiece.bpe.model"];

/// Where a [`Tokenizer`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenizerKind {
    /// An HF `tokenizer.json` (any model type; [`Tokenizer`]'s `Display` names it).
    HfJson,
    /// A SentencePiece `.model` (unigram or BPE).
    SentencePiece,
    /// GGUF `tokenizer.ggml.model=gpt2`: byte-level BPE.
    GgufBpe,
    /// GGUF `tokenizer.ggml.model=llama`: SentencePiece-style BPE with byte fallback.
    GgufSentencePiece,
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenizerKind::HfJson => "tokenizer.json",
            TokenizerKind::SentencePiece => "SentencePiece .model",
            TokenizerKind::GgufBpe => "GGUF gpt2 (byte-level BPE)",
            TokenizerKind::GgufSentencePiece => "GGUF llama (SentencePiece-style BPE)",
        })
    }
}

/// A loaded tokenizer. `Display` says what it is, e.g. "tokenizer.json (BPE)",
/// "spiece.model (unigram)", "GGUF gpt2 (byte-level BPE, pre=smollm)".
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    kind: TokenizerKind,
    description: String,
    /// Names the tokenizer in error messages (a path, or "GGUF tokenizer").
    source: String,
    /// SentencePiece only: normalisation done before `inner` sees the text.
    sp_normalizer: Option<SpNormalizer>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
    chat_template_note: Option<String>,
    /// `inner.get_vocab_size(true)`, which builds the whole vocabulary map, computed once.
    vocab_size: usize,
}

impl fmt::Display for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("description", &self.description)
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// HF model directory: tokenizer.json if present, else spiece.model (or tokenizer.model);
    /// tokenizer_config.json (if present) supplies bos_token/eos_token, chat_template and
    /// add_bos_token/add_eos_token.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::bad_file(
                dir,
                "not a directory; pass the model directory holding tokenizer.json or spiece.model",
            ));
        }
        let config = TokenizerConfig::from_dir(dir)?;
        let json = dir.join("tokenizer.json");
        let mut tok = if json.is_file() {
            Self::from_json_file(&json)?
        } else if let Some(sp) = SPIECE_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
        {
            Self::from_spiece_file(&sp)?
        } else {
            return Err(Error::bad_file(
                dir,
                format!(
                    "no tokenizer here: expected tokenizer.json or one of {}",
                    SPIECE_FILES.join(", ")
                ),
            ));
        };
        tok.apply_config(config, &dir.join("tokenizer_config.json"))?;
        Ok(tok)
    }

    /// A bare HF `tokenizer.json`, with no tokenizer_config.json (so no bos/eos names or template).
    /// What `tokenizers` would panic on is checked first (`validate.rs`); anything else that
    /// panics inside it is an error naming the file.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let source = path.display().to_string();
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not valid JSON ({e})")))?;
        let added_ids = validate::check_tokenizer_json(&source, &json)?;
        let inner = guard::catch_panic(path, "loading it as an HF tokenizer.json", || {
            text.parse::<tokenizers::Tokenizer>().map_err(|e| {
                Error::bad_file(
                    path,
                    format!(
                        "cannot load as an HF tokenizer.json: {} (is it from a newer \
                         `tokenizers`?)",
                        guard::one_line(&e.to_string())
                    ),
                )
            })
        })?;
        let vocab_size = inner.get_vocab_size(true);
        if let Some(id) = added_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(Error::bad_file(
                path,
                format!(
                    "post_processor adds token id {id}, outside the vocabulary of {vocab_size} \
                     tokens"
                ),
            ));
        }
        let model = match inner.get_model() {
            ModelWrapper::BPE(_) => "BPE",
            ModelWrapper::Unigram(_) => "unigram",
            ModelWrapper::WordPiece(_) => "WordPiece",
            ModelWrapper::WordLevel(_) => "WordLevel",
        };
        Ok(Tokenizer {
            vocab_size,
            inner,
            kind: TokenizerKind::HfJson,
            description: format!("{} ({model})", file_name(path)),
            source: path.display().to_string(),
            sp_normalizer: None,
            bos_token: None,
            eos_token: None,
            chat_template: None,
            chat_template_note: None,
        })
    }

    /// A SentencePiece `.model` file; bos/eos from its trainer spec; no special tokens added.
    pub fn from_spiece_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let model = SentencePieceModel::from_slice(&bytes).map_err(|e| {
            Error::bad_file(path, format!("not a SentencePiece model (protobuf: {e})"))
        })?;
        let source = path.display().to_string();
        let sp = guard::catch_panic(path, "building its tokenizer", || {
            spiece::build(&model, &source)
        })?;
        Ok(Tokenizer {
            vocab_size: sp.inner.get_vocab_size(true),
            inner: sp.inner,
            kind: TokenizerKind::SentencePiece,
            description: format!("{} ({})", file_name(path), sp.model_type),
            source,
            sp_normalizer: Some(sp.normalizer),
            bos_token: sp.bos,
            eos_token: sp.eos,
            chat_template: None,
            chat_template_note: None,
        })
    }

    /// The tokenizer a GGUF file describes.
    pub fn from_gguf(vocab: GgufVocab) -> Result<Self> {
        let n = vocab.tokens.len();
        let token_at = |field: &str, id: Option<u32>| -> Result<Option<String>> {
            match id {
                None => Ok(None),
                Some(i) => vocab
                    .tokens
                    .get(i as usize)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| {
                        Error::bad_tokenizer(
                            gguf::NAME,
                            format!("tokenizer.ggml.{field} is {i} but there are only {n} tokens"),
                        )
                    }),
            }
        };
        let bos_token = token_at("bos_token_id", vocab.bos_id)?;
        let eos_token = token_at("eos_token_id", vocab.eos_id)?;
        token_at("unknown_token_id", vocab.unk_id)?;
        token_at("padding_token_id", vocab.pad_id)?;
        let (inner, byte_level) =
            guard::catch_panic(Path::new(gguf::NAME), "building its tokenizer", || {
                gguf::build(&vocab)
            })?;
        let (kind, description) = if byte_level {
            let pre = vocab.pre.as_deref().unwrap_or("default");
            (
                TokenizerKind::GgufBpe,
                format!("GGUF gpt2 (byte-level BPE, pre={pre})"),
            )
        } else {
            let kind = TokenizerKind::GgufSentencePiece;
            (
                kind,
                "GGUF llama (SentencePiece-style BPE, byte fallback)".to_string(),
            )
        };
        let mut tok = Tokenizer {
            vocab_size: inner.get_vocab_size(true),
            inner,
            kind,
            description,
            source: gguf::NAME.to_string(),
            sp_normalizer: None,
            bos_token,
            eos_token,
            chat_template: vocab.chat_template.clone(),
            chat_template_note: None,
        };
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        let add_bos = vocab.add_bos.unwrap_or(!byte_level);
        tok.set_special_tokens_template(add_bos, vocab.add_eos.unwrap_or(false))?;
        Ok(tok)
    }

    /// Token ids of `text`; `add_special_tokens` adds bos/eos as HF does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let input: Cow<str> = match &self.sp_normalizer {
            Some(n) => Cow::Owned(n.normalize(text)),
            None => Cow::Borrowed(text),
        };
        // A tokenizer file the checks at load did not catch must not crash the program here.
        let encoding =
            guard::catch_panic_with(|| self.inner.encode_fast(input.as_ref(), add_special_tokens))
                .map_err(|msg| self.crashed("encode", &msg))?
                .map_err(|e| self.tokenize_error("encode", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            let size = self.vocab_size();
            return Err(Error::Tokenize {
                source_name: self.source.clone(),
                op: "decode",
                message: format!(
                    "token id {bad} is not in the vocabulary ({size} tokens); were these ids \
                     made with another tokenizer?"
                ),
            });
        }
        guard::catch_panic_with(|| self.inner.decode(ids, skip_special_tokens))
            .map_err(|msg| self.crashed("decode", &msg))?
            .map_err(|e| self.tokenize_error("decode", e))
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The whole pipeline as an HF `tokenizer.json` (e.g. to save a GGUF tokenizer). A bare
    /// SentencePiece `.model` normalises outside that pipeline, so it is refused: copy the file.
    pub fn to_json_string(&self) -> Result<String> {
        if self.sp_normalizer.is_some() {
            return Err(Error::bad_tokenizer(
                &self.source,
                "a SentencePiece .model tokenizer cannot be written as tokenizer.json; copy the .model file instead",
            ));
        }
        self.inner
            .to_string(true)
            .map_err(|e| self.tokenize_error("serialize", e))
    }

    /// Replaces the chat template (e.g. one given on the command line).
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// Renders the chat template (HF semantics, see [`crate::chat`]).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::NoChatTemplate {
                source_name: self.source.clone(),
                hint: self.chat_template_note.clone().unwrap_or_else(|| {
                    "Add a \"chat_template\" to tokenizer_config.json (or a chat_template.jinja \
                 beside it), or give a template explicitly"
                        .to_string()
                }),
            })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token(),
            self.eos_token(),
        )
        .map_err(|e| e.in_template_of(&self.source))
    }

    /// A post-processor that adds bos and/or eos around each sequence, as transformers'
    /// `update_post_processor` builds it (a flag whose token is not set is dropped, as there).
    pub(crate) fn set_special_tokens_template(
        &mut self,
        add_bos: bool,
        add_eos: bool,
    ) -> Result<()> {
        let bos = self.bos_token.clone().filter(|_| add_bos);
        let eos = self.eos_token.clone().filter(|_| add_eos);
        let mut special = serde_json::Map::new();
        for t in bos.iter().chain(eos.iter()) {
            let id = self.token_to_id(t).ok_or_else(|| {
                Error::bad_tokenizer(
                    &self.source,
                    format!("special token {} is not in the vocabulary", guard::quote(t)),
                )
            })?;
            special.insert(
                t.clone(),
                serde_json::json!({"id": t, "ids": [id], "tokens": [t]}),
            );
        }
        // `Template` has no public constructor from pieces; its serde form takes any token text.
        let sequence = |seq_id: &str, type_id: u32| {
            let token =
                |t: &String| serde_json::json!({"SpecialToken": {"id": t, "type_id": type_id}});
            let mut pieces: Vec<serde_json::Value> = bos.iter().map(token).collect();
            pieces.push(serde_json::json!({"Sequence": {"id": seq_id, "type_id": type_id}}));
            pieces.extend(eos.iter().map(token));
            pieces
        };
        let single = sequence("A", 0);
        let pair: Vec<_> = single.iter().cloned().chain(sequence("B", 1)).collect();
        let processor = serde_json::json!({
            "type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special,
        });
        let processor: PostProcessorWrapper = serde_json::from_value(processor)
            .map_err(|e| Error::bad_tokenizer(&self.source, format!("post-processor: {e}")))?;
        self.inner.with_post_processor(Some(processor));
        Ok(())
    }

    /// A panic caught inside `tokenizers` while doing `op`.
    fn crashed(&self, op: &'static str, msg: &str) -> Error {
        Error::Tokenize {
            source_name: self.source.clone(),
            op,
            message: format!(
                "the tokenizers library crashed ({}); the tokenizer file is malformed",
                guard::quote(msg)
            ),
        }
    }

    fn tokenize_error(&self, op: &'static str, e: tokenizers::Error) -> Error {
        Error::Tokenize {
            source_name: self.source.clone(),
            op,
            message: guard::one_line(&e.to_string()),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
