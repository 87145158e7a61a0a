//! The private API between replicas: a replica that is asked for something only an agent's
//! live session can do (a request through it, dialling now) forwards the call to the replica
//! that holds the agent. Calls carry short-lived HS256 JWTs signed with the replicas' shared
//! secret, as GitLab's KAS does between its own replicas, and the caller's deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::clock::SharedClock;
use crate::crypto::jwt;
use crate::dialer::state::Registry;
use crate::domain::{Id, RequestError, SessionResponse};
use crate::proto::private::v1 as pb;
use crate::proto::private::v1::replica_client::ReplicaClient;
use crate::proto::private::v1::replica_server::{Replica, ReplicaServer};

/// `iss` of the replicas' JWTs.
const ISSUER: &str = "kas-gateway";
/// `aud` of the replicas' JWTs.
const AUDIENCE: &str = "kas-gateway-private-api";
/// A JWT is valid this long after it is made.
const TOKEN_LIFETIME_SECS: i64 = 30;
/// JWTs valid for longer than this are refused.
const MAX_TOKEN_LIFETIME_SECS: i64 = 60;
/// The largest message either side reads.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The longest a forwarded request waits for an agent.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Time to open a connection to another replica.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// gRPC path of the relayed tunnel.
const PROXY_PATH: &str = "/kas_gateway.private.v1.Replica/Proxy";
/// Connections kept to other replicas (one per address; addresses of replicas long gone are
/// dropped when there are more).
const MAX_CHANNELS: usize = 64;

/// The server side: answers other replicas from this replica's sessions.
#[derive(Clone, Debug)]
pub struct Server {
    local: Arc<Registry>,
}

/// The private API as an axum router, every call authenticated from its headers before
/// the message is read.
pub fn router(
    local: Arc<Registry>,
    secret: Zeroizing<Vec<u8>>,
    clock: SharedClock,
) -> axum::Router {
    let secret = Arc::new(secret);
    let check = move |request: Request<()>| -> Result<Request<()>, Status> {
        let unauthenticated = || Status::unauthenticated("unauthenticated");
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(jwt::bearer)
            .ok_or_else(unauthenticated)?;
        jwt::verify_hs256(
            token,
            &secret,
            Some(ISSUER),
            AUDIENCE,
            clock.now(),
            MAX_TOKEN_LIFETIME_SECS,
        )
        .map_err(|error| {
            static REFUSED: crate::telemetry::Throttle =
                crate::telemetry::Throttle::new(Duration::from_secs(10));
            if let Some(suppressed) = REFUSED.allow() {
                tracing::info!(%error, suppressed, "refused a private API call");
            }
            unauthenticated()
        })?;
        Ok(request)
    };
    let server = ReplicaServer::new(Server { local }).max_decoding_message_size(MAX_MESSAGE_BYTES);
    tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
        server, check,
    ))
    .prepare()
    .into_axum_router()
}

fn status(error: &RequestError) -> Status {
    match error {
        RequestError::NotConnected => Status::failed_precondition(error.to_string()),
        RequestError::Timeout => Status::deadline_exceeded(error.to_string()),
        // Not UNAVAILABLE: the caller tells "the session ended" from "no answer from the
        // holder" by the code.
        RequestError::SessionEnded => Status::aborted(error.to_string()),
        RequestError::TooManyStreams => Status::resource_exhausted(error.to_string()),
        // The agent's own failure, in words, told apart from the holder's by the code.
        RequestError::Tunnel(message) => Status::unknown(message.clone()),
        _ => Status::unavailable(error.to_string()),
    }
}

/// The tunnel's response stream, as the private API relays it.
type ProxyStream = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<crate::proto::agent::v1::TunnelResponse, Status>>
            + Send,
    >,
>;

#[tonic::async_trait]
impl Replica for Server {
    type ProxyStream = ProxyStream;

    async fn proxy(
        &self,
        request: Request<tonic::Streaming<crate::proto::agent::v1::TunnelRequest>>,
    ) -> Result<Response<Self::ProxyStream>, Status> {
        use crate::proto::agent::v1 as agent;
        use tokio_stream::StreamExt;
        let mut inbound = request.into_inner();
        let head = match inbound.message().await? {
            Some(agent::TunnelRequest {
                message: Some(agent::tunnel_request::Message::Head(head)),
            }) => head,
            _ => {
                return Err(Status::invalid_argument(
                    "a tunnel starts with the request head",
                ));
            }
        };
        let body = inbound.map_while(|message| match message {
            Ok(agent::TunnelRequest {
                message: Some(agent::tunnel_request::Message::Body(chunk)),
            }) => Some(Ok::<_, Status>(bytes::Bytes::from(chunk))),
            // The caller's stream broke off: the body must not look complete.
            Ok(_) | Err(_) => None,
        });
        let (agent_id, user, request) =
            crate::dialer::tunnel::request_from(head, axum::body::Body::from_stream(body))
                .map_err(Status::invalid_argument)?;
        let response = self
            .local
            .proxy(agent_id, &user, request)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(Box::pin(
            crate::dialer::tunnel::response_messages(response),
        )))
    }

    async fn request(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<pb::SessionResponse>, Status> {
        let r = request.into_inner();
        let timeout = Duration::from_millis(u64::from(r.timeout_ms)).min(MAX_TIMEOUT);
        let response = self
            .local
            .request(r.agent_id, &r.method, r.payload, timeout)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::SessionResponse {
            ok: response.status() == crate::proto::agent::v1::response::Status::Ok,
            payload: response.payload,
        }))
    }

    async fn dial_now(
        &self,
        request: Request<pb::DialNowRequest>,
    ) -> Result<Response<pb::DialNowResponse>, Status> {
        if self.local.dial_now(request.get_ref().agent_id) {
            Ok(Response::new(pb::DialNowResponse {}))
        } else {
            Err(status(&RequestError::NotConnected))
        }
    }
}

/// The client side: calls the replica that holds an agent.
pub struct Forwarder {
    secret: Arc<Zeroizing<Vec<u8>>>,
    clock: SharedClock,
    channels: Mutex<HashMap<String, Channel>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("secret", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Calls signed with `secret`, timed by `clock`.
    pub fn new(secret: Zeroizing<Vec<u8>>, clock: SharedClock) -> Self {
        Self {
            secret: Arc::new(secret),
            clock,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, url: &str) -> Result<ReplicaClient<Channel>, String> {
        Ok(ReplicaClient::new(self.channel(url)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The connection to the replica at `url`, made once.
    fn channel(&self, url: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().map_err(|_| "poisoned".to_owned())?;
        let channel = match channels.get(url) {
            Some(channel) => channel.clone(),
            None => {
                let channel = Endpoint::from_shared(url.to_owned())
                    .map_err(|_| "its private API URL is not a valid URL".to_owned())?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .connect_lazy();
                if channels.len() >= MAX_CHANNELS {
                    channels.clear();
                }
                channels.insert(url.to_owned(), channel.clone());
                channel
            }
        };
        Ok(channel)
    }

    /// A fresh JWT for a call.
    fn token(&self) -> String {
        let now = self.clock.now().as_secs();
        jwt::sign_hs256(
            &self.secret,
            &serde_json::json!({
                "iss": ISSUER,
                "aud": AUDIENCE,
                "iat": now,
                "nbf": now - 5,
                "exp": now + TOKEN_LIFETIME_SECS,
            }),
        )
    }

    fn signed<T>(&self, message: T, deadline: Duration) -> Request<T> {
        let token = self.token();
        let mut request = Request::new(message);
        request.set_timeout(deadline);
        if let Ok(value) = format!("Bearer {token}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Sends a request through the session that the replica at `url` holds.
    pub async fn request(
        &self,
        replica: &str,
        url: &str,
        agent_id: Id,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<SessionResponse, RequestError> {
        let unreachable = |reason: String| RequestError::HolderUnreachable {
            replica: replica.to_owned(),
            reason,
        };
        let mut client = self.client(url).map_err(unreachable)?;
        let timeout = timeout.min(MAX_TIMEOUT);
        // The holder's own wait, plus the time to reach it.
        let deadline = timeout + CONNECT_TIMEOUT;
        let request = self.signed(
            pb::SessionRequest {
                agent_id,
                method: method.to_owned(),
                payload,
                timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            },
            deadline,
        );
        let answer = tokio::time::timeout(deadline, client.request(request))
            .await
            .map_err(|_| unreachable(format!("no answer within {} s", deadline.as_secs())))?;
        match answer {
            Ok(response) => {
                let response = response.into_inner();
                Ok(SessionResponse {
                    ok: response.ok,
                    payload: response.payload,
                })
            }
            Err(status) => Err(request_error(&status, unreachable)),
        }
    }

    /// Sends an HTTP request to the agent's cluster through the session that the replica at
    /// `url` holds; the response streams back from it.
    pub async fn proxy(
        &self,
        replica: &str,
        url: &str,
        agent_id: Id,
        user: &crate::domain::ProxyUser,
        request: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, RequestError> {
        let unreachable = |reason: String| RequestError::HolderUnreachable {
            replica: replica.to_owned(),
            reason,
        };
        let channel = self.channel(url).map_err(unreachable)?;
        let grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let head = crate::dialer::tunnel::request_head(agent_id, user, &request);
        let authorization = format!("Bearer {}", self.token()).parse().ok();
        crate::dialer::tunnel::exchange(
            grpc,
            PROXY_PATH,
            authorization,
            head,
            request.into_body(),
            None,
        )
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unknown => RequestError::Tunnel(status.message().to_owned()),
            tonic::Code::ResourceExhausted => RequestError::TooManyStreams,
            _ => request_error(&status, unreachable),
        })
    }

    /// Asks the replica at `url` to dial the agent now.
    pub async fn dial_now(
        &self,
        replica: &str,
        url: &str,
        agent_id: Id,
        timeout: Duration,
    ) -> Result<(), RequestError> {
        let unreachable = |reason: String| RequestError::HolderUnreachable {
            replica: replica.to_owned(),
            reason,
        };
        let mut client = self.client(url).map_err(unreachable)?;
        let deadline = timeout.min(CONNECT_TIMEOUT * 2);
        let request = self.signed(pb::DialNowRequest { agent_id }, deadline);
        match tokio::time::timeout(deadline, client.dial_now(request)).await {
            Err(_) => Err(unreachable(format!(
                "no answer within {} s",
                deadline.as_secs()
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(request_error(&status, unreachable)),
        }
    }
}

/// What the holder's answer means to the caller.
fn request_error(status: &Status, unreachable: impl Fn(String) -> RequestError) -> RequestError {
    match status.code() {
        tonic::Code::FailedPrecondition => RequestError::NotConnected,
        tonic::Code::DeadlineExceeded => RequestError::Timeout,
        tonic::Code::Aborted => RequestError::SessionEnded,
        tonic::Code::Unauthenticated => unreachable(
            "it refused the call: do the replicas share the same private API secret?".into(),
        ),
        code => unreachable(format!("{code:?}")),
    }
}
