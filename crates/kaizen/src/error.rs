//! The one error type of the library. Every message says what was expected, what was found and,
//! where there is one, what to do next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A config file (config.json, GGUF metadata) is missing a field or holds a bad value.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A weights file is corrupt, truncated, or does not fit the model.
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// The caller asked for something the inputs cannot give (empty prompt, bad flag value, ...).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Data(#[from] kaizen_data::Error),
    #[error("tensor error: {0}")]
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
            source,
        }
    }
}
