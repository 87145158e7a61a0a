//! What crosses the wire besides the happy path: bodies, encodings, limits, probes, OpenAPI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, ROOT_TOKEN};
use rstest::rstest;
use serde_json::json;

#[rstest]
#[tokio::test]
async fn bodies_in_every_encoding(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let url = format!("{}/api/v4/projects/{project}/cluster_agents", gw.base);
    let post = || gw.client.post(&url).header("Private-Token", ROOT_TOKEN);

    // Form-encoded, as curl -d sends it.
    let form = post()
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("name=form-agent");
    common::read(form.send().await.unwrap())
        .await
        .expect_status(201);
    // Parameters in the query string of a POST.
    let query = gw
        .client
        .post(format!("{url}?name=query-agent"))
        .header("Private-Token", ROOT_TOKEN);
    common::read(query.send().await.unwrap())
        .await
        .expect_status(201);
    // JSON with a charset.
    let json_charset = post()
        .header("Content-Type", "application/json; charset=utf-8")
        .body(r#"{"name":"json-agent"}"#);
    common::read(json_charset.send().await.unwrap())
        .await
        .expect_status(201);

    // Malformed JSON: 400, nothing written.
    for body in [r#"{"name":"#, "{\"name\":\"x\"} trailing", "[1,"] {
        let bad = post().header("Content-Type", "application/json").body(body);
        common::read(bad.send().await.unwrap())
            .await
            .expect(400, json!({"error": "The request body is not valid JSON"}));
    }
    // Valid JSON that is not an object (the Go client sends `null` for nil options): ignored,
    // as GitLab does; the parameters come from the query string.
    for (i, body) in ["null", "[]", "[1,2]", "42", "\"x\"", "true"]
        .iter()
        .enumerate()
    {
        let missing = post()
            .header("Content-Type", "application/json")
            .body(*body);
        common::read(missing.send().await.unwrap())
            .await
            .expect(400, json!({"error": "name is missing"}));
        let from_query = gw
            .client
            .post(format!("{url}?name=non-object-{i}"))
            .header("Private-Token", ROOT_TOKEN)
            .header("Content-Type", "application/json")
            .body(*body);
        let created = common::read(from_query.send().await.unwrap()).await;
        assert_eq!(
            created.expect_status(201)["name"],
            format!("non-object-{i}")
        );
    }
    // ...but a NUL inside it is refused like anywhere else.
    let nul = post()
        .header("Content-Type", "application/json")
        .body(r#"["\u0000"]"#);
    assert_eq!(common::read(nul.send().await.unwrap()).await.status, 400);
    let other = post().header("Content-Type", "text/plain").body("name=x");
    common::read(other.send().await.unwrap())
        .await
        .expect(415, json!({"error": "415 Unsupported Media Type"}));

    // python-gitlab sends an empty body with a JSON content type on GET and DELETE.
    let empty = gw
        .client
        .get(&url)
        .header("Private-Token", ROOT_TOKEN)
        .header("Content-Type", "application/json");
    let listed = common::read(empty.send().await.unwrap()).await;
    let names: Vec<_> = listed
        .expect_status(200)
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].clone())
        .collect();
    assert_eq!(
        names,
        [
            json!("form-agent"),
            json!("json-agent"),
            json!("non-object-0"),
            json!("non-object-1"),
            json!("non-object-2"),
            json!("non-object-3"),
            json!("non-object-4"),
            json!("non-object-5"),
            json!("query-agent")
        ]
    );
}

#[rstest]
#[tokio::test]
async fn oversized_bodies_get_413(#[values(Backend::Sqlite)] backend: Backend) {
    let gw = gateway!(backend);
    let project = gw.project(ROOT_TOKEN, "test").await;
    let url = format!("{}/api/v4/projects/{project}/cluster_agents", gw.base);
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(1024 * 1024));
    let request = gw
        .client
        .post(&url)
        .header("Private-Token", ROOT_TOKEN)
        .header("Content-Type", "application/json")
        .body(big);
    common::read(request.send().await.unwrap())
        .await
        .expect(413, json!({"message": "413 Request Entity Too Large"}));
    // Just under the limit is an ordinary validation error, not a 413 nor a 500.
    let under = format!(r#"{{"name":"{}"}}"#, "a".repeat(1000 * 1000));
    let request = gw
        .client
        .post(&url)
        .header("Private-Token", ROOT_TOKEN)
        .header("Content-Type", "application/json")
        .body(under);
    let reply = common::read(request.send().await.unwrap()).await;
    assert_eq!(
        reply.status.as_u16(),
        400,
        "{}",
        &reply.text[..100.min(reply.text.len())]
    );
}

#[rstest]
#[tokio::test]
async fn unknown_routes_and_methods(#[values(Backend::Sqlite)] backend: Backend) {
    let gw = gateway!(backend);
    gw.get(ROOT_TOKEN, "/api/v4/nothing-here")
        .await
        .expect(404, json!({"error": "404 Not Found"}));
    gw.get(ROOT_TOKEN, "/api/v4/projects/root/test/cluster_agents")
        .await
        .expect(404, json!({"error": "404 Not Found"}));
    gw.call(
        reqwest::Method::PUT,
        Some(ROOT_TOKEN),
        "/api/v4/projects/1/cluster_agents",
        None,
    )
    .await
    .expect(405, json!({"error": "405 Not Allowed"}));
}

#[rstest]
#[tokio::test]
async fn probes(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    let call = |path: &'static str| gw.call(reqwest::Method::GET, None, path, None);
    call("/-/liveness")
        .await
        .expect(200, json!({"status": "ok"}));
    call("/-/readiness")
        .await
        .expect(200, json!({"status": "ok", "db_check": [{"status": "ok"}]}));
    let health = call("/-/health").await;
    health.expect_status(200);
    assert_eq!(health.text, "kas-gateway OK");
}

#[rstest]
#[tokio::test]
async fn readiness_fails_when_the_database_goes_away(
    #[values(Backend::Postgres)] backend: Backend,
) {
    let mut gw = gateway!(backend);
    let pg = gw.pg.take().unwrap();
    drop(pg); // DROP DATABASE … WITH (FORCE): every connection is cut
    let reply = gw
        .call(reqwest::Method::GET, None, "/-/readiness", None)
        .await;
    reply.expect(
        503,
        json!({"status": "failed", "db_check": [{"status": "failed", "message": "database unreachable"}]}),
    );
    // A request that needs the database is a 503 with GitLab's body, not a hang or a crash.
    gw.get(ROOT_TOKEN, "/api/v4/user")
        .await
        .expect(503, json!({"message": "503 Service Unavailable"}));
}

#[rstest]
#[tokio::test]
async fn openapi_document_lists_every_endpoint(#[values(Backend::Sqlite)] backend: Backend) {
    let gw = gateway!(backend);
    let doc = gw
        .call(reqwest::Method::GET, None, "/api/v4/openapi.json", None)
        .await;
    let doc = doc.expect_status(200);
    let mut operations: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            operations.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    operations.sort();
    insta::assert_debug_snapshot!(operations);
    assert_eq!(
        doc["components"]["securitySchemes"]["private_token"],
        json!({"type": "apiKey", "in": "header", "name": "Private-Token"})
    );
}

#[test]
fn openapi_document_is_generated_from_the_code() {
    let doc = serde_json::to_value(kas_gateway::rest::openapi()).unwrap();
    let agent = &doc["components"]["schemas"]["AgentJson"]["properties"];
    for field in [
        "id",
        "name",
        "config_project",
        "created_at",
        "created_by_user_id",
        "is_receptive",
    ] {
        assert!(agent.get(field).is_some(), "AgentJson documents {field}");
    }
}

/// `/metadata` and `/version`, as GitLab answers them: the agent server is this gateway.
#[rstest]
#[tokio::test]
async fn metadata_and_version(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let gw = gateway!(backend);
    for path in ["/api/v4/metadata", "/api/v4/version"] {
        gw.call(reqwest::Method::GET, None, path, None)
            .await
            .expect(401, json!({"message": "401 Unauthorized"}));
        gw.get(ROOT_TOKEN, path).await.expect(
            200,
            json!({
                "version": "17.4.0",
                "revision": format!("kas-gateway-{}", env!("CARGO_PKG_VERSION")),
                "kas": {
                    "enabled": true,
                    "externalUrl": gw.config.external_url.clone().unwrap(),
                    "externalK8sProxyUrl": null,
                    "version": env!("CARGO_PKG_VERSION"),
                },
                "enterprise": false,
            }),
        );
    }
}
