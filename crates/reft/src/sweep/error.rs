//! The one error type of the sweep, so callers can tell a bad space file from a damaged
//! journal from a failing disk without string matching.

/// Everything that can go wrong while preparing or running a sweep.
///
/// A trial's own training failure is *not* an error here: it is recorded in the journal as a
/// failed trial and the sweep goes on.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The search-space file is malformed; the message names the key and why it is refused.
    #[error("search space: {0}")]
    Space(String),
    /// A journal line (1-based) could not be read or written; resuming would be unsafe.
    #[error("journal line {line}: {message}")]
    Journal {
        /// 1-based line number in `trials.jsonl`.
        line: usize,
        /// What is wrong with that line.
        message: String,
    },
    /// An argument or a resumed state contradicts the sweep plan (e.g. ASHA with eta < 2).
    #[error("sweep: {0}")]
    Invalid(String),
    /// Reading or writing the journal failed.
    #[error("journal i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Shorthand used by every sweep module.
pub type Result<T> = std::result::Result<T, SweepError>;
