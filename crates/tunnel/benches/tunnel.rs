//! Tunnel benchmark: through proxy-server + proxy-agent (separate processes,
//! this binary re-executed in those roles) on loopback versus a direct
//! connection, in one run. Prints one table.
//!
//! Frontends measured: HTTP-CONNECT over TCP with mTLS (what curl and the
//! README use) and HTTP-CONNECT over a unix socket (what a kube-apiserver
//! beside the server uses). Agent <-> server is always gRPC over mTLS.
//!
//! `cargo bench -p konnectivity --bench tunnel` (release). Env: BENCH_GIB
//! (default 1), BENCH_IDLE (default 10000).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/backend.rs"]
mod backend;
use backend::backend;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use konnectivity::agent::{self, AgentLaunch, AgentOptions};
use konnectivity::client::{self, Io, ProxyAddr};
use konnectivity::server::{self, FrontendListen, FrontendMode, ServerLaunch, ServerOptions};
use konnectivity::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn raise_nofile() {
    let lim = libc::rlimit {
        rlim_cur: 200_000,
        rlim_max: 200_000,
    };
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            let mut cur = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
            cur.rlim_cur = cur.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

// ---- child roles ----

fn run_role(role: &str, args: &[String]) {
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let certs = PathBuf::from(&args[0]);
    rt.block_on(async move {
        match role {
            "server" => {
                let front: u16 = args[1].parse().unwrap();
                let agent_port: u16 = args[2].parse().unwrap();
                let uds = PathBuf::from(&args[3]);
                let m = certs.join("certs/master");
                let a = certs.join("certs/agent");
                let mk_tls = |alpn: &[&[u8]]| {
                    tls::server_config(
                        &m.join("issued/proxy-master.crt"),
                        &m.join("private/proxy-master.key"),
                        Some(&m.join("issued/ca.crt")),
                        &Default::default(),
                        alpn,
                    )
                    .unwrap()
                };
                let agent_tls = tls::server_config(
                    &a.join("issued/proxy-master.crt"),
                    &a.join("private/proxy-master.key"),
                    Some(&a.join("issued/ca.crt")),
                    &Default::default(),
                    &[b"h2"],
                )
                .unwrap();
                let launch = |frontend, agent_addr| ServerLaunch {
                    opts: ServerOptions::default(),
                    mode: FrontendMode::HttpConnect,
                    frontend,
                    agent_addr,
                    agent_tls: agent_tls.clone(),
                    health_addr: None,
                    admin_addr: None,
                    agent_keepalive: Duration::from_secs(3600),
                    agent_liveness: Duration::from_secs(5),
                    frontend_keepalive: Duration::from_secs(3600),
                };
                // One process, two servers: TLS frontend and UDS frontend,
                // each with its own agent port.
                let _s1 = server::launch(launch(
                    FrontendListen::Tcp {
                        addr: SocketAddr::from(([127, 0, 0, 1], front)),
                        tls: Some(mk_tls(&[b"http/1.1"])),
                    },
                    SocketAddr::from(([127, 0, 0, 1], agent_port)),
                ))
                .await
                .unwrap();
                let _s2 = server::launch(launch(
                    FrontendListen::Uds {
                        path: uds.clone(),
                        delete_existing: true,
                    },
                    SocketAddr::from(([127, 0, 0, 1], agent_port + 1)),
                ))
                .await
                .unwrap();
                let mut grpc = launch(
                    FrontendListen::Uds {
                        path: uds.with_extension("grpc"),
                        delete_existing: true,
                    },
                    SocketAddr::from(([127, 0, 0, 1], agent_port + 2)),
                );
                grpc.mode = FrontendMode::Grpc;
                let _s3 = server::launch(grpc).await.unwrap();
                wait_parent().await;
            }
            "agent" => {
                let agent_port: u16 = args[1].parse().unwrap();
                let a = certs.join("certs/agent");
                let tls = tls::client_config(
                    &a.join("issued/ca.crt"),
                    Some((
                        &a.join("issued/proxy-agent.crt"),
                        &a.join("private/proxy-agent.key"),
                    )),
                    &Default::default(),
                    &[b"h2".to_vec()],
                )
                .unwrap();
                let servers = (0..3)
                    .map(|i| ("127.0.0.1".to_string(), agent_port + i))
                    .collect();
                let mut opts = AgentOptions::new(servers, tls);
                opts.sync_interval = Duration::from_millis(100);
                let _a = agent::launch(AgentLaunch {
                    opts,
                    health_addr: None,
                    admin_addr: None,
                })
                .await
                .unwrap();
                wait_parent().await;
            }
            "backend" => {
                let port: u16 = args[1].parse().unwrap();
                let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
                tokio::spawn(backend(listener));
                wait_parent().await;
            }
            _ => panic!("unknown role"),
        }
    });
}

/// Children exit when the bench closes their stdin.
async fn wait_parent() {
    let mut stdin = tokio::io::stdin();
    let mut b = [0u8; 1];
    let _ = stdin.read(&mut b).await;
    std::process::exit(0);
}

struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_role(role: &str, args: &[String]) -> ChildGuard {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .arg(format!("--role={role}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

fn free_port() -> u16 {
    // Two consecutive ports are needed for the agent listeners.
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 65000
            && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 2)).is_ok()
        {
            return p;
        }
    }
}

#[derive(Clone)]
enum Path2 {
    Direct,
    Proxy(ProxyAddr),
    /// gRPC frontend: one HTTP/2 connection and Proxy stream per dial, as
    /// kube-apiserver's konnectivity client does.
    Grpc(ProxyAddr),
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
    let mut io = open(path, backend).await;
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

async fn idle_rss(
    path: &Path2,
    backend: SocketAddr,
    n: usize,
    pids: &[u32],
) -> (f64, Vec<Box<dyn Io>>) {
    let before: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let mut conns = Vec::with_capacity(n);
    let batch = 50;
    let mut i = 0;
    while i < n {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch.min(n - i) {
            let path = path.clone();
            set.spawn(async move {
                let mut io = open(&path, backend).await;
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    ((after.saturating_sub(before)) as f64 / n as f64, conns)
}

type Row = (String, f64, f64, f64, f64);

fn print_rows(rows: &[Row], gib: f64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!(
        "konnectivity tunnel benchmark ({cpus} CPUs; loopback; server and agent are separate processes; {gib} GiB stream)"
    );
    println!(
        "{:<34} {:>12} {:>8} {:>10} {:>7} {:>10} {:>10} {:>12} {:>12}",
        "path",
        "MiB/s",
        "x direct",
        "dials/s",
        "x direct",
        "p50 us",
        "p99 us",
        "+p50 us",
        "+p99 us"
    );
    let (_, dt, dd, d50, d99) = rows[0].clone();
    for (name, t, dps, p50, p99) in rows {
        println!(
            "{:<34} {:>12.0} {:>8.2} {:>10.0} {:>7.2} {:>10.1} {:>10.1} {:>12.1} {:>12.1}",
            name,
            t,
            t / dt,
            dps,
            dps / dd,
            p50,
            p99,
            p50 - d50,
            p99 - d99
        );
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
    let dir = tempfile::tempdir().unwrap();
    konnectivity::certs::write_make_certs(dir.path(), "127.0.0.1").unwrap();
    let (front, agent_port) = (free_port(), free_port());
    let uds = dir.path().join("proxy.sock");
    let d = dir.path().display().to_string();
    let server = spawn_role(
        "server",
        &[
            d.clone(),
            front.to_string(),
            agent_port.to_string(),
            uds.display().to_string(),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let agent = spawn_role("agent", &[d.clone(), agent_port.to_string()]);
    let pids = [server.0.id(), agent.0.id()];
    // The backend lives in its own process: 10,000 idle tunnels need 10,000
    // descriptors on each side and the hard limit here may be 20,000.
    let backend_port = free_port();
    let backend_proc = spawn_role("backend", &[d.clone(), backend_port.to_string()]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
                let backend_addr = SocketAddr::from(([127, 0, 0, 1], backend_port));
        let m = dir.path().join("certs/master");
        let ctls = tls::client_config(
            &m.join("issued/ca.crt"),
            Some((&m.join("issued/proxy-client.crt"), &m.join("private/proxy-client.key"))),
            &Default::default(),
            &[],
        )
        .unwrap();
        let tls_path = Path2::Proxy(ProxyAddr::Tcp { host: "127.0.0.1".into(), port: front, tls: Some(ctls) });
        let uds_path = Path2::Proxy(ProxyAddr::Uds(uds.clone()));
        let grpc_path = Path2::Grpc(ProxyAddr::Uds(uds.with_extension("grpc")));
        // Wait until the agent serves both servers.
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in [&tls_path, &uds_path, &grpc_path] {
            loop {
                let ok = match p {
                    Path2::Proxy(a) => client::http_connect(a, &backend_addr.to_string(), "probe").await.is_ok(),
                    Path2::Grpc(a) => match client::grpc_channel(a).await {
                        Ok(ch) => client::grpc_dial(ch, &backend_addr.to_string()).await.is_ok(),
                        Err(_) => false,
                    },
                    Path2::Direct => true,
                };
                if ok {
                    break;
                }
                assert!(Instant::now() < deadline, "tunnel not ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
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
            let tput = throughput(p, backend_addr, bytes).await;
            let dps = dials_per_sec(p, backend_addr, 4000, 16).await;
            let (p50, p99) = latency(p, backend_addr, 5000).await;
            rows.push((name.to_string(), tput, dps, p50, p99));
        }
        if idle_n == 0 {
            print_rows(&rows, gib);
            return;
        }
        let (idle_uds, conns) = idle_rss(&uds_path, backend_addr, idle_n, &pids).await;
        drop(conns);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (idle_tls, conns) = idle_rss(&tls_path, backend_addr, idle_n, &pids).await;
        drop(conns);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (idle_grpc, conns) = idle_rss(&grpc_path, backend_addr, idle_n, &pids).await;
        drop(conns);

        print_rows(&rows, gib);
        println!("idle tunnelled connections: {idle_n} open; RSS growth of server + agent per connection:");
        println!("  HTTP-CONNECT over UDS : {:.1} KiB", idle_uds);
        println!("  HTTP-CONNECT over mTLS: {:.1} KiB", idle_tls);
        println!("  gRPC over UDS (one HTTP/2 connection per dial): {:.1} KiB", idle_grpc);
    });
    drop(server);
    drop(agent);
    drop(backend_proc);
    let _ = Path::new("");
}
