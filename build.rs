//! Compiles `proto/` with protox (no system protoc) and writes the descriptor set that gRPC
//! reflection serves: the gateway's API only, not the agent session protocol, whose
//! `ReceptiveAgent` service the gateway calls but does not serve.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    commit();
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
    // Not served by reflection; read by the metrics to name the methods a call may have.
    std::fs::write(out.join("private_descriptors.bin"), private.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::proto::codec::StrictCodec")
        .compile_fds(private)?;
    Ok(())
}

/// The commit built, for the build-info metric and the start log: `KAS_GATEWAY_COMMIT` when
/// the builder sets it (an image built without `.git`), else git's, else `unknown`.
fn commit() {
    println!("cargo:rerun-if-env-changed=KAS_GATEWAY_COMMIT");
    // Only paths that exist: a missing one would run this script at every build.
    for path in [".git/HEAD", ".git/refs/heads"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("KAS_GATEWAY_COMMIT").ok().or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .map(|commit| commit.trim().to_owned())
    });
    let commit = commit
        .filter(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=KAS_GATEWAY_COMMIT={commit}");
}
