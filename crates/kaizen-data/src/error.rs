//! The one error type of kaizen-data. Every message names the file or field involved and, where
//! there is one, the next step.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {err}", path.display())]
    Io {
        path: PathBuf,
        // Not named `source`: the message already carries it, and a source would print twice.
        err: std::io::Error,
    },

    /// A file that exists but whose content is wrong; `what` says what was expected and found.
    #[error("{}: {what}", path.display())]
    BadFile { path: PathBuf, what: String },

    /// A JSONL line that is not what it should be.
    #[error("{}:{line}: {what}", path.display())]
    BadLine {
        path: PathBuf,
        line: usize,
        what: String,
    },

    /// A tokenizer that cannot be built from the given metadata (GGUF fields, SentencePiece spec).
    #[error("{source_name}: {what}")]
    BadTokenizer { source_name: String, what: String },

    /// The `tokenizers` crate failed while encoding or decoding.
    #[error("{source_name}: {op} failed: {message}")]
    Tokenize {
        source_name: String,
        op: &'static str,
        message: String,
    },

    #[error("{source_name}: no chat template. {hint}")]
    NoChatTemplate { source_name: String, hint: String },

    /// A chat template that fails to render; `source_name` names where it came from.
    #[error("chat template{}: {what}", .source_name.as_deref().map(|s| format!(" of {s}")).unwrap_or_default())]
    Template {
        source_name: Option<String>,
        what: String,
    },

    /// A setting with a value it cannot take (a template name, a split fraction, a length).
    #[error("{option}: {what}")]
    BadOption { option: &'static str, what: String },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            err: source,
        }
    }

    pub(crate) fn bad_file(path: &Path, what: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub(crate) fn bad_option(option: &'static str, what: impl Into<String>) -> Self {
        Error::BadOption {
            option,
            what: what.into(),
        }
    }

    pub(crate) fn template(what: impl Into<String>) -> Self {
        Error::Template {
            source_name: None,
            what: what.into(),
        }
    }

    /// A template error naming where the template came from (a model directory, a GGUF file).
    pub fn in_template_of(self, source: &str) -> Self {
        match self {
            Error::Template { what, .. } => Error::Template {
                source_name: Some(source.to_string()),
                what,
            },
            other => other,
        }
    }

    pub(crate) fn bad_tokenizer(source_name: &str, what: impl Into<String>) -> Self {
        Error::BadTokenizer {
            source_name: source_name.to_string(),
            what: what.into(),
        }
    }
}

impl From<minijinja::Error> for Error {
    fn from(e: minijinja::Error) -> Self {
        // minijinja's Display omits the chain; walk it so "raise_exception" messages and the
        // template line both show up.
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        Error::template(msg)
    }
}
