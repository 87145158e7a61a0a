//! The observability listener of a real gateway process: Prometheus metrics with exact counts
//! after a known sequence of requests, calls and sessions; request ids; gRPC calls logged with
//! their gRPC status; the probes and `kas-gateway probe`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::binary::{
    BIN, Gateway, Sample, jwt_sim, metric_value as value, parse_metrics as parse, receptive_agent,
    send, with_token,
};
use kas_gateway::proto::v1 as pb;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const TOKEN: &str = "glpat-observability-test-token-00";

async fn scrape(gateway: &Gateway) -> Vec<(Sample, f64)> {
    let response = reqwest::get(gateway.ops_url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    parse(&response.text().await.unwrap())
}

async fn get(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .header("Private-Token", token)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_known_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = with_token(dir.path(), TOKEN);
    // Quick retries, so that the refused agent fails a few times.
    command.env("KAS_GATEWAY_LOG_LEVEL", "info");
    let gateway = Gateway::start(command);

    let before = scrape(&gateway).await;
    let build = before
        .iter()
        .find(|((name, _), _)| name == "kas_gateway_build_info")
        .unwrap();
    assert_eq!(build.0.1["version"], env!("CARGO_PKG_VERSION"));
    assert!(!build.0.1["commit"].is_empty());
    assert_eq!(
        value(
            &before,
            "kas_gateway_dial_failures_total",
            &[("cause", "dns")]
        ),
        0.0,
        "every cause starts at zero"
    );
    assert!(before.iter().any(
        |((name, labels), _)| name == "kas_gateway_dial_failures_total"
            && labels["cause"] == "client_certificate"
    ));

    // REST: 3 × 200, 2 × 401, 1 × 404 on no route.
    for _ in 0..3 {
        assert_eq!(get(&gateway.url("/api/v4/user"), TOKEN).await.status(), 200);
    }
    for _ in 0..2 {
        let response = get(&gateway.url("/api/v4/user"), "glpat-wrong").await;
        assert_eq!(response.status(), 401);
    }
    assert_eq!(
        get(&gateway.url("/no/such/route/42"), TOKEN).await.status(),
        404
    );
    // Neither listener serves the other's paths.
    assert_eq!(get(&gateway.url("/metrics"), TOKEN).await.status(), 404);
    assert_eq!(
        get(&gateway.ops_url("/api/v4/user"), TOKEN).await.status(),
        404
    );

    // gRPC: one call refused (no token), one that succeeds, one to a method nobody serves.
    let channel = tonic::transport::Channel::from_shared(gateway.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut sessions = pb::sessions_client::SessionsClient::new(channel.clone());
    let refused = sessions
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(pb::ListSessionsRequest::default());
    request
        .metadata_mut()
        .insert("private-token", TOKEN.parse().unwrap());
    sessions.list_sessions(request).await.unwrap();
    let mut unknown = tonic::client::Grpc::new(channel);
    unknown.ready().await.unwrap();
    let mut request = tonic::Request::new(pb::ListSessionsRequest::default());
    request
        .metadata_mut()
        .insert("private-token", TOKEN.parse().unwrap());
    let status = unknown
        .unary::<_, pb::ListSessionsResponse, _>(
            request,
            http::uri::PathAndQuery::from_static("/kas_gateway.v1.Sessions/NoSuchMethod"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    // Sessions: one agent that answers, one whose address refuses connections.
    let (_, project) = send(
        Method::POST,
        &gateway.url("/api/v4/projects"),
        TOKEN,
        Some(json!({"name": "p"})),
    )
    .await;
    let agents = format!("/api/v4/projects/{}/cluster_agents", project["id"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (agent_token, config) = receptive_agent(
        &gateway,
        TOKEN,
        &agents,
        "up",
        &format!("grpc://127.0.0.1:{port}"),
    )
    .await;
    let sim = jwt_sim(agent_token, &config, listener);
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    receptive_agent(
        &gateway,
        TOKEN,
        &agents,
        "down",
        &format!("grpc://127.0.0.1:{closed_port}"),
    )
    .await;

    // Until the one is connected and the other has failed at least twice.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let samples = scrape(&gateway).await;
        let connected = value(
            &samples,
            "kas_gateway_agent_sessions",
            &[("state", "connected")],
        );
        let refusals = value(
            &samples,
            "kas_gateway_dial_failures_total",
            &[("cause", "refused")],
        );
        if connected == 1.0 && refusals >= 2.0 {
            break samples;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connected {connected}, refusals {refusals}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        sim.events
            .open_sessions
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    let http = |method: &str, route: &str, status: &str| {
        value(
            &after,
            "kas_gateway_http_requests_total",
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(http("GET", "/api/v4/user", "200"), 3.0);
    assert_eq!(http("GET", "/api/v4/user", "401"), 2.0);
    // The two unrouted GETs (/no/such/route/42 and /metrics), under one label.
    assert_eq!(http("GET", "<unmatched>", "404"), 2.0);
    assert_eq!(http("POST", "/api/v4/projects", "201"), 1.0);
    assert_eq!(
        http(
            "POST",
            "/api/v4/projects/{id}/cluster_agents/{agent_id}/url_configurations",
            "201"
        ),
        2.0
    );
    // The latency histogram counts the same requests.
    assert_eq!(
        value(
            &after,
            "kas_gateway_http_request_duration_seconds_count",
            &[
                ("method", "GET"),
                ("route", "/api/v4/user"),
                ("status", "200")
            ]
        ),
        3.0
    );
    let grpc = |method: &str, code: &str| {
        let service = if method == "unknown" {
            "unknown"
        } else {
            "kas_gateway.v1.Sessions"
        };
        value(
            &after,
            "kas_gateway_grpc_server_handled_total",
            &[
                ("grpc_service", service),
                ("grpc_method", method),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(grpc("ListSessions", "UNAUTHENTICATED"), 1.0);
    assert_eq!(grpc("ListSessions", "OK"), 1.0);
    assert_eq!(grpc("unknown", "UNIMPLEMENTED"), 1.0);
    // No path became a label.
    assert!(
        !after.iter().any(|((_, labels), _)| labels
            .values()
            .any(|v| v.contains("NoSuchMethod") || v.contains("/42"))),
        "an id or a client's path became a label"
    );

    // Sessions: one up, one backing off; every attempt either came up or failed.
    let state = |state: &str| value(&after, "kas_gateway_agent_sessions", &[("state", state)]);
    assert_eq!(state("connected"), 1.0);
    assert_eq!(state("connecting") + state("backing_off"), 1.0);
    assert_eq!(state("failed"), 0.0);
    assert_eq!(
        value(&after, "kas_gateway_sessions_established_total", &[]),
        1.0
    );
    let refusals = value(
        &after,
        "kas_gateway_dial_failures_total",
        &[("cause", "refused")],
    );
    let attempts = value(&after, "kas_gateway_dial_attempts_total", &[]);
    let failures: f64 = after
        .iter()
        .filter(|((name, _), _)| name == "kas_gateway_dial_failures_total")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failures, refusals, "only refusals failed");
    // The refused agent's attempt in progress, if any, is counted but not finished yet.
    assert!(
        attempts == 1.0 + refusals || attempts == 2.0 + refusals,
        "attempts {attempts}, refusals {refusals}"
    );
    assert_eq!(
        value(
            &after,
            "kas_gateway_dial_handshake_duration_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "kas_gateway_session_hello_duration_seconds_count",
            &[]
        ),
        1.0
    );
    // The process's own figures.
    assert!(value(&after, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&after, "process_open_fds", &[]) > 5.0);
    // SQLite: one connection, and the pool's waits recorded.
    assert_eq!(
        value(&after, "kas_gateway_database_connections_max", &[]),
        10.0
    );
    assert!(
        value(
            &after,
            "kas_gateway_database_acquire_wait_seconds_count",
            &[]
        ) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_timed() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = with_token(dir.path(), TOKEN);
    command.env("KAS_GATEWAY_DIALER_HEARTBEAT_SECONDS", "1");
    let gateway = Gateway::start(command);
    let (_, project) = send(
        Method::POST,
        &gateway.url("/api/v4/projects"),
        TOKEN,
        Some(json!({"name": "p"})),
    )
    .await;
    let agents = format!("/api/v4/projects/{}/cluster_agents", project["id"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (agent_token, config) = receptive_agent(
        &gateway,
        TOKEN,
        &agents,
        "a",
        &format!("grpc://127.0.0.1:{port}"),
    )
    .await;
    let _sim = jwt_sim(agent_token, &config, listener);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let samples = scrape(&gateway).await;
        let round_trips = value(
            &samples,
            "kas_gateway_heartbeat_round_trip_seconds_count",
            &[],
        );
        if round_trips >= 2.0 {
            // Loopback: well under the smallest buckets but one.
            let fast = value(
                &samples,
                "kas_gateway_heartbeat_round_trip_seconds_bucket",
                &[("le", "0.1")],
            );
            assert!(
                fast >= 2.0,
                "{fast} of {round_trips} round trips under 100 ms"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no heartbeat timed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The session's lines carry its span: the agent's lines can be followed.
    let changes: Vec<Value> = gateway
        .log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == "agent connection changed")
        .collect();
    assert!(!changes.is_empty(), "{changes:?}");
    for change in changes {
        assert_eq!(change["span"]["name"], "session", "{change}");
        assert_eq!(change["span"]["agent_id"], config["agent_id"], "{change}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_round_trip_into_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(with_token(dir.path(), TOKEN));
    let client = reqwest::Client::new();
    // Given: returned as it is, and on the request's log line.
    let response = client
        .get(gateway.url("/api/v4/user"))
        .header("Private-Token", TOKEN)
        .header("X-Request-Id", "req-4711.test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-4711.test");
    // Not given, or unusable: a new one.
    let mut generated = Vec::new();
    let long = "x".repeat(200);
    for given in [None, Some("has spaces in it"), Some(long.as_str())] {
        let mut request = client.get(gateway.url("/api/v4/version"));
        request = request.header("Private-Token", TOKEN);
        if let Some(given) = given {
            request = request.header("X-Request-Id", given);
        }
        let response = request.send().await.unwrap();
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        generated.push(id);
    }
    generated.dedup();
    assert_eq!(generated.len(), 3, "ids repeat");
    // gRPC: the id comes back in the response headers, and the call is logged with its code.
    let channel = tonic::transport::Channel::from_shared(gateway.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::GetSessionRequest { agent_id: 999 });
    request
        .metadata_mut()
        .insert("private-token", TOKEN.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-request-id", "grpc-call-1".parse().unwrap());
    let status = pb::sessions_client::SessionsClient::new(channel)
        .get_session(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(
        status.metadata().get("x-request-id"),
        Some(&"grpc-call-1".parse().unwrap()),
        "{status:?}"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines: Vec<Value> = gateway
        .log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let request_id = |line: &Value| line["span"]["request_id"].as_str().map(str::to_owned);
    let rest: Vec<&Value> = lines
        .iter()
        .filter(|l| request_id(l).as_deref() == Some("req-4711.test"))
        .collect();
    assert!(
        rest.iter().any(|l| l["message"] == "request"
            && l["status"] == 200
            && l["route"] == "/api/v4/user"),
        "{rest:?}"
    );
    let grpc: Vec<&Value> = lines
        .iter()
        .filter(|l| request_id(l).as_deref() == Some("grpc-call-1"))
        .collect();
    let call = grpc.iter().find(|l| l["message"] == "call").unwrap();
    assert_eq!(call["grpc_code"], "NOT_FOUND");
    assert_eq!(call["grpc_service"], "kas_gateway.v1.Sessions");
    assert_eq!(call["grpc_method"], "GetSession");
    // The log line says NOT_FOUND, not the HTTP status the call had (200).
    assert!(
        !lines.iter().any(|l| l["message"] == "request"
            && l["route"]
                .as_str()
                .is_some_and(|r| r.starts_with("/kas_gateway"))),
        "a gRPC call was logged as an HTTP request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_the_probe_command() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(with_token(dir.path(), TOKEN));
    for path in ["/liveness", "/readiness"] {
        let response = reqwest::get(gateway.ops_url(path)).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let probe = |addr: &str, extra: &[&str]| {
        std::process::Command::new(BIN)
            .env_clear()
            .env("KAS_GATEWAY_DATA_DIR", dir.path())
            .env("KAS_GATEWAY_OBSERVABILITY_LISTEN", addr)
            .arg("probe")
            .args(extra)
            .output()
            .unwrap()
    };
    let ready = probe(&gateway.ops_addr, &[]);
    assert!(ready.status.success(), "{ready:?}");
    assert_eq!(
        String::from_utf8_lossy(&ready.stdout),
        "/readiness: 200 OK\n"
    );
    // A wildcard listener is asked on the loopback address.
    let port = gateway.ops_addr.rsplit_once(':').unwrap().1;
    let alive = probe(&format!("0.0.0.0:{port}"), &["--liveness"]);
    assert!(alive.status.success(), "{alive:?}");
    // Nobody there: a failure in one line.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap().to_string();
    drop(closed);
    let down = probe(&nobody, &[]);
    assert!(!down.status.success());
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(stderr.starts_with("error: connecting to"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
