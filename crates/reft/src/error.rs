//! The library's one error type. Variants name the file, tensor, key or shape at fault so that a
//! user can act on the message without a backtrace.

use std::path::PathBuf;

/// Everything that can go wrong in `reft`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed (shape mismatch inside the model, device error, …).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed (a missing file reads "does not exist").
    #[error("{path}: {}", io_text(source))]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A weight file is unreadable: truncated, corrupt, or of an unknown format.
    #[error("{path}: {msg}")]
    BadWeights {
        /// The weight file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },

    /// A tensor the architecture needs is absent from the weights.
    #[error("missing tensor `{name}` in {path}")]
    MissingTensor {
        /// The tensor name as the file spells it.
        name: String,
        /// The weight file or folder.
        path: PathBuf,
    },

    /// A tensor has another shape than the configuration implies.
    #[error("tensor `{name}` in {path} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The weight file or folder.
        path: PathBuf,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        actual: Vec<usize>,
    },

    /// A configuration (config.json, GGUF metadata) lacks a key or has a bad value.
    #[error("{path}: {msg}")]
    BadConfig {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },

    /// The tokenizer could not be built or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),

    /// A model could not be fetched or located.
    #[error("model `{name}`: {msg}")]
    ModelFetch {
        /// The model name or path given by the user.
        name: String,
        /// What went wrong.
        msg: String,
    },

    /// A Python package's wheel could not be fetched or unpacked.
    #[error("package `{requirement}`: {msg}")]
    PackageFetch {
        /// The `pip` requirement.
        requirement: String,
        /// What went wrong.
        msg: String,
    },

    /// A caller passed invalid arguments (generation options, sites, …).
    #[error("{0}")]
    InvalidArgument(String),

    /// The serving engine refused a request (unknown adapter, full queue, …).
    #[error(transparent)]
    Refused(#[from] crate::engine::Refusal),

    /// A sweep's space file or journal is unusable.
    #[error(transparent)]
    Sweep(#[from] crate::sweep::SweepError),
}

/// An I/O error in words; a missing file or folder "does not exist".
fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".into(),
        _ => e.to_string(),
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
