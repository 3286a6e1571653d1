//! Container -> its Windows network namespace (an HNS namespace GUID), the
//! lookup hcnproxyctl does before it asks HNS for the namespace's endpoints:
//! ListContainers to resolve the id, then `ContainerStatus` with
//! `verbose: true`, whose `info` entry is containerd's JSON record of the
//! container; its OCI spec holds the namespace at
//! `runtimeSpec.windows.network.networkNamespace` (runtime-spec's
//! `WindowsNetwork.NetworkNamespace`). CRI has no field for it, so, as for
//! the Linux netns, this is the one runtime-specific read.
//!
//! Testing: a Windows runtime spec exists only where containerd runs
//! Windows containers, which no Linux CI host can do. The tests therefore
//! answer these calls from a small runtime.v1 server of their own
//! (tests/support/windows_cri.rs, built on proxyctl-cri-api's generated server
//! stubs, on a unix socket). The client code under test is the real one
//! (same tonic channel, same calls, same JSON read); the server is strict
//! (it refuses non-verbose status requests, filters it does not implement
//! and every call proxyctl should not make), and its `info` document has
//! the shape containerd's CRI plugin writes (`sandboxID`, `pid`,
//! `runtimeSpec`, ...), with the Windows part of the spec filled in.

use crate::{ContainerRecord, CriClient, CriError, Query, RuntimeEndpoint};

/// The answer to a Windows container lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsContainer {
    pub container: ContainerRecord,
    /// The HNS namespace GUID, exactly as the runtime spec spells it.
    pub network_namespace: String,
}

/// Reads `runtimeSpec.windows.network.networkNamespace` from a verbose
/// `ContainerStatus` info document.
pub fn windows_network_namespace(id: &str, info: &str) -> Result<String, CriError> {
    let bad = |reason: String| CriError::BadStatus {
        id: id.to_owned(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(info).map_err(|e| bad(format!("verbose info is not JSON: {e}")))?;
    let spec = v
        .get("runtimeSpec")
        .ok_or_else(|| bad("verbose info carries no runtimeSpec".into()))?;
    if spec.get("windows").is_none() {
        return Err(bad(
            "its runtime spec has no `windows` section: not a Windows container".into(),
        ));
    }
    spec.pointer("/windows/network/networkNamespace")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            bad("its runtime spec names no network namespace \
                 (runtimeSpec.windows.network.networkNamespace): a host-network or \
                 shared-network container has no HNS endpoint of its own"
                .into())
        })
}

/// Resolves a container id or unique prefix and reads its Windows network
/// namespace. Only containers are matched (hcnproxyctl's lookup takes a
/// container id); `pod:` forms are refused.
pub async fn container_network_namespace(
    client: &mut CriClient,
    query: &str,
) -> Result<WindowsContainer, CriError> {
    let prefix = match Query::parse(query)? {
        Query::Id(id) => id,
        Query::Pod { .. } => {
            return Err(CriError::InvalidQuery(format!(
                "`{query}`: the HNS backend looks containers up by id (or unique prefix), not by pod"
            )));
        }
    };
    let containers = client.list_containers().await?;
    let matches: Vec<&ContainerRecord> = match containers.iter().find(|c| c.id == prefix) {
        Some(exact) => vec![exact],
        None => containers
            .iter()
            .filter(|c| c.id.starts_with(prefix.as_str()))
            .collect(),
    };
    let container = match matches.as_slice() {
        [] => return Err(CriError::NotFound(prefix)),
        [one] => (*one).clone(),
        many => {
            return Err(CriError::Ambiguous {
                query: prefix,
                candidates: many
                    .iter()
                    .map(|c| format!("container {} ({})", c.id, c.name))
                    .collect(),
            });
        }
    };
    let info = client.container_info(&container.id).await?;
    let info = info.ok_or_else(|| CriError::BadStatus {
        id: container.id.clone(),
        reason: "the runtime sent no verbose `info` with ContainerStatus".into(),
    })?;
    let network_namespace = windows_network_namespace(&container.id, &info)?;
    Ok(WindowsContainer {
        container,
        network_namespace,
    })
}

/// Blocking form of [`container_network_namespace`] for callers without a
/// tokio runtime (the CLI's HNS backend).
pub fn container_network_namespace_blocking(
    endpoint: &RuntimeEndpoint,
    query: &str,
) -> Result<WindowsContainer, CriError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CriError::Connect {
            path: endpoint.socket().to_path_buf(),
            reason: format!("starting an async runtime: {e}"),
        })?;
    rt.block_on(async {
        let mut client = CriClient::connect(endpoint).await?;
        container_network_namespace(&mut client, query).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_is_read_from_the_windows_network_of_the_spec() {
        let info = r#"{"sandboxID":"p1","pid":4242,"runtimeSpec":{"ociVersion":"1.1.0",
            "windows":{"network":{"allowUnqualifiedDNSQuery":true,
            "networkNamespace":"5e7f8a9b-0c1d-4e2f-8a3b-4c5d6e7f8091"}}}}"#;
        assert_eq!(
            windows_network_namespace("c1", info).unwrap(),
            "5e7f8a9b-0c1d-4e2f-8a3b-4c5d6e7f8091"
        );
    }

    #[test]
    fn linux_specs_missing_namespaces_and_garbage_are_named() {
        let cases = [
            (r#"{"runtimeSpec":{"linux":{}}}"#, "not a Windows container"),
            (
                r#"{"runtimeSpec":{"windows":{"network":{}}}}"#,
                "names no network namespace",
            ),
            (
                r#"{"runtimeSpec":{"windows":{"network":{"networkNamespace":""}}}}"#,
                "names no network namespace",
            ),
            (r#"{"sandboxID":"p"}"#, "no runtimeSpec"),
            ("{nope", "not JSON"),
        ];
        for (info, want) in cases {
            let err = windows_network_namespace("c1", info)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want) && err.contains("c1"), "{info}: {err}");
        }
    }
}
