//! The one error type of the library. Every message says what was expected, what was found and,
//! where there is one, what to do next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {err}", path.display())]
    Io {
        path: PathBuf,
        // Not named `source`: the message carries it, and a source would print twice.
        err: std::io::Error,
    },
    /// A config file (config.json, GGUF metadata) is missing a field or holds a bad value.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// A weights file is corrupt, truncated, or does not fit the model.
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// The caller asked for something the inputs cannot give (empty prompt, bad flag value, ...).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Data(#[from] kaizen_data::Error),
    #[error("tensor error: {}", brief(.0))]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
}

/// A candle error's message without the backtrace candle appends when RUST_BACKTRACE is set,
/// escaped and cut (it may quote the file, e.g. a tensor name).
pub fn brief(e: &candle_core::Error) -> String {
    kaizen_data::guard::one_line(&e.to_string())
}
