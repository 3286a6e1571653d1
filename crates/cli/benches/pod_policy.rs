//! Pod start -> policy enforced, on a real containerd (testkit harness).
//! Run as root: `cargo bench -p proxyctl-cli --bench pod_policy`.
//!
//! - watch mode: `proxyctl watch` lists pods through CRI, either on a timer
//!   (`--events poll`) or on containerd's task-start events (`--events
//!   containerd`, timer at its 5 s safety-net default); latency from the
//!   sandbox being ready (RunPodSandbox returned) and from the app being
//!   started (StartContainer returned) to the policy being in the kernel
//!   (read back over netlink every 0.5 ms). 0 means it was already there.
//! - CNI mode: RunPodSandbox with and without proxyctl-cni chained, on two
//!   containerds at once, alternating (the difference is what ADD adds to
//!   pod start), and ADD alone, exec'd directly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proxyctl_nft::Target;
use proxyctl_testkit::NetNs;
use proxyctl_testkit::containerd::{Containerd, ContainerdOptions, PodSpec};

const PODS: usize = 50;

fn enforced(netns: &Path) -> bool {
    !proxyctl_nft::list(&Target::Path(netns.to_path_buf()))
        .unwrap_or_default()
        .is_empty()
}

fn wait_enforced(netns: &Path, since: Instant) -> Duration {
    if enforced(netns) {
        return Duration::ZERO;
    }
    loop {
        std::thread::sleep(Duration::from_micros(500));
        if enforced(netns) {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(30), "never enforced");
    }
}

fn pct(samples: &[Duration], p: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx]
}

fn row(name: &str, samples: &[Duration], note: &str) {
    println!(
        "| {name:<54} | {:>3} | {:>8.2} | {:>8.2} | {note}",
        samples.len(),
        pct(samples, 0.5),
        pct(samples, 0.99)
    );
}

/// `--events` and its extra flags, as the table names it.
struct Mode {
    name: String,
    args: Vec<String>,
}

fn poll_mode(ms: u64) -> Mode {
    Mode {
        name: format!("poll {ms} ms"),
        args: ["--events", "poll", "--poll-interval-ms", &ms.to_string()]
            .map(String::from)
            .to_vec(),
    }
}

fn events_mode() -> Mode {
    Mode {
        name: "containerd events".into(),
        args: ["--events", "containerd"].map(String::from).to_vec(),
    }
}

/// One counter from the watcher's /metrics (0 when unreadable).
fn metric(port: u16, name: &str) -> u64 {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What the watcher did: pods found by an event-triggered list, CRI lists.
struct WatcherWork {
    by_event: u64,
    lists: u64,
}

fn watch_mode(mode: &Mode) -> (Vec<Duration>, Vec<Duration>, WatcherWork) {
    let cd = Containerd::start(ContainerdOptions::default());
    let policy = cd.dir().join("mesh.yaml");
    std::fs::write(
        &policy,
        "name: mesh\noutboundPort: 15001\nexclude: {uids: [1337]}\n",
    )
    .unwrap();
    // Claimed below the ephemeral range, so no other process takes it
    // before watch binds it.
    let port = proxyctl_testkit::free_port();
    let mut watch = Command::new(env!("CARGO_BIN_EXE_proxyctl"))
        .args(["watch", "--selector", "app=web", "--policy"])
        .arg(&policy)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(&mode.args)
        .arg("--runtime-endpoint")
        .arg(cd.endpoint())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (mut from_sandbox, mut from_app) = (Vec::new(), Vec::new());
    for i in 0..PODS {
        let spec = PodSpec::new(&format!("w{i}")).label("app", "web");
        let (sb, cfg) = cd.create_sandbox(&spec);
        let sandbox_ready = Instant::now();
        // Poll the kernel from another thread while the app is started.
        let netns = sb.netns.clone();
        let poller = std::thread::spawn(move || {
            wait_enforced(&netns, sandbox_ready);
            Instant::now()
        });
        cd.start_app(&sb, &cfg, &spec);
        let app_started = Instant::now();
        let enforced_at = poller.join().unwrap();
        from_sandbox.push(enforced_at - sandbox_ready);
        from_app.push(enforced_at.saturating_duration_since(app_started));
    }
    let work = WatcherWork {
        by_event: metric(port, "proxyctl_watch_pods_found_total{by=\"event\"}"),
        lists: metric(port, "proxyctl_watch_runtime_lists_total"),
    };
    let _ = watch.kill();
    let _ = watch.wait();
    (from_sandbox, from_app, work)
}

/// One sandbox on each harness, alternating, so both see the same machine
/// load: (bridge-only times, with-plugin times, enforced-at-ready count).
fn run_sandboxes_side_by_side(
    base: &Containerd,
    chained: &Containerd,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let (mut plain, mut with_plugin) = (Vec::new(), Vec::new());
    let mut enforced_at_ready = 0;
    for i in 0..PODS {
        let spec = PodSpec::new(&format!("p{i}")).annotation("proxy", "on");
        let t = Instant::now();
        base.create_sandbox(&spec);
        plain.push(t.elapsed());
        let t = Instant::now();
        let (sb, _) = chained.create_sandbox(&spec);
        with_plugin.push(t.elapsed());
        if enforced(&sb.netns) {
            enforced_at_ready += 1;
        }
    }
    (plain, with_plugin, enforced_at_ready)
}

fn plugin_conf() -> serde_json::Value {
    serde_json::json!({
        "type": "proxyctl-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "rules": [{"selector": {"annotations": {"proxy": "on"}},
                   "policies": [{"name": "mesh", "outboundPort": 15001, "exclude": {"uids": [1337]}}]}],
    })
}

fn direct_add(plugin: &str) -> Vec<Duration> {
    let mut conf = plugin_conf();
    conf["cniVersion"] = serde_json::json!("1.0.0");
    conf["name"] = serde_json::json!("bench");
    conf["prevResult"] = serde_json::json!({"cniVersion": "1.0.0"});
    conf["runtimeConfig"] =
        serde_json::json!({"io.kubernetes.cri.pod-annotations": {"proxy": "on"}});
    let body = serde_json::to_vec(&conf).unwrap();
    let mut out = Vec::new();
    for _ in 0..PODS {
        let ns = NetNs::new("bcni");
        let t = Instant::now();
        let mut child = Command::new(plugin)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "bench")
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=b;K8S_POD_NAME=b")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&body).unwrap();
        assert!(child.wait().unwrap().success());
        out.push(t.elapsed());
        assert!(enforced(&ns.path()));
    }
    out
}

fn main() {
    if !proxyctl_testkit::require_root("pod_policy bench") {
        return;
    }
    let plugin = env!("CARGO_BIN_EXE_proxyctl-cni");
    println!("Pod start -> policy enforced ({PODS} pods each, sequential, real containerd)\n");
    println!(
        "| {:<54} | {:>3} | {:>8} | {:>8} | note",
        "measurement", "n", "p50 ms", "p99 ms"
    );
    println!("|{:-<56}|{:-<5}|{:-<10}|{:-<10}|------", "", "", "", "");
    for mode in [poll_mode(100), poll_mode(50), poll_mode(20), events_mode()] {
        let (sb, app, work) = watch_mode(&mode);
        row(
            &format!("watch ({}): sandbox ready -> enforced", mode.name),
            &sb,
            &format!(
                "{}/{PODS} found by an event-triggered list; {} CRI lists in all",
                work.by_event, work.lists
            ),
        );
        let before = app.iter().filter(|d| d.is_zero()).count();
        row(
            &format!("watch ({}): app start -> enforced", mode.name),
            &app,
            &format!("{before}/{PODS} enforced before the app started"),
        );
    }
    let base = Containerd::start(ContainerdOptions::default());
    let cd = Containerd::start(ContainerdOptions {
        chained_plugins: vec![plugin_conf()],
        cni_binaries: vec![("proxyctl-cni".into(), PathBuf::from(plugin))],
        ..Default::default()
    });
    let (plain, chained, at_ready) = run_sandboxes_side_by_side(&base, &cd);
    drop((base, cd));
    row("cni: RunPodSandbox, bridge only", &plain, "baseline");
    row(
        "cni: RunPodSandbox, bridge + proxyctl-cni",
        &chained,
        &format!("{at_ready}/{PODS} enforced when the sandbox is ready (before any app)"),
    );
    row(
        "cni: proxyctl-cni ADD alone (exec + apply)",
        &direct_add(plugin),
        "",
    );
    println!(
        "\nADD adds {:.2} ms to RunPodSandbox at p50 ({:.2} -> {:.2}).",
        pct(&chained, 0.5) - pct(&plain, 0.5),
        pct(&plain, 0.5),
        pct(&chained, 0.5)
    );
}
