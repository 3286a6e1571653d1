//! Observability (issue 8): /metrics of a real server and agent scraped
//! during and after traffic; the counts must match what the test did.

mod tunnel_support;

use std::time::Duration;

use konnectivity::client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_support::*;

/// Value of one sample: `name` with every `labels` pair present (0 if absent).
fn sample(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, body) = http_get(port, "/metrics").expect("scrape /metrics");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn dial<'a>(seg: &'a str, ty: &'a str) -> [(&'static str, &'a str); 2] {
    [("segment", seg), ("packet_type", ty)]
}

const S: &str = "konnectivity_network_proxy_server_";
const A: &str = "konnectivity_network_proxy_agent_";

fn srv(st: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(st.ports.health, &format!("{S}{name}"), labels)
}
fn agt(st: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(st.ports.agent_health, &format!("{A}{name}"), labels)
}

#[test]
fn metrics_count_what_happened() {
    let backend = HttpServer::start();
    let target = format!("127.0.0.1:{}", backend.port);
    let st = Stack::start_with("grpc", &[], &["--agent-id=agent-m"]);
    let addr = st.frontend();
    assert_eq!(srv(&st, "ready_backend_connections", &[]), 1.0);
    assert_eq!(agt(&st, "open_server_connections", &[]), 1.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    const N: usize = 12;
    const HELD: usize = 5;
    let head_out = b"GET /echo HTTP/1.1\r\nHost: b\r\n\r\n";
    let head_in = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
    let mut sent = 0usize;
    let mut got = 0usize;
    let mut held = Vec::new();
    for i in 0..N {
        let size = 1000 + i * 777;
        let payload = pattern(size);
        let mut io = rt.block_on(async {
            let ch = client::grpc_channel(&addr).await.unwrap();
            let mut io = client::grpc_dial(ch, &target).await.unwrap();
            io.write_all(head_out).await.unwrap();
            io.write_all(&payload).await.unwrap();
            let mut back = vec![0u8; head_in.len() + size];
            io.read_exact(&mut back).await.unwrap();
            assert_eq!(&back[head_in.len()..], &payload[..]);
            io
        });
        sent += head_out.len() + size;
        got += head_in.len() + size;
        if i < HELD {
            held.push(io);
        } else {
            rt.block_on(async { io.shutdown().await.ok() });
            drop(io);
        }
    }
    // The held connections are open at both ends; the rest close.
    wait_for("closed ones released", Duration::from_secs(15), || {
        srv(&st, "established_connections", &[]) == HELD as f64
            && agt(&st, "open_endpoint_connections", &[]) == HELD as f64
    });
    assert_eq!(
        srv(
            &st,
            "stream_packets_total",
            &dial("from_client", "DIAL_REQ")
        ),
        N as f64
    );
    assert_eq!(
        srv(&st, "stream_packets_total", &dial("to_agent", "DIAL_REQ")),
        N as f64
    );
    assert_eq!(
        srv(&st, "stream_packets_total", &dial("from_agent", "DIAL_RSP")),
        N as f64
    );
    assert_eq!(
        srv(&st, "stream_packets_total", &dial("to_client", "DIAL_RSP")),
        N as f64
    );
    assert_eq!(
        agt(
            &st,
            "stream_packets_total",
            &dial("from_server", "DIAL_REQ")
        ),
        N as f64
    );
    assert_eq!(srv(&st, "dial_duration_seconds_count", &[]), N as f64);
    assert_eq!(agt(&st, "dial_duration_seconds_count", &[]), N as f64);
    assert_eq!(srv(&st, "dial_failure_count", &[]), 0.0);
    assert_eq!(srv(&st, "pending_backend_dials", &[]), 0.0);
    // Every DATA packet from the client went on to the agent.
    let from_client = srv(&st, "stream_packets_total", &dial("from_client", "DATA"));
    assert!(from_client >= N as f64, "{from_client}");
    assert_eq!(
        srv(&st, "stream_packets_total", &dial("to_agent", "DATA")),
        from_client
    );
    // Per-agent bytes, both directions, exactly the payload carried.
    let bytes = |dir: &str| {
        srv(
            &st,
            "agent_bytes_total",
            &[("agent_id", "agent-m"), ("direction", dir)],
        )
    };
    assert_eq!(bytes("to_agent"), sent as f64, "{}", st.logs());
    assert_eq!(bytes("from_agent"), got as f64, "{}", st.logs());
    // Small transfers to a reading backend never wait for credit.
    assert!(
        http_get(st.ports.health, "/metrics")
            .unwrap()
            .1
            .contains(&format!(
                "{S}flow_control_stalls_total{{segment=\"to_agent\"}} 0"
            ))
    );

    // Closing the held ones brings the gauges to zero.
    for mut io in held {
        rt.block_on(async { io.shutdown().await.ok() });
    }
    wait_for("all released", Duration::from_secs(15), || {
        srv(&st, "established_connections", &[]) == 0.0
            && agt(&st, "open_endpoint_connections", &[]) == 0.0
    });
    let closes = srv(&st, "stream_packets_total", &dial("to_agent", "CLOSE_REQ"));
    assert_eq!(
        closes,
        srv(
            &st,
            "stream_packets_total",
            &dial("from_client", "CLOSE_REQ")
        )
    );
}

/// /readyz as upstream: the server is ready once an agent is connected and
/// not ready without one; the agent is ready once it holds a server.
#[test]
fn readyz_tells_the_truth() {
    let mut st = Stack::start("grpc");
    assert_eq!(http_get(st.ports.health, "/readyz").map(|r| r.0), Some(200));
    assert_eq!(
        http_get(st.ports.agent_health, "/readyz").map(|r| r.0),
        Some(200)
    );
    st.agent.kill();
    wait_for(
        "server not ready without agent",
        Duration::from_secs(15),
        || http_get(st.ports.health, "/readyz").is_some_and(|(s, _)| s == 500),
    );
    assert_eq!(srv(&st, "ready_backend_connections", &[]), 0.0);
    st.restart_agent();
    st.wait_ready();
    st.server.kill();
    wait_for(
        "agent not ready without server",
        Duration::from_secs(15),
        || http_get(st.ports.agent_health, "/readyz").is_some_and(|(s, _)| s != 200),
    );
    assert_eq!(agt(&st, "open_server_connections", &[]), 0.0);
}
