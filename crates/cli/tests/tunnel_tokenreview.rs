//! Agent token authentication (`--agent-namespace`,
//! `--agent-service-account`, `--authentication-audience`, `--kubeconfig`)
//! with real proxy-server and proxy-agent processes, against a strict fake
//! of the authentication.k8s.io/v1 TokenReview API over plain HTTP, written
//! here: no Kubernetes API server can run on this machine. The fake checks
//! the method, path, content type, the caller's bearer token from the
//! kubeconfig and the body (apiVersion, kind, spec.token, spec.audiences,
//! no other spec field); any deviation is recorded and fails the test.

mod tunnel_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tunnel_support::fake_api::{self, Reply, Request, status};
use tunnel_support::*;

/// The proxy server's own credential toward the API (from its kubeconfig).
const SERVER_TOKEN: &str = "proxy-server-credential";
const AUDIENCE: &str = "system:konnectivity-server";
const NAMESPACE: &str = "kube-system";
const SERVICE_ACCOUNT: &str = "konnectivity-agent";
const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// How the fake answers.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// TokenReviews by the known-token table.
    Reviews,
    /// 200 with a body that is not JSON.
    Garbage,
}

struct State {
    /// token -> username; a token not in the table is unauthenticated.
    known: BTreeMap<String, String>,
    answer: Answer,
    /// (spec.token, spec.audiences) of every well-formed review.
    reviews: Vec<(String, Value)>,
    violations: Vec<String>,
}

struct FakeApi {
    port: u16,
    state: Arc<Mutex<State>>,
    _server: fake_api::FakeServer,
}

impl FakeApi {
    fn start(known: &[(&str, &str)], answer: Answer) -> FakeApi {
        let state = Arc::new(Mutex::new(State {
            known: known
                .iter()
                .map(|(t, u)| (t.to_string(), u.to_string()))
                .collect(),
            answer,
            reviews: Vec::new(),
            violations: Vec::new(),
        }));
        let st = state.clone();
        let server = fake_api::FakeServer::start(move |req| serve(req, &st));
        FakeApi {
            port: server.port,
            state,
            _server: server,
        }
    }
    fn reviews(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().reviews.clone()
    }
    fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }
}

fn kubeconfig(dir: &Path, port: u16) -> PathBuf {
    fake_api::kubeconfig(dir, port, SERVER_TOKEN)
}

fn serve(req: &Request, st: &Mutex<State>) -> Reply {
    let mut s = st.lock().unwrap();
    if s.answer == Answer::Garbage {
        return Reply::Raw(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!",
        );
    }
    let (code, out) = handle(&mut s, req);
    if code >= 300 {
        s.violations.push(format!(
            "{} {} -> {code}: {}",
            req.method, req.target, out["message"]
        ));
    }
    Reply::Json(code, out)
}

fn handle(s: &mut State, req: &Request) -> (u16, Value) {
    if let Some(refused) = req.unauthorized(SERVER_TOKEN) {
        return refused;
    }
    let (method, target) = (req.method.as_str(), req.target.as_str());
    if target != PATH {
        return status(404, "NotFound", &format!("unexpected path {target}"));
    }
    if method != "POST" {
        return status(405, "MethodNotAllowed", &format!("{method} not allowed"));
    }
    let r = match req.json_body() {
        Ok(v) => v,
        Err(e) => return e,
    };
    if r["apiVersion"] != "authentication.k8s.io/v1" || r["kind"] != "TokenReview" {
        return status(400, "BadRequest", "apiVersion/kind");
    }
    let spec = &r["spec"];
    let Some(token) = spec["token"].as_str() else {
        return status(422, "Invalid", "spec.token");
    };
    let audiences = spec["audiences"].clone();
    if !audiences
        .as_array()
        .is_some_and(|a| a.iter().all(Value::is_string))
    {
        return status(422, "Invalid", "spec.audiences must be a list of strings");
    }
    if let Some(k) = spec.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["token", "audiences"].contains(&k.as_str()))
    }) {
        return status(422, "Invalid", &format!("unknown spec field {k}"));
    }
    s.reviews.push((token.to_string(), audiences.clone()));
    // As kube-apiserver: a token is valid only for the audience it was
    // issued for, and the answer names the audiences it matched.
    let status = match s.known.get(token) {
        Some(user) if audiences == json!([AUDIENCE]) => {
            json!({"authenticated": true, "user": {"username": user, "uid": "1234"}, "audiences": [AUDIENCE]})
        }
        _ => json!({"authenticated": false, "user": {}}),
    };
    (
        201,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {"creationTimestamp": null}, "spec": spec, "status": status}),
    )
}

fn auth_server(dir: &Path, p: &Ports, kc: &Path) -> Proc {
    let mut sa = server_args(p, "grpc");
    // Upstream refuses --cluster-ca-cert with token authentication.
    sa.retain(|a| !a.starts_with("--cluster-ca-cert"));
    sa.extend([
        format!("--agent-namespace={NAMESPACE}"),
        format!("--agent-service-account={SERVICE_ACCOUNT}"),
        format!("--authentication-audience={AUDIENCE}"),
        format!("--kubeconfig={}", kc.display()),
    ]);
    Proc::spawn(&bin("proxy-server"), &sa, dir, "server")
}

/// An agent sending the token in `token` (none when None).
fn agent(dir: &Path, p: &Ports, token: Option<&str>) -> Proc {
    let mut aa = agent_args(p);
    if let Some(t) = token {
        std::fs::write(dir.join("token"), t).unwrap();
        aa.push("--service-account-token-path=token".into());
    }
    Proc::spawn(&bin("proxy-agent"), &aa, dir, "agent")
}

/// One labelled sample of a metric (0 when absent, -1 when unreachable).
fn metric_kind(port: u16, name: &str, kind: &str) -> f64 {
    let Some((_, body)) = http_get(port, "/metrics") else {
        return -1.0;
    };
    let prefix = format!("{name}{{kind=\"{kind}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0.0)
}

fn logs(server: &Proc, agent: &Proc) -> String {
    format!(
        "--- server ---\n{}\n--- agent ---\n{}",
        server.log_text(),
        agent.log_text()
    )
}

const BAD: &str = "konnectivity_network_proxy_server_bad_input_total";
const READY: &str = "konnectivity_network_proxy_server_ready_backend_connections";

fn request(dir: &Path, p: &Ports, backend: u16) -> (bool, String) {
    test_client_request(dir, p.server, backend)
}

#[test]
fn agent_with_a_valid_token_connects_and_tunnels() {
    let api = FakeApi::start(
        &[(
            "good-agent-token",
            "system:serviceaccount:kube-system:konnectivity-agent",
        )],
        Answer::Reviews,
    );
    let backend = HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let kc = kubeconfig(dir.path(), api.port);
    let p = Ports::new();
    let server = auth_server(dir.path(), &p, &kc);
    let agent = agent(dir.path(), &p, Some("good-agent-token\n"));
    wait_for("server /readyz", Duration::from_secs(60), || {
        http_get(p.health, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    wait_for("agent /readyz", Duration::from_secs(30), || {
        http_get(p.agent_health, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    let (ok, out) = request(dir.path(), &p, backend.port);
    assert!(
        ok && out.contains("success: hello"),
        "{out}\n{}",
        logs(&server, &agent)
    );
    assert_eq!(metric(p.health, READY), 1.0);
    assert_eq!(
        api.reviews(),
        vec![("good-agent-token".to_string(), json!([AUDIENCE]))],
        "{}",
        logs(&server, &agent)
    );
    assert_eq!(api.violations(), Vec::<String>::new());
}

/// Each refused agent: no backend, the refusal counted, the agent retrying
/// and the server still serving; the agent sees upstream's message.
#[test]
fn agents_failing_authentication_are_refused() {
    let api = FakeApi::start(
        &[
            (
                "other-namespace",
                "system:serviceaccount:default:konnectivity-agent",
            ),
            (
                "other-account",
                "system:serviceaccount:kube-system:someone-else",
            ),
            ("a-node", "system:node:kube-system:node-1"),
        ],
        Answer::Reviews,
    );
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let kc = kubeconfig(dir.path(), api.port);
    let cases: [(Option<&str>, &str, &str); 5] = [
        (
            Some("other-namespace"),
            "agent_token_refused",
            "incoming request from \"default\" namespace. Expected \"kube-system\"",
        ),
        (
            Some("other-account"),
            "agent_token_refused",
            "incoming request from \"someone-else\" service account. Expected \"konnectivity-agent\"",
        ),
        (
            Some("a-node"),
            "agent_token_refused",
            "username returned is not a service account",
        ),
        (
            Some("not-a-known-token"),
            "agent_token_refused",
            "service account jwt not valid",
        ),
        (
            None,
            "agent_token_missing",
            "Authentication context was not found in metadata",
        ),
    ];
    for (token, kind, message) in cases {
        let reviews_before = api.reviews().len();
        let p = Ports::new();
        let mut server = auth_server(dir.path(), &p, &kc);
        let mut agent = agent(dir.path(), &p, token);
        // Two refusals: the agent tried again after the first.
        wait_for(
            &format!("{token:?} refused twice"),
            Duration::from_secs(60),
            || metric_kind(p.health, BAD, kind) >= 2.0,
        );
        assert_eq!(metric(p.health, READY), 0.0, "{}", logs(&server, &agent));
        assert_eq!(
            http_get(p.health, "/readyz").map(|(s, _)| s),
            Some(500),
            "{}",
            logs(&server, &agent)
        );
        assert_ne!(
            http_get(p.agent_health, "/readyz").map(|(s, _)| s),
            Some(200)
        );
        let alive = server.alive() && agent.alive();
        assert!(alive, "{}", logs(&server, &agent));
        // tonic quotes the status message: compare without its escapes.
        assert!(
            agent.log_text().replace('\\', "").contains(message),
            "{message}\n{}",
            logs(&server, &agent)
        );
        let reviewed: Vec<_> = api.reviews()[reviews_before..].to_vec();
        match token {
            Some(t) => {
                assert!(reviewed.len() >= 2, "{reviewed:?}");
                assert!(
                    reviewed
                        .iter()
                        .all(|(tk, aud)| tk == t && *aud == json!([AUDIENCE])),
                    "{reviewed:?}"
                );
            }
            // No token, no review.
            None => assert_eq!(reviewed, vec![]),
        }
        server.kill();
        agent.kill();
    }
    assert_eq!(api.violations(), Vec::<String>::new());
}

/// An API server that cannot be reached, or that answers garbage: the agent
/// is refused, never let in.
#[test]
fn agents_are_refused_when_the_review_cannot_be_made() {
    let garbage = FakeApi::start(&[], Answer::Garbage);
    let down = free_port();
    for (api_port, what) in [(down, "Connection refused"), (garbage.port, "JSON body")] {
        let dir = tempfile::tempdir().unwrap();
        make_certs(dir.path());
        let kc = kubeconfig(dir.path(), api_port);
        let p = Ports::new();
        let server = auth_server(dir.path(), &p, &kc);
        let agent = agent(dir.path(), &p, Some("any-token"));
        wait_for(
            &format!("refusal with the API {what}"),
            Duration::from_secs(60),
            || metric_kind(p.health, BAD, "agent_token_review_failed") >= 2.0,
        );
        assert_eq!(metric(p.health, READY), 0.0, "{}", logs(&server, &agent));
        assert_eq!(http_get(p.health, "/readyz").map(|(s, _)| s), Some(500));
        assert!(
            agent.log_text().contains("Failed to authenticate request"),
            "{}",
            logs(&server, &agent)
        );
        assert!(
            server.log_text().contains(what),
            "{what}\n{}",
            logs(&server, &agent)
        );
    }
}

#[test]
fn incomplete_token_flags_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), 1);
    let p = Ports::new();
    let full = [
        format!("--agent-namespace={NAMESPACE}"),
        format!("--agent-service-account={SERVICE_ACCOUNT}"),
        format!("--authentication-audience={AUDIENCE}"),
        format!("--kubeconfig={}", kc.display()),
    ];
    let run = |drop_flag: Option<&str>, keep_ca: bool| {
        let mut sa = server_args(&p, "grpc");
        if !keep_ca {
            sa.retain(|a| !a.starts_with("--cluster-ca-cert"));
        }
        sa.extend(
            full.iter()
                .filter(|f| drop_flag.is_none_or(|d| !f.starts_with(d)))
                .cloned(),
        );
        let out = std::process::Command::new(bin("proxy-server"))
            .args(&sa)
            .current_dir(dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for flag in [
        "--agent-namespace",
        "--agent-service-account",
        "--authentication-audience",
    ] {
        let (code, err) = run(Some(flag), false);
        assert_eq!(code, Some(2), "without {flag}: {err}");
        assert!(
            err.contains(&format!(
                "{flag}: cannot be empty when agent authentication is enabled"
            )),
            "without {flag}: {err}"
        );
    }
    // Without --kubeconfig the pod's service account is used; outside a
    // pod that is an error naming what is missing.
    let (code, err) = run(Some("--kubeconfig"), false);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--kubeconfig") && err.contains("KUBERNETES_SERVICE_HOST"),
        "{err}"
    );
    let (code, err) = run(None, true);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--cluster-ca-cert: can not be used when agent authentication is enabled"),
        "{err}"
    );
    // An unreadable kubeconfig is named too.
    let mut sa = server_args(&p, "grpc");
    sa.retain(|a| !a.starts_with("--cluster-ca-cert"));
    sa.extend(full[..3].iter().cloned());
    sa.push("--kubeconfig=/nonexistent/kubeconfig".into());
    let out = std::process::Command::new(bin("proxy-server"))
        .args(&sa)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kubeconfig"));
}
