//! The shipped binaries together on a real containerd: `proxyctl-cni`
//! (chained after bridge) gives annotated pods the metadata DNAT while their
//! sandbox is created; `imds-proxy serve --runtime-endpoint` (a process in
//! the network namespace of a "MSIProxyContainer" pod) learns the pods from
//! CRI; `imds-proxy mock` serves 169.254.169.254 in a test "cloud"
//! namespace linked only to the proxy pod.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use proxyctl_testkit::containerd::{Containerd, ContainerdOptions, PodSpec, metadata_cloud};
use proxyctl_testkit::process::{LoggedChild, wait_until, wait_until_explained};
use proxyctl_testkit::{NetNs, require_root, require_tool};
use serde_json::json;

const TEST: &str = "imds_cri";
const BIN: &str = env!("CARGO_BIN_EXE_imds-proxy");
const PLUGIN: &str = env!("CARGO_BIN_EXE_proxyctl-cni");
const INSTANCE: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";

/// An app's metadata request for `url`, from inside its container.
fn wget_argv(url: &str) -> [&str; 7] {
    ["wget", "-q", "-O", "-", "--header", "Metadata: true", url]
}

#[test]
fn cni_redirect_and_serve_from_cri() {
    if !require_root(TEST) {
        return;
    }
    for tool in ["containerd", "ctr", "runc", "nsenter"] {
        if !require_tool(TEST, tool) {
            return;
        }
    }
    let cd = Containerd::start(ContainerdOptions {
        chained_plugins: vec![json!({
            "type": "proxyctl-cni",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            "rules": [{
                "selector": {"annotations": {"imds-proxy.io/redirect": "true"}},
                "policies": [{"name": "imds", "destinationProxy": {
                    "destination": "169.254.169.254:80", "proxy": "127.0.0.1:15990"}}],
            }],
        })],
        cni_binaries: vec![("proxyctl-cni".into(), PathBuf::from(PLUGIN))],
        ..Default::default()
    });
    let proxy_pod = cd.run_pod(
        &PodSpec::new("msi-proxy")
            .namespace("kube-system")
            .label("role", "MSIProxyContainer"),
    );
    let cloud = metadata_cloud(&proxy_pod, "imcc");
    let mut mock = Command::new("ip");
    mock.args(["netns", "exec", cloud.name(), BIN, "mock", "--listen"])
        .arg("169.254.169.254:80");
    let _mock = LoggedChild::spawn(mock, "imds-proxy mock", None).expect("imds-proxy mock");
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules: [{name: clients, pods: {labels: {role: ClientContainer}}, paths: [{prefix: /metadata/instance}]}]\n",
    )
    .unwrap();
    let mut proxy = Command::new("nsenter");
    proxy
        .arg(format!("--net={}", proxy_pod.netns.display()))
        .args([
            BIN,
            "serve",
            "--upstream",
            "http://169.254.169.254",
            "--rules",
        ])
        .arg(&rules)
        .args([
            "--runtime-endpoint",
            &cd.endpoint(),
            "--reconcile-secs",
            "1",
        ])
        .args(["--admin-listen", "127.0.0.1:0", "--audit-log"])
        .arg(dir.path().join("audit.jsonl"));
    let _proxy = LoggedChild::spawn(proxy, "imds-proxy serve", None).expect("imds-proxy serve");

    let app = |name: &str, role: &str, redirect: bool| {
        let mut spec = PodSpec::new(name).label("role", role);
        if redirect {
            spec = spec.annotation("imds-proxy.io/redirect", "true");
        }
        let pod = cd.run_pod(&spec);
        pod.add_default_route();
        pod
    };
    let client = app("client", "ClientContainer", true);
    let other = app("other", "Other", true);
    let unredirected = app("plain", "ClientContainer", false);
    let wget =
        |pod: &proxyctl_testkit::containerd::Pod| cd.exec(&pod.container_id, &wget_argv(INSTANCE));

    // The DNAT was there from the start; each pod's listener comes with a
    // reconcile (one pod's may come a round after the other's): refused
    // until then, the rules' answer after.
    let once_listened = |pod: &proxyctl_testkit::containerd::Pod| {
        let mut last = None;
        wait_until("a pod's metadata listener", Duration::from_secs(20), || {
            let out = wget(pod);
            let listened = !out.stderr.contains("refused");
            last = Some(out);
            listened
        });
        last.expect("one try at least")
    };
    let out = once_listened(&client);
    assert_eq!(out.exit_code, 0, "{out:?}");
    let body: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(body["compute"]["vmId"].is_string(), "{body}");
    let out = once_listened(&other);
    assert!(out.stderr.contains("403"), "{out:?}");
    // Not redirected: no way to 169.254.169.254 at all (the node drops it).
    let out = cd.exec(
        &unredirected.container_id,
        &[&["timeout", "3"][..], &wget_argv(INSTANCE)].concat(),
    );
    assert_ne!(out.exit_code, 0, "{out:?}");
    assert!(!out.stderr.contains("403"), "{out:?}");
}

/// `curl` inside `ns`: (HTTP status, or 0 when nothing answered; body).
fn curl_in(ns: &NetNs, url: &str) -> (u16, String) {
    let out = ns.exec(&[
        "curl",
        "-sS",
        "-m",
        "3",
        "-H",
        "Metadata: true",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `serve` started before the runtime is up stays up, fail-closed (no pod
/// served, unknown callers refused, /readyz not ready), and becomes ready
/// once the runtime answers. A pod started after that is served on
/// containerd's task-start event: the periodic reconcile is set to an hour,
/// so only the event can have brought its listener.
#[test]
fn serve_waits_for_the_runtime_and_takes_new_pods_on_events() {
    if !require_root(TEST) {
        return;
    }
    for tool in ["containerd", "ctr", "runc", "curl", "nsenter"] {
        if !require_tool(TEST, tool) {
            return;
        }
    }
    // Proxy and fake in a private namespace: fixed ports, loopback only.
    let ns = NetNs::new("imcr");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cri.sock");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules: [{name: clients, pods: {labels: {role: ClientContainer}}, paths: [{prefix: /metadata/instance}]}]\n",
    )
    .unwrap();
    let spawn = |name: &str, args: &[&str]| {
        // nsenter, not `ip netns exec`: that one runs the command in a mount
        // namespace of its own, where pod netns files bind-mounted later are
        // not visible.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .arg(BIN)
            .args(args);
        LoggedChild::spawn(cmd, name, None).expect("spawning imds-proxy")
    };
    let _mock = spawn("imds-proxy mock", &["mock", "--listen", "127.0.0.1:18080"]);
    let mut proxy = spawn(
        "imds-proxy serve",
        &[
            "serve",
            "--upstream",
            "http://127.0.0.1:18080",
            "--rules",
            rules.to_str().unwrap(),
            "--runtime-endpoint",
            &format!("unix://{}", socket.display()),
            "--reconcile-secs",
            "3600",
            "--listen",
            "127.0.0.1:18081",
            "--admin-listen",
            "127.0.0.1:18082",
            "--audit-log",
            dir.path().join("audit.jsonl").to_str().unwrap(),
        ],
    );

    // No runtime behind the endpoint: up, not ready, serving no one.
    wait_until("healthz", Duration::from_secs(10), || {
        curl_in(&ns, "http://127.0.0.1:18082/healthz").0 == 200
    });
    std::thread::sleep(Duration::from_millis(1500)); // a retry or two
    assert!(
        proxy.try_wait().unwrap().is_none(),
        "serve exited without a runtime"
    );
    assert_eq!(curl_in(&ns, "http://127.0.0.1:18082/readyz").0, 503);
    let (code, body) = curl_in(&ns, &INSTANCE.replace("169.254.169.254", "127.0.0.1:18081"));
    assert_eq!(code, 403, "unknown caller before any pod is known: {body}");

    // The runtime appears at the endpoint: ready without a restart.
    let cd = Containerd::start(ContainerdOptions::default());
    std::os::unix::fs::symlink(cd.socket(), &socket).unwrap();
    wait_until(
        "readyz after the runtime came up",
        Duration::from_secs(20),
        || curl_in(&ns, "http://127.0.0.1:18082/readyz").0 == 200,
    );

    // A new pod is served on its start event, long before the periodic
    // reconcile (an hour away).
    let client = cd.run_pod(&PodSpec::new("client").label("role", "ClientContainer"));
    let local = INSTANCE.replace("169.254.169.254", "127.0.0.1:15990");
    let last = std::cell::RefCell::new(None);
    wait_until_explained(
        "the new pod served",
        Duration::from_secs(20),
        || {
            let out = cd.exec(&client.container_id, &wget_argv(&local));
            let ok = out.exit_code == 0;
            *last.borrow_mut() = Some(out);
            ok
        },
        || format!("last try: {:?}", last.borrow()),
    );
    let out = last.into_inner().unwrap();
    let body: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(body["compute"]["vmId"].is_string(), "{body}");
    assert!(proxy.try_wait().unwrap().is_none(), "serve exited");
}
