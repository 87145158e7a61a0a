//! The Kubernetes API proxy, as GitLab's agent server has it: a kubeconfig whose server is
//! `<gateway>/k8s-proxy` and whose token is `pat:<agent-id>:<personal access token>` reaches
//! the agent's cluster, each request through the agent's live session.
//!
//! The caller is authenticated and authorised before a byte of the body is read: a token with
//! the `k8s_proxy` scope, whose user is at least a Developer of the agent's project. The
//! caller's credentials never reach the agent. Errors are Kubernetes `Status` objects, which
//! kubectl shows as they are.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use http_body::Frame;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::App;
use crate::config::ProxyLimits;
use crate::domain::{Error, Id, ProxyUser, RequestError};

/// The paths the proxy is served under (GitLab's, and the one under `/-/`).
pub const PREFIXES: [&str; 2] = ["/k8s-proxy", "/-/k8s-proxy"];

/// The proxy's limits, and each user's open requests on this replica.
#[derive(Debug)]
pub struct Proxy {
    limits: ProxyLimits,
    users: Mutex<HashMap<Id, Arc<Semaphore>>>,
}

impl Proxy {
    /// A proxy with these limits.
    pub fn new(limits: ProxyLimits) -> Self {
        Self {
            limits,
            users: Mutex::new(HashMap::new()),
        }
    }

    /// A turn for one more open request of `user`, if they have one left.
    fn turn(&self, user: Id) -> Option<OwnedSemaphorePermit> {
        let mut users = match self.users.lock() {
            Ok(users) => users,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Users with nothing open are forgotten, so the map stays as small as the traffic.
        if users.len() > 1024 {
            let max = self.limits.max_requests_per_user;
            users.retain(|_, turns| turns.available_permits() < max);
        }
        let turns = users
            .entry(user)
            .or_insert_with(|| Arc::new(Semaphore::new(self.limits.max_requests_per_user)));
        Arc::clone(turns).try_acquire_owned().ok()
    }
}

/// Whether a path is the proxy's.
pub fn is_proxy_path(path: &str) -> bool {
    PREFIXES.iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Every method under the prefixes.
pub async fn proxy(State(app): State<App>, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    match check_and_send(&app, request, started).await {
        // Sent to the agent (or failed on the way): audited and counted when it ends.
        Ok(response) => response,
        // Refused before anything reached the agent: counted here, logged as a request.
        Err(response) => {
            crate::metrics::k8s_proxy_request(
                method.as_str(),
                response.status().as_u16(),
                started.elapsed(),
                0,
                0,
            );
            response
        }
    }
}

/// Checks the caller and sends the request; `Err` is a refusal by the gateway.
async fn check_and_send(
    app: &App,
    request: Request,
    started: Instant,
) -> Result<Response, Response> {
    let Some((agent_id, token)) = credentials(request.headers()) else {
        return Err(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "give the token as `Authorization: Bearer pat:<agent id>:<personal access token>`",
        ));
    };
    let access = match app
        .service
        .kubernetes_proxy_access(Some(&token), agent_id)
        .await
    {
        Ok(access) => access,
        Err(error) => return Err(refused(&error)),
    };
    let limits = &app.k8s_proxy.limits;
    let Some(turn) = app.k8s_proxy.turn(access.caller.user.id) else {
        return Err(status(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            &format!(
                "you have {} requests open through the gateway already",
                limits.max_requests_per_user
            ),
        ));
    };
    let announced = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limits.max_body_bytes) {
        return Err(status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            &format!(
                "the request body is larger than {} bytes",
                limits.max_body_bytes
            ),
        ));
    }
    // Upgrades (`kubectl exec`, `attach`, `port-forward`) need a byte stream both ways after
    // the response head, which the tunnel does not carry yet.
    if request.headers().contains_key(http::header::UPGRADE) {
        return Err(status(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "kubectl exec, attach and port-forward (HTTP upgrades) do not pass through the \
             gateway yet",
        ));
    }
    let (mut parts, body) = request.into_parts();
    let path = upstream_path(&parts.uri);
    let Ok(uri) = path.parse::<http::Uri>() else {
        return Err(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "invalid path",
        ));
    };
    parts.uri = uri;
    for name in [
        http::header::AUTHORIZATION,
        http::header::COOKIE,
        http::header::PROXY_AUTHORIZATION,
    ] {
        parts.headers.remove(name);
    }
    let method = parts.method.clone();
    let user = ProxyUser {
        id: access.caller.user.id,
        username: access.caller.user.username.clone(),
        access_level: access
            .access_level
            .map_or(0, |level| i32::try_from(level.value()).unwrap_or(0)),
        project_id: access.agent.project.id,
        project_path: access.agent.project.path_with_namespace(),
    };
    let record = Arc::new(Record {
        user: user.username.clone(),
        agent_id,
        method: method.clone(),
        path: path.split('?').next().unwrap_or("").to_owned(),
        status: std::sync::atomic::AtomicU16::new(0),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        started,
        finished: std::sync::atomic::AtomicBool::new(false),
        too_large: tokio::sync::Notify::new(),
    });
    let upload = Metered::upload(Body::new(body), Arc::clone(&record), limits.max_body_bytes);
    let sessions = Arc::clone(app.service.sessions());
    let forwarded = sessions.proxy(
        agent_id,
        &user,
        http::Request::from_parts(parts, Body::new(upload)),
    );
    // Until the response head: a body past the limit ends the request (which cancels it at
    // the agent), and so does the total time.
    let response = tokio::select! {
        outcome = tokio::time::timeout(limits.timeout, forwarded) => match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => unavailable(agent_id, &error),
            Err(_) => unavailable(agent_id, &RequestError::Timeout),
        },
        () = record.too_large.notified() => status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            &format!("the request body is larger than {} bytes", limits.max_body_bytes),
        ),
    };
    record
        .status
        .store(response.status().as_u16(), Ordering::Relaxed);
    // The audit line and the metrics come when the response ends, with the bytes each way.
    Ok(response.map(|body| {
        Body::new(Metered::download(
            body,
            record,
            turn,
            limits.idle_timeout,
            limits.timeout,
        ))
    }))
}

/// One proxied request, for its audit line and metrics.
#[derive(Debug)]
struct Record {
    user: String,
    agent_id: Id,
    method: http::Method,
    path: String,
    status: std::sync::atomic::AtomicU16,
    /// Request body bytes passed on.
    sent: AtomicU64,
    /// Response body bytes passed back.
    received: AtomicU64,
    started: Instant,
    finished: std::sync::atomic::AtomicBool,
    /// Told when the request body passes the limit.
    too_large: tokio::sync::Notify,
}

impl Record {
    /// Logs the audit line and counts the request, once; `ended` says how the response ended.
    fn finish(&self, ended: &str) {
        if self.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        let status = self.status.load(Ordering::Relaxed);
        let sent = self.sent.load(Ordering::Relaxed);
        let received = self.received.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        tracing::info!(
            target: "kas_gateway::k8s_proxy",
            user = %self.user,
            agent_id = self.agent_id,
            method = %self.method,
            path = %self.path,
            status,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            ended,
            "proxied"
        );
        crate::metrics::k8s_proxy_request(self.method.as_str(), status, elapsed, sent, received);
    }
}

/// A body on its way through the proxy, counted: the request's, cut off past the body limit;
/// or the response's, ended when idle or too long, which finishes the record when it ends or
/// is dropped (the client went away) and holds the user's turn until then.
struct Metered {
    inner: Body,
    record: Arc<Record>,
    direction: Direction,
}

enum Direction {
    Upload {
        limit: u64,
    },
    Download {
        _turn: OwnedSemaphorePermit,
        idle: Pin<Box<tokio::time::Sleep>>,
        idle_timeout: std::time::Duration,
        deadline: Pin<Box<tokio::time::Sleep>>,
    },
}

impl Metered {
    fn upload(inner: Body, record: Arc<Record>, limit: u64) -> Self {
        Self {
            inner,
            record,
            direction: Direction::Upload { limit },
        }
    }

    fn download(
        inner: Body,
        record: Arc<Record>,
        turn: OwnedSemaphorePermit,
        idle_timeout: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Self {
        let deadline = record
            .started
            .checked_add(timeout)
            .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std);
        Self {
            inner,
            record,
            direction: Direction::Download {
                _turn: turn,
                idle: Box::pin(tokio::time::sleep(idle_timeout)),
                idle_timeout,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
            },
        }
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Direction::Download { idle, deadline, .. } = &mut this.direction {
            let expired = if deadline.as_mut().poll(cx).is_ready() {
                Some("timeout")
            } else if idle.as_mut().poll(cx).is_ready() {
                Some("idle")
            } else {
                None
            };
            if let Some(why) = expired {
                this.record.finish(why);
                return Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the proxied request lasted too long",
                )))));
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                match &mut this.direction {
                    Direction::Upload { limit } => {
                        let sent = this.record.sent.fetch_add(len, Ordering::Relaxed) + len;
                        if sent > *limit {
                            // Past the limit: the agent sees the body break off, never end,
                            // and the request ends with 413.
                            this.record.too_large.notify_one();
                            return Poll::Ready(Some(Err(axum::Error::new(
                                std::io::Error::other("the request body is too large"),
                            ))));
                        }
                    }
                    Direction::Download {
                        idle, idle_timeout, ..
                    } => {
                        this.record.received.fetch_add(len, Ordering::Relaxed);
                        idle.as_mut()
                            .reset(tokio::time::Instant::now() + *idle_timeout);
                        // A response of announced length is over with its last byte: the
                        // server drops it then, without polling it to its end.
                        if this.inner.is_end_stream() {
                            this.record.finish("complete");
                        }
                    }
                }
            }
            Poll::Ready(None) => {
                if matches!(this.direction, Direction::Download { .. }) {
                    this.record.finish("complete");
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if matches!(this.direction, Direction::Download { .. }) {
                    this.record.finish("broken off");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if matches!(self.direction, Direction::Download { .. }) {
            self.record.finish("client went away");
        }
    }
}

/// `Authorization: Bearer pat:<agent id>:<token>`.
fn credentials(headers: &http::HeaderMap) -> Option<(Id, String)> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    let rest = token.strip_prefix("pat:")?;
    let (agent, token) = rest.split_once(':')?;
    let agent_id = agent.parse::<Id>().ok().filter(|id| *id > 0)?;
    (!token.is_empty()).then(|| (agent_id, token.to_owned()))
}

/// The request's path and query below the prefix, from the Kubernetes API's root.
fn upstream_path(uri: &http::Uri) -> String {
    let path = uri.path();
    let below = PREFIXES
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix))
        .unwrap_or(path);
    let below = if below.is_empty() { "/" } else { below };
    match uri.query() {
        Some(query) => format!("{below}?{query}"),
        None => below.to_owned(),
    }
}

/// A refusal of the caller, as the Kubernetes API words it.
fn refused(error: &Error) -> Response {
    match error {
        Error::Unauthorized => status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized"),
        Error::InsufficientScope { scope } => status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("insufficient_scope: the token needs the {scope} scope"),
        ),
        Error::Forbidden | Error::ForbiddenBecause(_) => status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Forbidden: the agent's project needs you as a Developer or more",
        ),
        Error::NotFound(_) => status(StatusCode::NOT_FOUND, "NotFound", "agent not found"),
        Error::Unavailable(_) => status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the gateway's database is unavailable",
        ),
        other => {
            tracing::error!(error = %other, "the Kubernetes API proxy failed");
            status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "500 Internal Server Error",
            )
        }
    }
}

/// The agent could not be reached, or its answer could not be had.
fn unavailable(agent_id: Id, error: &RequestError) -> Response {
    match error {
        RequestError::NotConnected | RequestError::NoHolder => status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &format!(
                "agent {agent_id} is not connected to the gateway right now, so its cluster \
                 cannot be reached: see the agent's connection state"
            ),
        ),
        RequestError::TooManyStreams => status(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            &error.to_string(),
        ),
        RequestError::Timeout => status(StatusCode::GATEWAY_TIMEOUT, "Timeout", &error.to_string()),
        other => status(
            StatusCode::BAD_GATEWAY,
            "ServiceUnavailable",
            &format!("the agent's cluster did not answer: {other}"),
        ),
    }
}

/// A Kubernetes `Status` object.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": {},
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_pat_agent_token() {
        let headers = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            headers
        };
        assert_eq!(
            credentials(&headers("Bearer pat:7:glpat-abc:def")),
            Some((7, "glpat-abc:def".to_owned()))
        );
        for bad in [
            "Bearer glpat-abc",
            "Bearer pat:x:glpat",
            "Bearer pat:0:glpat",
            "Bearer pat:7:",
            "Basic pat:7:glpat",
        ] {
            assert_eq!(credentials(&headers(bad)), None, "{bad}");
        }
    }

    #[test]
    fn paths_below_the_prefix() {
        let path = |uri: &str| upstream_path(&uri.parse().unwrap());
        assert_eq!(
            path("/k8s-proxy/api/v1/pods?watch=true"),
            "/api/v1/pods?watch=true"
        );
        assert_eq!(path("/-/k8s-proxy/version"), "/version");
        assert_eq!(path("/k8s-proxy"), "/");
        assert!(is_proxy_path("/k8s-proxy/api"));
        assert!(is_proxy_path("/-/k8s-proxy"));
        assert!(!is_proxy_path("/k8s-proxyx/api"));
    }
}
