//! Lease-based server counting (issue 8) against a strict fake of the
//! coordination.k8s.io/v1 Lease API over plain HTTP, written here: no
//! Kubernetes API server can run on this machine. The fake checks paths,
//! methods, the bearer token, JSON bodies (apiVersion, kind, metadata,
//! spec.holderIdentity / leaseDurationSeconds / acquireTime / renewTime as
//! MicroTime), resourceVersion on update and labelSelector on list; any
//! deviation is recorded and fails the test.

mod tunnel_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tunnel_support::fake_api::{self, Reply, Request, status};
use tunnel_support::*;

const TOKEN: &str = "s3cret-token";
const PREFIX: &str = "/apis/coordination.k8s.io/v1/namespaces/";

#[derive(Default)]
struct State {
    leases: BTreeMap<(String, String), Value>,
    next_rv: u64,
    violations: Vec<String>,
    requests: Vec<String>,
    /// When each request arrived (for the client-side rate limit).
    arrived: Vec<std::time::Instant>,
}

struct FakeApi {
    port: u16,
    state: Arc<Mutex<State>>,
    _server: fake_api::FakeServer,
}

fn is_micro_time(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    b.len() == 27
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[26] == b'Z'
        && s.chars()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 26].contains(&i) || c.is_ascii_digit())
}

impl FakeApi {
    fn start() -> FakeApi {
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let server = fake_api::FakeServer::start(move |req| serve(req, &st));
        FakeApi {
            port: server.port,
            state,
            _server: server,
        }
    }
    fn put(&self, ns: &str, lease: Value) {
        let mut s = self.state.lock().unwrap();
        s.next_rv += 1;
        let mut lease = lease;
        lease["metadata"]["resourceVersion"] = json!(s.next_rv.to_string());
        let name = lease["metadata"]["name"].as_str().unwrap().to_string();
        s.leases.insert((ns.into(), name), lease);
    }
    fn get(&self, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .leases
            .get(&(ns.into(), name.into()))
            .cloned()
    }
    fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }
    fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        fake_api::kubeconfig(dir, self.port, TOKEN)
    }
}

fn serve(req: &Request, st: &Mutex<State>) -> Reply {
    let (method, target) = (&req.method, &req.target);
    let mut s = st.lock().unwrap();
    s.requests.push(format!("{method} {target}"));
    s.arrived.push(std::time::Instant::now());
    let r = handle(&mut s, req);
    if r.0 >= 400 && r.0 != 404 && r.0 != 409 {
        s.violations
            .push(format!("{method} {target} -> {}: {}", r.0, r.1["message"]));
    }
    r.into()
}

fn handle(s: &mut State, req: &Request) -> (u16, Value) {
    if let Some(refused) = req.unauthorized(TOKEN) {
        return refused;
    }
    let (method, target) = (req.method.as_str(), req.target.as_str());
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return status(400, "BadRequest", &format!("unexpected path {path}"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (ns, name) = match parts.as_slice() {
        [ns, "leases"] => (ns.to_string(), None),
        [ns, "leases", name] if !name.is_empty() => (ns.to_string(), Some(name.to_string())),
        _ => return status(400, "BadRequest", &format!("unexpected path {path}")),
    };
    let validate = |l: &Value, name: &str| -> Result<(), (u16, Value)> {
        let bad = |m: &str| Err(status(422, "Invalid", m));
        if l["apiVersion"] != "coordination.k8s.io/v1" || l["kind"] != "Lease" {
            return bad("apiVersion/kind");
        }
        if l["metadata"]["name"] != name {
            return bad("metadata.name");
        }
        if !l["metadata"]["namespace"].is_null() && l["metadata"]["namespace"] != ns.as_str() {
            return bad("metadata.namespace does not match the path");
        }
        if !l["metadata"]["labels"].is_object() {
            return bad("metadata.labels");
        }
        let spec = &l["spec"];
        if !spec["holderIdentity"].is_string() {
            return bad("spec.holderIdentity");
        }
        if !spec["leaseDurationSeconds"]
            .as_i64()
            .is_some_and(|d| d > 0 && d < i32::MAX as i64)
        {
            return bad("spec.leaseDurationSeconds");
        }
        if !is_micro_time(&spec["renewTime"]) || !is_micro_time(&spec["acquireTime"]) {
            return bad("spec.renewTime/acquireTime must be MicroTime");
        }
        if let Some(o) = spec.as_object()
            && let Some(k) = o.keys().find(|k| {
                ![
                    "holderIdentity",
                    "leaseDurationSeconds",
                    "acquireTime",
                    "renewTime",
                    "leaseTransitions",
                ]
                .contains(&k.as_str())
            })
        {
            return bad(&format!("unknown spec field {k}"));
        }
        Ok(())
    };
    match (method, name) {
        ("GET", Some(n)) => match s.leases.get(&(ns, n.clone())) {
            Some(l) => (200, l.clone()),
            None => status(404, "NotFound", &format!("leases \"{n}\" not found")),
        },
        ("DELETE", Some(n)) => match s.leases.remove(&(ns, n.clone())) {
            Some(_) => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            None => status(404, "NotFound", &format!("leases \"{n}\" not found")),
        },
        ("GET", None) => {
            let Some(sel) = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
            else {
                return status(400, "BadRequest", "list without labelSelector");
            };
            let sel = sel.replace("%3D", "=").replace("%2C", ",");
            let mut want = Vec::new();
            for term in sel.split(',') {
                match term.split_once('=') {
                    Some((k, v)) if !k.is_empty() && !k.contains('%') && !v.contains('%') => {
                        want.push((k.to_string(), v.to_string()))
                    }
                    _ => return status(400, "BadRequest", &format!("bad selector {sel}")),
                }
            }
            let items: Vec<Value> = s
                .leases
                .iter()
                .filter(|((n, _), l)| {
                    *n == ns
                        && want
                            .iter()
                            .all(|(k, v)| l["metadata"]["labels"][k.as_str()] == v.as_str())
                })
                .map(|(_, l)| l.clone())
                .collect();
            (
                200,
                json!({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                       "metadata": {"resourceVersion": s.next_rv.to_string()}, "items": items}),
            )
        }
        ("POST", None) => {
            let l = match req.json_body() {
                Ok(l) => l,
                Err(e) => return e,
            };
            let name = l["metadata"]["name"].as_str().unwrap_or("").to_string();
            if let Err(e) = validate(&l, &name) {
                return e;
            }
            if !l["metadata"]["resourceVersion"].is_null() {
                return status(422, "Invalid", "resourceVersion must not be set on create");
            }
            if s.leases.contains_key(&(ns.clone(), name.clone())) {
                return status(409, "AlreadyExists", "exists");
            }
            s.next_rv += 1;
            let mut l = l;
            l["metadata"]["resourceVersion"] = json!(s.next_rv.to_string());
            l["metadata"]["namespace"] = json!(ns);
            s.leases.insert((ns, name), l.clone());
            (201, l)
        }
        ("PUT", Some(n)) => {
            let l = match req.json_body() {
                Ok(l) => l,
                Err(e) => return e,
            };
            if let Err(e) = validate(&l, &n) {
                return e;
            }
            let Some(cur) = s.leases.get(&(ns.clone(), n.clone())) else {
                return status(404, "NotFound", "not found");
            };
            let Some(rv) = l["metadata"]["resourceVersion"].as_str() else {
                return status(
                    422,
                    "Invalid",
                    "metadata.resourceVersion must be specified for an update",
                );
            };
            if cur["metadata"]["resourceVersion"] != rv {
                return status(409, "Conflict", "the object has been modified");
            }
            s.next_rv += 1;
            let mut l = l;
            l["metadata"]["resourceVersion"] = json!(s.next_rv.to_string());
            s.leases.insert((ns, n), l.clone());
            (200, l)
        }
        _ => status(
            405,
            "MethodNotAllowed",
            &format!("{method} not allowed here"),
        ),
    }
}

fn lease(name: &str, labels: Value, renew: &str, dur: u64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-system", "labels": labels},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": dur,
                 "acquireTime": renew, "renewTime": renew}
    })
}

const OLD: &str = "2020-01-01T00:00:00.000000Z";

fn lease_server(
    dir: &std::path::Path,
    p: &Ports,
    id: &str,
    kc: &std::path::Path,
    count: u32,
) -> Proc {
    let mut sa = server_args(p, "grpc");
    sa.extend([
        format!("--server-id={id}"),
        format!("--server-count={count}"),
        "--enable-lease-controller".into(),
        format!("--kubeconfig={}", kc.display()),
        "--lease-namespace=kube-system".into(),
        "--lease-duration=3s".into(),
        "--lease-renewal-interval=300ms".into(),
        "--lease-gc-interval=300ms".into(),
    ]);
    Proc::spawn(&bin("proxy-server"), &sa, dir, id)
}

#[test]
fn servers_hold_renew_collect_and_delete_their_leases() {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let kc = api.kubeconfig(dir.path());
    let label = json!({"k8s-app": "konnectivity-server"});
    api.put(
        "kube-system",
        lease("konnectivity-proxy-server-gone", label.clone(), OLD, 30),
    );
    api.put(
        "kube-system",
        lease("someone-else", json!({"app": "x"}), OLD, 30),
    );
    let (pa, pb) = (Ports::new(), Ports::new());
    let mut sa = lease_server(dir.path(), &pa, "srv-a", &kc, 2);
    let _sb = lease_server(dir.path(), &pb, "srv-b", &kc, 2);
    let name_a = "konnectivity-proxy-server-srv-a";
    wait_for("both leases created", Duration::from_secs(20), || {
        api.get("kube-system", name_a).is_some()
            && api
                .get("kube-system", "konnectivity-proxy-server-srv-b")
                .is_some()
    });
    let l = api.get("kube-system", name_a).unwrap();
    assert_eq!(l["spec"]["holderIdentity"], "srv-a");
    assert_eq!(l["spec"]["leaseDurationSeconds"], 3);
    assert_eq!(l["metadata"]["labels"], label);
    // Renewed: renewTime moves on, acquireTime stays.
    let (rv0, renew0, acq0) = (
        l["metadata"]["resourceVersion"].clone(),
        l["spec"]["renewTime"].clone(),
        l["spec"]["acquireTime"].clone(),
    );
    wait_for("lease renewed", Duration::from_secs(10), || {
        api.get("kube-system", name_a).is_some_and(|l| {
            l["metadata"]["resourceVersion"] != rv0 && l["spec"]["renewTime"] != renew0
        })
    });
    assert_eq!(
        api.get("kube-system", name_a).unwrap()["spec"]["acquireTime"],
        acq0
    );
    // GC: the expired lease with our label goes; the other label stays.
    wait_for("expired lease collected", Duration::from_secs(10), || {
        api.get("kube-system", "konnectivity-proxy-server-gone")
            .is_none()
    });
    assert!(api.get("kube-system", "someone-else").is_some());
    // Stop (SIGTERM): the lease is deleted.
    sa.signal(SIGTERM);
    assert!(
        sa.wait_exit(Duration::from_secs(15)).is_some(),
        "{}",
        sa.log_text()
    );
    assert!(api.get("kube-system", name_a).is_none());
    assert!(
        api.get("kube-system", "konnectivity-proxy-server-srv-b")
            .is_some()
    );
    assert_eq!(api.violations(), Vec::<String>::new());
    let reqs = api.state.lock().unwrap().requests.clone();
    assert!(reqs.iter().any(|r| r.starts_with("PUT ")), "{reqs:?}");
    assert!(
        reqs.iter()
            .any(|r| r.contains("labelSelector=k8s-app%3Dkonnectivity-server")),
        "{reqs:?}"
    );
}

/// Two servers each announcing --server-count=1 behind one haproxy address:
/// an agent counting leases holds both; one trusting the header stops at 1.
#[test]
fn agent_counts_server_leases() {
    if !proxyctl_testkit::require_tool("agent_counts_server_leases", "haproxy") {
        return;
    }
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let kc = api.kubeconfig(dir.path());
    let (pa, pb) = (Ports::new(), Ports::new());
    let _sa = lease_server(dir.path(), &pa, "srv-a", &kc, 1);
    let _sb = lease_server(dir.path(), &pb, "srv-b", &kc, 1);
    wait_for("leases", Duration::from_secs(20), || {
        api.get("kube-system", "konnectivity-proxy-server-srv-a")
            .is_some()
            && api
                .get("kube-system", "konnectivity-proxy-server-srv-b")
                .is_some()
    });
    let (_lb, lb_port) = haproxy(dir.path(), &[pa, pb]);
    let start = |own: &Ports, name: &str, extra: &[String]| {
        let mut aa = agent_args(own);
        aa.retain(|a| !a.starts_with("--proxy-server-port"));
        aa.push(format!("--proxy-server-port={lb_port}"));
        aa.push("--sync-interval=200ms".into());
        aa.extend(extra.iter().cloned());
        Proc::spawn(&bin("proxy-agent"), &aa, dir.path(), name)
    };
    let (pl, ph) = (Ports::new(), Ports::new());
    let counting = start(
        &pl,
        "counting",
        &[
            "--count-server-leases".into(),
            format!("--kubeconfig={}", kc.display()),
            "--lease-namespace=kube-system".into(),
            "--lease-label-selector=k8s-app=konnectivity-server".into(),
            "--lease-poll-interval=300ms".into(),
        ],
    );
    let header = start(&ph, "header", &[]);
    const OPEN: &str = "konnectivity_network_proxy_agent_open_server_connections";
    wait_for("counting agent holds both", Duration::from_secs(30), || {
        metric(pl.agent_health, OPEN) == 2.0
    });
    wait_for("header agent holds one", Duration::from_secs(10), || {
        metric(ph.agent_health, OPEN) == 1.0
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(metric(ph.agent_health, OPEN), 1.0, "{}", header.log_text());
    assert_eq!(
        metric(pl.agent_health, OPEN),
        2.0,
        "{}",
        counting.log_text()
    );
    assert_eq!(api.violations(), Vec::<String>::new());
}

#[test]
fn lease_flags_need_a_kubeconfig_outside_a_pod() {
    let dir = tempfile::tempdir().unwrap();
    let p = Ports::new();
    let mut sa = server_args(&p, "grpc");
    sa.push("--enable-lease-controller".into());
    let out = std::process::Command::new(bin("proxy-server"))
        .args(&sa)
        .current_dir(dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kubeconfig") && err.contains("KUBERNETES_SERVICE_HOST"),
        "{err}"
    );
    let mut aa = agent_args(&p);
    aa.push("--count-server-leases".into());
    aa.push("--kubeconfig=/nonexistent/kubeconfig".into());
    let out = std::process::Command::new(bin("proxy-agent"))
        .args(&aa)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// --kubeconfig-qps/--kubeconfig-burst limit the server's requests: with
/// renewals and collections every 300 ms the server wants several requests
/// a second (client-go's default 5 QPS, burst 10, lets them through); at 1
/// QPS with burst 1 consecutive requests are at least a second apart. Only
/// lower bounds on the gaps are asserted, so a slow machine cannot fail it.
#[test]
fn kubeconfig_qps_and_burst_limit_the_servers_requests() {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let kc = api.kubeconfig(dir.path());
    let p = Ports::new();
    let mut sa = server_args(&p, "grpc");
    sa.extend([
        "--server-id=srv-q".to_string(),
        "--enable-lease-controller".into(),
        format!("--kubeconfig={}", kc.display()),
        "--lease-namespace=kube-system".into(),
        "--lease-duration=3s".into(),
        "--lease-renewal-interval=300ms".into(),
        "--lease-gc-interval=300ms".into(),
        "--kubeconfig-qps=1".into(),
        "--kubeconfig-burst=1".into(),
    ]);
    let server = Proc::spawn(&bin("proxy-server"), &sa, dir.path(), "srv-q");
    wait_for("five API requests", Duration::from_secs(30), || {
        api.state.lock().unwrap().arrived.len() >= 5
    });
    let (arrived, reqs) = {
        let s = api.state.lock().unwrap();
        (s.arrived.clone(), s.requests.clone())
    };
    // The first request may use the burst; every later one waits for a
    // token (1 s at 1 QPS; 0.9 s leaves room for timer rounding).
    for w in arrived.windows(2) {
        let gap = w[1].duration_since(w[0]);
        assert!(
            gap >= Duration::from_millis(900),
            "requests {gap:?} apart at --kubeconfig-qps=1: {reqs:?}\n{}",
            server.log_text()
        );
    }
    assert_eq!(api.violations(), Vec::<String>::new());
}
