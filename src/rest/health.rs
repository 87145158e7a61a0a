//! `/-/liveness`, `/-/readiness`, `/-/health`, as GitLab names them.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use super::App;

/// The process is up.
#[utoipa::path(get, path = "/-/liveness", tag = "health", responses((status = 200, description = "Alive")))]
pub async fn liveness() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// The process can serve: it is not shutting down and the database answers.
#[utoipa::path(
    get, path = "/-/readiness", tag = "health",
    responses((status = 200, description = "Ready"), (status = 503, description = "Shutting down, or the database is unreachable"))
)]
pub async fn readiness(State(app): State<App>) -> Response {
    ready(&app.service, &app.shutdown).await
}

/// Readiness, for this listener and the observability listener: 503 once `shutdown` is
/// requested, or while the database does not answer within a second.
pub async fn ready(
    service: &crate::domain::Service,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Response {
    if shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "message": "shutting down"})),
        )
            .into_response();
    }
    // Bounded: a database that does not answer is a failed check now, not after the pool's
    // acquire timeout.
    let ping = tokio::time::timeout(crate::store::PING_TIMEOUT, service.store().ping());
    match ping
        .await
        .unwrap_or_else(|_| Err(crate::store::Error::other("no answer in time")))
    {
        Ok(()) => Json(json!({"status": "ok", "db_check": [{"status": "ok"}]})).into_response(),
        Err(error) => {
            tracing::warn!(%error, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "status": "failed",
                    "db_check": [{"status": "failed", "message": "database unreachable"}],
                })),
            )
                .into_response()
        }
    }
}

/// A plain-text health check.
#[utoipa::path(get, path = "/-/health", tag = "health", responses((status = 200, description = "Healthy", body = String)))]
pub async fn health() -> &'static str {
    "kas-gateway OK"
}
