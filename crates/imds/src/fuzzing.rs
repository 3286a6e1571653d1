//! Entry points for the cargo-fuzz targets in `crates/imds/fuzz` (and the
//! crate's own tests and bench): this is not API. It exposes private parts of the crate
//! (the HTTP/1 layer, a way to serve a listener as a pod) exactly as they
//! are, and changes whenever they do.

pub use crate::h1::{
    Chunk, ChunkedDecoder, Field, HeadError, MAX_HEADERS, RequestHead, ResponseHead, View,
    is_hop_by_hop, parse_request, parse_response, put_field, put_number,
};

/// `h1::content_length` as it is. Its `()` error says all the proxy needs
/// (refuse the message); clippy asks for an error type only because this
/// module makes the function public.
#[allow(clippy::result_unit_err)]
pub fn content_length(view: &View<'_>) -> Result<Option<u64>, ()> {
    crate::h1::content_length(view)
}

use crate::audit::Audit;
use crate::pods::MemoryPodSource;
use crate::proxy::{Limits, ProxyConfig, ProxyHandle, parse_upstream};
use crate::{Pod, Rules};

/// A proxy in front of `upstream` for one pod, `default/<pod>`, under
/// `rules` (YAML), serving that pod on a fresh 127.0.0.1 listener: every
/// connection accepted there is the pod's, as on a listener bound inside
/// the pod's namespace. Binding there takes setns(2) and so CAP_SYS_ADMIN;
/// a loopback listener does not, which lets the exchange target (and the
/// exchange's unit tests) run the real request path unprivileged.
///
/// Call it on a tokio runtime. Panics on bad rules or a failed start.
pub async fn loopback_proxy(
    upstream: std::net::SocketAddr,
    pod: &str,
    rules: &str,
    limits: Limits,
    workers: usize,
) -> (ProxyHandle, std::net::SocketAddr) {
    let config = ProxyConfig {
        upstream: parse_upstream(&format!("http://{upstream}")).expect("upstream URL"),
        rules: Rules::from_yaml(rules, "fuzzing").expect("rules"),
        pod_listen: None,
        source_ip_listen: None,
        admin_listen: None,
        audit: Audit::discard(),
        limits,
        reconcile_every: std::time::Duration::ZERO,
        workers,
    };
    let pod = Pod {
        name: pod.into(),
        namespace: "default".into(),
        uid: None,
        labels: Default::default(),
        netns: None,
        ip: None,
    };
    let (proxy, addrs) = loopback_pods(config, vec![pod]).await;
    (proxy, addrs[0])
}

/// A proxy for `pods` (no network namespaces), each served on its own
/// fresh 127.0.0.1 listener as [`loopback_proxy`] does for one; the
/// addresses come in the order of `pods`.
pub async fn loopback_pods(
    config: ProxyConfig,
    pods: Vec<Pod>,
) -> (ProxyHandle, Vec<std::net::SocketAddr>) {
    let keys: Vec<String> = pods.iter().map(Pod::key).collect();
    let proxy = ProxyHandle::start(config, std::sync::Arc::new(MemoryPodSource::new(pods)))
        .await
        .expect("proxy starts");
    let mut addrs = Vec::new();
    for key in keys {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback listener");
        addrs.push(listener.local_addr().expect("listener address"));
        assert!(proxy.serve_as_pod(listener, &key), "the pod is known");
    }
    (proxy, addrs)
}
