//! kaizen-data: tokenizers, chat templates and JSONL datasets. No tensor dependency.
//!
//! - [`tokenizer`]: one [`Tokenizer`] over HF `tokenizer.json`, SentencePiece `.model` files
//!   (pure Rust, id-for-id with the C++ library) and GGUF tokenizer metadata; [`TextStream`] for
//!   streaming detokenisation.
//! - [`chat`]: HF chat templates rendered with minijinja.
//! - [`jsonl`]: JSONL reading with `file:line` errors, streamed, lines capped in size;
//!   [`long_text`]: tokenizing only the part of a long text that `max_len` tokens can use.
//! - [`guard`]: escaping file content quoted in errors; panics of parsing dependencies caught.
//! - [`dataset`]: training examples (ids + labels) from JSONL rows of four shapes, rendered with
//!   a [`template`]; [`batch`]: validation split, epoch orders, padding and packing.

pub mod batch;
pub mod chat;
pub mod dataset;
pub mod error;
pub mod guard;
pub mod jsonl;
pub mod long_text;
pub mod template;
pub mod tokenizer;

pub use batch::{collate, pack, split_validation, Batch, Batches};
pub use dataset::{load_dataset, preview_dataset, DataOptions, Dataset, Example, IGNORE_INDEX};
pub use error::{Error, Result};
pub use guard::{catch_panic, quote};
pub use template::Template;
pub use tokenizer::{GgufVocab, TextStream, Tokenizer, TokenizerKind};
