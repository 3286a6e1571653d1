//! A strict CRI runtime.v1 server that answers as containerd does for
//! Windows containers, for tests on Linux (shared with the CLI tests through
//! `#[path = ".../cri/tests/support/windows_cri.rs"] mod windows_cri;`).
//!
//! Why a fake is acceptable here: the HNS lookup reads
//! `runtimeSpec.windows.network.networkNamespace` from the verbose
//! ContainerStatus info, and a Windows runtime spec exists only where
//! containerd runs Windows containers, which no Linux host can do. The
//! client under test is the real one (tonic over a unix socket, the same
//! calls); only the runtime's answers are canned. The server is strict:
//! - it serves `Version`, `ListContainers` (no filters) and `ContainerStatus`
//!   only; every other call fails `Unimplemented` and is logged, so a client
//!   making unexpected calls fails its test;
//! - `ContainerStatus` attaches the `info` document only when asked with
//!   `verbose: true`, exactly as containerd does, and answers an unknown id
//!   with `NotFound` in containerd's wording;
//! - every call is logged (`calls()`), so tests can assert the sequence.
//!
//! The `info` document has the keys containerd's CRI plugin writes for a
//! container (`sandboxID`, `pid`, `removing`, `snapshotKey`, `snapshotter`,
//! `runtimeType`, `runtimeOptions`, `config`, `runtimeSpec`), with the
//! Windows part of the OCI spec (`windows.network`) filled in.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use proxyctl_cri_api::runtime::v1 as cri;
use proxyctl_cri_api::runtime::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// One container the fake runtime knows.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub id: String,
    pub name: String,
    pub pod_sandbox_id: String,
    /// The verbose `info` document (see [`windows_info`]).
    pub info: serde_json::Value,
}

impl FakeContainer {
    /// A running Windows container attached to HNS namespace `namespace`.
    pub fn windows(id: &str, name: &str, namespace: &str) -> Self {
        let sandbox = format!("{id}-sandbox");
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            info: windows_info(&sandbox, Some(namespace)),
            pod_sandbox_id: sandbox,
        }
    }
}

/// The verbose info containerd attaches to a Windows container's status.
pub fn windows_info(sandbox_id: &str, namespace: Option<&str>) -> serde_json::Value {
    let mut network = serde_json::json!({"allowUnqualifiedDNSQuery": true});
    if let Some(ns) = namespace {
        network["networkNamespace"] = ns.into();
    }
    serde_json::json!({
        "sandboxID": sandbox_id,
        "pid": 4242,
        "removing": false,
        "snapshotKey": "c1",
        "snapshotter": "windows",
        "runtimeType": "io.containerd.runhcs.v1",
        "runtimeOptions": null,
        "config": {"metadata": {"name": "app"}, "image": {"image": "mcr.microsoft.com/windows/nanoserver:ltsc2022"}},
        "runtimeSpec": {
            "ociVersion": "1.1.0",
            "process": {"user": {"username": "ContainerUser"}, "args": ["cmd"], "cwd": "C:\\"},
            "root": {"path": ""},
            "windows": {
                "layerFolders": ["C:\\ProgramData\\containerd\\root\\io.containerd.snapshotter.v1.windows\\snapshots\\1"],
                "network": network
            }
        }
    })
}

struct Service {
    containers: Arc<Vec<FakeContainer>>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Service {
    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

/// The trait impl: `$served` verbatim plus an `Unimplemented` answer for
/// every other call (generated here, inside the impl, so that
/// `async_trait` sees every method).
macro_rules! runtime_service {
    ({ $($served:tt)* } $($method:ident: $req:ident => $resp:ident),* $(,)?) => {
        #[tonic::async_trait]
        impl RuntimeService for Service {
            $($served)*
            $(
                async fn $method(
                    &self,
                    _request: Request<cri::$req>,
                ) -> Result<Response<cri::$resp>, Status> {
                    self.log(stringify!($method).to_owned());
                    Err(Status::unimplemented(concat!("fake CRI: ", stringify!($method), " is not served")))
                }
            )*
        }
    };
}

type EventStream = Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

runtime_service! {{
    async fn version(
        &self,
        request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        self.log(format!("Version({})", request.get_ref().version));
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "containerd".into(),
            runtime_version: "v2.1.0-fake-windows".into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        self.log("ListContainers".into());
        if request.get_ref().filter.is_some() {
            return Err(Status::invalid_argument(
                "fake CRI: ListContainers filters are not implemented",
            ));
        }
        let containers = self
            .containers
            .iter()
            .map(|c| cri::Container {
                id: c.id.clone(),
                pod_sandbox_id: c.pod_sandbox_id.clone(),
                metadata: Some(cri::ContainerMetadata {
                    name: c.name.clone(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: "mcr.microsoft.com/windows/nanoserver:ltsc2022".into(),
                    ..Default::default()
                }),
                state: cri::ContainerState::ContainerRunning as i32,
                created_at: 1,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let r = request.into_inner();
        self.log(format!(
            "ContainerStatus({}, verbose={})",
            r.container_id, r.verbose
        ));
        let c = self
            .containers
            .iter()
            .find(|c| c.id == r.container_id)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "an error occurred when try to find container {:?}: not found",
                    r.container_id
                ))
            })?;
        let mut info = HashMap::new();
        if r.verbose {
            info.insert("info".to_owned(), c.info.to_string());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(cri::ContainerStatus {
                id: c.id.clone(),
                metadata: Some(cri::ContainerMetadata {
                    name: c.name.clone(),
                    attempt: 0,
                }),
                state: cri::ContainerState::ContainerRunning as i32,
                ..Default::default()
            }),
            info,
        }))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.log("get_container_events".into());
        Err(Status::unimplemented(
            "fake CRI: get_container_events is not served",
        ))
    }
}
        run_pod_sandbox: RunPodSandboxRequest => RunPodSandboxResponse,
        stop_pod_sandbox: StopPodSandboxRequest => StopPodSandboxResponse,
        remove_pod_sandbox: RemovePodSandboxRequest => RemovePodSandboxResponse,
        pod_sandbox_status: PodSandboxStatusRequest => PodSandboxStatusResponse,
        list_pod_sandbox: ListPodSandboxRequest => ListPodSandboxResponse,
        create_container: CreateContainerRequest => CreateContainerResponse,
        start_container: StartContainerRequest => StartContainerResponse,
        stop_container: StopContainerRequest => StopContainerResponse,
        remove_container: RemoveContainerRequest => RemoveContainerResponse,
        exec_sync: ExecSyncRequest => ExecSyncResponse,
}

/// Accepted connections of a unix listener, as tonic's `serve_with_incoming` wants them.
struct Incoming(tokio::net::UnixListener);

impl Stream for Incoming {
    type Item = std::io::Result<tokio::net::UnixStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_accept(cx).map(|r| Some(r.map(|(s, _)| s)))
    }
}

/// A running fake runtime: its socket lives in a temp dir; dropping it stops
/// the server, joins its thread and removes the dir.
pub struct WindowsCri {
    dir: Option<tempfile::TempDir>,
    socket: PathBuf,
    calls: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WindowsCri {
    pub fn start(containers: Vec<FakeContainer>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("proxyctl-fake-cri-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("cri.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let service = Service {
            containers: Arc::new(containers),
            calls: calls.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(RuntimeServiceServer::new(service))
                    .serve_with_incoming_shutdown(Incoming(listener), async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Self {
            dir: Some(dir),
            socket,
            calls,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `unix:///…/cri.sock`, as `--runtime-endpoint` takes it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Every call received so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }
}

impl Drop for WindowsCri {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        drop(self.dir.take());
    }
}
