//! Tunnel benchmark: through proxy-server + proxy-agent (separate processes,
//! this binary re-executed in those roles) on loopback versus a direct
//! connection, in one run. Prints one table.
//!
//! Frontends measured: HTTP-CONNECT over TCP with mTLS (what curl and the
//! README use) and HTTP-CONNECT over a unix socket (what a kube-apiserver
//! beside the server uses). Agent <-> server is always gRPC over mTLS.
//!
//! Two "floor" rows bound what any tunnel of this shape can stream: a pair
//! of bare relay processes with the same sockets as server + agent (client
//! -> unix socket -> relay -> TCP -> relay -> backend), copying bytes with
//! no framing, no multiplexing and no flow control; once with the relay
//! link in TLS (the agent link's certificates and cipher), once in plain
//! TCP. Only their throughput is comparable: each of their connections is
//! its own TLS session, so they have no dial or latency figures.
//!
//! `cargo bench -p konnectivity --bench tunnel` (release). Env: BENCH_GIB
//! (default 1), BENCH_IDLE (default 10000; 0 skips the idle rows),
//! BENCH_DIALS (default 4000), BENCH_PATHS (rows to run, e.g. "2,3"),
//! BENCH_IDLE_PATHS (uds,tls,grpc), GOMAXPROCS (server and agent worker
//! threads), BENCH_WRAP_SERVER / BENCH_WRAP_AGENT (run under a profiler).

#[path = "support/backend.rs"]
mod backend;
#[path = "support/roles.rs"]
mod roles;
use roles::{raise_nofile, rss_kib};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use konnectivity::client::{self, Io, ProxyAddr};
use konnectivity::server::{self, FrontendListen, FrontendMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- child roles ----

fn run_role(role: &str, args: &[String]) {
    raise_nofile();
    konnectivity::tune_allocator();
    // GOMAXPROCS sets the server and agent worker threads, as in the binaries.
    let rt = konnectivity::runtime().unwrap();
    let certs = PathBuf::from(&args[0]);
    rt.block_on(async move {
        match role {
            "server" => {
                let front: u16 = args[1].parse().unwrap();
                let agent_port: u16 = args[2].parse().unwrap();
                let uds = PathBuf::from(&args[3]);
                let frontend_tls = roles::server_tls(&certs, "master", &[b"http/1.1"]);
                let agent_tls = roles::agent_listener_tls(&certs);
                // One process, three servers, each with its own agent port:
                // HTTP-CONNECT over mTLS, HTTP-CONNECT over UDS, gRPC over UDS.
                let uds_at = |path: PathBuf| FrontendListen::Uds {
                    path,
                    delete_existing: true,
                };
                let servers = [
                    (
                        FrontendMode::HttpConnect,
                        FrontendListen::Tcp {
                            addr: SocketAddr::from(([127, 0, 0, 1], front)),
                            tls: Some(frontend_tls),
                        },
                    ),
                    (FrontendMode::HttpConnect, uds_at(uds.clone())),
                    (FrontendMode::Grpc, uds_at(uds.with_extension("grpc"))),
                ];
                let mut running = Vec::new();
                for (i, (mode, frontend)) in servers.into_iter().enumerate() {
                    let launch =
                        roles::server_launch(&agent_tls, mode, frontend, agent_port + i as u16);
                    running.push(server::launch(launch).await.unwrap());
                }
                roles::wait_parent().await;
            }
            "agent" => roles::run_agent(&certs, args[1].parse().unwrap(), 3).await,
            "relay-back" => roles::relay_back(&certs, args).await,
            "relay-front" => roles::relay_front(&certs, args).await,
            "backend" => roles::run_backend(args[1].parse().unwrap()).await,
            _ => panic!("unknown role"),
        }
    });
}

/// The two floor relay processes and their unix sockets (plain, TLS).
struct Floor {
    front: ChildGuard,
    back: ChildGuard,
    plain: PathBuf,
    tls: PathBuf,
}

impl Floor {
    fn start(dir: &Path, backend_port: u16) -> Floor {
        let ports = proxyctl_testkit::free_consecutive_ports(2);
        let d = dir.display().to_string();
        let back = spawn_role(
            "relay-back",
            &[
                d.clone(),
                ports.to_string(),
                (ports + 1).to_string(),
                backend_port.to_string(),
            ],
        );
        roles::wait_listen(ports + 1);
        let (plain, tls) = (dir.join("floor-plain.sock"), dir.join("floor-tls.sock"));
        let front = spawn_role(
            "relay-front",
            &[
                d,
                plain.display().to_string(),
                tls.display().to_string(),
                ports.to_string(),
                (ports + 1).to_string(),
            ],
        );
        Floor {
            front,
            back,
            plain,
            tls,
        }
    }

    fn pids(&self) -> [u32; 2] {
        [self.front.0.id(), self.back.0.id()]
    }
}

struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// BENCH_WRAP_<ROLE> (e.g. BENCH_WRAP_SERVER="heaptrack -o /tmp/server")
/// runs that child under a profiler.
fn spawn_role(role: &str, args: &[String]) -> ChildGuard {
    let exe = std::env::current_exe().unwrap();
    let wrap = std::env::var(format!("BENCH_WRAP_{}", role.to_uppercase())).unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(w) => {
            let mut c = Command::new(w);
            c.args(words).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.arg(format!("--role={role}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // Tied to this process: a bench stopped by a signal leaves none behind.
    ChildGuard(proxyctl_testkit::spawn_tied(&mut cmd).unwrap())
}

/// Three consecutive ports below the ephemeral range (the server role binds
/// `port`, `port + 1` and `port + 2` for its agent listeners); see
/// `proxyctl_testkit::free_consecutive_ports`.
fn free_port() -> u16 {
    proxyctl_testkit::free_consecutive_ports(3)
}

#[derive(Clone)]
enum Path2 {
    Direct,
    Proxy(ProxyAddr),
    /// gRPC frontend: one HTTP/2 connection and Proxy stream per dial, as
    /// kube-apiserver's konnectivity client does.
    Grpc(ProxyAddr),
    /// A floor relay's unix socket: the bytes go straight through.
    Relay(PathBuf),
}

async fn open(path: &Path2, backend: SocketAddr) -> Box<dyn Io> {
    match path {
        Path2::Direct => {
            let s = TcpStream::connect(backend).await.unwrap();
            s.set_nodelay(true).unwrap();
            Box::new(s)
        }
        Path2::Proxy(addr) => client::http_connect(addr, &backend.to_string(), "bench")
            .await
            .unwrap(),
        Path2::Relay(sock) => Box::new(tokio::net::UnixStream::connect(sock).await.unwrap()),
        Path2::Grpc(addr) => {
            let channel = client::grpc_channel(addr).await.unwrap();
            Box::new(
                client::grpc_dial(channel, &backend.to_string())
                    .await
                    .unwrap(),
            )
        }
    }
}

/// Whether a dial through `path` reaches the backend (the readiness probe).
async fn dials(path: &Path2, backend: SocketAddr) -> bool {
    match path {
        Path2::Proxy(a) => client::http_connect(a, &backend.to_string(), "probe")
            .await
            .is_ok(),
        Path2::Grpc(a) => match client::grpc_channel(a).await {
            Ok(ch) => client::grpc_dial(ch, &backend.to_string()).await.is_ok(),
            Err(_) => false,
        },
        Path2::Direct => true,
        Path2::Relay(sock) => {
            let Ok(mut s) = tokio::net::UnixStream::connect(sock).await else {
                return false;
            };
            let mut b = [0u8; 4];
            s.write_all(b"Eping").await.is_ok() && s.read_exact(&mut b).await.is_ok()
        }
    }
}

async fn throughput(path: &Path2, backend: SocketAddr, bytes: u64) -> f64 {
    let mut io = open(path, backend).await;
    let mut cmd = vec![b'S'];
    cmd.extend_from_slice(&bytes.to_le_bytes());
    io.write_all(&cmd).await.unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let n = io.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, bytes, "short read");
    got as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

async fn dials_per_sec(path: &Path2, backend: SocketAddr, total: u64, workers: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (path, done) = (path.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.fetch_add(1, Ordering::Relaxed) < total {
                let mut io = open(&path, backend).await;
                let mut req = vec![b'R'];
                req.extend_from_slice(&[1u8; 1024]);
                io.write_all(&req).await.unwrap();
                let mut rsp = [0u8; 1024];
                io.read_exact(&mut rsp).await.unwrap();
                drop(io);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn latency(path: &Path2, backend: SocketAddr, rounds: usize) -> (f64, f64) {
    roles::echo_latency_us(open(path, backend).await, rounds).await
}

/// RSS growth per idle tunnelled connection, KiB, by process.
struct Idle {
    server: f64,
    agent: f64,
}

impl std::fmt::Display for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} KiB (server {:.1} + agent {:.1})",
            self.server + self.agent,
            self.server,
            self.agent
        )
    }
}

async fn idle_rss(
    path: &Path2,
    backend: SocketAddr,
    n: usize,
    pids: &[u32],
) -> (Idle, Vec<Box<dyn Io>>) {
    let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let conns = roles::open_idle(n, || {
        let path = path.clone();
        async move { open(&path, backend).await }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_conn = |i: usize| rss_kib(pids[i]).saturating_sub(before[i]) as f64 / n as f64;
    (
        Idle {
            server: per_conn(0),
            agent: per_conn(1),
        },
        conns,
    )
}

/// One measured path: MiB/s, dials/s, p50/p99 us, and the CPU the server
/// and agent spent (ms per GiB streamed, us per dial). CPU time is far less
/// sensitive to other load on the machine than wall-clock rates, so it is
/// what to compare when judging a change.
#[derive(Clone)]
struct Row {
    name: String,
    mibs: f64,
    dials: f64,
    p50: f64,
    p99: f64,
    cpu_ms_per_gib: f64,
    cpu_us_per_dial: f64,
    /// CPU of this process (the clients) per dial.
    client_us_per_dial: f64,
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of those.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

fn print_rows(rows: &[Row], gib: f64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!(
        "konnectivity tunnel benchmark ({cpus} CPUs; loopback; server and agent are separate processes; {gib} GiB stream)"
    );
    println!(
        "(cpu: user + system time of the server and agent processes; client: of the dialling bench process)"
    );
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "path",
        "MiB/s",
        "x direct",
        "dials/s",
        "x direct",
        "p50 us",
        "p99 us",
        "+p50 us",
        "+p99 us",
        "cpu ms/GiB",
        "cpu us/dial",
        "client us"
    );
    let d = rows[0].clone();
    for r in rows {
        // Floor rows have no dial or latency figures: "-" instead of NaN.
        let line = format!(
            "{:<34} {:>8.0} {:>8.2} {:>8.0} {:>8.2} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>10.0} {:>10.1} {:>10.1}",
            r.name,
            r.mibs,
            r.mibs / d.mibs,
            r.dials,
            r.dials / d.dials,
            r.p50,
            r.p99,
            r.p50 - d.p50,
            r.p99 - d.p99,
            r.cpu_ms_per_gib,
            r.cpu_us_per_dial,
            r.client_us_per_dial
        );
        println!("{}", line.replace("NaN", "  -"));
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(role) = args.get(1).and_then(|a| a.strip_prefix("--role=")) {
        run_role(role, &args[2..]);
        return;
    }
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return; // cargo test --benches probes
    }
    raise_nofile();
    let gib: f64 = std::env::var("BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let idle_n: usize = std::env::var("BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let n_dials: u64 = std::env::var("BENCH_DIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let dir = tempfile::tempdir().unwrap();
    konnectivity::certs::write_make_certs(dir.path(), "127.0.0.1").unwrap();
    // The backend lives in its own process: 10,000 idle tunnels need 10,000
    // descriptors on each side and the hard limit here may be 20,000.
    let backend_port = free_port();
    let d = dir.path().display().to_string();
    let backend_proc = spawn_role("backend", &[d, backend_port.to_string()]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let backend_addr = SocketAddr::from(([127, 0, 0, 1], backend_port));
        let t = Tunnel::start(dir.path(), "rates", backend_addr).await;
        let pids = t.pids();
        let (tls_path, uds_path, grpc_path) = (t.tls.clone(), t.uds.clone(), t.grpc.clone());
        let bytes = (gib * (1u64 << 30) as f64) as u64;
        let paths = [("direct TCP", Path2::Direct), ("tunnel, HTTP-CONNECT over mTLS", tls_path.clone()), ("tunnel, HTTP-CONNECT over UDS", uds_path.clone()), ("tunnel, gRPC over UDS", grpc_path.clone())];
        // BENCH_PATHS: comma-separated row numbers (0 = direct) to run only
        // those rows while iterating; direct is always measured.
        let only: Option<Vec<usize>> = std::env::var("BENCH_PATHS")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
        let mut rows: Vec<Row> = Vec::new();
        for (i, (name, p)) in paths.iter().enumerate() {
            if i > 0 && only.as_ref().is_some_and(|o| !o.contains(&i)) {
                continue;
            }
            let c0 = cpu_of(&pids);
            let mibs = throughput(p, backend_addr, bytes).await;
            let c1 = cpu_of(&pids);
            let me = cpu_secs(std::process::id());
            let dials = dials_per_sec(p, backend_addr, n_dials, 16).await;
            let c2 = cpu_of(&pids);
            let client_us_per_dial = (cpu_secs(std::process::id()) - me) * 1e6 / n_dials as f64;
            let (p50, p99) = latency(p, backend_addr, 5000).await;
            rows.push(Row {
                name: name.to_string(),
                mibs,
                dials,
                p50,
                p99,
                cpu_ms_per_gib: (c1 - c0) * 1e3 / (bytes as f64 / (1u64 << 30) as f64),
                cpu_us_per_dial: (c2 - c1) * 1e6 / n_dials as f64,
                client_us_per_dial,
            });
        }
        // BENCH_FLOOR=0 skips the floor rows.
        if std::env::var("BENCH_FLOOR").map_or(true, |v| v != "0") {
            let floor = Floor::start(dir.path(), backend_port);
            let floors = [
                ("floor: bare relays, TLS link", floor.tls.clone()),
                ("floor: bare relays, plain link", floor.plain.clone()),
            ];
            for (name, sock) in floors {
                let p = Path2::Relay(sock);
                roles::wait_until("floor relay", Duration::from_secs(20), || dials(&p, backend_addr)).await;
                let c0 = cpu_of(&floor.pids());
                let mibs = throughput(&p, backend_addr, bytes).await;
                let c1 = cpu_of(&floor.pids());
                rows.push(Row {
                    name: name.to_string(),
                    mibs,
                    dials: f64::NAN,
                    p50: f64::NAN,
                    p99: f64::NAN,
                    cpu_ms_per_gib: (c1 - c0) * 1e3 / (bytes as f64 / (1u64 << 30) as f64),
                    cpu_us_per_dial: f64::NAN,
                    client_us_per_dial: f64::NAN,
                });
            }
        }
        if idle_n == 0 {
            print_rows(&rows, gib);
            return;
        }
        drop(t);
        // Each idle measurement gets fresh server and agent processes: memory
        // freed by an earlier phase would otherwise be reused and hide cost.
        let mut idle = Vec::new();
        // BENCH_IDLE_PATHS: which of uds,tls,grpc to measure (default all).
        let idle_paths = std::env::var("BENCH_IDLE_PATHS").unwrap_or("uds,tls,grpc".into());
        for (i, which) in ["uds", "tls", "grpc"].into_iter().enumerate() {
            if !idle_paths.split(',').any(|p| p == which) {
                idle.push(Idle { server: f64::NAN, agent: f64::NAN });
                continue;
            }
            let t = Tunnel::start(dir.path(), &format!("idle{i}"), backend_addr).await;
            let path = match which {
                "uds" => t.uds.clone(),
                "tls" => t.tls.clone(),
                _ => t.grpc.clone(),
            };
            let (cost, conns) = idle_rss(&path, backend_addr, idle_n, &t.pids()).await;
            drop(conns);
            idle.push(cost);
        }
        let [idle_uds, idle_tls, idle_grpc] = <[Idle; 3]>::try_from(idle).ok().unwrap();

        print_rows(&rows, gib);
        println!("idle tunnelled connections: {idle_n} open; RSS growth of server + agent per connection:");
        println!("  HTTP-CONNECT over UDS : {idle_uds}");
        println!("  HTTP-CONNECT over mTLS: {idle_tls}");
        println!("  gRPC over UDS (one HTTP/2 connection per dial): {idle_grpc}");
    });
    drop(backend_proc);
}

/// A server process (three servers: HTTP-CONNECT over mTLS, HTTP-CONNECT
/// over UDS, gRPC over UDS) and an agent connected to all three.
struct Tunnel {
    server: ChildGuard,
    agent: ChildGuard,
    tls: Path2,
    uds: Path2,
    grpc: Path2,
}

impl Tunnel {
    async fn start(dir: &Path, tag: &str, backend: SocketAddr) -> Tunnel {
        let (front, agent_port) = (free_port(), free_port());
        let uds = dir.join(format!("proxy-{tag}.sock"));
        let d = dir.display().to_string();
        let server = spawn_role(
            "server",
            &[
                d.clone(),
                front.to_string(),
                agent_port.to_string(),
                uds.display().to_string(),
            ],
        );
        roles::wait_listen(agent_port);
        let agent = spawn_role("agent", &[d, agent_port.to_string()]);
        let ctls = roles::client_tls(dir, "master", "proxy-client", &[]);
        let t = Tunnel {
            server,
            agent,
            tls: Path2::Proxy(ProxyAddr::Tcp {
                host: "127.0.0.1".into(),
                port: front,
                tls: Some(ctls),
            }),
            uds: Path2::Proxy(ProxyAddr::Uds(uds.clone())),
            grpc: Path2::Grpc(ProxyAddr::Uds(uds.with_extension("grpc"))),
        };
        // Wait until the agent serves all three servers.
        for p in [&t.tls, &t.uds, &t.grpc] {
            roles::wait_until("tunnel", Duration::from_secs(20), || dials(p, backend)).await;
        }
        t
    }

    fn pids(&self) -> [u32; 2] {
        [self.server.0.id(), self.agent.0.id()]
    }
}
