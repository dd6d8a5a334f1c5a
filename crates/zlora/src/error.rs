//! One error type for the library. Every variant names what it is about (a file, a key, a
//! setting) so the CLI can print a single clear line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or write.
    /// The cause is part of the message, not a `source`: otherwise a chain-printing caller
    /// (anyhow's `{:#}`) prints it twice.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A file exists but its content is not what we need.
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    /// A LoRA file that cannot be applied to a Z-Image transformer.
    #[error("{}: {msg}", path.display())]
    Lora { path: PathBuf, msg: String },
    /// A setting or argument out of range.
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed (shape or dtype mismatch inside the program).
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            cause,
        }
    }

    pub fn bad_file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn lora(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Lora {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}
