//! Real third-party proxies from Debian as the sidecar, in namespaces the
//! tests create: dnsmasq as the DNS forwarder behind `--dns-port`, squid
//! in intercept mode behind the TCP redirect (IPv4 and IPv6), ss-redir
//! (shadowsocks-libev) behind the UDP tproxy path. Each sidecar runs as
//! its own user, excluded by the policy, so its upstream traffic leaves
//! the pod instead of looping back.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use proxyctl_nft as nft;
use proxyctl_policy::{Exclusions, Policy, Protocol};
use proxyctl_testkit::{NetNs, require_root, require_tool};

const APP: (u32, u32) = (1000, 1000);

/// A daemon started in a namespace, killed (by its pid) on drop; its
/// output goes to a log file the failure messages print.
struct Daemon {
    child: Child,
    log: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    fn start(ns: &NetNs, name: &str, argv: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "pxt-sidecar-{}-{}-{name}",
            std::process::id(),
            ns.name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self::start_in(ns, dir, name, argv)
    }

    fn start_in(ns: &NetNs, dir: PathBuf, name: &str, argv: &[&str]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        use std::os::unix::process::CommandExt;
        // Its own process group, so helpers it forks (squid's pinger, dnsmasq's
        // TCP children) are killed with it.
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(argv)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { child, log, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test started.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A DNS query for `name`, type A (1) or AAAA (28).
fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
    q
}

/// The addresses in the answer section of a reply to `dns_query`.
fn dns_answers(reply: &[u8], query: &[u8]) -> Vec<IpAddr> {
    assert!(reply.len() >= query.len(), "short reply {reply:?}");
    assert_eq!(reply[..2], query[..2], "reply to another query");
    let count = u16::from_be_bytes([reply[6], reply[7]]);
    let mut at = query.len();
    let mut out = Vec::new();
    for _ in 0..count {
        // The names in dnsmasq's answers are compression pointers.
        at += if reply[at] & 0xc0 == 0xc0 {
            2
        } else {
            reply[at..].iter().position(|&b| b == 0).unwrap() + 1
        };
        let ty = u16::from_be_bytes([reply[at], reply[at + 1]]);
        let len = u16::from_be_bytes([reply[at + 8], reply[at + 9]]) as usize;
        let data = &reply[at + 10..at + 10 + len];
        match (ty, len) {
            (1, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(data).unwrap())),
            (28, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(data).unwrap())),
            _ => {}
        }
        at += 10 + len;
    }
    out
}

/// Asks `server` over UDP from a socket connected to it, as the app (so a
/// reply from any other source would be dropped, as resolvers do).
fn ask_udp(ns: &NetNs, server: SocketAddr, name: &str, qtype: u16) -> std::io::Result<Vec<IpAddr>> {
    let name = name.to_owned();
    ns.enter(move || {
        nft::probe::set_thread_fs_ids(APP.0, APP.1)?;
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = UdpSocket::bind(bind)?;
        s.connect(server)?;
        s.set_read_timeout(Some(Duration::from_millis(700)))?;
        let q = dns_query(0x5a5a, &name, qtype);
        s.send(&q)?;
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf)?;
        Ok(dns_answers(&buf[..n], &q))
    })
}

fn ask_tcp(ns: &NetNs, server: SocketAddr, name: &str, qtype: u16) -> std::io::Result<Vec<IpAddr>> {
    let name = name.to_owned();
    ns.enter(move || {
        nft::probe::set_thread_fs_ids(APP.0, APP.1)?;
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let q = dns_query(0x7b7b, &name, qtype);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend(&q);
        s.write_all(&framed)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut reply)?;
        Ok(dns_answers(&reply, &q))
    })
}

/// Retries `f` until it succeeds (a daemon still starting) or 5 s passed.
fn eventually<T>(
    what: &str,
    logs: &dyn Fn() -> String,
    mut f: impl FnMut() -> std::io::Result<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}\n{}", logs()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn dns_port_serves_udp_and_tcp_dns_through_a_dnsmasq_forwarder() {
    if !require_root("dns_dnsmasq") || !require_tool("dns_dnsmasq", "dnsmasq") {
        return;
    }
    let pair = Pair::new("dns");
    // The "cluster DNS" in the peer namespace knows svc.test only.
    let upstream = Daemon::start(
        &pair.peer,
        "upstream",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--log-queries",
            "--log-facility=-",
            "--user=nobody",
            "--port=53",
            "--host-record=svc.test,10.9.8.7,fd99::7",
        ],
    );
    // The sidecar forwards to it and answers sidecar.test itself, so an
    // answer for that name proves the query went through the sidecar.
    let sidecar = Daemon::start(
        &pair.pod,
        "sidecar",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--log-queries",
            "--log-facility=-",
            "--user=nobody",
            "--port=15053",
            &format!("--server={PEER_V4}"),
            "--address=/sidecar.test/192.0.2.53",
        ],
    );
    let logs = || format!("sidecar:\n{}\nupstream:\n{}", sidecar.log(), upstream.log());
    let p = Policy {
        dns_port: Some(15053),
        protocols: vec![Protocol::Udp, Protocol::Tcp],
        exclude: Exclusions {
            users: vec!["nobody".into()],
            ..Default::default()
        },
        ..Policy::default()
    };
    nft::add(&pair.target, &p).unwrap();
    for server in [sa(PEER_V4, 53), sa(PEER_V6, 53)] {
        let udp = eventually("UDP query", &logs, || {
            ask_udp(&pair.pod, server, "sidecar.test", 1)
        });
        assert_eq!(udp, [ip("192.0.2.53")], "{server} UDP: {}", logs());
        let tcp = eventually("TCP query", &logs, || {
            ask_tcp(&pair.pod, server, "sidecar.test", 1)
        });
        assert_eq!(tcp, [ip("192.0.2.53")], "{server} TCP: {}", logs());
        // Forwarded: the sidecar's own query (as nobody) is not redirected
        // back into it, and reaches the upstream.
        let a = eventually("forwarded", &logs, || {
            ask_udp(&pair.pod, server, "svc.test", 1)
        });
        assert_eq!(a, [ip("10.9.8.7")], "{}", logs());
        let aaaa = eventually("forwarded", &logs, || {
            ask_tcp(&pair.pod, server, "svc.test", 28)
        });
        assert_eq!(aaaa, [ip("fd99::7")], "{}", logs());
    }
    assert!(
        upstream.log().contains("query[A] svc.test from 10.77.0.1"),
        "the upstream saw no query from the pod: {}",
        logs()
    );
    assert!(
        !upstream.log().contains("sidecar.test"),
        "a query bypassed the sidecar: {}",
        logs()
    );
    // Read back as it was given.
    assert_eq!(nft::list(&pair.target).unwrap(), vec![p.checked().unwrap()]);
    // Without the policy the app reaches the upstream directly.
    nft::clear(&pair.target, None).unwrap();
    let direct = eventually("direct", &logs, || {
        ask_udp(&pair.pod, sa(PEER_V4, 53), "sidecar.test", 1)
    });
    assert!(direct.is_empty(), "{direct:?}");
}

/// A directory the sidecar's user can write its logs to.
fn dir_for(ns: &NetNs, name: &str, user: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pxt-sidecar-{}-{}-{name}",
        std::process::id(),
        ns.name()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let owner = nix::unistd::User::from_name(user).unwrap().unwrap();
    nix::unistd::chown(&dir, Some(owner.uid), Some(owner.gid)).unwrap();
    dir
}

/// A plain HTTP server in the peer namespace (python's http.server,
/// dual-stack) serving one file whose text names it.
fn http_backend(ns: &NetNs) -> Daemon {
    let dir = dir_for(ns, "web", "root");
    std::fs::write(dir.join("hello.txt"), "hello from the peer\n").unwrap();
    let d = dir.to_str().unwrap().to_owned();
    Daemon::start_in(
        ns,
        dir,
        "web",
        &[
            "python3",
            "-m",
            "http.server",
            "80",
            "--bind",
            "::",
            "--directory",
            &d,
        ],
    )
}

fn curl(ns: &NetNs, url: &str) -> std::process::Output {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "curl",
            "-sS",
            "-i",
            "-g",
            "--max-time",
            "5",
            url,
        ])
        .output()
        .unwrap()
}

#[test]
fn squid_in_intercept_mode_serves_redirected_http_over_ipv4_and_ipv6() {
    if !require_root("squid_intercept")
        || !require_tool("squid_intercept", "squid")
        || !require_tool("squid_intercept", "curl")
    {
        return;
    }
    let pair = Pair::new("squid");
    let web = http_backend(&pair.peer);
    let dir = dir_for(&pair.pod, "squid", "proxy");
    let d = dir.display();
    std::fs::write(
        dir.join("squid.conf"),
        format!(
            "http_port 3128\n\
             http_port 3129 intercept\n\
             http_access allow all\n\
             pid_filename none\n\
             cache deny all\n\
             access_log stdio:{d}/access.log\n\
             cache_log {d}/cache.log\n\
             cache_effective_user proxy\n\
             coredump_dir {d}\n\
             visible_hostname pxt-squid\n\
             shutdown_lifetime 0 seconds\n\
             pinger_enable off\n"
        ),
    )
    .unwrap();
    let conf = dir.join("squid.conf");
    let squid = Daemon::start_in(
        &pair.pod,
        dir.clone(),
        "squid",
        &["squid", "-N", "-f", conf.to_str().unwrap()],
    );
    let logs = || {
        format!(
            "squid:\n{}\n{}\naccess.log:\n{}\nweb:\n{}",
            squid.log(),
            std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("access.log")).unwrap_or_default(),
            web.log()
        )
    };
    // squid connects upstream as its own user, `proxy`: excluded.
    let p = Policy {
        name: "squid".into(),
        outbound_port: Some(3129),
        exclude: Exclusions {
            users: vec!["proxy".into()],
            ..Default::default()
        },
        ..Policy::default()
    };
    nft::add(&pair.target, &p).unwrap();
    for (url, logged) in [
        (
            format!("http://{PEER_V4}/hello.txt"),
            format!("GET http://{PEER_V4}/hello.txt"),
        ),
        (
            format!("http://[{PEER_V6}]/hello.txt"),
            format!("GET http://[{PEER_V6}]/hello.txt"),
        ),
    ] {
        // Retried while squid or the backend is still starting.
        let out = eventually("curl through squid", &logs, || {
            let out = curl(&pair.pod, &url);
            if String::from_utf8_lossy(&out.stdout).contains("hello from the peer") {
                Ok(out)
            } else {
                Err(std::io::Error::other(format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )))
            }
        });
        let response = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            response.contains("hello from the peer"),
            "{response}\n{}",
            logs()
        );
        assert!(
            response.contains("squid"),
            "no Via from squid: {response}\n{}",
            logs()
        );
        // The interception is in squid's own access log (it flushes lines
        // as requests finish; give it a moment).
        let seen = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::read_to_string(dir.join("access.log")).is_ok_and(|l| l.contains(&logged))
        });
        assert!(seen, "{logged} not in squid's access log\n{}", logs());
    }
    // Without the policy, curl reaches the backend directly: no squid.
    nft::clear(&pair.target, None).unwrap();
    let direct = curl(&pair.pod, &format!("http://{PEER_V4}/hello.txt"));
    let response = String::from_utf8_lossy(&direct.stdout).into_owned();
    assert!(
        response.contains("hello from the peer") && !response.contains("squid"),
        "{response}"
    );
}

#[test]
fn ss_redir_relays_tproxied_udp_through_its_server() {
    if !require_root("ss_redir_udp")
        || !require_tool("ss_redir_udp", "ss-redir")
        || !require_tool("ss_redir_udp", "ss-server")
    {
        return;
    }
    let pair = Pair::new("ssr");
    let server = Daemon::start(
        &pair.peer,
        "ss-server",
        &[
            "ss-server",
            "-s",
            PEER_V4,
            "-p",
            "8388",
            "-k",
            "pxt-secret",
            "-m",
            "aes-256-gcm",
            "-U",
            "-v",
        ],
    );
    let redir = Daemon::start(
        &pair.pod,
        "ss-redir",
        // ss-redir needs root's CAP_NET_ADMIN for its transparent reply
        // sockets, so it keeps uid 0 and is told apart by its group.
        &[
            "setpriv",
            "--regid",
            "1337",
            "--clear-groups",
            "--",
            "ss-redir",
            "-s",
            PEER_V4,
            "-p",
            "8388",
            "-l",
            "15001",
            "-b",
            "0.0.0.0",
            "-k",
            "pxt-secret",
            "-m",
            "aes-256-gcm",
            "-U",
            "-v",
        ],
    );
    let logs = || format!("ss-redir:\n{}\nss-server:\n{}", redir.log(), server.log());
    // An echo service at a second peer address, recording who sent to it.
    let echo = udp_servers(&pair.peer, &[sa(PEER2_V4, 7007)]).remove(0);
    let p = Policy {
        name: "ss".into(),
        outbound_port: Some(15001),
        protocols: vec![Protocol::Udp],
        family: proxyctl_policy::Family::Ipv4,
        exclude: Exclusions {
            gids: vec![1337],
            ..Default::default()
        },
        ..Policy::default()
    };
    nft::add(&pair.target, &p).unwrap();
    let echo_thread = std::thread::spawn(move || {
        echo.set_nonblocking(false).unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut senders = Vec::new();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let mut reply = b"echo:".to_vec();
            reply.extend(&buf[..n]);
            echo.send_to(&reply, from).unwrap();
            senders.push(from);
            if buf[..n].starts_with(b"done") {
                break;
            }
        }
        senders
    });
    // The app's socket is connected to the original destination: the
    // reply must come back from it (ss-redir answers from that address).
    let reply = eventually("UDP through ss-redir", &logs, || {
        pair.pod.enter(move || {
            nft::probe::set_thread_fs_ids(APP.0, APP.1)?;
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(sa(PEER2_V4, 7007))?;
            s.set_read_timeout(Some(Duration::from_millis(700)))?;
            s.send(b"ping")?;
            let mut buf = [0u8; 64];
            let n = s.recv(&mut buf)?;
            Ok(buf[..n].to_vec())
        })
    });
    assert_eq!(reply, b"echo:ping", "{}", logs());
    // Finish the echo thread, then check who the echo service saw: the
    // shadowsocks server, never the pod itself.
    pair.pod.enter(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let _ = s.send_to(b"done", sa(PEER2_V4, 7007));
    });
    let senders = echo_thread.join().unwrap();
    assert!(!senders.is_empty(), "{}", logs());
    assert!(
        senders.iter().all(|s| s.ip() != ip(POD_V4)),
        "a datagram bypassed ss-redir: {senders:?}\n{}",
        logs()
    );
}
