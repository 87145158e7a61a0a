//! What a careless or hostile client can send, against the real binary over loopback: NUL
//! bytes and invalid UTF-8, bodies announced too large, unknown content types, huge query
//! strings; and what such a client can see: response bodies that match the OpenAPI document,
//! and a database file that only the gateway's user can read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::binary::{Gateway, on_backend, project_and_agent, send, with_token};
use common::{Backend, PgDatabase};
use reqwest::Method;
use rstest::rstest;
use serde_json::{Value, json};

const TOKEN: &str = "glpat-malformed-input-test-00000";

/// A gateway process, its database and its data directory, dropped in that order.
struct Running {
    gateway: Gateway,
    _pg: Option<PgDatabase>,
    dir: tempfile::TempDir,
}

async fn start(backend: Backend) -> Option<Running> {
    let dir = tempfile::tempdir().unwrap();
    let (command, pg) = on_backend(with_token(dir.path(), TOKEN), backend).await?;
    Some(Running {
        gateway: Gateway::start(command),
        _pg: pg,
        dir,
    })
}

/// A response, read whole.
struct Answer {
    status: u16,
    content_type: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

async fn request(
    gateway: &Gateway,
    method: Method,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    let mut request = reqwest::Client::new().request(method, gateway.url(path));
    if let Some(token) = token {
        request = request.header("Private-Token", token);
    }
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    let response = request.body(body).send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.unwrap();
    Answer {
        status,
        content_type,
        text,
    }
}

fn assert_no_error_lines(gateway: &Gateway) {
    let log = gateway.log_text();
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(r#""level":"ERROR""#))
        .collect();
    assert!(errors.is_empty(), "ERROR lines in the log: {errors:#?}");
}

/// What a case sends: what it shows, method, path, content type, body.
type Case<'a> = (&'a str, Method, String, Option<&'a str>, &'a [u8]);

const JSON: Option<&str> = Some("application/json");
const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
#[tokio::test]
async fn nul_bytes_and_invalid_utf8_get_gitlabs_400_on_both_backends(#[case] backend: Backend) {
    let Some(running) = start(backend).await else {
        return;
    };
    let gw = &running.gateway;
    let (agents, agent) = project_and_agent(gw, TOKEN).await;
    let tokens = format!("{agents}/{}/tokens", agent["id"]);
    let (_, root) = send(Method::GET, &gw.url("/api/v4/user"), TOKEN, None).await;
    let pats = format!("/api/v4/users/{}/personal_access_tokens", root["id"]);

    let cases: Vec<Case> = vec![
        (
            "NUL in a project path",
            Method::GET,
            "/api/v4/projects/root%00%2Fp".into(),
            None,
            b"",
        ),
        (
            "invalid UTF-8 in a project path",
            Method::GET,
            "/api/v4/projects/root%FF%2Fp".into(),
            None,
            b"",
        ),
        (
            "invalid UTF-8 in an agent id",
            Method::GET,
            format!("{agents}/%C3%28"),
            None,
            b"",
        ),
        (
            "NUL in a path no route matches",
            Method::GET,
            "/api/v4/nowhere%00".into(),
            None,
            b"",
        ),
        (
            "NUL in a query value",
            Method::GET,
            format!("{agents}?per_page=2%00"),
            None,
            b"",
        ),
        (
            "invalid UTF-8 in a query key",
            Method::GET,
            format!("{agents}?%FF=1"),
            None,
            b"",
        ),
        (
            "NUL in the query of a POST",
            Method::POST,
            format!("{tokens}?name=t%00"),
            None,
            b"",
        ),
        (
            "NUL in a token name, JSON",
            Method::POST,
            tokens.clone(),
            JSON,
            br#"{"name":"t\u0000"}"#,
        ),
        (
            "NUL in a token description, JSON",
            Method::POST,
            tokens.clone(),
            JSON,
            br#"{"name":"t","description":"d\u0000"}"#,
        ),
        (
            "NUL in a token name, form",
            Method::POST,
            tokens.clone(),
            FORM,
            b"name=t%00",
        ),
        (
            "invalid UTF-8 in a token description, form",
            Method::POST,
            tokens.clone(),
            FORM,
            b"name=t&description=%E2%82",
        ),
        (
            "raw invalid UTF-8 in a form",
            Method::POST,
            tokens.clone(),
            FORM,
            b"name=t\xff",
        ),
        (
            "NUL in a form key",
            Method::POST,
            tokens.clone(),
            FORM,
            b"name=t&x%00=1",
        ),
        (
            "NUL deep in a JSON body",
            Method::POST,
            tokens.clone(),
            JSON,
            br#"{"name":"t","x":{"y":[["\u0000"]]}}"#,
        ),
        (
            "NUL in a JSON key",
            Method::POST,
            tokens.clone(),
            JSON,
            br#"{"name":"t","k\u0000":1}"#,
        ),
        (
            "invalid UTF-8 in a JSON body",
            Method::POST,
            tokens.clone(),
            JSON,
            b"{\"name\":\"t\xc3\"}",
        ),
        (
            "NUL in a project description",
            Method::POST,
            "/api/v4/projects".into(),
            JSON,
            br#"{"name":"q","description":"x\u0000"}"#,
        ),
        (
            "NUL in a user's name",
            Method::POST,
            "/api/v4/users".into(),
            JSON,
            br#"{"username":"u","name":"U\u0000","email":"u@example.com"}"#,
        ),
        (
            "NUL in a user's e-mail, form",
            Method::POST,
            "/api/v4/users".into(),
            FORM,
            b"username=u&name=U&email=u%00@example.com",
        ),
        (
            "NUL in a personal access token's name",
            Method::POST,
            pats.clone(),
            JSON,
            br#"{"name":"t\u0000","scopes":["api"]}"#,
        ),
    ];
    for (what, method, path, content_type, body) in cases {
        let answer = request(gw, method, &path, Some(TOKEN), content_type, body.to_vec()).await;
        assert_eq!(
            (
                answer.status,
                answer.content_type.as_str(),
                answer.text.as_str()
            ),
            (400, "text/plain", "Bad Request"),
            "{what} ({backend:?})"
        );
    }
    // Refused before authentication, as GitLab's middleware does.
    let anonymous = request(
        gw,
        Method::GET,
        "/api/v4/projects/root%00%2Fp",
        None,
        None,
        vec![],
    )
    .await;
    assert_eq!(
        (anonymous.status, anonymous.text.as_str()),
        (400, "Bad Request")
    );

    // Nothing reached the store: no token, no second project, and the user is still free.
    let (status, listed) = send(Method::GET, &gw.url(&tokens), TOKEN, None).await;
    assert_eq!((status, listed), (200, json!([])));
    let (_, projects) = send(Method::GET, &gw.url("/api/v4/projects"), TOKEN, None).await;
    assert_eq!(projects.as_array().map(Vec::len), Some(1));
    let user = json!({"username": "u", "name": "U", "email": "u@example.com"});
    let (status, _) = send(Method::POST, &gw.url("/api/v4/users"), TOKEN, Some(user)).await;
    assert_eq!(status, 201);
    // Valid UTF-8 beyond ASCII is stored and returned as sent, on both backends.
    let body = json!({"name": "t", "description": "café ☕ \u{1}"});
    let (status, created) = send(Method::POST, &gw.url(&tokens), TOKEN, Some(body)).await;
    assert_eq!(
        (status, &created["description"]),
        (201, &json!("café ☕ \u{1}"))
    );
    let form = request(
        gw,
        Method::POST,
        &tokens,
        Some(TOKEN),
        FORM,
        b"name=f&description=caf%C3%A9".to_vec(),
    )
    .await;
    assert_eq!(
        (form.status, &form.json()["description"]),
        (201, &json!("café"))
    );

    assert_no_error_lines(gw);
}

/// Writes `head` (no body) on a fresh connection and reads until the gateway closes it.
fn exchange_without_body(addr: &str, head: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    if let Err(e) = stream.read_to_end(&mut answer) {
        panic!(
            "no complete answer without the body ({e}); got {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    String::from_utf8(answer).unwrap()
}

#[rstest]
#[case::authenticated_project("/api/v4/projects", true)]
#[case::anonymous_project("/api/v4/projects", false)]
#[case::authenticated_token("/api/v4/projects/1/cluster_agents/1/tokens", true)]
#[case::anonymous_user("/api/v4/users", false)]
#[case::unknown_route("/api/v4/nowhere", true)]
#[tokio::test]
async fn a_body_announced_too_large_gets_413_before_it_is_sent(
    #[case] path: &str,
    #[case] authenticated: bool,
) {
    let running = start(Backend::Sqlite).await.unwrap();
    let gw = &running.gateway;
    project_and_agent(gw, TOKEN).await;
    let token = if authenticated {
        format!("Private-Token: {TOKEN}\r\n")
    } else {
        String::new()
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\n{token}Content-Type: application/json\r\n\
         Content-Length: 50000000\r\n\r\n",
        gw.addr
    );
    // The gateway answers and closes although not one byte of the body was sent.
    let answer = exchange_without_body(&gw.addr, &head);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({"message": "413 Request Entity Too Large"})
    );
}

#[tokio::test]
async fn an_unsupported_content_type_is_not_echoed() {
    let running = start(Backend::Sqlite).await.unwrap();
    let gw = &running.gateway;
    let (agents, _) = project_and_agent(gw, TOKEN).await;
    let long = format!("application/{}", "x".repeat(4000));
    for content_type in [
        "text/plain",
        "text/<script>alert(1)</script>",
        long.as_str(),
    ] {
        let answer = request(
            gw,
            Method::POST,
            &agents,
            Some(TOKEN),
            Some(content_type),
            b"name=b".to_vec(),
        )
        .await;
        assert_eq!(answer.status, 415, "{content_type}");
        assert_eq!(
            answer.json(),
            json!({"error": "415 Unsupported Media Type"})
        );
    }
}

#[tokio::test]
async fn link_headers_stay_small_whatever_the_query() {
    let running = start(Backend::Sqlite).await.unwrap();
    let gw = &running.gateway;
    let (agents, agent) = project_and_agent(gw, TOKEN).await;
    for name in ["b", "c"] {
        let (status, _) = send(
            Method::POST,
            &gw.url(&agents),
            TOKEN,
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(status, 201);
    }
    let tokens = format!("{agents}/{}/tokens", agent["id"]);
    for name in ["t1", "t2"] {
        let (status, _) = send(
            Method::POST,
            &gw.url(&tokens),
            TOKEN,
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(status, 201);
    }
    let filler = "f".repeat(40 * 1024);
    let padded_agent = format!("{agents}/{}{}/tokens", "0".repeat(20 * 1024), agent["id"]);
    let cases = [
        (
            format!("{agents}?per_page=1&page=2&filler={filler}&pagination=keyset"),
            3,
        ),
        (format!("{padded_agent}?per_page=1&filler={filler}"), 2),
    ];
    for (path, pages) in cases {
        let response = reqwest::Client::new()
            .get(gw.url(&path))
            .header("Private-Token", TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let link = response.headers()["link"].to_str().unwrap().to_owned();
        assert!(link.len() < 1024, "a {} byte Link header", link.len());
        assert!(
            !link.contains("filler") && !link.contains("keyset"),
            "{link}"
        );
        assert!(
            link.contains(&format!("page={pages}&per_page=1>; rel=\"last\"")),
            "{link}"
        );
        // The links work as given, as python-gitlab follows them.
        let first = link.split(['<', '>']).nth(1).unwrap();
        let path = first.split_once(&gw.addr).map_or(first, |(_, p)| p);
        let followed = request(gw, Method::GET, path, Some(TOKEN), None, vec![]).await;
        assert_eq!(followed.status, 200, "{first}");
    }
}

/// Every key set `schema` (in `doc`) allows for a JSON object: (allowed keys, required keys)
/// per alternative. Key sets, not a full validator: enough to see that a body carries what
/// the document names and nothing else.
fn key_sets(doc: &Value, schema: &Value) -> Vec<(BTreeSet<String>, BTreeSet<String>)> {
    if let Some(name) = schema["$ref"].as_str() {
        let name = name.trim_start_matches("#/components/schemas/");
        return key_sets(doc, &doc["components"]["schemas"][name]);
    }
    if let Some(parts) = schema["allOf"].as_array() {
        let mut combined = vec![(BTreeSet::new(), BTreeSet::new())];
        for part in parts {
            let options = key_sets(doc, part);
            combined = combined
                .iter()
                .flat_map(|(keys, required)| {
                    options.iter().map(move |(k, r)| (keys | k, required | r))
                })
                .collect();
        }
        return combined;
    }
    if let Some(items) = schema["anyOf"].as_array().or(schema["oneOf"].as_array()) {
        return items.iter().flat_map(|item| key_sets(doc, item)).collect();
    }
    if schema["type"] == "null" {
        // No object is null.
        return Vec::new();
    }
    let names = |value: &Value| -> BTreeSet<String> {
        match value {
            Value::Object(map) => map.keys().cloned().collect(),
            Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
            _ => BTreeSet::new(),
        }
    };
    vec![(names(&schema["properties"]), names(&schema["required"]))]
}

fn assert_matches_document(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let schema = &doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
        ["schema"];
    assert!(!schema.is_null(), "{method} {path} documents {status}");
    let keys: BTreeSet<String> = body.as_object().unwrap().keys().cloned().collect();
    let options = key_sets(doc, schema);
    assert!(
        options
            .iter()
            .any(|(allowed, required)| required.is_subset(&keys) && keys.is_subset(allowed)),
        "{method} {path}: the body's keys {keys:?} fit none of the documented {options:?}"
    );
}

#[tokio::test]
async fn user_bodies_match_the_schemas_the_document_names() {
    let running = start(Backend::Sqlite).await.unwrap();
    let gw = &running.gateway;
    let (_, doc) = send(Method::GET, &gw.url("/api/v4/openapi.json"), TOKEN, None).await;
    let (_, root) = send(Method::GET, &gw.url("/api/v4/user"), TOKEN, None).await;
    assert_matches_document(&doc, "get", "/api/v4/user", 200, &root);
    let alice = json!({"username": "alice", "name": "Alice", "email": "alice@example.com"});
    let (status, alice) = send(Method::POST, &gw.url("/api/v4/users"), TOKEN, Some(alice)).await;
    assert_eq!(status, 201);
    assert_matches_document(&doc, "post", "/api/v4/users", 201, &alice);
    let (_, pat) = send(
        Method::POST,
        &gw.url(&format!(
            "/api/v4/users/{}/personal_access_tokens",
            alice["id"]
        )),
        TOKEN,
        Some(json!({"name": "t", "scopes": ["api"]})),
    )
    .await;
    let alice_token = pat["token"].as_str().unwrap();

    let user = "/api/v4/users/{user_id}";
    // (who asks, whom, whether the private fields are expected)
    let cases = [
        (alice_token, &root, false),
        (alice_token, &alice, true),
        (TOKEN, &alice, true),
        (TOKEN, &root, true),
    ];
    for (token, whom, private) in cases {
        let (status, body) = send(
            Method::GET,
            &gw.url(&format!("/api/v4/users/{}", whom["id"])),
            token,
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body.get("email").is_some(), private, "{body}");
        assert_matches_document(&doc, "get", user, 200, &body);
    }
}

#[tokio::test]
async fn the_sqlite_files_are_private_from_their_creation() {
    let running = start(Backend::Sqlite).await.unwrap();
    // A write, so that the WAL and its index exist.
    project_and_agent(&running.gateway, TOKEN).await;
    for name in ["kas-gateway.db", "kas-gateway.db-wal", "kas-gateway.db-shm"] {
        let mode = std::fs::metadata(running.dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} is {:o}", mode & 0o777);
    }
}
