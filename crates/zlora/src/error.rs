//! One error type for the library. Every variant names what it is about (a file, a key, a
//! setting) so the CLI can print a single clear line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or write.
    /// The cause is part of the message, not a `source`: otherwise a chain-printing caller
    /// (anyhow's `{:#}`) prints it twice.
    #[error("{}: {cause}", shown(path))]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A file exists but its content is not what we need.
    #[error("{}: {msg}", shown(path))]
    BadFile { path: PathBuf, msg: String },
    /// A LoRA file that cannot be applied to a Z-Image transformer.
    #[error("{}: {msg}", shown(path))]
    Lora { path: PathBuf, msg: String },
    /// A setting or argument out of range.
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed (shape or dtype mismatch inside the program).
    /// Not a `source` either (see `Io`): the message would print twice.
    #[error("tensor error: {0}")]
    Tensor(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Tensor(e)
    }
}

/// A path as printed in messages: control characters (a newline in a file name) are escaped,
/// so one error stays one line and a name cannot fake another message.
pub fn shown(path: &Path) -> String {
    path.to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
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

    /// A tensor error while reading the weights at `path` becomes that file's error;
    /// other errors already name what they are about.
    pub fn in_file(self, path: impl AsRef<Path>) -> Self {
        match self {
            Error::Tensor(e) => Error::bad_file(path, e.to_string()),
            other => other,
        }
    }

    pub fn lora(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Lora {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_on_one_line_and_tensor_errors_once() {
        let e = Error::bad_file("a\nb\tc.png", "unreadable");
        assert_eq!(e.to_string(), "a\\nb\\tc.png: unreadable");
        let t = Error::from(candle_core::Error::Msg("shape mismatch".into()));
        assert!(std::error::Error::source(&t).is_none());
        assert_eq!(t.in_file("dir").to_string(), "dir: shape mismatch");
    }
}
