//! Network namespaces for tests, created with iproute2 and deleted on drop.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/NAME`) that exists as long as the
/// guard does. Loopback is brought up at creation.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `pxt-<prefix>-<pid>-<n>`; names are unique per process and
    /// short enough for interface-name limits where they are reused.
    pub fn new(prefix: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("pxt-{prefix}-{}-{n}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .unwrap_or_else(|e| panic!("spawning {argv:?} in {}: {e}", self.name))
    }

    /// Runs a command inside the namespace; panics with its stderr on failure.
    pub fn run(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.path(), f)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace at
/// `path` (setns is per thread, so the caller's namespace is untouched).
pub fn in_netns<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into test namespace");
        f()
    })
    .join()
    .expect("thread inside the namespace panicked")
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
