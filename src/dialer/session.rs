//! One attempt: dial, open the session, check the agent's token, keep heartbeats going until
//! the session ends or is cancelled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ring::signature::Ed25519KeyPair;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::Dialing;
use super::connect::{self, DialError, Target};
use super::state::Registry;
use crate::crypto::jwt;
use crate::domain::{AgentMetadata, DialCredentials, Phase, UrlConfiguration};
use crate::metrics::Cause;
use crate::proto::agent::v1 as pb;
use crate::proto::codec::StrictCodec;

/// HTTP/2 flow-control window of each stream of a session: the session call's (hellos,
/// heartbeats, requests and their responses) and each tunnelled request's. 64 KiB is plenty,
/// and it bounds what an agent can make the gateway buffer per stream (hyper's defaults are
/// 2 MiB a stream and 5 MiB a connection: 50 GiB in the worst case at 10,000 agents).
const STREAM_WINDOW: u32 = 64 * 1024;

/// The connection's window: every stream's window together (the session call's and one per
/// tunnelled request allowed at once). A stream's unread data holds the connection's window
/// too, so anything smaller lets a few clients that stop reading a large response (a paused
/// `kubectl logs -f`) hold up every other request through the agent, and its heartbeats,
/// until the session is dropped for missing them. What the gateway can be made to hold stays
/// 64 KiB per open stream, and streams open only for requests clients make.
fn connection_window(max_tunnel_streams: usize) -> u32 {
    let streams = u32::try_from(max_tunnel_streams.saturating_add(1)).unwrap_or(u32::MAX);
    // HTTP/2's largest window is 2^31 - 1.
    STREAM_WINDOW.saturating_mul(streams).min((1 << 31) - 1)
}

/// At most this much is queued for sending on a session.
const MAX_SEND_BUFFER: usize = 64 * 1024;
/// The session stream's encoding and decoding buffers start this small and grow when a
/// message needs it (tonic's default is 8 KiB each).
const CODEC_BUFFER: usize = 1024;
/// Heartbeats fall due on a grid of this step (or of the interval, when shorter).
const HEARTBEAT_GRID: Duration = Duration::from_secs(1);
/// gRPC path of the session call.
const SESSION_PATH: &str = "/kas_gateway.agent.v1.ReceptiveAgent/Session";

/// A request sent through a live session, with where its response goes.
pub type SessionRequest = (pb::Request, oneshot::Sender<pb::Response>);

/// How a session that was up ended.
pub struct Ended {
    /// Why, in words; `None` when the gateway hung up.
    pub error: Option<DialError>,
    /// How long it was up.
    pub up_for: Duration,
}

/// Dials once and runs the session. `Err` when it never came up. Every step (reading the
/// credentials unless `credentials` brings them, DNS, TCP, TLS, HTTP/2, the session call, the
/// hello) ends at once when `cancel` is cancelled, and each has its own deadline.
pub async fn run(
    port: &Arc<dyn super::Port>,
    registry: &Registry,
    config: &UrlConfiguration,
    credentials: Option<crate::domain::Result<DialCredentials>>,
    dialing: &Dialing,
    requests: &mut mpsc::Receiver<SessionRequest>,
    cancel: &CancellationToken,
) -> Result<Ended, DialError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(DialError::transient("the gateway hung up")),
        outcome = attempt(port, registry, config, credentials, dialing, requests) => outcome,
    }
}

/// The gateway's side of HTTP/2 on a connected stream: hyper's client connection, driven by
/// a task of its own, without tonic's `Channel` (a request queue with a worker task and
/// reconnection, none of which a session needs: it is one call, and redialled as a whole).
#[derive(Clone)]
pub(super) struct Http2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for Http2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// Ends the HTTP/2 connection's task when the session ends, however it ends: once the
/// session's handles are gone the connection closes by itself (GOAWAY, then TLS close); an
/// agent that holds it up is cut off after [`CLOSE_GRACE`].
struct Closing(
    Option<tokio::task::JoinHandle<()>>,
    Option<super::state::Hold>,
);

/// How long a connection may take to close after its session ended.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

impl Drop for Closing {
    fn drop(&mut self) {
        let Some(task) = self.0.take() else { return };
        // The agent counts as dialled until its connection has closed.
        let hold = self.1.take();
        if task.is_finished() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let abort = task.abort_handle();
                runtime.spawn(async move {
                    if tokio::time::timeout(CLOSE_GRACE, task).await.is_err() {
                        abort.abort();
                    }
                    drop(hold);
                });
            }
            Err(_) => task.abort(),
        }
    }
}

async fn attempt(
    port: &Arc<dyn super::Port>,
    registry: &Registry,
    config: &UrlConfiguration,
    credentials: Option<crate::domain::Result<DialCredentials>>,
    dialing: &Dialing,
    requests: &mut mpsc::Receiver<SessionRequest>,
) -> Result<Ended, DialError> {
    let settings = &dialing.settings;
    let target = Target::parse(&config.url, config.tls_host.as_deref())?;
    // Dials take turns (a few hundred at a time) until their session is accepted: at a cold
    // start with thousands of agents, every handshake then finishes well within its
    // deadline instead of all of them sharing the CPU and timing out together. Waiting for
    // a turn has no deadline of its own; cancellation ends it.
    let turn = dialing
        .turns
        .acquire()
        .await
        .map_err(|_| DialError::transient("the dialer is stopping"))?;
    let credentials = match credentials {
        Some(credentials) => credentials,
        None => port.credentials(config.id).await,
    };
    let credentials = credentials.map_err(|e| match e {
            // The database being away says nothing about the configuration: try again.
            crate::domain::Error::Unavailable(_) => {
                DialError::transient("the database is unavailable: cannot read the credentials")
                    .because(Cause::Database)
            }
            e => {
                tracing::error!(agent_id = config.agent_id, error = %e, "cannot read the URL configuration's credentials");
                DialError::permanent("the configuration's credentials cannot be decrypted")
            }
        })?;
    let (tls, signer) = match &credentials {
        DialCredentials::Jwt { pkcs8 } => {
            let signer = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
                .map_err(|_| DialError::permanent("the configuration's private key is unusable"))?;
            let tls = if target.tls {
                Some(dialing.tls.without_client_cert(config.ca_cert.as_deref())?)
            } else {
                None
            };
            (tls, Some(Arc::new(signer)))
        }
        DialCredentials::Mtls { client_key } => {
            let cert = config.client_cert.as_deref().ok_or_else(|| {
                DialError::permanent("the configuration has no client certificate")
            })?;
            let tls = connect::tls_config(config.ca_cert.as_deref(), Some((cert, client_key)))?;
            (Some(tls), None)
        }
    };
    let dial_started = Instant::now();
    let io = connect::connect(
        &target,
        tls,
        settings.connect_timeout,
        &settings.denied_networks,
    )
    .await?;
    let tls_error = Arc::new(std::sync::Mutex::new(None));
    let io = connect::Recording::new(io, Arc::clone(&tls_error));
    // Words for a failure: a TLS error seen on the wire says more than HTTP/2 can.
    let client_cert = matches!(credentials, DialCredentials::Mtls { .. });
    let explain_status =
        |status: &tonic::Status| match tls_error.lock().ok().and_then(|e| e.clone()) {
            Some(tls) => connect::explain_tls(&tls, &target.server_name),
            // Under TLS 1.3 an agent checks the client certificate after the handshake and
            // answers a bad one with an alert and a close; when the close wins the race the
            // alert is never read, and HTTP/2 only sees the connection end.
            None if client_cert && connection_lost(status) => DialError::transient(
                "TLS: the agent rejected the client certificate, or closed the connection \
                 right after the handshake (check its client CA)",
            )
            .because(Cause::ClientCertificate),
            None => explain_status(status, &target),
        };

    let mut http2 = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(settings.max_tunnel_streams))
        .max_send_buf_size(MAX_SEND_BUFFER);
    if keepalive_can_end_first(settings) {
        http2
            .keep_alive_interval(settings.keepalive)
            .keep_alive_timeout(settings.keepalive_timeout)
            .keep_alive_while_idle(true);
    }
    let (sender, connection) = tokio::time::timeout(
        settings.connect_timeout,
        http2.handshake::<_, tonic::body::Body>(TokioIo::new(io)),
    )
    .await
    .map_err(|_| {
        DialError::transient("the agent did not start HTTP/2 in time").because(Cause::Timeout)
    })?
    .map_err(|e| explain(&e, &target))?;
    let handshake = dial_started.elapsed();
    let _connection = Closing(
        Some(tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "the HTTP/2 connection to the agent ended");
            }
        })),
        Some(registry.hold(config.agent_id)),
    );
    let origin = http::Uri::try_from(format!("http://{}", target.authority()))
        .map_err(|e| DialError::permanent(format!("invalid endpoint: {e}")))?;
    let mut client = tonic::client::Grpc::with_origin(Http2(sender), origin);
    let tunnel_client = client.clone();

    let (outbound, outbound_rx) = mpsc::channel::<pb::GatewayMessage>(16);
    let mut request = tonic::Request::new(ReceiverStream::new(outbound_rx));
    if let Some(signer) = &signer {
        let token = jwt::sign(signer, &jwt::Claims::issued_at(port.now()))
            .map_err(|e| DialError::permanent(format!("cannot sign the JWT: {e}")))?;
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| DialError::permanent("the JWT is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let call_started = Instant::now();
    // An agent that accepts the connection and then says nothing must not hold the attempt.
    let call = async {
        client
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("HTTP/2 is not ready: {e}")))?;
        client
            .streaming(
                request,
                http::uri::PathAndQuery::from_static(SESSION_PATH),
                StrictCodec::<pb::GatewayMessage, pb::AgentMessage>::with_buffers(
                    tonic::codec::BufferSettings::new(CODEC_BUFFER, 32 * 1024),
                ),
            )
            .await
    };
    let response = tokio::time::timeout(settings.hello_timeout, call)
        .await
        .map_err(|_| {
            DialError::transient("the agent did not answer the session call")
                .because(Cause::Timeout)
        })?
        .map_err(|status| explain_status(&status))?;
    let mut inbound = response.into_inner();

    // The agent's hello and its token.
    let hello = tokio::time::timeout(settings.hello_timeout, inbound.message())
        .await
        .map_err(|_| {
            DialError::transient(format!(
                "the agent sent no hello within {} s (the hello timeout)",
                settings.hello_timeout.as_secs_f64()
            ))
            .because(Cause::Timeout)
        })?
        .map_err(|status| explain_status(&status))?;
    let Some(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(hello)),
    }) = hello
    else {
        refuse(
            outbound,
            &mut inbound,
            refused(pb::refused::Code::Protocol, "expected a hello"),
        )
        .await;
        return Err(
            DialError::transient("the agent did not start with a hello").because(Cause::Protocol)
        );
    };
    let accepted = port
        .check_agent_token(config.agent_id, &hello.agent_token)
        .await
        .map_err(|e| {
            DialError::transient(format!("cannot check the agent token: {e}"))
                .because(Cause::Database)
        })?;
    let token = match accepted {
        Ok(token) => token,
        Err(refusal) => {
            let code = match refusal {
                crate::domain::AgentRefusal::InvalidToken => pb::refused::Code::InvalidToken,
                crate::domain::AgentRefusal::WrongAgent => pb::refused::Code::WrongAgent,
            };
            refuse(outbound, &mut inbound, refused(code, refusal.message())).await;
            return Err(DialError::transient(format!(
                "agent token rejected: {}",
                refusal.message()
            ))
            .because(Cause::AgentToken));
        }
    };
    let accepted = pb::GatewayMessage {
        message: Some(pb::gateway_message::Message::Accepted(pb::Accepted {
            agent_id: config.agent_id,
            gateway_version: env!("CARGO_PKG_VERSION").to_owned(),
            heartbeat_interval_ms: u32::try_from(settings.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
        })),
    };
    outbound
        .send(accepted)
        .await
        .map_err(|_| DialError::transient("the agent closed the session").because(Cause::Closed))?;
    drop(turn);
    crate::metrics::session_established(handshake, call_started.elapsed());
    // Requests to the agent's cluster go through this connection while the session is up.
    registry.set_tunnels(
        config.agent_id,
        Some(super::tunnel::Tunnels::new(
            config.agent_id,
            tunnel_client,
            signer.clone(),
            Arc::clone(port),
            settings.max_tunnel_streams,
        )),
    );
    let _tunnels_open = TunnelsOpen {
        registry,
        agent_id: config.agent_id,
    };
    let metadata = hello.metadata.unwrap_or_default();
    let now = port.now();
    registry.update(config.agent_id, |c| {
        c.phase = Phase::Connected;
        c.connected_since = Some(now);
        c.last_error = None;
        c.token_id = Some(token.id);
        c.metadata = Some(AgentMetadata {
            version: metadata.version,
            commit: metadata.commit,
            pod_namespace: metadata.pod_namespace,
            pod_name: metadata.pod_name,
            kubernetes_version: metadata.kubernetes_version,
        });
    });

    // Heartbeats and requests until the session ends.
    let up = Instant::now();
    let nonce = AtomicU64::new(0);
    let mut last_pong = Instant::now();
    // The last ping's nonce and when it left, for the round trip.
    let mut last_ping: Option<(u64, Instant)> = None;
    let mut heartbeat = tokio::time::interval_at(
        heartbeat_start(dialing.epoch, settings.heartbeat_interval),
        settings.heartbeat_interval,
    );
    // Skipping keeps the ticks on the shared grid.
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut pending: std::collections::HashMap<u64, oneshot::Sender<pb::Response>> =
        std::collections::HashMap::new();
    let mut next_request = 1u64;
    let ended = |error: Option<DialError>| {
        Ok(Ended {
            error,
            up_for: up.elapsed(),
        })
    };
    // Cancellation is watched by `run`, around this whole attempt: once per wake-up.
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if last_pong.elapsed() > settings.heartbeat_interval * settings.heartbeat_misses {
                    return ended(Some(DialError::transient(format!(
                        "no heartbeat reply within {} s",
                        (settings.heartbeat_interval * settings.heartbeat_misses).as_secs()
                    ))
                    .because(Cause::Heartbeat)));
                }
                let sent = nonce.fetch_add(1, Ordering::Relaxed);
                last_ping = Some((sent, Instant::now()));
                let ping = pb::GatewayMessage {
                    message: Some(pb::gateway_message::Message::Ping(pb::Ping { nonce: sent })),
                };
                // A full queue means the agent has stopped taking what is sent: this ping
                // counts as missed, and the loop goes on watching (never waits on the agent).
                if let Err(mpsc::error::TrySendError::Closed(_)) = outbound.try_send(ping) {
                    return ended(Some(DialError::transient("the session closed")));
                }
            }
            Some((mut request, reply)) = requests.recv() => {
                request.id = next_request;
                next_request += 1;
                pending.insert(request.id, reply);
                let message = pb::GatewayMessage {
                    message: Some(pb::gateway_message::Message::Request(request)),
                };
                // An agent that takes nothing for a whole heartbeat interval is as good as
                // silent: waiting longer would also hold up the heartbeats' check.
                match tokio::time::timeout(settings.heartbeat_interval, outbound.send(message)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return ended(Some(DialError::transient("the session closed"))),
                    Err(_) => return ended(Some(DialError::transient(format!(
                        "the agent took no message for {} s",
                        settings.heartbeat_interval.as_secs_f64()
                    )).because(Cause::Heartbeat))),
                }
            }
            message = inbound.message() => match message {
                Ok(Some(pb::AgentMessage { message: Some(pb::agent_message::Message::Pong(pong)) })) => {
                    last_pong = Instant::now();
                    if let Some((sent, at)) = last_ping
                        && sent == pong.nonce
                    {
                        crate::metrics::heartbeat(at.elapsed());
                        last_ping = None;
                    }
                }
                Ok(Some(pb::AgentMessage { message: Some(pb::agent_message::Message::Response(response)) })) => {
                    last_pong = Instant::now();
                    if let Some(reply) = pending.remove(&response.id) {
                        let _ = reply.send(response);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => return ended(Some(
                    DialError::transient("the agent closed the session").because(Cause::Closed),
                )),
                Err(status) => return ended(Some(explain_status(&status))),
            }
        }
    }
}

/// Closes an agent's tunnels when its session ends, however it ends.
struct TunnelsOpen<'a> {
    registry: &'a Registry,
    agent_id: crate::domain::Id,
}

impl Drop for TunnelsOpen<'_> {
    fn drop(&mut self) {
        self.registry.set_tunnels(self.agent_id, None);
    }
}

/// The first heartbeat of a session: the next point of a grid shared by every session
/// (steps of the interval, at most a second, from `epoch`). Sessions' heartbeats then fall due
/// together, a few times per interval, and the gateway wakes for a batch of them instead of
/// once per session: at 10,000 agents, waking (scheduling, polling for readiness) costs more
/// than the heartbeats themselves.
fn heartbeat_start(epoch: tokio::time::Instant, interval: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let grid = interval.min(HEARTBEAT_GRID).as_nanos().max(1);
    let since = now.saturating_duration_since(epoch).as_nanos();
    let next = (since / grid + 1) * grid;
    u64::try_from(next)
        .ok()
        .and_then(|next| epoch.checked_add(Duration::from_nanos(next)))
        .unwrap_or(now)
}

/// Whether HTTP/2 keepalive could end a dead connection before the heartbeats do. Both watch
/// the same connection. hyper pings only after `keepalive` without reading anything from the
/// agent, and gives up `keepalive_timeout` after that. The heartbeats give up at the first tick
/// more than `heartbeat_misses` intervals after the last pong: at most `heartbeat_misses + 1`
/// intervals after it. When they always give up first (the defaults: 60 s against 55 + 20 s),
/// the keepalive is not armed. While pongs arrive it never pings anyway; it would only cost a
/// timer per connection and a lock on every frame read.
fn keepalive_can_end_first(settings: &super::DialerSettings) -> bool {
    let heartbeats_give_up = settings
        .heartbeat_interval
        .saturating_mul(settings.heartbeat_misses.saturating_add(1));
    settings
        .keepalive
        .saturating_add(settings.keepalive_timeout)
        < heartbeats_give_up
}

/// Sends a refusal and ends the gateway's side, then lets the agent read it (up to a second)
/// before the stream goes away.
async fn refuse(
    outbound: mpsc::Sender<pb::GatewayMessage>,
    inbound: &mut tonic::Streaming<pb::AgentMessage>,
    refusal: pb::GatewayMessage,
) {
    let _ = outbound.send(refusal).await;
    drop(outbound);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
}

fn refused(code: pb::refused::Code, message: &str) -> pb::GatewayMessage {
    pb::GatewayMessage {
        message: Some(pb::gateway_message::Message::Refused(pb::Refused {
            code: code.into(),
            message: message.to_owned(),
        })),
    }
}

fn explain(error: &hyper::Error, target: &Target) -> DialError {
    connect::explain_chain(error, &target.server_name).unwrap_or_else(|| {
        DialError::transient(format!("cannot open HTTP/2 to the agent: {error}"))
            .because(Cause::Protocol)
    })
}

/// Whether a failed call means the connection itself went away (HTTP/2 saw it end), rather
/// than an answer from the agent.
fn connection_lost(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
    ) && status.metadata().is_empty()
        && (status.message().contains("connection error")
            || status.message().contains("operation was canceled")
            || status.message().contains("connection was already used")
            || status.message().contains("transport error")
            || status.message().contains("connection closed"))
}

fn explain_status(status: &tonic::Status, target: &Target) -> DialError {
    if status.code() == tonic::Code::Unauthenticated {
        return DialError::transient(format!(
            "the agent rejected the gateway's credentials (JWT): {}",
            status.message()
        ))
        .because(Cause::Jwt);
    }
    if let Some(error) = connect::explain_chain(status, &target.server_name) {
        return error;
    }
    let cause = if connection_lost(status) {
        Cause::Closed
    } else {
        Cause::Protocol
    };
    DialError::transient(format!(
        "the session failed: {} ({:?})",
        status.message(),
        status.code()
    ))
    .because(cause)
}

/// Marks the phase after a failed attempt.
pub fn phase_after(error: &DialError) -> Phase {
    if error.permanent {
        Phase::Failed
    } else {
        Phase::BackingOff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialer::DialerSettings;

    #[test]
    fn keepalive_is_armed_only_where_it_can_end_a_dead_connection_first() {
        // The defaults: the heartbeats give up within 60 s, a keepalive ping could only time
        // out after 75 s.
        assert!(!keepalive_can_end_first(&DialerSettings::default()));
        let slow_heartbeats = DialerSettings {
            heartbeat_interval: Duration::from_secs(60),
            ..DialerSettings::default()
        };
        assert!(keepalive_can_end_first(&slow_heartbeats));
        let many_misses = DialerSettings {
            heartbeat_misses: 5,
            ..DialerSettings::default()
        };
        assert!(keepalive_can_end_first(&many_misses));
        let fast_keepalive = DialerSettings {
            keepalive: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            ..DialerSettings::default()
        };
        assert!(keepalive_can_end_first(&fast_keepalive));
    }
}
