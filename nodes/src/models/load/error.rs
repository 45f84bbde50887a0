//! What can go wrong when reading weights, each error naming the file (or weight set) at fault.

use std::fmt;
use std::path::PathBuf;

/// How many names a [`LoadError::MissingKeys`] message lists before it stops.
pub const LISTED_KEYS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: no such file or folder", path.display())]
    NotFound { path: PathBuf },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The header is readable but the tensor data it describes runs past the end of the file.
    #[error(
        "{}: truncated safetensors file: the header needs {expected_len} bytes, the file has {found_len} (incomplete download or copy?)",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        expected_len: u64,
        found_len: u64,
    },

    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    CorruptSafetensors { path: PathBuf, reason: String },

    #[error("{}: not a readable PyTorch zip checkpoint: {reason}", path.display())]
    CorruptCheckpoint { path: PathBuf, reason: String },

    /// The file or folder is readable but is not laid out as the caller needs.
    #[error("{}: unrecognised format: expected {expected}; found {found}", path.display())]
    UnrecognisedFormat {
        path: PathBuf,
        expected: String,
        found: String,
    },

    #[error(
        "{origin}: {count} expected weight(s) missing, e.g. {}",
        KeyList(first)
    )]
    MissingKeys {
        origin: String,
        count: usize,
        first: Vec<String>,
    },

    #[error("{origin}: weight `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        origin: String,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{origin}: two weights map to the same name `{key}`")]
    DuplicateKey { origin: String, key: String },

    #[error("{}: invalid config: {reason}", path.display())]
    InvalidConfig { path: PathBuf, reason: String },

    #[error("{origin}: weight `{key}`: {source}")]
    Tensor {
        origin: String,
        key: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

impl LoadError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::NotFound { path }
        } else {
            Self::Io { path, source }
        }
    }

    /// A [`LoadError::MissingKeys`] listing the first few of `missing`.
    pub fn missing_keys(origin: impl Into<String>, missing: &[String]) -> Self {
        Self::MissingKeys {
            origin: origin.into(),
            count: missing.len(),
            first: missing.iter().take(LISTED_KEYS).cloned().collect(),
        }
    }
}

impl From<LoadError> for candle_core::Error {
    fn from(err: LoadError) -> Self {
        candle_core::Error::wrap(err)
    }
}

struct KeyList<'a>(&'a [String]);

impl fmt::Display for KeyList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, key) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "`{key}`")?;
        }
        Ok(())
    }
}

pub type LoadResult<T> = std::result::Result<T, LoadError>;
