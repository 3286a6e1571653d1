//! Generates the containerd Events client from proto/containerd_events.proto
//! (needs `protoc`, installed by scripts/install-deps.sh as protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/containerd_events.proto"], &["proto"])?;
    Ok(())
}
