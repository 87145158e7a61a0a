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

/// The API between the replicas of one cluster.
pub mod private {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("kas_gateway.private.v1");
    }
}

/// The encoded descriptors of the served API (not the agent session protocol), for gRPC
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// The replicas' private API, encoded likewise (never served by reflection).
pub const PRIVATE_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/private_descriptors.bin"));

/// The codec of every generated client and server: prost's, except that a message that does
/// not decode (invalid UTF-8 in a string, a truncated field) is the sender's mistake,
/// `INVALID_ARGUMENT`, where prost's codec says `INTERNAL`.
pub mod codec {
    use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
    use tonic::{Code, Status};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// prost's codec with decoding errors reported as `INVALID_ARGUMENT`.
    #[derive(Debug, Clone)]
    pub struct StrictCodec<T, U>(ProstCodec<T, U>, Option<BufferSettings>);

    impl<T, U> Default for StrictCodec<T, U> {
        fn default() -> Self {
            Self(ProstCodec::default(), None)
        }
    }

    impl<T, U> StrictCodec<T, U> {
        /// The codec with these buffers (tonic's default starts each stream's encoding and
        /// decoding buffers at 8 KiB; long-lived streams of small messages need far less).
        pub fn with_buffers(buffers: BufferSettings) -> Self {
            Self(ProstCodec::default(), Some(buffers))
        }
    }

    impl<T, U> Codec for StrictCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = StrictDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            match self.1 {
                Some(buffers) => ProstCodec::<T, U>::raw_encoder(buffers),
                None => self.0.encoder(),
            }
        }

        fn decoder(&mut self) -> Self::Decoder {
            StrictDecoder(match self.1 {
                Some(buffers) => ProstCodec::<T, U>::raw_decoder(buffers),
                None => self.0.decoder(),
            })
        }
    }

    /// prost's decoder with decoding errors reported as `INVALID_ARGUMENT`.
    #[derive(Debug, Clone)]
    pub struct StrictDecoder<U>(ProstDecoder<U>);

    impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(buf).map_err(|status| {
                if status.code() == Code::Internal {
                    Status::invalid_argument(status.message())
                } else {
                    status
                }
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}
