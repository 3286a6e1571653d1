//! An image written by the `proxyctl-oci` command is accepted by a real
//! containerd (`ctr images import`) and runs as its config says: the
//! entrypoint, the non-root user, the labels.

use std::process::Command;
use std::time::{Duration, Instant};

use proxyctl_testkit::containerd::{ContainerSpec, Containerd, ContainerdOptions, PodSpec};
use proxyctl_testkit::{require_root, require_tool};

const CLI: &str = env!("CARGO_BIN_EXE_proxyctl-oci");
const TEST: &str = "image_from_the_cli_imports_and_runs_in_containerd";

#[test]
fn image_from_the_cli_imports_and_runs_in_containerd() {
    if !require_root(TEST) {
        return;
    }
    for tool in ["containerd", "ctr", "runc"] {
        if !require_tool(TEST, tool) {
            return;
        }
    }
    let cd = Containerd::start(ContainerdOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("tool.tar");
    let name = "localhost/proxyctl-test/tool:0.0.1";
    let out = Command::new(CLI)
        .args(["--name", name, "--with-libs", "--user", "65532:65532"])
        .args(["--add", "/bin/busybox:/bin/busybox"])
        // A dynamically linked program: its libraries come with it.
        .args(["--add", "/usr/bin/env:/usr/bin/env"])
        .args(["--entrypoint", "/bin/busybox", "--cmd", "sh", "--cmd", "-c"])
        .args(["--cmd", "trap 'exit 0' TERM; while :; do sleep 1; done"])
        .args(["--label", "org.opencontainers.image.version=0.0.1"])
        .arg("--out")
        .arg(&tar)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cd.import_archive(&tar);
    let images = Command::new("ctr")
        .arg("--address")
        .arg(cd.socket())
        .args(["-n", "k8s.io", "images", "ls", "-q"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&images.stdout).contains(name));

    let (sandbox, config) = cd.create_sandbox(&PodSpec::new("tool"));
    let id = cd.run_container(
        &sandbox,
        &config,
        &ContainerSpec {
            name: "tool".into(),
            image: name.into(),
            ..Default::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while cd.container_state(&id).0 != 1 {
        assert!(
            Instant::now() < deadline,
            "{}",
            cd.container_log(&config, "tool")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let whoami = cd.exec(&id, &["/bin/busybox", "id", "-u"]);
    assert_eq!(whoami.stdout.trim(), "65532", "{whoami:?}");
    // The dynamic executable finds its libraries inside the image.
    let env = cd.exec(&id, &["/usr/bin/env", "-i", "X=1"]);
    assert_eq!((env.exit_code, env.stdout.trim()), (0, "X=1"), "{env:?}");
    let tmp = cd.exec(&id, &["/bin/busybox", "touch", "/tmp/x"]);
    assert_eq!(tmp.exit_code, 0, "/tmp is writable for the user: {tmp:?}");
    cd.stop_container(&id, 5);
    assert_eq!(cd.container_state(&id), (2, 0));
}
