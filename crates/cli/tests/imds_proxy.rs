//! The `imds-proxy` binary: bad flags exit 2 naming the flag; `mock` and
//! `serve` work together as processes inside a test namespace, with real
//! curl as the app and the admin endpoints answering.

use std::process::{Command, Output};
use std::time::Duration;

use proxyctl_testkit::{LoggedChild, NetNs, require_root, require_tool, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_imds-proxy");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running imds-proxy")
}

#[test]
fn bad_input_exits_2_and_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let good_rules = dir.path().join("rules.yaml");
    std::fs::write(&good_rules, "rules: []\n").unwrap();
    let bad_rules = dir.path().join("bad.yaml");
    std::fs::write(
        &bad_rules,
        "rules: [{name: x, pods: {}, paths: [{prefix: /}], surprise: 1}]\n",
    )
    .unwrap();
    let pods = dir.path().join("pods.yaml");
    std::fs::write(&pods, "pods: [{name: a, nope: 1}]\n").unwrap();
    let g = good_rules.to_str().unwrap();
    let b = bad_rules.to_str().unwrap();
    let p = pods.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "serve",
                "--upstream",
                "https://169.254.169.254",
                "--rules",
                g,
                "--listen",
                "127.0.0.1:0",
            ],
            "--upstream",
        ),
        (
            vec![
                "serve",
                "--upstream",
                "http://x/path",
                "--rules",
                g,
                "--listen",
                "127.0.0.1:0",
            ],
            "--upstream",
        ),
        (
            vec![
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--rules",
                b,
                "--listen",
                "127.0.0.1:0",
            ],
            "--rules",
        ),
        (
            vec![
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--rules",
                "/nonexistent/rules.yaml",
                "--listen",
                "127.0.0.1:0",
            ],
            "--rules",
        ),
        (
            vec![
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--rules",
                g,
                "--pods",
                p,
            ],
            "--pods",
        ),
        (
            vec![
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--rules",
                g,
                "--runtime-endpoint",
                "tcp://127.0.0.1:1",
            ],
            "--runtime-endpoint",
        ),
        (
            vec![
                "serve",
                "--upstream",
                "http://127.0.0.1:1",
                "--rules",
                g,
                "--pods",
                p,
                "--runtime-endpoint",
                "unix:///run/containerd/containerd.sock",
            ],
            "--runtime-endpoint",
        ),
        (vec!["mock", "--listen", "not-an-address"], "--listen"),
    ];
    for (args, flag) in cases {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} should name {flag}: {stderr}"
        );
    }
}

/// `imds-proxy ARGS` inside `ns`; its log is printed when a wait fails.
fn spawn_in(ns: &NetNs, args: &[&str]) -> LoggedChild {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), BIN]).args(args);
    LoggedChild::spawn(cmd, &format!("imds-proxy {}", args[0]), None).expect("spawning imds-proxy")
}

fn curl(ns: &NetNs, args: &[&str]) -> (i32, String) {
    let out = ns.exec(&[&["curl", "-sS", "-m", "3", "-w", "\n%{http_code}"], args].concat());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn wait_for(ns: &NetNs, url: &str) {
    wait_until(
        &format!("{url} in {}", ns.name()),
        Duration::from_secs(30),
        || {
            ns.exec(&["curl", "-sf", "-m", "1", "-H", "Metadata: true", url])
                .status
                .success()
        },
    );
}

#[test]
fn mock_and_serve_work_as_processes() {
    let test = "mock_and_serve_work_as_processes";
    if !require_root(test) || !require_tool(test, "curl") {
        return;
    }
    let ns = NetNs::new("imdcli");
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - name: clients\n    pods: { labels: { role: ClientContainer } }\n    paths: [ { prefix: /metadata/instance } ]\n",
    )
    .unwrap();
    let pods = dir.path().join("pods.yaml");
    std::fs::write(
        &pods,
        format!(
            "pods:\n  - name: app\n    labels: {{ role: ClientContainer }}\n    netns: {}\n",
            ns.path().display()
        ),
    )
    .unwrap();
    let audit = dir.path().join("audit.jsonl");
    let _mock = spawn_in(&ns, &["mock", "--listen", "127.0.0.1:16990"]);
    wait_for(&ns, "http://127.0.0.1:16990/metadata/versions");
    let _proxy = spawn_in(
        &ns,
        &[
            "serve",
            "--upstream",
            "http://127.0.0.1:16990",
            "--rules",
            rules.to_str().unwrap(),
            "--pods",
            pods.to_str().unwrap(),
            "--pod-listen",
            "127.0.0.1:15990",
            "--admin-listen",
            "127.0.0.1:15991",
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    );
    wait_for(&ns, "http://127.0.0.1:15991/readyz");
    let (exit, out) = curl(
        &ns,
        &[
            "-H",
            "Metadata: true",
            "http://127.0.0.1:15990/metadata/instance?api-version=2021-02-01",
        ],
    );
    assert_eq!(exit, 0);
    assert!(out.ends_with("\n200") && out.contains("\"vmId\""), "{out}");
    let (_, out) = curl(
        &ns,
        &["http://127.0.0.1:15990/metadata/instance?api-version=2021-02-01"],
    );
    assert!(
        out.ends_with("\n400") && out.contains("Required metadata header"),
        "{out}"
    );
    let (_, out) = curl(
        &ns,
        &[
            "-H",
            "Metadata: true",
            "http://127.0.0.1:15990/metadata/versions",
        ],
    );
    assert!(out.ends_with("\n403"), "{out}");
    let (_, health) = curl(&ns, &["http://127.0.0.1:15991/healthz"]);
    assert!(health.ends_with("\n200"), "{health}");
    let (_, metrics) = curl(&ns, &["http://127.0.0.1:15991/metrics"]);
    assert!(
        metrics.contains(
            "imds_proxy_requests_total{pod=\"default/app\",decision=\"allowed\",code=\"200\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("imds_proxy_pod_listeners 1"), "{metrics}");
    // The audit writer runs beside the requests: give it a moment.
    let mut lines = String::new();
    for _ in 0..40 {
        lines = std::fs::read_to_string(&audit).unwrap_or_default();
        if lines.lines().count() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lines.lines().count(), 3, "{lines}");
    assert!(
        lines.contains("\"decision\":\"missing_metadata_header\""),
        "{lines}"
    );
}
