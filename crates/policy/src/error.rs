//! The one error type of the model: every refusal names the field at fault,
//! spelled as the CLI flag, so users can find what to change.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// A value is malformed or out of range.
    #[error("invalid --{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// Two fields contradict each other, or one requires another.
    #[error("--{field}: {message}")]
    Conflict {
        field: &'static str,
        message: String,
    },
    /// A policy file could not be read or parsed.
    #[error("policy file {path}: {message}")]
    File { path: String, message: String },
}

impl PolicyError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }

    pub fn conflict(field: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict {
            field,
            message: message.into(),
        }
    }

    /// The CLI name of the field at fault, if the error is about one field.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { field, .. } | Self::Conflict { field, .. } => Some(field),
            Self::File { .. } => None,
        }
    }
}
