//! Dialer benchmark: N simulated agents spread over several `kas-gateway agent-sim`
//! processes and a real gateway (a child process too), on SQLite or PostgreSQL. Reports the
//! time until every agent is connected after a gateway start beside the time this machine
//! takes for as many raw TLS handshakes (measured in the same run, right before the cold
//! start and again after, the mean of both as the yardstick), the gateway's memory per
//! connected agent and the CPU its idle heartbeats cost.
//!
//!   scripts/bench-dialer [AGENTS]        (builds in release mode and runs this)
//!
//! Environment: BACKEND (sqlite, the default, or postgres), DATABASE_URL (the PostgreSQL
//! server, default postgres://postgres@127.0.0.1:5432/postgres; a fresh database is made on
//! it and dropped), AGENTS_PER_PROCESS (2000), IDLE_SECONDS (30), PORT_BASE (first agent port
//! tried, 10000), GATEWAY_BIN, SIM_BIN (the binary running the agents; GATEWAY_BIN by default).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kas_gateway::certs::DevCa;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use common::{cpu_time, free_port, load_average, rss_kib};

const TOKEN: &str = "glpat-benchmark-root-token-00000000";
/// A gateway on PostgreSQL must be given its encryption keys (any fixed key does here).
const PG_ENCRYPTION_KEYS: &str = "k1=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

enum Backend {
    Sqlite,
    Postgres {
        server: String,
        url: String,
        name: String,
    },
}

impl Backend {
    /// From BACKEND: SQLite in the data directory, or a fresh database on DATABASE_URL.
    async fn from_env() -> Self {
        match std::env::var("BACKEND").as_deref() {
            Ok("postgres") => {
                let server = std::env::var("DATABASE_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
                let name = format!("kas_bench_{}", std::process::id());
                let pool = sqlx::PgPool::connect(&server).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name}"
                )))
                .execute(&pool)
                .await
                .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
                let url = format!("{base}/{name}");
                Self::Postgres { server, url, name }
            }
            Ok("sqlite") | Err(_) => Self::Sqlite,
            Ok(other) => panic!("BACKEND={other}: sqlite or postgres"),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Sqlite => "SQLite",
            Self::Postgres { .. } => "PostgreSQL",
        }
    }

    async fn drop_database(&self) {
        if let Self::Postgres { server, name, .. } = self {
            let pool = sqlx::PgPool::connect(server).await.unwrap();
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&pool)
            .await;
            pool.close().await;
        }
    }
}

/// One `kas-gateway agent-sim` process serving a range of agents, and what it last reported.
struct SimProcess {
    child: Child,
    listening: Arc<AtomicU64>,
    accepted_agents: Arc<AtomicU64>,
    /// Sessions accepted, every gateway's together.
    accepted: Arc<AtomicU64>,
    open_sessions: Arc<AtomicU64>,
    pongs: Arc<AtomicU64>,
}

impl SimProcess {
    fn start(bin: &str, dir: &std::path::Path, index: usize, agents: &[(u16, String)]) -> Self {
        let file = dir.join(format!("agents-{index}.txt"));
        let lines: String = agents
            .iter()
            .map(|(port, token)| format!("{port} {token}\n"))
            .collect();
        std::fs::write(&file, lines).unwrap();
        let mut child = Command::new(bin)
            .arg("agent-sim")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--agents-file")
            .arg(&file)
            .arg("--tls-cert")
            .arg(dir.join("agent.crt"))
            .arg("--tls-key")
            .arg(dir.join("agent.key"))
            .arg("--status-every-ms")
            .arg("20")
            .env("RUST_LOG", "warn")
            .env(
                "TOKIO_WORKER_THREADS",
                std::env::var("SIM_THREADS").unwrap_or_else(|_| "2".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start agent-sim");
        let stdout = child.stdout.take().unwrap();
        let process = Self {
            child,
            listening: Arc::default(),
            accepted_agents: Arc::default(),
            open_sessions: Arc::default(),
            accepted: Arc::default(),
            pongs: Arc::default(),
        };
        let (listening, accepted, sessions, open, pongs) = (
            Arc::clone(&process.listening),
            Arc::clone(&process.accepted_agents),
            Arc::clone(&process.accepted),
            Arc::clone(&process.open_sessions),
            Arc::clone(&process.pongs),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(status) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let read = |key: &str| status[key].as_u64().unwrap_or(0);
                listening.store(read("listening"), Ordering::Relaxed);
                accepted.store(read("accepted_agents"), Ordering::Relaxed);
                sessions.store(read("accepted"), Ordering::Relaxed);
                open.store(read("open_sessions"), Ordering::Relaxed);
                pongs.store(read("pongs"), Ordering::Relaxed);
            }
        });
        process
    }

    fn stop(mut self) {
        let _ = common::stop(&mut self.child);
    }
}

fn sum(sims: &[SimProcess], field: impl Fn(&SimProcess) -> &AtomicU64) -> u64 {
    sims.iter().map(|s| field(s).load(Ordering::Relaxed)).sum()
}

/// Free loopback ports from `base` upwards (below the ephemeral range, so that the gateway's
/// own outgoing connections never take one).
fn agent_ports(base: u16, count: usize) -> Vec<u16> {
    let ports: Vec<u16> = (base..u16::MAX)
        .filter(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .take(count)
        .collect();
    assert_eq!(ports.len(), count, "not enough free ports from {base}");
    ports
}

struct Gateway {
    child: Child,
    base: String,
    /// The observability listener (`/metrics`).
    ops: String,
}

impl Gateway {
    async fn start(bin: &str, data: &std::path::Path, port: u16, backend: &Backend) -> Self {
        let mut command = Command::new(bin);
        let ops = format!("127.0.0.1:{}", free_port().unwrap());
        if let Backend::Postgres { url, .. } = backend {
            command
                .env("KAS_GATEWAY_DATABASE_URL", url)
                .env("KAS_GATEWAY_ENCRYPTION_KEYS", PG_ENCRYPTION_KEYS);
        }
        let child = command
            .arg("serve")
            .env("KAS_GATEWAY_DATA_DIR", data)
            .env("KAS_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("KAS_GATEWAY_OBSERVABILITY_LISTEN", &ops)
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
        Self {
            child,
            base,
            ops: format!("http://{ops}"),
        }
    }

    /// The dialer's counters from `/metrics`: attempts, sessions established, and the
    /// failures by cause (only the causes seen).
    async fn dial_counters(&self) -> String {
        let text = reqwest::get(format!("{}/metrics", self.ops))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |line: &str| line.rsplit(' ').next().unwrap_or("0").to_owned();
        let mut out = Vec::new();
        for line in text.lines() {
            if line.starts_with("kas_gateway_dial_attempts_total ") {
                out.push(format!("{} attempts", value(line)));
            } else if line.starts_with("kas_gateway_sessions_established_total ") {
                out.push(format!("{} established", value(line)));
            } else if let Some(rest) = line.strip_prefix("kas_gateway_dial_failures_total{cause=\"")
                && value(line) != "0"
            {
                let cause = rest.split('"').next().unwrap_or("?");
                out.push(format!("{} failed ({cause})", value(line)));
            }
        }
        out.join(", ")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        let _ = common::stop(&mut self.child);
    }
}

/// CPU time of every PostgreSQL server process on this machine (zero without any).
fn postgres_cpu_time() -> Duration {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim() == "postgres")
                })
                .map(cpu_time)
                .sum()
        })
        .unwrap_or_default()
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

/// `total` raw TLS handshakes over loopback with the same certificates, `concurrency` at a
/// time (the caller times them).
async fn tls_handshakes(ca: &str, cert: &str, key: &str, total: usize, concurrency: usize) {
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
}

#[tokio::main]
async fn main() {
    let agents: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let env = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let idle_secs = env("IDLE_SECONDS", 30);
    let per_process = usize::try_from(env("AGENTS_PER_PROCESS", 2000))
        .unwrap()
        .max(1);
    let port_base = u16::try_from(env("PORT_BASE", 10000)).unwrap();
    let bin = std::env::var("GATEWAY_BIN").unwrap_or_else(|_| "target/release/kas-gateway".into());
    let sim_bin = std::env::var("SIM_BIN").unwrap_or_else(|_| bin.clone());
    let baseline = std::env::var("BASELINE_BIN").ok().filter(|b| !b.is_empty());
    // Checked before anything is made: each build needs its own copy of the data.
    assert!(
        baseline.is_none() || std::env::var("BACKEND").as_deref() != Ok("postgres"),
        "BASELINE_BIN runs on SQLite only: each build gets its own copy of the data directory"
    );
    let backend = Backend::from_env().await;
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
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
    std::fs::write(dir.path().join("agent.crt"), &server.cert).unwrap();
    std::fs::write(dir.path().join("agent.key"), &server.key).unwrap();
    let client = reqwest::Client::new();

    // Setup with a first gateway: baseline memory, then every agent, token and configuration.
    let port = free_port().unwrap();
    let setup = Gateway::start(&bin, dir.path(), port, &backend).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline_kib = rss_kib(setup.pid());
    let project = post(&client, &setup.base, "/projects", json!({"name": "bench"})).await;
    let project_id = project["id"].as_i64().unwrap();
    let ports = agent_ports(port_base, agents);
    let setup_started = Instant::now();
    let created: Vec<(u16, String)> = futures::stream::iter(ports.into_iter().enumerate())
        .map(|(i, agent_port)| {
            let (client, base, ca_pem) = (&client, &setup.base, &ca_pem);
            async move {
                let agent = post(
                    client,
                    base,
                    &format!("/projects/{project_id}/cluster_agents"),
                    json!({"name": format!("agent-{i:05}")}),
                )
                .await;
                let agent_id = agent["id"].as_i64().unwrap();
                let token = post(
                    client,
                    base,
                    &format!("/projects/{project_id}/cluster_agents/{agent_id}/tokens"),
                    json!({"name": "t"}),
                )
                .await;
                post(
                    client,
                    base,
                    &format!("/projects/{project_id}/cluster_agents/{agent_id}/url_configurations"),
                    json!({"url": format!("grpcs://localhost:{agent_port}"), "ca_cert": ca_pem}),
                )
                .await;
                (agent_port, token["token"].as_str().unwrap().to_owned())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    eprintln!(
        "set up {agents} agents on {} in {:.1} s",
        backend.name(),
        setup_started.elapsed().as_secs_f64()
    );
    setup.stop();

    // The agents, AGENTS_PER_PROCESS to a process.
    let sims = start_sims(&sim_bin, dir.path(), &created, per_process).await;

    // The yardstick, first time: as many raw TLS handshakes right before the cold start (the
    // agents listen, idle). The machine's speed moves by up to 1.6 times from one minute to
    // the next, so it is taken again after, and the ratio is to the mean of both.
    let raw_first = RawTls::measure(&ca_pem, &server, agents).await;

    // A cold start: time until every agent has an accepted session.
    let postgres_before = postgres_cpu_time();
    let started = Instant::now();
    let gateway = Gateway::start(&bin, dir.path(), port, &backend).await;
    let ready = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first = None;
    let mut half = None;
    loop {
        let accepted = sum(&sims, |s| &s.accepted_agents);
        if first.is_none() && accepted > 0 {
            first = Some(started.elapsed());
        }
        if half.is_none() && accepted * 2 >= agents as u64 {
            half = Some(started.elapsed());
        }
        if accepted == agents as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {accepted} of {agents} connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The status lines come every 20 ms: at most that late.
    let all_connected = started.elapsed();
    let cold_start_cpu = cpu_time(gateway.pid()).as_secs_f64();
    let sims_cpu = sims
        .iter()
        .map(|s| cpu_time(s.child.id()))
        .sum::<Duration>()
        .as_secs_f64();
    // The server's processes that were there before (its own and the pool's connections).
    let postgres_cpu = postgres_cpu_time()
        .saturating_sub(postgres_before)
        .as_secs_f64();
    let load_connected = load_average();
    let dials = gateway.dial_counters().await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let connected_kib = rss_kib(gateway.pid());
    let pongs_before = sum(&sims, |s| &s.pongs);
    let idle_before = cpu_time(gateway.pid());
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_cpu = cpu_time(gateway.pid()).saturating_sub(idle_before);
    let pongs = sum(&sims, |s| &s.pongs) - pongs_before;
    let still_open = sum(&sims, |s| &s.open_sessions);
    let load_idle = load_average();
    gateway.stop();
    let processes = sims.len();
    for sim in sims {
        sim.stop();
    }

    // The yardstick again, with the gateway and the agents stopped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let raw_again = RawTls::measure(&ca_pem, &server, agents).await;
    let raw = (raw_first.time + raw_again.time) / 2;
    let raw_cpu = (raw_first.cpu + raw_again.cpu) / 2.0;
    // Then, on request, a baseline build side by side with this one, against agents started
    // again (they were stopped for the raw handshakes).
    let side_by_side = match &baseline {
        Some(baseline) => {
            let sims = start_sims(&sim_bin, dir.path(), &created, per_process).await;
            let rounds = side_by_side(
                [bin.as_str(), baseline.as_str()],
                &sims,
                dir.path(),
                &backend,
                env("ROUNDS", 3),
                env("ROUND_IDLE_SECONDS", 15),
            )
            .await;
            for sim in sims {
                sim.stop();
            }
            Some(rounds)
        }
        None => None,
    };
    backend.drop_database().await;
    let cpu_seconds = idle_cpu.as_secs_f64();
    println!(
        "agents                           {agents} ({processes} agent processes), {}",
        backend.name()
    );
    println!(
        "all connected after cold start   {:.2} s ({:.0} sessions/s; gateway ready after {:.2} s, first after {:.2} s, half after {:.2} s)",
        all_connected.as_secs_f64(),
        agents as f64 / all_connected.as_secs_f64(),
        ready.as_secs_f64(),
        first.unwrap_or_default().as_secs_f64(),
        half.unwrap_or_default().as_secs_f64(),
    );
    println!(
        "CPU until all connected          gateway {cold_start_cpu:.2} s, agent processes {sims_cpu:.2} s{}",
        match backend {
            Backend::Postgres { .. } => format!(", PostgreSQL {postgres_cpu:.2} s"),
            Backend::Sqlite => String::new(),
        }
    );
    println!("dials until all connected        {dials}");
    println!(
        "raw TLS, same count, same run    {:.2} s: {:.2} s before the cold start, {:.2} s after ({:.0} handshakes/s; loopback, ECDSA P-256, 2 at a time)",
        raw.as_secs_f64(),
        raw_first.time.as_secs_f64(),
        raw_again.time.as_secs_f64(),
        agents as f64 / raw.as_secs_f64()
    );
    let per = |seconds: f64| seconds * 1e6 / agents as f64;
    println!(
        "CPU per session / handshake      gateway {:.0} us, agents {:.0} us; raw TLS {:.0} us (client and server)",
        per(cold_start_cpu),
        per(sims_cpu),
        per(raw_cpu)
    );
    println!(
        "connected / raw TLS              {:.2}x",
        all_connected.as_secs_f64() / raw.as_secs_f64()
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
    println!(
        "load average                     {load_connected} (all connected), {load_idle} (after idle)"
    );
    if let Some(rounds) = side_by_side {
        print_side_by_side(&rounds);
    }
}

/// One measure of the yardstick: `count` raw TLS handshakes, two at a time.
struct RawTls {
    time: Duration,
    /// CPU seconds, both ends of every handshake (they run in this process).
    cpu: f64,
}

impl RawTls {
    async fn measure(ca_pem: &str, server: &kas_gateway::certs::Pair, count: usize) -> Self {
        let started = Instant::now();
        let cpu_before = cpu_time(std::process::id());
        tls_handshakes(ca_pem, &server.cert, &server.key, count, 2).await;
        Self {
            time: started.elapsed(),
            cpu: cpu_time(std::process::id())
                .saturating_sub(cpu_before)
                .as_secs_f64(),
        }
    }
}

/// The agents, `per_process` to a process, once all of them listen.
async fn start_sims(
    sim_bin: &str,
    dir: &std::path::Path,
    created: &[(u16, String)],
    per_process: usize,
) -> Vec<SimProcess> {
    let sims: Vec<SimProcess> = created
        .chunks(per_process)
        .enumerate()
        .map(|(i, chunk)| SimProcess::start(sim_bin, dir, i, chunk))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sum(&sims, |s| &s.listening) < created.len() as u64 {
        assert!(Instant::now() < deadline, "the agents did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    sims
}

/// One gateway's cold start and idle window in a side-by-side round.
#[derive(Clone, Copy, Default)]
struct Round {
    /// Gateway CPU per session until every agent was accepted.
    cpu_per_session_us: f64,
    /// Gateway CPU while idle, in % of a core.
    idle_percent: f64,
    /// Gateway CPU per heartbeat answered while idle.
    idle_us_per_heartbeat: f64,
}

/// The gateway under test (`bins[0]`) and a baseline (`bins[1]`) at the same time, each on
/// its own copy of the data, both dialling every agent (each agent holds two sessions), for
/// `rounds` rounds of a cold start and an idle window. Both see the same machine at the same
/// moment: this one runs, from one minute to the next, at speeds up to 1.6 times apart, so
/// separate runs, even turns a few seconds apart, cannot tell changes of a few per cent.
async fn side_by_side(
    bins: [&str; 2],
    sims: &[SimProcess],
    data: &std::path::Path,
    backend: &Backend,
    rounds: u64,
    idle_secs: u64,
) -> Vec<[Round; 2]> {
    let agents = sum(sims, |s| &s.listening);
    let copies: Vec<tempfile::TempDir> = (0..2)
        .map(|_| {
            let copy = tempfile::tempdir().unwrap();
            for entry in std::fs::read_dir(data).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_file() {
                    std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
                }
            }
            copy
        })
        .collect();
    let mut results = Vec::new();
    for round in 0..rounds {
        let deadline = Instant::now() + Duration::from_secs(60);
        while sum(sims, |s| &s.open_sessions) > 0 {
            assert!(Instant::now() < deadline, "sessions still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let accepted_before = sum(sims, |s| &s.accepted);
        // Each round starts the other one first.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut gateways: [Option<Gateway>; 2] = [None, None];
        for which in order {
            let port = free_port().unwrap();
            gateways[which] =
                Some(Gateway::start(bins[which], copies[which].path(), port, backend).await);
        }
        let gateways = gateways.map(Option::unwrap);
        let deadline = Instant::now() + Duration::from_secs(900);
        while sum(sims, |s| &s.accepted) < accepted_before + 2 * agents {
            assert!(Instant::now() < deadline, "not all connected to both");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cold = gateways.each_ref().map(|g| cpu_time(g.pid()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_before = gateways.each_ref().map(|g| cpu_time(g.pid()));
        let pongs_before = sum(sims, |s| &s.pongs);
        tokio::time::sleep(Duration::from_secs(idle_secs)).await;
        let idle = gateways
            .each_ref()
            .map(|g| cpu_time(g.pid()))
            .into_iter()
            .zip(idle_before)
            .map(|(after, before)| after.saturating_sub(before));
        // Both send the same heartbeats: half the pongs are each one's.
        let pongs = (sum(sims, |s| &s.pongs) - pongs_before).max(2) / 2;
        let mut measured = [Round::default(); 2];
        for ((slot, cold), idle) in measured.iter_mut().zip(cold).zip(idle) {
            *slot = Round {
                cpu_per_session_us: cold.as_secs_f64() * 1e6 / agents as f64,
                idle_percent: idle.as_secs_f64() / idle_secs as f64 * 100.0,
                idle_us_per_heartbeat: idle.as_secs_f64() * 1e6 / pongs as f64,
            };
        }
        for gateway in gateways {
            gateway.stop();
        }
        results.push(measured);
    }
    results
}

fn print_side_by_side(rounds: &[[Round; 2]]) {
    println!(
        "side by side, at the same time   gateway CPU per session at a cold start / CPU while idle (per heartbeat)"
    );
    let mut total = [Round::default(); 2];
    for (n, round) in rounds.iter().enumerate() {
        let [this, base] = round;
        println!(
            "  round {}                        this {:.0} us / {:.2} % ({:.1} us); baseline {:.0} us / {:.2} % ({:.1} us)",
            n + 1,
            this.cpu_per_session_us,
            this.idle_percent,
            this.idle_us_per_heartbeat,
            base.cpu_per_session_us,
            base.idle_percent,
            base.idle_us_per_heartbeat,
        );
        for (sum, one) in total.iter_mut().zip(round) {
            sum.cpu_per_session_us += one.cpu_per_session_us;
            sum.idle_percent += one.idle_percent;
            sum.idle_us_per_heartbeat += one.idle_us_per_heartbeat;
        }
    }
    let n = rounds.len().max(1) as f64;
    let [this, base] = total;
    println!(
        "  mean                           this {:.0} us / {:.2} % ({:.1} us); baseline {:.0} us / {:.2} % ({:.1} us); this/baseline {:.3} / {:.3}",
        this.cpu_per_session_us / n,
        this.idle_percent / n,
        this.idle_us_per_heartbeat / n,
        base.cpu_per_session_us / n,
        base.idle_percent / n,
        base.idle_us_per_heartbeat / n,
        this.cpu_per_session_us / base.cpu_per_session_us,
        this.idle_us_per_heartbeat / base.idle_us_per_heartbeat,
    );
}
