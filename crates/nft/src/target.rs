//! Which network namespace to act on, and running code inside it.
//!
//! `setns` changes only the calling thread, so work in a target namespace
//! happens on a short-lived thread; netlink sockets opened there stay bound
//! to that namespace whichever thread uses them afterwards.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::sched::{CloneFlags, setns};

use crate::NftError;
use crate::netlink::Socket;

/// A network namespace: a path (`/proc/123/ns/net`, `/run/netns/x`),
/// `netns:NAME` (iproute2's /run/netns/NAME) or `pid:N` (that process's).
/// Container ids are resolved to one of these by the caller (CRI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    Netns(String),
    Pid(u32),
}

impl Target {
    /// Parses a target; whether it exists is checked when it is used.
    pub fn parse(s: &str) -> Result<Self, NftError> {
        let bad = |message: &str| NftError::Target {
            target: s.to_owned(),
            message: message.to_owned(),
        };
        if let Some(name) = s.strip_prefix("netns:") {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(bad("netns:NAME needs a namespace name without `/`"));
            }
            return Ok(Self::Netns(name.to_owned()));
        }
        if let Some(pid) = s.strip_prefix("pid:") {
            return match pid.parse::<u32>() {
                Ok(n) if n > 0 => Ok(Self::Pid(n)),
                _ => Err(bad("pid:N needs a process id")),
            };
        }
        if s.starts_with('/') {
            return Ok(Self::Path(PathBuf::from(s)));
        }
        Err(bad(
            "expected a netns path (/run/netns/x, /proc/N/ns/net), netns:NAME or pid:N",
        ))
    }

    /// The namespace file.
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Path(p) => p.clone(),
            Self::Netns(name) => PathBuf::from("/run/netns").join(name),
            Self::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }

    fn open(&self) -> Result<File, NftError> {
        File::open(self.path()).map_err(|e| NftError::Target {
            target: self.to_string(),
            message: format!("no network namespace at {}: {e}", self.path().display()),
        })
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run_in<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, NftError> + Send,
    ) -> Result<T, NftError> {
        let file = self.open()?;
        let target = self.to_string();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NftError::Target {
                    target,
                    message: format!("not a network namespace: {e}"),
                })?;
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    pub(crate) fn nft_socket(&self) -> Result<Socket, NftError> {
        self.run_in(|| {
            Socket::open(libc::NETLINK_NETFILTER)
                .map_err(|e| NftError::kernel("opening an nf_tables netlink socket", &e))
        })
    }

    pub(crate) fn route_socket(&self) -> Result<Socket, NftError> {
        self.run_in(|| {
            Socket::open(libc::NETLINK_ROUTE)
                .map_err(|e| NftError::kernel("opening an rtnetlink socket", &e))
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Netns(name) => write!(f, "netns:{name}"),
            Self::Pid(pid) => write!(f, "pid:{pid}"),
        }
    }
}
