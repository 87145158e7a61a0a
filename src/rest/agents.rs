//! `/projects/:id/cluster_agents` and `/projects/:id/cluster_agents/:agent_id/tokens`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, Uri};

use super::App;
use super::extract::{Params, PathArgs};
use super::paginate::paged;
use super::repr::{AgentJson, AgentTokenDetailJson, AgentTokenJson, ErrorJson, NewAgentTokenJson};
use crate::domain::{Caller, Result, Timestamp};

/// Lists the agents registered for a project (Developer).
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/cluster_agents", tag = "cluster_agents",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("page" = Option<i64>, Query, description = "Page number (default 1)"),
        ("per_page" = Option<i64>, Query, description = "Items per page (default 20, max 100)"),
    ),
    responses(
        (status = 200, description = "The agents, by name", body = [AgentJson]),
        (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn list_agents(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    uri: Uri,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let page = check.page();
    check.finish()?;
    let agents = app
        .service
        .list_agents(&caller, &path.project(), page)
        .await?;
    let items: Vec<AgentJson> = agents.items.iter().map(AgentJson::from).collect();
    Ok(paged(&app.external_url, &uri, page, agents.total, items))
}

/// Gets one agent (Developer).
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}", tag = "cluster_agents",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
    ),
    responses(
        (status = 200, body = AgentJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn get_agent(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<AgentJson>> {
    let agent_id = path.id("agent_id")?;
    let agent = app
        .service
        .agent(&caller, &path.project(), agent_id)
        .await?;
    Ok(Json((&agent).into()))
}

/// Registers an agent with a project (Maintainer).
#[utoipa::path(
    post, path = "/api/v4/projects/{id}/cluster_agents", tag = "cluster_agents",
    params(("id" = String, Path, description = "ID or URL-encoded path of the project")),
    request_body(content = inline(RegisterAgentBody), description = "JSON or form-encoded"),
    responses(
        (status = 201, body = AgentJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn register_agent(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let name = check.required_string("name");
    check.finish()?;
    let agent = app
        .service
        .register_agent(&caller, &path.project(), &name)
        .await?;
    Ok((StatusCode::CREATED, Json(AgentJson::from(&agent))).into_response())
}

/// Body of a register request.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct RegisterAgentBody {
    /// Name for the agent.
    name: String,
}

/// Deletes an agent, its tokens and its URL configuration (Maintainer).
#[utoipa::path(
    delete, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}", tag = "cluster_agents",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
        ("If-Unmodified-Since" = Option<String>, Header, description = "HTTP date; 412 when the agent changed after it"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 403, body = ErrorJson),
        (status = 404, body = ErrorJson), (status = 412, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn delete_agent(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    headers: HeaderMap,
) -> Result<StatusCode> {
    let agent_id = path.id("agent_id")?;
    // As GitLab: a header that does not parse is ignored.
    let unmodified_since = headers
        .get(http::header::IF_UNMODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(Timestamp::parse_http_date);
    app.service
        .delete_agent(&caller, &path.project(), agent_id, unmodified_since)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists an agent's active tokens (Developer).
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/tokens", tag = "cluster_agent_tokens",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
        ("page" = Option<i64>, Query, description = "Page number (default 1)"),
        ("per_page" = Option<i64>, Query, description = "Items per page (default 20, max 100)"),
    ),
    responses(
        (status = 200, description = "Active tokens, most recently used first", body = [AgentTokenJson]),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn list_tokens(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    uri: Uri,
    params: Params,
) -> Result<Response> {
    let agent_id = path.id("agent_id")?;
    let mut check = params.check();
    let page = check.page();
    check.finish()?;
    let tokens = app
        .service
        .list_agent_tokens(&caller, &path.project(), agent_id, page)
        .await?;
    let items: Vec<AgentTokenJson> = tokens.items.iter().map(AgentTokenJson::from).collect();
    Ok(paged(&app.external_url, &uri, page, tokens.total, items))
}

/// Gets one active token (Developer); a revoked token is 404.
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/tokens/{token_id}", tag = "cluster_agent_tokens",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
        ("token_id" = i64, Path, description = "ID of the token"),
    ),
    responses(
        (status = 200, body = AgentTokenDetailJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn get_token(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<AgentTokenDetailJson>> {
    let agent_id = path.id("agent_id")?;
    let token_id = path.id("token_id")?;
    let token = app
        .service
        .agent_token(&caller, &path.project(), agent_id, token_id)
        .await?;
    Ok(Json((&token).into()))
}

/// Creates an agent token (Maintainer); at most two active per agent.
#[utoipa::path(
    post, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/tokens", tag = "cluster_agent_tokens",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
    ),
    request_body(content = inline(CreateTokenBody), description = "JSON or form-encoded"),
    responses(
        (status = 201, description = "The token, with its secret (shown once)", body = NewAgentTokenJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn create_token(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    params: Params,
) -> Result<Response> {
    let agent_id = path.id("agent_id")?;
    let mut check = params.check();
    let name = check.required_string("name");
    let description = check.optional_string("description");
    check.finish()?;
    let (token, secret) = app
        .service
        .create_agent_token(
            &caller,
            &path.project(),
            agent_id,
            &name,
            description.as_deref(),
        )
        .await?;
    let body = NewAgentTokenJson {
        token: (&token).into(),
        token_secret: (&secret).into(),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Body of a token create request.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct CreateTokenBody {
    /// Name for the token (at most 255 characters).
    name: String,
    /// Description (at most 1024 characters).
    description: Option<String>,
}

/// Revokes an agent token (Maintainer); revoking twice is fine.
#[utoipa::path(
    delete, path = "/api/v4/projects/{id}/cluster_agents/{agent_id}/tokens/{token_id}", tag = "cluster_agent_tokens",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("agent_id" = i64, Path, description = "ID of the agent"),
        ("token_id" = i64, Path, description = "ID of the token"),
    ),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn revoke_token(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<StatusCode> {
    let agent_id = path.id("agent_id")?;
    let token_id = path.id("token_id")?;
    app.service
        .revoke_agent_token(&caller, &path.project(), agent_id, token_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
