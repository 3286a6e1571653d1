//! Listen addresses as upstream's Go binaries read them: an empty host is
//! every interface over both IPv6 and IPv4 (Go's `":port"`), a literal is
//! that address, and a host name is resolved once at start-up to one of its
//! addresses. [`listen`] opens the socket so that `[::]` also takes IPv4
//! connections whatever `net.ipv6.bindv6only` says, and falls back to
//! `0.0.0.0` on hosts without IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use tokio::net::TcpListener;

/// The address to bind for `host` (empty, an IP literal with or without
/// brackets, or a host name) and `port`.
pub fn bind_addr(host: &str, port: u16) -> Result<SocketAddr, String> {
    if host.is_empty() {
        return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if bare.contains(['/', ' ', ':']) {
        return Err(format!("invalid bind address {host:?}"));
    }
    let addrs: Vec<SocketAddr> = (bare, port)
        .to_socket_addrs()
        .map_err(|e| format!("bind address {host:?} does not resolve: {e}"))?
        .collect();
    // Go's Listen takes the first IPv4 address of a name, else its first.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("bind address {host:?} has no address"))
}

/// Binds and listens on `addr` (from [`bind_addr`]). `[::]` is opened
/// dual-stack; where the host has no IPv6 it becomes `0.0.0.0`.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        match open(addr, true) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) =>
            {
                tracing::info!(error = %e, "no IPv6 on this host: listening on IPv4 only");
                open(
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()),
                    false,
                )
            }
            r => r,
        }
    } else {
        open(addr, false)
    }
}

fn open(addr: SocketAddr, dual_stack: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    // As tokio's TcpListener::bind: a restarted server may rebind at once
    // while old connections sit in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_host_is_every_interface_both_families() {
        assert_eq!(bind_addr("", 8090).unwrap(), "[::]:8090".parse().unwrap());
    }

    #[test]
    fn literals_with_and_without_brackets() {
        assert_eq!(
            bind_addr("127.0.0.1", 1).unwrap(),
            "127.0.0.1:1".parse().unwrap()
        );
        assert_eq!(bind_addr("::1", 1).unwrap(), "[::1]:1".parse().unwrap());
        assert_eq!(bind_addr("[::1]", 1).unwrap(), "[::1]:1".parse().unwrap());
    }

    #[test]
    fn host_names_resolve_and_garbage_is_refused() {
        let a = bind_addr("localhost", 2).unwrap();
        assert!(a.ip().is_loopback(), "{a}");
        assert!(bind_addr("no such host", 1).is_err());
        assert!(bind_addr("1.2.3.4:5", 1).is_err());
    }

    #[tokio::test]
    async fn unspecified_v6_takes_both_families() {
        let l = listen(bind_addr("", 0).unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        for ip in ["127.0.0.1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (c, s) = tokio::join!(tokio::net::TcpStream::connect((ip, port)), l.accept());
            c.unwrap();
            s.unwrap();
        }
    }
}
