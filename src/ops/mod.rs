//! The observability listener: Prometheus `/metrics`, the probes `/liveness` and
//! `/readiness` (as GitLab's agent server names them on its own observability port), and the
//! status page. Never the API: nothing here reads a token, and nothing here shows a secret.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::Held;
use crate::dialer::state::Registry;
use crate::domain::Service;

mod status;

/// What the observability endpoints read.
#[derive(Clone)]
pub struct Ops {
    /// The domain service: the store, and every agent's session state.
    pub service: Service,
    /// This replica's own dialer.
    pub registry: Arc<Registry>,
    /// The agents this replica holds the lease of.
    pub held: watch::Receiver<Held>,
    /// Cancelled when a shutdown is requested: readiness fails from then on, and live pages
    /// end.
    pub shutdown: CancellationToken,
}

/// Connections the observability listener accepts: scrapers, probes and a few people.
pub const MAX_CONNECTIONS: usize = 64;

/// The observability routes.
pub fn router(ops: Ops) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/liveness", get(liveness))
        .route("/readiness", get(readiness))
        .route("/", get(status::page))
        .route("/events", get(status::events))
        .route("/status.css", get(status::style))
        .route("/status.js", get(status::script))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 Not Found\n") })
        .with_state(ops)
}

async fn liveness() -> &'static str {
    "ok\n"
}

async fn readiness(State(ops): State<Ops>) -> Response {
    crate::rest::health::ready(&ops.service, &ops.shutdown).await
}

/// The metrics in Prometheus' text format, with the gauges read now: sessions by state, the
/// agents held, the database pool.
async fn metrics(State(ops): State<Ops>) -> Response {
    let Some(handle) = crate::metrics::handle() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are not recorded\n",
        )
            .into_response();
    };
    crate::metrics::sessions(&ops.registry.all());
    if let Held::These(agents) = &*ops.held.borrow() {
        crate::metrics::agents_held(agents.len());
    }
    crate::metrics::database_pool(ops.service.store().pool_stats());
    crate::metrics::collect_process();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}
