//! `proxyctl lookup` against a real containerd (testkit harness).

use std::process::{Command, Output};

use proxyctl_testkit::containerd::{Containerd, ContainerdOptions, PodSpec};
use proxyctl_testkit::{require_root, require_tool};

fn proxyctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxyctl"))
        .args(args)
        .env_remove("CONTAINER_RUNTIME_ENDPOINT")
        .output()
        .expect("running proxyctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn lookup_prints_the_netns_or_the_whole_record_and_refuses_bad_ids() {
    let test = "lookup_prints_the_netns_or_the_whole_record_and_refuses_bad_ids";
    if !require_root(test)
        || !["containerd", "ctr", "runc"]
            .iter()
            .all(|t| require_tool(test, t))
    {
        return;
    }
    let cd = Containerd::start(ContainerdOptions::default());
    let pod = cd.run_pod(
        &PodSpec::new("api")
            .namespace("prod")
            .label("tier", "backend"),
    );
    let ep = cd.endpoint();

    // Table: the netns path alone, from a 12-character prefix.
    let out = proxyctl(&["lookup", &pod.container_id[..12], "--runtime-endpoint", &ep]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), pod.netns.display().to_string());

    // The environment variable crictl reads works too, and pod:NS/NAME.
    let out = Command::new(env!("CARGO_BIN_EXE_proxyctl"))
        .args(["lookup", "pod:prod/api"])
        .env("CONTAINER_RUNTIME_ENDPOINT", &ep)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), pod.netns.display().to_string());

    // JSON: the whole record.
    let out = proxyctl(&[
        "lookup",
        &pod.container_id,
        "-o",
        "json",
        "--runtime-endpoint",
        &ep,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["container"]["id"], pod.container_id.as_str());
    assert_eq!(v["pod"]["id"], pod.id.as_str());
    assert_eq!(v["pod"]["namespace"], "prod");
    assert_eq!(v["pod"]["name"], "api");
    assert_eq!(v["pod"]["state"], "ready");
    assert_eq!(v["pod"]["labels"]["tier"], "backend");
    assert_eq!(v["pod"]["ips"][0], pod.ip.as_str());
    assert_eq!(v["pod"]["netns"], pod.netns.display().to_string().as_str());

    // YAML carries the same record.
    let out = proxyctl(&[
        "lookup",
        &pod.container_id,
        "-o",
        "yaml",
        "--runtime-endpoint",
        &ep,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("id: {}", pod.id)));

    // Unknown id and bad endpoint: exit 2, a clear message, nothing on stdout.
    let out = proxyctl(&["lookup", "0123456789abcdef0123", "--runtime-endpoint", &ep]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no container or pod sandbox matches `0123456789abcdef0123`"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let out = proxyctl(&["lookup", "abc", "--runtime-endpoint", "tcp://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--runtime-endpoint"),
        "{}",
        text(&out.stderr)
    );

    // Every TARGET command accepts a container id prefix or pod:NS/NAME.
    let out = proxyctl(&[
        "add",
        &pod.container_id[..12],
        "--name",
        "mesh",
        "--outbound-port",
        "15001",
        "--exclude-uid",
        "1337",
        "--runtime-endpoint",
        &ep,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let in_kernel = proxyctl_nft::list(&proxyctl_nft::Target::Path(pod.netns.clone())).unwrap();
    assert_eq!(in_kernel.len(), 1);
    assert_eq!(in_kernel[0].outbound_port, Some(15001));
    let out = proxyctl(&[
        "list",
        "pod:prod/api",
        "-o",
        "json",
        "--runtime-endpoint",
        &ep,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["name"], "mesh");
    let out = proxyctl(&["clear", &pod.id[..12], "--runtime-endpoint", &ep]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        proxyctl_nft::list(&proxyctl_nft::Target::Path(pod.netns.clone()))
            .unwrap()
            .is_empty()
    );
    // An unknown container as TARGET: exit 2, and nothing anywhere changed.
    let out = proxyctl(&[
        "add",
        "fedcba9876543210fedc",
        "--outbound-port",
        "1",
        "--exclude-uid",
        "1",
        "--runtime-endpoint",
        &ep,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no container or pod sandbox matches"),
        "{}",
        text(&out.stderr)
    );
    // Neither a namespace form nor an id: the namespace parser's message.
    let out = proxyctl(&["list", "not/a/thing", "--runtime-endpoint", &ep]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("netns:NAME"),
        "{}",
        text(&out.stderr)
    );

    // An unreachable runtime: exit 1 naming the socket.
    let missing = format!("unix://{}/nothing.sock", cd.dir().display());
    let out = proxyctl(&["lookup", "abc", "--runtime-endpoint", &missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nothing.sock"),
        "{}",
        text(&out.stderr)
    );
    // As a TARGET, an id with no runtime to ask names nothing: exit 2.
    let out = proxyctl(&["list", "abc", "--runtime-endpoint", &missing]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no container runtime at"),
        "{}",
        text(&out.stderr)
    );
}
