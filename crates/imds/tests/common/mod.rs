//! Test helpers: raw HTTP over real sockets, tokio runtimes whose threads
//! live in a test namespace, and the cloud / node / pod topology.
#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imds_proxy::audit::Audit;
use imds_proxy::mock::{self, MockState};
use imds_proxy::proxy::{Limits, ProxyConfig, ProxyHandle, parse_upstream};
use imds_proxy::{FilePodSource, Pod, Rules};
use proxyctl_testkit::NetNs;

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        json_body(&self.body)
    }
}

/// `body` as JSON; a body that is not fails the test, showing it.
fn json_body(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {body:?}"))
}

/// Writes `request` to `addr` and reads until the server closes (requests
/// should carry `Connection: close` unless the test wants otherwise).
pub fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request)?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Ok(out)
}

/// Parses the first response in `bytes`.
pub fn parse(bytes: &[u8]) -> RawResponse {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// `GET`-style request with the given extra header lines, Connection: close.
pub fn request(method: &str, target: &str, headers: &[&str]) -> Vec<u8> {
    let mut r = format!("{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("Connection: close\r\n\r\n");
    r.into_bytes()
}

pub fn send(addr: SocketAddr, method: &str, target: &str, headers: &[&str]) -> RawResponse {
    parse(&raw(addr, &request(method, target, headers)).expect("request"))
}

/// A multi-thread runtime whose worker (and later blocking) threads were
/// created inside the namespace at `path`.
pub fn runtime_in(path: &Path) -> tokio::runtime::Runtime {
    let path = path.to_owned();
    imds_proxy::netns::in_netns(&path, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    })
    .expect("runtime in netns")
    .0
}

/// Runs `fut` on the runtime's workers (never on the calling thread, which
/// is in the test's own namespace).
pub fn on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> T {
    rt.block_on(rt.spawn(fut)).expect("task panicked")
}

/// The metadata-service fake on `addr`, served by `rt`.
pub fn start_mock(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> (Arc<MockState>, SocketAddr) {
    let state = MockState::new();
    let s = state.clone();
    let bound = on(rt, async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind mock");
        let bound = listener.local_addr().unwrap();
        tokio::spawn(mock::serve(listener, s));
        bound
    });
    (state, bound)
}

pub const IMDS: &str = "169.254.169.254";
pub const POD_PORT: u16 = 15990;

/// cloud (the fake on 169.254.169.254:80, no route out) <-veth-> node
/// (imds-proxy; bridge 10.98.0.1/24 for pods) <-veth-> pods.
pub struct Topology {
    pub cloud: NetNs,
    pub node: NetNs,
    pub pods: Vec<NetNs>,
    pub cloud_rt: tokio::runtime::Runtime,
    pub mock: Arc<MockState>,
    counter: usize,
}

impl Topology {
    pub fn new(tag: &str) -> Self {
        let cloud = NetNs::new(&format!("{tag}c"));
        let node = NetNs::new(&format!("{tag}n"));
        veth(&node, "up0", &cloud);
        cloud.run(&["ip", "addr", "add", "10.99.0.2/30", "dev", "eth0"]);
        cloud.run(&["ip", "addr", "add", "169.254.169.254/32", "dev", "eth0"]);
        cloud.run(&["ip", "link", "set", "eth0", "up"]);
        cloud.run(&["ip", "route", "add", "10.98.0.0/24", "via", "10.99.0.1"]);
        node.run(&["ip", "addr", "add", "10.99.0.1/30", "dev", "up0"]);
        node.run(&["ip", "link", "set", "up0", "up"]);
        node.run(&[
            "ip",
            "route",
            "add",
            "169.254.169.254/32",
            "via",
            "10.99.0.2",
        ]);
        node.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        node.run(&["ip", "link", "add", "br0", "type", "bridge"]);
        node.run(&["ip", "addr", "add", "10.98.0.1/24", "dev", "br0"]);
        node.run(&["ip", "link", "set", "br0", "up"]);
        let cloud_rt = runtime_in(&cloud.path());
        let (mock, _) = start_mock(&cloud_rt, format!("{IMDS}:80").parse().unwrap());
        Self {
            cloud,
            node,
            pods: Vec::new(),
            cloud_rt,
            mock,
            counter: 0,
        }
    }

    /// A pod namespace with `ip` on eth0 (bridged into the node), a default
    /// route through the node, and optionally the DNAT of 169.254.169.254:80
    /// to `dnat_to` — what `proxyctl`'s destination-proxy policy installs.
    pub fn add_pod(&mut self, ip: &str, dnat_to: Option<SocketAddr>) -> usize {
        self.counter += 1;
        let pod = NetNs::new("imdp");
        let host_if = format!("vp{}", self.counter);
        veth(&self.node, &host_if, &pod);
        self.node
            .run(&["ip", "link", "set", &host_if, "master", "br0"]);
        self.node.run(&["ip", "link", "set", &host_if, "up"]);
        pod.run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        pod.run(&["ip", "link", "set", "eth0", "up"]);
        pod.run(&["ip", "route", "add", "default", "via", "10.98.0.1"]);
        if let Some(to) = dnat_to {
            install_dnat(&pod, to);
        }
        self.pods.push(pod);
        self.pods.len() - 1
    }

    pub fn pod(&self, i: usize) -> &NetNs {
        &self.pods[i]
    }
}

/// A veth pair from `ns` (named `name` there) to `peer`, where it is eth0.
fn veth(ns: &NetNs, name: &str, peer: &NetNs) {
    ns.run(&[
        "ip",
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer.name(),
    ]);
}

/// The destination-proxy policy imds-proxy relies on: TCP to
/// 169.254.169.254:80 is DNATed to `to`, applied by proxyctl's nft backend.
pub fn imds_policy(to: SocketAddr) -> proxyctl_policy::Policy {
    let policy = proxyctl_policy::Policy {
        name: "imds".into(),
        destination_proxy: Some(proxyctl_policy::DestinationProxy {
            destination: format!("{IMDS}:80").parse().unwrap(),
            proxy: to,
        }),
        ..proxyctl_policy::Policy::default()
    };
    policy
        .validate()
        .expect("imds destination-proxy policy is valid");
    policy
}

/// Installs the DNAT of 169.254.169.254:80 to `to` in the namespace at `path`.
pub fn install_dnat_at(path: &Path, to: SocketAddr) {
    let target = proxyctl_nft::Target::Path(path.to_owned());
    proxyctl_nft::add(&target, &imds_policy(to)).expect("installing the imds DNAT");
}

pub fn install_dnat(ns: &NetNs, to: SocketAddr) {
    install_dnat_at(&ns.path(), to);
}

/// What curl in a pod saw.
#[derive(Debug)]
pub struct Curl {
    /// curl's exit code (7: connection refused, 28: timeout).
    pub exit: i32,
    pub status: u16,
    pub body: String,
}

impl Curl {
    pub fn json(&self) -> serde_json::Value {
        json_body(&self.body)
    }
}

/// Real curl inside the pod, as the app: `curl [args] URL`.
pub fn curl(pod: &NetNs, args: &[&str], url: &str) -> Curl {
    let mut argv = vec!["curl", "-sS", "-m", "5", "-w", "\n%{http_code}"];
    argv.extend_from_slice(args);
    argv.push(url);
    let out = pod.exec(&argv);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    Curl {
        exit: out.status.code().unwrap_or(-1),
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
    }
}

pub fn instance_url() -> String {
    format!("http://{IMDS}/metadata/instance?api-version=2021-02-01")
}

/// Where the pods' DNAT sends 169.254.169.254:80: the proxy's per-pod
/// listener inside each pod's namespace.
pub fn pod_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], POD_PORT))
}

/// imds-proxy started in the topology's node namespace: pods from a file
/// (changed with [`Proxy::set_pods`]), audit lines to a file, admin
/// endpoints on an ephemeral port. Stopped on drop.
pub struct Proxy {
    handle: Option<Arc<ProxyHandle>>,
    rt: Option<tokio::runtime::Runtime>,
    pods_file: PathBuf,
    audit_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    pub fn start(
        topo: &Topology,
        pods: &[Pod],
        rules: &str,
        limits: Limits,
        source_ip: Option<SocketAddr>,
    ) -> Self {
        Self::start_with(topo, pods, rules, limits, Some(pod_addr()), source_ip)
    }

    pub fn start_with(
        topo: &Topology,
        pods: &[Pod],
        rules: &str,
        limits: Limits,
        pod_listen: Option<SocketAddr>,
        source_ip: Option<SocketAddr>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pods_file = dir.path().join("pods.yaml");
        let audit_file = dir.path().join("audit.jsonl");
        write_pods(&pods_file, pods);
        let rt = runtime_in(&topo.node.path());
        let config = ProxyConfig {
            upstream: parse_upstream(&format!("http://{IMDS}")).unwrap(),
            rules: Rules::from_yaml(rules, "test").unwrap(),
            pod_listen,
            source_ip_listen: source_ip,
            admin_listen: Some("127.0.0.1:0".parse().unwrap()),
            audit: Audit::to_file(&audit_file).unwrap(),
            limits,
            reconcile_every: Duration::ZERO,
            workers: 2,
        };
        let source = Arc::new(FilePodSource::new(&pods_file));
        let handle = on(&rt, async move {
            ProxyHandle::start(config, source).await.unwrap()
        });
        Self {
            handle: Some(Arc::new(handle)),
            rt: Some(rt),
            pods_file,
            audit_file,
            _dir: dir,
        }
    }

    pub fn set_pods(&self, pods: &[Pod]) -> imds_proxy::proxy::ReconcileReport {
        write_pods(&self.pods_file, pods);
        let handle = self.handle.clone().unwrap();
        on(self.rt.as_ref().unwrap(), async move {
            handle.reconcile().await.unwrap()
        })
    }

    /// The audit log's text, once no more lines arrive for 20 ms: a
    /// request's line is recorded just after its answer is written, so the
    /// client may have the answer a moment before its line.
    pub fn audit_text(&self) -> String {
        let read = || {
            self.handle.as_ref().unwrap().flush_audit();
            std::fs::read_to_string(&self.audit_file).unwrap()
        };
        let mut text = read();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let again = read();
            if again.len() == text.len() {
                return text;
            }
            text = again;
        }
    }

    /// The audit lines (see [`Proxy::audit_text`]).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.audit_text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Waits until an audit line matches `pred`: a request's line is
    /// recorded just after its answer is written, so the client may have
    /// the answer a moment before the line exists.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        proxyctl_testkit::wait_until(what, Duration::from_secs(10), || {
            self.audit().iter().any(&pred)
        });
    }

    pub fn metrics(&self) -> String {
        self.handle.as_ref().unwrap().metrics_text()
    }

    pub fn stop(&mut self) {
        self.handle.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A proxy of `rules` forwarding to `upstream` (host or host:port) with
/// no listeners of its own (set some, or serve loopback pods), no audit,
/// no rate limit (many pods ask at once) and no reconcile loop.
pub fn quiet_config(upstream: &str, rules: &str) -> ProxyConfig {
    ProxyConfig {
        upstream: parse_upstream(&format!("http://{upstream}")).unwrap(),
        rules: Rules::from_yaml(rules, "test").unwrap(),
        pod_listen: None,
        source_ip_listen: None,
        admin_listen: None,
        audit: Audit::discard(),
        limits: Limits {
            rate_per_sec: 0.0,
            ..Limits::default()
        },
        reconcile_every: Duration::ZERO,
        workers: 2,
    }
}

pub fn write_pods(path: &std::path::Path, pods: &[Pod]) {
    let doc = serde_json::json!({ "pods": pods });
    std::fs::write(path, serde_yaml::to_string(&doc).unwrap()).unwrap();
}
