//! `/user`, `/users`, `/users/:id/personal_access_tokens`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use super::App;
use super::extract::{Params, PathArgs};
use super::paginate::paged;
use super::repr::{ErrorJson, PersonalTokenJson, UserJson, UserPublicJson, UserReplyJson};
use crate::domain::{Caller, NewTokenInput, NewUserInput, Result, Scope, UserFilter, UserOrder};
use http::Uri;

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

/// Users, newest first by default: the public fields for anyone authenticated, all fields
/// for administrators.
#[utoipa::path(
    get, path = "/api/v4/users", tag = "users",
    params(
        ("username" = Option<String>, Query, description = "Exactly this username, ignoring case"),
        ("search" = Option<String>, Query, description = "Username, name or e-mail holds this, ignoring case"),
        ("active" = Option<bool>, Query, description = "Only active users"),
        ("blocked" = Option<bool>, Query, description = "Only blocked users"),
        ("admins" = Option<bool>, Query, description = "Only administrators (administrators only)"),
        ("order_by" = Option<String>, Query, description = "`id` (default), `name`, `username`, `created_at`"),
        ("sort" = Option<String>, Query, description = "`desc` (default) or `asc`"),
        ("page" = Option<i64>, Query, description = "Page number (default 1)"),
        ("per_page" = Option<i64>, Query, description = "Items per page (default 20, max 100)"),
    ),
    responses(
        (status = 200, body = [UserReplyJson]),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn list_users(
    State(app): State<App>,
    caller: Caller,
    uri: Uri,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let page = check.page();
    let username = check.optional_string("username");
    let search = check.optional_string("search").filter(|s| !s.is_empty());
    let active = check.optional_bool("active").unwrap_or(false);
    let blocked = check.optional_bool("blocked").unwrap_or(false);
    let admins = check.optional_bool("admins").unwrap_or(false);
    let order = match check.optional_string("order_by").as_deref() {
        None | Some("id") => UserOrder::Id,
        Some("name") => UserOrder::Name,
        Some("username") => UserOrder::Username,
        // No separate update time is kept: a user changes only when created.
        Some("created_at" | "updated_at") => UserOrder::CreatedAt,
        Some(_) => {
            check.not_allowed("order_by");
            UserOrder::Id
        }
    };
    let ascending = match check.optional_string("sort").as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => {
            check.not_allowed("sort");
            false
        }
    };
    check.finish()?;
    let filter = UserFilter {
        username,
        search,
        active,
        blocked,
        admins,
        order,
        ascending,
    };
    let users = app.service.list_users(&caller, filter, page).await?;
    let items: Vec<UserReplyJson> = users
        .items
        .iter()
        .map(|user| {
            if caller.is_admin() {
                UserReplyJson::Full(UserJson::new(user, &app.external_url))
            } else {
                UserReplyJson::Public(UserPublicJson::new(user, &app.external_url))
            }
        })
        .collect();
    Ok(paged(&app.external_url, &uri, page, users.total, items))
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
    Ok((
        StatusCode::CREATED,
        Json(PersonalTokenJson::new(
            &token,
            app.service.now(),
            Some(&secret),
        )),
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
