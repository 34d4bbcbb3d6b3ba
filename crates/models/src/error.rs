//! Error type for model building and checkpoint loading; every message names the file/key at fault.

use thiserror::Error;

/// Errors raised while configuring models or reading their weights.
#[derive(Debug, Error)]
pub enum ModelError {
    /// An unknown preset name was given.
    #[error("unknown model preset `{name}` (known presets: {known})")]
    UnknownPreset {
        /// The name that was asked for.
        name: String,
        /// Comma-separated list of valid names.
        known: String,
    },
    /// A JSON model configuration could not be used.
    #[error("model config {path}: {reason}")]
    Config {
        /// File name.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// File name.
        path: String,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// A weights file is unreadable or does not match the model.
    #[error("weights file {path}: {reason}")]
    Weights {
        /// File name.
        path: String,
        /// What is wrong (first missing/unexpected key, shape mismatch, ...).
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
