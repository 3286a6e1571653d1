//! imds-proxy: a metadata-service proxy for pods, and a strict local fake of
//! the metadata services it fronts.
//!
//! - [`pods`] owns who is calling: pods come from a [`pods::PodSource`]; each
//!   pod gets a listener bound inside its own network namespace, so the
//!   socket a connection arrives on names the pod (nothing the pod sends is
//!   trusted). A source-IP listener is the fallback, and it checks that the
//!   pod is the live owner of the address.
//! - [`rules`] owns who may ask for what (deny by default; credential paths
//!   only through rules that name them).
//! - [`proxy`] owns the HTTP edge: the checks the real services make, the
//!   forwarding to the upstream, rate limits, audit and metrics.
//! - [`identity`] owns per-pod cloud identities: the identity a bound pod's
//!   credential request is answered for, and the credential cache.
//! - [`mock`] is the strict fake of Azure IMDS and AWS IMDSv2.

pub mod admin;
pub mod audit;
pub mod body;
pub mod cri;
#[doc(hidden)]
pub mod fuzzing;
mod h1;
pub mod identity;
pub mod metrics;
pub mod mock;
pub mod netns;
pub mod pods;
pub mod proxy;
pub mod ratelimit;
pub mod rules;
pub mod sts;
mod workers;

pub use cri::CriPodSource;
pub use pods::{FilePodSource, Pod, PodSource};
pub use proxy::{Limits, ProxyConfig, ProxyHandle};
pub use rules::Rules;

/// Errors of the library; binaries add context with anyhow.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rules file {path}: {message}")]
    Rules { path: String, message: String },
    #[error("pods file {path}: {message}")]
    Pods { path: String, message: String },
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid upstream URL {0:?}: need http://HOST[:PORT] with no path")]
    Upstream(String),
    #[error("starting the connection workers: {0}")]
    Workers(#[source] std::io::Error),
}
