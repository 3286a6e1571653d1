//! Where the container runtime listens, spelled as crictl spells it.

use std::path::{Path, PathBuf};

use crate::CriError;

/// containerd's CRI socket, used when neither flag nor environment names one.
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// The environment variable crictl and kubelet tooling read.
pub const RUNTIME_ENDPOINT_ENV: &str = "CONTAINER_RUNTIME_ENDPOINT";

/// A runtime endpoint: on Linux, a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEndpoint {
    socket: PathBuf,
}

impl RuntimeEndpoint {
    /// Parses `unix:///path/to/sock` (crictl's form) or a bare absolute path.
    pub fn parse(value: &str) -> Result<Self, CriError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(CriError::Endpoint("empty endpoint".into()));
        }
        let path = if let Some(rest) = value.strip_prefix("unix://") {
            rest
        } else if value.starts_with('/') {
            value
        } else if let Some((scheme, _)) = value.split_once("://") {
            return Err(CriError::Endpoint(format!(
                "`{value}`: scheme `{scheme}` is not supported here; use unix:///path/to/socket"
            )));
        } else {
            return Err(CriError::Endpoint(format!(
                "`{value}` is not unix:///path/to/socket or an absolute socket path"
            )));
        };
        if !path.starts_with('/') {
            return Err(CriError::Endpoint(format!(
                "`{value}`: the socket path must be absolute (unix:///run/...)"
            )));
        }
        Ok(Self {
            socket: PathBuf::from(path),
        })
    }

    /// The flag's value if given, else `CONTAINER_RUNTIME_ENDPOINT`, else containerd's default.
    pub fn resolve(flag: Option<&str>) -> Result<Self, CriError> {
        match flag {
            Some(v) => Self::parse(v),
            None => match std::env::var(RUNTIME_ENDPOINT_ENV) {
                Ok(v) if !v.trim().is_empty() => Self::parse(&v),
                _ => Self::parse(DEFAULT_RUNTIME_ENDPOINT),
            },
        }
    }

    pub fn from_socket(path: impl Into<PathBuf>) -> Self {
        Self {
            socket: path.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl std::fmt::Display for RuntimeEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unix://{}", self.socket.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_crictl_spelling_and_bare_paths() {
        assert_eq!(
            RuntimeEndpoint::parse("unix:///run/x.sock")
                .unwrap()
                .socket(),
            Path::new("/run/x.sock")
        );
        assert_eq!(
            RuntimeEndpoint::parse("/run/y.sock").unwrap().socket(),
            Path::new("/run/y.sock")
        );
        assert_eq!(
            RuntimeEndpoint::parse(DEFAULT_RUNTIME_ENDPOINT)
                .unwrap()
                .to_string(),
            DEFAULT_RUNTIME_ENDPOINT
        );
    }

    #[test]
    fn refuses_other_schemes_and_relative_paths() {
        for bad in [
            "",
            "tcp://1.2.3.4:1",
            "npipe:////./pipe/x",
            "unix://run/x.sock",
            "x.sock",
        ] {
            let err = RuntimeEndpoint::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("--runtime-endpoint"), "{bad}: {err}");
        }
    }
}
