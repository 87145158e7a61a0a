//! Serving HTTP/1.1 and HTTP/2 connections on the gateway's listeners, cleartext or TLS, with
//! every resource a client can hold bounded: connections, streams per connection, header and
//! body read time, idle time, and the time a shutdown may take.

use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Largest request head (request line and headers) on HTTP/1.1, and header list on HTTP/2.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Limits and timeouts shared by the gateway's listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// From accepting a connection (TLS handshake included) to a complete first request
    /// head, and on HTTP/1.1 between requests.
    pub header_timeout: Duration,
    /// From a request head to the end of its body.
    pub body_timeout: Duration,
    /// A connection with no request in progress is closed after this long.
    pub idle_timeout: Duration,
    /// Open connections over all listeners; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// After a shutdown starts, how long open requests and streams may take to finish.
    pub drain_timeout: Duration,
    /// Between SIGTERM and the listeners closing: readiness answers 503 while requests are
    /// still served, so that a load balancer stops sending new ones first.
    pub shutdown_blackout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections: 4096,
            max_concurrent_streams: 100,
            drain_timeout: Duration::from_secs(20),
            shutdown_blackout: Duration::ZERO,
        }
    }
}

/// What the listeners of one gateway share: the limits and the connection budget.
#[derive(Clone, Debug)]
pub struct Shared {
    limits: Arc<Limits>,
    connections: Arc<Semaphore>,
}

impl Shared {
    /// A connection budget of `limits.max_connections` for every listener served with it.
    pub fn new(limits: Limits) -> Self {
        let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        Self {
            limits: Arc::new(limits),
            connections,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `shutdown`; then stops
/// accepting, asks every connection to finish (HTTP/2 `GOAWAY`, HTTP/1.1 close after the
/// current response) and closes whatever is still open when the drain time is over.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    shared: Shared,
    shutdown: CancellationToken,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut connections = JoinSet::new();
    let mut failures = AcceptFailures::default();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&shared.connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                failures.succeeded();
                accepted
            }
            Err(error) => {
                if let Some(pause) = failures.failed(&error) {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                continue;
            }
        };
        connections.spawn(connection(
            stream,
            peer,
            acceptor.clone(),
            router.clone(),
            Arc::clone(&shared.limits),
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    let drained = tokio::time::timeout(shared.limits.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            drain_seconds = shared.limits.drain_timeout.as_secs_f64(),
            "the drain time is over: closing the connections still open"
        );
        connections.shutdown().await;
    }
}

/// Accept errors: those of one connection are skipped; those of the process (out of file
/// descriptors, out of memory) pause accepting, from 5 ms doubling up to 1 s as Go's server
/// does, so that the loop does not spin, and are logged at most once per 10 s.
#[derive(Debug, Default)]
struct AcceptFailures {
    pause: Option<Duration>,
    suppressed: u64,
    last_logged: Option<Instant>,
}

impl AcceptFailures {
    const FIRST_PAUSE: Duration = Duration::from_millis(5);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    fn succeeded(&mut self) {
        self.pause = None;
    }

    /// Records a failure; returns how long to pause before accepting again.
    fn failed(&mut self, error: &std::io::Error) -> Option<Duration> {
        use std::io::ErrorKind;
        if matches!(
            error.kind(),
            ErrorKind::ConnectionAborted
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionRefused
                | ErrorKind::Interrupted
                | ErrorKind::WouldBlock
        ) {
            tracing::debug!(%error, "a connection failed before it was accepted");
            return None;
        }
        let pause = self
            .pause
            .map_or(Self::FIRST_PAUSE, |p| (p * 2).min(Self::MAX_PAUSE));
        self.pause = Some(pause);
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= Self::LOG_EVERY)
        {
            tracing::warn!(
                %error,
                pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                suppressed = self.suppressed,
                "accepting connections failed; pausing (suppressed counts the failures not logged since the last line)"
            );
            self.last_logged = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        Some(pause)
    }
}

/// One connection: the TLS handshake (bounded by the header timeout), then HTTP until the
/// client leaves, the connection idles out, or the gateway shuts down.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let first_request_by = Instant::now() + limits.header_timeout;
    match acceptor {
        None => {
            http(
                TokioIo::new(stream),
                peer,
                router,
                &limits,
                &shutdown,
                first_request_by,
            )
            .await
        }
        Some(acceptor) => {
            let handshake = tokio::select! {
                () = shutdown.cancelled() => return,
                handshake = tokio::time::timeout_at(first_request_by, acceptor.accept(stream)) => handshake,
            };
            match handshake {
                Ok(Ok(tls)) => {
                    http(
                        TokioIo::new(tls),
                        peer,
                        router,
                        &limits,
                        &shutdown,
                        first_request_by,
                    )
                    .await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn http<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    shutdown: &CancellationToken,
    first_request_by: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = Arc::clone(&activity);
        let body_timeout = limits.body_timeout;
        tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let guard = Activity::begin(&activity);
            let deadline = Instant::now() + body_timeout;
            let request = request.map(|body| Body::new(DeadlineBody::new(body, deadline)));
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await?;
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(GuardedBody {
                        body,
                        _guard: guard,
                    })
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        // Data a client may send ahead of the gateway reading it: bounded per connection.
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_pending_accept_reset_streams(Some(100))
        // Finds clients that vanished without closing (a dead NAT entry, a crashed host).
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let connection = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    tokio::pin!(connection);
    let mut closing = false;
    let mut give_up_at: Option<Instant> = None;
    // One timer per connection, reset only when it fires: requests themselves never wake
    // this task (they only count themselves in `activity`), so the idle watch costs nothing
    // per request.
    let check = tokio::time::sleep_until(first_request_by);
    tokio::pin!(check);
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%peer, error = %error, "connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
                // The drain time bounds it from here.
                check.as_mut().reset(Instant::now() + FAR_AWAY);
            }
            () = &mut check => {
                let now = Instant::now();
                if give_up_at.is_some_and(|at| at <= now) {
                    return;
                }
                match activity.idle_deadline(first_request_by, limits.idle_timeout) {
                    Some(deadline) if deadline <= now => {
                        tracing::debug!(%peer, "closing an idle connection");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        // Nothing is in progress: a client that does not close its end
                        // within a second is cut off.
                        let at = now + Duration::from_secs(1);
                        give_up_at = Some(at);
                        check.as_mut().reset(at);
                    }
                    Some(deadline) => check.as_mut().reset(deadline),
                    // Busy: look again after an idle timeout; a request in progress never
                    // makes the deadline earlier than that.
                    None => check.as_mut().reset(now + limits.idle_timeout),
                }
            }
        }
    }
}

/// Later than any connection lives.
const FAR_AWAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Requests in progress on one connection, to tell an idle connection from a busy one.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug)]
struct ActivityState {
    in_progress: usize,
    seen: u64,
    idle_since: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                in_progress: 0,
                seen: 0,
                idle_since: Instant::now(),
            }),
        }
    }

    /// A request started; it ends when the returned guard (kept by the response body) drops.
    fn begin(this: &Arc<Self>) -> ActivityGuard {
        if let Ok(mut state) = this.state.lock() {
            state.in_progress += 1;
            state.seen += 1;
        }
        ActivityGuard(Arc::clone(this))
    }

    /// When the connection should be closed if nothing happens: the first request's deadline
    /// until one arrives, then the idle timeout after the last one ends; `None` while busy.
    fn idle_deadline(&self, first_request_by: Instant, idle_timeout: Duration) -> Option<Instant> {
        let state = self.state.lock().ok()?;
        match (state.in_progress, state.seen) {
            (0, 0) => Some(first_request_by),
            (0, _) => Some(state.idle_since + idle_timeout),
            _ => None,
        }
    }
}

/// Marks a request in progress until dropped.
#[derive(Debug)]
struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.in_progress = state.in_progress.saturating_sub(1);
            if state.in_progress == 0 {
                state.idle_since = Instant::now();
            }
        }
    }
}

/// A response body that keeps its request counted as in progress until it is sent or dropped
/// (a `WatchSessions` stream is a request in progress for as long as it lasts).
struct GuardedBody {
    body: Body,
    /// Held for its `Drop`: the request counts as in progress until the body goes.
    _guard: ActivityGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The request body did not arrive within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within the body timeout")]
pub struct BodyTimeout;

/// A request body that fails with [`BodyTimeout`] if it has not ended by its deadline.
struct DeadlineBody {
    body: hyper::body::Incoming,
    deadline: Pin<Box<Sleep>>,
}

impl DeadlineBody {
    fn new(body: hyper::body::Incoming, deadline: Instant) -> Self {
        Self {
            body,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether `error` (or one of its sources) is a [`BodyTimeout`].
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<BodyTimeout>() {
            return true;
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_and_reset() {
        let mut failures = AcceptFailures::default();
        let emfile = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<_> = (0..10).filter_map(|_| failures.failed(&emfile)).collect();
        assert_eq!(pauses[0], Duration::from_millis(5));
        assert_eq!(pauses[1], Duration::from_millis(10));
        assert_eq!(pauses[9], Duration::from_secs(1));
        assert_eq!(failures.suppressed, 9, "one line logged, nine suppressed");
        failures.succeeded();
        assert_eq!(failures.failed(&emfile), Some(Duration::from_millis(5)));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert_eq!(
            failures.failed(&reset),
            None,
            "one client's failure never pauses"
        );
    }

    #[test]
    fn idle_deadline_follows_requests() {
        let activity = Arc::new(Activity::new());
        let first = Instant::now() + Duration::from_secs(10);
        let idle = Duration::from_secs(60);
        assert_eq!(activity.idle_deadline(first, idle), Some(first));
        let guard = Activity::begin(&activity);
        assert_eq!(activity.idle_deadline(first, idle), None);
        drop(guard);
        let deadline = activity.idle_deadline(first, idle);
        assert!(deadline.is_some_and(|d| d > first));
    }
}
