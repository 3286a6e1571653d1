//! `proxyctl demo tunnel`: a backend that only the node can reach, reached
//! from the control plane through proxy-server and proxy-agent.
//!
//! Two throw-away namespaces joined by a veth pair: "control-plane" runs
//! two proxy-servers (one per frontend mode: gRPC on a unix socket, as
//! kube-apiserver dials it, and HTTP-CONNECT over mTLS), "node" runs one
//! proxy-agent connected to both and a web server on the node's loopback,
//! which no other namespace can reach. Certificates are made on the spot
//! (`proxyctl certs`). Server and agent run in this process on the same
//! library code as the `proxy-server` and `proxy-agent` binaries.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use konnectivity::agent::{self, AgentLaunch, AgentOptions};
use konnectivity::client::{self, ProxyAddr};
use konnectivity::server::{self, FrontendListen, FrontendMode, ServerLaunch, ServerOptions};
use konnectivity::tls::{self, TlsOptions};

use super::{DemoDir, anonymous_netns, in_ns, intro, on, output, runtime_in, veth_between};

const CP_ADDR: &str = "198.18.3.1";
const NODE_ADDR: &str = "198.18.3.2";
const BACKEND: &str = "127.0.0.1:8080";
/// Agent ports of the two servers, and their admin (metrics) ports.
const GRPC_AGENT_PORT: u16 = 8091;
const CONNECT_AGENT_PORT: u16 = 8191;
const GRPC_ADMIN_PORT: u16 = 8095;
const CONNECT_ADMIN_PORT: u16 = 8195;
const CONNECT_FRONTEND: &str = "127.0.0.1:8090";

pub fn run() -> anyhow::Result<bool> {
    intro(
        "proxyctl demo tunnel: the Konnectivity tunnel (apiserver-network-proxy)",
        &[
            "The control plane cannot reach the node's network; the node's agent dials",
            "out to proxy-server over mTLS and keeps the connection open. Requests",
            "from the control plane (kube-apiserver in a cluster) ride that connection",
            "back to a backend only the node can reach: here a web server on the",
            "node's own loopback (127.0.0.1:8080 in the node's namespace). One request",
            "goes as kube-apiserver sends it (gRPC over a unix socket), one as curl",
            "does (HTTP CONNECT over mTLS); then the servers' metrics that counted them.",
        ],
    );
    let dir = DemoDir::new("tunnel")?;
    let cp = anonymous_netns()?;
    let node = anonymous_netns()?;
    veth_between(
        (&cp, "eth0", &[&format!("{CP_ADDR}/30")]),
        (&node, "eth0", &[&format!("{NODE_ADDR}/30")]),
    )?;
    println!("control-plane {CP_ADDR}   node {NODE_ADDR}   backend {BACKEND} (node only)\n");

    println!("$ proxyctl certs --out DIR --proxy-server-ip {CP_ADDR}");
    konnectivity::certs::write_make_certs(dir.path(), CP_ADDR)?;
    let certs = dir.path().join("certs");
    let uds = dir.path().join("konnectivity-server.socket");

    let cp_rt = runtime_in(&cp, 2)?;
    let node_rt = runtime_in(&node, 2)?;

    // The backend, on the node's loopback.
    in_ns(&node, || {
        let listener = std::net::TcpListener::bind(BACKEND)?;
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut head = [0u8; 1024];
                let _ = conn.read(&mut head);
                let body = "hello from the node's backend\n";
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Ok(())
    })?;

    println!(
        "$ proxy-server --mode grpc --uds-name {} --server-port 0 --agent-port {GRPC_AGENT_PORT} --cluster-cert ... (control plane)",
        uds.display()
    );
    let grpc_server = launch_server(
        &cp_rt,
        &certs,
        FrontendMode::Grpc,
        FrontendListen::Uds {
            path: uds.clone(),
            delete_existing: true,
        },
        GRPC_AGENT_PORT,
        GRPC_ADMIN_PORT,
        "demo-grpc",
    )?;
    println!(
        "$ proxy-server --mode http-connect --server-port 8090 --server-cert ... --server-ca-cert ... --agent-port {CONNECT_AGENT_PORT} ..."
    );
    let connect_server = launch_server(
        &cp_rt,
        &certs,
        FrontendMode::HttpConnect,
        FrontendListen::Tcp {
            addr: CONNECT_FRONTEND.parse()?,
            tls: Some(tls::server_config(
                &certs.join("master/issued/proxy-master.crt"),
                &certs.join("master/private/proxy-master.key"),
                Some(&certs.join("master/issued/ca.crt")),
                &TlsOptions::default(),
                &[b"http/1.1"],
            )?),
        },
        CONNECT_AGENT_PORT,
        CONNECT_ADMIN_PORT,
        "demo-http-connect",
    )?;

    println!(
        "$ proxy-agent --proxy-server-host {CP_ADDR} --proxy-server-port {GRPC_AGENT_PORT} (and {CONNECT_AGENT_PORT}) --agent-cert ... (node)\n"
    );
    let tls = tls::client_config(
        &certs.join("agent/issued/ca.crt"),
        Some((
            &certs.join("agent/issued/proxy-agent.crt"),
            &certs.join("agent/private/proxy-agent.key"),
        )),
        &TlsOptions::default(),
        &[b"h2".to_vec()],
    )?;
    let mut opts = AgentOptions::new(
        vec![
            (CP_ADDR.to_owned(), GRPC_AGENT_PORT),
            (CP_ADDR.to_owned(), CONNECT_AGENT_PORT),
        ],
        tls,
    );
    opts.agent_id = "demo-node".into();
    opts.sync_interval = Duration::from_millis(100);
    let agent = on(&node_rt, async move {
        agent::launch(AgentLaunch {
            opts,
            health_addr: None,
            admin_addr: None,
        })
        .await
    })??;
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.agent.connected_servers().len() < 2 {
        if Instant::now() > deadline {
            bail!(
                "the agent did not reach both servers: {:?}",
                agent.agent.connected_servers()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "agent connected to servers {:?}\n",
        agent.agent.connected_servers()
    );

    println!("-- the control plane cannot reach the backend itself:");
    let direct = in_ns(&cp, || {
        Ok(TcpStream::connect_timeout(&BACKEND.parse()?, Duration::from_secs(1)).is_ok())
    })?;
    println!(
        "   connect {BACKEND} from the control plane: {}\n",
        if direct {
            "connected (unexpected)"
        } else {
            "refused"
        }
    );

    println!("-- gRPC over the unix socket (what kube-apiserver's egress selector does):");
    let uds2 = uds.clone();
    let grpc_reply = on(&cp_rt, async move {
        let addr = ProxyAddr::Uds(uds2);
        let channel = client::grpc_channel(&addr).await?;
        let mut io = client::grpc_dial(channel, BACKEND).await?;
        client::http_get(&mut io, BACKEND, "/").await
    })?;
    let grpc_ok = match &grpc_reply {
        Ok((status, body)) => {
            println!("   {status} {}", String::from_utf8_lossy(body).trim());
            *status == 200
        }
        Err(e) => {
            println!("   failed: {e}");
            false
        }
    };

    println!("\n-- HTTP CONNECT over mTLS:");
    let connect_ok = http_connect_request(&cp, &certs)?;

    println!(
        "\n-- the servers' /metrics (admin ports {GRPC_ADMIN_PORT} and {CONNECT_ADMIN_PORT}), the lines that counted them:"
    );
    for (name, port) in [
        ("grpc", GRPC_ADMIN_PORT),
        ("http-connect", CONNECT_ADMIN_PORT),
    ] {
        let page = in_ns(&cp, move || http_text(("127.0.0.1", port)))?;
        println!("   [{name}]");
        for line in page.lines().filter(|l| counted(l)) {
            println!("   {line}");
        }
    }

    on(&node_rt, agent.shutdown())?;
    on(&cp_rt, grpc_server.shutdown(Duration::ZERO))?;
    on(&cp_rt, connect_server.shutdown(Duration::ZERO))?;
    cp_rt.shutdown_timeout(Duration::from_secs(2));
    node_rt.shutdown_timeout(Duration::from_secs(2));
    let ok = grpc_ok && connect_ok && !direct;
    if !ok {
        println!("a request did not go as shown");
    }
    Ok(ok)
}

fn launch_server(
    rt: &tokio::runtime::Runtime,
    certs: &Path,
    mode: FrontendMode,
    frontend: FrontendListen,
    agent_port: u16,
    admin_port: u16,
    id: &str,
) -> anyhow::Result<server::RunningServer> {
    let agent_tls = tls::server_config(
        &certs.join("agent/issued/proxy-master.crt"),
        &certs.join("agent/private/proxy-master.key"),
        Some(&certs.join("agent/issued/ca.crt")),
        &TlsOptions::default(),
        &[b"h2"],
    )?;
    let launch = ServerLaunch {
        opts: ServerOptions {
            server_id: id.to_owned(),
            ..ServerOptions::default()
        },
        mode,
        frontend,
        agent_addr: SocketAddr::new(CP_ADDR.parse()?, agent_port),
        agent_tls,
        health_addr: None,
        admin_addr: Some(SocketAddr::from(([127, 0, 0, 1], admin_port))),
        agent_keepalive: Duration::from_secs(3600),
        agent_liveness: Duration::ZERO,
        frontend_keepalive: Duration::from_secs(3600),
        max_frontend_connections: 1024,
        max_agent_connections: 64,
    };
    on(rt, server::launch(launch))?
}

/// curl through the HTTP-CONNECT frontend, when curl is installed; else
/// the same CONNECT exchange from this process.
fn http_connect_request(cp: &std::fs::File, certs: &Path) -> anyhow::Result<bool> {
    let master = |p: &str| certs.join("master").join(p).display().to_string();
    let args = vec![
        "-sS".to_owned(),
        "-m".into(),
        "5".into(),
        "--proxytunnel".into(),
        "--proxy".into(),
        format!("https://{CONNECT_FRONTEND}"),
        "--proxy-cacert".into(),
        master("issued/ca.crt"),
        "--proxy-cert".into(),
        master("issued/proxy-client.crt"),
        "--proxy-key".into(),
        master("private/proxy-client.key"),
        format!("http://{BACKEND}/"),
    ];
    println!(
        "   $ curl --proxytunnel --proxy https://{CONNECT_FRONTEND} --proxy-cacert ca.crt --proxy-cert proxy-client.crt --proxy-key proxy-client.key http://{BACKEND}/"
    );
    let curl = in_ns(
        cp,
        move || Ok(output(Command::new("curl").args(&args)).ok()),
    )?;
    if let Some(out) = curl {
        let body = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            println!("   {}", body.trim());
        } else {
            println!(
                "   curl failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        return Ok(out.status.success() && body.contains("hello from the node"));
    }
    println!("   (curl is not installed: apt-get install curl; the same CONNECT from proxyctl)");
    let ca = PathBuf::from(master("issued/ca.crt"));
    let cert = PathBuf::from(master("issued/proxy-client.crt"));
    let key = PathBuf::from(master("private/proxy-client.key"));
    let rt = runtime_in(cp, 1)?;
    let reply = on(&rt, async move {
        let tls = tls::client_config(
            &ca,
            Some((&cert, &key)),
            &TlsOptions::default(),
            &[b"http/1.1".to_vec()],
        )?;
        let (host, port) = CONNECT_FRONTEND.split_once(':').expect("literal");
        let addr = ProxyAddr::Tcp {
            host: host.to_owned(),
            port: port.parse()?,
            tls: Some(tls),
        };
        let mut io = client::http_connect(&addr, BACKEND, "proxyctl-demo").await?;
        anyhow::Ok(client::http_get(&mut *io, BACKEND, "/").await?)
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    match reply {
        Ok((status, body)) => {
            println!("   {status} {}", String::from_utf8_lossy(&body).trim());
            Ok(status == 200)
        }
        Err(e) => {
            println!("   failed: {e}");
            Ok(false)
        }
    }
}

/// The metric lines a reader wants here: dials and frontend connections
/// with a count above zero.
fn counted(line: &str) -> bool {
    !line.starts_with('#')
        && (line.contains("dial_duration_seconds_count")
            || line.contains("stream_packets_total")
            || line.contains("frontend"))
        && line
            .rsplit(' ')
            .next()
            .is_some_and(|v| v.parse::<f64>().is_ok_and(|v| v > 0.0))
}

/// GET /metrics over plain HTTP/1.0; the body.
fn http_text(addr: (&str, u16)) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).context("connecting to the admin port")?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(text))
}
