//! Operational parity with upstream's binaries, with real proxy-server,
//! proxy-agent and proxy-test-client processes on loopback: secure by
//! default (a TCP frontend needs its certificates, a unix socket takes
//! none), dual-stack listeners for empty bind addresses, host names as bind
//! addresses, the agent's /ready and its admin redirect, flag validation
//! upstream also does, signals, the agent's --probe-interval and the
//! retirement of an agent whose DIAL_REQ send times out.

mod tunnel_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tunnel_support::*;

/// Runs `bin` with `args` in `dir` to its exit: (code, stderr).
fn run_to_exit(bin_name: &str, args: &[String], dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin(bin_name))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One HTTP/1.1 GET to `addr` with the given Host header: the raw
/// response head and body.
fn get_at(addr: SocketAddr, path: &str, host: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// Without certificates the TCP frontend does not start (upstream refuses
/// it too); certificates with a unix socket are refused as upstream does.
/// Each error names the flags, exits 2 and binds nothing.
#[test]
fn tcp_frontend_refuses_to_start_without_certificates() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = Ports::new();
    let cluster = s(&[
        "--cluster-cert=certs/agent/issued/proxy-master.crt",
        "--cluster-key=certs/agent/private/proxy-master.key",
        "--cluster-ca-cert=certs/agent/issued/ca.crt",
    ]);
    let with = |extra: &[&str]| {
        let mut a = cluster.clone();
        a.extend(port_args(&p));
        a.extend(s(extra));
        a
    };
    // No server certificates at all.
    let (code, err) = run_to_exit("proxy-server", &with(&[]), dir.path());
    assert_eq!(code, Some(2), "{err}");
    for flag in [
        "--server-cert",
        "--server-key",
        "--server-ca-cert",
        "--uds-name",
    ] {
        assert!(err.contains(flag), "error must name {flag}: {err}");
    }
    // A certificate and key without the CA (clients would go unverified).
    let (code, err) = run_to_exit(
        "proxy-server",
        &with(&[
            "--server-cert=certs/master/issued/proxy-master.crt",
            "--server-key=certs/master/private/proxy-master.key",
        ]),
        dir.path(),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--server-ca-cert"), "{err}");
    // Server certificates together with a unix socket.
    let uds = dir.path().join("s.sock");
    let mut a = cluster.clone();
    a.extend(port_args(&p).into_iter().skip(1));
    a.extend(s(&[
        "--server-port=0",
        "--server-ca-cert=certs/master/issued/ca.crt",
    ]));
    a.push(format!("--uds-name={}", uds.display()));
    let (code, err) = run_to_exit("proxy-server", &a, dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--server-ca-cert") && err.contains("--uds-name"),
        "{err}"
    );
    assert!(!uds.exists(), "a refused server must not create its socket");
    // Nothing was bound by any of them.
    for port in [p.server, p.agent, p.health, p.admin] {
        assert!(
            TcpStream::connect(v4(port)).is_err(),
            "port {port} is open after a refused start"
        );
    }
}

/// Empty bind addresses (the default) serve IPv6 and IPv4 on every
/// listener of server and agent, as Go's ":port"; the agent reaches the
/// server over ::1 and the test client dials through the frontend over
/// both families. A host name is accepted as a bind address.
#[test]
fn empty_bind_address_is_dual_stack_and_host_names_bind() {
    let backend = HttpServer::start();
    let st = Stack::start_with(
        "grpc",
        &["--admin-bind-address=localhost"],
        &["--proxy-server-host=::1", "--admin-bind-address="],
    );
    let p = st.ports;
    for (what, port) in [
        ("server health", p.health),
        ("agent health", p.agent_health),
    ] {
        for addr in [v4(port), v6(port)] {
            let r = get_at(addr, "/healthz", "x");
            assert_eq!(r.map(|r| r.0), Some(200), "{what} on {addr}\n{}", st.logs());
        }
    }
    // Agent admin with an empty bind address: every interface.
    for addr in [v4(p.agent_admin), v6(p.agent_admin)] {
        assert_eq!(
            get_at(addr, "/metrics", "h").map(|r| r.0),
            Some(301),
            "agent admin on {addr}\n{}",
            st.logs()
        );
    }
    // "localhost" bound one address, IPv4 first as Go does.
    assert_eq!(
        get_at(v4(p.admin), "/metrics", "x").map(|r| r.0),
        Some(200),
        "server admin bound to localhost\n{}",
        st.logs()
    );
    // The agent connected over IPv6: its connection's peer is ::1.
    let ss = Command::new("ss")
        .args(["-Htn", "state", "established"])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(
        ss.lines()
            .any(|l| l.contains(&format!("[::1]:{}", p.agent))),
        "no IPv6 agent connection to port {}:\n{ss}\n{}",
        p.agent,
        st.logs()
    );
    // Dials through the frontend over both families.
    for host in ["::1", "127.0.0.1"] {
        let out = Command::new(bin("proxy-test-client"))
            .args([
                "--ca-cert=certs/master/issued/ca.crt",
                "--client-cert=certs/master/issued/proxy-client.crt",
                "--client-key=certs/master/private/proxy-client.key",
                &format!("--proxy-host={host}"),
                &format!("--proxy-port={}", p.server),
                &format!("--request-port={}", backend.port),
                "--request-host=127.0.0.1",
            ])
            .current_dir(st.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("success: hello from the backend"),
            "through {host}: {text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            st.logs()
        );
    }
}

/// The agent answers upstream's deprecated /ready like /readyz, and its
/// admin /metrics redirects to the health port on the host the client
/// asked for (not the listener's `[::]`).
#[test]
fn agent_ready_endpoint_and_admin_redirect_use_the_request_host() {
    let st = Stack::start("grpc");
    let p = st.ports;
    let (code, _) = get_at(v4(p.agent_health), "/ready", "x").unwrap();
    assert_eq!(code, 200, "{}", st.logs());
    let (code, head) = get_at(
        v4(p.agent_admin),
        "/metrics",
        &format!("[::1]:{}", p.agent_admin),
    )
    .unwrap();
    assert_eq!(code, 301, "{head}");
    let want = format!("location: //[::1]:{}/metrics", p.agent_health);
    assert!(
        head.to_ascii_lowercase().contains(&want),
        "want {want}: {head}"
    );
    // The redirect leads to the metrics, over IPv6.
    let (code, body) = get_at(v6(p.agent_health), "/metrics", "x").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("konnectivity_network_proxy_agent_open_server_connections"));
    let (code, head) = get_at(v4(p.agent_admin), "/metrics", "node-a").unwrap();
    assert_eq!(code, 301);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("location: //node-a:{}/metrics", p.agent_health)),
        "{head}"
    );
}

/// `--cipher-suites` takes Go's names (TLS 1.3 ones included, which Go and
/// we leave enabled); the TLS 1.2 suite chosen is the one named. A suite Go
/// knows and rustls lacks is refused with the list of supported names.
#[test]
fn cipher_suites_take_go_names() {
    let st = Stack::start_with(
        "grpc",
        &["--cipher-suites=TLS_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"],
        &[],
    );
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_2",
            "-connect",
            &format!("127.0.0.1:{}", st.ports.agent),
            "-cert",
            "certs/agent/issued/proxy-agent.crt",
            "-key",
            "certs/agent/private/proxy-agent.key",
        ])
        .current_dir(st.dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ECDHE-ECDSA-CHACHA20-POLY1305"),
        "TLS 1.2 must use the one suite named: {text}"
    );
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let mut a = server_args(&Ports::new(), "grpc");
    a.push("--cipher-suites=TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA".into());
    let (code, err) = run_to_exit("proxy-server", &a, dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA")
            && err.contains("rustls")
            && err.contains("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
            && err.contains("TLS_AES_256_GCM_SHA384"),
        "{err}"
    );
}

/// The agent checks its flags as upstream: identifier keys it does not
/// know, a malformed query and a sync interval above its cap exit 2.
#[test]
fn agent_flags_validated_as_upstream() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = Ports::new();
    for (flag, want) in [
        (
            "--agent-identifiers=hostname=a",
            "unknown address type: hostname",
        ),
        ("--agent-identifiers=host=a;ipv4=1.2.3.4", "semicolon"),
        ("--agent-identifiers=host=%zz", "escape"),
        ("--sync-interval=11s", "sync interval cap"),
    ] {
        let mut a = agent_args(&p);
        a.retain(|x| !x.starts_with("--sync-interval"));
        a.push(flag.into());
        let (code, err) = run_to_exit("proxy-agent", &a, dir.path());
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(err.contains(want), "{flag}: {err}");
    }
}

/// A second SIGTERM or SIGINT during a graceful shutdown exits at once with
/// status 1, as upstream; until then the server waits for its connection.
/// Meanwhile the agent's connection has had no GOAWAY (its probe keeps
/// finding it ready), so the tunnel the server waits for is not cut.
#[test]
fn second_signal_during_graceful_shutdown_exits_1() {
    use tokio::io::AsyncWriteExt;
    let backend = HttpServer::start();
    for second in [SIGTERM, 2] {
        let mut st = Stack::start_with(
            "grpc",
            &["--graceful-shutdown-timeout=120s"],
            &["--probe-interval=100ms"],
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let target = format!("127.0.0.1:{}", backend.port);
        let _open = rt.block_on(async {
            let ch = konnectivity::client::grpc_channel(&st.frontend())
                .await
                .unwrap();
            let mut io = konnectivity::client::grpc_dial(ch, &target).await.unwrap();
            io.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            io
        });
        wait_for(
            "the connection established",
            Duration::from_secs(30),
            || {
                metric(
                    st.ports.health,
                    "konnectivity_network_proxy_server_established_connections",
                ) == 1.0
            },
        );
        st.server.signal(SIGTERM);
        let ready = probes(st.ports.agent_health, "ready");
        wait_for(
            "five probes during the shutdown",
            Duration::from_secs(30),
            || probes(st.ports.agent_health, "ready") >= ready + 5.0,
        );
        assert_eq!(
            probes(st.ports.agent_health, "not_ready"),
            0.0,
            "{}",
            st.logs()
        );
        assert!(
            st.server.alive(),
            "graceful shutdown must wait:\n{}",
            st.logs()
        );
        st.server.signal(second);
        let code = st.server.wait_exit(Duration::from_secs(20));
        assert_eq!(code, Some(1), "second signal {second}:\n{}", st.logs());
        drop(rt);
    }
}

/// A rollout behind a load balancer: the agent holds an old server that
/// says `--server-count=3`, then reaches a new one that says 1. With
/// `--sync-forever` it keeps dialling the balancer and lands on the old
/// server again and again; those duplicate connections must not bring its
/// stale count back (upstream's fix for the same bug): the agent's target
/// stays 1.
#[test]
fn duplicate_connection_to_an_old_server_keeps_the_new_count() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let (old, new) = (Ports::new(), Ports::new());
    let server = |p: &Ports, id: &str, count: u32| {
        let mut sa = server_args(p, "grpc");
        sa.push(format!("--server-id={id}"));
        sa.push(format!("--server-count={count}"));
        Proc::spawn(&bin("proxy-server"), &sa, dir.path(), id)
    };
    let _old = server(&old, "old", 3);
    let (_lb, lb_port) = haproxy(dir.path(), &[old, new]);
    let mut aa = agent_args(&old);
    aa.retain(|a| !a.starts_with("--proxy-server-port") && !a.starts_with("--sync-interval"));
    aa.extend(s(&[
        "--sync-forever",
        "--v=5",
        "--sync-interval=100ms",
        "--sync-interval-cap=200ms",
    ]));
    aa.push(format!("--proxy-server-port={lb_port}"));
    let agent = Proc::spawn(&bin("proxy-agent"), &aa, dir.path(), "agent");
    let count = || {
        metric(
            old.agent_health,
            "konnectivity_network_proxy_agent_known_server_count",
        )
    };
    wait_for("agent on the old server", Duration::from_secs(30), || {
        count() == 3.0
    });
    let _new = server(&new, "new", 1);
    wait_for("agent on the new server", Duration::from_secs(30), || {
        metric(
            old.agent_health,
            "konnectivity_network_proxy_agent_open_server_connections",
        ) == 2.0
    });
    wait_for("the new count", Duration::from_secs(30), || count() == 1.0);
    // Several more rounds of duplicates to both servers; the count is
    // watched all along.
    let dups = |log: &str| log.matches("already connected").count();
    let before = dups(&agent.log_text());
    let mut seen = std::collections::BTreeSet::new();
    wait_for("duplicate connections", Duration::from_secs(30), || {
        seen.insert(count() as i64);
        dups(&agent.log_text()) >= before + 6
    });
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![1],
        "{}",
        agent.log_text()
    );
}

/// klog's file flags: with --logtostderr=false the log goes to --log-file,
/// rotated by --log-file-max-size (MB; a full file becomes <file>.1),
/// standard error gets only what reaches --stderrthreshold, -v selects
/// the levels and --skip-headers drops the level and time.
#[test]
fn log_file_rotation_levels_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let log = dir.path().join("server.log");
    // A full file from an earlier run: the first line written rotates it.
    std::fs::write(&log, vec![b'x'; (1 << 20) + 10]).unwrap();
    let p = Ports::new();
    let mut a = server_args(&p, "grpc");
    a.extend(s(&[
        "--logtostderr=false",
        "--log-file=server.log",
        "--log-file-max-size=1",
        "--v=5",
    ]));
    let mut server = Proc::spawn(&bin("proxy-server"), &a, dir.path(), "server-stderr");
    wait_for("server up", Duration::from_secs(60), || {
        http_get(p.health, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    // A client stream (refused: no agent) makes the server log at debug.
    let _ = test_client_request(dir.path(), p.server, 1);
    server.signal(SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
    let old = std::fs::read(dir.path().join("server.log.1")).unwrap();
    assert!(old.len() > 1 << 20 && old.iter().all(|b| *b == b'x'));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("proxy server started") && text.contains("INFO"),
        "{text}"
    );
    assert!(text.contains("DEBUG"), "-v=5 logs debug lines: {text}");
    let stderr = server.log_text();
    assert!(!stderr.contains("INFO"), "only errors on stderr: {stderr}");

    // -v=0 and --skip-headers on stderr: no debug, no level column.
    let p = Ports::new();
    let mut a = server_args(&p, "grpc");
    a.extend(s(&["--skip-headers", "--v=0"]));
    let mut server = Proc::spawn(&bin("proxy-server"), &a, dir.path(), "server2");
    wait_for("server up", Duration::from_secs(60), || {
        http_get(p.health, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    server.signal(SIGTERM);
    server.wait_exit(Duration::from_secs(20));
    let text = server.log_text();
    assert!(text.contains("proxy server started"), "{text}");
    assert!(!text.contains("INFO") && !text.contains("DEBUG"), "{text}");
}

/// --legacy-stderr-threshold-behavior=false: with --logtostderr (the
/// default) standard error gets only lines at --stderrthreshold or above.
#[test]
fn stderr_threshold_applies_without_legacy_behavior() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = Ports::new();
    let mut a = server_args(&p, "grpc");
    a.extend(s(&[
        "--legacy-stderr-threshold-behavior=false",
        "--stderrthreshold=WARNING",
    ]));
    let mut server = Proc::spawn(&bin("proxy-server"), &a, dir.path(), "server");
    wait_for("server up", Duration::from_secs(60), || {
        http_get(p.health, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    server.signal(SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
    let text = server.log_text();
    assert!(!text.contains("proxy server started"), "{text}");
}

/// One sample of a metric: the line that starts with `series` (name and
/// labels exactly as rendered, e.g. `x_total{result="ready"}`); 0 if absent.
fn sample(port: u16, series: &str) -> f64 {
    let Some((_, body)) = http_get(port, "/metrics") else {
        return -1.0;
    };
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .filter(|r| r.starts_with(' '))
                .and_then(|r| r.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

const PROBES: &str = "konnectivity_network_proxy_agent_server_probes_total";

fn probes(port: u16, result: &str) -> f64 {
    sample(port, &format!("{PROBES}{{result=\"{result}\"}}"))
}

/// A stand-in proxy server on an agent port (mTLS with the server's
/// certificate, HTTP/2 from the h2 crate): it answers each Connect with a
/// server ID and count 1 and keeps the stream open; with `goaway` it then
/// sends GOAWAY on the connection (what grpc-go's GracefulStop or a
/// connection-age limit does) and still serves the open stream. Counts the
/// connections it accepted. Its runtime (and every connection) ends on drop.
struct GoawayServer {
    port: u16,
    conns: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    streams: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl GoawayServer {
    fn start(dir: &Path, goaway: bool) -> GoawayServer {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let c = dir.join("certs/agent");
        let tls = konnectivity::tls::server_config(
            &c.join("issued/proxy-master.crt"),
            &c.join("private/proxy-master.key"),
            Some(&c.join("issued/ca.crt")),
            &Default::default(),
            &[],
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Bound here, by the test: no port race.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        let streams = Arc::new(AtomicUsize::new(0));
        let streams_seen = streams.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let streams_seen = streams_seen.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut conn) = h2::server::handshake(tls).await else {
                        return;
                    };
                    // Open streams stay open as long as the connection.
                    let mut held = Vec::new();
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        streams_seen.fetch_add(1, Ordering::SeqCst);
                        let resp = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .header("serverid", "fake-server")
                            .header("servercount", "1")
                            .body(())
                            .unwrap();
                        let Ok(send) = respond.send_response(resp, false) else {
                            continue;
                        };
                        held.push((req, send));
                        if goaway {
                            conn.graceful_shutdown();
                        }
                    }
                });
            }
        });
        GoawayServer {
            port,
            conns,
            streams,
            _rt: rt,
        }
    }
    fn connections(&self) -> usize {
        self.conns.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn streams(&self) -> usize {
        self.streams.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn probing_agent(dir: &Path, server_port: u16, extra: &[&str]) -> (Proc, Ports) {
    let p = Ports::new();
    let mut a = agent_args(&p);
    a.retain(|x| !x.starts_with("--proxy-server-port"));
    a.push(format!("--proxy-server-port={server_port}"));
    a.extend(s(extra));
    (Proc::spawn(&bin("proxy-agent"), &a, dir, "agent"), p)
}

/// `--probe-interval` as upstream's: a server connection that has had
/// GOAWAY no longer takes new streams (grpc-go: not READY), so the probe
/// drops it although its stream is still open, and the sync loop dials
/// again. The control: the same server without GOAWAY is probed as ready
/// and kept, one connection all along.
#[test]
fn probe_drops_a_server_connection_after_goaway() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());

    let fake = GoawayServer::start(dir.path(), true);
    let (agent, p) = probing_agent(dir.path(), fake.port, &["--probe-interval=100ms"]);
    wait_for(
        "three connections, each dropped by the probe",
        Duration::from_secs(60),
        || probes(p.agent_health, "not_ready") >= 3.0 && fake.connections() >= 3,
    );
    let log = agent.log_text();
    assert!(
        log.matches("no longer ready").count() >= 3,
        "each drop is logged: {log}"
    );
    // Each drop came from the probe, not from the stream ending: the
    // server never ended one.
    assert!(!log.contains("server stream ended"), "{log}");
    drop(agent);

    let steady = GoawayServer::start(dir.path(), false);
    let (agent, p) = probing_agent(dir.path(), steady.port, &["--probe-interval=100ms"]);
    wait_for("ten ready probes", Duration::from_secs(60), || {
        probes(p.agent_health, "ready") >= 10.0
    });
    assert_eq!(
        probes(p.agent_health, "not_ready"),
        0.0,
        "{}",
        agent.log_text()
    );
    assert_eq!(steady.connections(), 1, "{}", agent.log_text());
    // The probe puts nothing on the wire: the Connect stream is the only
    // one the server ever saw.
    assert_eq!(steady.streams(), 1, "{}", agent.log_text());
    assert_eq!(
        metric(
            p.agent_health,
            "konnectivity_network_proxy_agent_open_server_connections"
        ),
        1.0
    );
}

/// A frozen server (SIGSTOP: TCP open, nothing answers) is still READY by
/// upstream's definition (no GOAWAY, no closed transport), so the probe
/// keeps it; keepalive is what finds a silent server. Once it runs again
/// the same connection carries a request. With --probe-interval=0 no probe
/// runs at all.
#[test]
fn probe_keeps_a_frozen_server_connection_as_upstream() {
    const SIGSTOP: i32 = 19;
    const SIGCONT: i32 = 18;
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            unsafe { libc_kill(self.0, SIGCONT) };
        }
    }
    unsafe extern "C" {
        #[link_name = "kill"]
        fn libc_kill(pid: i32, sig: i32) -> i32;
    }
    let backend = HttpServer::start();
    let st = Stack::start_with("grpc", &[], &["--probe-interval=100ms"]);
    let p = st.ports;
    wait_for("a ready probe", Duration::from_secs(30), || {
        probes(p.agent_health, "ready") >= 1.0
    });
    let connects = |st: &Stack| {
        st.agent
            .log_text()
            .matches("connected to proxy server")
            .count()
    };
    let before = connects(&st);
    st.server.signal(SIGSTOP);
    let _resume = Resume(st.server.pid());
    let ready = probes(p.agent_health, "ready");
    wait_for(
        "ten probes of the frozen server",
        Duration::from_secs(60),
        || probes(p.agent_health, "ready") >= ready + 10.0,
    );
    assert_eq!(probes(p.agent_health, "not_ready"), 0.0, "{}", st.logs());
    st.server.signal(SIGCONT);
    let (ok, out) = test_client_request(st.dir.path(), p.server, backend.port);
    assert!(ok, "{out}\n{}", st.logs());
    assert_eq!(connects(&st), before, "the same connection: {}", st.logs());

    let st = Stack::start_with("grpc", &[], &["--probe-interval=0"]);
    let (ok, out) = test_client_request(st.dir.path(), st.ports.server, backend.port);
    assert!(ok, "{out}\n{}", st.logs());
    assert_eq!(probes(st.ports.agent_health, "ready"), 0.0);
}

/// An agent that connects to the server's agent port over mTLS, opens its
/// Connect stream with the metadata upstream's agent sends (agentid,
/// agentidentifiers) and then never reads: it offers an initial stream
/// window of 0 and never sends WINDOW_UPDATE, so HTTP/2 flow control
/// holds back everything the server sends it. Returns what must live for
/// the stream to stay open, and the response headers.
async fn stuck_agent(dir: &Path, port: u16, identifiers: &str) -> (impl Sized, http::HeaderMap) {
    let tls = client_tls(dir, "agent", "proxy-agent");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let io = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .unwrap();
    // Driven so SETTINGS and PINGs are still answered: the connection is
    // alive, only the stream's window stays shut.
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://127.0.0.1:{port}/AgentService/Connect"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("agentid", "stuck-agent")
        .header("agentidentifiers", identifiers)
        .body(())
        .unwrap();
    let (resp, send) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), resp)
        .await
        .expect("response headers")
        .unwrap();
    let headers = resp.headers().clone();
    ((client, send, resp, DriverGuard(driver)), headers)
}

struct DriverGuard(tokio::task::JoinHandle<()>);
impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// --backend-dial-timeout as upstream's: an agent whose stream does not
/// take a DIAL_REQ within the timeout is retired (out of the backends, its
/// stream ended). Here the stuck agent is a raw HTTP/2 peer whose window
/// never opens: the first DIAL_REQs fill its stream's bounded channel, the
/// next send times out, the client gets the timeout error, and a real agent
/// connected alongside serves the dials that follow.
#[test]
fn dial_request_send_timeout_retires_a_stuck_agent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = HttpServer::start();
    // destHost sends dials for 127.0.0.2 to the stuck agent (it claims that
    // address); the healthy agent claims none and gets the rest.
    let st = Stack::start_with(
        "grpc",
        &[
            "--backend-dial-timeout=3s",
            "--proxy-strategies=destHost,default",
        ],
        &[],
    );
    let p = st.ports;
    let rt = runtime();
    let ready = || {
        metric(
            p.health,
            "konnectivity_network_proxy_server_ready_backend_connections",
        )
    };
    let (_stuck, headers) = rt.block_on(stuck_agent(st.dir.path(), p.agent, "ipv4=127.0.0.2"));
    assert!(headers.contains_key("serverid"), "{headers:?}");
    wait_for("two agents", Duration::from_secs(30), || ready() == 2.0);

    // More dials than the stuck stream's channel holds (256 packets), on a
    // few connections; nothing listens on the address, and the stuck agent
    // never answers.
    let target = format!("127.0.0.2:{}", free_port());
    let frontend = st.frontend();
    let results: Vec<Result<(), String>> = rt.block_on(async {
        let mut chans = Vec::new();
        for _ in 0..4 {
            chans.push(konnectivity::client::grpc_channel(&frontend).await.unwrap());
        }
        let mut set = tokio::task::JoinSet::new();
        for i in 0..400 {
            let ch = chans[i % chans.len()].clone();
            let target = target.clone();
            set.spawn(async move {
                konnectivity::client::grpc_dial(ch, &target)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap());
        }
        out
    });
    let timeouts = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.contains("timed out waiting for backend dial")))
        .count();
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for r in &results {
        let e = r.as_ref().err().cloned().unwrap_or_else(|| "ok".into());
        *tally.entry(e).or_default() += 1;
    }
    eprintln!("dial results: {tally:?}");
    assert!(
        results.iter().all(|r| r.is_err()),
        "no dial can succeed: {results:?}"
    );
    assert!(timeouts >= 1, "{results:?}\n{}", st.logs());
    let server_log = st.server.log_text();
    assert!(
        server_log.contains("retiring the agent") && server_log.contains("stuck-agent"),
        "{server_log}"
    );
    assert!(
        sample(
            p.health,
            "konnectivity_network_proxy_server_dial_failure_count{reason=\"backend_dial_timeout\"}"
        ) >= 1.0
    );
    // Retired by the send timeout, not as a stream that does not read
    // its control packets.
    assert_eq!(
        sample(
            p.health,
            "konnectivity_network_proxy_server_bad_input_total{kind=\"agent_not_reading\"}"
        ),
        0.0
    );
    wait_for("the stuck agent retired", Duration::from_secs(30), || {
        ready() == 1.0
    });
    assert_eq!(
        sample(
            p.health,
            "konnectivity_network_proxy_server_ready_backends{proxy_strategy=\"destHost\"}"
        ),
        0.0,
        "no agent claims 127.0.0.2 any more"
    );

    // The healthy agent serves what follows.
    let backend_addr = format!("127.0.0.1:{}", backend.port);
    rt.block_on(async {
        let ch = konnectivity::client::grpc_channel(&frontend).await.unwrap();
        for _ in 0..5 {
            let mut io = konnectivity::client::grpc_dial(ch.clone(), &backend_addr)
                .await
                .unwrap();
            io.write_all(b"GET /success HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut body = Vec::new();
            io.read_to_end(&mut body).await.unwrap();
            let text = String::from_utf8_lossy(&body);
            assert!(text.contains("hello from the backend"), "{text}");
        }
    });
    assert_eq!(ready(), 1.0);
}
