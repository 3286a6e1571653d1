//! Sockets inside other network namespaces. setns(2) changes only the
//! calling thread, so every entry happens on a short-lived thread of its own
//! and the caller's namespace is never touched. A listening socket stays in
//! the namespace it was created in after the thread ends (as ztunnel's
//! per-pod listeners do).

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::Error;

/// Identifies a network namespace instance: a new namespace mounted at an
/// old path has a different inode, so a reused path is not mistaken for the
/// namespace it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

fn netns_err(path: &Path, source: std::io::Error) -> Error {
    Error::Netns {
        path: path.display().to_string(),
        source,
    }
}

pub fn netns_id(path: &Path) -> Result<NetnsId, Error> {
    let meta = std::fs::metadata(path).map_err(|e| netns_err(path, e))?;
    Ok(NetnsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Runs `f` on a new thread that has joined the namespace at `path`.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<(T, NetnsId), Error> {
    let file = File::open(path).map_err(|e| netns_err(path, e))?;
    let meta = file.metadata().map_err(|e| netns_err(path, e))?;
    let id = NetnsId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let owned: PathBuf = path.to_owned();
    let result = std::thread::Builder::new()
        .name("imds-netns".into())
        .spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .map_err(|e| netns_err(&owned, e))?
        .join()
        .map_err(|_| netns_err(&owned, std::io::Error::other("netns thread panicked")))?;
    result.map(|v| (v, id)).map_err(|e| netns_err(&owned, e))
}

/// Binds a non-blocking TCP listener on `addr` inside the namespace at
/// `path`; returns it with the id of the namespace it lives in.
pub fn bind_in_netns(path: &Path, addr: SocketAddr) -> Result<(TcpListener, NetnsId), Error> {
    in_netns(path, move || {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
}

/// Addresses configured on the interfaces of the namespace at `path`.
pub fn addresses_in_netns(path: &Path) -> Result<Vec<IpAddr>, Error> {
    in_netns(path, || {
        let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
        Ok(addrs
            .filter_map(|a| {
                let sa = a.address?;
                if let Some(v4) = sa.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect())
    })
    .map(|(v, _)| v)
}
