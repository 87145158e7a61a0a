//! Kubernetes API proxy benchmark: the same requests sent straight to a Kubernetes API
//! stand-in (an HTTP server in this process) and through a real gateway (`kas-gateway serve`,
//! a child process, on SQLite) and the agent's session, side by side in the same run.
//!
//! 1. Added latency of a small `GET` (a ConfigMap, a few hundred bytes of JSON) over
//!    keep-alive HTTP/1.1: sequential requests, then several concurrent clients; direct and
//!    proxied alternate in blocks, so that both meet the same machine, and so does the same
//!    request refused by the gateway after every check (what the tunnel adds is the rest).
//!    The agent is a real `kas-gateway agent` process (grpc://, JWT) whose upstream is the
//!    stand-in.
//! 2. One large response (a generated log, streamed in 64 KiB chunks): MiB/s direct and
//!    proxied, and how much the gateway's and the agent's resident memory grow meanwhile.
//! 3. Memory with many open watches: a fresh gateway, AGENTS agents (in this process, each
//!    with its own URL configuration, all sharing the stand-in), WATCHES_PER_AGENT watches
//!    through each, an event on every watch every EVENT_EVERY_SECONDS: the gateway's
//!    resident memory with the agents idle and with the watches open, its CPU in both
//!    states, and whether every watch gets its events.
//!
//!   scripts/bench-k8s-proxy        (builds in release mode and runs this)
//!
//! Environment: GATEWAY_BIN (target/release/kas-gateway), SEQUENTIAL (5000), CLIENTS (16),
//! CONCURRENT_SECONDS (10, per side), BIG_MIB (100), BIG_RUNS (3), AGENTS (100),
//! WATCHES_PER_AGENT (10), EVENT_EVERY_SECONDS (5), IDLE_SECONDS (30), REOPEN_ROUNDS (3: the
//! watches opened and closed again, to tell memory kept from memory leaked), GATEWAY_LOG_LEVEL
//! (info: the access log and the proxy's audit line, as in production), SKIP (comma-separated
//! parts to leave out: latency, big, watches).

mod common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::routing::get;
use bytes::Bytes;
use common::{cpu_time, env_or, free_port, load_average, rss_kib, status_kib};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kas_gateway::agent::{AccessAs, Upstream};
use kas_gateway::agent_sim::{AgentSim, AgentSimConfig, SimEvents};
use kas_gateway::clock::SystemClock;
use kas_gateway::crypto::Secret;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const ROOT_TOKEN: &str = "glpat-k8s-proxy-bench-root-token-0000";
const UPSTREAM_TOKEN: &str = "bench-upstream-service-account-token";
/// The small request: one ConfigMap.
const SMALL_PATH: &str = "/api/v1/namespaces/default/configmaps/x";
/// The large response: a pod's log of `?bytes=` bytes.
const LOG_PATH: &str = "/api/v1/namespaces/default/pods/big/log";
/// A watch of the namespace's ConfigMaps.
const WATCH_PATH: &str = "/api/v1/namespaces/default/configmaps?watch=true";
/// The size of each chunk the stand-in writes for the large response.
const LOG_CHUNK: usize = 64 * 1024;
/// Sequential requests are sent in blocks of this many, direct and proxied in turn.
const BLOCK: usize = 500;
const MIB: f64 = 1024.0 * 1024.0;

/// Time zero for the watch events' timestamps (the stand-in and the clients share it).
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn micros_since_epoch() -> u64 {
    u64::try_from(EPOCH.elapsed().as_micros()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------
// The Kubernetes API stand-in.

/// What the stand-in serves and counts.
struct Stand {
    configmap: Bytes,
    chunk: Bytes,
    event_every: Duration,
    watches_opened: AtomicU64,
    watches_open: AtomicI64,
}

/// Counts a watch as open while its response body lives.
struct OpenWatch(Arc<Stand>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.watches_open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == format!("Bearer {UPSTREAM_TOKEN}").as_bytes())
}

fn respond(status: StatusCode, content_type: &'static str, body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    response
}

fn unauthorized() -> http::Response<Body> {
    respond(
        StatusCode::UNAUTHORIZED,
        "application/json",
        Body::from(r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":401}"#),
    )
}

async fn configmap(State(stand): State<Arc<Stand>>, headers: HeaderMap) -> http::Response<Body> {
    if !authorized(&headers) {
        return unauthorized();
    }
    respond(
        StatusCode::OK,
        "application/json",
        Body::from(stand.configmap.clone()),
    )
}

#[derive(serde::Deserialize)]
struct LogQuery {
    bytes: u64,
}

/// `bytes` bytes of log, one shared chunk written again and again: nothing is held.
async fn log(
    State(stand): State<Arc<Stand>>,
    Query(query): Query<LogQuery>,
    headers: HeaderMap,
) -> http::Response<Body> {
    if !authorized(&headers) {
        return unauthorized();
    }
    let chunk = stand.chunk.clone();
    let stream = futures::stream::unfold(query.bytes, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = usize::try_from(left).map_or(chunk.len(), |left| left.min(chunk.len()));
            Some((Ok::<_, Infallible>(chunk.slice(..n)), left - n as u64))
        }
    });
    respond(StatusCode::OK, "text/plain", Body::from_stream(stream))
}

/// A watch: a `MODIFIED` event every `event_every`, the first after an offset that spreads
/// the watches over the period; each event carries when it was sent.
async fn watch(State(stand): State<Arc<Stand>>, headers: HeaderMap) -> http::Response<Body> {
    if !authorized(&headers) {
        return unauthorized();
    }
    let n = stand.watches_opened.fetch_add(1, Ordering::SeqCst);
    stand.watches_open.fetch_add(1, Ordering::SeqCst);
    let every = stand.event_every;
    let offset = every.mul_f64((n % 997) as f64 / 997.0);
    let first = tokio::time::Instant::now() + offset;
    let guard = OpenWatch(Arc::clone(&stand));
    let stream = futures::stream::unfold(
        (guard, first, 1u64),
        move |(guard, at, seq)| async move {
            tokio::time::sleep_until(at).await;
            let line = format!(
                "{{\"type\":\"MODIFIED\",\"object\":{{\"kind\":\"ConfigMap\",\"apiVersion\":\"v1\",\
             \"metadata\":{{\"name\":\"x\",\"namespace\":\"default\",\"resourceVersion\":\"{seq}\"}},\
             \"data\":{{\"sent_us\":\"{}\"}}}}}}\n",
                micros_since_epoch()
            );
            Some((
                Ok::<_, Infallible>(Bytes::from(line)),
                (guard, at + every, seq + 1),
            ))
        },
    );
    respond(
        StatusCode::OK,
        "application/json",
        Body::from_stream(stream),
    )
}

/// Serves the stand-in on a loopback port; its base URL.
async fn start_stand(stand: Arc<Stand>) -> Result<String> {
    let router = axum::Router::new()
        .route(
            "/version",
            get(|| async { axum::Json(json!({"gitVersion": "v1.31.0-bench"})) }),
        )
        .route(SMALL_PATH, get(configmap))
        .route(LOG_PATH, get(log))
        .route("/api/v1/namespaces/default/configmaps", get(watch))
        .with_state(stand);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            eprintln!("the Kubernetes API stand-in stopped: {error}");
        }
    });
    Ok(url)
}

fn configmap_body() -> Bytes {
    Bytes::from(
        json!({
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {
                "name": "x",
                "namespace": "default",
                "uid": "3f0c6a52-5b1e-4c53-9d7e-0a4f1b9c2d11",
                "resourceVersion": "4711",
                "creationTimestamp": "2026-11-26T00:00:00Z",
                "labels": {"app.kubernetes.io/name": "bench"},
            },
            "data": {"greeting": "hello", "colour": "blue", "size": "small"},
        })
        .to_string(),
    )
}

// ---------------------------------------------------------------------------------------
// Processes.

/// A child process (the gateway or an agent), killed if still running when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 30 s).
    fn stop(mut self) -> Result<()> {
        common::stop(&mut self.child)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        common::reap(&mut self.child);
    }
}

/// A `kas-gateway serve` on a free loopback port, SQLite in `dir`, JSON logs in `dir`.
struct Gateway {
    process: Process,
    base: String,
}

impl Gateway {
    async fn start(bench: &Bench, dir: &Path, max_requests_per_user: usize) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let log = dir.join("gateway.log");
        let port = free_port()?;
        let child = Command::new(&bench.bin)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KAS_GATEWAY_DATA_DIR", dir)
            .env("KAS_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("KAS_GATEWAY_OBSERVABILITY_LISTEN", "127.0.0.1:0")
            .env("KAS_GATEWAY_BOOTSTRAP_TOKEN", ROOT_TOKEN)
            .env("KAS_GATEWAY_LOG_FORMAT", "json")
            .env("KAS_GATEWAY_LOG_LEVEL", &bench.log_level)
            .env(
                "KAS_GATEWAY_K8S_PROXY_MAX_REQUESTS_PER_USER",
                max_requests_per_user.to_string(),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {} (build it first)", bench.bin))?;
        let mut process = Process { child, log };
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = bench
                .rest
                .get(format!("{base}/-/readiness"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok();
            if status == Some(200) {
                break;
            }
            if let Some(exit) = process.exited()? {
                bail!(
                    "the gateway exited at start ({exit}); its log: {}",
                    process.log.display()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the gateway was not ready in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { process, base })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// `kas-gateway agent` over grpc:// with the configuration's JWT key, its upstream the stand-in.
fn start_agent_process(
    bench: &Bench,
    dir: &Path,
    port: u16,
    agent: &CreatedAgent,
) -> Result<Process> {
    let token_file = dir.join("agent-token");
    std::fs::write(&token_file, &agent.token)?;
    let upstream_token_file = dir.join("upstream-token");
    std::fs::write(&upstream_token_file, UPSTREAM_TOKEN)?;
    let log = dir.join("agent.log");
    let child = Command::new(&bench.bin)
        .arg("agent")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--token-file")
        .arg(&token_file)
        .args(["--jwt-public-key", &agent.public_key])
        .args(["--upstream-url", &bench.upstream])
        .arg("--upstream-token-file")
        .arg(&upstream_token_file)
        .args(["--log-format", "json", "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {} agent", bench.bin))?;
    Ok(Process { child, log })
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Resets a process's peak resident set (`VmHWM`) to its current one; false where the
/// kernel does not allow it.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Lines of a gateway's log that are warnings or errors, and audit lines of proxied requests.
fn log_counts(path: &Path) -> (Vec<String>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut warnings = Vec::new();
    let mut proxied = 0;
    for line in text.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if matches!(entry["level"].as_str(), Some("WARN" | "ERROR")) {
            warnings.push(line.to_owned());
        }
        if entry["message"] == "proxied" {
            proxied += 1;
        }
    }
    (warnings, proxied)
}

// ---------------------------------------------------------------------------------------
// Set-up through the REST API.

struct Bench {
    bin: String,
    log_level: String,
    root: tempfile::TempDir,
    rest: reqwest::Client,
    upstream: String,
    stand: Arc<Stand>,
}

async fn post(bench: &Bench, base: &str, path: &str, body: Value) -> Result<Value> {
    let response = bench
        .rest
        .post(format!("{base}/api/v4{path}"))
        .header("Private-Token", ROOT_TOKEN)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(status.is_success(), "POST {path}: {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

fn id_of(value: &Value) -> Result<i64> {
    value["id"]
        .as_i64()
        .ok_or_else(|| anyhow!("no id in {value}"))
}

fn string_of(value: &Value, key: &str) -> Result<String> {
    value[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no {key} in {value}"))
}

/// A project, and a Developer of it with a `k8s_proxy` token; (project id, token).
async fn project_and_developer(bench: &Bench, base: &str) -> Result<(i64, String)> {
    let project = id_of(&post(bench, base, "/projects", json!({"name": "bench"})).await?)?;
    let token = member_with_token(bench, base, project, "dev", 30).await?;
    Ok((project, token))
}

/// A new user, a member of `project` at `access_level`, with a `k8s_proxy` token; the token.
async fn member_with_token(
    bench: &Bench,
    base: &str,
    project: i64,
    username: &str,
    access_level: i64,
) -> Result<String> {
    let user = id_of(
        &post(
            bench,
            base,
            "/users",
            json!({"username": username, "name": username, "email": format!("{username}@example.com")}),
        )
        .await?,
    )?;
    let token = post(
        bench,
        base,
        &format!("/users/{user}/personal_access_tokens"),
        json!({"name": "bench", "scopes": ["k8s_proxy"]}),
    )
    .await?;
    post(
        bench,
        base,
        &format!("/projects/{project}/members"),
        json!({"user_id": user, "access_level": access_level}),
    )
    .await?;
    string_of(&token, "token")
}

struct CreatedAgent {
    id: i64,
    token: String,
    public_key: String,
}

/// An agent with a token and a `grpc://127.0.0.1:<port>` URL configuration (JWT mode).
async fn create_agent(
    bench: &Bench,
    base: &str,
    project: i64,
    name: &str,
    port: u16,
) -> Result<CreatedAgent> {
    let agents = format!("/projects/{project}/cluster_agents");
    let id = id_of(&post(bench, base, &agents, json!({"name": name})).await?)?;
    let token = post(
        bench,
        base,
        &format!("{agents}/{id}/tokens"),
        json!({"name": "t"}),
    )
    .await?;
    let configuration = post(
        bench,
        base,
        &format!("{agents}/{id}/url_configurations"),
        json!({"url": format!("grpc://127.0.0.1:{port}")}),
    )
    .await?;
    Ok(CreatedAgent {
        id,
        token: string_of(&token, "token")?,
        public_key: string_of(&configuration, "public_key")?,
    })
}

async fn wait_connected(bench: &Bench, base: &str, project: i64, agent: i64) -> Result<()> {
    let url = format!("{base}/api/v4/projects/{project}/cluster_agents/{agent}/connection");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state: Value = bench
            .rest
            .get(&url)
            .header("Private-Token", ROOT_TOKEN)
            .send()
            .await?
            .json()
            .await?;
        if state["state"] == "connected" {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "agent {agent} not connected after 60 s: {state}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The load: a lean HTTP/1.1 client, as kubectl over plain HTTP.

type HttpClient = Client<HttpConnector, Body>;

fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Where requests go: the stand-in itself, or the gateway's proxy for one agent.
#[derive(Clone)]
struct Target {
    label: &'static str,
    base: String,
    authorization: HeaderValue,
    /// The status every answer must have.
    status: StatusCode,
}

impl Target {
    fn request(&self, path: &str) -> Result<http::Request<Body>> {
        Ok(http::Request::get(format!("{}{path}", self.base))
            .header(http::header::AUTHORIZATION, self.authorization.clone())
            .body(Body::empty())?)
    }
}

/// One small GET, its body read whole; how long it took. An answer of 200 must have
/// `expected` bytes.
async fn small(client: &HttpClient, target: &Target, expected: usize) -> Result<Duration> {
    let started = Instant::now();
    let response = client.request(target.request(SMALL_PATH)?).await?;
    let status = response.status();
    let body = axum::body::to_bytes(Body::new(response.into_body()), 1 << 20).await?;
    let took = started.elapsed();
    ensure!(
        status == target.status && (status != StatusCode::OK || body.len() == expected),
        "{}: {status}, {} bytes: {}",
        target.label,
        body.len(),
        String::from_utf8_lossy(&body)
    );
    Ok(took)
}

/// Latencies, sorted.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn new(mut all: Vec<Duration>) -> Self {
        all.sort_unstable();
        Self(all)
    }

    fn quantile(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.0.len() as f64) * q).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    fn mean(&self) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.iter().sum::<Duration>() / u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// CPU time of the gateway and of the agent process over some stretches of work.
#[derive(Default, Clone, Copy)]
struct Cpu {
    gateway: Duration,
    agent: Duration,
}

/// The processes whose CPU is measured: the gateway and the agent.
struct Pids {
    gateway: u32,
    agent: u32,
}

impl Pids {
    fn cpu(&self) -> Cpu {
        Cpu {
            gateway: cpu_time(self.gateway),
            agent: cpu_time(self.agent),
        }
    }

    fn add_since(&self, total: &mut Cpu, before: Cpu) {
        let now = self.cpu();
        total.gateway += now.gateway.saturating_sub(before.gateway);
        total.agent += now.agent.saturating_sub(before.agent);
    }
}

/// Part 1's latencies, direct then proxied, and the CPU of the proxied ones.
struct LatencyResult {
    sequential: [Latencies; 2],
    sequential_cpu: Cpu,
    /// The same request refused after every check of the caller (no tunnel).
    refused: Latencies,
    refused_cpu: Cpu,
    concurrent: [Latencies; 2],
    concurrent_elapsed: [Duration; 2],
    concurrent_cpu: Cpu,
}

/// Part 1: sequential, then concurrent small GETs, direct and proxied in turn; sequential
/// ones refused by the gateway after every check (`refused`) in the same turns.
async fn latency(
    targets: &[Target; 2],
    refused: &Target,
    pids: &Pids,
    sequential: usize,
    clients: usize,
    concurrent_for: Duration,
) -> Result<LatencyResult> {
    let expected = configmap_body().len();
    let client = http_client();
    // Warm-up: connections, allocators, the gateway's database caches.
    for target in targets.iter().chain([refused]) {
        for _ in 0..200 {
            small(&client, target, expected).await?;
        }
    }
    let mut seq: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut seq_cpu = Cpu::default();
    let mut refusals = Vec::new();
    let mut refused_cpu = Cpu::default();
    let mut done = 0;
    while done < sequential {
        let n = BLOCK.min(sequential - done);
        for (side, target) in targets.iter().enumerate() {
            let before = pids.cpu();
            for _ in 0..n {
                seq[side].push(small(&client, target, expected).await?);
            }
            if side == 1 {
                pids.add_since(&mut seq_cpu, before);
            }
        }
        let before = pids.cpu();
        for _ in 0..n {
            refusals.push(small(&client, refused, expected).await?);
        }
        pids.add_since(&mut refused_cpu, before);
        done += n;
    }

    // Concurrent: `clients` closed loops, each on its own keep-alive connection; two rounds
    // of half the time per side, in turn.
    let mut conc: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut elapsed = [Duration::ZERO; 2];
    let mut conc_cpu = Cpu::default();
    for target in targets {
        closed_loops(&client, target, clients, Duration::from_secs(1), expected).await?;
    }
    for _round in 0..2 {
        for (side, target) in targets.iter().enumerate() {
            let before = pids.cpu();
            let started = Instant::now();
            let latencies =
                closed_loops(&client, target, clients, concurrent_for / 2, expected).await?;
            elapsed[side] += started.elapsed();
            if side == 1 {
                pids.add_since(&mut conc_cpu, before);
            }
            conc[side].extend(latencies);
        }
    }
    let [seq_direct, seq_proxied] = seq;
    let [conc_direct, conc_proxied] = conc;
    Ok(LatencyResult {
        sequential: [Latencies::new(seq_direct), Latencies::new(seq_proxied)],
        sequential_cpu: seq_cpu,
        refused: Latencies::new(refusals),
        refused_cpu,
        concurrent: [Latencies::new(conc_direct), Latencies::new(conc_proxied)],
        concurrent_elapsed: elapsed,
        concurrent_cpu: conc_cpu,
    })
}

/// `clients` tasks sending small GETs back to back for `duration`; every latency.
async fn closed_loops(
    client: &HttpClient,
    target: &Target,
    clients: usize,
    duration: Duration,
    expected: usize,
) -> Result<Vec<Duration>> {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, target) = (client.clone(), target.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    latencies.push(small(&client, &target, expected).await?);
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

struct Download {
    took: Duration,
    gateway_peak_kib: u64,
    gateway_growth_kib: u64,
    agent_growth_kib: u64,
    cpu: Cpu,
}

/// Part 2: one large response, read as it comes; the time, and how much the processes'
/// resident sets grew at their peak.
async fn download(
    client: &HttpClient,
    target: &Target,
    bytes: u64,
    pids: &Pids,
) -> Result<Download> {
    let before_kib = [rss_kib(pids.gateway), rss_kib(pids.agent)];
    let exact = reset_peak(pids.gateway) && reset_peak(pids.agent);
    // Sampled too, where the peak cannot be reset.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        let (gateway, agent) = (pids.gateway, pids.agent);
        std::thread::spawn(move || {
            let mut peak = [0u64; 2];
            while !stop.load(Ordering::Relaxed) {
                peak[0] = peak[0].max(rss_kib(gateway));
                peak[1] = peak[1].max(rss_kib(agent));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let cpu_before = pids.cpu();
    let started = Instant::now();
    let response = client
        .request(target.request(&format!("{LOG_PATH}?bytes={bytes}"))?)
        .await?;
    ensure!(
        response.status() == StatusCode::OK,
        "{}: {}",
        target.label,
        response.status()
    );
    let mut data = Body::new(response.into_body()).into_data_stream();
    let mut received = 0u64;
    while let Some(chunk) = data.next().await {
        received += chunk?.len() as u64;
    }
    let took = started.elapsed();
    let mut cpu = Cpu::default();
    pids.add_since(&mut cpu, cpu_before);
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler
        .join()
        .map_err(|_| anyhow!("the memory sampler failed"))?;
    ensure!(
        received == bytes,
        "{}: {received} of {bytes} bytes",
        target.label
    );
    let peak = if exact {
        [
            status_kib(pids.gateway, "VmHWM:").max(sampled[0]),
            status_kib(pids.agent, "VmHWM:").max(sampled[1]),
        ]
    } else {
        sampled
    };
    Ok(Download {
        took,
        gateway_peak_kib: peak[0],
        gateway_growth_kib: peak[0].saturating_sub(before_kib[0]),
        agent_growth_kib: peak[1].saturating_sub(before_kib[1]),
        cpu,
    })
}

// ---------------------------------------------------------------------------------------
// Part 3: watches.

/// What one watch's client saw.
#[derive(Default)]
struct WatchSeen {
    events: AtomicU64,
    ended: AtomicBool,
}

struct WatchSettings {
    agents: usize,
    /// Times the watches are opened and closed again after the measured round.
    rounds: usize,
    per_agent: usize,
    event_every: Duration,
    idle: Duration,
}

struct WatchResult {
    agents: usize,
    watches: usize,
    connected_after: Duration,
    rss_baseline_kib: u64,
    rss_idle_kib: u64,
    rss_watching_kib: u64,
    rss_after_kib: u64,
    /// Resident set with the watches open again and after they left, for each further round.
    rounds: Vec<(u64, u64)>,
    files_idle: usize,
    files_watching: usize,
    cpu_idle: Duration,
    cpu_watching: Duration,
    idle: Duration,
    event_every: Duration,
    opened_in: Duration,
    all_had_events_after: Duration,
    events_in_window: u64,
    fewest_in_window: u64,
    expected_per_watch: u64,
    lags: Latencies,
    upstream_closed_after: Option<Duration>,
    warnings: Vec<String>,
}

/// Open watches, each a task reading its events on its own connection.
struct Watches {
    client: HttpClient,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    seen: Vec<Arc<WatchSeen>>,
    failed: Arc<Mutex<Vec<String>>>,
    lags: Arc<Mutex<Vec<Duration>>>,
    measuring: Arc<AtomicBool>,
}

impl Watches {
    /// Opens `total` watches through `agents` in turn, 50 at a time (as many kubectl
    /// processes starting would), and waits until every one has its response head.
    async fn open(base: &str, agents: &[i64], user_token: &str, total: usize) -> Result<Self> {
        let client = http_client();
        let seen: Vec<Arc<WatchSeen>> = (0..total).map(|_| Arc::default()).collect();
        let opened = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::<String>::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(50));
        let lags = Arc::new(Mutex::new(Vec::<Duration>::new()));
        let measuring = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::with_capacity(total);
        for (i, seen) in seen.iter().enumerate() {
            let agent = agents[i % agents.len()];
            let target = Target {
                label: "proxied",
                base: base.to_owned(),
                authorization: HeaderValue::try_from(format!("Bearer pat:{agent}:{user_token}"))?,
                status: StatusCode::OK,
            };
            let (client, seen, opened, failed, gate, lags, measuring) = (
                client.clone(),
                Arc::clone(seen),
                Arc::clone(&opened),
                Arc::clone(&failed),
                Arc::clone(&gate),
                Arc::clone(&lags),
                Arc::clone(&measuring),
            );
            tasks.push(tokio::spawn(async move {
                let outcome: Result<()> = async {
                    let turn = gate.acquire_owned().await?;
                    let response = client.request(target.request(WATCH_PATH)?).await?;
                    drop(turn);
                    ensure!(
                        response.status() == StatusCode::OK,
                        "watch through agent {agent}: {}",
                        response.status()
                    );
                    opened.fetch_add(1, Ordering::SeqCst);
                    let mut data = Body::new(response.into_body()).into_data_stream();
                    let mut pending = Vec::new();
                    while let Some(chunk) = data.next().await {
                        pending.extend_from_slice(&chunk?);
                        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=end).collect();
                            let event: Value = serde_json::from_slice(&line)?;
                            let sent: u64 = event["object"]["data"]["sent_us"]
                                .as_str()
                                .and_then(|s| s.parse().ok())
                                .ok_or_else(|| anyhow!("an event without sent_us: {event}"))?;
                            seen.events.fetch_add(1, Ordering::SeqCst);
                            if measuring.load(Ordering::Relaxed) {
                                let lag = Duration::from_micros(
                                    micros_since_epoch().saturating_sub(sent),
                                );
                                if let Ok(mut lags) = lags.lock() {
                                    lags.push(lag);
                                }
                            }
                        }
                    }
                    Ok(())
                }
                .await;
                seen.ended.store(true, Ordering::SeqCst);
                if let Err(error) = outcome
                    && let Ok(mut failed) = failed.lock()
                {
                    failed.push(format!("{error:#}"));
                }
            }));
        }
        let watches = Self {
            client,
            tasks,
            seen,
            failed,
            lags,
            measuring,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while opened.load(Ordering::SeqCst) < total {
            let failed_now = watches.failures();
            if let Some(first) = failed_now.first() {
                bail!("{} watches failed, the first: {first}", failed_now.len());
            }
            ensure!(
                Instant::now() < deadline,
                "only {} of {total} watches open after 120 s",
                opened.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(watches)
    }

    fn failures(&self) -> Vec<String> {
        self.failed.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// The clients leave; how long until every watch ended upstream (`None`: not within 20 s).
    async fn close(self, stand: &Stand) -> Option<Duration> {
        for task in &self.tasks {
            task.abort();
        }
        drop(self.client);
        let left = Instant::now();
        while left.elapsed() < Duration::from_secs(20) {
            if stand.watches_open.load(Ordering::SeqCst) == 0 {
                return Some(left.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

async fn watches(bench: &Bench, settings: &WatchSettings) -> Result<WatchResult> {
    let total = settings.agents * settings.per_agent;
    let dir = bench.root.path().join("watches");
    let gateway = Gateway::start(bench, &dir, total + 100).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_baseline_kib = rss_kib(gateway.pid());
    let (project, user_token) = project_and_developer(bench, &gateway.base).await?;
    let upstream = Arc::new(Upstream::new(
        &bench.upstream,
        None,
        Some(Secret::new(UPSTREAM_TOKEN)),
        AccessAs::Agent,
    )?);
    let mut listeners = Vec::with_capacity(settings.agents);
    for _ in 0..settings.agents {
        listeners.push(TcpListener::bind("127.0.0.1:0").await?);
    }
    let started = Instant::now();
    let mut sims = Vec::with_capacity(settings.agents);
    let mut agent_ids = Vec::with_capacity(settings.agents);
    for (i, listener) in listeners.into_iter().enumerate() {
        let port = listener.local_addr()?.port();
        let agent = create_agent(
            bench,
            &gateway.base,
            project,
            &format!("watch-{i:03}"),
            port,
        )
        .await?;
        let config = AgentSimConfig {
            token: agent.token,
            tls: None,
            client_ca: None,
            jwt_public_key: Some(agent.public_key),
            jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
            metadata: Default::default(),
            clock: Arc::new(SystemClock),
        };
        sims.push(AgentSim::start_with_upstream(
            config,
            Some(Arc::clone(&upstream)),
            listener,
        )?);
        agent_ids.push(agent.id);
    }
    let events: Vec<Arc<SimEvents>> = sims.iter().map(|s| Arc::clone(&s.events)).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !events.iter().all(|e| {
        e.open_sessions.load(Ordering::SeqCst) == 1 && e.accepted.load(Ordering::SeqCst) > 0
    }) {
        ensure!(
            Instant::now() < deadline,
            "not every agent connected in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_after = started.elapsed();
    for id in &agent_ids {
        wait_connected(bench, &gateway.base, project, *id).await?;
    }
    // Idle with the agents connected: heartbeats only.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = cpu_time(gateway.pid());
    tokio::time::sleep(settings.idle).await;
    let cpu_idle = cpu_time(gateway.pid()).saturating_sub(cpu_before);
    let rss_idle_kib = rss_kib(gateway.pid());
    let files_idle = open_files(gateway.pid());
    let (warnings_before, _) = log_counts(&gateway.process.log);

    let base = format!("{}/k8s-proxy", gateway.base);
    let open_started = Instant::now();
    let watching = Watches::open(&base, &agent_ids, &user_token, total).await?;
    let opened_in = open_started.elapsed();
    let deadline = Instant::now() + settings.event_every * 2 + Duration::from_secs(10);
    while !watching
        .seen
        .iter()
        .all(|s| s.events.load(Ordering::SeqCst) > 0)
    {
        let quiet = watching
            .seen
            .iter()
            .filter(|s| s.events.load(Ordering::SeqCst) == 0)
            .count();
        ensure!(
            Instant::now() < deadline,
            "{quiet} of {total} watches had no event yet"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_had_events_after = open_started.elapsed();

    // Idle with the watches open: an event on each every `event_every`.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts_before: Vec<u64> = watching
        .seen
        .iter()
        .map(|s| s.events.load(Ordering::SeqCst))
        .collect();
    watching.measuring.store(true, Ordering::SeqCst);
    let cpu_before = cpu_time(gateway.pid());
    tokio::time::sleep(settings.idle).await;
    let cpu_watching = cpu_time(gateway.pid()).saturating_sub(cpu_before);
    watching.measuring.store(false, Ordering::SeqCst);
    let rss_watching_kib = rss_kib(gateway.pid());
    let files_watching = open_files(gateway.pid());
    let in_window: Vec<u64> = watching
        .seen
        .iter()
        .zip(&counts_before)
        .map(|(s, before)| s.events.load(Ordering::SeqCst) - before)
        .collect();
    let ended = watching
        .seen
        .iter()
        .filter(|s| s.ended.load(Ordering::SeqCst))
        .count();
    let failed_now = watching.failures();
    ensure!(
        ended == 0 && failed_now.is_empty(),
        "{ended} watches ended while idle; failures: {failed_now:?}"
    );
    let lags = Latencies::new(watching.lags.lock().map(|l| l.clone()).unwrap_or_default());

    // The clients leave: every watch must end upstream too.
    let upstream_closed_after = watching.close(&bench.stand).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after_kib = rss_kib(gateway.pid());
    // Opened and closed again: memory that the first round left behind and that later rounds
    // do not add to is the allocator's to reuse, not a leak.
    let mut rounds = Vec::with_capacity(settings.rounds);
    for _ in 0..settings.rounds {
        let again = Watches::open(&base, &agent_ids, &user_token, total).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let open_kib = rss_kib(gateway.pid());
        again.close(&bench.stand).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        rounds.push((open_kib, rss_kib(gateway.pid())));
    }
    let (warnings, _) = log_counts(&gateway.process.log);
    let warnings = warnings.into_iter().skip(warnings_before.len()).collect();
    gateway.process.stop()?;
    for sim in sims {
        sim.stop().await;
    }
    let expected_per_watch =
        (settings.idle.as_secs_f64() / settings.event_every.as_secs_f64()).floor() as u64;
    Ok(WatchResult {
        agents: settings.agents,
        watches: total,
        connected_after,
        rss_baseline_kib,
        rss_idle_kib,
        rss_watching_kib,
        rss_after_kib,
        rounds,
        files_idle,
        files_watching,
        cpu_idle,
        cpu_watching,
        idle: settings.idle,
        event_every: settings.event_every,
        opened_in,
        all_had_events_after,
        events_in_window: in_window.iter().sum(),
        fewest_in_window: in_window.iter().copied().min().unwrap_or(0),
        expected_per_watch,
        lags,
        upstream_closed_after,
        warnings,
    })
}

// ---------------------------------------------------------------------------------------
// Report.

fn print_latency(result: &LatencyResult, sequential: usize, clients: usize) {
    let [direct, proxied] = &result.sequential;
    println!();
    println!(
        "1. Small GET {SMALL_PATH} ({} bytes of JSON), keep-alive HTTP/1.1",
        configmap_body().len()
    );
    println!("   sequential, {sequential} each (blocks of {BLOCK}, direct and proxied in turn)");
    println!(
        "   {:<22} {:>12} {:>12} {:>12}",
        "", "direct", "proxied", "added"
    );
    let row = |name: &str, d: Duration, p: Duration| {
        println!(
            "   {:<22} {:>12} {:>12} {:>12}",
            name,
            ms(d),
            ms(p),
            format!("{:+.3} ms", (p.as_secs_f64() - d.as_secs_f64()) * 1e3)
        );
    };
    row("mean", direct.mean(), proxied.mean());
    row("p50", direct.quantile(0.5), proxied.quantile(0.5));
    row("p99", direct.quantile(0.99), proxied.quantile(0.99));
    row("max", direct.max(), proxied.max());
    let per = |cpu: Duration, n: usize| cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
    println!(
        "   CPU per proxied request: gateway {:.0} us, agent {:.0} us",
        per(result.sequential_cpu.gateway, proxied.0.len()),
        per(result.sequential_cpu.agent, proxied.0.len())
    );
    let refused = &result.refused;
    println!(
        "   refused with 403 after every check (token, agent, role; no tunnel), same turns: \
         mean {}, p50 {}, p99 {}; gateway CPU {:.0} us",
        ms(refused.mean()),
        ms(refused.quantile(0.5)),
        ms(refused.quantile(0.99)),
        per(result.refused_cpu.gateway, refused.0.len())
    );
    let [direct, proxied] = &result.concurrent;
    let rate = |n: usize, elapsed: Duration| n as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "   {clients} concurrent clients (closed loops, {:.0} s per side in two rounds)",
        result.concurrent_elapsed[0].as_secs_f64()
    );
    println!(
        "   {:<22} {:>12.0} {:>12.0} {:>11.1}%",
        "requests/s",
        rate(direct.0.len(), result.concurrent_elapsed[0]),
        rate(proxied.0.len(), result.concurrent_elapsed[1]),
        rate(proxied.0.len(), result.concurrent_elapsed[1])
            / rate(direct.0.len(), result.concurrent_elapsed[0]).max(1e-9)
            * 100.0
    );
    row("p50", direct.quantile(0.5), proxied.quantile(0.5));
    row("p99", direct.quantile(0.99), proxied.quantile(0.99));
    row("max", direct.max(), proxied.max());
    println!(
        "   CPU per proxied request: gateway {:.0} us, agent {:.0} us",
        per(result.concurrent_cpu.gateway, proxied.0.len()),
        per(result.concurrent_cpu.agent, proxied.0.len())
    );
}

fn print_downloads(runs: &[[Download; 2]], bytes: u64) {
    let mib = bytes as f64 / MIB;
    println!();
    println!(
        "2. One response of {mib:.0} MiB ({LOG_PATH}, 64 KiB chunks upstream), read as it comes"
    );
    println!(
        "   {:<6} {:>14} {:>14} {:>28} {:>20} {:>22}",
        "run",
        "direct MiB/s",
        "proxied MiB/s",
        "gateway RSS peak (growth)",
        "agent RSS growth",
        "CPU gateway / agent"
    );
    for (i, [direct, proxied]) in runs.iter().enumerate() {
        println!(
            "   {:<6} {:>14.1} {:>14.1} {:>12.1} MiB ({:>5.1} MiB) {:>16.1} MiB {:>13.2} s / {:.2} s",
            i + 1,
            mib / direct.took.as_secs_f64(),
            mib / proxied.took.as_secs_f64(),
            proxied.gateway_peak_kib as f64 / 1024.0,
            proxied.gateway_growth_kib as f64 / 1024.0,
            proxied.agent_growth_kib as f64 / 1024.0,
            proxied.cpu.gateway.as_secs_f64(),
            proxied.cpu.agent.as_secs_f64()
        );
    }
    let mut direct: Vec<f64> = runs.iter().map(|r| mib / r[0].took.as_secs_f64()).collect();
    let mut proxied: Vec<f64> = runs.iter().map(|r| mib / r[1].took.as_secs_f64()).collect();
    direct.sort_by(f64::total_cmp);
    proxied.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(0.0);
    let cpu_per_mib = runs
        .iter()
        .map(|r| r[1].cpu.gateway.as_secs_f64())
        .sum::<f64>()
        / (mib * runs.len() as f64);
    println!(
        "   median: direct {:.0} MiB/s, proxied {:.1} MiB/s ({:.1}%); gateway CPU {:.2} ms per MiB",
        median(&direct),
        median(&proxied),
        median(&proxied) / median(&direct).max(1e-9) * 100.0,
        cpu_per_mib * 1e3
    );
}

fn print_watches(w: &WatchResult) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!();
    println!(
        "3. {} watches ({WATCH_PATH}) through {} agents, an event on each every {:.0} s",
        w.watches,
        w.agents,
        w.event_every.as_secs_f64()
    );
    println!(
        "   agents connected after      {:.2} s (created one by one through the API)",
        w.connected_after.as_secs_f64()
    );
    println!(
        "   gateway RSS                 {:.1} MiB at start, {:.1} MiB with the agents idle, {:.1} MiB with the watches open, {:.1} MiB after they left",
        mib(w.rss_baseline_kib),
        mib(w.rss_idle_kib),
        mib(w.rss_watching_kib),
        mib(w.rss_after_kib)
    );
    for (i, (open, after)) in w.rounds.iter().enumerate() {
        println!(
            "   again ({}), opened, closed   {:.1} MiB open, {:.1} MiB after they left",
            i + 2,
            mib(*open),
            mib(*after)
        );
    }
    println!(
        "   memory per open watch       {:.1} KiB",
        w.rss_watching_kib.saturating_sub(w.rss_idle_kib) as f64 / w.watches.max(1) as f64
    );
    println!(
        "   gateway open files          {} idle, {} with the watches open",
        w.files_idle, w.files_watching
    );
    println!(
        "   watches open after          {:.2} s; every watch had an event after {:.2} s",
        w.opened_in.as_secs_f64(),
        w.all_had_events_after.as_secs_f64()
    );
    let idle = w.idle.as_secs_f64();
    println!(
        "   gateway CPU, {idle:.0} s windows  {:.2} % of a core with the agents idle, {:.2} % with the watches open",
        w.cpu_idle.as_secs_f64() / idle * 100.0,
        w.cpu_watching.as_secs_f64() / idle * 100.0
    );
    let events = w.events_in_window.max(1) as f64;
    println!(
        "   events in the window        {} ({:.0}/s), fewest on one watch {} (expected {}); {:.0} us of gateway CPU per event",
        w.events_in_window,
        w.events_in_window as f64 / idle,
        w.fewest_in_window,
        w.expected_per_watch,
        w.cpu_watching.saturating_sub(w.cpu_idle).as_secs_f64() * 1e6 / events
    );
    println!(
        "   event delivery, stand-in to client: p50 {}, p99 {}, max {}",
        ms(w.lags.quantile(0.5)),
        ms(w.lags.quantile(0.99)),
        ms(w.lags.max())
    );
    match w.upstream_closed_after {
        Some(after) => println!(
            "   clients gone: every watch ended upstream after {:.2} s",
            after.as_secs_f64()
        ),
        None => println!("   clients gone: watches still open upstream after 20 s"),
    }
    if !w.warnings.is_empty() {
        println!(
            "   the gateway logged {} warnings or errors meanwhile; the first:",
            w.warnings.len()
        );
        for line in w.warnings.iter().take(3) {
            println!("     {line}");
        }
    }
}

/// What the run does, from the environment.
struct Settings {
    sequential: usize,
    clients: usize,
    concurrent_for: Duration,
    big_bytes: u64,
    big_runs: usize,
    watches: WatchSettings,
    skip: HashSet<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    LazyLock::force(&EPOCH);
    let settings = Settings {
        sequential: env_or("SEQUENTIAL", 5000)?,
        clients: env_or("CLIENTS", 16)?,
        concurrent_for: Duration::from_secs(env_or("CONCURRENT_SECONDS", 10)?),
        big_bytes: env_or::<u64>("BIG_MIB", 100)? * 1024 * 1024,
        big_runs: env_or("BIG_RUNS", 3)?,
        watches: WatchSettings {
            agents: env_or("AGENTS", 100)?,
            rounds: env_or("REOPEN_ROUNDS", 3)?,
            per_agent: env_or("WATCHES_PER_AGENT", 10)?,
            event_every: Duration::from_secs(env_or("EVENT_EVERY_SECONDS", 5)?),
            idle: Duration::from_secs(env_or("IDLE_SECONDS", 30)?),
        },
        skip: std::env::var("SKIP")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    let stand = Arc::new(Stand {
        configmap: configmap_body(),
        chunk: Bytes::from(
            (0..LOG_CHUNK)
                .map(|i| {
                    if i % 100 == 99 {
                        b'\n'
                    } else {
                        b'a' + (i % 26) as u8
                    }
                })
                .collect::<Vec<u8>>(),
        ),
        event_every: settings.watches.event_every,
        watches_opened: AtomicU64::new(0),
        watches_open: AtomicI64::new(0),
    });
    let upstream = start_stand(Arc::clone(&stand)).await?;
    let bench = Bench {
        bin: std::env::var("GATEWAY_BIN").unwrap_or_else(|_| "target/release/kas-gateway".into()),
        log_level: std::env::var("GATEWAY_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
        root: tempfile::tempdir()?,
        rest: reqwest::Client::new(),
        upstream,
        stand,
    };
    let outcome = run(&bench, &settings).await;
    if outcome.is_err() {
        // The gateway's and the agent's logs, for a look at what went wrong.
        let kept = bench.root.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    outcome
}

async fn run(bench: &Bench, settings: &Settings) -> Result<()> {
    let skip = &settings.skip;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "kas-gateway Kubernetes API proxy benchmark: {cpus} CPUs, load average {}",
        load_average()
    );
    println!(
        "gateway: {} serve (child process, SQLite, {} logs); upstream: an HTTP/1.1 server in this \
         process; parts 1 and 2: one `kas-gateway agent` process (grpc://, JWT); part 3: agents \
         in this process",
        bench.bin, bench.log_level
    );

    if !(skip.contains("latency") && skip.contains("big")) {
        let dir = bench.root.path().join("proxy");
        let gateway = Gateway::start(bench, &dir, 1000).await?;
        let (project, user_token) = project_and_developer(bench, &gateway.base).await?;
        let reporter_token = member_with_token(bench, &gateway.base, project, "rep", 20).await?;
        let port = free_port()?;
        let agent = create_agent(bench, &gateway.base, project, "single", port).await?;
        let agent_process = start_agent_process(bench, &dir, port, &agent)?;
        wait_connected(bench, &gateway.base, project, agent.id).await?;
        let pids = Pids {
            gateway: gateway.pid(),
            agent: agent_process.pid(),
        };
        let targets = [
            Target {
                label: "direct",
                base: bench.upstream.clone(),
                authorization: HeaderValue::try_from(format!("Bearer {UPSTREAM_TOKEN}"))?,
                status: StatusCode::OK,
            },
            Target {
                label: "proxied",
                base: format!("{}/k8s-proxy", gateway.base),
                authorization: HeaderValue::try_from(format!(
                    "Bearer pat:{}:{user_token}",
                    agent.id
                ))?,
                status: StatusCode::OK,
            },
        ];
        let refused = Target {
            label: "refused",
            base: format!("{}/k8s-proxy", gateway.base),
            authorization: HeaderValue::try_from(format!(
                "Bearer pat:{}:{reporter_token}",
                agent.id
            ))?,
            status: StatusCode::FORBIDDEN,
        };
        let (warnings_before, _) = log_counts(&gateway.process.log);
        let mut proxied_requests = 0;
        if !skip.contains("latency") {
            let result = latency(
                &targets,
                &refused,
                &pids,
                settings.sequential,
                settings.clients,
                settings.concurrent_for,
            )
            .await?;
            proxied_requests += result.sequential[1].0.len() + result.concurrent[1].0.len();
            print_latency(&result, settings.sequential, settings.clients);
        }
        if !skip.contains("big") {
            let client = http_client();
            // A first, unmeasured transfer each way: connections, buffers.
            for target in &targets {
                download(&client, target, 8 * 1024 * 1024, &pids).await?;
            }
            let mut runs = Vec::with_capacity(settings.big_runs);
            for _ in 0..settings.big_runs {
                let direct = download(&client, &targets[0], settings.big_bytes, &pids).await?;
                let proxied = download(&client, &targets[1], settings.big_bytes, &pids).await?;
                runs.push([direct, proxied]);
            }
            proxied_requests += settings.big_runs;
            print_downloads(&runs, settings.big_bytes);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (warnings, audited) = log_counts(&gateway.process.log);
        let warnings: Vec<String> = warnings.into_iter().skip(warnings_before.len()).collect();
        println!();
        println!(
            "   audit lines (`proxied`) in the gateway's log: {audited} (at least {proxied_requests} measured requests and the warm-up); {} warnings or errors while measured",
            warnings.len()
        );
        for line in warnings.iter().take(3) {
            println!("     {line}");
        }
        let agent_log = agent_process.log.clone();
        agent_process.stop()?;
        gateway.process.stop()?;
        let agent_warnings = std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .lines()
            .count();
        if agent_warnings > 0 {
            println!("   the agent logged {agent_warnings} lines at warn or above");
        }
    }

    if !skip.contains("watches") {
        let result = watches(bench, &settings.watches).await?;
        print_watches(&result);
    }
    println!();
    println!("load average at the end: {}", load_average());
    Ok(())
}
