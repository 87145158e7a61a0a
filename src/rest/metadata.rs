//! `/metadata` and `/version`: what GitLab clients ask first (python-gitlab's `gl.version()`,
//! go-gitlab's `Version`, gitbeaker's `Metadata`), and where glab finds the agent server.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::App;
use crate::domain::Caller;

/// The GitLab release whose agent API this gateway serves (URL configurations for receptive
/// agents came with GitLab 17.4).
pub const GITLAB_API_VERSION: &str = "17.4.0";

/// GitLab's `API::Entities::Metadata`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetadataJson {
    /// The GitLab release whose API is served.
    pub version: &'static str,
    /// The build of this gateway.
    pub revision: &'static str,
    /// The agent server: this gateway.
    pub kas: KasJson,
    /// Whether this is GitLab Enterprise Edition: never.
    pub enterprise: bool,
}

/// The agent server part of [`MetadataJson`].
#[derive(Debug, Serialize, ToSchema)]
pub struct KasJson {
    /// Always true: serving agents is what the gateway does.
    pub enabled: bool,
    /// This gateway's external URL.
    #[serde(rename = "externalUrl")]
    pub external_url: String,
    /// The Kubernetes API proxy's URL: none yet.
    #[serde(rename = "externalK8sProxyUrl")]
    pub external_k8s_proxy_url: Option<String>,
    /// This gateway's version.
    pub version: &'static str,
}

fn metadata(app: &App) -> MetadataJson {
    MetadataJson {
        version: GITLAB_API_VERSION,
        revision: concat!("kas-gateway-", env!("CARGO_PKG_VERSION")),
        kas: KasJson {
            enabled: true,
            external_url: app.external_url.to_string(),
            external_k8s_proxy_url: None,
            version: env!("CARGO_PKG_VERSION"),
        },
        enterprise: false,
    }
}

/// The instance's metadata (any authenticated user).
#[utoipa::path(
    get, path = "/api/v4/metadata", tag = "metadata",
    responses((status = 200, body = MetadataJson), (status = 401, body = super::repr::ErrorJson)),
    security(("private_token" = []))
)]
pub async fn get_metadata(State(app): State<App>, _caller: Caller) -> Json<MetadataJson> {
    Json(metadata(&app))
}

/// The same as `/metadata`, as GitLab answers it today (any authenticated user).
#[utoipa::path(
    get, path = "/api/v4/version", tag = "metadata",
    responses((status = 200, body = MetadataJson), (status = 401, body = super::repr::ErrorJson)),
    security(("private_token" = []))
)]
pub async fn get_version(State(app): State<App>, _caller: Caller) -> Json<MetadataJson> {
    Json(metadata(&app))
}
