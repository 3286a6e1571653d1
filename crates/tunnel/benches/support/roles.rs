//! What both tunnel benches run in their child processes (the bench binary
//! re-executed with `--role=...`): the agent, the server's TLS and launch
//! settings, the backend, and the exit-with-the-parent rule. Also what the
//! parent does the same way in both: the process facts read from /proc,
//! the waits until a port or a path answers, and the echo-latency and
//! idle-connection measurements.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use konnectivity::agent::{self, AgentLaunch, AgentOptions};
use konnectivity::client::Io;
use konnectivity::server::{FrontendListen, FrontendMode, ServerLaunch, ServerOptions};
use konnectivity::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Raises RLIMIT_NOFILE as far as allowed; returns the soft limit now set.
pub fn raise_nofile() -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit calls on stack structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
        let want = libc::rlimit {
            rlim_cur: 1_048_576,
            rlim_max: 1_048_576,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return want.rlim_cur;
        }
        cur.rlim_cur = cur.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
    }
    cur.rlim_cur
}

/// A `/proc/PID/status` value in KiB (e.g. "VmRSS:").
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A server's mTLS config from `proxyctl certs`' tree: that `set`'s
/// proxy-master certificate, clients checked against its CA.
pub fn server_tls(certs: &Path, set: &str, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let c = certs.join("certs").join(set);
    tls::server_config(
        &c.join("issued/proxy-master.crt"),
        &c.join("private/proxy-master.key"),
        Some(&c.join("issued/ca.crt")),
        &Default::default(),
        alpn,
    )
    .unwrap()
}

/// The agent listener's mTLS config.
pub fn agent_listener_tls(certs: &Path) -> Arc<rustls::ServerConfig> {
    server_tls(certs, "agent", &[b"h2"])
}

/// A client's mTLS config from `proxyctl certs`' tree: trusts that `set`'s
/// CA and presents its `name` certificate.
pub fn client_tls(
    certs: &Path,
    set: &str,
    name: &str,
    alpn: &[Vec<u8>],
) -> Arc<rustls::ClientConfig> {
    let c = certs.join("certs").join(set);
    tls::client_config(
        &c.join("issued/ca.crt"),
        Some((
            &c.join(format!("issued/{name}.crt")),
            &c.join(format!("private/{name}.key")),
        )),
        &Default::default(),
        alpn,
    )
    .unwrap()
}

/// BENCH_FLOW_WINDOW: the flow-control window both our server and agent
/// offer, in bytes, instead of their default (what the window costs and
/// buys is measured with it).
fn flow_window_override() -> Option<usize> {
    std::env::var("BENCH_FLOW_WINDOW").ok()?.parse().ok()
}

/// BENCH_FLOW_WINDOW_MAX: the most that window may grow to, on both our
/// server and agent, instead of their default.
fn flow_window_max_override() -> Option<usize> {
    std::env::var("BENCH_FLOW_WINDOW_MAX").ok()?.parse().ok()
}

/// BENCH_LINKS: our agent's `--links-per-server` in every row.
pub fn links_override() -> Option<usize> {
    std::env::var("BENCH_LINKS").ok()?.parse().ok()
}

/// One server of the bench: defaults, no health or admin ports, long
/// keepalives (nothing idles out mid-run), 5 s agent liveness.
pub fn server_launch(
    agent_tls: &Arc<rustls::ServerConfig>,
    mode: FrontendMode,
    frontend: FrontendListen,
    agent_port: u16,
) -> ServerLaunch {
    let mut opts = ServerOptions::default();
    if let Some(w) = flow_window_override() {
        opts.flow_window = w;
    }
    if let Some(w) = flow_window_max_override() {
        opts.flow_window_max = w;
    }
    ServerLaunch {
        opts,
        mode,
        frontend,
        agent_addr: SocketAddr::from(([127, 0, 0, 1], agent_port)),
        agent_tls: agent_tls.clone(),
        health_addr: None,
        admin_addr: None,
        agent_keepalive: Duration::from_secs(3600),
        agent_liveness: Duration::from_secs(5),
        frontend_keepalive: Duration::from_secs(3600),
        // The benches open tens of thousands of idle connections.
        max_frontend_connections: 0,
        max_agent_connections: 0,
    }
}

/// The agent role: connects to `servers` agent ports from `first_port` on,
/// then lives until the parent goes away.
pub async fn run_agent(certs: &Path, first_port: u16, servers: u16) {
    let tls = client_tls(certs, "agent", "proxy-agent", &[b"h2".to_vec()]);
    let addrs = (0..servers)
        .map(|i| ("127.0.0.1".to_string(), first_port + i))
        .collect();
    let mut opts = AgentOptions::new(addrs, tls);
    opts.sync_interval = Duration::from_millis(100);
    if let Some(w) = flow_window_override() {
        opts.flow_window = w;
    }
    if let Some(w) = flow_window_max_override() {
        opts.flow_window_max = w;
    }
    if let Some(n) = links_override() {
        opts.links_per_server = n;
    }
    let _agent = agent::launch(AgentLaunch {
        opts,
        health_addr: None,
        admin_addr: None,
    })
    .await
    .unwrap();
    wait_parent().await;
}

/// The backend role (see backend.rs) on `port`, until the parent goes away.
pub async fn run_backend(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(crate::backend::backend(listener));
    wait_parent().await;
}

/// Children exit when the bench closes their stdin.
pub async fn wait_parent() {
    let mut stdin = tokio::io::stdin();
    let mut b = [0u8; 1];
    let _ = stdin.read(&mut b).await;
    std::process::exit(0);
}

/// Blocks until something accepts on 127.0.0.1:`port`; panics after 20 s.
pub fn wait_listen(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `probe` every 100 ms until it answers true; panics naming `what`
/// after `limit`.
pub async fn wait_until<F: Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !probe().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not ready after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Round trips of 64 bytes on `io`, a fresh connection to the backend
/// switched to echo here: (p50, p99) in microseconds.
pub async fn echo_latency_us(mut io: Box<dyn Io>, rounds: usize) -> (f64, f64) {
    io.write_all(b"E").await.unwrap();
    let mut samples = Vec::with_capacity(rounds);
    let mut b = [0u8; 64];
    for _ in 0..rounds {
        let t = Instant::now();
        io.write_all(&b).await.unwrap();
        io.read_exact(&mut b).await.unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (samples[rounds / 2], samples[rounds * 99 / 100])
}

/// `n` echo connections from `open`, 50 opening at a time, each proven
/// with one ping, then left idle for the caller to hold.
pub async fn open_idle<F>(n: usize, open: impl Fn() -> F) -> Vec<Box<dyn Io>>
where
    F: Future<Output = Box<dyn Io>> + Send + 'static,
{
    let mut conns = Vec::with_capacity(n);
    let batch = 50;
    let mut i = 0;
    while i < n {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch.min(n - i) {
            let opening = open();
            set.spawn(async move {
                let mut io = opening.await;
                io.write_all(b"Eping").await.unwrap();
                let mut b = [0u8; 4];
                io.read_exact(&mut b).await.unwrap();
                io
            });
        }
        while let Some(io) = set.join_next().await {
            conns.push(io.unwrap());
        }
        i += batch;
    }
    conns
}

// ---- the floor: two bare relays, plain and TLS (the agent link's certificates) ----

/// Bytes both ways between two streams through 256 KiB buffers (the size
/// our own copy loops read with).
async fn relay<A, B>(mut a: A, mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // BENCH_FLOOR_HOP=<bytes>: each read (into a fresh buffer of that size)
    // is handed to a writer task through a channel, as our tunnel's
    // processes hand packets on, to measure what such a hop costs.
    if let Some(chunk) = std::env::var("BENCH_FLOOR_HOP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        tokio::join!(hop(ar, bw, chunk), hop(br, aw, chunk));
        return;
    }
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 256 << 10, 256 << 10).await;
}

/// One direction of a relay in two tasks: reads into fresh buffers, a
/// channel, writes.
async fn hop<R, W>(mut r: R, mut w: W, chunk: usize)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
    let reader = tokio::spawn(async move {
        loop {
            let mut buf = bytes::BytesMut::with_capacity(chunk);
            match r.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {
                    if tx.send(buf.freeze()).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if w.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let _ = tokio::join!(reader, writer);
}

/// The floor's agent side: accepts on a plain and on a TLS port (the agent
/// link's server certificate, client certificates checked) and relays each
/// connection to the backend.
pub async fn relay_back(certs: &Path, args: &[String]) {
    let ports: Vec<u16> = args[1..4].iter().map(|a| a.parse().unwrap()).collect();
    let backend = SocketAddr::from(([127, 0, 0, 1], ports[2]));
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(certs, "agent", &[]));
    for (port, tls) in [(ports[0], None), (ports[1], Some(acceptor))] {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    let Ok(out) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = out.set_nodelay(true);
                    match tls {
                        Some(acc) => {
                            if let Ok(inbound) = acc.accept(inbound).await {
                                relay(inbound, out).await
                            }
                        }
                        None => relay(inbound, out).await,
                    }
                });
            }
        });
    }
    wait_parent().await;
}

/// The floor's server side: accepts on two unix sockets and relays each
/// connection to `relay_back`, in plain TCP or in TLS (the agent's client
/// certificate).
pub async fn relay_front(certs: &Path, args: &[String]) {
    let plain_sock = std::path::PathBuf::from(&args[1]);
    let tls_sock = std::path::PathBuf::from(&args[2]);
    let ports: Vec<u16> = args[3..5].iter().map(|a| a.parse().unwrap()).collect();
    let connector =
        tokio_rustls::TlsConnector::from(client_tls(certs, "agent", "proxy-agent", &[]));
    for (sock, port, tls) in [
        (plain_sock, ports[0], None),
        (tls_sock, ports[1], Some(connector)),
    ] {
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                        return;
                    };
                    let _ = out.set_nodelay(true);
                    match tls {
                        Some(conn) => {
                            let name = konnectivity::tls::server_name("127.0.0.1").unwrap();
                            if let Ok(out) = conn.connect(name, out).await {
                                relay(inbound, out).await
                            }
                        }
                        None => relay(inbound, out).await,
                    }
                });
            }
        });
    }
    wait_parent().await;
}
