//! The `kas-gateway` binary as an operator runs it: a real process on a loopback port, its
//! JSON log collected line by line.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_kas-gateway");

/// A running `kas-gateway serve` with its log collected.
pub struct Gateway {
    pub child: Child,
    pub addr: String,
    /// The observability listener's address.
    pub ops_addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// `kas-gateway` on ports of its choosing (the observability listener too, so that gateways
/// started together never collide), with a data directory, JSON debug logs and nothing else
/// from the test's environment.
pub fn command(data_dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KAS_GATEWAY_DATA_DIR", data_dir)
        .env("KAS_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("KAS_GATEWAY_OBSERVABILITY_LISTEN", "127.0.0.1:0")
        .env("KAS_GATEWAY_LOG_FORMAT", "json")
        .env("KAS_GATEWAY_LOG_LEVEL", "debug");
    command
}

/// `command` with a chosen root token.
pub fn with_token(data_dir: &Path, token: &str) -> Command {
    let mut command = command(data_dir);
    command.env("KAS_GATEWAY_BOOTSTRAP_TOKEN", token);
    command
}

/// Points `command` at `backend`: SQLite in its data directory, or a fresh PostgreSQL
/// database, returned so that it lives as long as the test. `None` when the PostgreSQL cases
/// are switched off.
pub async fn on_backend(
    mut command: Command,
    backend: super::Backend,
) -> Option<(Command, Option<super::PgDatabase>)> {
    match backend {
        super::Backend::Sqlite => Some((command, None)),
        super::Backend::Postgres if super::postgres_skipped() => {
            eprintln!("KAS_TEST_SKIP_POSTGRES=1: skipping the PostgreSQL case");
            None
        }
        super::Backend::Postgres => {
            let pg = super::PgDatabase::create().await;
            command
                .env("KAS_GATEWAY_DATABASE_URL", &pg.url)
                .env("KAS_GATEWAY_ENCRYPTION_KEYS", super::PG_ENCRYPTION_KEYS);
            Some((command, Some(pg)))
        }
    }
}

/// Creates project `p` and its agent `a` as `token`; returns the agents' path and the agent.
pub async fn project_and_agent(gateway: &Gateway, token: &str) -> (String, Value) {
    let (_, project) = send(
        reqwest::Method::POST,
        &gateway.url("/api/v4/projects"),
        token,
        Some(json!({"name": "p"})),
    )
    .await;
    let agents = format!("/api/v4/projects/{}/cluster_agents", project["id"]);
    let (_, agent) = send(
        reqwest::Method::POST,
        &gateway.url(&agents),
        token,
        Some(json!({"name": "a"})),
    )
    .await;
    (agents, agent)
}

impl Gateway {
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .arg("serve")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut addr = None;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "listening"
                {
                    let bound = event["addr"].as_str().unwrap_or_default().to_owned();
                    if event["serves"] == "REST and gRPC" {
                        addr = Some(bound);
                    } else if event["serves"] == "metrics, probes and the status page" {
                        let _ = addr_tx.send((addr.take().unwrap_or_default(), bound));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let Ok((addr, ops_addr)) = addr_rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway did not start: {:?}", log.lock().unwrap());
        };
        Self {
            child,
            addr,
            ops_addr,
            log,
        }
    }

    /// A URL on the observability listener.
    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops_addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        self.wait_within(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("the gateway did not exit within 20 s"))
    }

    /// Waits at most `limit` for the process to exit: `Some(exit code)`, or `None` if it
    /// is still running.
    pub fn wait_within(&mut self, limit: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now and at its peak, in KiB, from `/proc`.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time (user and system) used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    /// Every log line so far, joined.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample: the metric's name and labels.
pub type Sample = (String, std::collections::BTreeMap<String, String>);

/// Parses Prometheus' text format into samples and values.
pub fn parse_metrics(text: &str) -> Vec<(Sample, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap();
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            ((name.to_owned(), labels), value.parse().unwrap())
        })
        .collect()
}

/// The value of the sample `name` with exactly these labels; 0 when it is absent.
pub fn metric_value(samples: &[(Sample, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: std::collections::BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|((n, l), _)| n == name && *l == wanted)
        .map_or(0.0, |(_, v)| *v)
}

impl Gateway {
    /// Every sample on the observability listener's `/metrics` now.
    pub async fn metrics(&self) -> Vec<(Sample, f64)> {
        let text = reqwest::get(self.ops_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        parse_metrics(&text)
    }
}

/// Creates agent `name` under `agents` (a project's agents path) as `token`, with an agent
/// token and a URL configuration for `url`; returns the agent token and the configuration.
pub async fn receptive_agent(
    gateway: &Gateway,
    token: &str,
    agents: &str,
    name: &str,
    url: &str,
) -> (String, Value) {
    let (_, agent) = send(
        reqwest::Method::POST,
        &gateway.url(agents),
        token,
        Some(json!({ "name": name })),
    )
    .await;
    let base = format!("{agents}/{}", agent["id"]);
    let (_, agent_token) = send(
        reqwest::Method::POST,
        &gateway.url(&format!("{base}/tokens")),
        token,
        Some(json!({"name": "t"})),
    )
    .await;
    let (status, config) = send(
        reqwest::Method::POST,
        &gateway.url(&format!("{base}/url_configurations")),
        token,
        Some(json!({ "url": url })),
    )
    .await;
    assert_eq!(status, 201, "{config}");
    (agent_token["token"].as_str().unwrap().to_owned(), config)
}

/// A simulated agent on `listener` presenting `agent_token` and checking the gateway's JWT
/// with `config`'s public key.
pub fn jwt_sim(
    agent_token: String,
    config: &Value,
    listener: tokio::net::TcpListener,
) -> kas_gateway::agent_sim::AgentSim {
    kas_gateway::agent_sim::AgentSim::start(
        kas_gateway::agent_sim::AgentSimConfig {
            token: agent_token,
            tls: None,
            client_ca: None,
            jwt_public_key: Some(config["public_key"].as_str().unwrap().to_owned()),
            jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
            metadata: kas_gateway::proto::agent::v1::AgentMetadata::default(),
            clock: Arc::new(kas_gateway::clock::SystemClock),
        },
        listener,
    )
    .unwrap()
}

pub async fn send(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client.request(method, url).header("Private-Token", token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
