//! proxyctl's view of a container runtime, through CRI runtime.v1.
//!
//! Owns: the endpoint syntax (`unix:///...`, `CONTAINER_RUNTIME_ENDPOINT`),
//! the tonic client over the runtime's unix socket, lookups from a
//! container id, unique prefix or `pod:NAMESPACE/NAME` to the pod sandbox
//! and its network namespace, and the pod event stream `proxyctl watch`
//! reacts to ([`events`]: CRI lists, triggered by containerd's own event
//! service where the runtime has it ([`containerd`]), else by a timer).
//!
//! The network namespace path is not a CRI field: it is read from the
//! verbose PodSandboxStatus info that containerd (and CRI-O) attach, at
//! `runtimeSpec.linux.namespaces[type=network].path`; for Windows
//! containers (the HNS backend) [`windows`] reads the HNS network namespace
//! from the verbose ContainerStatus info instead.

mod client;
pub mod containerd;
mod endpoint;
mod error;
pub mod events;
mod lookup;
pub mod windows;

pub use client::{ContainerRecord, CriClient, PodRecord, PodState, PodSummary};
pub use containerd::EventSource;
pub use endpoint::{DEFAULT_RUNTIME_ENDPOINT, RUNTIME_ENDPOINT_ENV, RuntimeEndpoint};
pub use error::CriError;
pub use events::{FoundBy, PodEvent, PodWatcher, WatchOptions, WatcherCounters};
pub use lookup::{LookupRecord, Query, lookup, lookup_blocking, resolve_target};
pub use windows::{
    WindowsContainer, container_network_namespace, container_network_namespace_blocking,
    windows_network_namespace,
};

/// Whether `labels` carry every `key=value` of `selector` (Kubernetes
/// equality-based selection; an empty selector matches everything).
pub fn labels_match(
    selector: &std::collections::BTreeMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
