//! The REST transport: GitLab's `/api/v4` endpoints over axum. Handlers parse, call the
//! domain service and render; they hold no SQL, crypto or policy.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::{Error, Service};
use crate::respond::Respond;

pub mod agents;
pub mod extract;
pub mod health;
pub mod k8s_proxy;
pub mod metadata;
pub mod paginate;
pub mod projects;
pub mod repr;
pub mod tokens;
pub mod url_configurations;
pub mod users;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct App {
    /// The domain service.
    pub service: Service,
    /// Base URL for `Link` headers and `web_url`s, without a trailing slash.
    pub external_url: Arc<str>,
    /// Cancelled when the gateway starts shutting down (readiness then answers 503).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The Kubernetes API proxy's limits and open requests.
    pub k8s_proxy: Arc<k8s_proxy::Proxy>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match &self {
            Error::Internal(cause) => tracing::error!(%cause, "request failed"),
            Error::Unavailable(cause) => tracing::warn!(%cause, "store unavailable"),
            _ => {}
        }
        let reply = self.reply();
        if reply.plain_text {
            let text = reply.body.as_str().unwrap_or_default().to_owned();
            return (
                reply.status,
                [(http::header::CONTENT_TYPE, "text/plain")],
                text,
            )
                .into_response();
        }
        (reply.status, Json(reply.body)).into_response()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kas-gateway",
        description = "GitLab's Kubernetes agent API (agents, agent tokens, URL configurations) and the user, project and member endpoints that set a gateway up."
    ),
    modifiers(&PrivateToken),
    tags(
        (name = "cluster_agents", description = "Kubernetes agents"),
        (name = "cluster_agent_tokens", description = "Agent tokens"),
        (name = "url_configurations", description = "Receptive agents: how the gateway dials them"),
        (name = "users", description = "Users and personal access tokens"),
        (name = "personal_access_tokens", description = "Personal access tokens: list, revoke, rotate"),
        (name = "projects", description = "Projects"),
        (name = "members", description = "Project members"),
        (name = "metadata", description = "The instance: version and agent server"),
        (name = "health", description = "Probes"),
    )
)]
struct ApiDoc;

struct PrivateToken;

impl utoipa::Modify for PrivateToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "private_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("Private-Token"))),
        );
    }
}

/// Every REST route with its OpenAPI document.
fn api() -> (Router<App>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(agents::list_agents, agents::register_agent))
        .routes(routes!(agents::get_agent, agents::delete_agent))
        .routes(routes!(agents::list_tokens, agents::create_token))
        .routes(routes!(agents::get_token, agents::revoke_token))
        .routes(routes!(
            url_configurations::list,
            url_configurations::create
        ))
        .routes(routes!(url_configurations::get, url_configurations::delete))
        .routes(routes!(url_configurations::connection))
        .routes(routes!(users::current_user))
        .routes(routes!(users::create_user, users::list_users))
        .routes(routes!(users::get_user))
        .routes(routes!(users::create_personal_token))
        .routes(routes!(tokens::list))
        .routes(routes!(tokens::get_self, tokens::revoke_self))
        .routes(routes!(tokens::rotate_self))
        .routes(routes!(tokens::get, tokens::revoke))
        .routes(routes!(tokens::rotate))
        .routes(routes!(projects::create_project, projects::list_projects))
        .routes(routes!(projects::get_project))
        .routes(routes!(projects::add_member, projects::list_members))
        .routes(routes!(projects::get_member, projects::remove_member))
        .routes(routes!(metadata::get_metadata))
        .routes(routes!(metadata::get_version))
        .routes(routes!(health::liveness))
        .routes(routes!(health::readiness))
        .routes(routes!(health::health))
        .split_for_parts()
}

/// The OpenAPI document of every REST endpoint.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().1
}

/// The REST routes and the OpenAPI document, without fallbacks or layers (see [`finish`]).
pub fn routes(app: App) -> Router {
    let (routes, document) = api();
    let document = Arc::new(document);
    let routes = k8s_proxy::PREFIXES.iter().fold(routes, |routes, prefix| {
        routes
            .route(prefix, axum::routing::any(k8s_proxy::proxy))
            .route(
                &format!("{prefix}/{{*path}}"),
                axum::routing::any(k8s_proxy::proxy),
            )
    });
    routes
        .route(
            "/api/v4/openapi.json",
            get(move || {
                let document = Arc::clone(&document);
                async move { Json(document.as_ref().clone()) }
            }),
        )
        .with_state(app)
}

/// Adds what every listener's router needs once its routes are merged: GitLab's 404 and 405
/// bodies, the refusal of malformed strings and of oversized bodies before anything else
/// runs, the body limit, the request id, log line and metrics (`observe`), and a 500 instead
/// of a dropped connection.
pub fn finish(router: Router) -> Router {
    router
        .fallback(|| async {
            (
                http::StatusCode::NOT_FOUND,
                Json(json!({"error": "404 Not Found"})),
            )
        })
        .method_not_allowed_fallback(|| async {
            (
                http::StatusCode::METHOD_NOT_ALLOWED,
                Json(json!({"error": "405 Not Allowed"})),
            )
        })
        .layer(axum::middleware::from_fn(refuse_malformed_strings))
        .layer(axum::middleware::from_fn(refuse_announced_oversize))
        .layer(axum::middleware::from_fn(crate::observe::observe))
        // Still needed: a chunked body announces no length and is cut off as it streams.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("a request handler panicked");
                Error::Internal("panic".into()).into_response()
            },
        ))
}

/// GitLab's `HandleMalformedStrings`: a path or query holding a NUL byte or invalid UTF-8
/// (once percent-decoded) gets `400 Bad Request` in plain text, whatever the route, before
/// authentication. Bodies are checked where they are parsed ([`extract::Params`]).
async fn refuse_malformed_strings(request: Request, next: Next) -> Response {
    let uri = request.uri();
    let malformed = extract::malformed_path(uri.path())
        || uri
            .query()
            .is_some_and(|query| extract::form_pairs(query.as_bytes()).is_err());
    if malformed && !crate::observe::is_grpc(request.headers()) {
        return Error::MalformedString.into_response();
    }
    next.run(request).await
}

/// A body announced larger than [`MAX_BODY_BYTES`] gets 413 at once, before authentication,
/// without reading or waiting for a byte of it.
async fn refuse_announced_oversize(request: Request, next: Next) -> Response {
    let announced = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let limit = u64::try_from(MAX_BODY_BYTES).unwrap_or(u64::MAX);
    if announced.is_some_and(|length| length > limit)
        && !crate::observe::is_grpc(request.headers())
        && !k8s_proxy::is_proxy_path(request.uri().path())
    {
        let mut response = Error::PayloadTooLarge.into_response();
        // The unread body leaves the connection unusable; say so rather than let an
        // HTTP/1.1 client send its next request into it. (HTTP/2 forbids the header.)
        if request.version() <= http::Version::HTTP_11 {
            response.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        return response;
    }
    next.run(request).await
}
