fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // DATA payloads stay `Bytes`: decoding slices the receive buffer
        // instead of copying every packet.
        // The rpc `Connect` would clash with the generated `connect` constructor;
        // channels are built by hand anyway (custom TLS connector).
        .build_transport(false)
        .codec_path("crate::proto::LeanCodec")
        .bytes(".")
        .compile_protos(
            &[
                "proto/konnectivity-client/proto/client/client.proto",
                "proto/proto/agent/agent.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
