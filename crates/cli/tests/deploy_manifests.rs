//! The Kubernetes manifests in deploy/ are valid for the Kubernetes API
//! (kubernetes-validate, strict: unknown fields are errors), the Kustomize
//! set-up renders (the standalone kustomize, which kubectl embeds) into valid resources, every
//! image named is one scripts/images.sh builds, and the
//! EgressSelectorConfiguration has the shape kube-apiserver reads.

use std::path::{Path, PathBuf};
use std::process::Command;

use proxyctl_testkit::require_tool;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![deploy_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn kinds(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
        .filter_map(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
        .collect()
}

fn validate(path: &Path) -> std::process::Output {
    Command::new("kubernetes-validate")
        .args(["--strict", "--no-warn"])
        .arg(path)
        .output()
        .expect("running kubernetes-validate")
}

#[test]
fn kubernetes_resources_validate_strictly() {
    if !require_tool(
        "kubernetes_resources_validate_strictly",
        "kubernetes-validate",
    ) {
        return;
    }
    let mut checked = 0;
    for path in manifests() {
        let kinds = kinds(&path);
        if kinds
            .iter()
            .all(|k| k == "EgressSelectorConfiguration" || k == "Kustomization")
        {
            continue; // apiserver and Kustomize configuration, not API resources: checked below
        }
        let out = validate(&path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} does not validate:\n{stdout}{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.matches(" passed for resource ").count(),
            kinds.len(),
            "every resource of {} is validated:\n{stdout}",
            path.display()
        );
        checked += kinds.len();
    }
    assert!(
        checked >= 14,
        "expected the konnectivity, cni, imds-proxy and watch manifests, checked {checked} resources"
    );
}

#[test]
fn the_validator_catches_an_unknown_field() {
    if !require_tool(
        "the_validator_catches_an_unknown_field",
        "kubernetes-validate",
    ) {
        return;
    }
    let good =
        std::fs::read_to_string(deploy_dir().join("konnectivity/proxy-server.yaml")).unwrap();
    let bad = good.replacen(
        "hostNetwork: true",
        "hostNetwork: true\n  hostNetwrk: true",
        1,
    );
    assert_ne!(good, bad);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    let out = validate(&path);
    assert!(
        !out.status.success(),
        "a misspelt field must fail validation"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hostNetwrk"));
}

#[test]
fn egress_selector_configuration_points_at_the_server_socket() {
    let dir = deploy_dir().join("konnectivity");
    let text = std::fs::read_to_string(dir.join("egress-selector-configuration.yaml")).unwrap();
    let config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        config["apiVersion"].as_str(),
        Some("apiserver.k8s.io/v1beta1")
    );
    assert_eq!(config["kind"].as_str(), Some("EgressSelectorConfiguration"));
    let selections = config["egressSelections"]
        .as_sequence()
        .expect("egressSelections list");
    let cluster = selections
        .iter()
        .find(|s| s["name"].as_str() == Some("cluster"))
        .expect("a `cluster` egress selection");
    let connection = &cluster["connection"];
    assert!(matches!(
        connection["proxyProtocol"].as_str(),
        Some("GRPC" | "HTTPConnect")
    ));
    let socket = connection["transport"]["uds"]["udsName"]
        .as_str()
        .expect("uds transport");

    // The socket kube-apiserver dials is the one proxy-server listens on.
    let server = std::fs::read_to_string(dir.join("proxy-server.yaml")).unwrap();
    assert!(
        server.contains(&format!("--uds-name={socket}")),
        "proxy-server must listen on {socket}"
    );
    assert!(
        server.contains("--server-port=0"),
        "a unix-socket frontend needs --server-port=0"
    );
}

/// The images scripts/images.sh writes, as `prefix/name`.
fn built_images() -> Vec<String> {
    let script = std::fs::read_to_string(deploy_dir().join("../scripts/images.sh")).unwrap();
    script
        .lines()
        .filter_map(|l| l.strip_prefix("image "))
        .map(|l| {
            format!(
                "localhost/proxyctl/{}",
                l.split_whitespace().next().unwrap()
            )
        })
        .collect()
}

#[test]
fn every_image_named_is_built_by_images_sh() {
    let built = built_images();
    assert_eq!(
        built.len(),
        4,
        "proxyctl, imds-proxy, proxy-server, proxy-agent: {built:?}"
    );
    let version = env!("CARGO_PKG_VERSION");
    let mut seen = 0;
    for path in manifests() {
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let Some(image) = line.trim().strip_prefix("image: ") else {
                continue;
            };
            let (name, tag) = image.rsplit_once(':').unwrap();
            assert!(
                built.iter().any(|b| b == name),
                "{}: {image} is not built by scripts/images.sh ({built:?})",
                path.display()
            );
            assert_eq!(tag, version, "{}: {image}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 5, "images named in deploy/: {seen}");
}

#[test]
fn kustomization_renders_a_whole_node_set_up() {
    let test = "kustomization_renders_a_whole_node_set_up";
    if !require_tool(test, "kustomize") || !require_tool(test, "kubernetes-validate") {
        return;
    }
    let out = Command::new("kustomize")
        .arg("build")
        .arg(deploy_dir())
        .output()
        .expect("running kustomize build");
    assert!(
        out.status.success(),
        "kustomize build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rendered.yaml");
    std::fs::write(&path, &rendered).unwrap();
    let kinds = kinds(&path);
    for want in ["DaemonSet", "ConfigMap", "ServiceAccount"] {
        assert!(kinds.iter().any(|k| k == want), "{want} in {kinds:?}");
    }
    for ds in [
        "name: proxyctl-cni",
        "name: imds-proxy",
        "name: konnectivity-agent",
    ] {
        assert!(rendered.contains(ds), "{ds} rendered:\n{rendered}");
    }
    // watch/ is the alternative to cni/, never applied with it.
    assert!(!rendered.contains("proxyctl-watch"));
    assert!(rendered.contains("app.kubernetes.io/part-of: proxyctl"));
    let v = validate(&path);
    let stdout = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success(),
        "rendered set-up does not validate:\n{stdout}"
    );
    assert_eq!(
        stdout.matches(" passed for resource ").count(),
        kinds.len(),
        "{stdout}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn the_cni_plugin_config_is_one_proxyctl_cni_accepts() {
    let text = std::fs::read_to_string(deploy_dir().join("cni/proxyctl-cni.yaml")).unwrap();
    let cm: serde_yaml::Value = serde_yaml::from_str(text.split("\n---").next().unwrap()).unwrap();
    let plugin: serde_json::Value =
        serde_json::from_str(cm["data"]["plugin.json"].as_str().unwrap()).unwrap();
    assert_eq!(plugin["type"], "proxyctl-cni");
    assert_eq!(
        plugin["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
    // The plugin's own parser: a full network config with this entry.
    let mut conf = plugin.clone();
    conf["cniVersion"] = "1.0.0".into();
    conf["name"] = "k8s-pod-network".into();
    proxyctl_cni::parse_conf(&serde_json::to_vec(&conf).unwrap())
        .expect("proxyctl-cni accepts the ConfigMap's plugin entry");
}
