//! Dialer benchmark: N simulated agents (in this process) and a real gateway (a child
//! process). Reports the time until every agent is connected after a gateway start, the
//! gateway's memory per connected agent, the CPU its idle heartbeats cost, and, for scale,
//! this machine's raw rate of TLS handshakes measured in the same run.
//!
//!   scripts/bench-dialer [AGENTS]        (builds in release mode and runs this)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kas_gateway::agent_sim::{AgentSim, AgentSimConfig};
use kas_gateway::certs::DevCa;
use kas_gateway::clock::SystemClock;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "glpat-benchmark-root-token-00000000";

struct Gateway {
    child: Child,
    base: String,
}

impl Gateway {
    async fn start(bin: &str, data: &std::path::Path, port: u16) -> Self {
        let child = Command::new(bin)
            .arg("serve")
            .env("KAS_GATEWAY_DATA_DIR", data)
            .env("KAS_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("KAS_GATEWAY_BOOTSTRAP_TOKEN", TOKEN)
            .env("KAS_GATEWAY_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the gateway (build it with cargo build --release)");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .get(format!("{base}/-/readiness"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok()
            != Some(200)
        {
            assert!(Instant::now() < deadline, "gateway not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, base }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; after the ')' they are at 11 and 12.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn post(client: &reqwest::Client, base: &str, path: &str, body: Value) -> Value {
    let response = client
        .post(format!("{base}/api/v4{path}"))
        .header("Private-Token", TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

/// Raw TLS handshakes over loopback with the same certificates, `concurrency` at a time.
async fn tls_handshakes_per_second(
    ca: &str,
    cert: &str,
    key: &str,
    total: usize,
    concurrency: usize,
) -> f64 {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            chain,
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    let client = kas_gateway::dialer::connect::tls_config(Some(ca), None).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(stream).await;
            });
        }
    });
    let started = Instant::now();
    let per_task = total / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = Arc::clone(&client);
            tokio::spawn(async move {
                let connector = tokio_rustls::TlsConnector::from(client);
                for _ in 0..per_task {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                    connector.connect(name, tcp).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (per_task * concurrency) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let agents: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let idle_secs: u64 = std::env::var("IDLE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let bin = std::env::var("GATEWAY_BIN").unwrap_or_else(|_| "target/release/kas-gateway".into());
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::from_unix_timestamp(
        i64::try_from(
            std::time::SystemTime::UNIX_EPOCH
                .elapsed()
                .unwrap()
                .as_secs(),
        )
        .unwrap(),
    )
    .unwrap();
    let ca = DevCa::new("bench CA", now).unwrap();
    let server = ca.server(&["localhost"], now).unwrap();
    let ca_pem = ca.pair().cert;
    let client = reqwest::Client::new();

    // Setup with a first gateway: baseline memory, then every agent, token and configuration.
    let port = free_port();
    let setup = Gateway::start(&bin, dir.path(), port).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline_kib = rss_kib(setup.pid());
    let project = post(&client, &setup.base, "/projects", json!({"name": "bench"})).await;
    let project_id = project["id"].as_i64().unwrap();
    let mut listeners = Vec::with_capacity(agents);
    let mut tokens = Vec::with_capacity(agents);
    for i in 0..agents {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let agent = post(
            &client,
            &setup.base,
            &format!("/projects/{project_id}/cluster_agents"),
            json!({"name": format!("agent-{i:05}")}),
        )
        .await;
        let agent_id = agent["id"].as_i64().unwrap();
        let token = post(
            &client,
            &setup.base,
            &format!("/projects/{project_id}/cluster_agents/{agent_id}/tokens"),
            json!({"name": "t"}),
        )
        .await;
        post(
            &client,
            &setup.base,
            &format!("/projects/{project_id}/cluster_agents/{agent_id}/url_configurations"),
            json!({"url": format!("grpcs://localhost:{port}"), "ca_cert": ca_pem}),
        )
        .await;
        listeners.push(listener);
        tokens.push(token["token"].as_str().unwrap().to_owned());
    }
    setup.stop();

    // The agents.
    let mut sims = Vec::with_capacity(agents);
    for (listener, token) in listeners.into_iter().zip(tokens) {
        let config = AgentSimConfig {
            token,
            tls: Some((server.cert.clone(), server.key.clone())),
            client_ca: None,
            jwt_public_key: None,
            jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
            metadata: Default::default(),
            clock: Arc::new(SystemClock),
        };
        sims.push(AgentSim::start(config, listener).unwrap());
    }

    // A cold start: time until every agent has an accepted session.
    let started = Instant::now();
    let gateway = Gateway::start(&bin, dir.path(), port).await;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let accepted = sims
            .iter()
            .filter(|s| s.events.accepted.load(Ordering::Relaxed) > 0)
            .count();
        if accepted == agents {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {accepted} of {agents} connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_connected = started.elapsed();

    tokio::time::sleep(Duration::from_secs(3)).await;
    let connected_kib = rss_kib(gateway.pid());
    let pongs_before: u64 = sims
        .iter()
        .map(|s| s.events.pongs.load(Ordering::Relaxed))
        .sum();
    let ticks_before = cpu_ticks(gateway.pid());
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let ticks = cpu_ticks(gateway.pid()) - ticks_before;
    let pongs: u64 = sims
        .iter()
        .map(|s| s.events.pongs.load(Ordering::Relaxed))
        .sum::<u64>()
        - pongs_before;
    let still_open: i64 = sims
        .iter()
        .map(|s| s.events.open_sessions.load(Ordering::Relaxed))
        .sum();
    gateway.stop();
    for sim in sims {
        sim.stop().await;
    }

    let handshakes = tls_handshakes_per_second(&ca_pem, &server.cert, &server.key, 2000, 2).await;
    let cpu_seconds = ticks as f64 / 100.0;
    println!("agents                           {agents}");
    println!(
        "all connected after cold start   {:.2} s ({:.0} sessions/s)",
        all_connected.as_secs_f64(),
        agents as f64 / all_connected.as_secs_f64()
    );
    println!(
        "raw TLS handshakes, same run     {handshakes:.0} /s (loopback, ECDSA P-256, 2 at a time)"
    );
    println!(
        "gateway RSS idle, no agents      {:.1} MiB",
        baseline_kib as f64 / 1024.0
    );
    println!(
        "gateway RSS, all connected       {:.1} MiB",
        connected_kib as f64 / 1024.0
    );
    println!(
        "memory per connected agent       {:.1} KiB",
        (connected_kib.saturating_sub(baseline_kib)) as f64 / agents as f64
    );
    println!(
        "idle window                      {idle_secs} s, {pongs} heartbeats answered, {still_open} sessions open"
    );
    println!(
        "gateway CPU while idle           {:.2} % of one core ({:.0} us per heartbeat)",
        cpu_seconds / idle_secs as f64 * 100.0,
        if pongs > 0 {
            cpu_seconds * 1e6 / pongs as f64
        } else {
            0.0
        }
    );
}
