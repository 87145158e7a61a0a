//! Compiles `proto/` with protox (no system protoc) and writes the descriptor set that gRPC
//! reflection serves: the gateway's API only, not the agent session protocol, whose
//! `ReceptiveAgent` service the gateway calls but does not serve.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/kas_gateway/agent/v1/session.proto",
        "proto/kas_gateway/v1/gateway.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let served = protox::compile(["proto/kas_gateway/v1/gateway.proto"], ["proto"])?;
    std::fs::write(out.join("descriptors.bin"), served.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Undecodable messages are INVALID_ARGUMENT, not INTERNAL (see `proto::codec`).
        .codec_path("crate::proto::codec::StrictCodec")
        .compile_fds(descriptors)?;
    // The replicas' own API: compiled apart, so that reflection on the public listeners
    // never describes it.
    let private = protox::compile(["proto/kas_gateway/private/v1/replicas.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::proto::codec::StrictCodec")
        .compile_fds(private)?;
    Ok(())
}
