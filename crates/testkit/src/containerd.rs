//! A real containerd (1.6, CRI runtime.v1) for tests, isolated and removed
//! on drop. Feature `containerd`.
//!
//! [`Containerd::start`] makes a temp dir `$D` and a network namespace (the
//! "node"), writes a containerd config whose root, state, sockets, runc root
//! and CNI config all live under `$D`, and starts `containerd` inside that
//! namespace (setns only: containerd shares the test's mount namespace, so
//! the pod netns bind mounts it creates under `$D/state` are visible to the
//! test). Pods get addresses from [`POD_SUBNET`] on a bridge that exists only
//! in the node namespace, and no default route. A locally built busybox image
//! ([`IMAGE`]) is imported with `ctr`; it serves as sandbox and app image.
//!
//! ```no_run
//! # use proxyctl_testkit::containerd::{Containerd, ContainerdOptions, PodSpec};
//! let cd = Containerd::start(ContainerdOptions::default());
//! let pod = cd.run_pod(&PodSpec::new("web").label("app", "web"));
//! let out = cd.exec(&pod.container_id, &["cat", "/etc/passwd"]);
//! assert_eq!(out.exit_code, 0);
//! // pod.netns is the pod's network namespace path; cd.endpoint() the CRI endpoint.
//! ```
//!
//! To use it from another crate's tests: `proxyctl-testkit = { workspace =
//! true, features = ["containerd"] }` in `[dev-dependencies]`, and gate each
//! test on `require_root` and `require_tool` for `containerd`, `ctr` and
//! `runc`. Other pieces: [`Containerd::create_sandbox`] +
//! [`Containerd::start_app`] to act between sandbox and app start (the CNI
//! chain has run by then), [`ContainerdOptions`] to chain CNI plugins of
//! your own, [`Containerd::stop_containerd`]/[`Containerd::start_containerd`]
//! for restarts, [`ProxyStandIn`] for a listener inside a pod's namespace,
//! [`GATEWAY`] as an address every pod can reach (the node's bridge),
//! [`Sandbox::add_default_route`] for pods that need one, and
//! [`metadata_cloud`] for a 169.254.169.254 that only one pod can reach.
//! To run our own images as the kubelet would: [`Containerd::import_archive`]
//! (an OCI archive), [`PodSpec::host_network`], [`Containerd::run_container`]
//! with a [`ContainerSpec`] (command, args, mounts with propagation,
//! security context), [`Containerd::stop_container`],
//! [`Containerd::container_log`]; [`ContainerdOptions::shared_state`] when a
//! container must see pod namespaces created after it started.
//! Several harnesses may run at once (each has its own node namespace).
//!
//! Dropping [`Containerd`] tears everything down, on success or panic:
//! pods through CRI, containerd by PID, leftover runc containers and shims
//! (by their command line naming our socket), mounts under `$D`, the node
//! namespace (and with it the bridge), the cgroup directories under our
//! `cgroup_parent`, the shim sockets (`/run/containerd/s/<sha256>`) and CNI
//! result cache entries (`/var/lib/cni/results/<our network>-*`) of our pods
//! only, then `$D`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use nix::sched::{CloneFlags, setns};
use proxyctl_cri_api::runtime::v1 as cri;
use proxyctl_cri_api::runtime::v1::runtime_service_client::RuntimeServiceClient;
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::NetNs;

/// The image every pod uses (sandbox and app), built from busybox-static.
pub const IMAGE: &str = "localhost/test/busybox:1";
/// Pod addresses (inside the test's node namespace only).
pub const POD_SUBNET: &str = "198.18.0.0/16";
/// The bridge's address: the node as pods see it. Pods have a route to
/// [`POD_SUBNET`] only, so this is a destination they can reach.
pub const GATEWAY: &str = "198.18.0.1";
/// The CRI namespace containerd keeps Kubernetes objects in.
const CRI_NAMESPACE: &str = "k8s.io";
/// What the image runs when a pod gives no command: sleeps, and exits at
/// once on TERM so StopContainer does not wait out its timeout.
pub const IDLE_COMMAND: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How the node's CNI is set up.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// Plugin configs appended after the `bridge` plugin in the conflist
    /// (e.g. `{"type": "proxyctl-cni", ...}`).
    pub chained_plugins: Vec<serde_json::Value>,
    /// Extra CNI binaries `(type name, path)`, linked into the CNI bin dir
    /// next to /usr/lib/cni's.
    pub cni_binaries: Vec<(String, PathBuf)>,
    /// More plugin ids for containerd's `disabled_plugins` (e.g.
    /// `io.containerd.grpc.v1.events` to stand in for a runtime without
    /// containerd's event service).
    pub disabled_plugins: Vec<String>,
    /// Make `$D/state` (where pod netns are bind-mounted) a shared mount
    /// of its own, so a container may mount it with HostToContainer
    /// propagation and see pods' namespaces created after it started (as
    /// a node's /var/run/netns is). The test's `/` here is private, and
    /// containerd refuses rslave mounts from a private mount.
    pub shared_state: bool,
}

/// One container of a pod spec, as the kubelet passes it to CRI (the
/// fields our DaemonSets use).
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    /// A fully qualified image name already imported.
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<MountSpec>,
    pub run_as_user: Option<i64>,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    pub privileged: bool,
    pub readonly_rootfs: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
}

/// A hostPath (or ConfigMap directory) mount.
#[derive(Debug, Clone)]
pub struct MountSpec {
    pub host_path: PathBuf,
    pub container_path: String,
    pub readonly: bool,
    /// `mountPropagation: HostToContainer` (rslave).
    pub host_to_container: bool,
}

/// A pod to create: one sandbox, one app container named `app`.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// argv of the app container; `None` runs [`IDLE_COMMAND`].
    pub command: Option<Vec<String>>,
    /// The node's network (`hostNetwork: true`): no CNI, no pod netns.
    pub host_network: bool,
}

impl PodSpec {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            command: None,
            host_network: false,
        }
    }
    pub fn namespace(mut self, ns: &str) -> Self {
        ns.clone_into(&mut self.namespace);
        self
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.to_owned(), v.to_owned());
        self
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_owned(), v.to_owned());
        self
    }
    /// `hostNetwork: true`: the sandbox shares the node's namespace.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
    /// Runs `script` with `/bin/sh -c` as the app.
    pub fn shell(mut self, script: &str) -> Self {
        self.command = Some(vec!["/bin/sh".into(), "-c".into(), script.into()]);
        self
    }
}

/// A running pod sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub namespace: String,
    /// The pod's network namespace (a bind mount under the harness's state dir).
    pub netns: PathBuf,
    pub ip: String,
}

impl Sandbox {
    /// Runs `argv` in the pod's network namespace, from the node's side
    /// (`nsenter --net`: unlike `ip netns exec` it keeps the test's mount
    /// namespace); panics with its stderr on failure, else returns stdout.
    pub fn run_in_netns(&self, argv: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .args(argv)
            .output()
            .expect("spawning nsenter");
        assert!(
            out.status.success(),
            "{argv:?} in {}: {}",
            self.netns.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Gives the pod the default route (via [`GATEWAY`]) that real pods
    /// have and the harness's lack: without a route, connect fails before
    /// a DNAT is consulted. The node routes nowhere past its bridge, so
    /// this opens no way out.
    pub fn add_default_route(&self) {
        self.run_in_netns(&[
            "ip", "route", "replace", "default", "via", GATEWAY, "dev", "eth0",
        ]);
    }
}

/// A test "cloud": a namespace `pxt-<prefix>-...` holding the metadata
/// address 169.254.169.254, linked by a veth pair to `pod` alone (the pod
/// side is 169.254.0.1 with a host route to 169.254.169.254), so only that
/// pod reaches it and nothing leaves it. Removed on drop with the
/// [`NetNs`]; the veth pair goes with it.
pub fn metadata_cloud(pod: &Sandbox, prefix: &str) -> NetNs {
    let cloud = NetNs::new(prefix);
    pod.run_in_netns(&[
        "ip",
        "link",
        "add",
        "imp0",
        "type",
        "veth",
        "peer",
        "name",
        "imc0",
        "netns",
        cloud.name(),
    ]);
    pod.run_in_netns(&["ip", "addr", "add", "169.254.0.1/32", "dev", "imp0"]);
    pod.run_in_netns(&["ip", "link", "set", "imp0", "up"]);
    pod.run_in_netns(&["ip", "route", "add", "169.254.169.254/32", "dev", "imp0"]);
    cloud.run(&["ip", "addr", "add", "169.254.169.254/32", "dev", "imc0"]);
    cloud.run(&["ip", "link", "set", "imc0", "up"]);
    cloud.run(&["ip", "route", "add", "169.254.0.1/32", "dev", "imc0"]);
    cloud
}

/// A running pod: its sandbox and app container.
#[derive(Debug, Clone)]
pub struct Pod {
    pub sandbox: Sandbox,
    pub container_id: String,
}

impl std::ops::Deref for Pod {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

/// The result of an ExecSync.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A containerd with CRI, its node namespace and everything under `$D`.
pub struct Containerd {
    dir: tempfile::TempDir,
    node: Option<NetNs>,
    child: Mutex<Option<Child>>,
    rt: tokio::runtime::Runtime,
    network: String,
    cgroup_parent: String,
    /// Every sandbox id we created: their shim sockets and CNI cache
    /// entries are removed at the end.
    sandboxes: Mutex<Vec<String>>,
    uid_counter: AtomicU32,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("dir", &self.dir.path())
            .field("network", &self.network)
            .finish()
    }
}

impl Containerd {
    /// Starts containerd and imports [`IMAGE`]. Panics (after cleaning up)
    /// when any step fails.
    pub fn start(options: ContainerdOptions) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("pxt-containerd-")
            .tempdir()
            .expect("temp dir for containerd");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let cd = Self {
            dir,
            node: Some(NetNs::new("cd")),
            child: Mutex::new(None),
            rt,
            network: format!("pxt-{tag}"),
            cgroup_parent: format!("/pxt-cd-{tag}"),
            sandboxes: Mutex::new(Vec::new()),
            uid_counter: AtomicU32::new(0),
        };
        // From here on a panic drops `cd`, which cleans up.
        cd.write_config(&options);
        if options.shared_state {
            cd.share_state_dir();
        }
        cd.spawn_containerd();
        cd.import_image();
        cd
    }

    /// `$D`, the harness's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC socket (CRI and containerd API).
    pub fn socket(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// The CRI endpoint as crictl spells it: `unix:///.../containerd.sock`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The node namespace containerd, the bridge and the pods' host-side
    /// veths live in.
    pub fn node(&self) -> &NetNs {
        self.node.as_ref().expect("node namespace")
    }

    /// The cgroup parent of every pod (`/pxt-cd-...`), under each controller.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The CNI network name (also the prefix of our CNI cache entries).
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The CNI conflist containerd reads (rewrite it to change chaining;
    /// containerd reloads it on change).
    pub fn cni_conflist(&self) -> PathBuf {
        self.dir().join("cni/net.d/10-pxt.conflist")
    }

    /// `$D/state`: where containerd keeps pod netns bind mounts.
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    fn share_state_dir(&self) {
        use nix::mount::{MsFlags, mount};
        let state = self.state_dir();
        mount(
            Some(&state),
            &state,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind-mounting $D/state");
        // Removed with every other mount under $D at drop.
        mount(
            None::<&str>,
            &state,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .expect("making $D/state shared");
    }

    /// The CNI bin dir containerd runs plugins from (the node's /opt/cni/bin).
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir().join("cni/bin")
    }

    /// The CNI conf dir containerd reads (the node's /etc/cni/net.d).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir().join("cni/net.d")
    }

    fn write_config(&self, options: &ContainerdOptions) {
        let d = self.dir();
        for sub in [
            "root",
            "state",
            "opt",
            "runc",
            "logs",
            "cni/net.d",
            "cni/bin",
            "cni/ipam",
        ] {
            fs::create_dir_all(d.join(sub)).expect("creating harness dirs");
        }
        for entry in
            fs::read_dir("/usr/lib/cni").expect("/usr/lib/cni (containernetworking-plugins)")
        {
            let entry = entry.expect("reading /usr/lib/cni");
            symlink(entry.path(), d.join("cni/bin").join(entry.file_name()))
                .expect("linking CNI plugin");
        }
        for (name, path) in &options.cni_binaries {
            symlink(path, d.join("cni/bin").join(name)).expect("linking extra CNI plugin");
        }
        let d = d.display();
        let extra_disabled: String = options
            .disabled_plugins
            .iter()
            .map(|p| format!(", {p:?}"))
            .collect();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"{extra_disabled}]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"#
        );
        fs::write(self.dir().join("containerd.toml"), config).expect("writing containerd.toml");
        let mut plugins = vec![serde_json::json!({
            "type": "bridge",
            "bridge": "pxtbr0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_SUBNET, "gateway": GATEWAY}]],
                "routes": [],
                "dataDir": format!("{d}/cni/ipam"),
            },
        })];
        plugins.extend(options.chained_plugins.iter().cloned());
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.network,
            "plugins": plugins,
        });
        fs::write(
            self.cni_conflist(),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .expect("writing CNI conflist");
    }

    fn spawn_containerd(&self) {
        let netns = fs::File::open(self.node().path()).expect("opening node namespace");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("containerd.log"))
            .expect("containerd log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(self.dir().join("containerd.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: setns and setsid are async-signal-safe syscalls; nothing
        // else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawning containerd (is it installed?)");
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.socket().exists() && self.rt.block_on(self.try_version()).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
            {
                panic!(
                    "containerd exited with {status} at start; log:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer CRI within 20 s; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of containerd's log, for panic messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn try_version(&self) -> Result<(), String> {
        let mut c = self.client().await.map_err(|e| e.to_string())?;
        c.version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    async fn client(&self) -> Result<RuntimeServiceClient<Channel>, tonic::transport::Error> {
        let path = self.socket();
        let channel = Endpoint::from_static("http://cri.invalid")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(60))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await?;
        Ok(RuntimeServiceClient::new(channel))
    }

    fn cri<T>(
        &self,
        what: &str,
        f: impl AsyncFnOnce(RuntimeServiceClient<Channel>) -> Result<T, tonic::Status>,
    ) -> T {
        self.rt.block_on(async {
            let client = self
                .client()
                .await
                .unwrap_or_else(|e| panic!("{what}: connecting to containerd: {e}"));
            f(client)
                .await
                .unwrap_or_else(|s| panic!("{what}: {s}\ncontainerd log:\n{}", self.log_tail()))
        })
    }

    fn import_image(&self) {
        let tar = self.dir().join("busybox-oci.tar");
        build_busybox_image(&tar);
        self.import_archive(&tar);
        let _ = fs::remove_file(tar);
    }

    /// Imports an OCI image archive (`ctr images import`, into the CRI
    /// namespace), under the name its index.json annotates.
    pub fn import_archive(&self, tar: &Path) {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", CRI_NAMESPACE, "images", "import"])
            .arg(tar)
            .output()
            .expect("spawning ctr");
        assert!(
            out.status.success(),
            "ctr images import {} failed: {}",
            tar.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn sandbox_config(&self, spec: &PodSpec) -> cri::PodSandboxConfig {
        let n = self.uid_counter.fetch_add(1, Ordering::Relaxed);
        let log_dir = self.dir().join("logs").join(format!("{}-{n}", spec.name));
        fs::create_dir_all(&log_dir).expect("pod log dir");
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: spec.name.clone(),
                uid: format!("{}-{}-{n}", spec.name, self.network),
                namespace: spec.namespace.clone(),
                attempt: 0,
            }),
            // As the kubelet: a host-network pod keeps the node's hostname
            // (runc cannot set one without a UTS namespace of its own).
            hostname: if spec.host_network {
                String::new()
            } else {
                spec.name.chars().take(63).collect()
            },
            log_directory: log_dir.display().to_string(),
            labels: spec.labels.clone().into_iter().collect(),
            annotations: spec.annotations.clone().into_iter().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if spec.host_network {
                            cri::NamespaceMode::Node as i32
                        } else {
                            cri::NamespaceMode::Pod as i32
                        },
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    /// Creates and starts the pod sandbox only (its network is set up, CNI
    /// chain included); start the app with [`Containerd::start_app`].
    pub fn create_sandbox(&self, spec: &PodSpec) -> (Sandbox, cri::PodSandboxConfig) {
        let config = self.sandbox_config(spec);
        let c = config.clone();
        let id = self.cri("RunPodSandbox", async move |mut cl| {
            Ok(cl
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(c),
                    runtime_handler: String::new(),
                })
                .await?
                .into_inner()
                .pod_sandbox_id)
        });
        self.sandboxes.lock().unwrap().push(id.clone());
        let (netns, ip) = if spec.host_network {
            (self.node().path().to_path_buf(), String::new())
        } else {
            self.sandbox_network(&id)
        };
        (
            Sandbox {
                id,
                name: spec.name.clone(),
                namespace: spec.namespace.clone(),
                netns,
                ip,
            },
            config,
        )
    }

    /// `(netns path, pod IP)` from the verbose PodSandboxStatus.
    pub fn sandbox_network(&self, id: &str) -> (PathBuf, String) {
        let id2 = id.to_owned();
        let resp = self.cri("PodSandboxStatus", async move |mut cl| {
            Ok(cl
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id2,
                    verbose: true,
                })
                .await?
                .into_inner())
        });
        let info: serde_json::Value =
            serde_json::from_str(resp.info.get("info").expect("verbose info")).expect("info JSON");
        let netns = info
            .pointer("/runtimeSpec/linux/namespaces")
            .and_then(|v| v.as_array())
            .and_then(|l| l.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .expect("network namespace in the sandbox spec");
        let ip = resp
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        (PathBuf::from(netns), ip)
    }

    /// Creates and starts the app container in `sandbox`.
    pub fn start_app(
        &self,
        sandbox: &Sandbox,
        sandbox_config: &cri::PodSandboxConfig,
        spec: &PodSpec,
    ) -> String {
        let command = spec
            .command
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into(), IDLE_COMMAND.into()]);
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.id.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                command,
                log_path: "app.log".into(),
                labels: spec.labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config.clone()),
        };
        self.cri("CreateContainer+StartContainer", async move |mut cl| {
            let id = cl.create_container(req).await?.into_inner().container_id;
            cl.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
            Ok(id)
        })
    }

    /// Creates a pod sandbox and starts its app container.
    pub fn run_pod(&self, spec: &PodSpec) -> Pod {
        let (sandbox, config) = self.create_sandbox(spec);
        let container_id = self.start_app(&sandbox, &config, spec);
        Pod {
            sandbox,
            container_id,
        }
    }

    /// Runs `argv` in a container (ExecSync, 30 s timeout).
    pub fn exec(&self, container_id: &str, argv: &[&str]) -> ExecOutput {
        let req = cri::ExecSyncRequest {
            container_id: container_id.to_owned(),
            cmd: argv.iter().map(|s| s.to_string()).collect(),
            timeout: 30,
        };
        let resp = self.cri("ExecSync", async move |mut cl| {
            Ok(cl.exec_sync(req).await?.into_inner())
        });
        ExecOutput {
            exit_code: resp.exit_code,
            stdout: String::from_utf8_lossy(&resp.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&resp.stderr).into_owned(),
        }
    }

    /// Creates and starts a container as the kubelet would from a pod
    /// spec's container: its image, `command` and `args` (overriding the
    /// image's entrypoint and cmd), env, hostPath mounts and security
    /// context. Logs go to the sandbox's log directory as `NAME.log`.
    pub fn run_container(
        &self,
        sandbox: &Sandbox,
        sandbox_config: &cri::PodSandboxConfig,
        c: &ContainerSpec,
    ) -> String {
        let security = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: c.add_capabilities.clone(),
                drop_capabilities: c.drop_capabilities.clone(),
            }),
            privileged: c.privileged,
            namespace_options: sandbox_config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.namespace_options.clone()),
            run_as_user: c.run_as_user.map(|value| cri::Int64Value { value }),
            readonly_rootfs: c.readonly_rootfs,
            no_new_privs: c.no_new_privs,
            run_as_group: None,
        };
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.id.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: c.name.clone(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: c.image.clone(),
                    ..Default::default()
                }),
                command: c.command.clone(),
                args: c.args.clone(),
                envs: c
                    .env
                    .iter()
                    .map(|(key, value)| cri::KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                mounts: c
                    .mounts
                    .iter()
                    .map(|m| cri::Mount {
                        container_path: m.container_path.clone(),
                        host_path: m.host_path.display().to_string(),
                        readonly: m.readonly,
                        selinux_relabel: false,
                        propagation: if m.host_to_container {
                            cri::MountPropagation::PropagationHostToContainer as i32
                        } else {
                            cri::MountPropagation::PropagationPrivate as i32
                        },
                    })
                    .collect(),
                log_path: format!("{}.log", c.name),
                linux: Some(cri::LinuxContainerConfig {
                    security_context: Some(security),
                }),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config.clone()),
        };
        self.cri("CreateContainer+StartContainer", async move |mut cl| {
            let id = cl.create_container(req).await?.into_inner().container_id;
            cl.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
            Ok(id)
        })
    }

    /// The log a container wrote (CRI log format: time, stream, tag, line).
    pub fn container_log(&self, sandbox_config: &cri::PodSandboxConfig, name: &str) -> String {
        fs::read_to_string(Path::new(&sandbox_config.log_directory).join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// `(state, exit code)` of a container (state: [`cri::ContainerState`]).
    pub fn container_state(&self, id: &str) -> (i32, i32) {
        let id = id.to_owned();
        let s = self.cri("ContainerStatus", async move |mut cl| {
            Ok(cl
                .container_status(cri::ContainerStatusRequest {
                    container_id: id,
                    verbose: false,
                })
                .await?
                .into_inner())
        });
        s.status.map(|s| (s.state, s.exit_code)).unwrap_or((-1, -1))
    }

    /// Stops a container as the kubelet does when its pod is deleted: TERM,
    /// then KILL after `timeout_secs`.
    pub fn stop_container(&self, id: &str, timeout_secs: i64) {
        let id = id.to_owned();
        self.cri("StopContainer", async move |mut cl| {
            cl.stop_container(cri::StopContainerRequest {
                container_id: id,
                timeout: timeout_secs,
            })
            .await?;
            Ok(())
        });
    }

    /// Stops and removes a pod sandbox (and its containers) through CRI.
    pub fn remove_pod(&self, sandbox_id: &str) {
        let id = sandbox_id.to_owned();
        self.cri("StopPodSandbox+RemovePodSandbox", async move |mut cl| {
            cl.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await?;
            cl.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                .await?;
            Ok(())
        });
    }

    /// Stops containerd (TERM, then KILL after 5 s); pods and shims keep running.
    pub fn stop_containerd(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            stop_process(&mut child);
        }
    }

    /// Starts containerd again on the same root and state (after
    /// [`Containerd::stop_containerd`]).
    pub fn start_containerd(&self) {
        assert!(
            self.child.lock().unwrap().is_none(),
            "containerd is already running"
        );
        let _ = fs::remove_file(self.socket());
        self.spawn_containerd();
    }

    /// Stops and starts containerd.
    pub fn restart_containerd(&self) {
        self.stop_containerd();
        self.start_containerd();
    }

    fn remove_all_pods(&self) -> Result<(), String> {
        self.rt.block_on(async {
            let mut cl = self.client().await.map_err(|e| e.to_string())?;
            let pods = cl
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .items;
            let mut errors = Vec::new();
            for p in pods {
                self.sandboxes.lock().unwrap().push(p.id.clone());
                let stop = cl
                    .stop_pod_sandbox(cri::StopPodSandboxRequest {
                        pod_sandbox_id: p.id.clone(),
                    })
                    .await;
                let rm = cl
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: p.id.clone(),
                    })
                    .await;
                if let Err(e) = stop.and(rm) {
                    errors.push(format!("{}: {e}", p.id));
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        })
    }

    /// The fallback for what CRI could not remove: runc containers under our
    /// runc root, then shims whose command line names our socket (by PID).
    fn kill_leftovers(&self) {
        let runc_root = self.dir().join("runc").join(CRI_NAMESPACE);
        if runc_root.exists()
            && let Ok(out) = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["list", "-q"])
                .output()
        {
            for id in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
            {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["kill", id, "KILL"])
                    .output();
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
        let needle = self.socket().display().to_string();
        for pid in processes_naming(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Reap-free wait: shims are not our children; give them a moment to go.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !processes_naming(&needle).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn unmount_under_dir(&self) {
        let root = self.dir().display().to_string();
        let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(unescape_mount))
            .filter(|p| p.starts_with(&root))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    fn remove_cgroups(&self) {
        let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        let rel = self.cgroup_parent.trim_start_matches('/');
        let mut roots: Vec<PathBuf> = controllers.flatten().map(|c| c.path().join(rel)).collect();
        roots.push(PathBuf::from("/sys/fs/cgroup").join(rel));
        for root in roots {
            rmdir_depth_first(&root);
        }
    }

    /// Where containerd 1.6 puts the shim socket of sandbox `id`:
    /// `/run/containerd/s/<sha256(address/namespace/id)>` — outside `$D`.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let socket = self.socket().display().to_string();
        let digest = Sha256::digest(format!("{socket}/{CRI_NAMESPACE}/{id}").as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Path::new("/run/containerd/s").join(hex)
    }

    fn remove_outside_entries(&self) {
        for id in self.sandboxes.lock().unwrap().iter() {
            let _ = fs::remove_file(self.shim_socket(id));
        }
        // libcni caches one result per network and sandbox: ours
        // (`<network>-<id>-eth0`) and containerd's loopback
        // (`cni-loopback-<id>-lo`).
        if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
            let prefix = format!("{}-", self.network);
            let ids = self.sandboxes.lock().unwrap();
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) || ids.iter().any(|id| name.contains(id.as_str())) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let running = self.child.lock().map(|c| c.is_some()).unwrap_or(false);
        if running && let Err(e) = self.remove_all_pods() {
            eprintln!("containerd harness: removing pods through CRI: {e} (falling back to runc)");
        }
        self.stop_containerd();
        self.kill_leftovers();
        self.unmount_under_dir();
        self.node.take(); // deletes the namespace, and with it the bridge and veths
        self.remove_cgroups();
        self.remove_outside_entries();
    }
}

fn stop_process(child: &mut Child) {
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// PIDs whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| *pid != me)
                .filter(|pid| {
                    fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| {
                            String::from_utf8_lossy(&c)
                                .replace('\0', " ")
                                .contains(needle)
                        })
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn unescape_mount(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn rmdir_depth_first(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                rmdir_depth_first(&e.path());
            }
        }
        let _ = fs::remove_dir(dir);
    }
}

/// Writes an OCI image layout tar of [`IMAGE`]: one uncompressed layer with
/// static busybox, a symlink per applet, /etc/passwd and /etc/group.
fn tar_dir<W: Write>(b: &mut tar::Builder<W>, path: &str, mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(mode);
    h.set_size(0);
    h.set_mtime(0);
    b.append_data(&mut h, path, std::io::empty())
        .expect("tar dir");
}

fn tar_file<W: Write>(b: &mut tar::Builder<W>, path: &str, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(0);
    b.append_data(&mut h, path, data).expect("tar file");
}

fn build_busybox_image(out: &Path) {
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    let mut layer = tar::Builder::new(Vec::new());
    for (d, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("root", 0o700),
    ] {
        tar_dir(&mut layer, d, mode);
    }
    tar_file(&mut layer, "bin/busybox", 0o755, &busybox);
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        layer
            .append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    tar_file(
        &mut layer,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    );
    tar_file(
        &mut layer,
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
    );
    let layer = layer.into_inner().unwrap();
    let sha = |data: &[u8]| -> String {
        Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let layer_sha = sha(&layer);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh", "-c", IDLE_COMMAND],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_sha}")]},
    }))
    .unwrap();
    let config_sha = sha(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_sha}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_sha}"), "size": layer.len()}],
    }))
    .unwrap();
    let manifest_sha = sha(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_sha}"),
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "1"},
        }],
    }))
    .unwrap();
    let mut oci = tar::Builder::new(fs::File::create(out).expect("image tar"));
    let mut put = |path: &str, data: &[u8]| tar_file(&mut oci, path, 0o644, data);
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    put("index.json", &index);
    put(&format!("blobs/sha256/{manifest_sha}"), &manifest);
    put(&format!("blobs/sha256/{config_sha}"), &config);
    put(&format!("blobs/sha256/{layer_sha}"), &layer);
    oci.into_inner().unwrap().flush().unwrap();
}

/// A listener standing in for a proxy inside a pod's network namespace: it
/// answers every HTTP request with `200` and body `proxied <tag>`, so a
/// client in the pod can tell a redirected connection from a direct one.
/// Bound to `0.0.0.0:port` in that namespace; stops on drop.
pub struct ProxyStandIn {
    accepted: std::sync::Arc<AtomicU32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProxyStandIn {
    pub fn start(netns: &Path, port: u16, tag: &str) -> Self {
        let listener = crate::in_netns(netns, move || {
            std::net::TcpListener::bind(("0.0.0.0", port)).expect("binding the proxy stand-in")
        });
        listener.set_nonblocking(true).unwrap();
        let accepted = std::sync::Arc::new(AtomicU32::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let body = format!("proxied {tag}");
        let (acc, st) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            use std::io::Read;
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        acc.fetch_add(1, Ordering::Relaxed);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        // Read the request head before answering, so closing
                        // does not reset the connection under unread data.
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = write!(
                            conn,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for ProxyStandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
