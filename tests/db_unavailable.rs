//! A database that stops taking connections, against the real binary: every request that
//! needs it gets 503 (REST) or UNAVAILABLE (gRPC), the log has warnings and no errors, and
//! everything answers again once the database does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::binary::{Gateway, project_and_agent, send, with_token};
use common::{PgDatabase, postgres_admin_url, postgres_skipped};
use kas_gateway::proto::v1 as pb;
use pb::agents_client::AgentsClient;
use reqwest::Method;
use rstest::rstest;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const TOKEN: &str = "glpat-db-unavailable-test-000000";

async fn admin() -> PgConnection {
    PgConnection::connect(&postgres_admin_url()).await.unwrap()
}

async fn execute(sql: String) {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&mut admin().await)
        .await
        .unwrap();
}

/// A login role that owns the test database: a database's connection limit does not apply to
/// superusers, so the gateway must not be one. Dropped after the database.
struct Role(String);

impl Drop for Role {
    fn drop(&mut self) {
        let sql = format!("DROP ROLE IF EXISTS {}", self.0);
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    if let Ok(mut conn) = PgConnection::connect(&postgres_admin_url()).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                            .execute(&mut conn)
                            .await;
                    }
                });
        })
        .join();
    }
}

/// What a client sees of the gateway now: REST status and body, readiness status, gRPC code.
async fn observe(gw: &Gateway, agent_id: i64) -> (u16, Value, u16, tonic::Code) {
    let user = gw.url("/api/v4/user");
    let rest = send(Method::GET, &user, TOKEN, None);
    let ready = async {
        reqwest::get(gw.url("/-/readiness"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let grpc = async {
        let channel = tonic::transport::Channel::from_shared(gw.url(""))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut request = tonic::Request::new(pb::GetAgentRequest { agent_id });
        request
            .metadata_mut()
            .insert("private-token", TOKEN.parse().unwrap());
        match AgentsClient::new(channel).get_agent(request).await {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    };
    let ((status, body), ready, code) = tokio::join!(rest, ready, grpc);
    (status, body, ready, code)
}

#[rstest]
#[case::not_accepting_connections("ALLOW_CONNECTIONS false", "ALLOW_CONNECTIONS true")]
#[case::too_many_connections("CONNECTION LIMIT 0", "CONNECTION LIMIT -1")]
#[tokio::test]
async fn a_database_refusing_connections_is_503_and_unavailable(
    #[case] refuse: &str,
    #[case] restore: &str,
) {
    if postgres_skipped() {
        return;
    }
    let role = Role(format!(
        "kasgw_role_{}_{}",
        std::process::id(),
        rand_suffix()
    ));
    let pg = PgDatabase::create().await;
    execute(format!("CREATE ROLE {} LOGIN", role.0)).await;
    execute(format!("ALTER DATABASE {} OWNER TO {}", pg.name, role.0)).await;
    let mut url = url::Url::parse(&pg.url).unwrap();
    url.set_username(&role.0).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut command = with_token(dir.path(), TOKEN);
    command
        .env("KAS_GATEWAY_DATABASE_URL", url.as_str())
        .env("KAS_GATEWAY_ENCRYPTION_KEYS", common::PG_ENCRYPTION_KEYS);
    let gw = Gateway::start(command);
    let (agents, agent) = project_and_agent(&gw, TOKEN).await;
    let agent_id = agent["id"].as_i64().unwrap();
    let (_, _, ready, code) = observe(&gw, agent_id).await;
    assert_eq!((ready, code), (200, tonic::Code::Ok));

    // Refuse new connections, then end the gateway's open ones.
    execute(format!("ALTER DATABASE {} {refuse}", pg.name)).await;
    execute(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
        pg.name
    ))
    .await;
    // A read, a write, the probe and a gRPC call, together: while the pool retries a refused
    // connection, each waits out its acquire timeout.
    let agents_url = gw.url(&agents);
    let write = send(Method::POST, &agents_url, TOKEN, Some(json!({"name": "b"})));
    let ((status, body, ready, code), (write_status, _)) =
        tokio::join!(observe(&gw, agent_id), write);
    assert_eq!(
        (status, body, write_status, ready, code),
        (
            503,
            json!({"message": "503 Service Unavailable"}),
            503,
            503,
            tonic::Code::Unavailable
        )
    );

    execute(format!("ALTER DATABASE {} {restore}", pg.name)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = observe(&gw, agent_id).await;
        if (seen.0, seen.2, seen.3) == (200, 200, tonic::Code::Ok) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused after the database came back: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = send(
        Method::POST,
        &gw.url(&agents),
        TOKEN,
        Some(json!({"name": "b"})),
    )
    .await;
    assert_eq!(status, 201);

    let log = gw.log_text();
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(r#""level":"ERROR""#))
        .collect();
    assert!(errors.is_empty(), "ERROR lines in the log: {errors:#?}");
    assert!(
        log.contains("store unavailable"),
        "the refusals are logged as warnings"
    );
}

fn rand_suffix() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    ring::rand::SystemRandom::new().fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A database that has gone silent (connections accepted, never answered) or refuses: the
/// readiness probe still answers 503 within about a second, not after the pool's 10 s wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_within_a_second_while_the_database_is_away() {
    if postgres_skipped() || !postgres_admin_url().contains("127.0.0.1:5432") {
        return;
    }
    let pg = PgDatabase::create().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (up, watch) = tokio::sync::watch::channel(true);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut watch = watch.clone();
            tokio::spawn(async move {
                if !*watch.borrow() {
                    // Silent: the connection stays open and nothing ever answers.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(client);
                    return;
                }
                let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = watch.wait_for(|up| !*up) => {}
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut command = with_token(dir.path(), TOKEN);
    command
        .env(
            "KAS_GATEWAY_DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/{}", pg.name),
        )
        .env("KAS_GATEWAY_ENCRYPTION_KEYS", common::PG_ENCRYPTION_KEYS);
    let gateway = Gateway::start(command);
    // The API listener's probe and the observability listener's.
    let probes = [gateway.url("/-/readiness"), gateway.ops_url("/readiness")];
    for probe in &probes {
        let (status, _) = send(Method::GET, probe, TOKEN, None).await;
        assert_eq!(status, 200, "{probe}");
    }
    up.send(false).unwrap();
    for _ in 0..3 {
        for probe in &probes {
            let started = std::time::Instant::now();
            let (status, body) = send(Method::GET, probe, TOKEN, None).await;
            let took = started.elapsed();
            assert_eq!(status, 503, "{probe}: {body}");
            assert!(took < Duration::from_secs(2), "{probe} took {took:?}");
        }
    }
}
