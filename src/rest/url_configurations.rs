//! `/projects/:id/cluster_agents/:agent_id/url_configurations` (receptive agents).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use super::App;
use super::extract::{Params, PathArgs};
use super::repr::{ConnectionJson, ErrorJson, UrlConfigurationJson};
use crate::domain::{Caller, Result, UrlConfigurationInput};

/// Lists an agent's URL configurations (Developer); not paginated.
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/url_configurations", tag = "url_configurations",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
    ),
    responses(
        (status = 200, body = [UrlConfigurationJson]),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn list(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<Vec<UrlConfigurationJson>>> {
    let agent_id = path.id("agent_id")?;
    let configs = app
        .service
        .list_url_configurations(&caller, &path.project(), agent_id)
        .await?;
    Ok(Json(
        configs.iter().map(UrlConfigurationJson::from).collect(),
    ))
}

/// Gets one URL configuration (Developer).
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/url_configurations/{url_configuration_id}",
    tag = "url_configurations",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
        ("url_configuration_id" = i64, Path, description = "ID of the URL configuration"),
    ),
    responses(
        (status = 200, body = UrlConfigurationJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn get(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<UrlConfigurationJson>> {
    let agent_id = path.id("agent_id")?;
    let id = path.id("url_configuration_id")?;
    let config = app
        .service
        .url_configuration(&caller, &path.project(), agent_id, id)
        .await?;
    Ok(Json((&config).into()))
}

/// Creates the agent's URL configuration (Maintainer): mTLS with `client_cert` and
/// `client_key`, else JWT with a generated Ed25519 key pair whose public key is returned.
#[utoipa::path(
    post, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/url_configurations", tag = "url_configurations",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
    ),
    request_body(content = inline(CreateUrlConfigurationBody), description = "JSON or form-encoded"),
    responses(
        (status = 201, body = UrlConfigurationJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn create(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    params: Params,
) -> Result<Response> {
    let agent_id = path.id("agent_id")?;
    let mut check = params.check();
    let input = UrlConfigurationInput {
        url: check.required_string("url"),
        client_cert: check.optional_string("client_cert"),
        client_key: check.optional_string("client_key"),
        ca_cert: check.optional_string("ca_cert"),
        tls_host: check.optional_string("tls_host"),
    };
    check.finish()?;
    let config = app
        .service
        .create_url_configuration(&caller, &path.project(), agent_id, input)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(UrlConfigurationJson::from(&config)),
    )
        .into_response())
}

/// Body of a URL configuration create request.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct CreateUrlConfigurationBody {
    /// `grpcs://host:port` (or `grpc://` without a client certificate).
    url: String,
    /// Client certificate, PEM or base64 of PEM; with `client_key`.
    client_cert: Option<String>,
    /// Client key, PEM or base64 of PEM; with `client_cert`. Encrypted at rest, never returned.
    client_key: Option<String>,
    /// CA certificate that verifies the agent's server, PEM or base64 of PEM.
    ca_cert: Option<String>,
    /// Server name to verify instead of the URL's host.
    tls_host: Option<String>,
}

/// Deletes a URL configuration (Maintainer).
#[utoipa::path(
    delete, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/url_configurations/{url_configuration_id}",
    tag = "url_configurations",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
        ("url_configuration_id" = i64, Path, description = "ID of the URL configuration"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn delete(State(app): State<App>, caller: Caller, path: PathArgs) -> Result<StatusCode> {
    let agent_id = path.id("agent_id")?;
    let id = path.id("url_configuration_id")?;
    app.service
        .delete_url_configuration(&caller, &path.project(), agent_id, id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The state of the gateway's session with the agent (Developer); 404 when the agent has no
/// URL configuration.
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/connection", tag = "url_configurations",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
    ),
    responses(
        (status = 200, body = ConnectionJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn connection(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<ConnectionJson>> {
    let agent_id = path.id("agent_id")?;
    let (config, connection) = app
        .service
        .connection(&caller, &path.project(), agent_id)
        .await?;
    Ok(Json(ConnectionJson::new(&config, connection.as_ref())))
}
