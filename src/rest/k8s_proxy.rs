//! The Kubernetes API proxy, as GitLab's agent server has it: a kubeconfig whose server is
//! `<gateway>/k8s-proxy` and whose token is `pat:<agent-id>:<personal access token>` reaches
//! the agent's cluster, each request through the agent's live session.
//!
//! The caller is authenticated and authorised before a byte of the body is read: a token with
//! the `k8s_proxy` scope, whose user is at least a Developer of the agent's project. The
//! caller's credentials never reach the agent. Errors are Kubernetes `Status` objects, which
//! kubectl shows as they are.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use super::App;
use crate::domain::{Error, Id, ProxyUser, RequestError};

/// The paths the proxy is served under (GitLab's, and the one under `/-/`).
pub const PREFIXES: [&str; 2] = ["/k8s-proxy", "/-/k8s-proxy"];

/// The largest request body the proxy passes on (the Kubernetes API's own limit is 3 MiB).
pub const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// Whether a path is the proxy's.
pub fn is_proxy_path(path: &str) -> bool {
    PREFIXES.iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Every method under the prefixes.
pub async fn proxy(State(app): State<App>, request: Request) -> Response {
    let started = Instant::now();
    let Some((agent_id, token)) = credentials(request.headers()) else {
        return status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "give the token as `Authorization: Bearer pat:<agent id>:<personal access token>`",
        );
    };
    let access = match app
        .service
        .kubernetes_proxy_access(Some(&token), agent_id)
        .await
    {
        Ok(access) => access,
        Err(error) => return refused(&error),
    };
    let announced = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > MAX_BODY_BYTES) {
        return status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            &format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        );
    }
    let (mut parts, body) = request.into_parts();
    let path = upstream_path(&parts.uri);
    let Ok(uri) = path.parse::<http::Uri>() else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid path");
    };
    parts.uri = uri;
    for name in [
        http::header::AUTHORIZATION,
        http::header::COOKIE,
        http::header::PROXY_AUTHORIZATION,
    ] {
        parts.headers.remove(name);
    }
    let method = parts.method.clone();
    let user = ProxyUser {
        id: access.caller.user.id,
        username: access.caller.user.username.clone(),
        access_level: access
            .access_level
            .map_or(0, |level| i32::try_from(level.value()).unwrap_or(0)),
        project_id: access.agent.project.id,
        project_path: access.agent.project.path_with_namespace(),
    };
    let outcome = app
        .service
        .sessions()
        .proxy(
            agent_id,
            &user,
            http::Request::from_parts(parts, Body::new(body)),
        )
        .await;
    let response = match outcome {
        Ok(response) => response,
        Err(error) => unavailable(agent_id, &error),
    };
    tracing::info!(
        target: "kas_gateway::k8s_proxy",
        user = %user.username,
        agent_id,
        %method,
        path = path.split('?').next().unwrap_or(""),
        status = response.status().as_u16(),
        head_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "proxied"
    );
    response
}

/// `Authorization: Bearer pat:<agent id>:<token>`.
fn credentials(headers: &http::HeaderMap) -> Option<(Id, String)> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    let rest = token.strip_prefix("pat:")?;
    let (agent, token) = rest.split_once(':')?;
    let agent_id = agent.parse::<Id>().ok().filter(|id| *id > 0)?;
    (!token.is_empty()).then(|| (agent_id, token.to_owned()))
}

/// The request's path and query below the prefix, from the Kubernetes API's root.
fn upstream_path(uri: &http::Uri) -> String {
    let path = uri.path();
    let below = PREFIXES
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix))
        .unwrap_or(path);
    let below = if below.is_empty() { "/" } else { below };
    match uri.query() {
        Some(query) => format!("{below}?{query}"),
        None => below.to_owned(),
    }
}

/// A refusal of the caller, as the Kubernetes API words it.
fn refused(error: &Error) -> Response {
    match error {
        Error::Unauthorized => status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized"),
        Error::InsufficientScope { scope } => status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("insufficient_scope: the token needs the {scope} scope"),
        ),
        Error::Forbidden | Error::ForbiddenBecause(_) => status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Forbidden: the agent's project needs you as a Developer or more",
        ),
        Error::NotFound(_) => status(StatusCode::NOT_FOUND, "NotFound", "agent not found"),
        Error::Unavailable(_) => status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the gateway's database is unavailable",
        ),
        other => {
            tracing::error!(error = %other, "the Kubernetes API proxy failed");
            status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "500 Internal Server Error",
            )
        }
    }
}

/// The agent could not be reached, or its answer could not be had.
fn unavailable(agent_id: Id, error: &RequestError) -> Response {
    match error {
        RequestError::NotConnected | RequestError::NoHolder => status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &format!(
                "agent {agent_id} is not connected to the gateway right now, so its cluster \
                 cannot be reached: see the agent's connection state"
            ),
        ),
        RequestError::TooManyStreams => status(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            &error.to_string(),
        ),
        RequestError::Timeout => status(StatusCode::GATEWAY_TIMEOUT, "Timeout", &error.to_string()),
        other => status(
            StatusCode::BAD_GATEWAY,
            "ServiceUnavailable",
            &format!("the agent's cluster did not answer: {other}"),
        ),
    }
}

/// A Kubernetes `Status` object.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        axum::Json(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_pat_agent_token() {
        let headers = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            headers
        };
        assert_eq!(
            credentials(&headers("Bearer pat:7:glpat-abc:def")),
            Some((7, "glpat-abc:def".to_owned()))
        );
        for bad in [
            "Bearer glpat-abc",
            "Bearer pat:x:glpat",
            "Bearer pat:0:glpat",
            "Bearer pat:7:",
            "Basic pat:7:glpat",
        ] {
            assert_eq!(credentials(&headers(bad)), None, "{bad}");
        }
    }

    #[test]
    fn paths_below_the_prefix() {
        let path = |uri: &str| upstream_path(&uri.parse().unwrap());
        assert_eq!(
            path("/k8s-proxy/api/v1/pods?watch=true"),
            "/api/v1/pods?watch=true"
        );
        assert_eq!(path("/-/k8s-proxy/version"), "/version");
        assert_eq!(path("/k8s-proxy"), "/");
        assert!(is_proxy_path("/k8s-proxy/api"));
        assert!(is_proxy_path("/-/k8s-proxy"));
        assert!(!is_proxy_path("/k8s-proxyx/api"));
    }
}
