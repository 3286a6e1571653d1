//! The `imds-proxy` binary: bad flags exit 2 naming the flag; `mock` and
//! `serve` work together as processes inside a test namespace, with real
//! curl as the app and the admin endpoints answering.

use std::process::{Command, Output};
use std::time::Duration;

use proxyctl_testkit::{NetNs, require_root, require_tool, wait_until};

mod imds_support;
use imds_support::{ADMIN, BIN, INSTANCE, MOCK, POD_LISTEN, ServeFiles, spawn_mock};

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running imds-proxy")
}

/// `serve --upstream UPSTREAM --rules RULES REST...`
fn serve<'a>(upstream: &'a str, rules: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    [
        &["serve", "--upstream", upstream, "--rules", rules][..],
        rest,
    ]
    .concat()
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
    let listen = ["--listen", "127.0.0.1:0"];
    let nowhere = "http://127.0.0.1:1";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (serve("https://169.254.169.254", g, &listen), "--upstream"),
        (serve("http://x/path", g, &listen), "--upstream"),
        (serve(nowhere, b, &listen), "--rules"),
        (
            serve(nowhere, "/nonexistent/rules.yaml", &listen),
            "--rules",
        ),
        (serve(nowhere, g, &["--pods", p]), "--pods"),
        (
            serve(nowhere, g, &["--runtime-endpoint", "tcp://127.0.0.1:1"]),
            "--runtime-endpoint",
        ),
        (
            serve(
                nowhere,
                g,
                &[
                    "--pods",
                    p,
                    "--runtime-endpoint",
                    "unix:///run/containerd/containerd.sock",
                ],
            ),
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
    let files = ServeFiles::new(&[("app", &ns)]);
    let _mock = spawn_mock(&ns);
    wait_for(&ns, &format!("http://{MOCK}/metadata/versions"));
    let _proxy = files.spawn_serve(&ns, &[]);
    wait_for(&ns, &format!("http://{ADMIN}/readyz"));
    let instance = format!("http://{POD_LISTEN}{INSTANCE}");
    let (exit, out) = curl(&ns, &["-H", "Metadata: true", &instance]);
    assert_eq!(exit, 0);
    assert!(out.ends_with("\n200") && out.contains("\"vmId\""), "{out}");
    let (_, out) = curl(&ns, &[&instance]);
    assert!(
        out.ends_with("\n400") && out.contains("Required metadata header"),
        "{out}"
    );
    let (_, out) = curl(
        &ns,
        &[
            "-H",
            "Metadata: true",
            &format!("http://{POD_LISTEN}/metadata/versions"),
        ],
    );
    assert!(out.ends_with("\n403"), "{out}");
    let (_, health) = curl(&ns, &[&format!("http://{ADMIN}/healthz")]);
    assert!(health.ends_with("\n200"), "{health}");
    let (_, metrics) = curl(&ns, &[&format!("http://{ADMIN}/metrics")]);
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
        lines = std::fs::read_to_string(&files.audit).unwrap_or_default();
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
