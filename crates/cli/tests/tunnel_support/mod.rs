//! Shared by the tunnel tests: real proxy-server / proxy-agent processes
//! with real certificates from `proxyctl certs`, loopback only, ports
//! chosen free per test, everything killed and removed by Drop guards.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use konnectivity::client::ProxyAddr;

pub mod fake_api;
pub mod relay;

/// A port no one listens on, from below the ephemeral range and claimed
/// against other test processes (see `proxyctl_testkit::free_port`).
pub use proxyctl_testkit::free_port;

/// A child process killed (SIGKILL) and reaped on drop, and by the kernel
/// when the test process dies; output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    // Its log is printed when a wait of this test's thread fails; none
    // once the test has stopped it or seen it exit.
    watch: std::sync::Mutex<Option<proxyctl_testkit::process::WatchGuard>>,
}

impl Proc {
    pub fn spawn(bin: &str, args: &[String], dir: &Path, name: &str) -> Proc {
        Self::spawn_env(bin, args, &[], dir, name)
    }
    /// As [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(
        bin: &str,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
        name: &str,
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // Killed by the kernel if this test process aborts.
        let child =
            proxyctl_testkit::spawn_tied(&mut cmd).unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let watch = proxyctl_testkit::watch_log(name, &log, Some(child.id()));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
            watch: std::sync::Mutex::new(Some(watch)),
        }
    }
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    /// Sends `sig`; after SIGINT, SIGKILL or SIGTERM the test expects the
    /// exit, so waits no longer fail on it.
    pub fn signal(&self, sig: i32) {
        if matches!(sig, 2 | 9 | SIGTERM) {
            self.unwatch();
        }
        unsafe {
            libc_kill(self.pid(), sig);
        }
    }
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Waits for exit (up to `limit`); returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.unwatch();
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }
    fn unwatch(&self) {
        *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    pub fn kill(&mut self) {
        self.unwatch();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
pub const SIGTERM: i32 = 15;

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn bin(name: &str) -> String {
    match name {
        "proxy-server" => env!("CARGO_BIN_EXE_proxy-server").into(),
        "proxy-agent" => env!("CARGO_BIN_EXE_proxy-agent").into(),
        "proxy-test-client" => env!("CARGO_BIN_EXE_proxy-test-client").into(),
        "proxyctl" => env!("CARGO_BIN_EXE_proxyctl").into(),
        other => panic!("unknown binary {other}"),
    }
}

/// `proxyctl certs --out dir`.
pub fn make_certs(dir: &Path) {
    let out = Command::new(bin("proxyctl"))
        .args(["certs", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "proxyctl certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small HTTP/1.1 server on 127.0.0.1 (thread per connection):
/// `/success` answers "success: <path>"; `/echo` streams back what it gets
/// after the head; `/bytes/N` sends N bytes of a fixed pattern; `/hold/N`
/// sends them and then holds the connection, idle, until the client ends it.
/// Any request is answered with `Connection: close`.
pub struct HttpServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    pub open: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

impl HttpServer {
    pub fn start() -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let (s2, o2) = (stop.clone(), open.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let o3 = o2.clone();
                o3.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = serve_http(&mut conn);
                    o3.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        HttpServer {
            port,
            stop,
            open,
            thread: Some(thread),
        }
    }
    /// Its address, as a tunnel dials it.
    pub fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn serve_http(conn: &mut TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut b)? == 0 {
            return Ok(());
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    if path == "/echo" {
        conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            conn.write_all(&buf[..n])?;
        }
    }
    let hold = path.starts_with("/hold/");
    let body = if let Some(n) = path
        .strip_prefix("/bytes/")
        .or_else(|| path.strip_prefix("/hold/"))
    {
        pattern(n.parse().unwrap_or(0))
    } else if path == "/success" {
        b"success: hello from the backend".to_vec()
    } else {
        conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    };
    conn.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )?;
    conn.write_all(&body)?;
    if hold {
        while conn.read(&mut b)? > 0 {}
    }
    Ok(())
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// GET over plain HTTP on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `f` until it holds; fails with the logs of the processes this
/// test started, at once if one of them has exited.
pub fn wait_for(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    proxyctl_testkit::wait_until(what, limit, f)
}

/// True when a process failed because a port it was given was taken
/// between the test choosing it and the process binding it.
pub fn lost_port_race(p: &mut Proc) -> bool {
    !p.alive() && p.log_text().contains("in use")
}

/// Sum of a metric's samples (any labels) from a /metrics page.
pub fn metric(port: u16, name: &str) -> f64 {
    let Some((_, body)) = http_get(port, "/metrics") else {
        return -1.0;
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Ports of one server + agent pair.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub server: u16,
    pub agent: u16,
    pub health: u16,
    pub admin: u16,
    pub agent_health: u16,
    pub agent_admin: u16,
}

impl Ports {
    pub fn new() -> Ports {
        Ports {
            server: free_port(),
            agent: free_port(),
            health: free_port(),
            admin: free_port(),
            agent_health: free_port(),
            agent_admin: free_port(),
        }
    }
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// README's server flags plus our ports.
pub fn server_args(p: &Ports, mode: &str) -> Vec<String> {
    let mut a = s(&[
        "--server-ca-cert=certs/master/issued/ca.crt",
        "--server-cert=certs/master/issued/proxy-master.crt",
        "--server-key=certs/master/private/proxy-master.key",
        "--cluster-ca-cert=certs/agent/issued/ca.crt",
        "--cluster-cert=certs/agent/issued/proxy-master.crt",
        "--cluster-key=certs/agent/private/proxy-master.key",
    ]);
    a.push(format!("--mode={mode}"));
    a.extend(port_args(p));
    a
}

pub fn port_args(p: &Ports) -> Vec<String> {
    vec![
        format!("--server-port={}", p.server),
        format!("--agent-port={}", p.agent),
        format!("--health-port={}", p.health),
        format!("--admin-port={}", p.admin),
    ]
}

pub fn agent_args(p: &Ports) -> Vec<String> {
    let mut a = s(&[
        "--ca-cert=certs/agent/issued/ca.crt",
        "--agent-cert=certs/agent/issued/proxy-agent.crt",
        "--agent-key=certs/agent/private/proxy-agent.key",
    ]);
    a.push(format!("--proxy-server-port={}", p.agent));
    a.push(format!("--health-server-port={}", p.agent_health));
    a.push(format!("--admin-server-port={}", p.agent_admin));
    // Retry quickly when the agent starts before its server listens.
    a.push("--sync-interval=250ms".into());
    a.push("--sync-interval-cap=2s".into());
    // One link, as upstream's agent keeps: these tests count streams,
    // TokenReviews and descriptors per agent connection. The default's
    // second link is tested where a test passes `--links-per-server`
    // again (the last one counts, as with Go's flags).
    a.push("--links-per-server=1".into());
    a
}

/// haproxy (started here, config in `dir`) on a free loopback port,
/// balancing TCP round robin over the `servers`' agent ports: upstream's HA
/// setup, where agents know one address and find the servers behind it.
/// Returns the process and its port.
pub fn haproxy(dir: &Path, servers: &[Ports]) -> (Proc, u16) {
    let lb_port = free_port();
    let cfg = dir.join("haproxy.cfg");
    let mut text = format!(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
         frontend agents\n  bind 127.0.0.1:{lb_port}\n  default_backend servers\n\
         backend servers\n  balance roundrobin\n"
    );
    for (i, p) in servers.iter().enumerate() {
        text.push_str(&format!("  server s{i} 127.0.0.1:{}\n", p.agent));
    }
    std::fs::write(&cfg, text).unwrap();
    let lb = Proc::spawn(
        "haproxy",
        &["-db".into(), "-f".into(), cfg.display().to_string()],
        dir,
        "haproxy",
    );
    (lb, lb_port)
}

/// A working directory with certificates, a server and an agent.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub ports: Ports,
    pub server: Proc,
    pub agent: Proc,
}

impl Stack {
    pub fn start(mode: &str) -> Stack {
        Self::start_with(mode, &[], &[])
    }
    pub fn start_with(mode: &str, extra_server: &[&str], extra_agent: &[&str]) -> Stack {
        Self::start_custom(mode, extra_server, |ports| {
            let mut aa = agent_args(ports);
            aa.extend(s(extra_agent));
            aa
        })
    }
    /// As [`start_with`](Self::start_with), with the agent's whole command
    /// line made from the ports (called again if the ports are taken).
    pub fn start_custom(
        mode: &str,
        extra_server: &[&str],
        mut agent_line: impl FnMut(&Ports) -> Vec<String>,
    ) -> Stack {
        let mut dir = tempfile::tempdir().unwrap();
        make_certs(dir.path());
        // Ports are chosen before the processes bind them; a process outside
        // this suite may take one in between. Then both start again on
        // fresh ports (a few times at most).
        for attempt in 1.. {
            let ports = Ports::new();
            let mut sa = server_args(&ports, mode);
            // An extra flag given again replaces the default one.
            sa.retain(|a| {
                let name = a.split('=').next().unwrap_or(a);
                !extra_server
                    .iter()
                    .any(|e| e.split('=').next() == Some(name))
            });
            sa.extend(s(extra_server));
            let server = Proc::spawn(&bin("proxy-server"), &sa, dir.path(), "server");
            let aa = agent_line(&ports);
            let agent = Proc::spawn(&bin("proxy-agent"), &aa, dir.path(), "agent");
            let mut st = Stack {
                dir,
                ports,
                server,
                agent,
            };
            let started =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| st.wait_ready()));
            match started {
                Ok(()) => return st,
                Err(_)
                    if attempt < 4
                        && (lost_port_race(&mut st.server) || lost_port_race(&mut st.agent)) =>
                {
                    eprintln!("a port was taken before the server or agent bound it; new ports");
                    let Stack { dir: d, .. } = st;
                    dir = d;
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
        unreachable!()
    }
    pub fn wait_ready(&self) {
        let p = self.ports;
        // Generous: CI shares two cores with other builds and tests.
        wait_for("server /readyz", Duration::from_secs(60), || {
            http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200)
        });
        wait_for("agent /readyz", Duration::from_secs(60), || {
            http_get(p.agent_health, "/readyz").is_some_and(|(s, _)| s == 200)
        });
    }
    pub fn restart_server(&mut self, mode: &str) {
        self.server.kill();
        let sa = server_args(&self.ports, mode);
        self.server = Proc::spawn(&bin("proxy-server"), &sa, self.dir.path(), "server2");
    }
    pub fn restart_agent(&mut self) {
        self.agent.kill();
        let aa = agent_args(&self.ports);
        self.agent = Proc::spawn(&bin("proxy-agent"), &aa, self.dir.path(), "agent2");
    }
    /// The server's mTLS frontend, as the README's client reaches it.
    pub fn frontend(&self) -> ProxyAddr {
        frontend_addr(self.dir.path(), self.ports.server)
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn logs(&self) -> String {
        format!(
            "--- server ---\n{}\n--- agent ---\n{}",
            self.server.log_text(),
            self.agent.log_text()
        )
    }
    /// Waits until both processes are back to `fds` descriptors and the
    /// server has no established connection.
    pub fn wait_settled(&self, server_fds: usize, agent_fds: usize) {
        let p = self.ports;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (sf, af) = (self.server.fd_count(), self.agent.fd_count());
            let est = metric(
                p.health,
                "konnectivity_network_proxy_server_established_connections",
            );
            let open = metric(
                p.agent_health,
                "konnectivity_network_proxy_agent_open_endpoint_connections",
            );
            if sf <= server_fds && af <= agent_fds && est == 0.0 && open == 0.0 {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "leak: server fds {sf} (baseline {server_fds}), agent fds {af} (baseline {agent_fds}), established {est}, agent endpoints {open}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A client TLS config from the `proxyctl certs` tree in `dir`: trusts
/// `certs/<set>/issued/ca.crt` and presents that set's `<name>` certificate
/// ("master", "proxy-client" for the frontend; "agent", "proxy-agent" for
/// the agent port).
pub fn client_tls(dir: &Path, set: &str, name: &str) -> Arc<rustls::ClientConfig> {
    let c = dir.join("certs").join(set);
    konnectivity::tls::client_config(
        &c.join("issued/ca.crt"),
        Some((
            &c.join(format!("issued/{name}.crt")),
            &c.join(format!("private/{name}.key")),
        )),
        &Default::default(),
        &[],
    )
    .unwrap()
}

/// A TLS endpoint on 127.0.0.1.
pub fn tls_addr(port: u16, tls: Arc<rustls::ClientConfig>) -> ProxyAddr {
    ProxyAddr::Tcp {
        host: "127.0.0.1".into(),
        port,
        tls: Some(tls),
    }
}

/// The server's mTLS frontend on `port`, reached with the README's client
/// certificate from `dir`.
pub fn frontend_addr(dir: &Path, port: u16) -> ProxyAddr {
    tls_addr(port, client_tls(dir, "master", "proxy-client"))
}

/// One `proxy-test-client` GET through the server's mTLS frontend with the
/// README's certificate paths, run in `dir` (where `proxyctl certs` wrote
/// them): whether it exited 0, and its stdout then stderr.
pub fn test_client_request(dir: &Path, proxy_port: u16, backend_port: u16) -> (bool, String) {
    let out = Command::new(bin("proxy-test-client"))
        .args([
            "--ca-cert=certs/master/issued/ca.crt",
            "--client-cert=certs/master/issued/proxy-client.crt",
            "--client-key=certs/master/private/proxy-client.key",
            &format!("--proxy-port={proxy_port}"),
            &format!("--request-port={backend_port}"),
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `konnectivity_network_proxy_server_bad_input_total{kind}` of the server
/// whose health port is `health` (-1 when /metrics does not answer).
pub fn bad_input_count(health: u16, kind: &str) -> f64 {
    let Some((_, body)) = http_get(health, "/metrics") else {
        return -1.0;
    };
    body.lines()
        .filter(|l| {
            l.starts_with("konnectivity_network_proxy_server_bad_input_total{")
                && l.contains(&format!("kind=\"{kind}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The tokio runtime the tests drive clients from: two workers, as the CI
/// machine has two CPUs.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
