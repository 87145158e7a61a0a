//! Requests through a live session: each HTTP request becomes its own `Tunnel` stream on the
//! agent's HTTP/2 connection, authenticated as the session call is (a fresh JWT, or the
//! connection's client certificate). Bodies stream both ways; dropping the response before
//! its end (the client went away) resets the stream, which cancels the request at the agent
//! and upstream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::Frame;
use ring::signature::Ed25519KeyPair;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::session::Http2;
use crate::crypto::jwt;
use crate::domain::{Id, ProxyUser, RequestError};
use crate::proto::agent::v1 as pb;
use crate::proto::codec::StrictCodec;

/// gRPC path of the tunnel call.
const TUNNEL_PATH: &str = "/kas_gateway.agent.v1.ReceptiveAgent/Tunnel";

/// The largest request body chunk sent in one message.
const MAX_CHUNK: usize = 32 * 1024;

/// How long the end of a stream whose body was delivered whole is waited for (see
/// [`TunnelBody`]'s `Drop`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What opens tunnels to one agent while its session is up.
#[derive(Clone)]
pub struct Tunnels {
    agent_id: Id,
    grpc: tonic::client::Grpc<Http2>,
    signer: Option<Arc<Ed25519KeyPair>>,
    port: Arc<dyn super::Port>,
    /// Streams open to this agent at most at once.
    streams: Arc<Semaphore>,
}

impl std::fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnels")
            .field("agent_id", &self.agent_id)
            .field("available", &self.streams.available_permits())
            .finish_non_exhaustive()
    }
}

impl Tunnels {
    /// Tunnels over a session's connection.
    pub(super) fn new(
        agent_id: Id,
        grpc: tonic::client::Grpc<Http2>,
        signer: Option<Arc<Ed25519KeyPair>>,
        port: Arc<dyn super::Port>,
        max_streams: usize,
    ) -> Self {
        Self {
            agent_id,
            grpc,
            signer,
            port,
            streams: Arc::new(Semaphore::new(max_streams)),
        }
    }

    /// Sends `request` (its path and query relative to the agent's Kubernetes API) through
    /// the agent for `user`; the response streams back as the agent sends it.
    pub async fn send(
        &self,
        user: &ProxyUser,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, RequestError> {
        let permit = Arc::clone(&self.streams)
            .try_acquire_owned()
            .map_err(|_| RequestError::TooManyStreams)?;
        let authorization =
            match &self.signer {
                Some(signer) => {
                    let token = jwt::sign(signer, &jwt::Claims::issued_at(self.port.now()))
                        .map_err(|e| RequestError::Tunnel(format!("cannot sign the JWT: {e}")))?;
                    Some(format!("Bearer {token}").parse().map_err(|_| {
                        RequestError::Tunnel("the JWT is not a header value".into())
                    })?)
                }
                None => None,
            };
        let mut grpc = self.grpc.clone();
        grpc.ready().await.map_err(|_| RequestError::SessionEnded)?;
        exchange(
            grpc,
            TUNNEL_PATH,
            authorization,
            request_head(self.agent_id, user, &request),
            request.into_body(),
            Some(permit),
        )
        .await
        .map_err(tunnel_error)
    }
}

/// The head of a tunnelled request: `request`'s method, path and query, and headers (without
/// the hop-by-hop ones), for `user`.
pub fn request_head(
    agent_id: Id,
    user: &ProxyUser,
    request: &http::Request<Body>,
) -> pb::RequestHead {
    pb::RequestHead {
        agent_id,
        method: request.method().as_str().to_owned(),
        path: request
            .uri()
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
            .to_owned(),
        headers: crate::agent::upstream::to_headers(request.headers()),
        user: Some(pb::GitLabUser {
            id: user.id,
            username: user.username.clone(),
            access_level: user.access_level,
            project_path: user.project_path.clone(),
            project_id: user.project_id,
        }),
    }
}

/// The request a tunnel head and body stand for, and its user.
pub fn request_from(
    head: pb::RequestHead,
    body: Body,
) -> Result<(Id, ProxyUser, http::Request<Body>), String> {
    let user = head.user.ok_or("the request names no user")?;
    let mut request = http::Request::builder()
        .method(head.method.as_str())
        .uri(head.path.as_str());
    if let Some(headers) = request.headers_mut() {
        append_headers(headers, head.headers);
    }
    let request = request
        .body(body)
        .map_err(|e| format!("invalid request: {e}"))?;
    let user = ProxyUser {
        id: user.id,
        username: user.username,
        access_level: user.access_level,
        project_id: user.project_id,
        project_path: user.project_path,
    };
    Ok((head.agent_id, user, request))
}

/// A response as tunnel messages: its head, then its body in chunks; a body that breaks off
/// ends the stream with `UNAVAILABLE`.
pub fn response_messages(
    response: http::Response<Body>,
) -> impl tokio_stream::Stream<Item = Result<pb::TunnelResponse, tonic::Status>> + Send {
    let (parts, body) = response.into_parts();
    let head = pb::TunnelResponse {
        message: Some(pb::tunnel_response::Message::Head(pb::ResponseHead {
            status: u32::from(parts.status.as_u16()),
            headers: crate::agent::upstream::to_headers(&parts.headers),
        })),
    };
    let chunks = body.into_data_stream().map(|chunk| match chunk {
        Ok(chunk) => Ok(pb::TunnelResponse {
            message: Some(pb::tunnel_response::Message::Body(chunk.to_vec())),
        }),
        Err(error) => Err(tonic::Status::unavailable(format!(
            "the response broke off: {error}"
        ))),
    });
    tokio_stream::once(Ok(head)).chain(chunks)
}

/// Sends a request as a tunnel stream on `grpc` (at `path`, with `authorization`), and reads
/// the response head; the body streams on.
pub async fn exchange<T>(
    mut grpc: tonic::client::Grpc<T>,
    path: &'static str,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    head: pb::RequestHead,
    body: Body,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<http::Response<Body>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let (tx, rx) = mpsc::channel::<pb::TunnelRequest>(4);
    let _ = tx
        .send(pb::TunnelRequest {
            message: Some(pb::tunnel_request::Message::Head(head)),
        })
        .await;
    tokio::spawn(send_body(body, tx));
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(value) = authorization {
        call.metadata_mut().insert("authorization", value);
    }
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("not ready: {}", e.into())))?;
    let mut inbound = grpc
        .streaming(
            call,
            http::uri::PathAndQuery::from_static(path),
            StrictCodec::<pb::TunnelRequest, pb::TunnelResponse>::default(),
        )
        .await?
        .into_inner();
    let head = match inbound.message().await? {
        Some(pb::TunnelResponse {
            message: Some(pb::tunnel_response::Message::Head(head)),
        }) => head,
        _ => {
            return Err(tonic::Status::internal(
                "the agent did not answer with a response head",
            ));
        }
    };
    let mut response = http::Response::builder().status(
        u16::try_from(head.status)
            .ok()
            .and_then(|s| http::StatusCode::from_u16(s).ok())
            .unwrap_or(http::StatusCode::BAD_GATEWAY),
    );
    if let Some(headers) = response.headers_mut() {
        append_headers(headers, head.headers);
    }
    let remaining = response
        .headers_ref()
        .and_then(|headers| headers.get(http::header::CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // The permit goes with the body: the stream counts until the response ends.
    response
        .body(Body::new(TunnelBody {
            inbound: Some(inbound),
            remaining,
            ended: false,
            permit,
        }))
        .map_err(|e| tonic::Status::internal(format!("invalid response: {e}")))
}

/// Tunnel headers into a header map, without the hop-by-hop ones and invalid ones.
fn append_headers(headers: &mut http::HeaderMap, from: Vec<pb::Header>) {
    for header in from {
        let Ok(name) = http::HeaderName::from_bytes(header.name.as_bytes()) else {
            continue;
        };
        if crate::agent::upstream::is_hop_by_hop(&name) {
            continue;
        }
        for value in header.values {
            if let Ok(value) = http::HeaderValue::from_bytes(&value) {
                headers.append(name.clone(), value);
            }
        }
    }
}

/// A tunnel's response body: the agent's body messages as they come.
///
/// hyper drops an HTTP/1.1 response body as soon as its `Content-Length` is written, which is
/// before the agent's end of stream (the gRPC trailers) has arrived. Dropping the stream then
/// resets it (`RST_STREAM`), as for a client that went away. Under load, trailers then arrive
/// on streams h2 no longer remembers (it keeps the last 50 resets), h2 answers each with a
/// reset of its own, and after 1,024 of those it closes the connection: the agent's session,
/// with every request on it. So a body is at its end once its announced length is delivered,
/// and dropping it then reads the stream's end instead of resetting it.
struct TunnelBody {
    inbound: Option<tonic::Streaming<pb::TunnelResponse>>,
    /// Bytes still to come, when the response announced its length.
    remaining: Option<u64>,
    /// The agent ended the stream.
    ended: bool,
    /// The agent's stream counts against its limit until it is over.
    permit: Option<OwnedSemaphorePermit>,
}

impl http_body::Body for TunnelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inbound) = this.inbound.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            let message = match tokio_stream::Stream::poll_next(Pin::new(&mut *inbound), cx) {
                Poll::Ready(message) => message,
                Poll::Pending => return Poll::Pending,
            };
            match message {
                Some(Ok(pb::TunnelResponse {
                    message: Some(pb::tunnel_response::Message::Body(chunk)),
                })) => {
                    if let Some(remaining) = &mut this.remaining {
                        *remaining = remaining.saturating_sub(chunk.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))));
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => {
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        status.message().to_owned(),
                    ))));
                }
                None => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.remaining == Some(0)
    }
}

impl Drop for TunnelBody {
    fn drop(&mut self) {
        // Delivered whole: read the stream's end rather than reset it. Otherwise the client
        // went away, and the reset cancels the request at the agent and upstream.
        if self.ended || self.remaining != Some(0) {
            return;
        }
        let (Some(mut inbound), Ok(runtime)) =
            (self.inbound.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let permit = self.permit.take();
        runtime.spawn(async move {
            let _streaming = permit;
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
        });
    }
}

/// Streams a request body into the tunnel in chunks. A body that breaks off (the client went
/// away) must not look complete to the agent: the stream is then left open until the call is
/// dropped, never ended.
async fn send_body(body: Body, tx: mpsc::Sender<pb::TunnelRequest>) {
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        let Ok(chunk) = chunk else {
            tx.closed().await;
            return;
        };
        for part in chunk.chunks(MAX_CHUNK) {
            let message = pb::TunnelRequest {
                message: Some(pb::tunnel_request::Message::Body(part.to_vec())),
            };
            if tx.send(message).await.is_err() {
                return;
            }
        }
    }
}

/// Why a tunnel call failed, in words.
fn tunnel_error(status: tonic::Status) -> RequestError {
    match status.code() {
        tonic::Code::Unauthenticated => RequestError::Tunnel(format!(
            "the agent rejected the gateway's credentials: {}",
            status.message()
        )),
        tonic::Code::Unimplemented => {
            RequestError::Tunnel("the agent does not support tunnelled requests (too old?)".into())
        }
        _ => RequestError::Tunnel(status.message().to_owned()),
    }
}
