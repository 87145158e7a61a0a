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
use crate::dialer::state::{Connection, Phase, RequestError};
use crate::domain::{
    Caller, Error, PageRequest, ProjectRef, Service, Timestamp, UrlConfiguration,
    UrlConfigurationInput,
};
use crate::proto::v1 as pb;
use crate::proto::v1::agents_server::{Agents, AgentsServer};
use crate::proto::v1::sessions_server::{Sessions, SessionsServer};
use crate::proto::v1::url_configurations_server::{UrlConfigurations, UrlConfigurationsServer};

/// `iss` of a GitLab instance's JWTs.
pub const GITLAB_ISSUER: &str = "gitlab";
/// `aud` of a GitLab instance's JWTs.
pub const GITLAB_AUDIENCE: &str = "gitlab-kas";
/// A GitLab JWT may not live longer than this.
pub const MAX_JWT_LIFETIME_SECS: i64 = 300;

/// What every gRPC service shares.
#[derive(Clone)]
pub struct Api {
    service: Service,
    gitlab_secret: Option<Arc<Zeroizing<Vec<u8>>>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field(
                "gitlab_secret",
                &self.gitlab_secret.as_ref().map(|_| "[REDACTED]"),
            )
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
    /// The API over `service`; GitLab's JWTs verify with `gitlab_secret` when given.
    pub fn new(service: Service, gitlab_secret: Option<Zeroizing<Vec<u8>>>) -> Self {
        Self {
            service,
            gitlab_secret: gitlab_secret.map(Arc::new),
        }
    }

    /// A GitLab instance (HS256 JWT) or an administrator's personal access token.
    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let unauthenticated = || Status::unauthenticated("unauthenticated");
        if let Some(value) = metadata.get("authorization") {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(unauthenticated)?;
            let secret = self.gitlab_secret.as_ref().ok_or_else(unauthenticated)?;
            return match jwt::verify_hs256(
                token,
                secret,
                GITLAB_ISSUER,
                GITLAB_AUDIENCE,
                self.service.now(),
                MAX_JWT_LIFETIME_SECS,
            ) {
                Ok(()) => Ok(Caller::gitlab()),
                Err(error) => {
                    tracing::info!(%error, "refused a GitLab JWT");
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
        let caller = self.caller(request.metadata()).await?;
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
        let caller = self.caller(request.metadata()).await?;
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
        let caller = self.caller(request.metadata()).await?;
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
        let next_page = if page.page * page.per_page < paged.total {
            page.page + 1
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
        let caller = self.caller(request.metadata()).await?;
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
        let caller = self.caller(request.metadata()).await?;
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
        let caller = self.caller(request.metadata()).await?;
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
        let caller = self.caller(request.metadata()).await?;
        if !caller.is_admin() {
            return Err(Status::permission_denied("permission denied"));
        }
        let wanted = request.get_ref().state();
        let sessions = self
            .service
            .connections()
            .all()
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
        let caller = self.caller(request.metadata()).await?;
        if !caller.is_admin() {
            return Err(Status::permission_denied("permission denied"));
        }
        let registry = Arc::clone(self.service.connections());
        let mut changes = registry.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            for connection in registry.all() {
                if tx.send(Ok(session(&connection))).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    () = tx.closed() => return,
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
                        for connection in registry.all() {
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
        let caller = self.caller(request.metadata()).await?;
        let r = request.into_inner();
        let (config, current) = self
            .service
            .connection_by_agent(&caller, r.agent_id)
            .await
            .map_err(status)?;
        let registry = Arc::clone(self.service.connections());
        let deadline = Duration::from_millis(match r.deadline_ms {
            0 => 10_000,
            ms => u64::from(ms).min(60_000),
        });
        if current.as_ref().map(|c| c.phase) == Some(Phase::Connected) {
            return Ok(Response::new(session_or_pending(&config, current.as_ref())));
        }
        let mut changes = registry.subscribe();
        if !registry.dial_now(r.agent_id) {
            return Err(Status::failed_precondition(
                "this replica does not dial the agent",
            ));
        }
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
        let latest = registry.get(r.agent_id);
        Ok(Response::new(session_or_pending(&config, latest.as_ref())))
    }

    async fn ping_agent(
        &self,
        request: Request<pb::PingAgentRequest>,
    ) -> Result<Response<pb::PingAgentResponse>, Status> {
        let caller = self.caller(request.metadata()).await?;
        let r = request.into_inner();
        self.service
            .connection_by_agent(&caller, r.agent_id)
            .await
            .map_err(status)?;
        let started = Instant::now();
        let response = self
            .service
            .connections()
            .request(r.agent_id, "ping", r.payload, Duration::from_secs(10))
            .await
            .map_err(|e| match e {
                RequestError::NotConnected => Status::failed_precondition(e.to_string()),
                RequestError::Timeout => Status::deadline_exceeded(e.to_string()),
                RequestError::SessionEnded => Status::unavailable(e.to_string()),
            })?;
        let round_trip_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(Response::new(pb::PingAgentResponse {
            round_trip_us,
            payload: response.payload,
        }))
    }
}

/// The gRPC services as an axum router: the API, health (serving while the database
/// answers) and reflection.
pub fn router(api: Api, shutdown: tokio_util::sync::CancellationToken) -> axum::Router {
    let (reporter, health) = tonic_health::server::health_reporter();
    let store = Arc::clone(api.service.store());
    tokio::spawn(async move {
        loop {
            let serving = store.ping().await.is_ok();
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
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let mut routes = tonic::service::Routes::new(health)
        .add_service(UrlConfigurationsServer::new(api.clone()))
        .add_service(AgentsServer::new(api.clone()))
        .add_service(SessionsServer::new(api));
    if let Ok(reflection) = reflection {
        routes = routes.add_service(reflection);
    }
    routes.prepare().into_axum_router()
}
