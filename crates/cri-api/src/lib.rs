//! The CRI runtime.v1 API as proxyctl speaks it: the generated messages,
//! the client ([`runtime::v1::runtime_service_client`]) used by
//! `proxyctl-cri` and the test harness, and the server trait
//! ([`runtime::v1::runtime_service_server`]) a test runtime implements.
//!
//! proto/runtime_v1.proto holds only the calls and fields proxyctl uses; it
//! is compiled at build time by protox (pure Rust, no `protoc`; build.rs).

/// `runtime.v1`, the package name CRI runtimes serve (gRPC paths
/// `/runtime.v1.RuntimeService/...`).
pub mod runtime {
    #[allow(clippy::all, missing_docs, unreachable_pub)]
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}
