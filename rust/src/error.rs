//! The crate's one error type. Every variant carries the context a user needs to find the
//! problem: the file, the tensor or the config field.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose bytes do not follow its format (corrupt, truncated, bad header).
    #[error("{}: {reason}", path.display())]
    InvalidFile { path: PathBuf, reason: String },
    /// A tensor with the wrong shape, dtype or contents.
    #[error("tensor '{name}': {reason}")]
    Tensor { name: String, reason: String },
    /// An adapter config that cannot be read, upgraded or written as asked.
    #[error("adapter config: {0}")]
    Config(String),
    /// A bad argument to a core function (blocksize, rank, bits, ...).
    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::InvalidFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub fn invalid_argument(reason: impl Into<String>) -> Self {
        Error::InvalidArgument(reason.into())
    }
}
