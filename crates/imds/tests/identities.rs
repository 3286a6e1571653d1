//! Per-pod cloud identities through imds-proxy.
//!
//! - Stand-in pods (network namespaces the test makes, DNAT of
//!   169.254.169.254:80 to the proxy's listener inside each) run unmodified
//!   azure-identity `ManagedIdentityCredential` against the strict fake on
//!   169.254.169.254 in a "cloud" namespace with no route out.
//! - The single-flight test serves 100 pods on loopback listeners (the
//!   proxy cannot tell them from listeners in pod namespaces; no root
//!   needed) in front of the same fake, and counts what the fake issued.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{IMDS, Proxy, Topology, on, pod_addr};
use imds_proxy::Pod;
use imds_proxy::mock::{self, MockIdentity, MockState};
use imds_proxy::proxy::{Limits, ProxyConfig};
use proxyctl_testkit::{NetNs, require_root, require_tool};

fn pod(name: &str, netns: Option<PathBuf>, labels: &[(&str, &str)]) -> Pod {
    Pod {
        name: name.into(),
        namespace: "default".into(),
        uid: Some(format!("uid-{name}")),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        netns,
        ip: None,
    }
}

/// The Azure rules of both tests: every pod may ask the token endpoint;
/// which identity it gets is the bindings' business.
fn azure_rules(web: &MockIdentity, batch: &MockIdentity) -> String {
    format!(
        r#"
rules:
  - name: tokens
    pods: {{}}
    paths: [ {{ exact: /metadata/identity/oauth2/token }} ]
identities:
  - name: web
    pods: {{ labels: {{ app: web }} }}
    azure: {{ client_id: "{}" }}
  - name: batch
    pods: {{ labels: {{ app: batch }} }}
    azure: {{ msi_res_id: "{}" }}
"#,
        web.client_id,
        batch.msi_res_id.as_deref().unwrap()
    )
}

/// azure-identity inside a pod: prints one JSON line, the token's identity
/// (from the fake's claims) or the exception. Endpoint variables are
/// removed so the SDK picks IMDS as it does on a VM.
const AZURE_APP: &str = r#"
import base64, json, sys
from azure.identity import ManagedIdentityCredential
client_id = sys.argv[1] or None
cred = ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
try:
    t = cred.get_token("https://vault.azure.net/.default")
    part = t.token.split(".")[1]
    claims = json.loads(base64.b64decode(part + "=" * (-len(part) % 4)))
    print(json.dumps({"ok": True, "appid": claims["appid"], "expires_on": t.expires_on}))
except Exception as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}))
"#;

/// Variables that would send the SDKs somewhere other than the metadata
/// service (App Service, Arc, workload identity, explicit credentials).
const SDK_ENDPOINT_VARS: &[&str] = &[
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
];

/// Whether an SDK test can run: root, python3 (and curl), and `import`
/// importable. A missing SDK skips the test with a message, or fails it
/// under CI (scripts/install-deps.sh installs every SDK).
fn sdk_ready(test: &str, import: &str, sdk: &str) -> bool {
    if !(require_root(test) && require_tool(test, "python3") && require_tool(test, "curl")) {
        return false;
    }
    let have = Command::new("python3")
        .args(["-c", &format!("import {import}")])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var("CI").is_err(),
            "{sdk} missing (scripts/install-deps.sh installs it)"
        );
        eprintln!("skipping {test}: {sdk} not installed");
    }
    have
}

/// The three stand-in pods of the SDK tests, redirected to the proxy: web
/// (app=web), batch (app=batch) and unbound (no labels), at 10.98.0.`first`
/// and the two addresses after it.
fn three_pods(tag: &str, first: u8) -> (Topology, Vec<Pod>) {
    let mut topo = Topology::new(tag);
    for i in 0..3 {
        topo.add_pod(&format!("10.98.0.{}", first + i), Some(pod_addr()));
    }
    let pods = vec![
        pod("web", Some(topo.pod(0).path()), &[("app", "web")]),
        pod("batch", Some(topo.pod(1).path()), &[("app", "batch")]),
        pod("unbound", Some(topo.pod(2).path()), &[]),
    ];
    (topo, pods)
}

/// Runs `argv` in `ns` without the variables in `unset` and with `set`;
/// the JSON object the app printed last.
fn app_in(ns: &NetNs, argv: &[&str], unset: &[&str], set: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]).args(argv);
    for var in unset {
        cmd.env_remove(var);
    }
    cmd.envs(set.iter().copied());
    let out = cmd.output().expect("running the app");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| {
        panic!(
            "{argv:?} printed no JSON: stdout {stdout:?} stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn python_in(ns: &NetNs, script: &str, args: &[&str]) -> serde_json::Value {
    let mut argv = vec!["python3", "-c", script];
    argv.extend_from_slice(args);
    app_in(ns, &argv, SDK_ENDPOINT_VARS, &[])
}

/// The SDK tests' refusals are in the audit log: pod web asking for
/// another pod's identity, pod unbound asking with none bound.
fn assert_refusals_audited(audit: &[serde_json::Value]) {
    for (pod, decision) in [
        ("default/web", "wrong_identity"),
        ("default/unbound", "no_identity"),
    ] {
        assert!(
            audit
                .iter()
                .any(|l| l["pod"] == pod && l["decision"] == decision),
            "no {decision} line of {pod}: {audit:#?}"
        );
    }
}

/// How many audit lines show pod web reading `identity` (its label).
fn web_reads(audit: &[serde_json::Value], identity: &str) -> usize {
    audit
        .iter()
        .filter(|l| l["pod"] == "default/web" && l["identity"] == identity)
        .count()
}

/// `python3 -c app` with the clock running 200 times as fast, and `env`
/// (the SDK's metadata timeout, raised so it does not shrink with it).
fn at_200x<'a>(env: &'a str, app: &'a str) -> [&'a str; 8] {
    [
        "env", env, "faketime", "-f", "+0 x200", "python3", "-c", app,
    ]
}

#[test]
fn azure_identity_sdk_gets_its_pods_identity_and_no_other() {
    let test = "azure_identity_sdk_gets_its_pods_identity_and_no_other";
    if !sdk_ready(test, "azure.identity", "azure-identity") {
        return;
    }
    let (topo, pods) = three_pods("imid", 21);
    let ids = topo.mock.identities().to_vec();
    let (system, web_id, batch_id) = (&ids[0], &ids[1], &ids[2]);
    let proxy = Proxy::start(
        &topo,
        &pods,
        &azure_rules(web_id, batch_id),
        Limits::default(),
        None,
    );

    // The web pod's app, asking for its own client id or for none, gets a
    // token for the web identity; the second ask is served from the cache.
    for asked in [web_id.client_id.as_str(), ""] {
        let r = python_in(topo.pod(0), AZURE_APP, &[asked]);
        assert_eq!(r["ok"], true, "web asking {asked:?}: {r}");
        assert_eq!(
            r["appid"],
            web_id.client_id.as_str(),
            "web asking {asked:?}"
        );
    }
    assert_eq!(topo.mock.tokens_issued(&web_id.client_id), 1);
    // Asking for another identity: refused as IMDS refuses, nothing issued.
    for other in [&batch_id.client_id, &system.client_id] {
        let r = python_in(topo.pod(0), AZURE_APP, &[other]);
        assert_eq!(r["ok"], false, "web asking for {other}: {r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains("Identity not found")
                || r["message"].as_str().unwrap().contains("not been assigned"),
            "{r}"
        );
        assert_eq!(topo.mock.tokens_issued(other), 0);
    }
    // The batch pod, bound by resource id, gets the batch identity.
    let r = python_in(topo.pod(1), AZURE_APP, &[""]);
    assert_eq!(r["ok"], true, "batch: {r}");
    assert_eq!(r["appid"], batch_id.client_id.as_str());
    // A pod without a binding gets no token at all, not the node's.
    let r = python_in(topo.pod(2), AZURE_APP, &[""]);
    assert_eq!(r["ok"], false, "unbound: {r}");
    assert_eq!(topo.mock.tokens_issued(&system.client_id), 0);

    let audit = proxy.audit();
    let web_label = format!("azure:client_id={}", web_id.client_id);
    let issued: Vec<_> = audit
        .iter()
        .filter(|l| l["decision"] == "allowed" && l["status"] == 200)
        .collect();
    assert!(
        issued
            .iter()
            .any(|l| l["pod"] == "default/web" && l["identity"] == web_label.as_str()),
        "{audit:#?}"
    );
    assert!(
        issued.iter().all(|l| l["identity"].is_string()),
        "{audit:#?}"
    );
    assert_refusals_audited(&audit);
    let raw = proxy.audit_text();
    assert!(!raw.contains("mock."), "a token reached the audit log");
    let metrics = proxy.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("imds_proxy_credentials_issued_total")
                && l.contains("pod=\"default/web\"")
                && l.contains(&web_label)),
        "{metrics}"
    );
}

/// GETs `target` on `addr` with `Metadata: true`; (status, body).
async fn get(addr: SocketAddr, target: &str) -> (u16, String) {
    get_with(addr, target, "Metadata: true").await
}

/// GETs `target` on `addr` with `Metadata-Flavor: Google`.
async fn get_gcp(addr: SocketAddr, target: &str) -> (u16, String) {
    get_with(addr, target, "Metadata-Flavor: Google").await
}

async fn get_with(addr: SocketAddr, target: &str, header: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: {IMDS}\r\n{header}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_owned())
}

/// The runtime of the 100-pod tests: two workers, as the CI machine has
/// two CPUs.
fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The fake serving `state` on a loopback port of its own: its address,
/// and its task (aborted at the test's end).
async fn serve_fake(state: Arc<MockState>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    (upstream, tokio::spawn(mock::serve(listener, state)))
}

/// `n` loopback pods (no namespace): even ones labelled app=web, odd ones
/// app=batch.
fn web_and_batch_pods(n: usize) -> Vec<Pod> {
    (0..n)
        .map(|i| {
            let app = if i % 2 == 0 { "web" } else { "batch" };
            pod(&format!("p{i}"), None, &[("app", app)])
        })
        .collect()
}

/// GETs `target` with `header` from every pod at once; each answer must be
/// a 200: (pod index, its JSON document), in pod order.
async fn ask_all(
    addrs: &[SocketAddr],
    target: &'static str,
    header: &'static str,
) -> Vec<(usize, serde_json::Value)> {
    let asks: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let addr = *addr;
            tokio::spawn(async move { (i, get_with(addr, target, header).await) })
        })
        .collect();
    let mut docs = Vec::new();
    for ask in asks {
        let (i, (status, body)) = ask.await.unwrap();
        assert_eq!(status, 200, "pod p{i}: {body}");
        docs.push((i, serde_json::from_str(&body).unwrap()));
    }
    docs
}

#[test]
fn one_upstream_request_per_identity_per_refresh_for_100_pods() {
    let rt = two_workers();
    rt.block_on(async {
        // Tokens that live 4 s: the proxy refreshes them after 2 s.
        let state = Arc::new(MockState::with_identities(
            (1..=2).map(MockIdentity::user_assigned).collect(),
            Duration::from_secs(4),
        ));
        let (upstream, fake) = serve_fake(state.clone()).await;
        let ids = state.identities().to_vec();
        let pods = web_and_batch_pods(100);
        // Loopback pods, all asking at once: no rate limit.
        let config = common::quiet_config(&upstream.to_string(), &azure_rules(&ids[1], &ids[2]));
        let (proxy, addrs) = imds_proxy::fuzzing::loopback_pods(config, pods).await;
        let target = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
        let round = || ask_all(&addrs, target, "Metadata: true");
        for refresh in [1, 2] {
            if refresh == 2 {
                // Past the refresh point (half the 4 s life, in whole seconds).
                tokio::time::sleep(Duration::from_millis(3100)).await;
            }
            let tokens = round().await;
            for (i, doc) in &tokens {
                let want = if i % 2 == 0 { &ids[1] } else { &ids[2] };
                assert_eq!(doc["client_id"], want.client_id.as_str(), "pod p{i}");
            }
            // Every pod of one identity got the same token, and the fake
            // issued one per identity for this refresh.
            for (parity, id) in [(0, &ids[1]), (1, &ids[2])] {
                let mut seen: Vec<&str> = tokens
                    .iter()
                    .filter(|(i, _)| i % 2 == parity)
                    .map(|(_, d)| d["access_token"].as_str().unwrap())
                    .collect();
                seen.dedup();
                assert_eq!(seen.len(), 1, "one token per identity, refresh {refresh}");
                assert_eq!(state.tokens_issued(&id.client_id), refresh);
            }
            assert_ne!(
                tokens[0].1["access_token"], tokens[1].1["access_token"],
                "identities never share a token"
            );
        }
        let metrics = proxy.metrics_text();
        assert!(
            metrics.contains("imds_proxy_credential_fetches_total{identity=\"azure:client_id=11111111-0000-0000-0000-000000000001\",outcome=\"ok\"} 2"),
            "{metrics}"
        );
        drop(proxy);
        fake.abort();
    });
}

#[test]
fn an_unreachable_upstream_gets_a_status_sdks_retry_not_a_hang() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Nothing listens on the discard port of loopback.
        let ids: Vec<MockIdentity> = (0..=2)
            .map(|n| {
                if n == 0 {
                    MockIdentity::system_assigned()
                } else {
                    MockIdentity::user_assigned(n)
                }
            })
            .collect();
        let config = ProxyConfig {
            limits: Limits::default(),
            workers: 0,
            ..common::quiet_config("127.0.0.1:9", &azure_rules(&ids[1], &ids[2]))
        };
        let (_proxy, addrs) =
            imds_proxy::fuzzing::loopback_pods(config, vec![pod("w", None, &[("app", "web")])])
                .await;
        let (status, body) = get(
            addrs[0],
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r",
        )
        .await;
        assert_eq!(status, 503, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["error"], "service_unavailable");
    });
}

/// moto's server (a real STS implementation, PyPI moto[server]) inside the
/// node namespace on all of its addresses: the proxy reaches it on
/// loopback, the pods' apps on the node's bridge address. Killed on drop.
struct Moto {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

const MOTO_SERVER: &str = r#"
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="0.0.0.0", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"#;

impl Moto {
    fn start(node: &NetNs) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", node.name(), "python3", "-c", MOTO_SERVER])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting moto");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "moto did not report its port: {line:?}; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Moto {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Variables that would make botocore take credentials from anywhere but
/// the instance metadata service.
const AWS_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
];

/// boto3 in a pod: credentials from the instance metadata service (IMDSv2
/// only), then STS GetCallerIdentity at moto with them, twice, reading the
/// credentials again in between (botocore refreshes credentials that
/// expire within 15 minutes on every use).
const BOTO_APP: &str = r#"
import json, sys
import boto3
session = boto3.Session(region_name="us-east-1")
creds = session.get_credentials()
if creds is None:
    print(json.dumps({"ok": False, "error": "no credentials"}))
    sys.exit(0)
sts = session.client("sts", endpoint_url=sys.argv[1])
first = creds.get_frozen_credentials()
who = sts.get_caller_identity()["Arn"]
again = creds.get_frozen_credentials()
who_again = sts.get_caller_identity()["Arn"]
print(json.dumps({"ok": True, "method": creds.method, "access_key": first.access_key,
                  "access_key_again": again.access_key, "arn": who, "arn_again": who_again}))
"#;

/// boto3 using its credentials for 30 minutes of its own time, run under
/// libfaketime at 200x (9 s of real time): botocore refreshes instance
/// credentials whenever they come within 15 minutes of expiry (after its
/// jittered static-stability extension), so it goes back to the metadata
/// service several times. Prints the access keys it saw.
const BOTO_REFRESH_APP: &str = r#"
import json, time
import boto3
creds = boto3.Session(region_name="us-east-1").get_credentials()
keys = set()
end = time.time() + 1800
while time.time() < end:
    keys.add(creds.get_frozen_credentials().access_key)
    time.sleep(20)
print(json.dumps({"ok": True, "keys": sorted(keys)}))
"#;

fn boto_in(ns: &NetNs, sts_url: &str) -> serde_json::Value {
    boto_run(ns, &["python3", "-c", BOTO_APP, sts_url])
}

fn boto_run(ns: &NetNs, argv: &[&str]) -> serde_json::Value {
    app_in(
        ns,
        argv,
        AWS_VARS,
        &[
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
            ("AWS_EC2_METADATA_V1_DISABLED", "true"),
            // botocore gives the metadata service 1 s and one attempt by
            // default; a first credentials request here waits for moto's
            // first AssumeRole (a cold Python import), which on a loaded
            // 2-CPU machine can take longer. These are botocore's own
            // settings for slow metadata.
            ("AWS_METADATA_SERVICE_TIMEOUT", "10"),
            ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "3"),
        ],
    )
}

/// An IMDSv2 session token (60 s), asked for by `pod`.
fn aws_token(pod: &NetNs) -> common::Curl {
    common::curl(
        pod,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
        ],
        &format!("http://{IMDS}/latest/api/token"),
    )
}

/// A GET of the AWS metadata `path` by `pod` with the session `token`.
fn aws_get(pod: &NetNs, token: &str, path: &str) -> common::Curl {
    common::curl(
        pod,
        &["-H", &format!("X-aws-ec2-metadata-token: {token}")],
        &format!("http://{IMDS}{path}"),
    )
}

#[test]
fn boto3_pods_get_their_own_roles_from_sts_through_the_proxy() {
    let test = "boto3_pods_get_their_own_roles_from_sts_through_the_proxy";
    if !sdk_ready(test, "boto3, moto.server, flask", "boto3/moto[server]") {
        return;
    }
    let (topo, pods) = three_pods("imaw", 31);
    let moto = Moto::start(&topo.node);
    let web_role = "arn:aws:iam::123456789012:role/web-role";
    let batch_role = "arn:aws:iam::123456789012:role/batch-role";
    let rules = format!(
        r#"
rules:
  - name: aws-token
    pods: {{}}
    paths: [ {{ exact: /latest/api/token }} ]
    methods: [PUT]
  - name: aws-read
    pods: {{}}
    paths: [ {{ prefix: /latest/meta-data/ }}, {{ prefix: /latest/meta-data/iam/security-credentials }} ]
identities:
  - name: web
    pods: {{ labels: {{ app: web }} }}
    aws: {{ role_arn: "{web_role}", duration_seconds: 900 }}
  - name: batch
    pods: {{ labels: {{ app: batch }} }}
    aws: {{ role_arn: "{batch_role}" }}
sts: {{ endpoint: "http://127.0.0.1:{}", region: us-east-1 }}
"#,
        moto.port
    );
    let proxy = Proxy::start(&topo, &pods, &rules, Limits::default(), None);
    let sts_url = format!("http://10.98.0.1:{}", moto.port);

    let web = boto_in(topo.pod(0), &sts_url);
    assert_eq!(web["ok"], true, "web: {web}; moto: {}", moto.log());
    assert_eq!(web["method"], "iam-role");
    // STS says who these credentials are: the web role, in a session
    // named after the pod.
    assert_eq!(
        web["arn"], "arn:aws:sts::123456789012:assumed-role/web-role/default@web",
        "{web}"
    );
    assert_eq!(web["arn_again"], web["arn"]);
    let batch = boto_in(topo.pod(1), &sts_url);
    assert_eq!(batch["ok"], true, "batch: {batch}");
    assert_eq!(
        batch["arn"],
        "arn:aws:sts::123456789012:assumed-role/batch-role/default@batch"
    );
    assert_ne!(web["access_key"], batch["access_key"]);
    // The unbound pod: no role listed, so botocore finds no credentials.
    let unbound = boto_in(topo.pod(2), &sts_url);
    assert_eq!(unbound["ok"], false, "unbound: {unbound}");
    // IMDSv1 is off: no token, no answer.
    let credentials = "/latest/meta-data/iam/security-credentials/";
    let v1 = common::curl(topo.pod(0), &[], &format!("http://{IMDS}{credentials}"));
    assert_eq!(v1.status, 401, "{v1:?}");
    // A token obtained by another pod is not this pod's.
    let batch_token = aws_token(topo.pod(1));
    assert_eq!(batch_token.status, 200);
    let stolen = aws_get(
        topo.pod(0),
        &batch_token.body,
        &format!("{credentials}web-role"),
    );
    assert_eq!(stolen.status, 401, "{stolen:?}");
    // Another role's name is not there for this pod.
    let web_token = aws_token(topo.pod(0));
    let other = aws_get(
        topo.pod(0),
        &web_token.body,
        &format!("{credentials}batch-role"),
    );
    assert_eq!(other.status, 404, "{other:?}");
    let listed = aws_get(topo.pod(0), &web_token.body, credentials);
    assert_eq!((listed.status, listed.body.as_str()), (200, "web-role"));

    let audit = proxy.audit();
    let web_label = format!("aws:{web_role}");
    let reads_before = web_reads(&audit, &web_label);
    assert!(reads_before >= 1, "{audit:#?}");
    // botocore refreshes through the proxy; the proxy answers from its
    // cache (STS is asked once per role, checked below).
    if require_tool(test, "faketime") {
        // botocore's 1 s metadata timeout would be 5 ms at 200x.
        let argv = at_200x("AWS_METADATA_SERVICE_TIMEOUT=400", BOTO_REFRESH_APP);
        let r = boto_run(topo.pod(0), &argv);
        assert_eq!(r["keys"].as_array().map(Vec::len), Some(1), "{r}");
        assert_eq!(r["keys"][0], web["access_key"]);
        let audit = proxy.audit();
        let refreshes = web_reads(&audit, &web_label) - reads_before;
        assert!(
            refreshes >= 3,
            "botocore read its credentials {refreshes} more times"
        );
    }
    let metrics = proxy.metrics();
    for role in [web_role, batch_role] {
        assert!(
            metrics.contains(&format!(
                "imds_proxy_credential_fetches_total{{identity=\"aws:{role}\",outcome=\"ok\"}} 1"
            )),
            "{metrics}"
        );
    }
    let raw = proxy.audit_text();
    assert!(
        !raw.contains(web["access_key"].as_str().unwrap()),
        "a key reached the audit log"
    );
}

// ------------------------------------------------------------------ GCP --
//
// There is no emulator of IAM Credentials: these tests run against the
// fake in `imds_proxy::mock::gcp`, which enforces the documented contract
// strictly (a live bearer token it issued with the cloud-platform scope,
// the `-` project wildcard, known fields only, a lifetime of at most an
// hour, Token Creator granted to the caller on the target).

/// The GCP rules: every pod may read the service-accounts directory; which
/// account it sees is the bindings' business. Tokens live `lifetime` s.
fn gcp_rules(web: &str, batch: &str, lifetime: u32, iam: &str) -> String {
    format!(
        r#"
rules:
  - name: gcp-accounts
    pods: {{}}
    paths: [ {{ prefix: /computeMetadata/v1/instance/service-accounts/ }} ]
identities:
  - name: web
    pods: {{ labels: {{ app: web }} }}
    gcp: {{ email: "{web}", lifetime_seconds: {lifetime} }}
  - name: batch
    pods: {{ labels: {{ app: batch }} }}
    gcp: {{ email: "{batch}", lifetime_seconds: {lifetime} }}
gcp: {{ iam_endpoint: "{iam}" }}
"#
    )
}

/// google-auth inside a pod: compute_engine credentials (access token and
/// account email), and an ID token from the metadata identity endpoint.
const GOOGLE_APP: &str = r#"
import json
import google.auth.transport.requests
from google.auth import compute_engine, jwt
req = google.auth.transport.requests.Request()
try:
    cred = compute_engine.Credentials()
    cred.refresh(req)
    idc = compute_engine.IDTokenCredentials(req, "https://svc.example", use_metadata_identity_endpoint=True)
    idc.refresh(req)
    claims = jwt.decode(idc.token, verify=False)
    print(json.dumps({"ok": True, "email": cred.service_account_email, "token": cred.token,
                      "id_email": claims.get("email"), "id_aud": claims["aud"]}))
except Exception as e:
    print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}))
"#;

/// google-auth using its credentials for 30 minutes of its own time under
/// libfaketime at 200x (9 s of real time): it refreshes a token once it
/// comes within 3m45s of expiry, so a 600 s token is refreshed several
/// times, each time through the proxy.
const GOOGLE_REFRESH_APP: &str = r#"
import json, time
import google.auth.transport.requests
from google.auth import compute_engine
req = google.auth.transport.requests.Request()
cred = compute_engine.Credentials()
tokens, refreshes = set(), 0
end = time.time() + 1800
while time.time() < end:
    if not cred.valid:
        cred.refresh(req)
        refreshes += 1
    tokens.add(cred.token)
    time.sleep(20)
print(json.dumps({"ok": True, "tokens": sorted(tokens), "refreshes": refreshes}))
"#;

/// Variables that would point google-auth anywhere but the metadata server.
const GOOGLE_VARS: &[&str] = &[
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GCE_METADATA_HOST",
    "GCE_METADATA_ROOT",
    "GCE_METADATA_IP",
    "GOOGLE_CLOUD_PROJECT",
    "NO_GCE_CHECK",
];

fn google_run(ns: &NetNs, argv: &[&str]) -> serde_json::Value {
    // metadata.google.internal is not resolvable in a stand-in pod; the
    // SDK's documented override names the same address.
    app_in(ns, argv, GOOGLE_VARS, &[("GCE_METADATA_HOST", IMDS)])
}

#[test]
fn google_auth_pods_get_their_own_service_accounts() {
    let test = "google_auth_pods_get_their_own_service_accounts";
    if !sdk_ready(test, "google.auth.compute_engine, requests", "google-auth") {
        return;
    }
    let (topo, pods) = three_pods("imgc", 41);
    // IAM Credentials: the same fake (same accounts and tokens) on the
    // cloud namespace's other address.
    let state = topo.mock.clone();
    on(&topo.cloud_rt, async move {
        let listener = tokio::net::TcpListener::bind("10.99.0.2:8080")
            .await
            .expect("bind IAM fake");
        tokio::spawn(mock::serve(listener, state));
    });
    let gcp = topo.mock.gcp();
    let (web_sa, batch_sa) = (gcp.accounts()[1].clone(), gcp.accounts()[2].clone());
    let rules = gcp_rules(&web_sa, &batch_sa, 600, "http://10.99.0.2:8080");
    let proxy = Proxy::start(&topo, &pods, &rules, Limits::default(), None);

    let web = google_run(topo.pod(0), &["python3", "-c", GOOGLE_APP]);
    assert_eq!(web["ok"], true, "web: {web}");
    assert_eq!(web["email"], web_sa.as_str());
    assert_eq!(web["id_email"], web_sa.as_str());
    assert_eq!(web["id_aud"], "https://svc.example");
    // The fake says whose token it is: the web account's, not the node's.
    assert_eq!(
        gcp.token_owner(web["token"].as_str().unwrap()).as_deref(),
        Some(web_sa.as_str())
    );
    let batch = google_run(topo.pod(1), &["python3", "-c", GOOGLE_APP]);
    assert_eq!(batch["ok"], true, "batch: {batch}");
    assert_eq!(batch["email"], batch_sa.as_str());
    assert_eq!(
        gcp.token_owner(batch["token"].as_str().unwrap()).as_deref(),
        Some(batch_sa.as_str())
    );
    // No account at all for the unbound pod, not the node's.
    let unbound = google_run(topo.pod(2), &["python3", "-c", GOOGLE_APP]);
    assert_eq!(unbound["ok"], false, "unbound: {unbound}");
    let node_sa = gcp.node_account().to_owned();
    // The web pod: its listing names only its account; another account's
    // token is 404 as on the metadata server; no header, 403.
    let sa_url = format!("http://{IMDS}/computeMetadata/v1/instance/service-accounts");
    let flavor = ["-H", "Metadata-Flavor: Google"];
    let listing = common::curl(topo.pod(0), &flavor, &format!("{sa_url}/"));
    assert_eq!(
        (listing.status, listing.body.as_str()),
        (200, format!("default/\n{web_sa}/\n").as_str())
    );
    for other in [&batch_sa, &node_sa] {
        let r = common::curl(topo.pod(0), &flavor, &format!("{sa_url}/{other}/token"));
        assert_eq!(r.status, 404, "{other}: {r:?}");
    }
    let r = common::curl(topo.pod(0), &[], &format!("{sa_url}/default/token"));
    assert_eq!(r.status, 403, "{r:?}");
    let r = common::curl(
        topo.pod(0),
        &[
            "-H",
            "Metadata-Flavor: Google",
            "-H",
            "X-Forwarded-For: 1.2.3.4",
        ],
        &format!("{sa_url}/default/token"),
    );
    assert_eq!(r.status, 403, "{r:?}");
    let r = common::curl(
        topo.pod(0),
        &["-i", "-H", "Metadata-Flavor: Google"],
        &format!("{sa_url}/default/email"),
    );
    assert!(
        r.body
            .to_ascii_lowercase()
            .contains("metadata-flavor: google"),
        "{r:?}"
    );
    assert!(r.body.ends_with(&web_sa), "{r:?}");

    assert_eq!(gcp.access_tokens_issued(&web_sa), 1);
    assert_eq!(gcp.id_tokens_issued(&web_sa), 1);
    assert_eq!(gcp.access_tokens_issued(&node_sa), 0);

    let audit = proxy.audit();
    let web_label = format!("gcp:{web_sa}");
    let reads_before = web_reads(&audit, &web_label);
    assert!(reads_before >= 2, "{audit:#?}");
    assert_refusals_audited(&audit);
    // google-auth refreshes through the proxy, which answers from its
    // cache: still one token and one IAM call for the account.
    if require_tool(test, "faketime") {
        // google-auth's 3 s metadata timeout would be 15 ms at 200x.
        let argv = at_200x("GCE_METADATA_TIMEOUT=400", GOOGLE_REFRESH_APP);
        let r = google_run(topo.pod(0), &argv);
        assert_eq!(r["tokens"].as_array().map(Vec::len), Some(1), "{r}");
        assert_eq!(r["tokens"][0], web["token"]);
        assert!(r["refreshes"].as_u64().unwrap() >= 3, "{r}");
        let refreshes = web_reads(&proxy.audit(), &web_label) - reads_before;
        assert!(
            refreshes >= 3,
            "google-auth read its token {refreshes} more times"
        );
        assert_eq!(gcp.access_tokens_issued(&web_sa), 1);
    }
    let metrics = proxy.metrics();
    for sa in [&web_sa, &batch_sa] {
        assert!(
            metrics.contains(&format!(
                "imds_proxy_credential_fetches_total{{identity=\"gcp:{sa}\",outcome=\"ok\"}} 2"
            )),
            "one access and one ID token fetch for {sa}: {metrics}"
        );
    }
    let raw = proxy.audit_text();
    assert!(!raw.contains("ya29."), "a token reached the audit log");
}

#[test]
fn one_iam_call_per_service_account_per_refresh_for_100_pods() {
    let rt = two_workers();
    rt.block_on(async {
        // The fake serves the metadata server and IAM Credentials alike.
        let state = MockState::new();
        let (upstream, fake) = serve_fake(state.clone()).await;
        let accounts = state.gcp().accounts().to_vec();
        let (web_sa, batch_sa) = (&accounts[1], &accounts[2]);
        let pods = web_and_batch_pods(100);
        // Tokens that live 4 s: the proxy refreshes them after 2 s.
        let config = common::quiet_config(
            &upstream.to_string(),
            &gcp_rules(web_sa, batch_sa, 4, &format!("http://{upstream}")),
        );
        let (proxy, addrs) = imds_proxy::fuzzing::loopback_pods(config, pods).await;
        let target = "/computeMetadata/v1/instance/service-accounts/default/token";
        for refresh in [1, 2] {
            if refresh == 2 {
                tokio::time::sleep(Duration::from_millis(3100)).await;
            }
            let mut tokens: [Vec<String>; 2] = Default::default();
            for (i, doc) in ask_all(&addrs, target, "Metadata-Flavor: Google").await {
                assert!(doc["expires_in"].as_u64().unwrap() <= 4, "{doc}");
                let token = doc["access_token"].as_str().unwrap().to_owned();
                let want = if i % 2 == 0 { web_sa } else { batch_sa };
                assert_eq!(
                    state.gcp().token_owner(&token).as_deref(),
                    Some(want.as_str()),
                    "pod p{i}"
                );
                tokens[i % 2].push(token);
            }
            for (sa, mut seen) in [web_sa, batch_sa].into_iter().zip(tokens) {
                seen.dedup();
                assert_eq!(seen.len(), 1, "one token per account, refresh {refresh}");
                assert_eq!(state.gcp().access_tokens_issued(sa), refresh);
            }
        }
        drop(proxy);
        fake.abort();
    });
}

#[test]
fn gcp_wait_for_change_is_held_past_the_upstream_timeout() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let state = MockState::new();
        let (upstream, fake) = serve_fake(state).await;
        let (_proxy, addr) = imds_proxy::fuzzing::loopback_proxy(
            upstream,
            "w",
            "rules: [{name: gcp, pods: {}, paths: [{prefix: /computeMetadata/v1/}]}]",
            Limits {
                upstream_timeout: Duration::from_millis(500),
                ..Limits::default()
            },
            0,
        )
        .await;
        // Held 2 s by the fake, four times the upstream timeout: still the
        // fake's answer, not a gateway timeout.
        let (status, body) = get_gcp(
            addr,
            "/computeMetadata/v1/project/project-id?wait_for_change=true&timeout_sec=2",
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "mock-project"));
        // The metadata server's edge, checked before anything is forwarded.
        let (status, _) = get(addr, "/computeMetadata/v1/project/project-id").await;
        assert_eq!(status, 403, "no Metadata-Flavor");
        // Instance metadata passes; a recursive listing that would carry
        // the node's service account does not.
        let (status, body) = get_gcp(addr, "/computeMetadata/v1/instance/hostname").await;
        assert_eq!(status, 200, "{body}");
        for target in [
            "/computeMetadata/v1/instance/?recursive=true",
            "/computeMetadata/v1/?recursive=true&alt=json",
        ] {
            let (status, body) = get_gcp(addr, target).await;
            assert_eq!(status, 403, "{target}: {body}");
        }
        fake.abort();
    });
}
