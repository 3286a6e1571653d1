//! Container -> Windows network namespace through the real CRI client,
//! against a strict runtime.v1 server answering as containerd does for
//! Windows containers (see support/windows_cri.rs for why a fake runtime is
//! the only way to have a Windows runtime spec on a Linux host).

#[path = "support/windows_cri.rs"]
mod windows_cri;

use proxyctl_cri::{CriError, RuntimeEndpoint, container_network_namespace_blocking};
use windows_cri::{FakeContainer, WindowsCri, windows_info};

const NS_A: &str = "5e7f8a9b-0c1d-4e2f-8a3b-4c5d6e7f8091";
const NS_B: &str = "6a7b8c9d-0e1f-4a2b-9c3d-4e5f6a7b8c9d";

fn runtime() -> WindowsCri {
    let mut linux = FakeContainer::windows("deadbeef0001", "linux-app", NS_A);
    linux.info = serde_json::json!({"sandboxID": "p", "pid": 1,
        "runtimeSpec": {"linux": {"namespaces": [{"type": "network", "path": "/run/netns/x"}]}}});
    let mut host = FakeContainer::windows("deadbeef0002", "hostnet", NS_A);
    host.info = windows_info("p2", None);
    WindowsCri::start(vec![
        FakeContainer::windows("ccaae3aba155c0001", "app", NS_A),
        FakeContainer::windows("ccaae3aba155c0002", "sidecar", NS_B),
        FakeContainer::windows("f00d", "short", NS_B),
        linux,
        host,
    ])
}

fn lookup(cri: &WindowsCri, query: &str) -> Result<String, CriError> {
    let endpoint = RuntimeEndpoint::parse(&cri.endpoint()).unwrap();
    container_network_namespace_blocking(&endpoint, query).map(|w| w.network_namespace)
}

#[test]
fn ids_and_unique_prefixes_resolve_with_a_verbose_status_call() {
    let cri = runtime();
    assert_eq!(lookup(&cri, "ccaae3aba155c0001").unwrap(), NS_A);
    assert_eq!(
        cri.calls(),
        [
            "Version(v1)",
            "ListContainers",
            "ContainerStatus(ccaae3aba155c0001, verbose=true)"
        ],
        "exactly hcnproxyctl's calls, status asked verbose"
    );
    assert_eq!(lookup(&cri, "ccaae3aba155c0002").unwrap(), NS_B);
    assert_eq!(lookup(&cri, "f0").unwrap(), NS_B, "unique prefix");
}

#[test]
fn unknown_ambiguous_and_non_windows_containers_are_named() {
    let cri = runtime();
    assert!(matches!(lookup(&cri, "0000"), Err(CriError::NotFound(q)) if q == "0000"));
    match lookup(&cri, "ccaae3") {
        Err(CriError::Ambiguous { candidates, .. }) => assert_eq!(candidates.len(), 2),
        other => panic!("expected ambiguous, got {other:?}"),
    }
    let err = lookup(&cri, "deadbeef0001").unwrap_err().to_string();
    assert!(err.contains("not a Windows container"), "{err}");
    let err = lookup(&cri, "deadbeef0002").unwrap_err().to_string();
    assert!(err.contains("names no network namespace"), "{err}");
    let err = lookup(&cri, "pod:default/web").unwrap_err();
    assert!(matches!(err, CriError::InvalidQuery(_)), "{err}");
    assert!(
        !cri.calls().iter().any(|c| c.contains("verbose=false")),
        "{:?}",
        cri.calls()
    );
}

#[test]
fn a_runtime_that_is_not_there_is_a_connect_error() {
    let cri = runtime();
    let endpoint = RuntimeEndpoint::parse(&cri.endpoint()).unwrap();
    drop(cri);
    let err = container_network_namespace_blocking(&endpoint, "f00d").unwrap_err();
    assert!(matches!(err, CriError::Connect { .. }), "{err}");
}
