//! `/projects` and `/projects/:id/members`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, Uri};

use super::App;
use super::extract::{Params, PathArgs};
use super::paginate::paged;
use super::repr::{ErrorJson, MemberJson, ProjectJson};
use crate::domain::{AccessLevel, Caller, Error, NewProjectInput, ParamProblem, Result};

/// Creates a project in the caller's namespace; the caller becomes its Owner.
#[utoipa::path(
    post, path = "/api/v4/projects", tag = "projects",
    request_body(content = inline(CreateProjectBody), description = "JSON or form-encoded"),
    responses(
        (status = 201, body = ProjectJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn create_project(
    State(app): State<App>,
    caller: Caller,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let input = NewProjectInput {
        name: check.optional_string("name"),
        path: check.optional_string("path"),
        description: check.optional_string("description"),
        namespace_id: check.optional_int("namespace_id"),
    };
    check.finish()?;
    let project = app.service.create_project(&caller, input).await?;
    Ok((
        StatusCode::CREATED,
        Json(ProjectJson::new(&project, &app.external_url)),
    )
        .into_response())
}

/// Body of a project create request.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct CreateProjectBody {
    /// Name (or give `path`).
    name: Option<String>,
    /// Path (derived from the name when absent).
    path: Option<String>,
    /// Description.
    description: Option<String>,
    /// A user namespace id (administrators; default: the caller's).
    namespace_id: Option<i64>,
}

/// The projects the caller is a member of (all of them for administrators), newest first.
#[utoipa::path(
    get, path = "/api/v4/projects", tag = "projects",
    params(
        ("page" = Option<i64>, Query, description = "Page number (default 1)"),
        ("per_page" = Option<i64>, Query, description = "Items per page (default 20, max 100)"),
    ),
    responses((status = 200, body = [ProjectJson]), (status = 401, body = ErrorJson)),
    security(("private_token" = []))
)]
pub async fn list_projects(
    State(app): State<App>,
    caller: Caller,
    uri: Uri,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let page = check.page();
    check.finish()?;
    let projects = app.service.list_projects(&caller, page).await?;
    let items: Vec<ProjectJson> = projects
        .items
        .iter()
        .map(|p| ProjectJson::new(p, &app.external_url))
        .collect();
    Ok(paged(&app.external_url, &uri, page, projects.total, items))
}

/// A project (any member).
#[utoipa::path(
    get, path = "/api/v4/projects/{id}", tag = "projects",
    params(("id" = String, Path, description = "ID or URL-encoded path of the project")),
    responses(
        (status = 200, body = ProjectJson),
        (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn get_project(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<ProjectJson>> {
    let project = app.service.project(&caller, &path.project()).await?;
    Ok(Json(ProjectJson::new(&project, &app.external_url)))
}

/// Adds a member (Maintainer; Owner to add an Owner).
#[utoipa::path(
    post, path = "/api/v4/projects/{id}/members", tag = "members",
    params(("id" = String, Path, description = "ID or URL-encoded path of the project")),
    request_body(content = inline(AddMemberBody), description = "JSON or form-encoded"),
    responses(
        (status = 201, body = MemberJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 403, body = ErrorJson),
        (status = 404, body = ErrorJson), (status = 409, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn add_member(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let user_id = check.required_int("user_id");
    let level = check.required_choice("access_level", AccessLevel::from_value);
    check.finish()?;
    let level =
        level.ok_or_else(|| Error::param(ParamProblem::NotAllowed("access_level".into())))?;
    let member = app
        .service
        .add_member(&caller, &path.project(), user_id, level)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(MemberJson::new(&member, &app.external_url)),
    )
        .into_response())
}

/// Body of a member add request.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct AddMemberBody {
    /// The user to add.
    user_id: i64,
    /// 10 Guest, 15 Planner, 20 Reporter, 30 Developer, 40 Maintainer, 50 Owner.
    access_level: i64,
}

/// The members of a project (any member).
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/members", tag = "members",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("page" = Option<i64>, Query, description = "Page number (default 1)"),
        ("per_page" = Option<i64>, Query, description = "Items per page (default 20, max 100)"),
    ),
    responses(
        (status = 200, body = [MemberJson]),
        (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn list_members(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
    uri: Uri,
    params: Params,
) -> Result<Response> {
    let mut check = params.check();
    let page = check.page();
    check.finish()?;
    let members = app
        .service
        .list_members(&caller, &path.project(), page)
        .await?;
    let items: Vec<MemberJson> = members
        .items
        .iter()
        .map(|m| MemberJson::new(m, &app.external_url))
        .collect();
    Ok(paged(&app.external_url, &uri, page, members.total, items))
}

/// One member (any member).
#[utoipa::path(
    get, path = "/api/v4/projects/{id}/members/{user_id}", tag = "members",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("user_id" = i64, Path, description = "ID of the member"),
    ),
    responses(
        (status = 200, body = MemberJson),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn get_member(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<Json<MemberJson>> {
    let user_id = path.id("user_id")?;
    let member = app
        .service
        .member(&caller, &path.project(), user_id)
        .await?;
    Ok(Json(MemberJson::new(&member, &app.external_url)))
}

/// Removes a member (Maintainer; Owner to remove an Owner; the last Owner stays).
#[utoipa::path(
    delete, path = "/api/v4/projects/{id}/members/{user_id}", tag = "members",
    params(
        ("id" = String, Path, description = "ID or URL-encoded path of the project"),
        ("user_id" = i64, Path, description = "ID of the member"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, body = ErrorJson), (status = 401, body = ErrorJson),
        (status = 403, body = ErrorJson), (status = 404, body = ErrorJson),
    ),
    security(("private_token" = []))
)]
pub async fn remove_member(
    State(app): State<App>,
    caller: Caller,
    path: PathArgs,
) -> Result<StatusCode> {
    let user_id = path.id("user_id")?;
    app.service
        .remove_member(&caller, &path.project(), user_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
