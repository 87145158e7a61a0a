//! Generated protobuf and gRPC code.
#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

/// The gateway-agent session protocol.
pub mod agent {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("kas_gateway.agent.v1");
    }
}

/// The gateway's own gRPC API.
pub mod v1 {
    tonic::include_proto!("kas_gateway.v1");
}

/// The encoded descriptors of every `.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
