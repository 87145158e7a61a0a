//! What every request leaves behind: a request id (the client's `X-Request-Id` when it is
//! usable, else a new one) returned in the response and carried by a span over every log line
//! of the request; one log line at the end; the HTTP or gRPC metrics.
//!
//! A gRPC call is logged and counted when its response ends, with the gRPC status code from
//! the trailers (or the headers, for an error without a body), not the HTTP status, which is
//! 200 for nearly every call.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use tracing::Instrument;

/// The request id header, as GitLab names it.
pub const REQUEST_ID: &str = "x-request-id";

/// The longest client request id kept; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// The id of this request: the client's when it is short and plain (letters, digits, `-`, `_`,
/// `.`, `:`), so that it can go into logs and headers as it is; else a new one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(given) = headers.get(REQUEST_ID)
        && !given.is_empty()
        && given.len() <= MAX_REQUEST_ID
        && given
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return given.clone();
    }
    new_request_id()
}

/// A new id: this process's random prefix and a counter, 32 hex digits, unique across
/// replicas without a random draw per request.
fn new_request_id() -> HeaderValue {
    static PREFIX: LazyLock<u64> = LazyLock::new(|| {
        let mut bytes = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        u64::from_le_bytes(bytes)
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    HeaderValue::try_from(format!("{:016x}{n:016x}", *PREFIX))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// gRPC requests are told apart by their content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The middleware: see the module's documentation.
pub async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(request.headers());
    let method = request.method().clone();
    let grpc = is_grpc(request.headers()).then(|| GrpcMethod::of(request.uri().path()));
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "<unmatched>".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!("request", request_id = id.to_str().unwrap_or_default());
    let mut response = next.run(request).instrument(span.clone()).await;
    response.headers_mut().insert(REQUEST_ID, id);
    match grpc {
        None => {
            let status = response.status().as_u16();
            let elapsed = started.elapsed();
            let labels = [
                ("method", method.as_str().to_owned()),
                ("route", route.clone()),
                ("status", status.to_string()),
            ];
            metrics::counter!(crate::metrics::HTTP_REQUESTS, &labels).increment(1);
            metrics::histogram!(crate::metrics::HTTP_DURATION, &labels).record(elapsed);
            // Never the query string, which may carry a token.
            tracing::info!(
                target: "kas_gateway::http",
                parent: &span,
                %method,
                route,
                status,
                duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                "request"
            );
            response
        }
        Some(grpc) => {
            let call = GrpcCall {
                method: grpc,
                started,
                span,
                http_status: response.status().as_u16(),
            };
            // An error without a body carries its status in the headers.
            if let Some(code) = grpc_code(response.headers()) {
                call.finish(code);
                return response;
            }
            response.map(|body| {
                Body::new(Observed {
                    inner: body,
                    call: Some(call),
                })
            })
        }
    }
}

/// A served gRPC method, or `unknown` for anything else: label values come from a closed
/// list, whatever paths clients send.
#[derive(Clone, Copy, Debug)]
struct GrpcMethod {
    service: &'static str,
    method: &'static str,
}

impl GrpcMethod {
    fn of(path: &str) -> Self {
        static KNOWN: LazyLock<HashMap<String, GrpcMethod>> = LazyLock::new(known_methods);
        KNOWN.get(path).copied().unwrap_or(Self {
            service: "unknown",
            method: "unknown",
        })
    }
}

/// Every method of every gRPC service a listener of the gateway serves, by path, from the
/// descriptor sets: the API, the private API, health and reflection.
fn known_methods() -> HashMap<String, GrpcMethod> {
    use prost::Message;
    let sets = [
        crate::proto::FILE_DESCRIPTOR_SET,
        crate::proto::PRIVATE_FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut known = HashMap::new();
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for descriptor in file.service {
                let name = format!("{package}.{}", descriptor.name.unwrap_or_default());
                // Leaked once, for a fixed set: label values live as long as the process.
                let service: &'static str = Box::leak(name.into_boxed_str());
                for method in descriptor.method {
                    let method: &'static str =
                        Box::leak(method.name.unwrap_or_default().into_boxed_str());
                    known.insert(
                        format!("/{service}/{method}"),
                        GrpcMethod { service, method },
                    );
                }
            }
        }
    }
    known
}

/// The gRPC status code in a header map (headers or trailers).
fn grpc_code(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// A gRPC call whose response has not ended yet.
struct GrpcCall {
    method: GrpcMethod,
    started: Instant,
    span: tracing::Span,
    http_status: u16,
}

impl GrpcCall {
    fn finish(self, code: tonic::Code) {
        let elapsed = self.started.elapsed();
        let code_name = code_name(code);
        let labels = [
            ("grpc_service", self.method.service),
            ("grpc_method", self.method.method),
            ("grpc_code", code_name),
        ];
        metrics::counter!(crate::metrics::GRPC_HANDLED, &labels).increment(1);
        metrics::histogram!(crate::metrics::GRPC_DURATION, &labels).record(elapsed);
        tracing::info!(
            target: "kas_gateway::grpc",
            parent: &self.span,
            grpc_service = self.method.service,
            grpc_method = self.method.method,
            grpc_code = code_name,
            http_status = self.http_status,
            duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "call"
        );
    }
}

/// The code's name as gRPC spells it (`OK`, `NOT_FOUND`, ...), for logs and labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A gRPC response body that finishes its call at the trailers, at an end without them
/// (`UNKNOWN`), or when dropped first (the client went away: `CANCELLED`).
struct Observed {
    inner: Body,
    call: Option<GrpcCall>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|trailers| grpc_code(trailers).unwrap_or(tonic::Code::Unknown)),
            Poll::Ready(Some(Err(_))) => Some(tonic::Code::Internal),
            Poll::Ready(None) => Some(tonic::Code::Unknown),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            call.finish(code);
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

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish(tonic::Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123_X.y:z"));
        assert_eq!(request_id(&headers), "abc-123_X.y:z");
        for bad in ["a b", "a\"b", "", &"x".repeat(129)] {
            headers.insert(REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&headers);
            assert_eq!(id.len(), 32, "{bad:?} was kept");
        }
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn grpc_methods_come_from_a_closed_list() {
        let known = GrpcMethod::of("/kas_gateway.v1.Sessions/PingAgent");
        assert_eq!(
            (known.service, known.method),
            ("kas_gateway.v1.Sessions", "PingAgent")
        );
        let health = GrpcMethod::of("/grpc.health.v1.Health/Check");
        assert_eq!(health.method, "Check");
        for unknown in [
            "/kas_gateway.v1.Sessions/Nope",
            "/made.up.Service/Call",
            "/",
            "",
        ] {
            assert_eq!(GrpcMethod::of(unknown).method, "unknown", "{unknown}");
        }
    }
}
