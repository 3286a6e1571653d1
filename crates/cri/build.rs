//! Generates the containerd Events client from proto/containerd_events.proto
//! (needs `protoc` and the well-known types under /usr/include, installed by
//! scripts/install-deps.sh as protobuf-compiler and libprotobuf-dev).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/containerd_events.proto"], &["proto"])?;
    Ok(())
}
