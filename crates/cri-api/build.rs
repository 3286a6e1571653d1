//! Compiles proto/runtime_v1.proto with protox, a protobuf compiler written
//! in Rust, so building needs nothing but cargo (prost-build would run the
//! `protoc` binary, a system package). See crates/tunnel/build.rs for the
//! measured cost of that choice.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = protox::compile(["proto/runtime_v1.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(files)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
