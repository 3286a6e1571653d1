//! Shared by the imds-proxy process tests: the binary run inside a test
//! namespace, and the files one `serve` reads (its access rules and pod
//! list) and writes (its audit log).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use proxyctl_testkit::{LoggedChild, NetNs};

pub const BIN: &str = env!("CARGO_BIN_EXE_imds-proxy");
/// Where the metadata fake (`imds-proxy mock`) listens.
pub const MOCK: &str = "127.0.0.1:16990";
/// The proxy's pod listener and admin listener.
pub const POD_LISTEN: &str = "127.0.0.1:15990";
pub const ADMIN: &str = "127.0.0.1:15991";
/// A path the rules let client pods read.
pub const INSTANCE: &str = "/metadata/instance?api-version=2021-02-01";

/// Pods labelled `role: ClientContainer` may read /metadata/instance;
/// anything else is refused.
pub const RULES: &str = "rules:\n  - name: clients\n    pods: { labels: { role: ClientContainer } }\n    paths: [ { prefix: /metadata/instance } ]\n";

/// `imds-proxy ARGS` inside `ns`, named after its subcommand; its log is
/// printed when a wait fails.
pub fn spawn_in<S: AsRef<str>>(ns: &NetNs, args: &[S]) -> LoggedChild {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), BIN])
        .args(args.iter().map(AsRef::as_ref));
    let name = format!("imds-proxy {}", args[0].as_ref());
    LoggedChild::spawn(cmd, &name, None).expect("spawning imds-proxy")
}

/// The metadata fake on [`MOCK`] inside `ns`.
pub fn spawn_mock(ns: &NetNs) -> LoggedChild {
    spawn_in(ns, &["mock", "--listen", MOCK])
}

/// A `serve`'s files in a temporary directory (removed on drop): [`RULES`],
/// a pod list naming each given namespace as a pod labelled
/// `role: ClientContainer`, and where the audit log goes.
pub struct ServeFiles {
    pub rules: PathBuf,
    pub pods: PathBuf,
    pub audit: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServeFiles {
    pub fn new(pods: &[(&str, &NetNs)]) -> ServeFiles {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.yaml");
        std::fs::write(&rules, RULES).unwrap();
        let mut list = String::from("pods:\n");
        for (name, ns) in pods {
            list.push_str(&format!(
                "  - name: {name}\n    labels: {{ role: ClientContainer }}\n    netns: {}\n",
                ns.path().display()
            ));
        }
        let pods = dir.path().join("pods.yaml");
        std::fs::write(&pods, list).unwrap();
        ServeFiles {
            rules,
            pods,
            audit: dir.path().join("audit.jsonl"),
            _dir: dir,
        }
    }

    /// `imds-proxy serve` inside `ns` with these files, forwarding to the
    /// fake on [`MOCK`], listening on [`POD_LISTEN`] and [`ADMIN`]; `extra`
    /// flags follow.
    pub fn spawn_serve(&self, ns: &NetNs, extra: &[&str]) -> LoggedChild {
        let upstream = format!("http://{MOCK}");
        let mut args = vec![
            "serve",
            "--upstream",
            &upstream,
            "--rules",
            self.rules.to_str().unwrap(),
            "--pods",
            self.pods.to_str().unwrap(),
            "--pod-listen",
            POD_LISTEN,
            "--admin-listen",
            ADMIN,
            "--audit-log",
            self.audit.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        spawn_in(ns, &args)
    }
}
