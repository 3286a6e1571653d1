//! Shared by the kernel tests: a "pod" and a "peer" namespace joined by a
//! veth pair, proxies and servers with real sockets, and `nft` as an
//! independent view of the kernel's ruleset. Everything lives in namespaces
//! the test creates; the NetNs guards delete them (and the veth) on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use proxyctl_nft::{Target, probe};
use proxyctl_testkit::NetNs;

pub const POD_V4: &str = "10.77.0.1";
pub const PEER_V4: &str = "10.77.0.2";
pub const PEER2_V4: &str = "10.77.0.3";
pub const PEER3_V4: &str = "10.77.0.4";
pub const POD_V6: &str = "fd77::1";
pub const PEER_V6: &str = "fd77::2";
pub const PEER2_V6: &str = "fd77::3";
pub const WAIT: Duration = Duration::from_millis(1500);

pub fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

pub struct Pair {
    pub peer: NetNs,
    pub pod: NetNs,
    pub target: Target,
}

impl Pair {
    pub fn new(prefix: &str) -> Self {
        let pod = NetNs::new(prefix);
        let peer = NetNs::new(&format!("{prefix}p"));
        pod.run(&[
            "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ]);
        pod.run(&["ip", "link", "set", "v1", "netns", peer.name()]);
        pod.run(&["ip", "addr", "add", &format!("{POD_V4}/24"), "dev", "v0"]);
        pod.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{POD_V6}/64"),
            "dev",
            "v0",
            "nodad",
        ]);
        pod.run(&["ip", "link", "set", "v0", "up"]);
        for a in [PEER_V4, PEER2_V4, PEER3_V4] {
            peer.run(&["ip", "addr", "add", &format!("{a}/24"), "dev", "v1"]);
        }
        for a in [PEER_V6, PEER2_V6] {
            peer.run(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                "v1",
                "nodad",
            ]);
        }
        peer.run(&["ip", "link", "set", "v1", "up"]);
        let target = Target::Path(pod.path());
        Self { peer, pod, target }
    }

    /// `nft -a list table inet proxyctl` in the pod (handles included), or
    /// None when the table does not exist.
    pub fn nft_text(&self) -> Option<String> {
        nft_text(&self.pod)
    }
}

pub fn nft_text(ns: &NetNs) -> Option<String> {
    let out = ns.exec(&["nft", "-a", "list", "table", "inet", "proxyctl"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Opens TCP listeners in `ns` (v4 + v6 where given).
pub fn tcp_listeners(ns: &NetNs, addrs: &[SocketAddr]) -> Vec<TcpListener> {
    let addrs = addrs.to_vec();
    ns.enter(move || {
        addrs
            .iter()
            .map(|a| probe::tcp_listener(*a).unwrap_or_else(|e| panic!("listen {a}: {e}")))
            .collect()
    })
}

pub fn udp_tproxy(ns: &NetNs, addrs: &[SocketAddr]) -> Vec<UdpSocket> {
    let addrs = addrs.to_vec();
    ns.enter(move || {
        addrs
            .iter()
            .map(|a| probe::udp_tproxy_socket(*a).unwrap())
            .collect()
    })
}

pub fn udp_servers(ns: &NetNs, addrs: &[SocketAddr]) -> Vec<UdpSocket> {
    let addrs = addrs.to_vec();
    ns.enter(move || {
        addrs
            .iter()
            .map(|a| probe::udp_server(*a).unwrap())
            .collect()
    })
}

/// Connects from `ns` as uid/gid (None: as root) from `src` to `dst`, sends
/// `token`, and keeps the client open until the token was read by the far end.
pub fn tcp_send(
    ns: &NetNs,
    ids: Option<(u32, u32)>,
    src: SocketAddr,
    dst: SocketAddr,
    token: &str,
) -> std::net::TcpStream {
    let token = token.to_owned();
    ns.enter(move || {
        if let Some((u, g)) = ids {
            probe::set_thread_fs_ids(u, g).unwrap();
        }
        let mut s =
            probe::tcp_connect(src, dst, WAIT).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.write_all(token.as_bytes()).unwrap();
        s
    })
}

pub fn udp_send(
    ns: &NetNs,
    ids: Option<(u32, u32)>,
    src: SocketAddr,
    dst: SocketAddr,
    token: &str,
) {
    let token = token.to_owned();
    ns.enter(move || {
        if let Some((u, g)) = ids {
            probe::set_thread_fs_ids(u, g).unwrap();
        }
        let s = probe::udp_client(src).unwrap();
        s.send_to(token.as_bytes(), dst).unwrap();
    })
}

/// Where a TCP token arrived: the index of the listener and the original
/// destination (SO_ORIGINAL_DST; for a plain server, its local address).
pub fn tcp_arrival(listeners: &[&TcpListener], token: &str) -> Option<(usize, SocketAddr)> {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        for (i, l) in listeners.iter().enumerate() {
            if let Ok((mut s, _)) = l.accept() {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                let mut buf = vec![0u8; token.len()];
                if s.read_exact(&mut buf).is_ok() && buf == token.as_bytes() {
                    let orig = probe::original_dst(&s).unwrap_or_else(|_| s.local_addr().unwrap());
                    return Some((i, orig));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Where a UDP token arrived: socket index and original destination.
pub fn udp_arrival(socks: &[&UdpSocket], token: &str) -> Option<(usize, Option<SocketAddr>)> {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        for (i, s) in socks.iter().enumerate() {
            if let Ok(Some(d)) = probe::recv_datagram(s)
                && d.payload == token.as_bytes()
            {
                return Some((i, d.original_dst));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}
