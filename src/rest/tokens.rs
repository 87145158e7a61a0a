//! `/personal_access_tokens`: list, show, revoke and rotate personal access tokens, the
//! caller's own (`/self`) or, for administrators, anyone's.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, Uri};

use super::App;
use super::extract::{Params, PathArgs};
use super::paginate::paged;
use super::repr::{ErrorJson, PersonalTokenJson};
use crate::crypto::Secret;
use crate::domain::{Caller, PersonalAccessToken, Result, TokenFilter};

fn render(app: &App, token: &PersonalAccessToken, secret: Option<&Secret>) -> PersonalTokenJson {
    PersonalTokenJson::new(token, app.service.now(), secret)
}

/// Personal access tokens, oldest first: the caller's own, or every user's for
/// administrators (filter with `user_id`).
#[utoipa::path(
    get, path = "/api/v4/personal_access_tokens", tag = "personal_access_tokens",
    params(
        ("user_id" = Option<i64>, Query, description = "One user's tokens (others than one's own: administrators)"),
        ("revoked" = Option<bool>, Query, description = "Only revoked, or only not revoked, tokens"),
        ("state" = Option<String>, Query, description = "`active` or `inactive`"),
        ("search" = Option<String>, Query, description = "Name holds this, ignoring case"),
        ("page" = Option<i64>, Query, description = "Page number (default 1)"),
        ("per_page" = Option<i64>, Query, description = "Items per page (default 20, max 100)"),
    ),
    responses(
        (status = 200, body = [PersonalTokenJson]),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn list(
    State(app): State<App>,
    caller: Caller,
    uri: Uri,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let page = check.page();
    let user_id = check.optional_int("user_id");
    let revoked = check.optional_bool("revoked");
    let active = match check.optional_string("state").as_deref() {
        None => None,
        Some("active") => Some(true),
        Some("inactive") => Some(false),
        Some(_) => {
            check.not_allowed("state");
            None
        }
    };
    let search = check.optional_string("search").filter(|s| !s.is_empty());
    check.finish()?;
    let filter = TokenFilter {
        user_id,
        revoked,
        active,
        search,
    };
    let tokens = app
        .service
        .list_personal_tokens(&caller, filter, page)
        .await?;
    let items: Vec<PersonalTokenJson> =
        tokens.items.iter().map(|t| render(&app, t, None)).collect();
    Ok(paged(&app.external_url, &uri, page, tokens.total, items))
}

/// One personal access token: one's own, or anyone's for administrators.
#[utoipa::path(
    get, path = "/api/v4/personal_access_tokens/{id}", tag = "personal_access_tokens",
    params(("id" = i64, Path, description = "ID of the token")),
    responses(
        (status = 200, body = PersonalTokenJson),
        (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn get(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<PersonalTokenJson>> {
    let id = path.id("id")?;
    let token = app.service.personal_token(&caller, id).await?;
    Ok(Json(render(&app, &token, None)))
}

/// Revokes a personal access token: one's own, or anyone's for administrators.
#[utoipa::path(
    delete, path = "/api/v4/personal_access_tokens/{id}", tag = "personal_access_tokens",
    params(("id" = i64, Path, description = "ID of the token")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn revoke(State(app): State<App>, caller: Caller, path: PathArgs) -> Result<StatusCode> {
    let id = path.id("id")?;
    app.service.revoke_personal_token(&caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes a personal access token and returns its successor (same name and scopes, a new
/// secret, shown once); `expires_at` defaults to a week from today.
#[utoipa::path(
    post, path = "/api/v4/personal_access_tokens/{id}/rotate", tag = "personal_access_tokens",
    params(("id" = i64, Path, description = "ID of the token")),
    request_body(content = inline(RotateBody), description = "JSON or form-encoded"),
    responses(
        (status = 200, description = "The new token, with its secret", body = PersonalTokenJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn rotate(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    params: Params,
) -> Result<Response> {
    let id = path.id("id")?;
    let mut check = params.check();
    let expires_at = check.optional_date("expires_at");
    check.finish()?;
    let (token, secret) = app
        .service
        .rotate_personal_token(&caller, id, expires_at)
        .await?;
    Ok(Json(render(&app, &token, Some(&secret))).into_response())
}

/// Body of a rotation.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct RotateBody {
    /// `YYYY-MM-DD`; default: a week from today.
    expires_at: Option<String>,
}

/// The token this request came with.
#[utoipa::path(
    get, path = "/api/v4/personal_access_tokens/self", tag = "personal_access_tokens",
    responses((status = 200, body = PersonalTokenJson), (status = 401, body = ErrorJson)),
    security(("private_token" = []))
)]
pub async fn get_self(State(app): State<App>, caller: Caller) -> Result<Json<PersonalTokenJson>> {
    let token = app.service.own_personal_token(&caller).await?;
    Ok(Json(render(&app, &token, None)))
}

/// Revokes the token this request came with.
#[utoipa::path(
    delete, path = "/api/v4/personal_access_tokens/self", tag = "personal_access_tokens",
    responses((status = 204, description = "Revoked"), (status = 401, body = ErrorJson)),
    security(("private_token" = []))
)]
pub async fn revoke_self(State(app): State<App>, caller: Caller) -> Result<StatusCode> {
    app.service.revoke_own_personal_token(&caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rotates the token this request came with.
#[utoipa::path(
    post, path = "/api/v4/personal_access_tokens/self/rotate", tag = "personal_access_tokens",
    request_body(content = inline(RotateBody), description = "JSON or form-encoded"),
    responses(
        (status = 200, description = "The new token, with its secret", body = PersonalTokenJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn rotate_self(
    State(app): State<App>,
    caller: Caller,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let expires_at = check.optional_date("expires_at");
    check.finish()?;
    let (token, secret) = app
        .service
        .rotate_own_personal_token(&caller, expires_at)
        .await?;
    Ok(Json(render(&app, &token, Some(&secret))).into_response())
}
