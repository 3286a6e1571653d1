//! Side-by-side benchmark: our tunnel (HTTP-CONNECT and gRPC frontends)
//! versus a direct connection, an OpenSSH reverse tunnel (`ssh -R` to a
//! loopback sshd started here), rathole and upstream apiserver-network-proxy
//! (its Go proxy-server and proxy-agent), in one run, on one machine, to one
//! backend process with the same payloads and the same client. The gRPC
//! (UDS) servers, ours and upstream's, are also dialled with upstream's
//! konnectivity-client (target/go-peers/konn-client), as kube-apiserver
//! dials: dials/s and dial p50/p99 in a table of their own, with the CPU
//! per dial of the client, the echo backend and the tunnel, and the bound
//! that puts on ours / upstream when the machine is CPU-bound. Also a soak
//! mode.
//!
//! Peers come from `scripts/install-bench-tools.sh` (rathole in
//! target/tools/bin; /usr/sbin/sshd from Debian); upstream's binaries from
//! `scripts/install-deps.sh` (target/go-peers). A missing peer is skipped and
//! said so.
//!
//! `cargo bench -p konnectivity --bench peers`. Env:
//!   BENCH_QUICK=1      smoke sizes (32 MiB, 300 dials, 500 rounds, 500 idle)
//!   BENCH_MIB          bytes per throughput row (default 1024)
//!   BENCH_DIALS        dials per dials/s row (default 4000)
//!   BENCH_IDLE         idle connections for the memory row (default 10000)
//!   BENCH_PEERS        comma list to run (direct,floor,http,grpc,
//!                      upstream-http,upstream-grpc,ssh,ssh-gcm,rathole,
//!                      rathole-noise); floor: two bare relays with TLS
//!                      between them, the limit of the machine
//!   BENCH_SOAK=N       soak instead: N dials (64 at a time) through the
//!                      HTTP-CONNECT tunnel, sampling RSS and fds
//!                      (BENCH_SOAK_VIA=grpc: through the gRPC frontend)
//!   BENCH_SOAK_SECS    soak time budget (default 600); stops early and
//!                      extrapolates
//!   RATHOLE_BIN        rathole binary (default <repo>/target/tools/bin/rathole)
//!   GO_PEERS           upstream's binaries (default <repo>/target/go-peers)
//!   BENCH_FLOOR_HOP=N  the floor's relays hand each read (a fresh N-byte
//!                      buffer) to a writer task through a channel: what
//!                      one task hand-off per direction costs
//!   BENCH_PAIRED_ROUNDS  rounds of the side-by-side rows (default 8, quick
//!                      2, 0: none): ours against the floor (one stream
//!                      down, sixteen down, one up) and against
//!                      upstream (dials, on each frontend), in turns
//!   BENCH_PAIRED_ONLY=1  only the side-by-side rows
//!   BENCH_FLOW_WINDOW=N  our server's and agent's flow-control window
//!                      (bytes) instead of their default
//!   BENCH_FLOW_WINDOW_MAX=N  the most that window may grow to (bytes)
//!   BENCH_LINKS=N      our agent's --links-per-server in every row (the
//!                      side-by-side rows also have one 16x row at 1, or
//!                      at 2 when N is 1)
//!   BENCH_STALLED=N    after each tunnel's row, N tunnels whose client
//!                      reads nothing while the backend sends: memory per
//!                      tunnel, and whether a new dial still gets through
//!   BENCH_PERF=<dir>   `perf record` each row's tunnel processes during
//!                      its one-stream row into <dir>/<row>.data, its
//!                      sixteen streams into <dir>/<row>-16x.data, its
//!                      dials/s row into <dir>/<row>-dials.data, its
//!                      upload into <dir>/<row>-up.data, and
//!                      its konn-client dials (<socket>-konn.data)
//!                      (BENCH_PERF_CG: --call-graph, default dwarf)

#[path = "support/backend.rs"]
mod backend;
#[path = "support/roles.rs"]
mod roles;
use roles::{raise_nofile, rss_kib, wait_listen};

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

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// utime + stime of `pid` and of its reaped children (sshd's per-connection
/// processes end before the row does), in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime, stime, cutime and
    // cstime are fields 14-17, so the 12th-15th after it.
    let rest = stat.rsplit_once(')').map_or("", |x| x.1);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// CPU seconds of `roots` and their live descendants.
fn cpu_of(roots: &[u32]) -> f64 {
    roots.iter().flat_map(|r| tree(*r)).map(cpu_secs).sum()
}

/// `pid` and all its descendants (sshd forks a process pair per connection).
fn tree(pid: u32) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            if let Some(rest) = stat.rsplit_once(')').map(|x| x.1)
                && let Some(pp) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok())
            {
                parent.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

// ---- child roles (this binary re-executed) ----

fn run_role(role: &str, args: &[String]) {
    raise_nofile();
    konnectivity::tune_allocator();
    let rt = konnectivity::runtime().unwrap();
    rt.block_on(async move {
        match role {
            "server" => {
                let certs = PathBuf::from(&args[0]);
                let http_uds = PathBuf::from(&args[1]);
                let agent_port: u16 = args[2].parse().unwrap();
                let grpc_uds = PathBuf::from(&args[3]);
                let agent_tls = roles::agent_listener_tls(&certs);
                // Both frontends on unix sockets: kube-apiserver's usual
                // set-up, upstream's rows' and the TLS floor's (so the floor
                // and the HTTP-CONNECT row have the same sockets and the same
                // bare-socket client). Agent <-> server is gRPC over mTLS.
                let mut servers = Vec::new();
                for (mode, path, port) in [
                    (FrontendMode::HttpConnect, http_uds, agent_port),
                    (FrontendMode::Grpc, grpc_uds, agent_port + 1),
                ] {
                    let listen = FrontendListen::Uds {
                        path,
                        delete_existing: true,
                    };
                    servers.push(
                        server::launch(roles::server_launch(&agent_tls, mode, listen, port))
                            .await
                            .unwrap(),
                    );
                }
                roles::wait_parent().await;
            }
            "agent" => {
                roles::run_agent(&PathBuf::from(&args[0]), args[1].parse().unwrap(), 2).await
            }
            "backend" => roles::run_backend(args[0].parse().unwrap()).await,
            "http-echo" => run_http_echo(args[0].parse().unwrap()).await,
            "relay-back" => roles::relay_back(&PathBuf::from(&args[0]), args).await,
            "relay-front" => roles::relay_front(&PathBuf::from(&args[0]), args).await,
            _ => panic!("unknown role"),
        }
    });
}

/// The backend konn-client expects: `POST /echo` answered with a 200 head
/// and then every byte it sends, echoed, until it closes. Lives until the
/// bench goes away, as the other roles (a killed bench left it running).
async fn run_http_echo(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if !matches!(s.read(&mut b).await, Ok(1)) {
                        return;
                    }
                    head.push(b[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                    .await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    roles::wait_parent().await;
}

/// The TLS floor: two bare relay processes, a unix socket in front (as our
/// gRPC frontend), TLS with the agent link's certificates between them,
/// plain TCP to the backend: what any tunnel of this shape can reach here.
/// Returns the processes and the front's TLS socket.
fn start_floor(dir: &Path, backend_port: u16) -> (Vec<ChildGuard>, PathBuf) {
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
    wait_listen(ports + 1);
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
    (vec![front, back], tls)
}

/// One konnectivity-client dials row: rate, latency and where the CPU went.
struct Konn {
    dps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU microseconds per dial: the konn-client process, the echo
    /// backend it reaches, the tunnel's processes (server + agent).
    client_us: f64,
    backend_us: f64,
    tunnel_us: f64,
    /// The three processes' CPU over the run's wall time and the CPUs.
    util: f64,
    /// Every process on the machine (/proc/stat), the other tenants too.
    machine_util: f64,
}

/// konnectivity-client's row, or why not.
type KonnDials = Result<Konn, String>;

/// Busy and total jiffies of all CPUs, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    (total - idle, total)
}

/// Dials through a gRPC frontend on `uds` with upstream's
/// konnectivity-client (target/go-peers/konn-client): one tunnel per dial,
/// as kube-apiserver does, 16 at a time, 1 KiB echoed and hashed per dial.
/// `tunnel` are the tunnel's processes and `backend` the echo process, for
/// their CPU; the client's own comes from wait4 when it is reaped.
fn konn_dials(
    go: &Path,
    uds: &Path,
    target: u16,
    dials: u64,
    tunnel: &[u32],
    backend: u32,
) -> KonnDials {
    use std::io::Read;
    let bin = go.join("konn-client");
    if !bin.exists() {
        return Err(format!("{} missing", bin.display()));
    }
    let perf = perf_record(&format!("{}-konn", uds.display()), tunnel);
    let (t0, b0, m0) = (cpu_of(tunnel), cpu_secs(backend), cpu_jiffies());
    let start = Instant::now();
    let mut child = Command::new(bin)
        .arg(format!("--uds={}", uds.display()))
        .arg(format!("--target=127.0.0.1:{target}"))
        .arg(format!("--dials={dials}"))
        .args(["--concurrency=16", "--payload=1024"])
        .env("GOMAXPROCS", "2")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .map_err(|e| e.to_string())?;
    // Reaped here rather than by `Child::wait`, for its rusage (the whole
    // process: every Go thread).
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    if r < 0 {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let wall = start.elapsed().as_secs_f64();
    let (t1, b1, m1) = (cpu_of(tunnel), cpu_secs(backend), cpu_jiffies());
    drop(perf);
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let client = tv(ru.ru_utime) + tv(ru.ru_stime);
    let v: serde_json::Value =
        serde_json::from_slice(&stdout).map_err(|e| format!("konn-client output: {e}"))?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!("konn-client failed: {v}"));
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let ok = f("ok");
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let (tunnel_s, backend_s) = (t1 - t0, b1 - b0);
    Ok(Konn {
        dps: ok / f("elapsed_s"),
        p50_ms: f("dial_p50_ms"),
        p99_ms: f("dial_p99_ms"),
        client_us: client * 1e6 / ok,
        backend_us: backend_s * 1e6 / ok,
        tunnel_us: tunnel_s * 1e6 / ok,
        util: (client + backend_s + tunnel_s) / (wall * cpus),
        machine_util: (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64,
    })
}

/// With BENCH_PERF=<dir>: `perf record` on `roots` and their descendants
/// (every thread), and on this process (the client), while the guard
/// lives, into <dir>/<row>.data; stopped with SIGINT so it writes its file.
/// BENCH_PERF_CG picks the call graph (default dwarf: release builds keep
/// no frame pointers).
fn perf_record(row: &str, roots: &[u32]) -> Option<PerfGuard> {
    let dir = PathBuf::from(std::env::var_os("BENCH_PERF")?);
    if roots.is_empty() {
        return None;
    }
    std::fs::create_dir_all(&dir).ok()?;
    let file: String = row
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let pids: Vec<String> = roots
        .iter()
        .flat_map(|r| tree(*r))
        .chain([std::process::id()])
        .map(|p| p.to_string())
        .collect();
    let cg = std::env::var("BENCH_PERF_CG").unwrap_or_else(|_| "dwarf,16384".into());
    let child = Command::new("perf")
        .args(["record", "-q", "-F", "499", "--call-graph", &cg, "-p"])
        .arg(pids.join(","))
        .arg("-o")
        .arg(dir.join(format!("{file}.data")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("bench: perf record: {e}"))
        .ok()?;
    // perf needs a moment to attach before the row starts.
    std::thread::sleep(Duration::from_millis(500));
    Some(PerfGuard(child))
}

struct PerfGuard(Child);
impl Drop for PerfGuard {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGINT);
        }
        let _ = self.0.wait();
    }
}

/// Idle connections for the floor row at most.
const FLOOR_IDLE: usize = 2000;

/// Kills the process group it leads (sshd's per-connection children too).
struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn roots_of(procs: &[ChildGuard]) -> Vec<u32> {
    procs.iter().map(|c| c.0.id()).collect()
}

/// Tied to this process (parent-death signal): a bench stopped by a
/// signal, which skips the guards' drops, leaves no tunnel behind.
fn spawn_cmd(mut cmd: Command) -> ChildGuard {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let shown = format!("{cmd:?}");
    ChildGuard(
        proxyctl_testkit::spawn_tied(&mut cmd).unwrap_or_else(|e| panic!("spawn {shown}: {e}")),
    )
}

fn spawn_role(role: &str, args: &[String]) -> ChildGuard {
    spawn_role_env(role, args, &[])
}

fn spawn_role_env(role: &str, args: &[String], env: &[(&str, String)]) -> ChildGuard {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.arg(format!("--role={role}"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    spawn_cmd(cmd)
}

/// Ports for the processes this bench starts: below the ephemeral range, so
/// the dial storms' outgoing connections (and their TIME_WAIT) never hold a
/// port a peer is about to bind (ssh -R failed that way with bind(0) ports).
/// Two consecutive ports: some roles bind `port` and `port + 1`.
fn free_port() -> u16 {
    proxyctl_testkit::free_consecutive_ports(2)
}

#[derive(Clone)]
enum Via {
    /// Plain TCP to an address: the backend itself, or a peer's listener.
    Tcp(SocketAddr),
    Connect(ProxyAddr),
    /// One HTTP/2 connection and Proxy stream per dial, as kube-apiserver's
    /// konnectivity client does.
    Grpc(ProxyAddr),
    /// A unix socket whose listener relays the bytes (the floor).
    Uds(PathBuf),
}

async fn try_open(via: &Via, backend: SocketAddr) -> anyhow::Result<Box<dyn Io>> {
    Ok(match via {
        Via::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Via::Connect(addr) => client::http_connect(addr, &backend.to_string(), "bench").await?,
        Via::Uds(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        Via::Grpc(addr) => {
            let channel = client::grpc_channel(addr).await?;
            Box::new(client::grpc_dial(channel, &backend.to_string()).await?)
        }
    })
}

async fn open(via: &Via, backend: SocketAddr) -> Box<dyn Io> {
    try_open(via, backend).await.expect("open")
}

/// One full request/response through `via`; the readiness probe too.
async fn one_dial(via: &Via, backend: SocketAddr) -> anyhow::Result<()> {
    let mut io = try_open(via, backend).await?;
    let mut req = vec![b'R'];
    req.extend_from_slice(&[1u8; 1024]);
    io.write_all(&req).await?;
    let mut rsp = [0u8; 1024];
    io.read_exact(&mut rsp).await?;
    anyhow::ensure!(rsp == [1u8; 1024], "bad response");
    Ok(())
}

/// Aggregate MiB/s of `streams` concurrent downloads of `bytes / streams`.
async fn throughput(via: &Via, backend: SocketAddr, bytes: u64, streams: u64) -> f64 {
    let each = bytes / streams;
    let mut ios = Vec::new();
    for _ in 0..streams {
        ios.push(open(via, backend).await);
    }
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for mut io in ios {
        set.spawn(async move {
            let mut cmd = vec![b'S'];
            cmd.extend_from_slice(&each.to_le_bytes());
            io.write_all(&cmd).await.unwrap();
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            while got < each {
                let n = io.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            assert_eq!(got, each, "short read");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    (each * streams) as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

/// MiB/s of one upload of `bytes`: timed until the backend, having read
/// them all, answers.
async fn upload(via: &Via, backend: SocketAddr, bytes: u64) -> f64 {
    let mut io = open(via, backend).await;
    let start = Instant::now();
    let mut cmd = vec![b'U'];
    cmd.extend_from_slice(&bytes.to_le_bytes());
    io.write_all(&cmd).await.unwrap();
    let buf = vec![7u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        io.write_all(&buf[..n]).await.unwrap();
        left -= n as u64;
    }
    io.flush().await.unwrap();
    let mut done = [0u8; 1];
    io.read_exact(&mut done).await.unwrap();
    bytes as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

/// Which side of a goal a ratio must be on.
#[derive(Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

/// A ratio with its verdict, e.g. `0.82x MISS`. Two decimals, or three
/// where two would round onto the goal from the wrong side: the verdict is
/// on the ratio itself, and `0.90x MISS` (for 0.897) would read as a
/// contradiction.
fn judged(ratio: f64, goal: Goal) -> String {
    let (met, limit) = match goal {
        Goal::AtLeast(g) => (ratio >= g, g),
        Goal::AtMost(g) => (ratio <= g, g),
    };
    let verdict = if met { "ok" } else { "MISS" };
    let two = format!("{ratio:.2}");
    if !met && two == format!("{limit:.2}") {
        format!("{ratio:.3}x {verdict}")
    } else {
        format!("{two}x {verdict}")
    }
}

/// One side-by-side measurement: ours and the other path's rate, each
/// aggregated over its rounds.
struct Paired {
    what: String,
    ours: (&'static str, f64),
    other: (&'static str, f64),
    goal: f64,
    /// Ours over the other path in each round (the two runs of a round are
    /// seconds apart): their spread shows whether a run's ratio is steady
    /// within the run or only differs between runs.
    rounds: Vec<f64>,
    /// Lines printed under the row (where the CPU went).
    notes: Vec<String>,
}

/// CPU spent by each process of a side-by-side round, summed over one
/// side's rounds, per unit of work (a dial, a GiB): what decides the rate
/// when the machine is CPU-bound. For dials, also the ratio a tunnel
/// costing nothing would reach against the other side. The client and the
/// backend do the same work on both sides, but their CPU is measured per
/// side, not assumed equal (it is not).
#[derive(Default)]
struct RoundCpu {
    /// Dials, or GiB moved.
    work: f64,
    /// Seconds of CPU: this process (the client), the backend process,
    /// the tunnel's processes.
    client: f64,
    backend: f64,
    tunnel: f64,
    /// Busy and total jiffies of the machine (/proc/stat).
    busy: u64,
    total: u64,
    wall: f64,
}

/// How a row's CPU is printed: per dial in us, or per GiB in ms.
#[derive(Clone, Copy)]
enum CpuUnit {
    Dial,
    GiB,
}

impl RoundCpu {
    /// Runs `round` (`work` dials or GiB) and adds its CPU.
    async fn add<F: std::future::Future<Output = f64>>(
        cell: &std::sync::Mutex<RoundCpu>,
        work: f64,
        backend: u32,
        tunnel: &[u32],
        round: F,
    ) -> f64 {
        let (c0, b0, t0, (busy0, total0), w0) = (
            self_cpu(),
            cpu_secs(backend),
            cpu_of(tunnel),
            cpu_jiffies(),
            Instant::now(),
        );
        let rate = round.await;
        let (busy1, total1) = cpu_jiffies();
        let mut d = cell.lock().unwrap();
        d.work += work;
        d.client += self_cpu() - c0;
        d.backend += cpu_secs(backend) - b0;
        d.tunnel += cpu_of(tunnel) - t0;
        d.busy += busy1 - busy0;
        d.total += total1 - total0;
        d.wall += w0.elapsed().as_secs_f64();
        rate
    }

    /// `secs` of CPU per unit, in the unit's scale.
    fn per_unit(&self, secs: f64, unit: CpuUnit) -> f64 {
        let scale = match unit {
            CpuUnit::Dial => 1e6,
            CpuUnit::GiB => 1e3,
        };
        secs * scale / self.work.max(1e-9)
    }

    /// The tunnel's processes, client and backend over wall time x CPUs.
    fn util(&self, cpus: usize) -> f64 {
        (self.client + self.backend + self.tunnel) / (self.wall * cpus.max(1) as f64)
    }

    /// Lines for a side-by-side row: CPU per unit of both sides and how
    /// busy the CPUs were; for dials, the ceiling a tunnel costing no CPU
    /// would reach against `other` on this machine, (C + B + U) / (C + B)
    /// with the other side's C, B, U.
    fn notes(ours: &RoundCpu, other: &RoundCpu, cpus: usize, unit: CpuUnit) -> Vec<String> {
        let per = |d: &RoundCpu| {
            (
                d.per_unit(d.client, unit),
                d.per_unit(d.backend, unit),
                d.per_unit(d.tunnel, unit),
            )
        };
        let ((oc, ob, ot), (uc, ub, ut)) = (per(ours), per(other));
        let machine = |d: &RoundCpu| d.busy as f64 / d.total.max(1) as f64 * 100.0;
        let what = match unit {
            CpuUnit::Dial => "CPU per dial, us",
            CpuUnit::GiB => "CPU per GiB, ms",
        };
        let mut lines = vec![format!(
            "    {what} (ours / other): client {oc:.0} / {uc:.0}, backend {ob:.0} / {ub:.0}, tunnel {ot:.0} / {ut:.0}; these processes kept {:.0}% / {:.0}% of the CPUs busy, the machine {:.0}% / {:.0}%",
            ours.util(cpus) * 100.0,
            other.util(cpus) * 100.0,
            machine(ours),
            machine(other),
        )];
        if let CpuUnit::Dial = unit {
            lines.push(format!(
                "    a tunnel costing no CPU would reach {:.2}x against the other here (its client + backend + tunnel over client + backend); the CPU per dial above predicts {:.2}x for ours",
                zero_cpu_ceiling(uc, ub, ut),
                (uc + ub + ut) / (oc + ob + ot),
            ));
        }
        lines
    }
}

/// Both sides' CPU over a side-by-side row: each round is counted in its
/// side's [`RoundCpu`] with that side's tunnel processes.
struct SidesCpu {
    cells: [std::sync::Mutex<RoundCpu>; 2],
    tunnels: [Vec<u32>; 2],
    backend: u32,
}

impl SidesCpu {
    fn new(ours: Vec<u32>, other: Vec<u32>, backend: u32) -> Self {
        SidesCpu {
            cells: Default::default(),
            tunnels: [ours, other],
            backend,
        }
    }

    /// Runs `round` (`work` dials or GiB) for `side` and counts its CPU.
    async fn count<F: std::future::Future<Output = f64>>(
        &self,
        side: Side,
        work: f64,
        round: F,
    ) -> f64 {
        let i = usize::from(side == Side::Other);
        RoundCpu::add(&self.cells[i], work, self.backend, &self.tunnels[i], round).await
    }

    /// The lines printed under the row (see [`RoundCpu::notes`]).
    fn notes(self, unit: CpuUnit) -> Vec<String> {
        let [ours, other] = self.cells.map(|c| c.into_inner().unwrap());
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        RoundCpu::notes(&ours, &other, cpus, unit)
    }
}

/// Against a path whose dials cost `client`, `backend` and `tunnel` CPU
/// each, the most any tunnel can reach on a CPU-bound machine: dials/s is
/// CPUs x busy share / CPU per dial, and a tunnel costing nothing leaves
/// only client + backend.
fn zero_cpu_ceiling(client: f64, backend: f64, tunnel: f64) -> f64 {
    (client + backend + tunnel) / (client + backend)
}

/// Runs `a` and `b` in turns, `rounds` times each (which goes first
/// alternates, so a drift of the host's speed hits both alike); each
/// returns a rate, and each side's result is the mean of its rates
/// weighted by time (the rate over all its rounds, each round the same work).
/// Also returns each round's ratio of `a` to `b`.
async fn interleave<A, B, FA, FB>(rounds: usize, mut a: A, mut b: B) -> (f64, f64, Vec<f64>)
where
    A: FnMut() -> FA,
    B: FnMut() -> FB,
    FA: std::future::Future<Output = f64>,
    FB: std::future::Future<Output = f64>,
{
    // Same work per round: the rate over all rounds is rounds / sum(1/rate).
    let (mut inv_a, mut inv_b) = (0.0, 0.0);
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (ra, rb) = if round % 2 == 0 {
            let ra = a().await;
            (ra, b().await)
        } else {
            let rb = b().await;
            (a().await, rb)
        };
        inv_a += 1.0 / ra;
        inv_b += 1.0 / rb;
        ratios.push(ra / rb);
    }
    (rounds as f64 / inv_a, rounds as f64 / inv_b, ratios)
}

/// One side-by-side row: waits until both paths carry a dial, then
/// measures `measure` on ours and on the other path in alternating rounds.
async fn side_by_side<M, F>(
    what: String,
    rounds: usize,
    backend: SocketAddr,
    ours: (&'static str, Via),
    other: (&'static str, Via),
    goal: f64,
    measure: M,
) -> Paired
where
    M: Fn(Side, Via) -> F,
    F: std::future::Future<Output = f64>,
{
    wait_ready(&ours.1, backend).await;
    wait_ready(&other.1, backend).await;
    let (a, b, ratios) = interleave(
        rounds,
        || measure(Side::Ours, ours.1.clone()),
        || measure(Side::Other, other.1.clone()),
    )
    .await;
    Paired {
        what,
        ours: (ours.0, a),
        other: (other.0, b),
        goal,
        rounds: ratios,
        notes: Vec::new(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Ours,
    Other,
}

async fn dials_per_sec(via: &Via, backend: SocketAddr, total: u64, workers: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (via, done) = (via.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.fetch_add(1, Ordering::Relaxed) < total {
                one_dial(&via, backend).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Round-trip of 64 bytes on one open echo connection, microseconds.
async fn latency(via: &Via, backend: SocketAddr, rounds: usize) -> (f64, f64) {
    roles::echo_latency_us(open(via, backend).await, rounds).await
}

/// KiB of RSS growth per idle connection over the tunnel's processes
/// (sampled with their descendants, summed).
async fn idle_rss(via: &Via, backend: SocketAddr, n: usize, roots: &[u32]) -> f64 {
    let sum = || -> u64 {
        roots
            .iter()
            .flat_map(|r| tree(*r))
            .map(rss_kib)
            .sum::<u64>()
    };
    let before = sum();
    let conns = roles::open_idle(n, || {
        let via = via.clone();
        async move { open(&via, backend).await }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sum();
    drop(conns);
    tokio::time::sleep(Duration::from_secs(2)).await;
    after.saturating_sub(before) as f64 / n as f64
}

/// Tunnels whose client reads nothing while the backend sends: opens up to
/// `n` (each dial given 5 s), waits 3 s, and returns how many opened, the
/// tunnel processes' resident memory per opened tunnel, and how long a new
/// request/response dial beside them took (or that it failed, or took
/// more than 5 s). What a
/// server holds for readers that stopped, and whether they hold up others.
async fn stalled(via: &Via, backend: SocketAddr, n: usize, roots: &[u32]) -> (usize, f64, String) {
    let sum = || -> u64 { roots.iter().flat_map(|r| tree(*r)).map(rss_kib).sum() };
    let before = sum();
    let mut ios = Vec::new();
    for _ in 0..n {
        let Ok(Ok(mut io)) =
            tokio::time::timeout(Duration::from_secs(5), try_open(via, backend)).await
        else {
            break;
        };
        let mut cmd = vec![b'S'];
        cmd.extend_from_slice(&(1u64 << 40).to_le_bytes());
        if io.write_all(&cmd).await.is_err() {
            break;
        }
        ios.push(io);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = sum();
    let start = Instant::now();
    let probe = match tokio::time::timeout(Duration::from_secs(5), one_dial(via, backend)).await {
        Ok(Ok(())) => format!("{:.1} ms", start.elapsed().as_secs_f64() * 1e3),
        Ok(Err(_)) => "failed (refused)".to_string(),
        Err(_) => "none within 5 s".to_string(),
    };
    let opened = ios.len();
    drop(ios);
    tokio::time::sleep(Duration::from_secs(2)).await;
    (
        opened,
        after.saturating_sub(before) as f64 / opened.max(1) as f64,
        probe,
    )
}

// ---- peers ----

fn go_peers() -> Option<PathBuf> {
    let p = std::env::var_os("GO_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/go-peers"));
    (p.join("upstream-server").exists() && p.join("upstream-agent").exists()).then_some(p)
}

/// Upstream's proxy-server (frontend on a unix socket in `mode`) and one
/// proxy-agent, with the same certificates as ours and GOMAXPROCS at the
/// CPU count, which is what our runtime's worker threads follow. klog at
/// -v=0: upstream's default -v=4 logs every dial. Returns the processes
/// and the frontend's socket.
fn start_upstream(go: &Path, dir: &Path, mode: &str) -> (Vec<ChildGuard>, PathBuf) {
    let uds = dir.join(format!("upstream-{mode}.sock"));
    // A second pair (the paired rows) reuses the path.
    let _ = std::fs::remove_file(&uds);
    let agent_port = free_port();
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cmd = |bin: &str, args: Vec<String>| {
        let mut c = Command::new(go.join(bin));
        c.args(args)
            .arg("-v=0")
            .env("GOMAXPROCS", cpus.to_string())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        spawn_cmd(c)
    };
    let server = cmd(
        "upstream-server",
        vec![
            format!("--mode={mode}"),
            format!("--uds-name={}", uds.display()),
            "--server-port=0".into(),
            format!("--agent-port={agent_port}"),
            format!("--health-port={}", free_port()),
            format!("--admin-port={}", free_port()),
            "--cluster-ca-cert=certs/agent/issued/ca.crt".into(),
            "--cluster-cert=certs/agent/issued/proxy-master.crt".into(),
            "--cluster-key=certs/agent/private/proxy-master.key".into(),
        ],
    );
    wait_listen(agent_port);
    let agent = cmd(
        "upstream-agent",
        vec![
            "--proxy-server-host=127.0.0.1".into(),
            format!("--proxy-server-port={agent_port}"),
            "--ca-cert=certs/agent/issued/ca.crt".into(),
            "--agent-cert=certs/agent/issued/proxy-agent.crt".into(),
            "--agent-key=certs/agent/private/proxy-agent.key".into(),
            format!("--health-server-port={}", free_port()),
            format!("--admin-server-port={}", free_port()),
            "--sync-interval=100ms".into(),
        ],
    );
    (vec![server, agent], uds)
}

fn sh(cmd: &mut Command) {
    let st = cmd
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?}: {st}");
}

/// sshd on loopback with its own config, host key and authorized_keys, plus
/// `ssh -N -R` from this machine to it: the remote listener on the sshd side
/// forwards through the SSH connection to the backend.
fn start_ssh(dir: &Path, backend: u16, cipher: Option<&str>, tag: &str) -> (Vec<ChildGuard>, u16) {
    let d = dir.join(format!("ssh-{tag}"));
    std::fs::create_dir_all(&d).unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    for k in ["host", "client"] {
        sh(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(k)));
    }
    std::fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
    let (sshd_port, fwd_port) = (free_port(), free_port());
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {h}\nPidFile {p}\n\
             AuthorizedKeysFile {a}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n\
             AllowTcpForwarding yes\nMaxStartups 100\nLogLevel ERROR\n",
            h = d.join("host").display(),
            p = d.join("sshd.pid").display(),
            a = d.join("authorized_keys").display(),
        ),
    )
    .unwrap();
    let mut sshd = Command::new("/usr/sbin/sshd");
    sshd.args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let sshd = spawn_cmd(sshd);
    wait_listen(sshd_port);
    let mut ssh = Command::new("ssh");
    ssh.args(["-F", "/dev/null", "-N", "-T"])
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ControlMaster=no",
        ])
        .args(["-o", "ControlPath=none", "-o", "ExitOnForwardFailure=yes"])
        .args(["-o", "LogLevel=ERROR", "-i"])
        .arg(d.join("client"))
        .args(["-p", &sshd_port.to_string()])
        .args(["-R", &format!("127.0.0.1:{fwd_port}:127.0.0.1:{backend}")]);
    if let Some(c) = cipher {
        ssh.args(["-c", c]);
    }
    ssh.arg(format!("{user}@127.0.0.1"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let ssh = spawn_cmd(ssh);
    wait_listen(fwd_port);
    (vec![sshd, ssh], fwd_port)
}

fn rathole_bin() -> Option<PathBuf> {
    let p = std::env::var_os("RATHOLE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/bin/rathole")
        });
    p.exists().then_some(p)
}

/// A rathole Noise key pair, from `rathole --genkey` (private, public).
fn rathole_keys(bin: &Path) -> (String, String) {
    let out = Command::new(bin).arg("--genkey").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "Private Key:\n<base64>\n\nPublic Key:\n<base64>"
    let keys: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.ends_with(':'))
        .collect();
    assert_eq!(keys.len(), 2, "rathole --genkey printed {text:?}");
    (keys[0].to_string(), keys[1].to_string())
}

/// The Noise pattern of the encrypted rathole row: AES-GCM, the AEAD our
/// agent link negotiates, so both pay for the same cipher.
const RATHOLE_NOISE: &str = "Noise_NK_25519_AESGCM_SHA256";

/// rathole server (the public side) and client (beside the backend), TCP
/// transport, or Noise over TCP when `noise` holds a key pair; configs
/// written here.
fn start_rathole(
    bin: &Path,
    dir: &Path,
    backend: u16,
    noise: Option<(String, String)>,
) -> (Vec<ChildGuard>, u16) {
    let (ctl, fwd) = (free_port(), free_port());
    let s = dir.join("rathole-server.toml");
    let c = dir.join("rathole-client.toml");
    let (server_transport, client_transport) = match &noise {
        None => (String::new(), String::new()),
        Some((private, public)) => (
            format!(
                "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\n\
                 pattern = \"{RATHOLE_NOISE}\"\nlocal_private_key = \"{private}\"\n\n"
            ),
            format!(
                "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\n\
                 pattern = \"{RATHOLE_NOISE}\"\nremote_public_key = \"{public}\"\n\n"
            ),
        ),
    };
    std::fs::write(
        &s,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{ctl}\"\n\n{server_transport}[server.services.bench]\n\
             token = \"bench-token\"\nbind_addr = \"127.0.0.1:{fwd}\"\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &c,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{ctl}\"\n\n{client_transport}[client.services.bench]\n\
             token = \"bench-token\"\nlocal_addr = \"127.0.0.1:{backend}\"\n"
        ),
    )
    .unwrap();
    let run = |flag: &str, cfg: &Path| {
        let mut cmd = Command::new(bin);
        cmd.arg(flag)
            .arg(cfg)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        spawn_cmd(cmd)
    };
    let server = run("-s", &s);
    wait_listen(ctl);
    let client = run("-c", &c);
    wait_listen(fwd);
    (vec![server, client], fwd)
}

/// Our server and agent processes, and the two ways in.
struct Ours {
    server: ChildGuard,
    agent: ChildGuard,
    http: Via,
    grpc: Via,
}

impl Ours {
    fn start(dir: &Path, tag: &str) -> Ours {
        Ours::start_links(dir, tag, None)
    }

    /// With `links`, the agent keeps that many links to each server
    /// (`--links-per-server`); None: BENCH_LINKS or the default.
    fn start_links(dir: &Path, tag: &str, links: Option<usize>) -> Ours {
        let agent_port = free_port();
        let http_uds = dir.join(format!("http-{tag}.sock"));
        let grpc_uds = dir.join(format!("grpc-{tag}.sock"));
        let d = dir.display().to_string();
        let server = spawn_role(
            "server",
            &[
                d.clone(),
                http_uds.display().to_string(),
                agent_port.to_string(),
                grpc_uds.display().to_string(),
            ],
        );
        wait_listen(agent_port);
        let env: Vec<_> = links
            .map(|n| ("BENCH_LINKS", n.to_string()))
            .into_iter()
            .collect();
        let agent = spawn_role_env("agent", &[d, agent_port.to_string()], &env);
        Ours {
            server,
            agent,
            http: Via::Connect(ProxyAddr::Uds(http_uds)),
            grpc: Via::Grpc(ProxyAddr::Uds(grpc_uds)),
        }
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.server.0.id(), self.agent.0.id()]
    }
}

async fn wait_ready(via: &Via, backend: SocketAddr) {
    roles::wait_until("path", Duration::from_secs(30), || async {
        one_dial(via, backend).await.is_ok()
    })
    .await;
}

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The CPU's model name, so runs on different hosts are told apart: the
/// ratios to the floor move with the host, not only with the code.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

struct Row {
    name: String,
    t1: f64,
    t16: f64,
    /// One stream's upload, outside the CPU per GiB window.
    up: f64,
    dps: f64,
    p50: f64,
    p99: f64,
    kib_per_conn: Option<f64>,
    idle_n: usize,
    /// Tunnel processes' CPU per GiB over both throughput rows, and per
    /// dial over the dials/s row (None for direct).
    cpu_ms_gib: Option<f64>,
    /// The same during the upload row.
    cpu_ms_gib_up: Option<f64>,
    cpu_us_dial: Option<f64>,
    /// This process's CPU per GiB over the throughput rows: the client
    /// (a gRPC decoder for the gRPC rows, a bare socket for the others).
    client_ms_gib: f64,
}

/// CPU seconds this process has used (every thread).
fn self_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
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
    let nofile = raise_nofile();
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let mib: u64 = env_or("BENCH_MIB", if quick { 32 } else { 1024 });
    let dials: u64 = env_or("BENCH_DIALS", if quick { 300 } else { 4000 });
    let rounds: usize = env_or("BENCH_ROUNDS", if quick { 500 } else { 5000 });
    let idle_n: usize = env_or("BENCH_IDLE", if quick { 500 } else { 10_000 });
    let soak: u64 = env_or("BENCH_SOAK", 0);
    let paired_rounds: usize = env_or("BENCH_PAIRED_ROUNDS", if quick { 2 } else { 8 });
    let peers: Vec<String> = std::env::var("BENCH_PEERS")
        .unwrap_or_else(|_| {
            "direct,floor,http,grpc,upstream-http,upstream-grpc,ssh,ssh-gcm,rathole,rathole-noise"
                .into()
        })
        .split(',')
        .map(str::to_string)
        .collect();
    let want = |p: &str| peers.iter().any(|x| x == p);

    let dir = tempfile::tempdir().unwrap();
    let backend_port = free_port();
    let backend_proc = spawn_role("backend", &[backend_port.to_string()]);
    let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
    wait_listen(backend_port);
    let echo_port = free_port();
    let echo_proc = spawn_role("http-echo", &[echo_port.to_string()]);
    wait_listen(echo_port);
    let echo_pid = echo_proc.0.id();
    // konnectivity-client's dials/s and dial p50/p99 per gRPC-over-UDS
    // server, measured right after that server's row.
    let mut konn: Vec<(String, KonnDials)> = Vec::new();

    // Our tunnel: server and agent processes (a fresh pair per row, so no
    // row reuses memory another row freed).
    konnectivity::certs::write_make_certs(dir.path(), "127.0.0.1").unwrap();
    let ours = Ours::start(dir.path(), "a");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    if soak > 0 {
        let via = if std::env::var("BENCH_SOAK_VIA").is_ok_and(|v| v == "grpc") {
            &ours.grpc
        } else {
            &ours.http
        };
        rt.block_on(async {
            wait_ready(via, backend).await;
            soak_run(via, backend, soak, ours.server.0.id(), ours.agent.0.id()).await;
        });
        return;
    }

    // BENCH_PAIRED_ONLY=1: only the side-by-side rows.
    let paired_only = std::env::var("BENCH_PAIRED_ONLY").is_ok_and(|v| v == "1");
    let row_wanted = |k: &str| !paired_only && want(k);
    let load_before = loadavg();
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    // BENCH_STALLED=N: after each tunnel's row, N tunnels whose client
    // stops reading (see `stalled`).
    let stalled_n: usize = env_or("BENCH_STALLED", 0);
    let stalled_rows = std::cell::RefCell::new(Vec::<String>::new());
    let mut measure = |name: &str, via: Via, roots: Vec<u32>, idle: usize| {
        eprintln!("bench: {name} ...");
        let row = rt.block_on(async {
            wait_ready(&via, backend).await;
            // First, on processes that have moved no data yet: after the
            // throughput rows a heap keeps what they freed (glibc keeps up
            // to 64 MiB here, Go's until its scavenger runs), and idle
            // connections built in it look cheaper than they are.
            let kib_per_conn = if roots.is_empty() {
                None
            } else {
                Some(idle_rss(&via, backend, idle, &roots).await)
            };
            let bytes = mib << 20;
            let c0 = cpu_of(&roots);
            let perf = perf_record(name, &roots);
            let s0 = self_cpu();
            let t1 = throughput(&via, backend, bytes, 1).await;
            drop(perf);
            let perf = perf_record(&format!("{name}-16x"), &roots);
            let t16 = throughput(&via, backend, bytes, 16).await;
            let s1 = self_cpu();
            drop(perf);
            let c1 = cpu_of(&roots);
            let perf = perf_record(&format!("{name}-dials"), &roots);
            let dps = dials_per_sec(&via, backend, dials, 16).await;
            drop(perf);
            let c2 = cpu_of(&roots);
            let perf = perf_record(&format!("{name}-up"), &roots);
            let up = upload(&via, backend, bytes).await;
            drop(perf);
            let c3 = cpu_of(&roots);
            let tunnelled = !roots.is_empty();
            let cpu_ms_gib = tunnelled.then(|| (c1 - c0) * 1000.0 / (2.0 * mib as f64 / 1024.0));
            let cpu_ms_gib_up = tunnelled.then(|| (c3 - c2) * 1000.0 / (mib as f64 / 1024.0));
            let cpu_us_dial = tunnelled.then(|| (c2 - c1) * 1e6 / dials as f64);
            let client_ms_gib = (s1 - s0) * 1000.0 / (2.0 * mib as f64 / 1024.0);
            let (p50, p99) = latency(&via, backend, rounds).await;
            if stalled_n > 0 && tunnelled {
                let (opened, kib, probe) = stalled(&via, backend, stalled_n, &roots).await;
                stalled_rows.borrow_mut().push(format!(
                    "  {name:<28} {opened:>4} of {stalled_n} opened, {kib:>8.0} KiB each, new dial beside them: {probe}"
                ));
            }
            Row {
                name: name.into(),
                t1,
                t16,
                up,
                dps,
                p50,
                p99,
                kib_per_conn,
                idle_n: idle,
                cpu_ms_gib,
                cpu_ms_gib_up,
                cpu_us_dial,
                client_ms_gib,
            }
        });
        rows.push(row);
    };
    if row_wanted("direct") {
        measure("direct TCP", Via::Tcp(backend), vec![], 0);
    }
    if row_wanted("floor") {
        let (procs, tls) = start_floor(dir.path(), backend_port);
        let roots = procs.iter().map(|c| c.0.id()).collect();
        // Each idle floor connection is a TLS handshake between the relays;
        // 10,000 of them at once got connections reset here. The floor
        // bounds throughput only, so its idle row is smaller.
        let cap = idle_n.min(FLOOR_IDLE);
        if cap < idle_n {
            notes.push(format!(
                "TLS floor idle row at {cap} connections: the relays reset connections when 10,000 handshake at once"
            ));
        }
        measure("TLS floor (UDS, 2 relays)", Via::Uds(tls), roots, cap);
        drop(procs);
    }
    if row_wanted("http") {
        measure(
            "ours, HTTP-CONNECT (UDS)",
            ours.http.clone(),
            ours.pids(),
            idle_n,
        );
    }
    drop(ours);
    if row_wanted("grpc") {
        let fresh = Ours::start(dir.path(), "b");
        measure("ours, gRPC (UDS)", fresh.grpc.clone(), fresh.pids(), idle_n);
        if let (Some(go), Via::Grpc(ProxyAddr::Uds(uds))) = (go_peers(), &fresh.grpc) {
            konn.push((
                "ours, gRPC (UDS)".into(),
                konn_dials(&go, uds, echo_port, dials, &fresh.pids(), echo_pid),
            ));
        }
    }
    // Upstream: one server per frontend mode (it serves one), each with its
    // agent, both frontends on unix sockets; the same Rust client as ours.
    for (key, mode, name) in [
        (
            "upstream-http",
            "http-connect",
            "upstream, HTTP-CONNECT (UDS)",
        ),
        ("upstream-grpc", "grpc", "upstream, gRPC (UDS)"),
    ] {
        if !row_wanted(key) {
            continue;
        }
        let Some(go) = go_peers() else {
            notes.push(format!(
                "{name} skipped: target/go-peers missing (scripts/install-deps.sh)"
            ));
            continue;
        };
        let (procs, uds) = start_upstream(&go, dir.path(), mode);
        let roots = procs.iter().map(|c| c.0.id()).collect();
        let via = if mode == "grpc" {
            Via::Grpc(ProxyAddr::Uds(uds.clone()))
        } else {
            Via::Connect(ProxyAddr::Uds(uds.clone()))
        };
        measure(name, via, roots, idle_n);
        if mode == "grpc" {
            konn.push((
                name.into(),
                konn_dials(&go, &uds, echo_port, dials, &roots_of(&procs), echo_pid),
            ));
        }
        drop(procs);
    }
    if row_wanted("ssh") || row_wanted("ssh-gcm") {
        if Path::new("/usr/sbin/sshd").exists() {
            for (tag, cipher) in [("ssh", None), ("ssh-gcm", Some("aes128-gcm@openssh.com"))] {
                if !row_wanted(tag) {
                    continue;
                }
                let (procs, port) = start_ssh(dir.path(), backend_port, cipher, tag);
                let roots = procs.iter().map(|c| c.0.id()).collect();
                let name = match cipher {
                    None => "ssh -R (default cipher)".to_string(),
                    Some(c) => format!("ssh -R ({})", c.split('@').next().unwrap()),
                };
                measure(
                    &name,
                    Via::Tcp(([127, 0, 0, 1], port).into()),
                    roots,
                    idle_n,
                );
                drop(procs);
            }
        } else {
            notes.push(
                "ssh -R skipped: /usr/sbin/sshd missing (scripts/install-bench-tools.sh)".into(),
            );
        }
    }
    for (key, name, noise) in [
        ("rathole", "rathole (TCP transport)", false),
        ("rathole-noise", "rathole (Noise, AES-GCM)", true),
    ] {
        if !row_wanted(key) {
            continue;
        }
        let Some(bin) = rathole_bin() else {
            notes.push(format!(
                "{name} skipped: not installed (scripts/install-bench-tools.sh)"
            ));
            continue;
        };
        let keys = noise.then(|| rathole_keys(&bin));
        let (procs, port) = start_rathole(&bin, dir.path(), backend_port, keys);
        let roots = procs.iter().map(|c| c.0.id()).collect();
        // rathole's server holds two descriptors per connection (visitor
        // and data channel): keep it under the descriptor limit.
        let cap = ((nofile as usize).saturating_sub(500) / 2).min(idle_n);
        if cap < idle_n {
            notes.push(format!(
                "{name} idle row at {cap} connections: its server needs 2 fds per connection and RLIMIT_NOFILE is {nofile}"
            ));
        }
        measure(name, Via::Tcp(([127, 0, 0, 1], port).into()), roots, cap);
        drop(procs);
    }
    // The rows above run minutes apart, and this host's speed moves by
    // half between them: the goals' two closest calls are also measured
    // side by side, in alternating short rounds on fresh processes.
    let mut paired: Vec<Paired> = Vec::new();
    if paired_rounds > 0 && want("floor") && want("http") {
        let (procs, tls) = start_floor(dir.path(), backend_port);
        let fresh = Ours::start(dir.path(), "p");
        let bytes = (mib << 20) / 4;
        let gib = bytes as f64 / (1u64 << 30) as f64;
        let backend_pid = backend_proc.0.id();
        // Where the CPU went on each side: a gap in CPU per GiB is work
        // done; one without is time the CPUs sat idle.
        for (column, up, streams) in [("1x", false, 1), ("16x", false, 16), ("up", true, 1)] {
            let cpu = SidesCpu::new(fresh.pids(), roots_of(&procs), backend_pid);
            let mut row = rt.block_on(side_by_side(
                format!(
                    "{column} MiB/s, {paired_rounds} rounds of {} MiB",
                    bytes >> 20
                ),
                paired_rounds,
                backend,
                ("ours, HTTP-CONNECT (UDS)", fresh.http.clone()),
                ("TLS floor (UDS, 2 relays)", Via::Uds(tls.clone())),
                0.9,
                |side, via| {
                    cpu.count(side, gib, async move {
                        if up {
                            upload(&via, backend, bytes).await
                        } else {
                            throughput(&via, backend, bytes, streams).await
                        }
                    })
                },
            ));
            row.notes = cpu.notes(CpuUnit::GiB);
            paired.push(row);
        }
        drop(fresh);
        // The same sixteen streams with the agent keeping one link, as
        // upstream's does (one TLS stream, encrypted and decrypted by one
        // task at each end), or two when BENCH_LINKS=1 made one the rest's.
        let other_links = if roles::links_override() == Some(1) {
            2
        } else {
            1
        };
        let two = Ours::start_links(dir.path(), "p2", Some(other_links));
        // Every link up before the first round (the agent dials the second
        // within tens of ms of the first).
        std::thread::sleep(Duration::from_millis(500));
        let cpu = SidesCpu::new(two.pids(), roots_of(&procs), backend_pid);
        let mut row = rt.block_on(side_by_side(
            format!(
                "16x MiB/s, --links-per-server={other_links}, {paired_rounds} rounds of {} MiB",
                bytes >> 20
            ),
            paired_rounds,
            backend,
            (
                if other_links == 1 {
                    "ours, HTTP-CONNECT (UDS), 1 link"
                } else {
                    "ours, HTTP-CONNECT (UDS), 2 links"
                },
                two.http.clone(),
            ),
            ("TLS floor (UDS, 2 relays)", Via::Uds(tls.clone())),
            0.9,
            |side, via| {
                cpu.count(side, gib, async move {
                    throughput(&via, backend, bytes, 16).await
                })
            },
        ));
        row.notes = cpu.notes(CpuUnit::GiB);
        paired.push(row);
        drop(two);
        drop(procs);
    }
    // Dials side by side for each frontend (upstream serves one mode per
    // server): HTTP-CONNECT with curl-style CONNECTs, gRPC with our gRPC
    // client (one tunnel per dial, on a fresh HTTP/2 connection).
    for (ours_key, upstream_key, mode, name, upstream_name) in [
        (
            "http",
            "upstream-http",
            "http-connect",
            "ours, HTTP-CONNECT (UDS)",
            "upstream, HTTP-CONNECT (UDS)",
        ),
        (
            "grpc",
            "upstream-grpc",
            "grpc",
            "ours, gRPC (UDS)",
            "upstream, gRPC (UDS)",
        ),
    ] {
        let (true, true, Some(go)) = (
            paired_rounds > 0 && want(ours_key),
            want(upstream_key),
            go_peers(),
        ) else {
            continue;
        };
        let fresh = Ours::start(dir.path(), &format!("q-{mode}"));
        let (procs, uds) = start_upstream(&go, dir.path(), mode);
        let (ours_via, upstream_via) = if mode == "grpc" {
            (fresh.grpc.clone(), Via::Grpc(ProxyAddr::Uds(uds)))
        } else {
            (fresh.http.clone(), Via::Connect(ProxyAddr::Uds(uds)))
        };
        let n = (dials / 2).max(100);
        let cpu = SidesCpu::new(fresh.pids(), roots_of(&procs), backend_proc.0.id());
        let mut row = rt.block_on(side_by_side(
            format!("{mode} dials/s, {paired_rounds} rounds of {n} dials"),
            paired_rounds,
            backend,
            (name, ours_via),
            (upstream_name, upstream_via),
            2.0,
            |side, via| {
                cpu.count(side, n as f64, async move {
                    dials_per_sec(&via, backend, n, 16).await
                })
            },
        ));
        row.notes = cpu.notes(CpuUnit::Dial);
        paired.push(row);
        drop(fresh);
        drop(procs);
    }
    drop(backend_proc);
    drop(echo_proc);

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!(
        "tunnel vs peers ({cpus} CPUs of {}, loopback, load average before {load_before}, after {}; {mib} MiB per throughput row, {dials} dials x16 workers, {rounds} echo rounds; RLIMIT_NOFILE {nofile})",
        cpu_model(),
        loadavg()
    );
    println!(
        "{:<28} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>14} {:>10} {:>9} {:>11} {:>13}",
        "path",
        "1x MiB/s",
        "16x MiB/s",
        "up MiB/s",
        "dials/s",
        "+p50 us",
        "+p99 us",
        "KiB/idle conn",
        "cpu ms/GiB",
        "up ms/GiB",
        "cpu us/dial",
        "client ms/GiB"
    );
    let direct = rows
        .iter()
        .find(|r| r.name == "direct TCP")
        .map(|r| (r.p50, r.p99));
    let (d50, d99) = direct.unwrap_or((0.0, 0.0));
    for r in &rows {
        let mem = match r.kib_per_conn {
            Some(k) => format!("{k:.1} @{}", r.idle_n),
            None => "-".into(),
        };
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "{:<28} {:>9.0} {:>10.0} {:>9.0} {:>9.0} {:>9.1} {:>9.1} {:>14} {:>10} {:>9} {:>11} {:>13.0}",
            r.name,
            r.t1,
            r.t16,
            r.up,
            r.dps,
            r.p50 - d50,
            r.p99 - d99,
            mem,
            opt(r.cpu_ms_gib),
            opt(r.cpu_ms_gib_up),
            opt(r.cpu_us_dial),
            r.client_ms_gib
        );
    }
    let find = |p: &str| rows.iter().find(|r| r.name.starts_with(p));
    println!(
        "  (cpu, up: the tunnel's processes, during the 1x and 16x rows and during the upload row; client ms/GiB: this process, the client both throughput rows read with)"
    );
    println!();
    println!("ratios (higher is better for ours except memory, where lower is better):");
    for ours_name in ["ours, HTTP-CONNECT", "ours, gRPC"] {
        let Some(o) = find(ours_name) else { continue };
        let upstream = if ours_name.contains("gRPC") {
            "upstream, gRPC"
        } else {
            "upstream, HTTP-CONNECT"
        };
        if let Some(u) = find(upstream) {
            let mem = match (o.kib_per_conn, u.kib_per_conn) {
                (Some(a), Some(b)) if b > 0.0 => a / b,
                _ => f64::NAN,
            };
            let cpu = match (o.cpu_ms_gib, u.cpu_ms_gib) {
                (Some(a), Some(b)) if b > 0.0 => a / b,
                _ => f64::NAN,
            };
            let cpu_dial = match (o.cpu_us_dial, u.cpu_us_dial) {
                (Some(a), Some(b)) if b > 0.0 => a / b,
                _ => f64::NAN,
            };
            println!(
                "  {:<24} / {:<22} cpu/GiB {:>10} cpu/dial {:>5.2}",
                o.name,
                u.name,
                judged(cpu, Goal::AtMost(0.5)),
                cpu_dial
            );
            println!(
                "  {:<24} / {:<22} 1x {:>10} 16x {:>10} up {:>10} dials {:>10} mem {:>10} (goals: >= 1.5x throughput, >= 2x dials/s, <= 0.25x memory, <= 0.5x cpu/GiB)",
                o.name,
                u.name,
                judged(o.t1 / u.t1, Goal::AtLeast(1.5)),
                judged(o.t16 / u.t16, Goal::AtLeast(1.5)),
                judged(o.up / u.up, Goal::AtLeast(1.5)),
                judged(o.dps / u.dps, Goal::AtLeast(2.0)),
                judged(mem, Goal::AtMost(0.25)),
            );
        }
        if let Some(f) = find("TLS floor") {
            println!(
                "  {:<24} / {:<22} 1x {:>10} 16x {:>10} up {:>10} (goal >= 0.9x the floor)",
                o.name,
                f.name,
                judged(o.t1 / f.t1, Goal::AtLeast(0.9)),
                judged(o.t16 / f.t16, Goal::AtLeast(0.9)),
                judged(o.up / f.up, Goal::AtLeast(0.9)),
            );
        }
        for (peer, goal) in [
            ("ssh -R (default", 2.0),
            ("ssh -R (aes128", 2.0),
            ("rathole (TCP", 1.0),
            ("rathole (Noise", 1.0),
        ] {
            let Some(p) = find(peer) else { continue };
            let mem = match (o.kib_per_conn, p.kib_per_conn) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            };
            println!(
                "  {:<24} / {:<22} 1x {:>10} 16x {:>10} dials {:>10} mem {:>5} (goal >= {goal}x; mem <= 1 vs rathole)",
                o.name,
                p.name,
                judged(o.t1 / p.t1, Goal::AtLeast(goal)),
                judged(o.t16 / p.t16, Goal::AtLeast(goal)),
                judged(o.dps / p.dps, Goal::AtLeast(goal)),
                mem
            );
        }
    }
    if !konn.is_empty() {
        println!();
        println!(
            "konnectivity-client (kube-apiserver's dialler: one tunnel per dial over UDS, 16 at a time, 1 KiB echoed): {dials} dials"
        );
        println!(
            "{:<28} {:>9} {:>12} {:>12} {:>10} {:>11} {:>10} {:>6} {:>8}",
            "path",
            "dials/s",
            "dial p50 ms",
            "dial p99 ms",
            "client us",
            "backend us",
            "tunnel us",
            "util",
            "machine"
        );
        for (name, r) in &konn {
            match r {
                Ok(k) => println!(
                    "{name:<28} {:>9.0} {:>12.2} {:>12.2} {:>10.0} {:>11.0} {:>10.0} {:>5.0}% {:>7.0}%",
                    k.dps,
                    k.p50_ms,
                    k.p99_ms,
                    k.client_us,
                    k.backend_us,
                    k.tunnel_us,
                    k.util * 100.0,
                    k.machine_util * 100.0
                ),
                Err(e) => println!("{name:<28} failed: {e}"),
            }
        }
        println!(
            "  (CPU per dial: client = konn-client itself, backend = the echo server, tunnel = server + agent; util = their CPU / (wall x {cpus} CPUs); machine = every process, other tenants too)"
        );
        if let [(_, Ok(o)), (_, Ok(u))] = &konn[..] {
            let ratio = o.dps / u.dps;
            println!(
                "  ours / upstream: dials/s {} (goal >= 2x), p50 {:.2}, p99 {:.2}, tunnel CPU per dial {:.2}",
                judged(ratio, Goal::AtLeast(2.0)),
                o.p50_ms / u.p50_ms,
                o.p99_ms / u.p99_ms,
                o.tunnel_us / u.tunnel_us
            );
            let ceiling = zero_cpu_ceiling(u.client_us, u.backend_us, u.tunnel_us);
            println!(
                "  ceiling for ours/upstream with this client on {cpus} CPUs: {ceiling:.2}x (zero-CPU tunnel; upstream's row: client {:.0} + backend {:.0} + tunnel {:.0} us/dial) vs measured {ratio:.2}x",
                u.client_us, u.backend_us, u.tunnel_us
            );
            // The same model with both rows' own costs: at an equal share
            // of the CPUs, and scaled by the share each row had.
            let equal = (u.client_us + u.backend_us + u.tunnel_us)
                / (o.client_us + o.backend_us + o.tunnel_us);
            let model = equal * (o.util / u.util);
            println!(
                "  CPU model for this pair (sum of CPU per dial): {equal:.2}x at an equal share of the CPUs; {model:.2}x scaled by each row's util; measured {ratio:.2}x"
            );
            let busy = o.machine_util.min(u.machine_util);
            let low = o.util.min(u.util);
            if busy < 0.85 {
                println!(
                    "  caution: the machine was not CPU-bound in one row ({:.0}% / {:.0}% busy, ours / upstream): the dialler's waits set the rate there, so the ceiling does not bound it",
                    o.machine_util * 100.0,
                    u.machine_util * 100.0
                );
            } else if low < 0.85 {
                println!(
                    "  caution: the machine was CPU-bound ({:.0}% / {:.0}% busy) but these processes had {:.0}% / {:.0}% of it: other tenants took the rest, unevenly between the rows, so the measured ratio is off by that share; the CPU model above accounts for it",
                    o.machine_util * 100.0,
                    u.machine_util * 100.0,
                    o.util * 100.0,
                    u.util * 100.0
                );
            } else {
                println!(
                    "  the processes kept {:.0}% / {:.0}% of the CPUs busy (ours / upstream): CPU-bound, so the ceiling holds",
                    o.util * 100.0,
                    u.util * 100.0
                );
            }
        }
    }
    if !paired.is_empty() {
        println!();
        println!(
            "side by side (fresh processes, alternating rounds, same minute; the goals' closest calls):"
        );
        for p in &paired {
            let ratio = p.ours.1 / p.other.1;
            println!(
                "  {}: {} {:.0}, {} {:.0}: {} (goal >= {}x)",
                p.what,
                p.ours.0,
                p.ours.1,
                p.other.0,
                p.other.1,
                judged(ratio, Goal::AtLeast(p.goal)),
                p.goal
            );
            let mut r = p.rounds.clone();
            r.sort_by(f64::total_cmp);
            if let (Some(lo), Some(hi)) = (r.first(), r.last()) {
                println!(
                    "    each round's ratio: {:.2} to {:.2}, median {:.2}",
                    lo,
                    hi,
                    (r[(r.len() - 1) / 2] + r[r.len() / 2]) / 2.0
                );
            }
            for line in &p.notes {
                println!("{line}");
            }
        }
    }
    let stalled_rows = stalled_rows.into_inner();
    if !stalled_rows.is_empty() {
        println!();
        println!(
            "stalled readers (BENCH_STALLED={stalled_n}: tunnels whose client reads nothing while the backend sends; server + agent resident memory per tunnel after 3 s, and a new 1 KiB request/response dial beside them):"
        );
        for line in stalled_rows {
            println!("{line}");
        }
    }
    for n in notes {
        println!("note: {n}");
    }
}

async fn soak_run(via: &Via, backend: SocketAddr, total: u64, server: u32, agent: u32) {
    let budget = Duration::from_secs(env_or("BENCH_SOAK_SECS", 600));
    let workers: u64 = env_or("BENCH_SOAK_WORKERS", 64);
    let step = (total / 40).max(1);
    let sample = |n: u64, t: f64| {
        (
            n,
            t,
            rss_kib(server),
            fd_count(server),
            rss_kib(agent),
            fd_count(agent),
        )
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = sample(0, 0.0);
    let done = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + budget;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (via, done, ok, failed) = (via.clone(), done.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline && done.fetch_add(1, Ordering::Relaxed) < total {
                match one_dial(&via, backend).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let mut samples = vec![base];
    let mut next = step;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
        let finished = tasks.iter().all(|t| t.is_finished());
        if n >= next || finished {
            samples.push(sample(n, start.elapsed().as_secs_f64()));
            while next <= n {
                next += step;
            }
        }
        if finished {
            break;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let closes settle, then the end point.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
    let end = sample(n, start.elapsed().as_secs_f64());
    println!();
    println!(
        "soak: {n} of {total} dials (connect + 1 KiB + 1 KiB + close), {workers} at a time, via HTTP-CONNECT; load average {}",
        loadavg()
    );
    println!(
        "{:>10} {:>8} {:>12} {:>10} {:>12} {:>10}",
        "dials", "secs", "server KiB", "server fd", "agent KiB", "agent fd"
    );
    for s in samples.iter().chain(std::iter::once(&end)) {
        println!(
            "{:>10} {:>8.1} {:>12} {:>10} {:>12} {:>10}",
            s.0, s.1, s.2, s.3, s.4, s.5
        );
    }
    // Warm-up: the first 10% of the dials.
    let warm = samples
        .iter()
        .find(|s| s.0 >= n / 10)
        .copied()
        .unwrap_or(end);
    let after: Vec<_> = samples
        .iter()
        .filter(|s| s.0 >= warm.0)
        .chain([&end])
        .collect();
    let max_s = after.iter().map(|s| s.2).max().unwrap_or(0);
    let max_a = after.iter().map(|s| s.4).max().unwrap_or(0);
    let gs = (max_s as f64 / warm.2 as f64 - 1.0) * 100.0;
    let ga = (max_a as f64 / warm.4 as f64 - 1.0) * 100.0;
    let rate = n as f64 / elapsed;
    let fails = failed.load(Ordering::Relaxed);
    let fds_back = end.3 <= base.3 && end.5 <= base.5;
    println!(
        "rate {rate:.0} dials/s over {elapsed:.0} s; failed dials {fails}; RSS growth after warm-up ({} dials): server {gs:+.1}% agent {ga:+.1}% (peak vs warm); fds baseline server {} agent {} -> end server {} agent {}",
        warm.0, base.3, base.5, end.3, end.5
    );
    if n < total {
        println!(
            "time budget reached: extrapolated {total} dials would take {:.0} s at this rate",
            total as f64 / rate
        );
    }
    let pass = gs < 5.0 && ga < 5.0 && fds_back && fails == 0;
    println!(
        "verdict: {}",
        if pass {
            "PASS (RSS growth < 5%, fds back to baseline, no failed dials)"
        } else {
            "FAIL"
        }
    );
}
