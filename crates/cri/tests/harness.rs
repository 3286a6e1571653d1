//! The containerd harness leaves nothing behind, after success and after a
//! panic with pods running.

use std::path::{Path, PathBuf};

use proxyctl_testkit::containerd::{Containerd, ContainerdOptions, Pod, PodSpec};
use proxyctl_testkit::{require_root, require_tool};

/// What a harness could leave behind, captured while it lives.
struct Footprint {
    dir: PathBuf,
    node: PathBuf,
    socket: String,
    cgroup_parent: String,
    network: String,
    pod_netns: Vec<PathBuf>,
    sandbox_ids: Vec<String>,
    shim_sockets: Vec<PathBuf>,
}

fn footprint(cd: &Containerd, pods: &[&Pod]) -> Footprint {
    Footprint {
        dir: cd.dir().to_path_buf(),
        node: cd.node().path(),
        socket: cd.socket().display().to_string(),
        cgroup_parent: cd.cgroup_parent().trim_start_matches('/').to_owned(),
        network: cd.network().to_owned(),
        pod_netns: pods.iter().map(|p| p.netns.clone()).collect(),
        sandbox_ids: pods.iter().map(|p| p.id.clone()).collect(),
        shim_sockets: pods.iter().map(|p| cd.shim_socket(&p.id)).collect(),
    }
}

fn assert_clean(f: &Footprint) {
    assert!(!f.dir.exists(), "{} left", f.dir.display());
    assert!(!f.node.exists(), "node namespace {} left", f.node.display());
    for ns in &f.pod_netns {
        assert!(!ns.exists(), "pod namespace {} left", ns.display());
    }
    for s in &f.shim_sockets {
        assert!(!s.exists(), "shim socket {} left", s.display());
    }
    let dir = f.dir.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.lines().any(|l| l.contains(&dir)),
        "mounts under {dir} left"
    );
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(
                !cmd.contains(&f.socket),
                "process left: {} {cmd}",
                entry.path().display()
            );
        }
    }
    for ctrl in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let left = ctrl.path().join(&f.cgroup_parent);
        assert!(!left.exists(), "cgroup {} left", left.display());
    }
    if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(&format!("{}-", f.network))
                    && !f.sandbox_ids.iter().any(|id| name.contains(id.as_str())),
                "CNI cache entry {name} left"
            );
        }
    }
}

fn prerequisites(test: &str) -> bool {
    require_root(test)
        && ["containerd", "ctr", "runc"]
            .iter()
            .all(|t| require_tool(test, t))
}

#[test]
fn teardown_after_success_leaves_nothing() {
    if !prerequisites("teardown_after_success_leaves_nothing") {
        return;
    }
    let cd = Containerd::start(ContainerdOptions::default());
    let a = cd.run_pod(&PodSpec::new("a"));
    let b = cd.run_pod(&PodSpec::new("b"));
    let out = cd.exec(&a.container_id, &["cat", "/etc/passwd"]);
    assert_eq!(out.exit_code, 0);
    assert!(out.stdout.starts_with("root:x:0:0"));
    let f = footprint(&cd, &[&a, &b]);
    assert!(Path::new(&f.socket).exists() && a.netns.exists());
    drop(cd);
    assert_clean(&f);
}

#[test]
fn teardown_after_a_panic_with_containerd_down_leaves_nothing() {
    if !prerequisites("teardown_after_a_panic_with_containerd_down_leaves_nothing") {
        return;
    }
    // containerd is stopped before the panic, so CRI cannot remove the
    // pods: the runc/shim fallback must.
    let result = std::panic::catch_unwind(|| {
        let cd = Containerd::start(ContainerdOptions::default());
        let p = cd.run_pod(&PodSpec::new("doomed"));
        let f = footprint(&cd, &[&p]);
        // The shim socket lives outside $D; a killed shim leaves it behind.
        assert!(f.shim_sockets[0].exists(), "shim socket not where expected");
        cd.stop_containerd();
        std::panic::panic_any(f);
    });
    let payload = result.expect_err("the closure panics");
    let f = payload
        .downcast::<Footprint>()
        .expect("the panic carries the footprint");
    assert_clean(&f);
}
