use std::path::PathBuf;

/// Everything that can go wrong between proxyctl and a container runtime.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The `--runtime-endpoint` / `CONTAINER_RUNTIME_ENDPOINT` value is unusable.
    #[error("--runtime-endpoint: {0}")]
    Endpoint(String),
    /// The socket could not be reached.
    #[error("cannot connect to the container runtime at {path}: {reason}")]
    Connect { path: PathBuf, reason: String },
    /// The runtime answered a call with an error.
    #[error("container runtime: {call} failed: {status}")]
    Rpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    /// The lookup query itself is malformed (empty id, bad `pod:` form).
    #[error("{0}")]
    InvalidQuery(String),
    /// Nothing carries this id, prefix or pod name.
    #[error("no container or pod sandbox matches `{0}`")]
    NotFound(String),
    /// A prefix names more than one object: the caller must give more of it.
    #[error("`{query}` is ambiguous: it matches {} ({}); give more of the id", candidates.len(), candidates.join(", "))]
    Ambiguous {
        query: String,
        candidates: Vec<String>,
    },
    /// The pod exists but has no network namespace to act on (not ready, or
    /// host network).
    #[error("pod {pod} has no network namespace: {reason}")]
    NoNetns { pod: String, reason: String },
    /// The runtime's verbose status was not the JSON we expected.
    #[error("unexpected runtime status for {id}: {reason}")]
    BadStatus { id: String, reason: String },
}

impl CriError {
    pub(crate) fn rpc(call: &'static str, status: tonic::Status) -> Self {
        CriError::Rpc {
            call,
            status: Box::new(status),
        }
    }

    /// True when the runtime itself is unreachable (as opposed to a refused
    /// call or a bad query): callers that watch retry on these.
    pub fn is_unavailable(&self) -> bool {
        match self {
            CriError::Connect { .. } => true,
            CriError::Rpc { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        }
    }
}
