//! Test harness for the HCN fake, shared by test suites through
//! `#[path = ".../hns-fake/harness.rs"] mod harness;` (it is not part of the
//! cdylib). It builds the fake once per test binary and gives every test its
//! own copy of the library and its own state file.
//!
//! The fake is built by a nested `cargo build -p proxyctl-hns-fake` with its
//! own target directory (target/hns-fake): the `cargo test` that runs us
//! holds the lock of target/, so a nested build there would wait forever.

// Each suite uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (two levels above this file's crate).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|p| p.join("Cargo.lock").is_file())
        .expect("inside the workspace")
        .to_path_buf()
}

/// Path of the built fake library; builds it on first use.
pub fn fake_library() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = workspace_root();
        let target = root.join("target").join("hns-fake");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--quiet", "-p", "proxyctl-hns-fake"])
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("run cargo to build the HCN fake");
        assert!(status.success(), "building proxyctl-hns-fake failed");
        let name = format!(
            "{}proxyctl_hns_fake{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        );
        let path = target.join("debug").join(name);
        assert!(path.is_file(), "{} was not built", path.display());
        path
    })
}

/// One fake HNS: a private copy of the library (so its process-wide
/// bookkeeping is this test's alone: the cdylib has no SONAME, so the
/// dynamic loader keys it by path and each copy is a separate instance) and
/// a state file, in a temp dir removed on drop.
pub struct FakeHns {
    dir: tempfile::TempDir,
}

pub const ENDPOINT: &str = "93f86a7f-e361-4362-b8a4-81bbb6a622dd";
pub const OTHER_ENDPOINT: &str = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
pub const NAMESPACE: &str = "5e7f8a9b-0c1d-4e2f-8a3b-4c5d6e7f8091";
pub const EMPTY_NAMESPACE: &str = "6a7b8c9d-0e1f-4a2b-9c3d-4e5f6a7b8c9d";

impl FakeHns {
    /// A host with HNS `major.minor`, two endpoints (the first in NAMESPACE)
    /// and an empty namespace.
    pub fn new(major: u32, minor: u32) -> Self {
        Self::with_state(serde_json::json!({
            "Version": {"Major": major, "Minor": minor},
            "Endpoints": [
                {"ID": ENDPOINT, "Name": "pod-a_eth0", "HostComputeNamespace": NAMESPACE,
                 "Policies": [{"Type": "OutBoundNAT", "Settings": {"Exceptions": ["10.0.0.0/8"]}}]},
                {"ID": OTHER_ENDPOINT, "Name": "pod-b_eth0"}
            ],
            "Namespaces": [
                {"ID": NAMESPACE, "Endpoints": [ENDPOINT]},
                {"ID": EMPTY_NAMESPACE}
            ]
        }))
    }

    pub fn with_state(state: serde_json::Value) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Self { dir };
        std::fs::copy(fake_library(), fake.library()).expect("copy the fake library");
        fake.write_state(&state);
        fake
    }

    /// This instance's library (PROXYCTL_HNS_LIBRARY).
    pub fn library(&self) -> PathBuf {
        self.dir.path().join(fake_library().file_name().unwrap())
    }

    /// This instance's state file (PROXYCTL_HNS_FAKE_STATE).
    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    pub fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state_file()).expect("read fake state");
        serde_json::from_str(&text).expect("fake state is JSON")
    }

    pub fn write_state(&self, state: &serde_json::Value) {
        std::fs::write(
            self.state_file(),
            serde_json::to_string_pretty(state).unwrap(),
        )
        .expect("write fake state");
    }

    /// The policies HNS holds for an endpoint.
    pub fn policies(&self, endpoint: &str) -> Vec<serde_json::Value> {
        self.state()["Endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["ID"] == endpoint)
            .expect("endpoint in state")["Policies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// How many HcnModifyEndpoint requests reached the fake.
    pub fn modify_requests(&self) -> Vec<String> {
        self.state()["ModifyRequests"]
            .as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    }

    /// Makes the next call of `function` fail with `hresult` and `error`.
    pub fn inject(&self, function: &str, hresult: u32, error: &str) {
        self.inject_after(function, 0, hresult, error);
    }

    /// As `inject`, after letting `skip` calls of `function` through.
    pub fn inject_after(&self, function: &str, skip: u32, hresult: u32, error: &str) {
        let mut state = self.state();
        let list = state
            .as_object_mut()
            .unwrap()
            .entry("Inject")
            .or_insert_with(|| serde_json::json!([]));
        list.as_array_mut().unwrap().push(
            serde_json::json!({"Function": function, "HResult": hresult, "Error": error, "Skip": skip}),
        );
        self.write_state(&state);
    }
}
