//! The deploy/ DaemonSets run by a real containerd as the kubelet would run
//! them: our images (built here from the test's debug binaries with the
//! same writer scripts/images.sh uses, then `ctr images import`ed), a
//! host-network pod sandbox, the manifest's command, args, hostPath and
//! ConfigMap mounts and security context. Host paths are mapped to the
//! harness's node (its CNI dirs, its containerd socket).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proxyctl_nft::Target;
use proxyctl_oci::{ImageConfig, Layer, write_archive};
use proxyctl_testkit::containerd::{
    ContainerSpec, Containerd, ContainerdOptions, MountSpec, PodSpec,
};
use proxyctl_testkit::{require_root, require_tool};
use serde_yaml::Value;

const PROXYCTL: &str = env!("CARGO_BIN_EXE_proxyctl");
const PLUGIN: &str = env!("CARGO_BIN_EXE_proxyctl-cni");

fn prerequisites(test: &str) -> bool {
    require_root(test)
        && ["containerd", "ctr", "runc", "nft"]
            .iter()
            .all(|t| require_tool(test, t))
}

fn deploy(path: &str) -> Vec<Value> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path);
    let text = std::fs::read_to_string(&file).unwrap();
    text.split("\n---")
        .map(|d| serde_yaml::from_str::<Value>(d).unwrap())
        .filter(|v| v.get("kind").is_some())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Builds the image a manifest names from local binaries, as
/// scripts/images.sh does (entrypoint, libraries found by ldd), and imports it.
fn import_image(cd: &Containerd, name: &str, entrypoint: &str, files: &[(&str, &str)]) -> Duration {
    let t = Instant::now();
    let mut layer = Layer::new();
    layer.base_files().unwrap();
    for (src, dest) in files {
        layer.copy(Path::new(src), dest).unwrap();
        layer.copy_libraries_of(Path::new(src)).unwrap();
    }
    let config = ImageConfig {
        entrypoint: vec![entrypoint.to_owned()],
        user: "0:0".into(),
        ..Default::default()
    };
    let tar = cd.dir().join("image.tar");
    write_archive(&tar, name, &layer, &config).unwrap();
    cd.import_archive(&tar);
    std::fs::remove_file(&tar).unwrap();
    t.elapsed()
}

/// What the kubelet would do with a DaemonSet's pod template: the pod's
/// one container as a [`ContainerSpec`], ConfigMap volumes written out as
/// files under `scratch`, hostPaths mapped through `host`.
struct FromManifest {
    spec: ContainerSpec,
    host_network: bool,
    namespace: String,
    name: String,
}

fn from_manifest(docs: &[Value], scratch: &Path, host: &dyn Fn(&str) -> PathBuf) -> FromManifest {
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mut volumes = BTreeMap::new();
    for v in pod["volumes"].as_sequence().unwrap() {
        let name = v["name"].as_str().unwrap().to_owned();
        let path = if let Some(p) = v["hostPath"]["path"].as_str() {
            host(p)
        } else if let Some(cm) = v["configMap"]["name"].as_str() {
            let data = docs
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == cm)
                .unwrap_or_else(|| panic!("ConfigMap {cm}"));
            let dir = scratch.join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            for (k, v) in data["data"].as_mapping().unwrap() {
                std::fs::write(dir.join(k.as_str().unwrap()), v.as_str().unwrap()).unwrap();
            }
            dir
        } else {
            panic!("volume {name}: only hostPath and configMap are mapped");
        };
        volumes.insert(name, path);
    }
    let mounts = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| MountSpec {
            host_path: volumes[m["name"].as_str().unwrap()].clone(),
            container_path: m["mountPath"].as_str().unwrap().to_owned(),
            readonly: m["readOnly"].as_bool().unwrap_or(false),
            host_to_container: m["mountPropagation"] == "HostToContainer",
        })
        .collect();
    let sc = &c["securityContext"];
    FromManifest {
        spec: ContainerSpec {
            name: c["name"].as_str().unwrap().to_owned(),
            image: c["image"].as_str().unwrap().to_owned(),
            command: strings(&c["command"]),
            args: strings(&c["args"]),
            env: Vec::new(),
            mounts,
            run_as_user: sc["runAsUser"].as_i64(),
            add_capabilities: strings(&sc["capabilities"]["add"]),
            drop_capabilities: strings(&sc["capabilities"]["drop"]),
            privileged: sc["privileged"].as_bool().unwrap_or(false),
            readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            no_new_privs: sc["allowPrivilegeEscalation"] == false,
        },
        host_network: pod["hostNetwork"].as_bool().unwrap_or(false),
        namespace: ds["metadata"]["namespace"].as_str().unwrap().to_owned(),
        name: ds["metadata"]["name"].as_str().unwrap().to_owned(),
    }
}

fn plugin_types(conflist: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conflist).unwrap()).unwrap();
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

fn policy_names(netns: &Path) -> Vec<String> {
    proxyctl_nft::list(&Target::Path(netns.to_path_buf()))
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// The CNI installer DaemonSet: chained on start, its plugin redirects new
/// pods at sandbox creation (no app container exists yet, so before their
/// first packet), un-chained on stop.
#[test]
fn cni_installer_daemonset_chains_the_plugin_and_unchains_on_stop() {
    let test = "cni_installer_daemonset_chains_the_plugin_and_unchains_on_stop";
    if !prerequisites(test) {
        return;
    }
    let cd = Containerd::start(ContainerdOptions::default());
    let docs = deploy("cni/proxyctl-cni.yaml");
    let scratch = tempfile::tempdir().unwrap();
    let bin_dir = cd.cni_bin_dir();
    let conf_dir = cd.cni_conf_dir();
    let m = from_manifest(&docs, scratch.path(), &|p| match p {
        "/opt/cni/bin" => bin_dir.clone(),
        "/etc/cni/net.d" => conf_dir.clone(),
        other => panic!("unexpected hostPath {other}"),
    });
    assert!(m.host_network, "the installer runs on the node's network");
    let took = import_image(
        &cd,
        &m.spec.image,
        "/usr/local/bin/proxyctl",
        &[
            (PROXYCTL, "/usr/local/bin/proxyctl"),
            (PLUGIN, "/usr/local/bin/proxyctl-cni"),
        ],
    );
    eprintln!("proxyctl image (debug binaries) built and imported in {took:?}");

    let conflist = cd.cni_conflist();
    assert_eq!(plugin_types(&conflist), ["bridge"]);
    let spec = PodSpec::new(&m.name).namespace(&m.namespace).host_network();
    let (installer_pod, installer_cfg) = cd.create_sandbox(&spec);
    let installer = cd.run_container(&installer_pod, &installer_cfg, &m.spec);
    let log = || cd.container_log(&installer_cfg, &m.spec.name);

    let deadline = Instant::now() + Duration::from_secs(20);
    while plugin_types(&conflist) != ["bridge", "proxyctl-cni"] {
        assert!(
            Instant::now() < deadline,
            "installer never chained the plugin; conflist {:?}; installer log:\n{}",
            plugin_types(&conflist),
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read(bin_dir.join("proxyctl-cni")).unwrap(),
        std::fs::read(PLUGIN).unwrap(),
        "the installer copied the plugin binary onto the node"
    );

    // containerd reloads the conflist asynchronously (fsnotify): the first
    // annotated pod created after the reload gets the ConfigMap's `imds`
    // policy at sandbox creation, before it has any container.
    let annotated = |n: u32| {
        PodSpec::new(&format!("app{n}"))
            .namespace("shop")
            .annotation("imds-proxy.io/redirect", "true")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let redirected = loop {
        n += 1;
        let (pod, _) = cd.create_sandbox(&annotated(n));
        if policy_names(&pod.netns) == ["imds"] {
            break pod;
        }
        cd.remove_pod(&pod.id);
        assert!(
            Instant::now() < deadline,
            "no pod got the chained plugin's policy; containerd log:\n{}\ninstaller log:\n{}",
            cd.log_tail(),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Once reloaded, every new pod gets it at once; unannotated ones do not.
    let (second, _) = cd.create_sandbox(&annotated(1000));
    assert_eq!(policy_names(&second.netns), ["imds"]);
    let (plain, _) = cd.create_sandbox(&PodSpec::new("plain").namespace("shop"));
    assert!(policy_names(&plain.netns).is_empty());

    // The kubelet stops the DaemonSet's pod: TERM, grace period from the manifest.
    let grace = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap()["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    cd.stop_container(&installer, grace);
    let (state, code) = cd.container_state(&installer);
    assert_eq!(
        (state, code),
        (2, 0),
        "installer exits 0 on TERM; log:\n{}",
        log()
    );
    assert_eq!(
        plugin_types(&conflist),
        ["bridge"],
        "un-chained on stop; log:\n{}",
        log()
    );
    assert!(log().contains("un-chained"), "{}", log());
    // The binary stays: pods set up through it still need it for CNI DEL.
    assert!(bin_dir.join("proxyctl-cni").exists());
    cd.remove_pod(&redirected.id);
    cd.remove_pod(&second.id);

    // After containerd reloads, new pods are no longer redirected.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        n += 1;
        let (pod, _) = cd.create_sandbox(&annotated(n));
        let names = policy_names(&pod.netns);
        cd.remove_pod(&pod.id);
        if names.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pods still redirected after un-chaining; containerd log:\n{}",
            cd.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const IMDS: &str = env!("CARGO_BIN_EXE_imds-proxy");
const INSTANCE: &str = "http://169.254.169.254/metadata/instance?api-version=2021-02-01";
const TOKEN: &str = "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";

/// Kills and reaps a child on drop.
struct Proc(std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The imds-proxy DaemonSet in a real containerd: a host-network container
/// with the manifest's args, capabilities, rules ConfigMap, CRI socket and
/// netns mount (HostToContainer), and the CNI plugin chained with the
/// deploy/cni ConfigMap's entry. App pods started after it get the DNAT at
/// sandbox creation and their metadata requests are answered through the
/// containerised imds-proxy, under the ConfigMap's rules.
#[test]
fn imds_proxy_daemonset_serves_pods_from_its_container() {
    let test = "imds_proxy_daemonset_serves_pods_from_its_container";
    if !prerequisites(test) || !require_tool(test, "nsenter") {
        return;
    }
    let cni_docs = deploy("cni/proxyctl-cni.yaml");
    let plugin: serde_json::Value = serde_json::from_str(
        cni_docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap()["data"]["plugin.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let cd = Containerd::start(ContainerdOptions {
        chained_plugins: vec![plugin],
        cni_binaries: vec![("proxyctl-cni".into(), PathBuf::from(PLUGIN))],
        shared_state: true,
        ..Default::default()
    });
    let docs = deploy("imds-proxy/imds-proxy.yaml");
    let scratch = tempfile::tempdir().unwrap();
    let socket = cd.socket();
    let state = cd.state_dir();
    let mut m = from_manifest(&docs, scratch.path(), &|p| match p {
        "/run/containerd/containerd.sock" => socket.clone(),
        // The node's netns dir: containerd here keeps pod namespaces under
        // its state dir, so that is what is mounted (at the same path, the
        // one CRI reports), with the manifest's propagation.
        "/var/run/netns" => state.clone(),
        other => panic!("unexpected hostPath {other}"),
    });
    for mount in &mut m.spec.mounts {
        if mount.host_path == state {
            assert!(mount.host_to_container, "netns mount needs HostToContainer");
            mount.container_path = state.display().to_string();
        }
    }
    assert!(m.host_network);
    assert_eq!(m.spec.add_capabilities, ["SYS_ADMIN"]);
    assert_eq!(m.spec.drop_capabilities, ["ALL"]);
    let took = import_image(
        &cd,
        &m.spec.image,
        "/usr/local/bin/imds-proxy",
        &[(IMDS, "/usr/local/bin/imds-proxy")],
    );
    eprintln!("imds-proxy image (debug binary) built and imported in {took:?}");

    let spec = PodSpec::new(&m.name).namespace(&m.namespace).host_network();
    let (proxy_pod, proxy_cfg) = cd.create_sandbox(&spec);
    // The metadata service, reachable from the node (where imds-proxy runs) only.
    let cloud = proxyctl_testkit::containerd::metadata_cloud(&proxy_pod, "dcl");
    let _mock = Proc(
        proxyctl_testkit::spawn_tied(
            std::process::Command::new("ip")
                .args(["netns", "exec", cloud.name(), IMDS, "mock", "--listen"])
                .arg("169.254.169.254:80")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
        .expect("imds-proxy mock"),
    );
    let proxy = cd.run_container(&proxy_pod, &proxy_cfg, &m.spec);
    let log = || cd.container_log(&proxy_cfg, &m.spec.name);

    let pod = cd.run_pod(
        &PodSpec::new("app")
            .namespace("shop")
            .annotation("imds-proxy.io/redirect", "true"),
    );
    pod.add_default_route();
    assert_eq!(
        policy_names(&pod.netns),
        ["imds"],
        "DNAT installed by the chained plugin"
    );
    let wget = |url: &str| {
        cd.exec(
            &pod.container_id,
            &["wget", "-q", "-O", "-", "--header", "Metadata: true", url],
        )
    };
    // Refused until imds-proxy (event-driven) binds the pod's listener.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = wget(INSTANCE);
        if out.exit_code == 0 {
            break out;
        }
        let (state, code) = cd.container_state(&proxy);
        assert_eq!(
            state,
            1,
            "imds-proxy container exited ({code}); log:\n{}",
            log()
        );
        assert!(
            Instant::now() < deadline,
            "never served: {out:?}\nimds-proxy log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let body: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(body["compute"]["vmId"].is_string(), "{body}");
    // The ConfigMap's rules open instance metadata only: no token.
    let out = wget(TOKEN);
    assert!(out.stderr.contains("403"), "{out:?}\n{}", log());
    // The audit lines come from the container (stdout, CRI log).
    let log = log();
    assert!(log.contains("/metadata/instance"), "{log}");
}
