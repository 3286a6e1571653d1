//! HA with three servers and two agents (issue 8, "HA and failures"): real
//! proxy-server / proxy-agent processes on loopback, haproxy started by the
//! test, hash-checked transfers, kill -9 of a server mid-transfer, agent
//! drain, and destHost / defaultRoute routing.

mod tunnel_support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use konnectivity::client::{self, ProxyAddr};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_support::*;

const OPEN_SERVERS: &str = "konnectivity_network_proxy_agent_open_server_connections";
const READY_BACKENDS: &str = "konnectivity_network_proxy_server_ready_backend_connections";
const AGENT_DIALS: &str = "konnectivity_network_proxy_agent_dial_duration_seconds_count";

fn start_server(dir: &Path, p: &Ports, id: &str, extra: &[&str]) -> Proc {
    let mut sa = server_args(p, "grpc");
    sa.push(format!("--server-id={id}"));
    sa.push("--server-count=3".into());
    sa.extend(s(extra));
    Proc::spawn(&bin("proxy-server"), &sa, dir, id)
}

/// An agent with its own health/admin ports (taken from `own`) that dials
/// `hosts` (comma separated host:port list).
fn start_agent(dir: &Path, own: &Ports, hosts: &str, name: &str, extra: &[&str]) -> Proc {
    let mut aa = agent_args(own);
    aa.retain(|a| !a.starts_with("--proxy-server-port"));
    aa.push(format!("--proxy-server-host={hosts}"));
    aa.push(format!("--agent-id={name}"));
    aa.push("--sync-interval=200ms".into());
    aa.extend(s(extra));
    Proc::spawn(&bin("proxy-agent"), &aa, dir, name)
}

fn ready(port: u16) -> Option<u16> {
    http_get(port, "/readyz").map(|r| r.0)
}

fn logs(procs: &[&Proc]) -> String {
    procs
        .iter()
        .map(|p| format!("--- {} ---\n{}", p.name, p.log_text()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Both agents hold all three servers; every server has both agents.
fn wait_full_mesh(servers: &[Ports], agents: &[Ports], procs: &[&Proc]) {
    for a in agents {
        let start = Instant::now();
        while metric(a.agent_health, OPEN_SERVERS) != 3.0 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "agent never held 3 servers\n{}",
                logs(procs)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            metric(
                a.agent_health,
                "konnectivity_network_proxy_agent_known_server_count"
            ),
            3.0
        );
        assert_eq!(ready(a.agent_health), Some(200));
    }
    for p in servers {
        wait_for("server has both agents", Duration::from_secs(30), || {
            metric(p.health, READY_BACKENDS) == 2.0
        });
        assert_eq!(ready(p.health), Some(200));
    }
}

/// Three servers (server-0..2, --server-count=3, each with `extra` flags)
/// in a new directory with certificates.
fn three_servers(extra: &[&str]) -> (tempfile::TempDir, [Ports; 3], Vec<Proc>) {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let sp = [Ports::new(), Ports::new(), Ports::new()];
    let servers = sp
        .iter()
        .enumerate()
        .map(|(i, p)| start_server(dir.path(), p, &format!("server-{i}"), extra))
        .collect();
    (dir, sp, servers)
}

/// Three servers with --server-count=3 behind one haproxy address, and two
/// agents (agent-a, agent-b, each with its `extra` flags) that dial it.
struct BalancedMesh {
    dir: tempfile::TempDir,
    sp: [Ports; 3],
    ap: [Ports; 2],
    servers: Vec<Proc>,
    agents: [Proc; 2],
    lb: Proc,
}

impl BalancedMesh {
    fn start(agent_extra: [&[&str]; 2]) -> BalancedMesh {
        let (dir, sp, servers) = three_servers(&[]);
        let (lb, lb_port) = haproxy(dir.path(), &sp);
        let ap = [Ports::new(), Ports::new()];
        let hosts = format!("127.0.0.1:{lb_port}");
        let agents = [
            start_agent(dir.path(), &ap[0], &hosts, "agent-a", agent_extra[0]),
            start_agent(dir.path(), &ap[1], &hosts, "agent-b", agent_extra[1]),
        ];
        BalancedMesh {
            dir,
            sp,
            ap,
            servers,
            agents,
            lb,
        }
    }

    fn procs(&self) -> Vec<&Proc> {
        let mut all: Vec<&Proc> = self.servers.iter().chain(&self.agents).collect();
        all.push(&self.lb);
        all
    }
}

/// Upstream's HA setup: three servers with --server-count=3 behind one
/// haproxy address; each of two agents dials it until it holds all three.
#[test]
fn two_agents_reach_three_servers_through_haproxy() {
    if !proxyctl_testkit::require_tool("two_agents_reach_three_servers_through_haproxy", "haproxy")
    {
        return;
    }
    let m = BalancedMesh::start([&[], &[]]);
    wait_full_mesh(&m.sp, &m.ap, &m.procs());
}

/// Through one haproxy address, an agent with `--links-per-server=2`
/// dials until it holds two links to each of the three servers (landing
/// on a server it already holds twice closes the new link), beside an
/// agent with one. Each server then holds three streams, and dials through
/// every server work.
#[test]
fn an_agent_with_two_links_reaches_three_servers_through_haproxy() {
    if !proxyctl_testkit::require_tool(
        "an_agent_with_two_links_reaches_three_servers_through_haproxy",
        "haproxy",
    ) {
        return;
    }
    let m = BalancedMesh::start([&["--links-per-server=2"], &[]]);
    let (sp, ap, all) = (&m.sp, &m.ap, m.procs());
    let links = |a: &Ports| {
        metric(
            a.agent_health,
            "konnectivity_network_proxy_agent_server_links",
        )
    };
    let start = Instant::now();
    while links(&ap[0]) != 6.0 || links(&ap[1]) != 3.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "agents never held 6 and 3 links\n{}",
            logs(&all)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(ap[0].agent_health, OPEN_SERVERS), 3.0);
    assert_eq!(metric(ap[1].agent_health, OPEN_SERVERS), 3.0);
    // Three Connect streams on each server (no gRPC client yet), from two
    // agents: the ready backends count agents, as upstream's do.
    for p in sp {
        wait_for("server has three streams", Duration::from_secs(30), || {
            metric(
                p.health,
                "konnectivity_network_proxy_server_grpc_connections",
            ) == 3.0
        });
        assert_eq!(metric(p.health, READY_BACKENDS), 2.0);
    }
    let backend = HttpServer::start();
    let target = backend.target();
    runtime().block_on(async {
        for p in sp {
            let addr = frontend_addr(m.dir.path(), p.server);
            for _ in 0..10 {
                if let Err(e) = dial_once(&addr, &target).await {
                    panic!("dial through {}: {e}\n{}", p.server, logs(&all));
                }
            }
        }
    });
}

struct Mesh {
    dir: tempfile::TempDir,
    sp: [Ports; 3],
    ap: [Ports; 2],
    servers: Vec<Proc>,
    agents: Vec<Proc>,
}

impl Mesh {
    /// Three servers, two agents each given the three addresses directly.
    fn start(server_extra: &[&str], agent_extra: [&[&str]; 2]) -> Mesh {
        let (dir, sp, servers) = three_servers(server_extra);
        let hosts = sp
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.agent))
            .collect::<Vec<_>>()
            .join(",");
        let ap = [Ports::new(), Ports::new()];
        let agents = vec![
            start_agent(dir.path(), &ap[0], &hosts, "agent-a", agent_extra[0]),
            start_agent(dir.path(), &ap[1], &hosts, "agent-b", agent_extra[1]),
        ];
        let m = Mesh {
            dir,
            sp,
            ap,
            servers,
            agents,
        };
        wait_full_mesh(&m.sp, &m.ap, &m.procs());
        m
    }
    fn procs(&self) -> Vec<&Proc> {
        self.servers.iter().chain(self.agents.iter()).collect()
    }
    fn logs(&self) -> String {
        logs(&self.procs())
    }
    fn addr(&self, server: usize) -> ProxyAddr {
        frontend_addr(self.dir.path(), self.sp[server].server)
    }
}

#[test]
fn two_agents_reach_three_servers_given_three_addresses() {
    let _m = Mesh::start(&[], [&[], &[]]);
}

fn payload(seed: u64, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| ((i as u64).wrapping_mul(seed | 1) >> 3) as u8)
        .collect()
}

/// One echo transfer in two halves: the first half is echoed, then the
/// task reports `halfway` and waits for `go` before sending the rest.
async fn gated_echo(
    addr: ProxyAddr,
    backend: String,
    seed: u64,
    size: usize,
    halfway: Arc<tokio::sync::Barrier>,
    go: Arc<tokio::sync::Notify>,
    go_flag: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), String> {
    let data = payload(seed, size);
    let want = Sha256::digest(&data);
    let step = async {
        let channel = client::grpc_channel(&addr)
            .await
            .map_err(|e| e.to_string())?;
        let io = client::grpc_dial(channel, &backend)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(io)
    }
    .await;
    let mut io = match step {
        Ok(io) => io,
        Err(e) => {
            halfway.wait().await;
            return Err(format!("dial: {e}"));
        }
    };
    let head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
    let half = size / 2;
    let first = async {
        io.write_all(b"GET /echo HTTP/1.1\r\nHost: b\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        io.write_all(&data[..half])
            .await
            .map_err(|e| e.to_string())?;
        let mut got = vec![0u8; head.len() + half];
        io.read_exact(&mut got)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if &got[..head.len()] != head {
            return Err("bad echo head".to_string());
        }
        Ok(got[head.len()..].to_vec())
    }
    .await;
    halfway.wait().await;
    let mut got = first?;
    let notified = go.notified();
    if !go_flag.load(std::sync::atomic::Ordering::SeqCst) {
        notified.await;
    }
    let (mut rd, mut wr) = tokio::io::split(io);
    let rest = &data[half..];
    let writer = async {
        for c in rest.chunks(16 * 1024) {
            wr.write_all(c).await.map_err(|e| e.to_string())?;
        }
        // A TLS stream may still hold the last records (see echo_check).
        wr.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let reader = async {
        let mut tail = vec![0u8; rest.len()];
        rd.read_exact(&mut tail)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(tail)
    };
    let (w, r) = tokio::join!(writer, reader);
    w?;
    got.extend(r?);
    if Sha256::digest(&got) != want {
        return Err(format!("hash mismatch on transfer {seed}"));
    }
    Ok(())
}

async fn dial_once(addr: &ProxyAddr, backend: &str) -> Result<(), String> {
    let channel = client::grpc_channel(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut io = client::grpc_dial(channel, backend)
        .await
        .map_err(|e| e.to_string())?;
    io.write_all(b"GET /success HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    io.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&out).contains("success: hello") {
        Ok(())
    } else {
        Err("bad answer".into())
    }
}

#[test]
fn kill_one_of_three_servers_mid_transfer() {
    let backend = HttpServer::start();
    let backend_addr = format!("127.0.0.1:{}", backend.port);
    let mut m = Mesh::start(&[], [&[], &[]]);
    let addrs: Vec<ProxyAddr> = (0..3).map(|i| m.addr(i)).collect();
    let rt = runtime();
    const N: usize = 200;
    let halfway = Arc::new(tokio::sync::Barrier::new(N + 1));
    let go = Arc::new(tokio::sync::Notify::new());
    let go_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..N {
        let fut = gated_echo(
            addrs[i % 3].clone(),
            backend_addr.clone(),
            i as u64 + 1,
            32 * 1024 + i * 97,
            halfway.clone(),
            go.clone(),
            go_flag.clone(),
        );
        tasks.push(rt.spawn(fut));
    }
    // Every transfer is half done (or failed to start): kill server 2.
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), halfway.wait())
            .await
            .expect("transfers never reached halfway")
    });
    let sp = m.sp;
    m.servers[2].signal(9);
    m.servers[2].wait_exit(Duration::from_secs(5));
    let killed_at = Instant::now();
    go_flag.store(true, std::sync::atomic::Ordering::SeqCst);
    go.notify_waiters();

    // New dials through the survivors work within 2 s of the kill.
    for (s, addr) in addrs.iter().take(2).enumerate() {
        let addr = addr.clone();
        let b = backend_addr.clone();
        let ok = rt.block_on(async {
            while killed_at.elapsed() < Duration::from_secs(2) {
                if tokio::time::timeout(Duration::from_millis(1500), dial_once(&addr, &b))
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        });
        assert!(ok, "no dial through server {s} within 2 s\n{}", m.logs());
    }
    // Readiness: the survivors and the agents still ready, the dead one silent.
    for p in &sp[..2] {
        assert_eq!(ready(p.health), Some(200));
    }
    assert_eq!(ready(sp[2].health), None);
    for a in &m.ap {
        assert_eq!(ready(a.agent_health), Some(200), "{}", m.logs());
    }

    // Survivors' transfers complete intact; the killed server's fail (not hang).
    let results: Vec<Result<(), String>> = rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(
                match tokio::time::timeout(Duration::from_secs(60), t).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => Err(format!("panic: {e}")),
                    Err(_) => Err("HANG".into()),
                },
            );
        }
        out
    });
    for (i, r) in results.iter().enumerate() {
        if i % 3 == 2 {
            match r {
                Err(e) => assert!(!e.contains("HANG"), "transfer {i} hung\n{}", m.logs()),
                Ok(()) => panic!("transfer {i} through the killed server completed"),
            }
        } else {
            assert!(r.is_ok(), "transfer {i}: {r:?}\n{}", m.logs());
        }
    }
    // The agents notice the loss, still ready with two servers.
    for a in &m.ap {
        wait_for(
            "agent dropped the dead server",
            Duration::from_secs(20),
            || metric(a.agent_health, OPEN_SERVERS) == 2.0,
        );
        assert_eq!(ready(a.agent_health), Some(200));
    }

    // It comes back on the same ports: both agents reconnect.
    m.servers[2] = start_server(m.dir.path(), &sp[2], "server-2", &[]);
    wait_full_mesh(&m.sp, &m.ap, &m.procs());
    let addr = addrs[2].clone();
    let b = backend_addr.clone();
    rt.block_on(async { dial_once(&addr, &b).await })
        .unwrap_or_else(|e| panic!("dial through the restarted server: {e}\n{}", m.logs()));
}

/// SIGTERM to one agent: it drains — its running transfers finish, no new
/// dial lands on it, the other agent takes them all.
#[test]
fn draining_agent_finishes_running_and_takes_no_new_dials() {
    let backend = HttpServer::start();
    let backend_addr = format!("127.0.0.1:{}", backend.port);
    let m = Mesh::start(&[], [&[], &[]]);
    let addrs: Vec<ProxyAddr> = (0..3).map(|i| m.addr(i)).collect();
    let rt = runtime();
    const N: usize = 30;
    let halfway = Arc::new(tokio::sync::Barrier::new(N + 1));
    let go = Arc::new(tokio::sync::Notify::new());
    let go_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            rt.spawn(gated_echo(
                addrs[i % 3].clone(),
                backend_addr.clone(),
                i as u64 + 7,
                64 * 1024,
                halfway.clone(),
                go.clone(),
                go_flag.clone(),
            ))
        })
        .collect();
    rt.block_on(halfway.wait());
    let drained = &m.agents[0];
    let running_on_drained = metric(
        m.ap[0].agent_health,
        "konnectivity_network_proxy_agent_open_endpoint_connections",
    );
    assert!(
        running_on_drained > 0.0,
        "no transfer landed on agent-a; test proves nothing\n{}",
        m.logs()
    );
    drained.signal(SIGTERM);
    for srv in &m.servers {
        wait_for("servers see the drain", Duration::from_secs(10), || {
            srv.log_text().contains("agent is draining")
        });
    }
    let dials_before = metric(m.ap[0].agent_health, AGENT_DIALS);
    let other_before = metric(m.ap[1].agent_health, AGENT_DIALS);
    // New dials all land on the other agent.
    for i in 0..30 {
        let addr = addrs[i % 3].clone();
        let b = backend_addr.clone();
        rt.block_on(async { dial_once(&addr, &b).await })
            .unwrap_or_else(|e| panic!("dial {i} during drain: {e}\n{}", m.logs()));
    }
    assert_eq!(metric(m.ap[0].agent_health, AGENT_DIALS), dials_before);
    assert_eq!(
        metric(m.ap[1].agent_health, AGENT_DIALS),
        other_before + 30.0
    );
    // The running ones (some on the draining agent) finish intact.
    go_flag.store(true, std::sync::atomic::Ordering::SeqCst);
    go.notify_waiters();
    rt.block_on(async {
        for (i, t) in tasks.into_iter().enumerate() {
            let r = tokio::time::timeout(Duration::from_secs(60), t).await;
            assert!(
                matches!(r, Ok(Ok(Ok(())))),
                "transfer {i}: {r:?}\n{}",
                m.logs()
            );
        }
    });
}

/// A backend on one loopback address answering which side it is on.
struct Side {
    stop: Arc<std::sync::atomic::AtomicBool>,
    addr: String,
}

impl Side {
    fn start(ip: &str, name: &'static str) -> Side {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind((ip, 0)).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s2.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = c else { continue };
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => break,
                    }
                }
                let body = format!("success: hello from {name}");
                let _ = c.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        Side { stop, addr }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(&self.addr);
    }
}

async fn dial_body(addr: &ProxyAddr, backend: &str) -> Result<String, String> {
    let channel = client::grpc_channel(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut io = client::grpc_dial(channel, backend)
        .await
        .map_err(|e| e.to_string())?;
    io.write_all(b"GET /success HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    io.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// destHost sends a dial to the agent whose identifiers name the host;
/// defaultRoute sends the rest to the agent marked default-route.
#[test]
fn dest_host_and_default_route_pick_the_right_agent() {
    let side_a = Side::start("127.0.0.2", "agent-a side");
    let side_b = Side::start("127.0.0.3", "agent-b side");
    let other = Side::start("127.0.0.4", "elsewhere");
    let m = Mesh::start(
        &["--proxy-strategies=destHost,defaultRoute"],
        [
            &["--agent-identifiers=host=node-a&ipv4=127.0.0.2"],
            &["--agent-identifiers=host=node-b&ipv4=127.0.0.3&default-route=true"],
        ],
    );
    let rt = runtime();
    for srv in 0..3 {
        let addr = m.addr(srv);
        for _ in 0..4 {
            let before = [
                metric(m.ap[0].agent_health, AGENT_DIALS),
                metric(m.ap[1].agent_health, AGENT_DIALS),
            ];
            let body = rt.block_on(dial_body(&addr, &side_a.addr)).unwrap();
            assert!(body.contains("agent-a side"), "{body}");
            assert_eq!(metric(m.ap[0].agent_health, AGENT_DIALS), before[0] + 1.0);
            assert_eq!(metric(m.ap[1].agent_health, AGENT_DIALS), before[1]);

            let body = rt.block_on(dial_body(&addr, &side_b.addr)).unwrap();
            assert!(body.contains("agent-b side"), "{body}");
            assert_eq!(metric(m.ap[1].agent_health, AGENT_DIALS), before[1] + 1.0);

            // No agent names 127.0.0.4: the default route (agent-b) takes it.
            let body = rt.block_on(dial_body(&addr, &other.addr)).unwrap();
            assert!(body.contains("elsewhere"), "{body}");
            assert_eq!(metric(m.ap[1].agent_health, AGENT_DIALS), before[1] + 2.0);
            assert_eq!(metric(m.ap[0].agent_health, AGENT_DIALS), before[0] + 1.0);
        }
    }
    let _ = m.logs();
}
