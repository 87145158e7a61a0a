//! The dialer end to end: the real gateway dials simulated agents over loopback with real
//! TLS (certificates made with rcgen here), JWT and mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Backend, Gateway, ROOT_TOKEN, START};
use kas_gateway::agent_sim::{AgentSim, AgentSimConfig, SimEvents};
use kas_gateway::certs::{DevCa, Pair};
use kas_gateway::proto::agent::v1 as pb;
use rstest::rstest;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::net::TcpListener;

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(START.as_secs()).unwrap()
}

struct Pki {
    ca: DevCa,
    server: Pair,
}

fn pki() -> Pki {
    let ca = DevCa::new("agents CA", now()).unwrap();
    let server = ca.server(&["localhost", "127.0.0.1"], now()).unwrap();
    Pki { ca, server }
}

async fn fast_gateway(backend: Backend) -> Option<Gateway> {
    Gateway::start_with(backend, |config| {
        config.dialer.backoff.base = Duration::from_millis(100);
        config.dialer.backoff.max = Duration::from_millis(500);
        config.dialer.heartbeat_interval = Duration::from_millis(200);
        config.dialer.connect_timeout = Duration::from_secs(2);
        config.dialer.hello_timeout = Duration::from_secs(2);
    })
    .await
}

/// A project, an agent and its token.
async fn new_agent(gw: &Gateway, name: &str) -> (i64, i64, String) {
    let project = match gw
        .get(ROOT_TOKEN, "/api/v4/projects/root%2Fp")
        .await
        .status
        .as_u16()
    {
        200 => gw.get(ROOT_TOKEN, "/api/v4/projects/root%2Fp").await.body["id"]
            .as_i64()
            .unwrap(),
        _ => gw.project(ROOT_TOKEN, "p").await,
    };
    let agent = gw.agent(project, name).await;
    let (_, token) = gw.agent_token(project, agent, "t").await;
    (project, agent, token)
}

fn sim_config(gw: &Gateway, token: &str) -> AgentSimConfig {
    AgentSimConfig {
        token: token.to_owned(),
        tls: None,
        client_ca: None,
        jwt_public_key: None,
        jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
        metadata: pb::AgentMetadata {
            version: "v17.6.0".into(),
            commit: "abc123".into(),
            pod_namespace: "gitlab-agent".into(),
            pod_name: "agentk-0".into(),
            kubernetes_version: "v1.31.0".into(),
        },
        clock: gw.clock.clone(),
    }
}

async fn connection(gw: &Gateway, project: i64, agent: i64) -> Value {
    let reply = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent}/connection"),
        )
        .await;
    reply.expect_status(200).clone()
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

fn is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["state"] == state
}

fn error_contains(text: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["last_error"].as_str().is_some_and(|e| e.contains(text))
}

async fn configure(gw: &Gateway, project: i64, agent: i64, body: Value) -> Value {
    gw.post(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations"),
        body,
    )
    .await
    .expect_status(201)
    .clone()
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_over_grpcs(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let pki = pki();
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpcs://localhost:{port}"), "ca_cert": pki.ca.pair().cert}),
    )
    .await;
    let mut sim = sim_config(&gw, &token);
    sim.tls = Some((pki.server.cert.clone(), pki.server.key.clone()));
    sim.jwt_public_key = Some(config["public_key"].as_str().unwrap().to_owned());
    let sim = AgentSim::start(sim, listener).unwrap();

    let state = wait_for(&gw, project, agent, is("connected")).await;
    assert_eq!(state["agent"]["pod_name"], "agentk-0");
    assert_eq!(state["agent"]["version"], "v17.6.0");
    assert_eq!(state["url"], format!("grpcs://localhost:{port}"));
    assert_eq!(state["connected_since"], START.to_iso8601());
    assert_eq!(state["last_error"], Value::Null);
    assert!(SimEvents::read(&sim.events.jwt_rejections).is_empty());
    // The token's use is recorded, lazily as GitLab does: within about a second (uses are
    // written in batches).
    let tokens = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens"),
        )
        .await;
    let token_id = tokens.body[0]["id"].as_i64().unwrap();
    let recorded = Instant::now();
    let detail = loop {
        let detail = gw
            .get(
                ROOT_TOKEN,
                &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens/{token_id}"),
            )
            .await;
        if !detail.body["last_used_at"].is_null() || recorded.elapsed() > Duration::from_secs(10) {
            break detail;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(detail.body["last_used_at"], START.to_iso8601());
    // Heartbeats flow.
    let pongs = sim.events.pongs.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(sim.events.pongs.load(std::sync::atomic::Ordering::SeqCst) > pongs);
    // A request through the live session.
    let response = gw
        .service()
        .sessions()
        .request(agent, "ping", b"hello".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(response.payload, b"hello");
    sim.stop().await;
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_over_cleartext_grpc(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    let mut sim = sim_config(&gw, &token);
    sim.jwt_public_key = Some(config["public_key"].as_str().unwrap().to_owned());
    let sim = AgentSim::start(sim, listener).unwrap();
    wait_for(&gw, project, agent, is("connected")).await;
    sim.stop().await;
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let pki = pki();
    let client = pki.ca.client("gateway", now()).unwrap();
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut sim = sim_config(&gw, &token);
    sim.tls = Some((pki.server.cert.clone(), pki.server.key.clone()));
    sim.client_ca = Some(pki.ca.pair().cert);
    let sim = AgentSim::start(sim, listener).unwrap();
    configure(
        &gw,
        project,
        agent,
        json!({
            "url": format!("grpcs://127.0.0.1:{port}"), "ca_cert": pki.ca.pair().cert,
            "client_cert": client.cert, "client_key": client.key,
        }),
    )
    .await;
    wait_for(&gw, project, agent, is("connected")).await;
    sim.stop().await;
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_credential_errors_in_plain_words(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let pki = pki();
    let other_ca = DevCa::new("someone else", now()).unwrap();
    let stranger = other_ca.client("gateway", now()).unwrap();

    // An agent whose certificate is signed by a CA the gateway does not trust.
    let (project, a1, token1) = new_agent(&gw, "unknown-ca").await;
    let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p1 = l1.local_addr().unwrap().port();
    let mut sim = sim_config(&gw, &token1);
    sim.tls = Some((pki.server.cert.clone(), pki.server.key.clone()));
    let s1 = AgentSim::start(sim, l1).unwrap();
    configure(
        &gw,
        project,
        a1,
        json!({"url": format!("grpcs://localhost:{p1}"), "ca_cert": other_ca.pair().cert}),
    )
    .await;

    // The wrong name.
    let (_, a2, token2) = new_agent(&gw, "wrong-name").await;
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p2 = l2.local_addr().unwrap().port();
    let mut sim = sim_config(&gw, &token2);
    sim.tls = Some((pki.server.cert.clone(), pki.server.key.clone()));
    let s2 = AgentSim::start(sim, l2).unwrap();
    configure(
        &gw,
        project,
        a2,
        json!({"url": format!("grpcs://localhost:{p2}"), "ca_cert": pki.ca.pair().cert, "tls_host": "agent.elsewhere"}),
    )
    .await;

    // A client certificate the agent does not trust.
    let (_, a3, token3) = new_agent(&gw, "bad-client").await;
    let l3 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p3 = l3.local_addr().unwrap().port();
    let mut sim = sim_config(&gw, &token3);
    sim.tls = Some((pki.server.cert.clone(), pki.server.key.clone()));
    sim.client_ca = Some(pki.ca.pair().cert);
    let s3 = AgentSim::start(sim, l3).unwrap();
    configure(
        &gw,
        project,
        a3,
        json!({"url": format!("grpcs://localhost:{p3}"), "ca_cert": pki.ca.pair().cert, "client_cert": stranger.cert, "client_key": stranger.key}),
    )
    .await;

    // Nobody listening.
    let (_, a4, _) = new_agent(&gw, "refused").await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p4 = closed.local_addr().unwrap().port();
    drop(closed);
    configure(
        &gw,
        project,
        a4,
        json!({"url": format!("grpc://127.0.0.1:{p4}")}),
    )
    .await;

    // A name that does not resolve.
    let (_, a5, _) = new_agent(&gw, "no-dns").await;
    configure(&gw, project, a5, json!({"url": "grpc://agent.invalid:443"})).await;

    // The error stays while the next attempt is under way: wait for it with the phase.
    let unknown_ca = error_contains("unknown CA");
    wait_for(&gw, project, a1, |s| {
        unknown_ca(s) && s["state"] == "backing_off"
    })
    .await;
    wait_for(
        &gw,
        project,
        a2,
        error_contains("not valid for the name agent.elsewhere"),
    )
    .await;
    wait_for(
        &gw,
        project,
        a3,
        error_contains("rejected the client certificate"),
    )
    .await;
    // Under TLS 1.3 the agent's refusal of the client certificate arrives after the
    // handshake, on the first read: every attempt must still say so, not "transport error".
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let state = connection(&gw, project, a3).await;
        if let Some(error) = state["last_error"].as_str() {
            seen.insert(error.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|e| e.starts_with("TLS: the agent rejected the client certificate")),
        "errors seen for a rejected client certificate: {seen:?}"
    );
    wait_for(&gw, project, a4, error_contains("connection refused")).await;
    wait_for(
        &gw,
        project,
        a5,
        error_contains("DNS lookup of agent.invalid failed"),
    )
    .await;
    for sim in [s1, s2, s3] {
        sim.stop().await;
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_refuse_bad_jwts(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    // The agent holds another key pair's public key.
    let (_, wrong_public) =
        kas_gateway::crypto::x509::generate_ed25519(&ring::rand::SystemRandom::new()).unwrap();
    let mut sim = sim_config(&gw, &token);
    sim.jwt_public_key = Some(kas_gateway::crypto::x509::base64(&wrong_public));
    let sim = AgentSim::start(sim, listener).unwrap();
    wait_for(
        &gw,
        project,
        agent,
        error_contains("rejected the gateway's credentials (JWT)"),
    )
    .await;
    assert!(
        SimEvents::read(&sim.events.jwt_rejections)
            .iter()
            .any(|r| r == "invalid signature")
    );
    sim.stop().await;

    // Right key, but the agent's clock is a minute ahead: the 5-second JWT has expired.
    let (project, agent2, token2) = new_agent(&gw, "late").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = configure(
        &gw,
        project,
        agent2,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    let mut sim = sim_config(&gw, &token2);
    sim.jwt_public_key = Some(config["public_key"].as_str().unwrap().to_owned());
    let late = Arc::new(kas_gateway::clock::ManualClock::new(
        START.plus_millis(60_000),
    ));
    sim.clock = late;
    let sim = AgentSim::start(sim, listener).unwrap();
    wait_for(
        &gw,
        project,
        agent2,
        error_contains("JWT rejected: token expired"),
    )
    .await;
    sim.stop().await;

    // Right key and time, but the agent expects another audience.
    let (project, agent3, token3) = new_agent(&gw, "elsewhere").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = configure(
        &gw,
        project,
        agent3,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    let mut sim = sim_config(&gw, &token3);
    sim.jwt_public_key = Some(config["public_key"].as_str().unwrap().to_owned());
    sim.jwt_audience = "another-service".into();
    let sim = AgentSim::start(sim, listener).unwrap();
    wait_for(
        &gw,
        project,
        agent3,
        error_contains("JWT rejected: wrong audience"),
    )
    .await;
    sim.stop().await;
}

/// A configuration this gateway was not told about (another replica created it) is picked
/// up by the periodic resync.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_repairs_drift(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(gw) = Gateway::start_with(backend, |config| {
        config.dialer.backoff.base = Duration::from_millis(100);
        config.dialer.resync_interval = Duration::from_millis(300);
    })
    .await
    else {
        return;
    };
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sim = AgentSim::start(sim_config(&gw, &token), listener).unwrap();
    // Another service over the same database: its changes do not wake this dialer.
    let (_, other) = kas_gateway::server::open_service(&gw.config, gw.clock.clone())
        .await
        .unwrap();
    let operator = kas_gateway::domain::Caller::operator();
    other
        .create_url_configuration(
            &operator,
            &kas_gateway::domain::ProjectRef::Id(project),
            agent,
            kas_gateway::domain::UrlConfigurationInput {
                url: format!("grpc://127.0.0.1:{port}"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    wait_for(&gw, project, agent, is("connected")).await;
    sim.stop().await;
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_tokens_are_checked(#[values(Backend::Sqlite, Backend::Postgres)] backend: Backend) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let (_, _other_agent, other_token) = agent_in(&gw, project, "other").await;
    // Presents another agent's token.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sim = AgentSim::start(sim_config(&gw, &other_token), listener).unwrap();
    configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    wait_for(
        &gw,
        project,
        agent,
        error_contains("provided agent token belongs to a different agent id"),
    )
    .await;
    assert!(
        SimEvents::read(&sim.events.refused)
            .iter()
            .any(|m| m == "provided agent token belongs to a different agent id")
    );
    sim.stop().await;

    // The right token connects; revoking it closes the session, and the agent is refused.
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let sim = AgentSim::start(sim_config(&gw, &token), listener).unwrap();
    wait_for(&gw, project, agent, is("connected")).await;
    let tokens = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens"),
        )
        .await;
    let token_id = tokens.body[0]["id"].as_i64().unwrap();
    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens/{token_id}"),
    )
    .await
    .expect_status(204);
    wait_for(
        &gw,
        project,
        agent,
        error_contains("agent token rejected: the agent token is unknown or revoked"),
    )
    .await;
    sim.stop().await;
}

async fn agent_in(gw: &Gateway, project: i64, name: &str) -> (i64, i64, String) {
    let agent = gw.agent(project, name).await;
    let (_, token) = gw.agent_token(project, agent, "t").await;
    (project, agent, token)
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_hangs_up_and_comes_back(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(mut gw) = fast_gateway(backend).await else {
        return;
    };
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    let sim = AgentSim::start(sim_config(&gw, &token), listener).unwrap();
    wait_for(&gw, project, agent, is("connected")).await;

    // Agent killed: the session drops; restarted: the gateway reconnects within the backoff.
    sim.stop().await;
    wait_for(&gw, project, agent, |v| v["state"] != "connected").await;
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let sim = AgentSim::start(sim_config(&gw, &token), listener).unwrap();
    wait_for(&gw, project, agent, is("connected")).await;

    // Gateway restarted: the session comes back.
    gw.restart().await;
    wait_for(&gw, project, agent, is("connected")).await;

    // Configuration deleted: hung up within a second.
    let id = config["id"].as_i64().unwrap();
    let started = Instant::now();
    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/url_configurations/{id}"),
    )
    .await
    .expect_status(204);
    while sim
        .events
        .open_sessions
        .load(std::sync::atomic::Ordering::SeqCst)
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "still connected after a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.get(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/connection"),
    )
    .await
    .expect(404, json!({"message": "404 Not Found"}));

    // A new configuration is dialled within a second; deleting the agent hangs up.
    let started = Instant::now();
    configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    wait_for(&gw, project, agent, is("connected")).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "dialled after {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}"),
    )
    .await
    .expect_status(204);
    while sim
        .events
        .open_sessions
        .load(std::sync::atomic::Ordering::SeqCst)
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "still connected after a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sim.stop().await;
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_timeout_drops_and_redials(#[values(Backend::Sqlite)] backend: Backend) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    let sim = AgentSim::start(sim_config(&gw, &token), listener).unwrap();
    wait_for(&gw, project, agent, is("connected")).await;
    sim.events
        .mute
        .store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for(&gw, project, agent, error_contains("no heartbeat reply")).await;
    sim.events
        .mute
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let state = wait_for(&gw, project, agent, is("connected")).await;
    assert_eq!(state["last_error"], Value::Null);
    assert!(
        sim.events
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2
    );
    sim.stop().await;
}

/// An agent that accepts TCP and never speaks, whose configuration is then deleted, holds up
/// no one: another agent's new configuration is dialled at once, and a revoked token still
/// closes its session at once.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_holds_up_no_one(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    // The connect and hello timeouts keep their defaults (10 s): the silent agent would hold
    // each attempt that long.
    let Some(gw) = Gateway::start_with(backend, |config| {
        config.dialer.backoff.base = Duration::from_millis(100);
        config.dialer.backoff.max = Duration::from_millis(500);
        config.dialer.heartbeat_interval = Duration::from_millis(200);
    })
    .await
    else {
        return;
    };
    let (project, silent_agent, _) = new_agent(&gw, "silent").await;
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
            let _ = accepted_tx.send(());
        }
    });
    let silent_config = configure(
        &gw,
        project,
        silent_agent,
        json!({"url": format!("grpc://127.0.0.1:{silent_port}")}),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), accepted.recv())
        .await
        .expect("the gateway never dialled the silent agent");
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.delete(
        ROOT_TOKEN,
        &format!(
            "/api/v4/projects/{project}/cluster_agents/{silent_agent}/url_configurations/{}",
            silent_config["id"]
        ),
    )
    .await
    .expect_status(204);

    let (_, agent, token) = agent_in(&gw, project, "other").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = Instant::now();
    let config = configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    let mut sim = sim_config(&gw, &token);
    sim.jwt_public_key = Some(config["public_key"].as_str().unwrap().to_owned());
    let sim = AgentSim::start(sim, listener).unwrap();
    wait_for(&gw, project, agent, is("connected")).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the new configuration took {took:?} to connect"
    );

    let tokens = gw
        .get(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens"),
        )
        .await;
    let token_id = tokens.body[0]["id"].as_i64().unwrap();
    let revoked = Instant::now();
    gw.delete(
        ROOT_TOKEN,
        &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens/{token_id}"),
    )
    .await
    .expect_status(204);
    wait_for(&gw, project, agent, error_contains("agent token rejected")).await;
    let took = revoked.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the revoked token's session took {took:?} to close"
    );
    sim.stop().await;
    holder.abort();
}

/// A database outage while an agent is being redialled is not the configuration's fault: the
/// agent keeps backing off (never `failed`) and connects once both are back.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_never_fails_an_agent(#[values(Backend::Postgres)] backend: Backend) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let (project, agent, token) = new_agent(&gw, "agent").await;
    // Nothing listens there yet: the agent backs off.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    wait_for(&gw, project, agent, is("backing_off")).await;

    let name = gw.pg.as_ref().unwrap().name.clone();
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&common::postgres_admin_url())
            .await
            .unwrap();
    let run = |sql: String| sqlx::query(sqlx::AssertSqlSafe(sql));
    run(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .unwrap();
    run(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    // Several attempts (at most 500 ms apart) happen while the database is away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    run(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .unwrap();

    let state = connection(&gw, project, agent).await;
    assert_ne!(state["state"], "failed", "{state}");
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut sim = sim_config(&gw, &token);
    sim.jwt_public_key = Some(config["public_key"].as_str().unwrap().to_owned());
    let sim = AgentSim::start(sim, listener).unwrap();
    wait_for(&gw, project, agent, is("connected")).await;
    sim.stop().await;
}

/// An agent that answers the session call but misbehaves: sends `first` instead of a hello
/// (or nothing at all), and records what the gateway sends it.
#[derive(Clone)]
struct Misbehaving {
    first: Option<pb::AgentMessage>,
    received: Arc<std::sync::Mutex<Vec<pb::GatewayMessage>>>,
}

type MisbehavingStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::AgentMessage, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::receptive_agent_server::ReceptiveAgent for Misbehaving {
    type SessionStream = MisbehavingStream;
    type TunnelStream = kas_gateway::agent::TunnelStream;

    async fn tunnel(
        &self,
        _request: tonic::Request<tonic::Streaming<pb::TunnelRequest>>,
    ) -> Result<tonic::Response<Self::TunnelStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("a misbehaving agent"))
    }

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<pb::GatewayMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let received = Arc::clone(&self.received);
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                received.lock().unwrap().push(message);
            }
        });
        let first = self.first.clone();
        let outbound = async_stream_once(first);
        Ok(tonic::Response::new(outbound))
    }
}

/// `first` (if any), then silence until the gateway hangs up.
fn async_stream_once(first: Option<pb::AgentMessage>) -> MisbehavingStream {
    use tokio_stream::StreamExt;
    let head = tokio_stream::iter(first.into_iter().map(Ok));
    Box::pin(head.chain(tokio_stream::pending()))
}

async fn misbehaving_agent(first: Option<pb::AgentMessage>) -> (u16, Misbehaving) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let agent = Misbehaving {
        first,
        received: Arc::default(),
    };
    let service = pb::receptive_agent_server::ReceptiveAgentServer::new(agent.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (port, agent)
}

/// An agent that starts with anything but a hello is told why (`Refused`, code `PROTOCOL`)
/// and can read it before the stream ends; one that never says hello is hung up after the
/// hello timeout, and `last_error` says so.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_do_not_say_hello(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(gw) = fast_gateway(backend).await else {
        return;
    };
    let pong = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Pong(pb::Pong { nonce: 7 })),
    };
    let (port, rude) = misbehaving_agent(Some(pong)).await;
    let (project, agent, _) = new_agent(&gw, "rude").await;
    configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    wait_for(
        &gw,
        project,
        agent,
        error_contains("the agent did not start with a hello"),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let refusal = loop {
        let found = rude
            .received
            .lock()
            .unwrap()
            .iter()
            .find_map(|m| match &m.message {
                Some(pb::gateway_message::Message::Refused(refused)) => Some(refused.clone()),
                _ => None,
            });
        if let Some(refused) = found {
            break refused;
        }
        assert!(Instant::now() < deadline, "the agent never read a refusal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refusal.code(), pb::refused::Code::Protocol);
    assert_eq!(refusal.message, "expected a hello");

    let (port, _silent) = misbehaving_agent(None).await;
    let (_, agent, _) = new_agent(&gw, "mute").await;
    configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    let state = wait_for(&gw, project, agent, error_contains("hello")).await;
    assert_eq!(
        state["last_error"],
        "the agent sent no hello within 2 s (the hello timeout)"
    );
}

/// After a restart the dialer reads the credentials of every agent in one go; a secret that
/// cannot be decrypted fails its own agent only, and the others connect.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_secret_fails_only_its_agent(
    #[values(Backend::Sqlite, Backend::Postgres)] backend: Backend,
) {
    let Some(mut gw) = fast_gateway(backend).await else {
        return;
    };
    let pki = pki();
    let mut agents = Vec::new();
    let mut sims = Vec::new();
    for name in ["good", "bad"] {
        let client = pki.ca.client("gateway", now()).unwrap();
        let (project, agent, token) = new_agent(&gw, name).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut sim = sim_config(&gw, &token);
        sim.tls = Some((pki.server.cert.clone(), pki.server.key.clone()));
        sim.client_ca = Some(pki.ca.pair().cert);
        sims.push(AgentSim::start(sim, listener).unwrap());
        let config = configure(
            &gw,
            project,
            agent,
            json!({
                "url": format!("grpcs://127.0.0.1:{port}"), "ca_cert": pki.ca.pair().cert,
                "client_cert": client.cert, "client_key": client.key,
            }),
        )
        .await;
        wait_for(&gw, project, agent, is("connected")).await;
        agents.push((project, agent, config["id"].as_i64().unwrap()));
    }
    gw.stop().await;
    let store = kas_gateway::store::connect(gw.config.database_url.expose(), 1)
        .await
        .unwrap();
    let sealed = store
        .url_configuration_secret(agents[1].2)
        .await
        .unwrap()
        .unwrap();
    let mut spoiled = sealed.envelope.clone();
    let last = spoiled.len() - 1;
    spoiled[last] ^= 1;
    assert!(
        store
            .replace_sealed_secret(&sealed, &spoiled)
            .await
            .unwrap()
    );
    drop(store);
    gw.restart().await;
    let (project, agent, _) = agents[0];
    wait_for(&gw, project, agent, is("connected")).await;
    let (project, agent, _) = agents[1];
    wait_for(&gw, project, agent, error_contains("cannot be decrypted")).await;
    assert_eq!(connection(&gw, project, agent).await["state"], "failed");
    for sim in sims {
        sim.stop().await;
    }
}

/// Forwards TCP to `to` until frozen; frozen, it reads and writes nothing more but keeps every
/// connection open: an agent whose network went away without a word.
async fn freezable_proxy(to: std::net::SocketAddr) -> (u16, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let frozen = Arc::new(AtomicBool::new(false));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let flag = Arc::clone(&frozen);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(to).await.unwrap();
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            for (mut from, mut into) in [(in_read, out_write), (out_read, in_write)] {
                let frozen = Arc::clone(&flag);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        while frozen.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        match from.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                while frozen.load(Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                if into.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    // Frozen connections stay open: only a closed side ends them.
                    let _ = into.shutdown().await;
                });
            }
        }
    });
    (port, frozen)
}

/// The HTTP/2 keepalive is armed when it would notice a dead connection before the heartbeats
/// do: with heartbeats a minute apart, an agent whose network goes silent is dropped after the
/// keepalive's interval and timeout (1 s each here), not after minutes.
#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_drops_a_silent_connection_before_slow_heartbeats(
    #[values(Backend::Sqlite)] backend: Backend,
) {
    let Some(gw) = Gateway::start_with(backend, |config| {
        config.dialer.backoff.base = Duration::from_secs(30);
        config.dialer.heartbeat_interval = Duration::from_secs(60);
        config.dialer.keepalive = Duration::from_secs(1);
        config.dialer.keepalive_timeout = Duration::from_secs(1);
    })
    .await
    else {
        return;
    };
    let (project, agent, token) = new_agent(&gw, "agent").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = listener.local_addr().unwrap();
    let sim = AgentSim::start(sim_config(&gw, &token), listener).unwrap();
    let (port, frozen) = freezable_proxy(sim_addr).await;
    configure(
        &gw,
        project,
        agent,
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await;
    wait_for(&gw, project, agent, is("connected")).await;
    // Pings on an idle connection are answered while the network is there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(connection(&gw, project, agent).await["state"], "connected");
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let silent_since = Instant::now();
    let state = wait_for(&gw, project, agent, is("backing_off")).await;
    let after = silent_since.elapsed();
    assert!(
        after < Duration::from_secs(6),
        "dropped after {after:?}: {state}"
    );
    assert!(state["last_error"].is_string(), "{state}");
    sim.stop().await;
}
