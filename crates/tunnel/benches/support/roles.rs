//! What both tunnel benches run in their child processes (the bench binary
//! re-executed with `--role=...`): the agent, the server's TLS and launch
//! settings, the backend, and the exit-with-the-parent rule. Also the
//! process facts both read from /proc.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use konnectivity::agent::{self, AgentLaunch, AgentOptions};
use konnectivity::server::{FrontendListen, FrontendMode, ServerLaunch, ServerOptions};
use konnectivity::tls;
use tokio::io::AsyncReadExt;
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

/// The agent listener's mTLS config from `proxyctl certs`' tree.
pub fn agent_listener_tls(certs: &Path) -> Arc<rustls::ServerConfig> {
    let a = certs.join("certs/agent");
    tls::server_config(
        &a.join("issued/proxy-master.crt"),
        &a.join("private/proxy-master.key"),
        Some(&a.join("issued/ca.crt")),
        &Default::default(),
        &[b"h2"],
    )
    .unwrap()
}

/// One server of the bench: defaults, no health or admin ports, long
/// keepalives (nothing idles out mid-run), 5 s agent liveness.
pub fn server_launch(
    agent_tls: &Arc<rustls::ServerConfig>,
    mode: FrontendMode,
    frontend: FrontendListen,
    agent_port: u16,
) -> ServerLaunch {
    ServerLaunch {
        opts: ServerOptions::default(),
        mode,
        frontend,
        agent_addr: SocketAddr::from(([127, 0, 0, 1], agent_port)),
        agent_tls: agent_tls.clone(),
        health_addr: None,
        admin_addr: None,
        agent_keepalive: Duration::from_secs(3600),
        agent_liveness: Duration::from_secs(5),
        frontend_keepalive: Duration::from_secs(3600),
    }
}

/// The agent role: connects to `servers` agent ports from `first_port` on,
/// then lives until the parent goes away.
pub async fn run_agent(certs: &Path, first_port: u16, servers: u16) {
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
    let addrs = (0..servers)
        .map(|i| ("127.0.0.1".to_string(), first_port + i))
        .collect();
    let mut opts = AgentOptions::new(addrs, tls);
    opts.sync_interval = Duration::from_millis(100);
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
