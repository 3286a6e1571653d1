//! The runtime.v1 client: a tonic channel over the runtime's unix socket and
//! the few calls proxyctl needs, turned into plain records.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use proxyctl_cri_api::runtime::v1 as cri;
use proxyctl_cri_api::runtime::v1::runtime_service_client::RuntimeServiceClient;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{CriError, RuntimeEndpoint};

/// How long one call may take before it fails: a wedged runtime must not
/// hang `proxyctl lookup` forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether the pod sandbox is running (READY) or stopped (NOTREADY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PodState {
    Ready,
    NotReady,
}

/// A pod sandbox: identity, labels and its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRecord {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub state: PodState,
    /// Nanoseconds since the epoch, as the runtime reports it.
    pub created_at: i64,
    /// The pod's network namespace; `None` when the runtime does not report
    /// one (a stopped sandbox, or a host-network pod).
    pub netns: Option<PathBuf>,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub runtime_handler: String,
    /// The sandbox's init process, when the runtime reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl PodRecord {
    /// `NAMESPACE/NAME`, the form `pod:` lookups use.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A container as ListContainers reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerRecord {
    pub id: String,
    pub name: String,
    pub pod_sandbox_id: String,
    pub image: String,
    pub state: String,
    pub created_at: i64,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// A pod sandbox as ListPodSandbox reports it (no network details: those
/// need one PodSandboxStatus call per pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSummary {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub state: PodState,
    pub created_at: i64,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// A connected runtime.v1 client. Cheap to clone (the channel is shared).
#[derive(Debug, Clone)]
pub struct CriClient {
    endpoint: RuntimeEndpoint,
    inner: RuntimeServiceClient<Channel>,
}

/// The runtime's unix socket.
#[cfg(unix)]
async fn dial(path: PathBuf) -> std::io::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(path).await
}

/// The runtime's named pipe. All instances busy (ERROR_PIPE_BUSY) is
/// retried until tonic's connect timeout gives up, as the tokio docs show.
#[cfg(windows)]
async fn dial(path: PathBuf) -> std::io::Result<tokio::net::windows::named_pipe::NamedPipeClient> {
    /// winerror.h
    const ERROR_PIPE_BUSY: i32 = 231;
    loop {
        match tokio::net::windows::named_pipe::ClientOptions::new().open(&path) {
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
}

impl CriClient {
    /// Connects to the runtime and checks it serves runtime.v1 (Version call).
    pub async fn connect(endpoint: &RuntimeEndpoint) -> Result<Self, CriError> {
        let socket = endpoint.socket().to_path_buf();
        let connect_err = |reason: String| CriError::Connect {
            path: socket.clone(),
            reason,
        };
        let channel = unix_channel(&socket, Some(CALL_TIMEOUT))
            .await
            .map_err(connect_err)?;
        let mut client = Self {
            endpoint: endpoint.clone(),
            inner: RuntimeServiceClient::new(channel),
        };
        client.version().await.map_err(|e| match e {
            CriError::Rpc { status, .. } if status.code() == tonic::Code::Unimplemented => {
                connect_err("the runtime does not serve CRI runtime.v1".into())
            }
            other => other,
        })?;
        Ok(client)
    }

    pub fn endpoint(&self) -> &RuntimeEndpoint {
        &self.endpoint
    }

    /// `(runtime name, runtime version)`.
    pub async fn version(&mut self) -> Result<(String, String), CriError> {
        let v = self
            .inner
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(|s| CriError::rpc("Version", s))?
            .into_inner();
        Ok((v.runtime_name, v.runtime_version))
    }

    /// Every pod sandbox, ready or not.
    pub async fn list_pods(&mut self) -> Result<Vec<PodSummary>, CriError> {
        let items = self
            .inner
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .map_err(|s| CriError::rpc("ListPodSandbox", s))?
            .into_inner()
            .items;
        Ok(items.into_iter().map(pod_summary).collect())
    }

    /// Every container, in any state.
    pub async fn list_containers(&mut self) -> Result<Vec<ContainerRecord>, CriError> {
        let items = self
            .inner
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .map_err(|s| CriError::rpc("ListContainers", s))?
            .into_inner()
            .containers;
        Ok(items.into_iter().map(container_record).collect())
    }

    /// Whether `id` names an app container (not a pod sandbox): the
    /// container store has it. Unknown ids are `false`.
    pub async fn is_container(&mut self, id: &str) -> Result<bool, CriError> {
        match self
            .inner
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(CriError::rpc("ContainerStatus", s)),
        }
    }

    /// The full record of one pod sandbox, network namespace included
    /// (read from the verbose status the runtime attaches).
    pub async fn pod(&mut self, id: &str) -> Result<PodRecord, CriError> {
        let resp = self
            .inner
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: true,
            })
            .await
            .map_err(|s| CriError::rpc("PodSandboxStatus", s))?
            .into_inner();
        pod_record(id, resp)
    }
    /// The verbose `info` document of one container (`ContainerStatus` with
    /// `verbose: true`); `None` when the runtime attaches none.
    pub async fn container_info(&mut self, id: &str) -> Result<Option<String>, CriError> {
        let mut resp = self
            .inner
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: true,
            })
            .await
            .map_err(|s| CriError::rpc("ContainerStatus", s))?
            .into_inner();
        Ok(resp.info.remove("info"))
    }
}

fn pod_state(raw: i32) -> PodState {
    if raw == cri::PodSandboxState::SandboxReady as i32 {
        PodState::Ready
    } else {
        PodState::NotReady
    }
}

fn sorted(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn pod_summary(p: cri::PodSandbox) -> PodSummary {
    let meta = p.metadata.unwrap_or_default();
    PodSummary {
        id: p.id,
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        attempt: meta.attempt,
        state: pod_state(p.state),
        created_at: p.created_at,
        labels: sorted(p.labels),
        annotations: sorted(p.annotations),
    }
}

fn container_record(c: cri::Container) -> ContainerRecord {
    let state = match cri::ContainerState::try_from(c.state) {
        Ok(cri::ContainerState::ContainerCreated) => "created",
        Ok(cri::ContainerState::ContainerRunning) => "running",
        Ok(cri::ContainerState::ContainerExited) => "exited",
        _ => "unknown",
    };
    ContainerRecord {
        id: c.id,
        name: c.metadata.map(|m| m.name).unwrap_or_default(),
        pod_sandbox_id: c.pod_sandbox_id,
        image: c.image.map(|i| i.image).unwrap_or_default(),
        state: state.to_owned(),
        created_at: c.created_at,
        labels: sorted(c.labels),
        annotations: sorted(c.annotations),
    }
}

fn pod_record(id: &str, resp: cri::PodSandboxStatusResponse) -> Result<PodRecord, CriError> {
    let status = resp.status.ok_or_else(|| CriError::BadStatus {
        id: id.to_owned(),
        reason: "PodSandboxStatus carried no status".into(),
    })?;
    let meta = status.metadata.unwrap_or_default();
    let mut ips = Vec::new();
    if let Some(net) = &status.network {
        for ip in std::iter::once(&net.ip).chain(net.additional_ips.iter().map(|p| &p.ip)) {
            if let Ok(ip) = ip.parse() {
                ips.push(ip);
            }
        }
    }
    let (netns, pid) = match resp.info.get("info") {
        Some(info) => verbose_netns(id, info)?,
        None => (None, None),
    };
    Ok(PodRecord {
        id: status.id,
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        attempt: meta.attempt,
        state: pod_state(status.state),
        created_at: status.created_at,
        netns,
        ips,
        labels: sorted(status.labels),
        annotations: sorted(status.annotations),
        runtime_handler: status.runtime_handler,
        pid,
    })
}

/// containerd's verbose info is JSON with the sandbox's OCI spec; the
/// network namespace is the `network` entry of `runtimeSpec.linux.namespaces`.
/// CRI has no field for it, so this is the one runtime-specific read.
fn verbose_netns(id: &str, info: &str) -> Result<(Option<PathBuf>, Option<u32>), CriError> {
    let v: serde_json::Value = serde_json::from_str(info).map_err(|e| CriError::BadStatus {
        id: id.to_owned(),
        reason: format!("verbose info is not JSON: {e}"),
    })?;
    let netns = v
        .pointer("/runtimeSpec/linux/namespaces")
        .and_then(|n| n.as_array())
        .and_then(|list| {
            list.iter()
                .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))
        })
        .and_then(|ns| ns.get("path"))
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let pid = v
        .get("pid")
        .and_then(|p| p.as_u64())
        .filter(|p| *p > 0)
        .and_then(|p| u32::try_from(p).ok());
    Ok((netns, pid))
}

/// A gRPC channel over a unix socket, connected now (so a missing socket is
/// an error here, not at the first call). `call_timeout` bounds each call;
/// long-lived streams pass `None`.
/// A channel to the runtime's socket (a named pipe on Windows, see `dial`).
pub(crate) async fn unix_channel(
    socket: &std::path::Path,
    call_timeout: Option<Duration>,
) -> Result<Channel, String> {
    // tonic needs a URI even for a unix socket; the connector ignores it.
    let mut endpoint = Endpoint::from_static("http://cri.invalid").connect_timeout(CONNECT_TIMEOUT);
    if let Some(t) = call_timeout {
        endpoint = endpoint.timeout(t);
    }
    let path = socket.to_path_buf();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { dial(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| error_chain(&e))
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_comes_from_the_network_entry_of_the_runtime_spec() {
        let info = r#"{"pid": 42, "runtimeSpec": {"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/run/netns/cni-1"}, {"type": "ipc"}]}}}"#;
        let (netns, pid) = verbose_netns("x", info).unwrap();
        assert_eq!(netns, Some(PathBuf::from("/run/netns/cni-1")));
        assert_eq!(pid, Some(42));
    }

    #[test]
    fn host_network_pods_have_no_netns_and_garbage_is_an_error() {
        let info = r#"{"pid": 0, "runtimeSpec": {"linux": {"namespaces": [{"type": "pid"}]}}}"#;
        assert_eq!(verbose_netns("x", info).unwrap(), (None, None));
        assert!(verbose_netns("x", "{not json").is_err());
    }
}
