//! imds-proxy end to end in network namespaces the tests create: a "cloud"
//! namespace holding the metadata-service fake on 169.254.169.254:80 (no
//! route out), a "node" namespace running the proxy, and pod namespaces
//! whose DNAT sends 169.254.169.254:80 to the proxy's listener inside the
//! pod. The app is real curl inside the pod.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{Curl, IMDS, Proxy, Topology, curl, instance_url, pod_addr};
use imds_proxy::Pod;
use imds_proxy::proxy::Limits;
use proxyctl_testkit::{NetNs, require_root, require_tool};

fn ready(test: &str) -> bool {
    require_root(test) && require_tool(test, "curl")
}

const RULES: &str = r#"
rules:
  - name: clients-read-instance
    pods: { labels: { role: ClientContainer } }
    paths: [ { prefix: /metadata/instance }, { exact: /metadata/versions } ]
  - name: clients-broad-but-not-credentials
    pods: { labels: { role: ClientContainer } }
    paths: [ { prefix: /metadata } ]
    methods: [GET]
  - name: msi-proxy-token
    pods: { labels: { role: MSIProxyContainer } }
    paths: [ { exact: /metadata/identity/oauth2/token } ]
  - name: aws-app
    pods: { labels: { app: aws } }
    paths: [ { exact: /latest/api/token } ]
    methods: [PUT]
  - name: aws-app-read
    pods: { labels: { app: aws } }
    paths: [ { prefix: /latest/meta-data/ }, { prefix: /latest/meta-data/iam/ } ]
identities:
  - name: msi-proxy-system-identity
    pods: { labels: { role: MSIProxyContainer } }
    azure: { system_assigned: true }
"#;

fn pod(name: &str, ns: &NetNs, ip: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        name: name.into(),
        namespace: "default".into(),
        uid: Some(format!("uid-{name}-{}", ns.name())),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        netns: Some(ns.path()),
        ip: Some(ip.parse().unwrap()),
    }
}

/// A pod the rules serve (labelled role=ClientContainer).
fn client_pod(name: &str, ns: &NetNs, ip: &str) -> Pod {
    pod(name, ns, ip, &[("role", "ClientContainer")])
}

/// The source-IP listener: on the node's bridge, the pods' gateway.
fn node_listener() -> SocketAddr {
    "10.98.0.1:15992".parse().unwrap()
}

/// Sum of `imds_proxy_requests_total` samples whose labels contain `needle`.
fn metric_sum(text: &str, name: &str, needle: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

const MD: [&str; 2] = ["-H", "Metadata: true"];

#[test]
fn pods_get_what_rules_allow_and_nothing_else() {
    if !ready("pods_get_what_rules_allow_and_nothing_else") {
        return;
    }
    let mut topo = Topology::new("imda");
    let ips = [
        "10.98.0.11",
        "10.98.0.12",
        "10.98.0.13",
        "10.98.0.14",
        "10.98.0.15",
    ];
    for ip in ips {
        topo.add_pod(ip, Some(pod_addr()));
    }
    let pods = vec![
        client_pod("client-1", topo.pod(0), ips[0]),
        client_pod("client-2", topo.pod(1), ips[1]),
        pod(
            "msi-proxy",
            topo.pod(2),
            ips[2],
            &[("role", "MSIProxyContainer")],
        ),
        pod("unlabelled", topo.pod(3), ips[3], &[]),
        pod("aws-app", topo.pod(4), ips[4], &[("app", "aws")]),
    ];
    let proxy = Proxy::start(&topo, &pods, RULES, Limits::default(), None);
    let expected_instance = topo.mock.instance().clone();
    let served = |before: u64| topo.mock.requests() - before;

    // Clients labelled as the seed's ClientContainer get the fake's body.
    for i in [0, 1] {
        let r = curl(topo.pod(i), &MD, &instance_url());
        assert_eq!((r.exit, r.status), (0, 200), "client {i}: {r:?}");
        assert_eq!(r.json(), expected_instance);
    }
    let before = topo.mock.requests();
    // A pod without the label: 403, nothing reaches the service.
    let r = curl(topo.pod(3), &MD, &instance_url());
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("default/unlabelled")
    );
    // Credentials: a broad rule (/metadata) never opens the token endpoint.
    let token_url = format!(
        "http://{IMDS}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net"
    );
    let r = curl(topo.pod(0), &MD, &token_url);
    assert_eq!(r.status, 403, "{r:?}");
    // Path tricks do not reach the token endpoint either.
    let r = curl(
        topo.pod(0),
        &["--path-as-is", "-H", "Metadata: true"],
        &format!(
            "http://{IMDS}/metadata/instance/../identity/oauth2/token?api-version=2018-02-01&resource=x"
        ),
    );
    assert_eq!(r.status, 400, "{r:?}");
    // Missing Metadata header: the service's 400 JSON, from the proxy.
    let r = curl(topo.pod(0), &[], &instance_url());
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "Bad request. Required metadata header not specified"})
    );
    // X-Forwarded-For is refused.
    let r = curl(
        topo.pod(0),
        &["-H", "Metadata: true", "-H", "X-Forwarded-For: 10.98.0.13"],
        &instance_url(),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        served(before),
        0,
        "refused requests must not reach the service"
    );

    // The MSI proxy pod gets a token for the identity it is bound to.
    let r = curl(topo.pod(2), &MD, &token_url);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["resource"], "https://vault.azure.net");
    assert_eq!(
        r.json()["client_id"],
        topo.mock.identities()[0].client_id.as_str()
    );
    // Upstream status codes pass through unchanged (400 with versions, 404).
    let r = curl(
        topo.pod(0),
        &MD,
        &format!("http://{IMDS}/metadata/instance"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["newest-versions"].as_array().unwrap().len(), 3);
    let r = curl(
        topo.pod(0),
        &MD,
        &format!("http://{IMDS}/metadata/instance/compute/nope?api-version=2021-02-01"),
    );
    assert_eq!(r.status, 404);
    // A method the rule does not list is refused by the proxy (no 405 from upstream).
    let r = curl(
        topo.pod(0),
        &["-X", "POST", "-H", "Metadata: true", "-d", ""],
        &instance_url(),
    );
    assert_eq!(r.status, 403, "{r:?}");

    // AWS IMDSv2: token PUT with TTL, then reads with the token.
    let aws = topo.pod(4);
    let bad_ttl = curl(
        aws,
        &["-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 0"],
        &format!("http://{IMDS}/latest/api/token"),
    );
    assert_eq!(bad_ttl.status, 400, "{bad_ttl:?}");
    let token = curl(
        aws,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
        ],
        &format!("http://{IMDS}/latest/api/token"),
    );
    assert_eq!(token.status, 200, "{token:?}");
    let with = format!("X-aws-ec2-metadata-token: {}", token.body);
    let r = curl(
        aws,
        &["-H", &with],
        &format!("http://{IMDS}/latest/meta-data/instance-id"),
    );
    assert_eq!((r.status, r.body.as_str()), (200, "i-0123456789abcdef0"));
    let r = curl(
        aws,
        &["-H", &with],
        &format!("http://{IMDS}/latest/meta-data/iam/security-credentials/mock-role"),
    );
    // A pod bound to no role never gets the node's role credentials.
    assert_eq!(r.status, 404, "{r:?}");
    let r = curl(
        aws,
        &[],
        &format!("http://{IMDS}/latest/meta-data/instance-id"),
    );
    assert_eq!(
        r.status, 401,
        "no token: IMDSv1 is off unless a rule allows it"
    );
    let r = curl(
        aws,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            "-H",
            "X-Forwarded-For: 1.2.3.4",
        ],
        &format!("http://{IMDS}/latest/api/token"),
    );
    assert_eq!(r.status, 403);
    // Azure clients get nothing from the AWS paths (no rule names them).
    let r = curl(
        topo.pod(0),
        &["-H", &with],
        &format!("http://{IMDS}/latest/meta-data/iam/security-credentials/mock-role"),
    );
    assert_eq!(r.status, 403);

    // Audit lines and metrics agree with what happened, and with the fake.
    let audit = proxy.audit();
    let allowed: Vec<_> = audit
        .iter()
        .filter(|l| l["decision"] == "allowed")
        .collect();
    assert_eq!(
        allowed.len() as u64,
        topo.mock.requests(),
        "every forwarded request reached the fake once"
    );
    let denied = audit.iter().filter(|l| l["decision"] == "denied").count();
    assert_eq!(denied, 4, "{audit:#?}");
    for line in &audit {
        for key in ["pod", "path", "method", "decision", "status", "latency_ms"] {
            assert!(!line[key].is_null(), "audit line lacks {key}: {line}");
        }
    }
    assert!(audit.iter().any(|l| l["pod"] == "default/unlabelled"
        && l["status"] == 403
        && l["path"] == "/metadata/instance"));
    let metrics = proxy.metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "imds_proxy_requests_total",
            "decision=\"allowed\""
        ) as usize,
        allowed.len()
    );
    assert_eq!(
        metric_sum(&metrics, "imds_proxy_requests_total", "decision=\"denied\"") as usize,
        denied
    );
    assert_eq!(
        metric_sum(&metrics, "imds_proxy_requests_total", "") as usize,
        audit.len()
    );
    assert!(metrics.contains("imds_proxy_pod_listeners 5"), "{metrics}");
}

#[test]
fn identity_comes_from_the_pods_namespace_not_its_address() {
    if !ready("identity_comes_from_the_pods_namespace_not_its_address") {
        return;
    }
    let mut topo = Topology::new("imdb");
    let a = topo.add_pod("10.98.0.21", Some(pod_addr()));
    let b = topo.add_pod("10.98.0.22", Some(pod_addr()));
    let pod_a = client_pod("a", topo.pod(a), "10.98.0.21");
    let pod_b = pod("b", topo.pod(b), "10.98.0.22", &[]);
    let proxy = Proxy::start(
        &topo,
        &[pod_a.clone(), pod_b.clone()],
        RULES,
        Limits::default(),
        None,
    );
    assert_eq!(curl(topo.pod(a), &MD, &instance_url()).status, 200);
    assert_eq!(curl(topo.pod(b), &MD, &instance_url()).status, 403);

    // B takes A's address: still B.
    topo.pod(b).run(&["ip", "addr", "flush", "dev", "eth0"]);
    topo.pod(b)
        .run(&["ip", "addr", "add", "10.98.0.21/24", "dev", "eth0"]);
    topo.pod(b)
        .run(&["ip", "route", "replace", "default", "via", "10.98.0.1"]);
    let r = curl(topo.pod(b), &MD, &instance_url());
    assert_eq!(r.status, 403, "B with A's IP must stay B: {r:?}");

    // A is deleted; a new pod C gets A's IP and even A's namespace path,
    // while the pod source still lists A (a stale cache).
    let a_name = topo.pod(a).name().to_owned();
    topo.node.run(&["ip", "link", "del", "vp1"]); // CNI DEL
    topo.pods.remove(a); // drops A's namespace
    let b = b - 1; // B moved down one slot
    // Mount C's namespace where A's was.
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &a_name])
        .status()
        .unwrap();
    assert!(status.success());
    let c_at_a = NetNsGuard(a_name.clone());
    let c_ns = PathBuf::from("/run/netns").join(&a_name);
    let run_c = |argv: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &a_name])
            .args(argv)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_c(&["ip", "link", "set", "lo", "up"]);
    topo.node.run(&[
        "ip", "link", "add", "vpc", "type", "veth", "peer", "name", "eth0", "netns", &a_name,
    ]);
    topo.node
        .run(&["ip", "link", "set", "vpc", "master", "br0"]);
    topo.node.run(&["ip", "link", "set", "vpc", "up"]);
    run_c(&["ip", "addr", "add", "10.98.0.21/24", "dev", "eth0"]);
    run_c(&["ip", "link", "set", "eth0", "up"]);
    run_c(&["ip", "route", "add", "default", "via", "10.98.0.1"]);
    common::install_dnat_at(&c_ns, pod_addr());
    let curl_c = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &a_name,
                "curl",
                "-sS",
                "-m",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Metadata: true",
                &instance_url(),
            ])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // Before any reconcile, C's namespace has no listener: refused (fail closed).
    let (exit, _) = curl_c();
    assert_eq!(exit, 7, "C must get connection refused, not A's access");
    // The stale record still names A at that path: the replaced namespace is
    // not served as A.
    let report = proxy.set_pods(&[pod_a.clone(), pod_b.clone()]);
    assert!(
        report
            .failed
            .iter()
            .any(|(k, e)| k == "default/a" && e.contains("replaced")),
        "{report:?}"
    );
    assert_eq!(curl_c().0, 7);
    // The source catches up: A gone, C listed (no labels) -> C is served as C.
    let mut pod_c = pod("c", topo.pod(0), "10.98.0.21", &[]);
    pod_c.netns = Some(c_ns.clone());
    let report = proxy.set_pods(&[pod_b.clone(), pod_c]);
    assert!(
        report.removed.contains(&"default/a".to_string()),
        "{report:?}"
    );
    let (exit, code) = curl_c();
    assert_eq!((exit, code.as_str()), (0, "403"));
    // Deleting B from the source closes its listener: B is refused.
    proxy.set_pods(&[]);
    assert_eq!(curl(topo.pod(b), &MD, &instance_url()).exit, 7);
    drop(proxy);
    drop(c_at_a);
}

/// Deletes a namespace made outside NetNs (C mounted at A's old name).
struct NetNsGuard(String);

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn source_ip_fallback_serves_only_the_live_owner_of_an_address() {
    if !ready("source_ip_fallback_serves_only_the_live_owner_of_an_address") {
        return;
    }
    let mut topo = Topology::new("imdc");
    let node_listener = node_listener();
    let a = topo.add_pod("10.98.0.31", Some(node_listener));
    let pod_a = client_pod("a", topo.pod(a), "10.98.0.31");
    let mut proxy = Proxy::start_with(
        &topo,
        std::slice::from_ref(&pod_a),
        RULES,
        Limits::default(),
        None,
        Some(node_listener),
    );
    let r = curl(topo.pod(a), &MD, &instance_url());
    assert_eq!(r.status, 200, "{r:?}");
    proxy.wait_audit("a source-ip line of pod a", |l| {
        l["listener"] == "source-ip" && l["pod"] == "default/a"
    });

    // A dies; C comes up with A's IP before the pod source notices
    // (kube2iam #178, kiam #499): C must not be served as A.
    // CNI DEL: the pod's veth goes, then its namespace.
    topo.node.run(&["ip", "link", "del", "vp1"]);
    topo.pods.remove(a);
    let c = topo.add_pod("10.98.0.31", Some(node_listener));
    // The node still has A's MAC for that IP; a CNI's gratuitous ARP would
    // update it, here the test flushes it.
    topo.node.run(&["ip", "neigh", "flush", "to", "10.98.0.31"]);
    let r = curl(topo.pod(c), &MD, &instance_url());
    assert_eq!(r.status, 403, "{r:?}");
    proxy.wait_audit("c's request as an unknown caller", |l| {
        l["decision"] == "unknown_caller" && l["peer"].as_str().unwrap().starts_with("10.98.0.31:")
    });
    // Once listed, C is C (no labels: denied by rules, not unknown).
    let pod_c = pod("c", topo.pod(c), "10.98.0.31", &[]);
    proxy.set_pods(&[pod_a, pod_c]);
    let r = curl(topo.pod(c), &MD, &instance_url());
    assert_eq!(r.status, 403);
    proxy.wait_audit("c's request denied as c", |l| {
        l["decision"] == "denied" && l["pod"] == "default/c"
    });

    // Proxy down: the pod's DNAT leads to a refused connection, never to
    // the real service.
    let before = topo.mock.requests();
    proxy.stop();
    let r: Curl = curl(topo.pod(c), &MD, &instance_url());
    assert_eq!(r.exit, 7, "{r:?}");
    assert_eq!(topo.mock.requests(), before);
}

/// Callers of the source-IP listener that no pod owns share one pod's
/// allowance of connections: they cannot take the listener from the pods.
#[test]
fn unknown_callers_of_the_source_ip_listener_share_one_connection_cap() {
    if !ready("unknown_callers_of_the_source_ip_listener_share_one_connection_cap") {
        return;
    }
    let mut topo = Topology::new("imdk");
    let node_listener = node_listener();
    let a = topo.add_pod("10.98.0.71", Some(node_listener));
    let x = topo.add_pod("10.98.0.72", Some(node_listener));
    let pod_a = client_pod("a", topo.pod(a), "10.98.0.71");
    let limits = Limits {
        max_connections_per_pod: 2,
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let proxy = Proxy::start_with(&topo, &[pod_a], RULES, limits, None, Some(node_listener));
    let imds: SocketAddr = format!("{IMDS}:80").parse().unwrap();
    // Two connections of the unknown caller, each seen served (403, kept
    // alive), so they hold the places.
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            proxyctl_testkit::in_netns(&topo.pod(x).path(), move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(imds).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(
                    b"GET /metadata/instance HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n",
                )
                .unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).unwrap();
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(text.starts_with("HTTP/1.1 403"), "{text:?}");
                s
            })
        })
        .collect();
    // The third is turned away ...
    let third = proxyctl_testkit::in_netns(&topo.pod(x).path(), move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(imds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    assert!(third.starts_with("HTTP/1.1 503"), "{third:?}");
    // ... while the pod that owns its address has its own allowance.
    let r = curl(topo.pod(a), &MD, &instance_url());
    assert_eq!(r.status, 200, "{r:?}");
    let metrics = proxy.metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "imds_proxy_connections_refused_total",
            "listener=\"source-ip\",pod=\"-\",reason=\"pod_connection_cap\""
        ),
        1,
        "{metrics}"
    );
    proxy.wait_audit("the refusal at the cap", |l| {
        l["decision"] == "pod_connection_cap" && l["pod"] == "-"
    });
    drop(held);
}

#[test]
fn fail_closed_when_the_proxy_is_down() {
    if !ready("fail_closed_when_the_proxy_is_down") {
        return;
    }
    let mut topo = Topology::new("imdd");
    let p = topo.add_pod("10.98.0.41", None);
    // Control: without the DNAT the pod does reach the service (so the
    // refusal below proves the redirect, not a missing route).
    let r = curl(topo.pod(p), &MD, &instance_url());
    assert_eq!(r.status, 200, "{r:?}");
    let before = topo.mock.requests();
    common::install_dnat(topo.pod(p), pod_addr());
    let r = curl(topo.pod(p), &MD, &instance_url());
    assert_eq!(r.exit, 7, "connection refused expected: {r:?}");
    assert_eq!(topo.mock.requests(), before);
}

#[test]
fn rate_limit_answers_429_per_pod() {
    if !ready("rate_limit_answers_429_per_pod") {
        return;
    }
    let mut topo = Topology::new("imde");
    let a = topo.add_pod("10.98.0.51", Some(pod_addr()));
    let b = topo.add_pod("10.98.0.52", Some(pod_addr()));
    let pods = [
        client_pod("a", topo.pod(a), "10.98.0.51"),
        client_pod("b", topo.pod(b), "10.98.0.52"),
    ];
    let limits = Limits {
        rate_per_sec: 0.01,
        burst: 3,
        ..Limits::default()
    };
    let proxy = Proxy::start(&topo, &pods, RULES, limits, None);
    let codes: Vec<u16> = (0..5)
        .map(|_| curl(topo.pod(a), &MD, &instance_url()).status)
        .collect();
    assert_eq!(codes, [200, 200, 200, 429, 429]);
    // B has its own bucket.
    assert_eq!(curl(topo.pod(b), &MD, &instance_url()).status, 200);
    assert_eq!(topo.mock.requests(), 4);
    let limited = proxy
        .audit()
        .iter()
        .filter(|l| l["decision"] == "rate_limited")
        .count();
    assert_eq!(limited, 2);
    assert_eq!(
        metric_sum(
            &proxy.metrics(),
            "imds_proxy_requests_total",
            "code=\"429\""
        ),
        2
    );
}

/// Raw bytes from inside the pod to 169.254.169.254:80 (through the DNAT);
/// returns everything the server sent until it closed.
fn raw_from(pod: &NetNs, request: Vec<u8>) -> String {
    proxyctl_testkit::in_netns(&pod.path(), move || {
        let out = common::raw(format!("{IMDS}:80").parse().unwrap(), &request).expect("connect");
        String::from_utf8_lossy(&out).into_owned()
    })
}

fn responses(text: &str) -> usize {
    text.matches("HTTP/1.1 ").count()
}

#[test]
fn bad_input_is_refused_logged_and_never_forwarded() {
    if !ready("bad_input_is_refused_logged_and_never_forwarded") {
        return;
    }
    let mut topo = Topology::new("imdf");
    let a = topo.add_pod("10.98.0.61", Some(pod_addr()));
    let pods = [pod(
        "a",
        topo.pod(a),
        "10.98.0.61",
        &[("role", "ClientContainer"), ("app", "aws")],
    )];
    let limits = Limits {
        header_read_timeout: Duration::from_millis(500),
        max_header_bytes: 8192,
        ..Limits::default()
    };
    let proxy = Proxy::start(&topo, &pods, RULES, limits, None);
    let pod_ns = topo.pod(a);
    let good = "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n";
    let smuggled = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=x HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n";

    let cases: Vec<(&str, String, u16)> = vec![
        // CL.TE: the front reads 4 bytes, a back end reading chunks would
        // see the token request as a second request.
        (
            "content-length with transfer-encoding",
            format!("POST /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "chunked request body",
            format!("GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "conflicting content-lengths",
            format!("POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{{}}{smuggled}"),
            400,
        ),
        (
            "transfer-encoding not chunked",
            format!("POST /metadata/instance HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{smuggled}"),
            400,
        ),
        (
            "obs-fold",
            "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nX-Folded: a\r\n  b\r\n\r\n".into(),
            400,
        ),
        (
            "huge header",
            format!("GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000)),
            431,
        ),
        (
            "too many headers",
            format!("GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n{}\r\n", (0..100).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()),
            431,
        ),
        ("garbage", "\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03 not http\r\n\r\n".into(), 400),
        (
            "absolute-form target",
            "GET http://evil.example/metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: evil.example\r\nMetadata: true\r\nConnection: close\r\n\r\n".into(),
            400,
        ),
        (
            "body too large",
            format!("POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 1000000\r\n\r\n{}", "{"),
            413,
        ),
    ];
    for (name, request, status) in &cases {
        let text = raw_from(pod_ns, request.clone().into_bytes());
        assert_eq!(
            responses(&text),
            1,
            "{name}: exactly one response, then the connection closes: {text:?}"
        );
        let code: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert_eq!(code, *status, "{name}: {text:?}");
    }
    assert_eq!(topo.mock.requests(), 0, "nothing may be forwarded");

    // Slow-loris: half a request head, then silence. The server hangs up
    // after the header timeout while serving others meanwhile.
    let slow = proxyctl_testkit::in_netns(&pod_ns.path(), move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((IMDS, 80)).unwrap();
        s.write_all(b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let read = s.read_to_end(&mut buf);
        (
            read.is_ok(),
            started.elapsed(),
            String::from_utf8_lossy(&buf).into_owned(),
        )
    });
    assert!(
        slow.0,
        "the server must close the slow connection, not leave it open: {slow:?}"
    );
    assert!(slow.1 < Duration::from_secs(4), "{slow:?}");
    assert!(!slow.2.contains("200 OK"), "{slow:?}");

    // Still serving.
    let ok = raw_from(pod_ns, good.as_bytes().to_vec());
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert_eq!(topo.mock.requests(), 1);

    let audit = proxy.audit();
    let decisions: Vec<&str> = audit
        .iter()
        .map(|l| l["decision"].as_str().unwrap())
        .collect();
    for expected in [
        "bad_framing",
        "malformed",
        "too_large",
        "header_timeout",
        "bad_path",
        "allowed",
    ] {
        assert!(
            decisions.contains(&expected),
            "no {expected} in {decisions:?}"
        );
    }
    assert_eq!(decisions.iter().filter(|d| **d == "allowed").count(), 1);
    let metrics = proxy.metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "imds_proxy_connection_errors_total",
            "kind=\"header_timeout\""
        ),
        1,
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "imds_proxy_connection_errors_total", "") >= 5,
        "{metrics}"
    );
}
