//! The backend's one error type. Bad input (the caller can fix it; nothing
//! was changed) is kept apart from kernel and I/O failures, so the CLI can
//! exit 2 for the former.

use std::io;

use proxyctl_policy::PolicyError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NftError {
    /// The policy itself is invalid (field named).
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A field this backend cannot express on Linux.
    #[error("--{field}: {message}")]
    Unsupported {
        field: &'static str,
        message: String,
    },
    /// `--exclude-user` names no user on this host.
    #[error("--exclude-user: no user named `{0}` on this host")]
    UnknownUser(String),
    /// The target is malformed or names no network namespace.
    #[error("target `{target}`: {message}")]
    Target { target: String, message: String },
    /// The kernel refused a request.
    #[error("{op}: {message}")]
    Kernel {
        op: String,
        errno: i32,
        message: String,
    },
    /// A local I/O failure (spawning, reading files).
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The table holds something this version cannot read back.
    #[error("table inet proxyctl cannot be read back: {0}")]
    Decode(String),
}

impl NftError {
    /// True when the caller's input is at fault and nothing was changed.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Policy(_) | Self::Unsupported { .. } | Self::UnknownUser(_) | Self::Target { .. }
        )
    }

    pub(crate) fn kernel(op: &str, e: &io::Error) -> Self {
        Self::Kernel {
            op: op.to_owned(),
            errno: crate::netlink::errno_of(e).unwrap_or(libc::EIO),
            message: e.to_string(),
        }
    }

    pub(crate) fn io(op: &str, source: io::Error) -> Self {
        Self::Io {
            op: op.to_owned(),
            source,
        }
    }
}
