//! Where the container runtime listens, spelled as crictl spells it.

use std::path::{Path, PathBuf};

use crate::CriError;

/// containerd's CRI socket, used when neither flag nor environment names one.
#[cfg(not(windows))]
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";
/// containerd's CRI named pipe on Windows (crictl's default there).
#[cfg(windows)]
pub const DEFAULT_RUNTIME_ENDPOINT: &str = "npipe:////./pipe/containerd-containerd";
/// The environment variable crictl and kubelet tooling read.
pub const RUNTIME_ENDPOINT_ENV: &str = "CONTAINER_RUNTIME_ENDPOINT";

/// A runtime endpoint: on unix, a unix socket path; on Windows, a named
/// pipe (`\\.\pipe\NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEndpoint {
    socket: PathBuf,
}

impl RuntimeEndpoint {
    /// Parses `unix:///path/to/sock` (crictl's form) or a bare absolute path;
    /// on Windows `npipe:////./pipe/NAME` or a bare `\\.\pipe\NAME`.
    pub fn parse(value: &str) -> Result<Self, CriError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(CriError::Endpoint("empty endpoint".into()));
        }
        #[cfg(windows)]
        return parse_npipe(value).map(|socket| Self { socket });
        #[cfg(not(windows))]
        Self::parse_unix(value)
    }

    #[cfg(not(windows))]
    fn parse_unix(value: &str) -> Result<Self, CriError> {
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

    /// The unix socket path, or on Windows the pipe name.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl std::fmt::Display for RuntimeEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(windows)]
        return write!(
            f,
            "npipe://{}",
            self.socket.display().to_string().replace('\\', "/")
        );
        #[cfg(not(windows))]
        write!(f, "unix://{}", self.socket.display())
    }
}

/// crictl's named-pipe endpoint (as kubernetes' cri-client parses it on
/// Windows) -> the pipe name: `npipe:////./pipe/NAME` and
/// `npipe://./pipe/NAME` (host `.` when empty), or a bare `\\.\pipe\NAME`,
/// all give `\\.\pipe\NAME`. Used on Windows only; plain string work, so it
/// is unit-tested everywhere.
#[cfg_attr(not(windows), allow(dead_code))]
fn parse_npipe(value: &str) -> Result<PathBuf, CriError> {
    let bad = |why: &str| {
        CriError::Endpoint(format!(
            "`{value}`: {why}; use npipe:////./pipe/NAME (default {WINDOWS_DEFAULT})"
        ))
    };
    // url.Parse does not know `\`: crictl turns it into `/` first.
    let slashed = value.replace('\\', "/");
    let path = if let Some(rest) = slashed.strip_prefix("npipe://") {
        if rest.starts_with("//") {
            rest.to_owned()
        } else {
            // npipe://HOST/pipe/NAME
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = if host.is_empty() { "." } else { host };
            format!("//{host}/{path}")
        }
    } else if slashed.starts_with("//") {
        slashed.clone()
    } else if let Some((scheme, _)) = slashed.split_once("://") {
        return Err(bad(&format!("scheme `{scheme}` is not supported here")));
    } else {
        return Err(bad("not a named pipe"));
    };
    // //HOST/pipe/NAME
    let mut parts = path[2..].splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(host), Some(pipe), Some(name))
            if !host.is_empty() && pipe.eq_ignore_ascii_case("pipe") && !name.is_empty() =>
        {
            Ok(PathBuf::from(format!(
                r"\\{host}\pipe\{}",
                name.replace('/', r"\")
            )))
        }
        _ => Err(bad("not //HOST/pipe/NAME")),
    }
}

/// The Windows default, for messages (and tests) on every platform.
const WINDOWS_DEFAULT: &str = "npipe:////./pipe/containerd-containerd";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(not(windows))]
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
    #[cfg(not(windows))]
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

    #[test]
    fn npipe_endpoints_as_crictl_spells_them() {
        let pipe = |v: &str| parse_npipe(v).map(|p| p.display().to_string());
        let want = r"\\.\pipe\containerd-containerd";
        for ok in [
            WINDOWS_DEFAULT,
            "npipe://./pipe/containerd-containerd",
            "npipe:///pipe/containerd-containerd",
            r"npipe:\\\\.\pipe\containerd-containerd",
            r"\\.\pipe\containerd-containerd",
            "//./pipe/containerd-containerd",
        ] {
            assert_eq!(pipe(ok).unwrap(), want, "{ok}");
        }
        assert_eq!(pipe("npipe://host/pipe/a/b").unwrap(), r"\\host\pipe\a\b");
        for bad in [
            "unix:///run/x.sock",
            "/run/x.sock",
            "npipe:////./pipe/",
            "npipe:////./notpipe/x",
            "npipe://",
            "x",
        ] {
            let err = pipe(bad).unwrap_err().to_string();
            assert!(err.starts_with("--runtime-endpoint"), "{bad}: {err}");
            assert!(err.contains("npipe:////./pipe/NAME"), "{bad}: {err}");
        }
    }
}
