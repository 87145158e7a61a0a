//! `/user`, `/users`, `/users/:id/personal_access_tokens`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use super::App;
use super::extract::{Params, PathArgs};
use super::repr::{ErrorJson, PersonalTokenJson, UserJson, UserPublicJson, UserReplyJson};
use crate::domain::{Caller, NewTokenInput, NewUserInput, Result, Scope};

/// The authenticated user.
#[utoipa::path(
    get, path = "/api/v4/user", tag = "users",
    responses((status = 200, body = UserJson), (status = 401, body = ErrorJson)),
    security(("private_token" = []))
)]
pub async fn current_user(State(app): State<App>, caller: Caller) -> Json<UserJson> {
    Json(UserJson::new(&caller.user, &app.external_url))
}

/// Creates a user (administrators). No password is kept: users authenticate with tokens.
#[utoipa::path(
    post, path = "/api/v4/users", tag = "users",
    request_body(content = inline(CreateUserBody), description = "JSON or form-encoded"),
    responses(
        (status = 201, body = UserJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 409, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn create_user(
    State(app): State<App>,
    caller: Caller,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let email = check.required_string("email");
    let name = check.required_string("name");
    let username = check.required_string("username");
    let admin = check.optional_bool("admin").unwrap_or(false);
    // Accepted for compatibility with GitLab clients, and discarded.
    let _ = check.optional_string("password");
    let _ = check.optional_bool("skip_confirmation");
    check.finish()?;
    let user = app
        .service
        .create_user(
            &caller,
            NewUserInput {
                username,
                name,
                email,
                admin,
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(UserJson::new(&user, &app.external_url)),
    )
        .into_response())
}

/// Body of a user create request.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct CreateUserBody {
    /// E-mail.
    email: String,
    /// Display name.
    name: String,
    /// Username.
    username: String,
    /// Administrator.
    admin: Option<bool>,
    /// Ignored: kas-gateway users authenticate with personal access tokens only.
    password: Option<String>,
}

/// A user: public fields for anyone authenticated, all fields for the user and administrators.
#[utoipa::path(
    get, path = "/api/v4/users/{user_id}", tag = "users",
    params(("user_id" = i64, Path, description = "ID of the user")),
    responses(
        (status = 200, body = UserReplyJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn get_user(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<UserReplyJson>> {
    let id = path.id("user_id")?;
    let user = app.service.user(&caller, id).await?;
    Ok(Json(if caller.is_admin() || caller.user.id == user.id {
        UserReplyJson::Full(UserJson::new(&user, &app.external_url))
    } else {
        UserReplyJson::Public(UserPublicJson::new(&user, &app.external_url))
    }))
}

/// Creates a personal access token for a user (administrators).
#[utoipa::path(
    post, path = "/api/v4/users/{user_id}/personal_access_tokens", tag = "users",
    params(("user_id" = i64, Path, description = "ID of the user")),
    request_body(content = inline(CreatePersonalTokenBody), description = "JSON or form-encoded"),
    responses(
        (status = 201, description = "The token, with its secret (shown once)", body = PersonalTokenJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn create_personal_token(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    params: Params,
) -> Result<Response> {
    let user_id = path.id("user_id")?;
    let mut check = params.check();
    let name = check.required_string("name");
    let scope_names = check.required_strings("scopes");
    let expires_at = check.optional_date("expires_at");
    let scopes: Option<Vec<Scope>> = scope_names.iter().map(|s| Scope::parse(s)).collect();
    let scopes = match scopes {
        Some(scopes) => scopes,
        None => {
            check.not_allowed("scopes");
            Vec::new()
        }
    };
    check.finish()?;
    let (token, secret) = app
        .service
        .create_personal_token(
            &caller,
            user_id,
            NewTokenInput {
                name,
                scopes,
                expires_at,
            },
        )
        .await?;
    let active = token.is_active(app.service.now());
    Ok((
        StatusCode::CREATED,
        Json(PersonalTokenJson::new(&token, active, Some(&secret))),
    )
        .into_response())
}

/// Body of a personal access token create request.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct CreatePersonalTokenBody {
    /// Name.
    name: String,
    /// `api` and/or `read_api`.
    scopes: Vec<String>,
    /// `YYYY-MM-DD`; the token stops working at midnight UTC that day.
    expires_at: Option<String>,
}
