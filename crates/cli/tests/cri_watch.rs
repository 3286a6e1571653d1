//! `proxyctl watch` against a real containerd: 20 pods, half matching,
//! with a containerd restart in the middle.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proxyctl_nft::Target;
use proxyctl_testkit::containerd::{
    Containerd, ContainerdOptions, ExecOutput, GATEWAY, Pod, PodSpec, ProxyStandIn,
};
use proxyctl_testkit::{LoggedChild, free_port, require_root, require_tool, wait_until};

/// The watcher process, killed on drop (even when an assertion fails).
/// A running `proxyctl watch`; its log is printed when a wait fails.
struct Watch(#[allow(dead_code)] LoggedChild);

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Some((status, body))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_for_metric(port: u16, name: &str, want: u64) -> String {
    let mut page = String::new();
    wait_until(
        &format!("{name} >= {want}"),
        Duration::from_secs(30),
        || match http_get(port, "/metrics") {
            Some((200, text)) => {
                page = text;
                metric(&page, name) >= want
            }
            _ => false,
        },
    );
    page
}

/// Root and the tools the containerd harness and the policies need.
fn prerequisites(test: &str) -> bool {
    require_root(test)
        && ["containerd", "ctr", "runc", "nft"]
            .iter()
            .all(|t| require_tool(test, t))
}

/// The names of the policies in the pod's network namespace.
fn policies(pod: &Pod) -> Vec<String> {
    proxyctl_nft::list(&Target::Path(pod.netns.clone()))
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// An HTTP request from inside the pod's container to the gateway: what
/// a redirect sends to the pod's proxy instead.
fn request_to_gateway(cd: &Containerd, pod: &Pod) -> ExecOutput {
    cd.exec(
        &pod.container_id,
        &[
            "sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {GATEWAY} 80"),
        ],
    )
}

fn spec(i: usize) -> PodSpec {
    let app = if matches(i) { "web" } else { "db" };
    PodSpec::new(&format!("pod-{i:02}"))
        .label("app", app)
        .label("index", &i.to_string())
}

fn matches(i: usize) -> bool {
    i.is_multiple_of(2)
}

#[test]
fn watch_applies_to_matching_pods_only_and_survives_a_runtime_restart() {
    let test = "watch_applies_to_matching_pods_only_and_survives_a_runtime_restart";
    if !prerequisites(test) {
        return;
    }
    let cd = Containerd::start(ContainerdOptions::default());
    let policy = cd.dir().join("mesh.yaml");
    std::fs::write(
        &policy,
        "name: mesh\noutboundPort: 15001\nexclude: {uids: [1337]}\n",
    )
    .unwrap();

    // 8 pods exist before the watcher starts.
    let mut pods: Vec<Pod> = (0..8).map(|i| cd.run_pod(&spec(i))).collect();

    let port = free_port();
    let _watch = spawn_watch(&cd, &policy, port, &["--poll-interval-ms", "50"]);
    wait_for_metric(port, "proxyctl_watch_policy_applied_total", 4);
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));

    // 6 more while it runs, then containerd restarts, then 6 more.
    pods.extend((8..14).map(|i| cd.run_pod(&spec(i))));
    wait_for_metric(port, "proxyctl_watch_policy_applied_total", 7);
    cd.stop_containerd();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(port, "/healthz").map(|r| r.0) != Some(503) {
        assert!(
            Instant::now() < deadline,
            "healthz never reported the runtime down"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cd.start_containerd();
    pods.extend((14..20).map(|i| cd.run_pod(&spec(i))));

    let text = wait_for_metric(port, "proxyctl_watch_policy_applied_total", 10);
    // The re-list after the restart found the 7 pods that already had the
    // policy and left them as they were (idempotent).
    let text = if metric(&text, "proxyctl_watch_policy_unchanged_total") < 7 {
        wait_for_metric(port, "proxyctl_watch_policy_unchanged_total", 7)
    } else {
        text
    };
    assert_eq!(
        metric(&text, "proxyctl_watch_policy_applied_total"),
        10,
        "{text}"
    );
    assert_eq!(
        metric(&text, "proxyctl_watch_policy_failed_total"),
        0,
        "{text}"
    );
    assert!(
        metric(&text, "proxyctl_watch_runtime_restarts_total") >= 1,
        "{text}"
    );
    assert!(
        text.contains("proxyctl_watch_apply_seconds_count 10\n"),
        "{text}"
    );
    assert_eq!(http_get(port, "/healthz").map(|r| r.0), Some(200));

    // Every matching pod, and no other, redirects a real connection.
    for (i, pod) in pods.iter().enumerate() {
        let listed = policies(pod);
        if matches(i) {
            assert_eq!(listed, ["mesh"], "{}", pod.name);
            assert_redirected(&cd, pod);
        } else {
            assert!(listed.is_empty(), "{} got {listed:?}", pod.name);
            let proxy = ProxyStandIn::start(&pod.netns, 15001, &pod.name);
            let out = request_to_gateway(&cd, pod);
            assert_ne!(
                out.exit_code, 0,
                "{} was redirected: {}",
                pod.name, out.stdout
            );
            assert_eq!(proxy.accepted(), 0);
        }
    }
}

#[test]
fn watch_refuses_bad_input_with_exit_2_naming_the_flag() {
    let dir = tempfile_dir();
    let good = dir.join("p.yaml");
    std::fs::write(
        &good,
        "name: mesh\noutboundPort: 15001\nexclude: {uids: [1337]}\n",
    )
    .unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "name: mesh\noutboundPort: 0\n").unwrap();
    let missing = dir.join("missing.yaml");
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "--selector",
                "app=web",
                "--policy",
                good.to_str().unwrap(),
                "--events",
                "inotify",
            ],
            "--events",
        ),
        (
            &["--selector", "app", "--policy", good.to_str().unwrap()],
            "--selector",
        ),
        (
            &["--selector", "app=web", "--policy", bad.to_str().unwrap()],
            "--policy",
        ),
        (&["--selector", "app=web"], "--policy"),
        (&["--config", missing.to_str().unwrap()], "--config"),
        (
            &[
                "--selector",
                "app=web",
                "--policy",
                good.to_str().unwrap(),
                "--runtime-endpoint",
                "tcp://x:1",
            ],
            "--runtime-endpoint",
        ),
    ];
    for (args, flag) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_proxyctl"))
            .arg("watch")
            .args(args)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pxt-watch-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn watch_config_file_gives_each_selector_its_own_policy() {
    let test = "watch_config_file_gives_each_selector_its_own_policy";
    if !prerequisites(test) {
        return;
    }
    let cd = Containerd::start(ContainerdOptions::default());
    std::fs::write(
        cd.dir().join("mesh.yaml"),
        "name: mesh\noutboundPort: 15001\nexclude: {uids: [1337]}\n",
    )
    .unwrap();
    let config = cd.dir().join("watch.yaml");
    std::fs::write(
        &config,
        "rules:\n  - selector: app=web\n    policy: mesh.yaml\n  - selector: {app: db}\n    policies: [{name: db, outboundPort: 15002, exclude: {uids: [1337]}}]\n",
    )
    .unwrap();
    let web = cd.run_pod(&PodSpec::new("web").label("app", "web"));
    let db = cd.run_pod(&PodSpec::new("db").label("app", "db"));
    let other = cd.run_pod(&PodSpec::new("other").label("app", "cache"));

    let port = free_port();
    let _watch = spawn_watch_with(
        &cd,
        port,
        &[
            "--config",
            config.to_str().unwrap(),
            "--poll-interval-ms",
            "50",
        ],
    );
    let text = wait_for_metric(port, "proxyctl_watch_policy_applied_total", 2);
    assert_eq!(policies(&web), ["mesh"]);
    assert_eq!(policies(&db), ["db"]);
    assert!(policies(&other).is_empty());
    assert_eq!(
        metric(&text, "proxyctl_watch_pods_matched_total"),
        2,
        "{text}"
    );

    // The db pod's connection goes to ITS proxy port, not the web one.
    let wrong = ProxyStandIn::start(&db.netns, 15001, "wrong");
    let right = ProxyStandIn::start(&db.netns, 15002, "db-proxy");
    let out = request_to_gateway(&cd, &db);
    assert!(out.stdout.ends_with("proxied db-proxy"), "{:?}", out.stdout);
    assert_eq!((right.accepted(), wrong.accepted()), (1, 0));
}

/// `proxyctl watch --selector app=web --policy <policy>` plus `extra`.
fn spawn_watch(cd: &Containerd, policy: &std::path::Path, port: u16, extra: &[&str]) -> Watch {
    let mut args = vec![
        "--selector",
        "app=web",
        "--policy",
        policy.to_str().unwrap(),
    ];
    args.extend(extra);
    spawn_watch_with(cd, port, &args)
}

/// `proxyctl watch <args>` on `cd`'s runtime, metrics on `port`.
fn spawn_watch_with(cd: &Containerd, port: u16, args: &[&str]) -> Watch {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_proxyctl"));
    cmd.arg("watch")
        .args(args)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .arg("--runtime-endpoint")
        .arg(cd.endpoint());
    Watch(LoggedChild::spawn(cmd, "proxyctl watch", None).expect("starting proxyctl watch"))
}

/// A connection from inside the pod's container to the gateway reaches the
/// stand-in proxy on 15001 (the policy redirects it), once.
fn assert_redirected(cd: &Containerd, pod: &Pod) {
    let proxy = ProxyStandIn::start(&pod.netns, 15001, &pod.name);
    let out = request_to_gateway(cd, pod);
    assert_eq!(out.exit_code, 0, "{}: {}", pod.name, out.stderr);
    assert!(
        out.stdout.ends_with(&format!("proxied {}", pod.name)),
        "{}: {:?}",
        pod.name,
        out.stdout
    );
    assert_eq!(proxy.accepted(), 1, "{}", pod.name);
}

const FOUND_BY_EVENT: &str = "proxyctl_watch_pods_found_total{by=\"event\"}";
const FOUND_BY_POLL: &str = "proxyctl_watch_pods_found_total{by=\"poll\"}";

/// With a 10-minute poll interval only containerd's task-start events can
/// get a new pod its policy within the 30 s the metric wait allows; after a
/// containerd restart the watcher subscribes again and events keep working.
#[test]
fn watch_events_drive_it_and_resubscribe_after_a_containerd_restart() {
    let test = "watch_events_drive_it_and_resubscribe_after_a_containerd_restart";
    if !prerequisites(test) {
        return;
    }
    let cd = Containerd::start(ContainerdOptions::default());
    let policy = cd.dir().join("mesh.yaml");
    std::fs::write(
        &policy,
        "name: mesh\noutboundPort: 15001\nexclude: {uids: [1337]}\n",
    )
    .unwrap();
    let port = free_port();
    let _watch = spawn_watch(
        &cd,
        &policy,
        port,
        &["--events", "containerd", "--poll-interval-ms", "600000"],
    );
    wait_for_metric(port, "proxyctl_watch_event_subscriptions_total", 1);

    let first = cd.run_pod(&PodSpec::new("ev-web-1").label("app", "web"));
    let other = cd.run_pod(&PodSpec::new("ev-db-1").label("app", "db"));
    let text = wait_for_metric(port, "proxyctl_watch_policy_applied_total", 1);
    assert!(metric(&text, FOUND_BY_EVENT) >= 1, "{text}");
    assert!(
        metric(&text, "proxyctl_watch_events_received_total") >= 1,
        "{text}"
    );
    assert_eq!(metric(&text, FOUND_BY_POLL), 0, "{text}");
    assert!(
        text.contains("proxyctl_watch_event_stream_up{mode=\"containerd\"} 1\n"),
        "{text}"
    );
    assert_redirected(&cd, &first);
    assert!(policies(&other).is_empty());

    cd.restart_containerd();
    wait_for_metric(port, "proxyctl_watch_event_subscriptions_total", 2);
    let found_before = metric(&wait_for_metric(port, FOUND_BY_EVENT, 1), FOUND_BY_EVENT);
    let second = cd.run_pod(&PodSpec::new("ev-web-2").label("app", "web"));
    let text = wait_for_metric(port, "proxyctl_watch_policy_applied_total", 2);
    assert!(metric(&text, FOUND_BY_EVENT) > found_before, "{text}");
    assert_eq!(metric(&text, FOUND_BY_POLL), 0, "{text}");
    assert_eq!(
        metric(&text, "proxyctl_watch_policy_failed_total"),
        0,
        "{text}"
    );
    assert_redirected(&cd, &second);
}

/// A runtime without containerd's event service (containerd with that one
/// plugin disabled, standing in for CRI-O): `--events auto` polls and still
/// applies; `--events containerd` stops with exit 1 and says why.
#[test]
fn watch_without_the_event_service_polls_in_auto_and_refuses_containerd_mode() {
    let test = "watch_without_the_event_service_polls_in_auto_and_refuses_containerd_mode";
    if !prerequisites(test) {
        return;
    }
    let cd = Containerd::start(ContainerdOptions {
        disabled_plugins: vec!["io.containerd.grpc.v1.events".into()],
        ..Default::default()
    });
    let policy = cd.dir().join("mesh.yaml");
    std::fs::write(
        &policy,
        "name: mesh\noutboundPort: 15001\nexclude: {uids: [1337]}\n",
    )
    .unwrap();

    let mut strict = proxyctl_testkit::spawn_tied(
        Command::new(env!("CARGO_BIN_EXE_proxyctl"))
            .args(["watch", "--selector", "app=web", "--policy"])
            .arg(&policy)
            .args(["--metrics-addr", "127.0.0.1:0", "--events", "containerd"])
            .arg("--runtime-endpoint")
            .arg(cd.endpoint())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = strict.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = strict.kill();
            let _ = strict.wait();
            panic!("--events containerd kept running against a runtime without events");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    strict
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("--events containerd"), "{err}");
    assert!(
        err.contains("containerd.services.events.v1.Events"),
        "{err}"
    );

    let port = free_port();
    let _watch = spawn_watch(&cd, &policy, port, &["--events", "auto"]);
    let pod = cd.run_pod(&PodSpec::new("poll-web").label("app", "web"));
    let text = wait_for_metric(port, "proxyctl_watch_policy_applied_total", 1);
    assert_eq!(
        metric(&text, "proxyctl_watch_events_received_total"),
        0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "proxyctl_watch_event_subscriptions_total"),
        0,
        "{text}"
    );
    assert_eq!(metric(&text, FOUND_BY_EVENT), 0, "{text}");
    assert!(
        text.contains("proxyctl_watch_event_stream_up{mode=\"auto\"} 0\n"),
        "{text}"
    );
    assert_redirected(&cd, &pod);
}
