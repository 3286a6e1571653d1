//! Several servers: one agent given two server addresses connects to both
//! (upstream needs a load balancer for that), keeps serving through the
//! survivor when one dies, and reconnects when it returns.

mod tunnel_support;

use std::time::Duration;

use tunnel_support::*;

fn start_server(dir: &std::path::Path, p: &Ports, id: &str, name: &str) -> Proc {
    let mut sa = server_args(p, "grpc");
    sa.push(format!("--server-id={id}"));
    sa.push("--server-count=2".into());
    Proc::spawn(&bin("proxy-server"), &sa, dir, name)
}

fn request(dir: &std::path::Path, p: &Ports, backend: u16) -> bool {
    let (ok, out) = test_client_request(dir, p.server, backend);
    ok && out.contains("success: hello")
}

#[test]
fn one_agent_serves_two_servers_given_two_addresses() {
    let backend = HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let (p1, p2) = (Ports::new(), Ports::new());
    let s1 = start_server(dir.path(), &p1, "server-one", "s1");
    let mut s2 = start_server(dir.path(), &p2, "server-two", "s2");
    let mut aa = agent_args(&p1);
    aa.retain(|a| !a.starts_with("--proxy-server-port"));
    aa.push(format!(
        "--proxy-server-host=127.0.0.1:{},127.0.0.1:{}",
        p1.agent, p2.agent
    ));
    aa.push("--sync-interval=200ms".into());
    let agent = Proc::spawn(&bin("proxy-agent"), &aa, dir.path(), "agent");
    let (l1, l2, la) = (s1.log.clone(), s2.log.clone(), agent.log.clone());
    let logs = move || {
        [&l1, &l2, &la]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    for p in [&p1, &p2] {
        wait_for(
            "both servers have the agent",
            Duration::from_secs(20),
            || http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200),
        );
    }
    // The server counts the agent a moment before the agent has read the
    // response headers and counts the server.
    wait_for("agent counts both servers", Duration::from_secs(20), || {
        metric(
            p1.agent_health,
            "konnectivity_network_proxy_agent_open_server_connections",
        ) == 2.0
    });
    assert_eq!(
        metric(
            p1.agent_health,
            "konnectivity_network_proxy_agent_known_server_count"
        ),
        2.0
    );
    assert!(request(dir.path(), &p1, backend.port), "{}", logs());
    assert!(request(dir.path(), &p2, backend.port), "{}", logs());

    // One server dies: the agent keeps the other and notices the loss.
    s2.kill();
    wait_for(
        "agent dropped the dead server",
        Duration::from_secs(20),
        || {
            metric(
                p1.agent_health,
                "konnectivity_network_proxy_agent_open_server_connections",
            ) == 1.0
        },
    );
    assert!(request(dir.path(), &p1, backend.port), "{}", logs());

    // It comes back: the sync loop reconnects to reach the count again.
    let _s2b = start_server(dir.path(), &p2, "server-two", "s2b");
    wait_for("agent back on both", Duration::from_secs(30), || {
        metric(
            p1.agent_health,
            "konnectivity_network_proxy_agent_open_server_connections",
        ) == 2.0
    });
    assert!(request(dir.path(), &p2, backend.port));
}

/// Upstream's way: one load-balanced address (haproxy, round robin) and
/// `--server-count=2` from the servers' headers; the agent dials the one
/// address again and again until it holds one stream per distinct serverID.
#[test]
fn one_balanced_address_reaches_the_server_count() {
    if !proxyctl_testkit::require_tool("one_balanced_address_reaches_the_server_count", "haproxy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let (p1, p2) = (Ports::new(), Ports::new());
    let _s1 = start_server(dir.path(), &p1, "server-one", "s1");
    let _s2 = start_server(dir.path(), &p2, "server-two", "s2");
    let (_lb, lb_port) = haproxy(dir.path(), &[p1, p2]);
    let mut aa = agent_args(&p1);
    aa.retain(|a| !a.starts_with("--proxy-server-port"));
    aa.push(format!("--proxy-server-port={lb_port}"));
    aa.push("--sync-interval=200ms".into());
    let agent = Proc::spawn(&bin("proxy-agent"), &aa, dir.path(), "agent");
    wait_for("agent holds both servers", Duration::from_secs(30), || {
        metric(
            p1.agent_health,
            "konnectivity_network_proxy_agent_open_server_connections",
        ) == 2.0
    });
    for p in [&p1, &p2] {
        assert_eq!(
            http_get(p.health, "/readyz").map(|r| r.0),
            Some(200),
            "{}",
            agent.log_text()
        );
    }
}
