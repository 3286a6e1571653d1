//! Generates the Konnectivity wire types from proto/.
//!
//! The .proto files are compiled by protox, a protobuf compiler written in
//! Rust, instead of prost-build's default of running `protoc`: building the
//! workspace then needs nothing but cargo (a fresh machine has no protoc,
//! and Debian's needs libprotobuf-dev beside it for the well-known types,
//! which protox carries itself). The generated Rust is the same: prost-build
//! generates from the descriptor set either way. Checking generated code in
//! was the alternative; it costs a drift test and a regeneration step, while
//! protox costs little: a clean build of protox and everything it needs
//! (prost and syn included, which the workspace builds anyway) took 14 s
//! wall, 27 s CPU on the 2-core CI machine, against about 150 s wall for a
//! clean build of the whole workspace.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = protox::compile(
        [
            "proto/konnectivity-client/proto/client/client.proto",
            "proto/proto/agent/agent.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        // DATA payloads stay `Bytes`: decoding slices the receive buffer
        // instead of copying every packet.
        // The rpc `Connect` would clash with the generated `connect` constructor;
        // channels are built by hand anyway (custom TLS connector).
        .build_transport(false)
        .codec_path("crate::proto::LeanCodec")
        .bytes(".")
        .compile_fds(files)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
