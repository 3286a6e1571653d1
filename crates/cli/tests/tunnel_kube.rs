//! How proxy-server and proxy-agent reach the Kubernetes API without a
//! kubeconfig (the pod's service account: `KUBERNETES_SERVICE_HOST`/`_PORT`,
//! token and CA files, the token re-read when it rotates) and with a
//! kubeconfig exec credential plugin (`client.authentication.k8s.io/v1`).
//!
//! No Kubernetes API server can run here, so a strict fake written in this
//! file answers over real TLS (the `proxyctl certs` frontend certificate for
//! 127.0.0.1): it refuses any request without the bearer token it currently
//! accepts (401, as kube-apiserver), serves only the TokenReview and Lease
//! list paths, and records every caller token. The service-account files are
//! laid out in a temp dir the binaries are pointed at with
//! `PROXYCTL_SERVICE_ACCOUNT_DIR`; the exec plugin is a real shell script.

mod tunnel_support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tunnel_support::fake_api::{self, Reply, Request, status};
use tunnel_support::*;

const AUDIENCE: &str = "system:konnectivity-server";
const AGENT_TOKEN: &str = "agent-sa-token";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

struct State {
    /// The caller tokens the fake accepts now.
    accepted: Vec<String>,
    /// (path without query, bearer token or "") of every request.
    seen: Vec<(String, String)>,
}

struct Api {
    state: Arc<Mutex<State>>,
    server: fake_api::FakeServer,
}

impl Api {
    fn start(dir: &Path, accepted: &[&str]) -> Api {
        let state = Arc::new(Mutex::new(State {
            accepted: accepted.iter().map(|s| s.to_string()).collect(),
            seen: Vec::new(),
        }));
        let st = state.clone();
        let server = fake_api::FakeServer::start_tls(
            &dir.join("certs/master/issued/proxy-master.crt"),
            &dir.join("certs/master/private/proxy-master.key"),
            move |req| {
                let (code, body) = answer(&mut st.lock().unwrap(), req);
                Reply::Json(code, body)
            },
        );
        Api { state, server }
    }
    fn accept_only(&self, token: &str) {
        self.state.lock().unwrap().accepted = vec![token.into()];
    }
    fn tokens_seen(&self, path: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, t)| t.clone())
            .collect()
    }
    fn env(&self, sa_dir: &Path) -> Vec<(&'static str, String)> {
        vec![
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT", self.server.port.to_string()),
            ("PROXYCTL_SERVICE_ACCOUNT_DIR", sa_dir.display().to_string()),
        ]
    }
}

/// Records the request, then answers it.
fn answer(s: &mut State, req: &Request) -> (u16, Value) {
    let token = req
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer ").map(String::from))
        .unwrap_or_default();
    let path = req.target.split('?').next().unwrap_or("").to_string();
    s.seen.push((path, token));
    decide(s, req)
}

fn decide(s: &State, req: &Request) -> (u16, Value) {
    if !s.accepted.iter().any(|t| req.unauthorized(t).is_none()) {
        return status(401, "Unauthorized", "wrong or missing bearer token");
    }
    let path = req.target.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        ("GET", LEASES) => {
            if !req.target.contains("labelSelector=") {
                return status(400, "BadRequest", "labelSelector");
            }
            let renew = konnectivity::lease::micro_time(std::time::SystemTime::now());
            let lease = |n: &str| {
                json!({"metadata": {"name": n, "namespace": "kube-system"},
                       "spec": {"holderIdentity": n, "leaseDurationSeconds": 3600, "renewTime": renew}})
            };
            (
                200,
                json!({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                       "items": [lease("a"), lease("b"), lease("c")]}),
            )
        }
        ("POST", REVIEWS) => {
            let r = match req.json_body() {
                Ok(v) => v,
                Err(e) => return e,
            };
            let ok =
                r["spec"]["token"] == AGENT_TOKEN && r["spec"]["audiences"] == json!([AUDIENCE]);
            let st = if ok {
                json!({"authenticated": true, "audiences": [AUDIENCE],
                       "user": {"username": "system:serviceaccount:kube-system:konnectivity-agent"}})
            } else {
                json!({"authenticated": false})
            };
            (
                201,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": r["spec"], "status": st}),
            )
        }
        _ => status(404, "NotFound", &format!("{} {}", req.method, req.target)),
    }
}

/// `dir/sa/{token,ca.crt}` as the kubelet mounts them; `ca` is a
/// `proxyctl certs` CA path relative to `dir`.
fn service_account(dir: &Path, token: &str, ca: &str) -> PathBuf {
    let sa = dir.join("sa");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), token).unwrap();
    std::fs::copy(dir.join(ca), sa.join("ca.crt")).unwrap();
    sa
}

/// A server doing TokenReview authentication of its agents, with `extra` flags.
fn auth_server(dir: &Path, p: &Ports, env: &[(&str, String)], extra: &[String]) -> Proc {
    let mut sa = server_args(p, "grpc");
    sa.retain(|a| !a.starts_with("--cluster-ca-cert"));
    sa.extend(s(&[
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        &format!("--authentication-audience={AUDIENCE}"),
    ]));
    sa.extend(extra.iter().cloned());
    Proc::spawn_env(&bin("proxy-server"), &sa, env, dir, "server")
}

fn token_agent(dir: &Path, p: &Ports) -> Proc {
    std::fs::write(dir.join("agent-token"), AGENT_TOKEN).unwrap();
    let mut aa = agent_args(p);
    aa.retain(|a| !a.starts_with("--agent-cert") && !a.starts_with("--agent-key"));
    aa.push("--service-account-token-path=agent-token".into());
    Proc::spawn(&bin("proxy-agent"), &aa, dir, "agent")
}

/// The server in a pod: no --kubeconfig, the service account's token and
/// CA from the mounted files, TokenReviews over TLS; the agent is let in.
/// The agent in a pod counts server Leases the same way, and when the
/// kubelet rotates the token file the next request carries the new token.
#[test]
fn in_cluster_service_account_for_token_reviews_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let api = Api::start(dir.path(), &["sa-token-1"]);
    let sa = service_account(dir.path(), "sa-token-1\n", "certs/master/issued/ca.crt");
    let env = api.env(&sa);
    let p = Ports::new();
    let server = auth_server(dir.path(), &p, &env, &[]);
    let _agent = token_agent(dir.path(), &p);
    wait_for(
        "agent admitted by TokenReview",
        Duration::from_secs(60),
        || http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200),
    );
    assert!(
        api.tokens_seen(REVIEWS).iter().all(|t| t == "sa-token-1"),
        "{:?}",
        api.tokens_seen(REVIEWS)
    );

    // A lease-counting agent, also in-cluster.
    let mut aa = agent_args(&p);
    aa.retain(|a| {
        !a.contains("-server-port") && !a.contains("agent-cert") && !a.contains("agent-key")
    });
    let (h, ad) = (free_port(), free_port());
    aa.extend([
        format!("--proxy-server-port={}", p.agent),
        format!("--health-server-port={h}"),
        format!("--admin-server-port={ad}"),
        "--service-account-token-path=agent-token".into(),
        "--count-server-leases".into(),
        "--lease-poll-interval=200ms".into(),
    ]);
    let _counter = Proc::spawn_env(&bin("proxy-agent"), &aa, &env, dir.path(), "counter");
    wait_for(
        "lease list with the SA token",
        Duration::from_secs(60),
        || api.tokens_seen(LEASES).iter().any(|t| t == "sa-token-1"),
    );
    // Rotation: the API now accepts only the new token; the file changes.
    api.accept_only("sa-token-2");
    std::fs::write(sa.join("token.new"), "sa-token-2").unwrap();
    std::fs::rename(sa.join("token.new"), sa.join("token")).unwrap();
    wait_for(
        "lease list with the rotated token",
        Duration::from_secs(30),
        || api.tokens_seen(LEASES).iter().any(|t| t == "sa-token-2"),
    );
    // The server's next review uses it too: a second agent gets in.
    let before = api.tokens_seen(REVIEWS).len();
    let p2 = Ports {
        agent_health: free_port(),
        agent_admin: free_port(),
        ..p
    };
    let _agent2 = token_agent(dir.path(), &p2);
    wait_for("second review", Duration::from_secs(60), || {
        api.tokens_seen(REVIEWS).len() > before
            && http_get(p2.agent_health, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert_eq!(
        api.tokens_seen(REVIEWS).last().map(String::as_str),
        Some("sa-token-2")
    );
    drop(server);
}

/// A CA that did not sign the API's certificate: nothing reaches the API
/// (the TLS handshake fails), the agent is refused, and the log says why.
#[test]
fn in_cluster_ca_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let api = Api::start(dir.path(), &["sa-token-1"]);
    let sa = service_account(dir.path(), "sa-token-1", "certs/agent/issued/ca.crt");
    let p = Ports::new();
    let server = auth_server(dir.path(), &p, &api.env(&sa), &[]);
    let _agent = token_agent(dir.path(), &p);
    wait_for("the review to fail", Duration::from_secs(60), || {
        server
            .log_text()
            .to_ascii_lowercase()
            .contains("certificate")
    });
    assert!(api.tokens_seen(REVIEWS).is_empty());
    assert_eq!(http_get(p.health, "/readyz").map(|r| r.0), Some(500));
}

/// Without --kubeconfig and outside a pod the binaries say what is missing
/// and exit 2.
#[test]
fn no_kubeconfig_outside_a_pod_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = Ports::new();
    let mut aa = agent_args(&p);
    aa.push("--count-server-leases".into());
    let out = std::process::Command::new(bin("proxy-agent"))
        .args(&aa)
        .current_dir(dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("KUBERNETES_SERVICE_HOST"), "{err}");
}

/// A kubeconfig whose user is an exec plugin (a relative command, args,
/// env, v1 with interactiveMode): the server runs it without a terminal,
/// sends its token, runs it again when the API answers 401, and the
/// plugin's output and KUBERNETES_EXEC_INFO are as client-go's.
#[test]
fn kubeconfig_exec_plugin_token_refreshed_on_401() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    // The first credential is already revoked: the API accepts only the second.
    let api = Api::start(dir.path(), &["exec-token-2"]);
    let plugin = dir.path().join("bin/cred.sh");
    std::fs::create_dir_all(plugin.parent().unwrap()).unwrap();
    std::fs::write(
        &plugin,
        r#"#!/bin/sh
set -e
[ "$GREETING" = hello ] || { echo "env not passed" >&2; exit 3; }
[ "$1" = --flag ] || { echo "args not passed" >&2; exit 3; }
echo "$KUBERNETES_EXEC_INFO" >> "$(dirname "$0")/info.log"
n=$(($(cat "$(dirname "$0")/count" 2>/dev/null || echo 0) + 1))
echo $n > "$(dirname "$0")/count"
printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"exec-token-%s","expirationTimestamp":"2999-01-01T00:00:00Z"}}' $n
"#,
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let kc = dir.path().join("kubeconfig.yaml");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: certs/master/issued/ca.crt\n\
             users:\n- name: u\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: ./bin/cred.sh\n      args: [--flag]\n      env:\n      - name: GREETING\n        value: hello\n      interactiveMode: Never\n      provideClusterInfo: true\n\
             contexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n",
            api.server.port
        ),
    )
    .unwrap();
    let p = Ports::new();
    let _server = auth_server(
        dir.path(),
        &p,
        &[],
        &[format!("--kubeconfig={}", kc.display())],
    );
    let _agent = token_agent(dir.path(), &p);
    wait_for(
        "agent admitted with the exec credential",
        Duration::from_secs(60),
        || http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200),
    );
    let seen = api.tokens_seen(REVIEWS);
    assert_eq!(seen[..2], ["exec-token-1", "exec-token-2"], "{seen:?}");
    let info = std::fs::read_to_string(dir.path().join("bin/info.log")).unwrap();
    let first: Value = serde_json::from_str(info.lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "ExecCredential");
    assert_eq!(first["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(first["spec"]["interactive"], false);
    assert_eq!(
        first["spec"]["cluster"]["server"],
        format!("https://127.0.0.1:{}", api.server.port)
    );
    assert!(first["spec"]["cluster"]["certificate-authority-data"].is_string());
    // Cached while unexpired: two runs for all reviews so far.
    assert_eq!(info.lines().count(), 2);
}
