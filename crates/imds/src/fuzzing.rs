//! Entry points for the cargo-fuzz targets in `crates/imds/fuzz`, and for
//! nothing else: this is not API. It exposes private parts of the crate
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

use crate::proxy::ProxyHandle;

/// Serves `listener` as the per-pod listener of the pod `key`
/// (`namespace/name`), which `proxy`'s pod source lists without a network
/// namespace: every connection accepted on it is that pod's, as on a
/// listener bound inside the pod's namespace. Binding there takes setns(2)
/// and so CAP_SYS_ADMIN; a listener the caller binds on 127.0.0.1 does not,
/// which lets the exchange target run the real request path unprivileged.
///
/// Call it on the proxy's tokio runtime. False when the proxy has no such
/// pod or the pod already has a listener.
pub fn serve_as_pod(proxy: &ProxyHandle, listener: tokio::net::TcpListener, key: &str) -> bool {
    proxy.serve_as_pod(listener, key)
}
