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

    /// Opens netlink sockets of these protocols inside the namespace. The
    /// calling thread joins the namespace just long enough to create them
    /// and returns to its own: far cheaper than a thread per call (a thread
    /// that dies in a foreign namespace costs milliseconds to reap).
    pub(crate) fn sockets<const N: usize>(
        &self,
        protocols: [libc::c_int; N],
    ) -> Result<[Socket; N], NftError> {
        let target = self.open()?;
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(|e| NftError::io("opening our own network namespace", e))?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NftError::Target {
            target: self.to_string(),
            message: format!("not a network namespace: {e}"),
        })?;
        let mut opened = Vec::with_capacity(N);
        let mut failure = None;
        for p in protocols {
            match Socket::open(p) {
                Ok(s) => opened.push(s),
                Err(e) => {
                    failure = Some(NftError::kernel("opening a netlink socket", &e));
                    break;
                }
            }
        }
        // Staying in the target would silently move everything this thread
        // does later: better to stop here.
        setns(home.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("returning to our own network namespace");
        match failure {
            Some(e) => Err(e),
            None => Ok(opened
                .try_into()
                .unwrap_or_else(|_| unreachable!("one socket per protocol"))),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_to_namespace_paths() {
        let path = |s: &str| Target::parse(s).unwrap().path();
        assert_eq!(path("/proc/12/ns/net"), PathBuf::from("/proc/12/ns/net"));
        assert_eq!(path("netns:pod1"), PathBuf::from("/run/netns/pod1"));
        assert_eq!(path("pid:42"), PathBuf::from("/proc/42/ns/net"));
        for bad in [
            "",
            "pod1",
            "netns:",
            "netns:a/b",
            "netns:..",
            "pid:",
            "pid:-1",
            "pid:0",
            "pid:x",
        ] {
            let err = Target::parse(bad).unwrap_err();
            assert!(err.is_bad_input(), "{bad}: {err}");
        }
    }

    #[test]
    fn a_missing_namespace_is_bad_input() {
        let t = Target::parse("netns:pxt-surely-missing").unwrap();
        let err = t.sockets([libc::NETLINK_NETFILTER]).unwrap_err();
        assert!(err.is_bad_input(), "{err}");
    }
}
