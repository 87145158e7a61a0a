//! The test harness: a real gateway on a loopback port, on a real SQLite file or a fresh
//! PostgreSQL database, driven with a real HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use kas_gateway::clock::ManualClock;
use kas_gateway::config::{Config, DatabaseUrl};
use kas_gateway::crypto::Secret;
use kas_gateway::domain::Timestamp;
use kas_gateway::server;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The root token every test gateway starts with.
pub const ROOT_TOKEN: &str = "glpat-root-test-token-0123456789";
/// The encryption keys of gateways on PostgreSQL, which must be configured there.
pub const PG_ENCRYPTION_KEYS: &str = "k1=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// The external URL test gateways announce.
pub const EXTERNAL_URL: &str = "https://gateway.example.test";
/// 2026-01-01T00:00:00Z: test clocks start here.
pub const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("KAS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Whether PostgreSQL tests were explicitly switched off (never in CI).
pub fn postgres_skipped() -> bool {
    std::env::var("KAS_TEST_SKIP_POSTGRES").is_ok_and(|v| v == "1")
}

/// A fresh PostgreSQL database, dropped when this is dropped.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kasgw_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            rand_suffix()
        );
        let admin = postgres_admin_url();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is required for the tests ({admin}): {e}. \
                     Start it, point KAS_TEST_POSTGRES_URL at one, or set KAS_TEST_SKIP_POSTGRES=1 locally."
                )
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Self { name, url }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = postgres_admin_url();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(mut conn) =
                    <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

fn rand_suffix() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    ring::rand::SystemRandom::new().fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running gateway and a client for it.
pub struct Gateway {
    pub backend: Backend,
    pub base: String,
    pub client: reqwest::Client,
    pub clock: Arc<ManualClock>,
    pub config: Config,
    shutdown: CancellationToken,
    server: Option<server::Server>,
    pub data_dir: tempfile::TempDir,
    pub pg: Option<PgDatabase>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status and the exact JSON body.
    #[track_caller]
    pub fn expect(&self, status: u16, body: Value) {
        assert_eq!(
            (self.status.as_u16(), &self.body),
            (status, &body),
            "unexpected reply: {}",
            self.text
        );
    }

    /// Asserts the status only.
    #[track_caller]
    pub fn expect_status(&self, status: u16) -> &Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected reply: {}",
            self.text
        );
        &self.body
    }
}

impl Gateway {
    /// Starts a gateway on `backend`, or returns `None` when PostgreSQL was switched off.
    pub async fn start(backend: Backend) -> Option<Self> {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts a gateway with a configuration adjusted by `adjust`.
    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Option<Self> {
        let data_dir = tempfile::tempdir().unwrap();
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres if postgres_skipped() => {
                eprintln!("KAS_TEST_SKIP_POSTGRES=1: skipping the PostgreSQL case");
                return None;
            }
            Backend::Postgres => Some(PgDatabase::create().await),
        };
        let mut config = Config::with_data_dir(data_dir.path()).unwrap();
        if let Some(pg) = &pg {
            config.database_url = DatabaseUrl::new(pg.url.clone());
            config.encryption_keys = Some(Secret::new(PG_ENCRYPTION_KEYS));
        }
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.external_url = Some(EXTERNAL_URL.to_owned());
        config.bootstrap_token = Some(Secret::new(ROOT_TOKEN));
        adjust(&mut config);
        let clock = Arc::new(ManualClock::new(START));
        let mut gateway = Self {
            backend,
            base: String::new(),
            client: reqwest::Client::new(),
            clock,
            config,
            shutdown: CancellationToken::new(),
            server: None,
            data_dir,
            pg,
        };
        gateway.boot().await;
        Some(gateway)
    }

    async fn boot(&mut self) {
        self.shutdown = CancellationToken::new();
        let server = server::start(&self.config, self.clock.clone(), self.shutdown.clone())
            .await
            .expect("the gateway starts");
        self.base = format!("http://{}", server.addr);
        self.server = Some(server);
    }

    /// Stops the gateway (gracefully) and starts it again on the same database and port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let port: std::net::SocketAddr = self.base.trim_start_matches("http://").parse().unwrap();
        self.config.listen = port;
        self.boot().await;
    }

    /// The running gateway's domain service.
    pub fn service(&self) -> kas_gateway::domain::Service {
        self.server.as_ref().expect("running").service.clone()
    }

    /// Every byte of the database: the SQLite files (call after `stop`), or every row of
    /// every table of the PostgreSQL database as text (bytea as hex).
    pub async fn database_bytes(&self) -> Vec<u8> {
        match &self.pg {
            Some(pg) => {
                let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                let mut bytes = Vec::new();
                for table in tables {
                    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT t::text FROM {table} t"
                    )))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                    // bytea columns render as hex: look for secrets in both forms.
                    for row in rows {
                        bytes.extend(row.into_bytes());
                    }
                }
                bytes
            }
            None => {
                let mut bytes = Vec::new();
                for entry in std::fs::read_dir(self.data_dir.path()).unwrap() {
                    let path = entry.unwrap().path();
                    if path.to_string_lossy().contains("kas-gateway.db") {
                        bytes.extend(std::fs::read(path).unwrap());
                    }
                }
                bytes
            }
        }
    }

    /// Stops the gateway and waits for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.wait().await.unwrap();
        }
    }

    /// Sends a request; `body` is sent as JSON when given.
    pub async fn call(
        &self,
        method: Method,
        token: Option<&str>,
        path: &str,
        body: Option<Value>,
    ) -> Reply {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("Private-Token", token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        read(request.send().await.unwrap()).await
    }

    pub async fn get(&self, token: &str, path: &str) -> Reply {
        self.call(Method::GET, Some(token), path, None).await
    }

    pub async fn post(&self, token: &str, path: &str, body: Value) -> Reply {
        self.call(Method::POST, Some(token), path, Some(body)).await
    }

    pub async fn delete(&self, token: &str, path: &str) -> Reply {
        self.call(Method::DELETE, Some(token), path, None).await
    }

    /// Creates a user and an `api` token for it; returns (user id, token).
    pub async fn user(&self, username: &str) -> (i64, String) {
        self.user_with_scopes(username, &["api"]).await
    }

    /// Creates a user and a token with `scopes`; returns (user id, token).
    pub async fn user_with_scopes(&self, username: &str, scopes: &[&str]) -> (i64, String) {
        let user = self
            .post(
                ROOT_TOKEN,
                "/api/v4/users",
                json!({"username": username, "name": username, "email": format!("{username}@example.com")}),
            )
            .await;
        let id = user.expect_status(201)["id"].as_i64().unwrap();
        let token = self.token_for(id, scopes, None).await;
        (id, token)
    }

    /// A new personal access token for user `id`.
    pub async fn token_for(&self, id: i64, scopes: &[&str], expires_at: Option<&str>) -> String {
        let mut body = json!({"name": "test", "scopes": scopes});
        if let Some(date) = expires_at {
            body["expires_at"] = json!(date);
        }
        let token = self
            .post(
                ROOT_TOKEN,
                &format!("/api/v4/users/{id}/personal_access_tokens"),
                body,
            )
            .await;
        token.expect_status(201)["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Creates a project as `token`'s user; returns its id.
    pub async fn project(&self, token: &str, name: &str) -> i64 {
        let project = self
            .post(token, "/api/v4/projects", json!({"name": name}))
            .await;
        project.expect_status(201)["id"].as_i64().unwrap()
    }

    /// Adds `user_id` to a project with `level`.
    pub async fn add_member(&self, project: i64, user_id: i64, level: i64) {
        self.post(
            ROOT_TOKEN,
            &format!("/api/v4/projects/{project}/members"),
            json!({"user_id": user_id, "access_level": level}),
        )
        .await
        .expect_status(201);
    }

    /// Registers an agent as root; returns its id.
    pub async fn agent(&self, project: i64, name: &str) -> i64 {
        let agent = self
            .post(
                ROOT_TOKEN,
                &format!("/api/v4/projects/{project}/cluster_agents"),
                json!({"name": name}),
            )
            .await;
        agent.expect_status(201)["id"].as_i64().unwrap()
    }

    /// Creates an agent token as root; returns (token id, secret).
    pub async fn agent_token(&self, project: i64, agent: i64, name: &str) -> (i64, String) {
        let token = self
            .post(
                ROOT_TOKEN,
                &format!("/api/v4/projects/{project}/cluster_agents/{agent}/tokens"),
                json!({"name": name}),
            )
            .await;
        let body = token.expect_status(201);
        (
            body["id"].as_i64().unwrap(),
            body["token"].as_str().unwrap().to_owned(),
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads a response whole.
pub async fn read(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        text,
    }
}

/// Starts a gateway, or ends the test when its backend was switched off.
#[macro_export]
macro_rules! gateway {
    ($backend:expr) => {
        match $crate::common::Gateway::start($backend).await {
            Some(gateway) => gateway,
            None => return,
        }
    };
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Hex of bytes, as PostgreSQL renders bytea.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys of a JSON object in the order they appear on the wire.
pub fn keys_in_order(text: &str) -> Vec<String> {
    let value: Value = serde_json::from_str(text).unwrap();
    let object = value.as_object().unwrap();
    let mut keys: Vec<(usize, String)> = object
        .keys()
        .map(|key| {
            let needle = format!("{}:", serde_json::to_string(key).unwrap());
            (text.find(&needle).unwrap(), key.clone())
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, key)| key).collect()
}
pub mod binary;
pub mod kube;
