//! Fuzzing of every parser of untrusted input (issue 14): safetensors headers, GGUF files,
//! SentencePiece models, tokenizer.json, tokenizer_config.json, config.json,
//! adapter_config.json and adapter weights, JSONL data and chat templates.
//!
//! - [`targets`]: one entry per target, [`run`], driving the real loading code on bytes.
//! - [`mutate`] (and [`gguf`]): a deterministic, structure-aware mutator.
//! - [`runner`]: a campaign over the committed seeds (`fuzz/seeds/<target>/`): each case under
//!   `catch_unwind`, a watchdog for hangs, and, with [`alloc::Counting`] as the global
//!   allocator, a limit on live memory; whatever breaks is saved for replay.
//!
//! Three ways in: `cargo test -p kaizen-fuzz` (a short deterministic run per target), the
//! `kaizen-fuzz` binary (`scripts/fuzz.sh` without cargo-fuzz), and libFuzzer targets in
//! `fuzz/` that call [`run`] (`scripts/fuzz.sh` with nightly and cargo-fuzz).

pub mod alloc;
pub mod gguf;
pub mod mutate;
pub mod runner;
pub mod targets;

use std::path::PathBuf;

pub use mutate::Format;
pub use targets::run;

/// A parser of untrusted input, as kaizen reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `model.safetensors` of an HF model directory (header, offsets, dtypes, shapes).
    Safetensors,
    /// A `.gguf` model: header, metadata, tokenizer arrays, tensor table.
    Gguf,
    /// `config.json` of an HF model directory.
    ConfigJson,
    /// `adapter_config.json` of a PEFT adapter directory, with matching weights.
    AdapterConfig,
    /// `adapter_model.safetensors` of a LoRA adapter.
    AdapterSafetensors,
    /// `tokenizer.json` (with a tokenizer_config.json beside it).
    TokenizerJson,
    /// `tokenizer_config.json` (added tokens, special tokens, chat template).
    TokenizerConfig,
    /// A SentencePiece `spiece.model`.
    Spiece,
    /// A JSONL training file (all four row shapes).
    Jsonl,
    /// A chat template, rendered within its limits.
    ChatTemplate,
}

impl Target {
    pub const ALL: [Target; 10] = [
        Target::Safetensors,
        Target::Gguf,
        Target::ConfigJson,
        Target::AdapterConfig,
        Target::AdapterSafetensors,
        Target::TokenizerJson,
        Target::TokenizerConfig,
        Target::Spiece,
        Target::Jsonl,
        Target::ChatTemplate,
    ];

    /// The name used by `scripts/fuzz.sh`, the seed folder and the libFuzzer target.
    pub fn name(self) -> &'static str {
        match self {
            Target::Safetensors => "safetensors",
            Target::Gguf => "gguf",
            Target::ConfigJson => "config_json",
            Target::AdapterConfig => "adapter_config",
            Target::AdapterSafetensors => "adapter_safetensors",
            Target::TokenizerJson => "tokenizer_json",
            Target::TokenizerConfig => "tokenizer_config",
            Target::Spiece => "spiece",
            Target::Jsonl => "jsonl",
            Target::ChatTemplate => "chat_template",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn format(self) -> Format {
        match self {
            Target::Safetensors | Target::AdapterSafetensors => Format::Safetensors,
            Target::Gguf => Format::Gguf,
            Target::ConfigJson
            | Target::AdapterConfig
            | Target::TokenizerJson
            | Target::TokenizerConfig => Format::Json,
            Target::Spiece => Format::Binary,
            Target::Jsonl => Format::Jsonl,
            Target::ChatTemplate => Format::Template,
        }
    }

    /// The committed seeds: `fuzz/seeds/<name>/`.
    pub fn seed_dir(self) -> PathBuf {
        repo_root().join("fuzz/seeds").join(self.name())
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
