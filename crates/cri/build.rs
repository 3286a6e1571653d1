//! Generates the containerd Events client from proto/containerd_events.proto
//! with protox (pure Rust; no `protoc` at build time: see
//! crates/tunnel/build.rs for why and what it costs). protox carries the
//! well-known types (google/protobuf/any.proto, timestamp.proto) itself.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = protox::compile(["proto/containerd_events.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(files)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
