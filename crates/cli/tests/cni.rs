//! `proxyctl-cni`: run directly as the CNI spec describes, and chained in a
//! real containerd's conflist.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use proxyctl_nft::Target;
use proxyctl_testkit::containerd::{
    Containerd, ContainerdOptions, GATEWAY, IDLE_COMMAND, PodSpec, ProxyStandIn,
};
use proxyctl_testkit::{NetNs, require_root, require_tool};
use serde_json::{Value, json};

const PLUGIN: &str = env!("CARGO_BIN_EXE_proxyctl-cni");

fn prerequisites(test: &str, tools: &[&str]) -> bool {
    require_root(test) && tools.iter().all(|t| require_tool(test, t))
}

fn plugin_conf() -> Value {
    json!({
        "type": "proxyctl-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "rules": [{
            "selector": {"annotations": {"proxy": "on"}},
            "policies": [{"name": "mesh", "outboundPort": 15001, "exclude": {"uids": [1337]}}],
        }],
    })
}

fn invoke(command: &str, netns: &str, conf: &Value) -> Output {
    let mut child = Command::new(PLUGIN)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web",
        )
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running proxyctl-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(conf).unwrap())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?} / stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn names(netns: &Path) -> Vec<String> {
    proxyctl_nft::list(&Target::Path(netns.to_path_buf()))
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

#[test]
fn plugin_commands_follow_the_cni_spec() {
    let test = "plugin_commands_follow_the_cni_spec";
    if !prerequisites(test, &["nft"]) {
        return;
    }
    let ns = NetNs::new("cni");
    let path = ns.path().display().to_string();
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                      "ips": [{"address": "198.18.0.9/16", "interface": 0}]});
    let mut conf = plugin_conf();
    conf["cniVersion"] = json!("1.0.0");
    conf["name"] = json!("testnet");
    conf["prevResult"] = prev.clone();
    conf["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": {"proxy": "on"}});

    // VERSION.
    let out = invoke("VERSION", "", &json!({}));
    assert!(out.status.success());
    let v = stdout_json(&out);
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );

    // Unchained: refused with a CNI error, nothing installed.
    let mut unchained = conf.clone();
    unchained.as_object_mut().unwrap().remove("prevResult");
    let out = invoke("ADD", &path, &unchained);
    assert!(!out.status.success());
    let err = stdout_json(&out);
    assert_eq!(err["code"], 7);
    assert_eq!(err["cniVersion"], "1.0.0");
    assert!(err["details"].as_str().unwrap().contains("prevResult"));
    assert!(names(&ns.path()).is_empty());

    // ADD: policy installed, prevResult passed through.
    let out = invoke("ADD", &path, &conf);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_json(&out), prev);
    assert_eq!(names(&ns.path()), ["mesh"]);

    // CHECK passes while the policy is there.
    let out = invoke("CHECK", &path, &conf);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A bad policy in the pod annotation: CNI error, ruleset unchanged.
    let mut bad = conf.clone();
    bad["runtimeConfig"]["io.kubernetes.cri.pod-annotations"]["proxyctl.io/policy"] =
        json!(r#"{"name": "x", "outboundPort": 0}"#);
    let out = invoke("ADD", &path, &bad);
    assert!(!out.status.success());
    assert_eq!(stdout_json(&out)["code"], 7);
    assert_eq!(names(&ns.path()), ["mesh"]);

    // CHECK fails once the policy is gone.
    proxyctl_nft::clear(&Target::Path(ns.path()), None).unwrap();
    let out = invoke("CHECK", &path, &conf);
    assert!(!out.status.success());
    let err = stdout_json(&out);
    assert_eq!(err["code"], 101);
    assert!(err["details"].as_str().unwrap().contains("mesh"));

    // A pod the rules do not select gets nothing, and ADD still succeeds.
    let mut other = conf.clone();
    other["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": {"proxy": "off"}});
    let out = invoke("ADD", &path, &other);
    assert!(out.status.success());
    assert!(names(&ns.path()).is_empty());

    // DEL removes what ADD installed; DEL again, and DEL without a netns, succeed.
    assert!(invoke("ADD", &path, &conf).status.success());
    assert_eq!(names(&ns.path()), ["mesh"]);
    let out = invoke("DEL", &path, &conf);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());
    assert!(names(&ns.path()).is_empty());
    let table = ns.exec(&["nft", "list", "tables"]);
    assert!(!String::from_utf8_lossy(&table.stdout).contains("proxyctl"));
    assert!(invoke("DEL", &path, &conf).status.success());
    assert!(invoke("DEL", "", &conf).status.success());
}

/// The app's first action is a connection to the node; it records the
/// answer and the exit status, then idles. (busybox nc, not wget: this
/// busybox's wget crashes on a refused connection.)
fn first_connection_app() -> String {
    format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {GATEWAY} 80 > /tmp/first; echo $? > /tmp/rc; {IDLE_COMMAND}"
    )
}

/// Waits for the app to record its first connection: (exit status, body).
fn first_result(cd: &Containerd, container: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rc = cd.exec(container, &["cat", "/tmp/rc"]);
        if rc.exit_code == 0 {
            let body = cd.exec(container, &["cat", "/tmp/first"]);
            // The body only: the stand-in's answer follows the header block.
            let body = body
                .stdout
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or("")
                .to_owned();
            return (rc.stdout.trim().to_owned(), body);
        }
        assert!(
            Instant::now() < deadline,
            "the app never recorded its first connection"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn chained_plugin_redirects_the_first_connection_and_del_leaves_nothing() {
    let test = "chained_plugin_redirects_the_first_connection_and_del_leaves_nothing";
    if !prerequisites(test, &["containerd", "ctr", "runc", "nft"]) {
        return;
    }
    let cd = Containerd::start(ContainerdOptions {
        chained_plugins: vec![plugin_conf()],
        cni_binaries: vec![("proxyctl-cni".into(), PathBuf::from(PLUGIN))],
        ..Default::default()
    });

    // Selected by the plugin's rule: the policy is in place when the sandbox
    // exists, before the app container is even created.
    let meshed_spec = PodSpec::new("meshed")
        .annotation("proxy", "on")
        .shell(&first_connection_app());
    let (meshed, meshed_cfg) = cd.create_sandbox(&meshed_spec);
    assert_eq!(names(&meshed.netns), ["mesh"]);
    let proxy = ProxyStandIn::start(&meshed.netns, 15001, "meshed");
    let meshed_app = cd.start_app(&meshed, &meshed_cfg, &meshed_spec);
    let (rc, body) = first_result(&cd, &meshed_app);
    assert_eq!((rc.as_str(), body.as_str()), ("0", "proxied meshed"));
    assert_eq!(proxy.accepted(), 1);

    // Not selected: the same first connection goes to the node, where
    // nothing listens on port 80, and is refused.
    let plain_spec = PodSpec::new("plain").shell(&first_connection_app());
    let (plain, plain_cfg) = cd.create_sandbox(&plain_spec);
    assert!(names(&plain.netns).is_empty());
    let plain_proxy = ProxyStandIn::start(&plain.netns, 15001, "plain");
    let plain_app = cd.start_app(&plain, &plain_cfg, &plain_spec);
    let (rc, body) = first_result(&cd, &plain_app);
    assert_ne!(rc, "0", "an unselected pod's connection succeeded: {body}");
    assert_eq!(plain_proxy.accepted(), 0);

    // A policy carried by the pod's own annotation (passed by containerd
    // through runtimeConfig).
    let annotated_spec = PodSpec::new("annotated")
        .annotation(
            "proxyctl.io/policy",
            r#"{"name": "own", "outboundPort": 15002, "exclude": {"uids": [1337]}}"#,
        )
        .shell(&first_connection_app());
    let (annotated, annotated_cfg) = cd.create_sandbox(&annotated_spec);
    assert_eq!(names(&annotated.netns), ["own"]);
    let own_proxy = ProxyStandIn::start(&annotated.netns, 15002, "annotated");
    let annotated_app = cd.start_app(&annotated, &annotated_cfg, &annotated_spec);
    let (rc, body) = first_result(&cd, &annotated_app);
    assert_eq!((rc.as_str(), body.as_str()), ("0", "proxied annotated"));
    assert_eq!(own_proxy.accepted(), 1);

    // DEL (run by StopPodSandbox) leaves nothing: hold the namespace open
    // past the pod's removal and look inside.
    let held = std::fs::File::open(&meshed.netns).unwrap();
    let held_path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(&held)
    ));
    cd.remove_pod(&meshed.id);
    assert!(names(&held_path).is_empty(), "DEL left policies behind");
    let cache = std::path::Path::new("/var/lib/cni/results");
    let leftovers: Vec<_> = std::fs::read_dir(cache)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(&meshed.id))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "CNI cache entries left: {leftovers:?}"
    );
}
