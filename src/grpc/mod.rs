//! The gRPC transport: URL configurations, agents and sessions for a GitLab instance and for
//! operators, with health and reflection. Thin: authenticate, call the domain, render.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::crypto::jwt;
use crate::domain::{
    Caller, Connection, Error, PageRequest, Phase, ProjectRef, RequestError, Service, Timestamp,
    UrlConfiguration, UrlConfigurationInput,
};
use crate::proto::v1 as pb;
use crate::proto::v1::agents_server::{Agents, AgentsServer};
use crate::proto::v1::sessions_server::{Sessions, SessionsServer};
use crate::proto::v1::url_configurations_server::{UrlConfigurations, UrlConfigurationsServer};
use crate::respond::Respond;

/// `aud` of a GitLab instance's JWTs.
pub const GITLAB_AUDIENCE: &str = "gitlab-kas";
/// A GitLab JWT may not live longer than this.
pub const MAX_JWT_LIFETIME_SECS: i64 = 300;

/// Largest request message of the API: a URL configuration with three PEM fields of at most
/// 64 KiB each, with room for the rest. Anything larger is refused before it is buffered.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Largest request message of health checks and reflection, which need no credentials.
pub const MAX_PUBLIC_REQUEST_BYTES: usize = 4 * 1024;

/// What every gRPC service shares.
#[derive(Clone)]
pub struct Api {
    service: Service,
    gitlab_secret: Option<Arc<Zeroizing<Vec<u8>>>>,
    gitlab_issuer: Option<Arc<str>>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field(
                "gitlab_secret",
                &self.gitlab_secret.as_ref().map(|_| "[REDACTED]"),
            )
            .field("gitlab_issuer", &self.gitlab_issuer)
            .finish_non_exhaustive()
    }
}

fn status(error: Error) -> Status {
    match &error {
        Error::Internal(cause) => tracing::error!(%cause, "gRPC call failed"),
        Error::Unavailable(cause) => tracing::warn!(%cause, "store unavailable"),
        _ => {}
    }
    let (code, message) = error.grpc();
    Status::new(code, message)
}

impl Api {
    /// The API over `service`; GitLab's JWTs verify with `gitlab_secret` when given, with
    /// `iss` exactly `gitlab_issuer` when given (otherwise any, as GitLab puts its host name
    /// there). Streams end with `UNAVAILABLE` once `shutdown` is cancelled.
    pub fn new(
        service: Service,
        gitlab_secret: Option<Zeroizing<Vec<u8>>>,
        gitlab_issuer: Option<String>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            service,
            gitlab_secret: gitlab_secret.map(Arc::new),
            gitlab_issuer: gitlab_issuer.map(Arc::from),
            shutdown,
        }
    }

    /// A GitLab instance (HS256 JWT) or an administrator's personal access token.
    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let unauthenticated = || Status::unauthenticated("unauthenticated");
        if let Some(value) = metadata.get("authorization") {
            let token = value
                .to_str()
                .ok()
                .and_then(jwt::bearer)
                .ok_or_else(unauthenticated)?;
            let secret = self.gitlab_secret.as_ref().ok_or_else(unauthenticated)?;
            return match jwt::verify_hs256(
                token,
                secret,
                self.gitlab_issuer.as_deref(),
                GITLAB_AUDIENCE,
                self.service.now(),
                MAX_JWT_LIFETIME_SECS,
            ) {
                Ok(()) => Ok(Caller::gitlab()),
                Err(error) => {
                    // Anyone can send a bad token as often as they like: one line per 10 s.
                    static REFUSED: crate::telemetry::Throttle =
                        crate::telemetry::Throttle::new(Duration::from_secs(10));
                    if let Some(suppressed) = REFUSED.allow() {
                        tracing::info!(%error, suppressed, "refused a GitLab JWT");
                    }
                    Err(unauthenticated())
                }
            };
        }
        if let Some(value) = metadata.get("private-token") {
            let token = value.to_str().map_err(|_| unauthenticated())?;
            return self
                .service
                .authenticate_admin(token)
                .await
                .map_err(|e| match e {
                    Error::Unavailable(_) | Error::Internal(_) => status(e),
                    _ => unauthenticated(),
                });
        }
        Err(unauthenticated())
    }
}

/// The caller that [`Authenticated`] found for this call.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("unauthenticated"))
}

/// Authenticates every call from its headers before the service reads the request body, so
/// an unauthenticated client never makes the gateway buffer or decode a message.
#[derive(Clone, Debug)]
struct Authenticated<S> {
    inner: S,
    api: Api,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Authenticated<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // The ready service answers this call; a fresh clone waits for the next one.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let api = self.api.clone();
        Box::pin(async move {
            let metadata = MetadataMap::from_headers(request.headers().clone());
            match api.caller(&metadata).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let millis = t.as_millis();
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn url_configuration(config: &UrlConfiguration) -> pb::UrlConfiguration {
    pb::UrlConfiguration {
        id: config.id,
        agent_id: config.agent_id,
        url: config.url.clone(),
        public_key: config.public_key.clone(),
        client_cert: config.client_cert.clone(),
        ca_cert: config.ca_cert.clone(),
        tls_host: config.tls_host.clone(),
        project_id: config.project_id,
    }
}

fn session_state(phase: Phase) -> pb::SessionState {
    match phase {
        Phase::Connecting => pb::SessionState::Connecting,
        Phase::Connected => pb::SessionState::Connected,
        Phase::BackingOff => pb::SessionState::BackingOff,
        Phase::Failed => pb::SessionState::Failed,
    }
}

fn session(c: &Connection) -> pb::Session {
    pb::Session {
        agent_id: c.agent_id,
        url_configuration_id: c.url_configuration_id,
        url: c.url.clone(),
        state: session_state(c.phase).into(),
        last_error: c.last_error.clone(),
        last_attempt_at: c.last_attempt_at.map(timestamp),
        connected_since: c.connected_since.map(timestamp),
        last_error_at: c.last_error_at.map(timestamp),
        agent: c.metadata.as_ref().map(|m| pb::AgentInfo {
            version: m.version.clone(),
            commit: m.commit.clone(),
            pod_namespace: m.pod_namespace.clone(),
            pod_name: m.pod_name.clone(),
            kubernetes_version: m.kubernetes_version.clone(),
        }),
        replica: c.replica.clone(),
        epoch: c.epoch,
    }
}

/// A configuration no replica holds yet is `connecting`.
fn session_or_pending(config: &UrlConfiguration, connection: Option<&Connection>) -> pb::Session {
    connection.map(session).unwrap_or_else(|| pb::Session {
        agent_id: config.agent_id,
        url_configuration_id: config.id,
        url: config.url.clone(),
        state: pb::SessionState::Connecting.into(),
        ..Default::default()
    })
}

#[tonic::async_trait]
impl UrlConfigurations for Api {
    async fn create_url_configuration(
        &self,
        request: Request<pb::CreateUrlConfigurationRequest>,
    ) -> Result<Response<pb::UrlConfiguration>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let agent = self
            .service
            .agent_by_id(&caller, r.agent_id)
            .await
            .map_err(status)?;
        let input = UrlConfigurationInput {
            url: r.url,
            client_cert: r.client_cert,
            client_key: r.client_key,
            ca_cert: r.ca_cert,
            tls_host: r.tls_host,
        };
        let config = self
            .service
            .create_url_configuration(&caller, &ProjectRef::Id(agent.project.id), agent.id, input)
            .await
            .map_err(status)?;
        Ok(Response::new(url_configuration(&config)))
    }

    async fn get_url_configuration(
        &self,
        request: Request<pb::GetUrlConfigurationRequest>,
    ) -> Result<Response<pb::UrlConfiguration>, Status> {
        let caller = caller(&request)?;
        let config = self
            .service
            .url_configuration_by_id(&caller, request.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(url_configuration(&config)))
    }

    async fn list_url_configurations(
        &self,
        request: Request<pb::ListUrlConfigurationsRequest>,
    ) -> Result<Response<pb::ListUrlConfigurationsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        if r.page < 0 || r.per_page < 0 {
            return Err(Status::invalid_argument(
                "page and per_page must not be negative",
            ));
        }
        let page = PageRequest {
            page: r.page.max(1),
            per_page: if r.per_page == 0 {
                PageRequest::DEFAULT_PER_PAGE
            } else {
                r.per_page.min(PageRequest::MAX_PER_PAGE)
            },
        };
        let paged = self
            .service
            .list_all_url_configurations(&caller, r.project_id, r.agent_id, page)
            .await
            .map_err(status)?;
        // Saturating: a huge `page` is past the end, not a negative next page.
        let next_page = if page.page.saturating_mul(page.per_page) < paged.total {
            page.page.saturating_add(1)
        } else {
            0
        };
        Ok(Response::new(pb::ListUrlConfigurationsResponse {
            url_configurations: paged.items.iter().map(url_configuration).collect(),
            total: paged.total,
            next_page,
        }))
    }

    async fn delete_url_configuration(
        &self,
        request: Request<pb::DeleteUrlConfigurationRequest>,
    ) -> Result<Response<pb::DeleteUrlConfigurationResponse>, Status> {
        let caller = caller(&request)?;
        let config = self
            .service
            .url_configuration_by_id(&caller, request.get_ref().id)
            .await
            .map_err(status)?;
        self.service
            .delete_url_configuration(
                &caller,
                &ProjectRef::Id(config.project_id),
                config.agent_id,
                config.id,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteUrlConfigurationResponse {}))
    }
}

#[tonic::async_trait]
impl Agents for Api {
    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let caller = caller(&request)?;
        let agent = self
            .service
            .agent_by_id(&caller, request.get_ref().agent_id)
            .await
            .map_err(status)?;
        let project = ProjectRef::Id(agent.project.id);
        let tokens = self
            .service
            .list_agent_tokens(
                &caller,
                &project,
                agent.id,
                PageRequest {
                    page: 1,
                    per_page: PageRequest::MAX_PER_PAGE,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetAgentResponse {
            agent: Some(pb::Agent {
                id: agent.id,
                name: agent.name.clone(),
                project_id: agent.project.id,
                project_path_with_namespace: agent.project.path_with_namespace(),
                created_at: Some(timestamp(agent.created_at)),
                created_by_user_id: agent.created_by_user_id,
                is_receptive: agent.is_receptive,
            }),
            tokens: tokens
                .items
                .iter()
                .map(|t| pb::AgentToken {
                    id: t.id,
                    name: t.name.clone(),
                    description: t.description.clone(),
                    status: t.status.as_str().to_owned(),
                    created_at: Some(timestamp(t.created_at)),
                    created_by_user_id: t.created_by_user_id,
                    last_used_at: t.last_used_at.map(timestamp),
                })
                .collect(),
        }))
    }
}

type SessionStream = ReceiverStream<Result<pb::Session, Status>>;

#[tonic::async_trait]
impl Sessions for Api {
    type WatchSessionsStream = SessionStream;

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = caller(&request)?;
        let (config, connection) = self
            .service
            .connection_by_agent(&caller, request.get_ref().agent_id)
            .await
            .map_err(status)?;
        Ok(Response::new(session_or_pending(
            &config,
            connection.as_ref(),
        )))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = caller(&request)?;
        if !caller.is_admin() {
            return Err(Status::permission_denied("permission denied"));
        }
        let wanted = request.get_ref().state();
        let sessions = self
            .service
            .sessions()
            .all()
            .await
            .map_err(status)?
            .iter()
            .map(session)
            .filter(|s| wanted == pb::SessionState::Unspecified || s.state() == wanted)
            .collect();
        Ok(Response::new(pb::ListSessionsResponse { sessions }))
    }

    async fn watch_sessions(
        &self,
        request: Request<pb::WatchSessionsRequest>,
    ) -> Result<Response<Self::WatchSessionsStream>, Status> {
        let caller = caller(&request)?;
        if !caller.is_admin() {
            return Err(Status::permission_denied("permission denied"));
        }
        let registry = Arc::clone(self.service.sessions());
        // Subscribed before the first read: nothing between the two is missed.
        let mut changes = registry.subscribe();
        let current = registry.all().await.map_err(status)?;
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            for connection in current {
                if tx.send(Ok(session(&connection))).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    () = tx.closed() => return,
                    // A clean end the client can act on: watch again, through another replica.
                    () = shutdown.cancelled() => {
                        let _ = tx
                            .send(Err(Status::unavailable("the gateway is shutting down")))
                            .await;
                        return;
                    }
                    next = changes.recv() => next,
                };
                match next {
                    Ok(connection) => {
                        if tx.send(Ok(session(&connection))).await.is_err() {
                            return;
                        }
                    }
                    // Too slow a reader: start again from the current state.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let current = match registry.all().await {
                            Ok(current) => current,
                            Err(error) => {
                                let _ = tx.send(Err(status(error))).await;
                                return;
                            }
                        };
                        for connection in current {
                            if tx.send(Ok(session(&connection))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn dial_now(
        &self,
        request: Request<pb::DialNowRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let (config, current) = self
            .service
            .connection_by_agent(&caller, r.agent_id)
            .await
            .map_err(status)?;
        let registry = Arc::clone(self.service.sessions());
        let deadline = Duration::from_millis(match r.deadline_ms {
            0 => 10_000,
            ms => u64::from(ms).min(60_000),
        });
        if current.as_ref().map(|c| c.phase) == Some(Phase::Connected) {
            return Ok(Response::new(session_or_pending(&config, current.as_ref())));
        }
        let mut changes = registry.subscribe();
        registry
            .dial_now(r.agent_id, deadline)
            .await
            .map_err(|e| match e {
                RequestError::NotConnected => {
                    Status::failed_precondition("no gateway replica dials the agent yet")
                }
                e => request_status(&e),
            })?;
        let outcome = tokio::time::timeout(deadline, async {
            loop {
                match changes.recv().await {
                    Ok(c) if c.agent_id == r.agent_id && c.phase != Phase::Connecting => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => {}
                }
            }
        })
        .await;
        let _ = outcome;
        let latest = registry
            .get(r.agent_id)
            .await
            .map_err(status)?
            .filter(|c| c.url_configuration_id == config.id);
        Ok(Response::new(session_or_pending(&config, latest.as_ref())))
    }

    async fn ping_agent(
        &self,
        request: Request<pb::PingAgentRequest>,
    ) -> Result<Response<pb::PingAgentResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        self.service
            .connection_by_agent(&caller, r.agent_id)
            .await
            .map_err(status)?;
        let started = Instant::now();
        let response = self
            .service
            .sessions()
            .request(r.agent_id, "ping", r.payload, Duration::from_secs(10))
            .await
            .map_err(|e| request_status(&e))?;
        let round_trip_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(Response::new(pb::PingAgentResponse {
            round_trip_us,
            payload: response.payload,
        }))
    }
}

/// A failed request through a session, as a gRPC status.
fn request_status(error: &RequestError) -> Status {
    match error {
        RequestError::NotConnected => Status::failed_precondition(error.to_string()),
        RequestError::Timeout => Status::deadline_exceeded(error.to_string()),
        RequestError::TooManyStreams => Status::resource_exhausted(error.to_string()),
        RequestError::SessionEnded
        | RequestError::NoHolder
        | RequestError::HolderUnreachable { .. }
        | RequestError::Tunnel(_)
        | RequestError::Store(_) => Status::unavailable(error.to_string()),
    }
}

/// The gRPC services as an axum router: the API, health (serving while the database
/// answers) and reflection.
pub fn router(api: Api, shutdown: tokio_util::sync::CancellationToken) -> axum::Router {
    let (reporter, health) = tonic_health::server::health_reporter();
    let store = Arc::clone(api.service.store());
    tokio::spawn(async move {
        loop {
            let serving = !shutdown.is_cancelled()
                && matches!(
                    tokio::time::timeout(crate::store::PING_TIMEOUT, store.ping()).await,
                    Ok(Ok(()))
                );
            for name in [
                "",
                "kas_gateway.v1.UrlConfigurations",
                "kas_gateway.v1.Agents",
                "kas_gateway.v1.Sessions",
            ] {
                let status = if serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(name, status).await;
            }
            if shutdown.is_cancelled() {
                return;
            }
            tokio::select! {
                // Once more, to say NOT_SERVING while the listeners drain.
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
    // Both versions, each listing both: older grpcurl and grpcui and Python's reflection
    // client ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let mut routes =
        tonic::service::Routes::new(health.max_decoding_message_size(MAX_PUBLIC_REQUEST_BYTES))
            .add_service(Authenticated {
                inner: UrlConfigurationsServer::new(api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
                api: api.clone(),
            })
            .add_service(Authenticated {
                inner: AgentsServer::new(api.clone())
                    .max_decoding_message_size(MAX_PUBLIC_REQUEST_BYTES),
                api: api.clone(),
            })
            .add_service(Authenticated {
                inner: SessionsServer::new(api.clone())
                    .max_decoding_message_size(MAX_PUBLIC_REQUEST_BYTES),
                api: api.clone(),
            });
    match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => {
            routes = routes
                .add_service(v1.max_decoding_message_size(MAX_PUBLIC_REQUEST_BYTES))
                .add_service(v1alpha.max_decoding_message_size(MAX_PUBLIC_REQUEST_BYTES));
        }
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "gRPC reflection is not served");
        }
    }
    routes.prepare().into_axum_router()
}
