//! Where the gateway refuses to dial: an address in a refused network is refused when the
//! configuration is created (on the real binary, default list), and a name that resolves to
//! one, or a stored address refused by a later setting, is never connected to, with a
//! `last_error` that says why (a real gateway over loopback, with the list adjusted).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::binary::{on_backend, project_and_agent, send, with_token};
use common::{Backend, Gateway, ROOT_TOKEN};
use kas_gateway::dialer::parse_denied_networks;
use reqwest::Method;
use rstest::rstest;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const TOKEN: &str = "glpat-dial-targets-test-token-000";
const SETTING: &str = "(KAS_GATEWAY_DIALER_DENIED_NETWORKS)";

fn refused(addr: &str, network: &str) -> Value {
    let message = format!("Url points to a refused destination: {addr} is in {network}");
    json!({"message": format!("400 Bad request - [{}]", serde_json::to_string(&message).unwrap())})
}

#[rstest]
#[tokio::test]
async fn refused_addresses_are_refused_at_create(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some((command, _pg)) = on_backend(with_token(dir.path(), TOKEN), backend).await else {
        return;
    };
    let gateway = common::binary::Gateway::start(command);
    let (agents, agent) = project_and_agent(&gateway, TOKEN).await;
    let configs = gateway.url(&format!("{agents}/{}/url_configurations", agent["id"]));
    let cases = [
        (
            "grpc://169.254.169.254:4242",
            "169.254.169.254",
            "169.254.0.0/16",
        ),
        (
            "grpc://[::ffff:169.254.169.254]:4242",
            "::ffff:169.254.169.254",
            "169.254.0.0/16",
        ),
        // What getaddrinfo would read as 169.254.169.254.
        (
            "grpc://0xa9fea9fe:4242",
            "169.254.169.254",
            "169.254.0.0/16",
        ),
        ("grpc://169.254.43518", "169.254.169.254", "169.254.0.0/16"),
        ("grpcs://[fe80::1]", "fe80::1", "fe80::/10"),
        ("grpc://0.0.0.0:4242", "0.0.0.0", "0.0.0.0/8"),
        ("grpc://[::]:4242", "::", "::/128"),
        ("grpc://224.0.0.1:4242", "224.0.0.1", "224.0.0.0/4"),
        ("grpc://[ff02::1]:4242", "ff02::1", "ff00::/8"),
        (
            "grpc://255.255.255.255:4242",
            "255.255.255.255",
            "255.255.255.255/32",
        ),
    ];
    for (url, addr, network) in cases {
        let (status, body) = send(Method::POST, &configs, TOKEN, Some(json!({ "url": url }))).await;
        assert_eq!((status, body), (400, refused(addr, network)), "for {url}");
    }
    let (status, listed) = send(Method::GET, &configs, TOKEN, None).await;
    assert_eq!((status, listed), (200, json!([])));

    // Receptive agents live on private networks and, in tests, on loopback.
    for (i, url) in [
        "grpc://127.0.0.1:4242",
        "grpc://[::1]:4242",
        "grpc://10.0.0.1:4242",
        "grpcs://192.168.1.10",
        "grpcs://[fd12:3456::1]:443",
    ]
    .iter()
    .enumerate()
    {
        let (_, other) = send(
            Method::POST,
            &gateway.url(&agents),
            TOKEN,
            Some(json!({"name": format!("allowed-{i}")})),
        )
        .await;
        let path = gateway.url(&format!("{agents}/{}/url_configurations", other["id"]));
        let (status, created) = send(Method::POST, &path, TOKEN, Some(json!({ "url": url }))).await;
        assert_eq!((status, &created["url"]), (201, &json!(url)));
    }
}

async fn gateway_refusing(backend: Backend, networks: &str) -> Option<Gateway> {
    let denied = parse_denied_networks(networks).unwrap();
    Gateway::start_with(backend, |config| {
        config.dialer.denied_networks = denied;
        config.dialer.backoff.base = Duration::from_millis(100);
        config.dialer.backoff.max = Duration::from_millis(300);
        config.dialer.connect_timeout = Duration::from_secs(2);
    })
    .await
}

async fn connection(gw: &Gateway, project: i64, agent: i64) -> Value {
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/connection"),
    )
    .await
    .expect_status(200)
    .clone()
}

/// Polls the connection until `done`, for at most 15 s.
async fn wait_for(gw: &Gateway, project: i64, agent: i64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let state = connection(gw, project, agent).await;
        if done(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting; last state {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether anything connected to `listener` within `within`.
async fn connected(listener: &TcpListener, within: Duration) -> bool {
    tokio::time::timeout(within, listener.accept())
        .await
        .is_ok()
}

/// `localhost` passes the create-time check (it is a name), and its addresses are refused
/// when dialled: the agent backs off with the reason, and the port is never touched.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_resolve_to_refused_addresses_are_never_dialled(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(gw) = gateway_refusing(backend, "127.0.0.0/8,::1/128").await else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let project = gw.project(ROOT_TOKEN, "p").await;
    let agent = gw.agent(project, "a").await;
    gw.post(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations"),
        json!({"url": format!("grpc://localhost:{port}")}),
    )
    .await
    .expect_status(201);

    let state = wait_for(&gw, project, agent, |s| !s["last_error"].is_null()).await;
    let error = state["last_error"].as_str().unwrap();
    assert_eq!(state["state"], "backing_off", "{state}");
    assert!(error.starts_with("refused destination"), "{error}");
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert!(error.ends_with(SETTING), "{error}");
    // Over several more attempts (the backoff is at most 300 ms here), nothing reaches the
    // port either.
    assert!(!connected(&listener, Duration::from_secs(1)).await);
    assert_eq!(
        connection(&gw, project, agent).await["state"],
        "backing_off"
    );
}

/// A configuration stored while its address was allowed, then refused by the setting after a
/// restart: it fails for good (no retries) and is never connected to.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_addresses_refused_later_fail_without_a_connection(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(mut gw) = gateway_refusing(backend, "169.254.0.0/16").await else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let project = gw.project(ROOT_TOKEN, "p").await;
    let agent = gw.agent(project, "a").await;
    gw.post(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations"),
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await
    .expect_status(201);
    // Allowed: the dialer reaches the port.
    assert!(connected(&listener, Duration::from_secs(10)).await);

    gw.stop().await;
    // Connections queued before the stop are not the restarted gateway's.
    while connected(&listener, Duration::from_millis(200)).await {}
    gw.config.dialer.denied_networks = parse_denied_networks("127.0.0.0/8").unwrap();
    gw.restart().await;

    let state = wait_for(&gw, project, agent, |s| s["state"] == "failed").await;
    assert_eq!(
        state["last_error"],
        json!(format!("refused destination 127.0.0.1:{port} {SETTING}")),
        "{state}"
    );
    assert!(!connected(&listener, Duration::from_secs(1)).await);
    assert_eq!(connection(&gw, project, agent).await["state"], "failed");
}

/// The setting on the real binary: `localhost` refused through
/// `KAS_GATEWAY_DIALER_DENIED_NETWORKS` is never connected to, and a malformed list stops the
/// gateway at start with a message that names the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_setting_refuses_on_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let output = with_token(dir.path(), TOKEN)
        .env("KAS_GATEWAY_DIALER_DENIED_NETWORKS", "10.0.0.0/33")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("denied networks"), "{stderr}");

    let mut command = with_token(dir.path(), TOKEN);
    command.env("KAS_GATEWAY_DIALER_DENIED_NETWORKS", "127.0.0.0/8,::1/128");
    let gateway = common::binary::Gateway::start(command);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (agents, agent) = project_and_agent(&gateway, TOKEN).await;
    let base = format!("{agents}/{}", agent["id"]);
    let (status, _) = send(
        Method::POST,
        &gateway.url(&format!("{base}/url_configurations")),
        TOKEN,
        Some(json!({"url": format!("grpc://localhost:{port}")})),
    )
    .await;
    assert_eq!(status, 201);
    let deadline = Instant::now() + Duration::from_secs(15);
    let state = loop {
        let (_, state) = send(
            Method::GET,
            &gateway.url(&format!("{base}/connection")),
            TOKEN,
            None,
        )
        .await;
        if !state["last_error"].is_null() {
            break state;
        }
        assert!(
            Instant::now() < deadline,
            "no attempt was reported: {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = state["last_error"].as_str().unwrap();
    assert!(error.starts_with("refused destination"), "{error}");
    assert!(!connected(&listener, Duration::from_millis(500)).await);
}
