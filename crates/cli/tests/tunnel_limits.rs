//! Listener bounds of proxy-server and proxy-agent under a connection
//! flood, on real processes: both raise a 1024 soft open-file limit to the
//! hard limit at start, their health ports keep at most 128 connections
//! (the rest are closed at once and counted), and a tunnelled request is
//! served while the flood goes on.

mod tunnel_support;

use std::net::TcpStream;
use std::time::Duration;

use tunnel_support::*;

/// The soft and hard "Max open files" of a process.
fn fd_limits(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut nums = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (nums.next().unwrap(), nums.next().unwrap())
}

/// `bin` started with a 1024 soft open-file limit (its hard limit kept).
fn spawn_low_limit(bin_name: &str, args: &[String], dir: &std::path::Path, name: &str) -> Proc {
    let mut a = vec!["--nofile=1024:".to_string(), "--".into(), bin(bin_name)];
    a.extend_from_slice(args);
    Proc::spawn("prlimit", &a, dir, name)
}

fn refused(port: u16, listener: &str) -> f64 {
    let Some((_, body)) = http_get(port, "/metrics") else {
        return -1.0;
    };
    body.lines()
        .filter(|l| l.contains("_connections_refused_total{"))
        .filter(|l| l.contains(&format!("listener=\"{listener}\"")))
        .filter(|l| l.contains("reason=\"connection_cap\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_connection_flood_on_the_health_ports_is_capped_and_tunnels_keep_working() {
    // This test holds a few thousand sockets itself.
    let _ = proxyctl_listen::raise_nofile_limit();
    let backend = HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let ports = Ports::new();
    let server = spawn_low_limit(
        "proxy-server",
        &server_args(&ports, "http-connect"),
        dir.path(),
        "server",
    );
    let agent = spawn_low_limit("proxy-agent", &agent_args(&ports), dir.path(), "agent");
    let st = Stack {
        dir,
        ports,
        server,
        agent,
    };
    st.wait_ready();
    for p in [&st.server, &st.agent] {
        let (soft, hard) = fd_limits(p.pid());
        assert_eq!(soft, hard, "{} kept a soft limit of {soft}", p.name);
        assert!(soft > 1024, "{}", st.logs());
    }
    let (server_fds, agent_fds) = (st.server.fd_count(), st.agent.fd_count());
    let server_rss = st.server.rss_kib();

    // 1,500 idle connections to each health port: more than a 1024 limit.
    let mut flood = Vec::new();
    for port in [st.ports.health, st.ports.agent_health] {
        for _ in 0..1500 {
            flood.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
    }
    // The server's count is read on its admin port, which the flood left
    // alone. The agent's admin port has no /metrics of its own: it
    // redirects to the health port (as upstream's does), which the flood
    // fills, so the agent's count is read once the flood has let go.
    wait_for(
        "the server's refusals to be counted",
        Duration::from_secs(30),
        || refused(st.ports.admin, "health") >= 1500.0 - 128.0,
    );
    let (sfd, afd) = (st.server.fd_count(), st.agent.fd_count());
    assert!(
        sfd <= server_fds + 128 + 8,
        "server holds {sfd} fds (was {server_fds})"
    );
    assert!(
        afd <= agent_fds + 128 + 8,
        "agent holds {afd} fds (was {agent_fds})"
    );
    let rss = st.server.rss_kib();
    assert!(
        rss < server_rss + 64 * 1024,
        "server RSS grew from {server_rss} KiB to {rss} KiB"
    );

    // A tunnelled request is served during the flood.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = st.frontend();
    rt.block_on(async {
        let target = format!("127.0.0.1:{}", backend.port);
        let mut io = konnectivity::client::http_connect(&addr, &target, "t")
            .await
            .unwrap_or_else(|e| panic!("dial during the flood: {e}\n{}", st.logs()));
        let (status, body) = konnectivity::client::http_get(&mut *io, "b", "/success")
            .await
            .unwrap();
        assert_eq!(
            (status, String::from_utf8_lossy(&body).as_ref()),
            (200, "success: hello from the backend")
        );
    });
    drop(flood);
    wait_for("the agent's refusals", Duration::from_secs(30), || {
        refused(st.ports.agent_health, "health") >= 1500.0 - 128.0
    });
}
