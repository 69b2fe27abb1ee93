//! kaizen-data: tokenizers, chat templates and JSONL datasets. No tensor dependency.
//!
//! - [`tokenizer`]: one [`Tokenizer`] over HF `tokenizer.json`, SentencePiece `.model` files
//!   (pure Rust, id-for-id with the C++ library) and GGUF tokenizer metadata; [`TextStream`] for
//!   streaming detokenisation.
//! - [`chat`]: HF chat templates rendered with minijinja.
//! - [`jsonl`]: JSONL reading with `file:line` errors.

pub mod chat;
pub mod error;
pub mod jsonl;
pub mod tokenizer;

pub use error::{Error, Result};
pub use tokenizer::{GgufVocab, TextStream, Tokenizer, TokenizerKind};
