//! The cluster side of a receptive agent: what it does with the gateway's tunnelled requests
//! (see `proto/kas_gateway/agent/v1/session.proto`).

pub mod server;
pub mod upstream;

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body::Body as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Status, Streaming};

use crate::proto::agent::v1 as pb;
pub use upstream::{AccessAs, Upstream};

/// The largest body chunk sent back in one message: upstream frames are cut to it.
const MAX_CHUNK: usize = 32 * 1024;

/// A tunnel's response stream.
pub type TunnelStream = Pin<Box<dyn Stream<Item = Result<pb::TunnelResponse, Status>> + Send>>;

/// Serves one tunnelled request: reads its head, sends it with its body to `upstream`, and
/// streams the response back. The gateway cancelling the stream (its client went away) drops
/// the upstream request at once, even while upstream is silent (a watch with no events); so
/// does `shutdown`.
pub async fn tunnel(
    upstream: Option<Arc<Upstream>>,
    mut inbound: Streaming<pb::TunnelRequest>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<TunnelStream, Status> {
    let head = match inbound.message().await? {
        Some(pb::TunnelRequest {
            message: Some(pb::tunnel_request::Message::Head(head)),
        }) => head,
        _ => {
            return Err(Status::invalid_argument(
                "a tunnel starts with the request head",
            ));
        }
    };
    let Some(upstream) = upstream else {
        return Err(Status::unavailable(
            "this agent has no upstream Kubernetes API configured",
        ));
    };
    let body = inbound.map(|message| match message {
        Ok(pb::TunnelRequest {
            message: Some(pb::tunnel_request::Message::Body(chunk)),
        }) => Ok(Bytes::from(chunk)),
        Ok(_) => Err(Status::invalid_argument("only body chunks follow the head")),
        Err(status) => Err(status),
    });
    let (head, mut body) = upstream.forward(head, body).await?;
    let (tx, rx) = mpsc::channel::<Result<pb::TunnelResponse, Status>>(4);
    tokio::spawn(async move {
        let message = |m| Ok(pb::TunnelResponse { message: Some(m) });
        if tx
            .send(message(pb::tunnel_response::Message::Head(head)))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let frame = tokio::select! {
                () = tx.closed() => return,
                // The agent stops: the response is cut short, and says why.
                () = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("the agent is shutting down"))).await;
                    return;
                }
                frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => frame,
            };
            match frame {
                None => return,
                Some(Err(error)) => {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "the Kubernetes API's response broke off: {error}"
                        ))))
                        .await;
                    return;
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    for chunk in data.chunks(MAX_CHUNK) {
                        let chunk = pb::tunnel_response::Message::Body(chunk.to_vec());
                        if tx.send(message(chunk)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
