//! Observability: /metrics of a real server and agent scraped during and
//! after traffic; the counts must match what the test did, and the series,
//! label names and values and histogram buckets must be upstream's (the
//! list below is taken from upstream's `pkg/server/metrics`,
//! `pkg/agent/metrics` and konnectivity-client's common metrics).

mod tunnel_support;

use std::time::Duration;

use konnectivity::client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_support::fake_api;
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
    let rt = runtime();
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
    // The agent as upstream's: received packets are `to_agent`, sent ones
    // `from_agent`, and both ends agree on every packet.
    assert_eq!(
        agt(&st, "stream_packets_total", &dial("to_agent", "DIAL_REQ")),
        N as f64
    );
    assert_eq!(
        agt(&st, "stream_packets_total", &dial("from_agent", "DIAL_RSP")),
        N as f64
    );
    for ty in ["DATA", "DIAL_REQ", "CLOSE_REQ"] {
        assert_eq!(
            agt(&st, "stream_packets_total", &dial("to_agent", ty)),
            srv(&st, "stream_packets_total", &dial("to_agent", ty)),
            "{ty} toward the agent"
        );
    }
    for ty in ["DATA", "DIAL_RSP", "CLOSE_RSP"] {
        assert_eq!(
            agt(&st, "stream_packets_total", &dial("from_agent", ty)),
            srv(&st, "stream_packets_total", &dial("from_agent", ty)),
            "{ty} from the agent"
        );
    }
    // Every DATA from the agent went on to its client, and every packet
    // handed to a client was timed.
    let to_client_data = srv(&st, "stream_packets_total", &dial("to_client", "DATA"));
    assert!(to_client_data >= N as f64, "{to_client_data}");
    assert_eq!(
        to_client_data,
        srv(&st, "stream_packets_total", &dial("from_agent", "DATA"))
    );
    let to_client: f64 = ["DIAL_RSP", "DATA", "CLOSE_RSP"]
        .iter()
        .map(|ty| srv(&st, "stream_packets_total", &dial("to_client", ty)))
        .sum();
    assert_eq!(
        srv(&st, "frontend_write_duration_seconds_count", &[]),
        to_client
    );
    assert_eq!(
        srv(&st, "ready_backends", &[("proxy_strategy", "default")]),
        1.0
    );
    assert_eq!(
        srv(&st, "grpc_connections", &[("service_method", "Connect")]),
        1.0
    );
    assert_eq!(
        srv(&st, "grpc_connections", &[("service_method", "Proxy")]),
        HELD as f64
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
    assert_eq!(srv(&st, "connection_duration_seconds_count", &[]), N as f64);
    assert_eq!(
        srv(
            &st,
            "stream_packets_total",
            &dial("from_client", "CLOSE_REQ")
        ),
        N as f64
    );

    // A tunnel dropped without a shutdown sends CLOSE_REQ all the same
    // and waits for the answer: the server ends the connection (and
    // observes its duration), not a reset stream.
    let io = rt.block_on(async {
        let ch = client::grpc_channel(&addr).await.unwrap();
        let mut io = client::grpc_dial(ch, &target).await.unwrap();
        io.write_all(head_out).await.unwrap();
        let mut back = vec![0u8; head_in.len()];
        io.read_exact(&mut back).await.unwrap();
        io
    });
    assert_eq!(srv(&st, "established_connections", &[]), 1.0);
    drop(io);
    wait_for("the dropped one released", Duration::from_secs(15), || {
        srv(&st, "established_connections", &[]) == 0.0
            && agt(&st, "open_endpoint_connections", &[]) == 0.0
            && srv(&st, "connection_duration_seconds_count", &[]) == (N + 1) as f64
    });
    assert_eq!(
        srv(
            &st,
            "stream_packets_total",
            &dial("from_client", "CLOSE_REQ")
        ),
        (N + 1) as f64
    );
    // A tunnel still held after the backend closed it (EOF read) ends its
    // stream all the same: the server's stream is released.
    let proxy_streams = || srv(&st, "grpc_connections", &[("service_method", "Proxy")]);
    let mut held_open = rt.block_on(async {
        let ch = client::grpc_channel(&addr).await.unwrap();
        client::grpc_dial(ch, &target).await.unwrap()
    });
    assert_eq!(proxy_streams(), 1.0);
    rt.block_on(async {
        held_open
            .write_all(b"GET /success HTTP/1.1\r\nHost: b\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        held_open.read_to_end(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer).ends_with("hello from the backend"));
    });
    wait_for(
        "the held one's stream released",
        Duration::from_secs(15),
        || proxy_streams() == 0.0,
    );
    drop(held_open);
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

/// Upstream's series: (name, label names, whether it appears without an
/// error having happened). From upstream's metrics sources; `lease_watches`
/// is left out because upstream registers it and never counts it.
const UPSTREAM_SERVER: &[(&str, &[&str], bool)] = &[
    ("dial_duration_seconds", &[], true),
    ("frontend_write_duration_seconds", &[], true),
    ("connection_duration_seconds", &[], true),
    ("grpc_connections", &["service_method"], true),
    ("http_connections", &[], true),
    ("ready_backend_connections", &[], true),
    ("ready_backends", &["proxy_strategy"], true),
    ("pending_backend_dials", &[], true),
    ("established_connections", &[], true),
    ("full_receive_channels", &["service_method"], true),
    ("dial_failure_count", &["reason"], true),
    ("culled_leases_count", &[], true),
    ("lease_delete_latency_seconds", &["http_status_code"], true),
    ("lease_delete_total", &["http_status_code", "reason"], true),
    ("lease_list_latency_seconds", &["http_status_code"], true),
    ("lease_list_total", &["http_status_code", "reason"], true),
    ("stream_packets_total", &["packet_type", "segment"], true),
    (
        "stream_errors_total",
        &["code", "packet_type", "segment"],
        false,
    ),
];
const UPSTREAM_AGENT: &[(&str, &[&str], bool)] = &[
    ("dial_duration_seconds", &[], true),
    ("server_connection_failure_count", &["direction"], false),
    ("endpoint_dial_failure_total", &["reason"], true),
    ("open_server_connections", &[], true),
    ("known_server_count", &[], true),
    ("open_endpoint_connections", &[], true),
    ("lease_lists_total", &["http_response_code", "reason"], true),
    ("lease_list_latency_seconds", &["http_response_code"], true),
    ("stream_packets_total", &["packet_type", "segment"], true),
    (
        "stream_errors_total",
        &["code", "packet_type", "segment"],
        false,
    ),
];
/// The process series dashboards chart (Go's and Rust's clients).
const PROCESS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_virtual_memory_bytes",
];

/// name (histogram suffixes removed) -> the label-name sets its samples
/// carry (`le` left out), and every sample as (name, labels, value).
type Scrape = (
    std::collections::BTreeMap<String, std::collections::BTreeSet<Vec<String>>>,
    Vec<Sample>,
);
/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn scrape(port: u16) -> Scrape {
    let (_, body) = http_get(port, "/metrics").expect("scrape");
    let mut series = std::collections::BTreeMap::new();
    let mut samples = Vec::new();
    for l in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (head, value) = l.rsplit_once(' ').unwrap();
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let labels: Vec<(String, String)> = labels
            .split("\",")
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|_| {
                body.contains(&format!(
                    "# TYPE {} histogram",
                    &name[..name.rfind('_').unwrap()]
                ))
            })
            .unwrap_or(name);
        let mut names: Vec<String> = labels
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k != "le")
            .collect();
        names.sort();
        series
            .entry(base.to_string())
            .or_insert_with(std::collections::BTreeSet::new)
            .insert(names);
        samples.push((name.to_string(), labels, value.parse().unwrap_or(f64::NAN)));
    }
    (series, samples)
}

fn le_bounds(samples: &[Sample], bucket: &str) -> Vec<f64> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|(n, _, _)| n == bucket)
        .filter_map(|(_, l, _)| l.iter().find(|(k, _)| k == "le"))
        .filter(|(_, v)| v != "+Inf")
        .map(|(_, v)| v.parse().unwrap())
        .collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

/// A strict fake of the coordination.k8s.io/v1 Lease API for the lease
/// controller and the lease-counting agent: one expired Lease to collect,
/// the caller's own Lease created and renewed, nothing else answered.
fn lease_api(token: &'static str) -> fake_api::FakeServer {
    use serde_json::json;
    const BASE: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
    fake_api::FakeServer::start(move |req| {
        if let Some(refused) = req.unauthorized(token) {
            return refused.into();
        }
        let path = req.target.split('?').next().unwrap_or("");
        let expired = json!({"metadata": {"name": "konnectivity-proxy-server-gone", "namespace": "kube-system",
                              "labels": {"k8s-app": "konnectivity-server"}},
                             "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 1,
                                      "renewTime": "2020-01-01T00:00:00.000000Z"}});
        match (req.method.as_str(), path) {
            ("GET", BASE) if req.target.contains("labelSelector=") => {
                (200, json!({"kind": "LeaseList", "items": [expired]})).into()
            }
            ("DELETE", p) if p == format!("{BASE}/konnectivity-proxy-server-gone") => {
                (200, json!({"kind": "Status", "status": "Success"})).into()
            }
            ("GET", p) if p.starts_with(BASE) => {
                fake_api::status(404, "NotFound", "no such lease").into()
            }
            ("POST", BASE) => match req.json_body() {
                Ok(b) => (201, b).into(),
                Err(e) => e.into(),
            },
            _ => fake_api::status(405, "MethodNotAllowed", &req.target).into(),
        }
    })
}

/// Server and agent scraped during traffic, with the lease controller, a
/// lease-counting agent and a failed dial: every upstream series is there
/// with upstream's label names, the label values dashboards select on are
/// upstream's, histograms have upstream's buckets, and the process series
/// are exported. Our own extra series stay.
#[test]
fn series_labels_and_buckets_are_upstreams() {
    const TOKEN: &str = "metrics-test-token";
    let backend = HttpServer::start();
    let api = lease_api(TOKEN);
    let dir = tempfile::tempdir().unwrap();
    let kc = fake_api::kubeconfig(dir.path(), api.port, TOKEN);
    let kc_flag = format!("--kubeconfig={}", kc.display());
    let st = Stack::start_with(
        "grpc",
        &[
            "--enable-lease-controller",
            &kc_flag,
            "--lease-gc-interval=200ms",
            "--lease-renewal-interval=200ms",
        ],
        &[
            "--count-server-leases",
            &kc_flag,
            "--lease-poll-interval=200ms",
        ],
    );
    // Traffic: a good dial held open, and one to a port nobody listens on.
    let ok = test_client_request(st.dir.path(), st.ports.server, backend.port);
    assert!(ok.0, "{}", ok.1);
    let refused = test_client_request(st.dir.path(), st.ports.server, free_port());
    assert!(!refused.0, "{}", refused.1);
    wait_for("lease calls counted", Duration::from_secs(30), || {
        srv(&st, "culled_leases_count", &[]) >= 1.0
            && srv(&st, "lease_list_total", &[("http_status_code", "200")]) >= 1.0
            && agt(&st, "lease_lists_total", &[("http_response_code", "200")]) >= 1.0
    });
    for (port, prefix, list) in [
        (st.ports.health, S, UPSTREAM_SERVER),
        (st.ports.agent_health, A, UPSTREAM_AGENT),
    ] {
        let (series, samples) = scrape(port);
        for (name, labels, always) in list {
            let full = format!("{prefix}{name}");
            match series.get(&full) {
                Some(sets) => {
                    let want: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
                    assert!(
                        sets.iter().all(|s| *s == want),
                        "{full}: label names {sets:?}, upstream {want:?}"
                    );
                }
                None => assert!(!always, "{full} missing\n{}", st.logs()),
            }
        }
        for p in PROCESS {
            assert!(series.contains_key(*p), "{p} missing on {prefix}");
        }
        // No label value of ours where upstream has its own spelling (in
        // upstream's series; our own extra series keep theirs).
        let upstream = |n: &str| {
            list.iter().any(|(u, _, _)| {
                n.strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with(u))
            })
        };
        for (name, labels, _) in samples.iter().filter(|(n, _, _)| upstream(n)) {
            for (k, v) in labels {
                match k.as_str() {
                    "segment" => assert!(
                        ["from_client", "to_client", "from_agent", "to_agent"]
                            .contains(&v.as_str()),
                        "{name}: segment {v}"
                    ),
                    "service_method" => {
                        assert!(["Proxy", "Connect"].contains(&v.as_str()), "{name}: {v}")
                    }
                    "packet_type" => assert!(
                        [
                            "DIAL_REQ",
                            "DIAL_RSP",
                            "CLOSE_REQ",
                            "CLOSE_RSP",
                            "DATA",
                            "DIAL_CLS",
                            "DRAIN",
                            "DATA_ACK",
                            "Unknown"
                        ]
                        .contains(&v.as_str()),
                        "{name}: packet_type {v}"
                    ),
                    _ => {}
                }
            }
        }
    }
    let (_, server) = scrape(st.ports.health);
    let (_, agent) = scrape(st.ports.agent_health);
    assert_eq!(
        le_bounds(&server, &format!("{S}dial_duration_seconds_bucket")),
        [0.000001, 0.00001, 0.0001, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5]
    );
    assert_eq!(
        le_bounds(
            &server,
            &format!("{S}frontend_write_duration_seconds_bucket")
        ),
        [0.000001, 0.00001, 0.0001, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5]
    );
    assert_eq!(
        le_bounds(&server, &format!("{S}connection_duration_seconds_bucket")),
        [
            1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0
        ]
    );
    assert_eq!(
        le_bounds(&server, &format!("{S}lease_list_latency_seconds_bucket")),
        [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
        ]
    );
    for h in [
        "dial_duration_seconds_bucket",
        "lease_list_latency_seconds_bucket",
    ] {
        assert_eq!(
            le_bounds(&agent, &format!("{A}{h}")),
            [0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0],
            "{h}"
        );
    }
    // The values: one good and one failed dial, as upstream labels them.
    assert_eq!(srv(&st, "dial_duration_seconds_count", &[]), 1.0);
    assert_eq!(
        srv(&st, "dial_failure_count", &[("reason", "error_response")]),
        1.0
    );
    assert_eq!(
        agt(&st, "endpoint_dial_failure_total", &[("reason", "unknown")]),
        1.0
    );
    assert_eq!(
        srv(
            &st,
            "lease_delete_total",
            &[("http_status_code", "200"), ("reason", "")]
        ),
        srv(&st, "culled_leases_count", &[])
    );
    assert_eq!(
        srv(&st, "full_receive_channels", &[("service_method", "Proxy")]),
        0.0
    );
    // Our own series stay.
    assert!(
        scrape(st.ports.health)
            .0
            .contains_key(&format!("{S}flow_control_stalls_total"))
    );
    // The process series describe this process.
    let rss = sample(st.ports.health, "process_resident_memory_bytes", &[]);
    assert!(rss > 1e6 && rss < 1e10, "{rss}");
    // Counted before the scrape: connections of the test's earlier
    // requests may still be closing, so the count only falls meanwhile
    // (a run read 19 open against a count taken after); the scrape's own
    // connection is one more.
    let fds_before = st.server.fd_count();
    let open = sample(st.ports.health, "process_open_fds", &[]);
    assert!(
        open >= 5.0 && open <= fds_before as f64 + 2.0,
        "{open} open, {fds_before} counted before"
    );
    let start = sample(st.ports.health, "process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(start <= now && start > now - 600.0, "{start} vs {now}");
}
