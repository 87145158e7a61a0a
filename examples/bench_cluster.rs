//! Cluster benchmark: real `kas-gateway` replicas (child processes) on a fresh PostgreSQL
//! database, N simulated TLS agents in this process. For each lease TTL it measures:
//!
//! 1. failover after `kill -9` of one of three replicas: for each agent the killed replica
//!    held, the time from the kill until the agent accepted a new session (agent side);
//! 2. a fourth replica joining: the time until it holds its fair share and every agent it
//!    took is connected again, and each moved agent's longest down time;
//! 3. the statements per second the idle cluster sends to PostgreSQL
//!    (`pg_stat_database.xact_commit` of the benchmark's database, read from another
//!    database so that the benchmark's own reads are not in it), at N and at a larger count.
//!
//!   scripts/bench-cluster [AGENTS]        (builds in release mode and runs this)

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use common::{env_or, free_port, load_average};
use futures::StreamExt;
use kas_gateway::agent_sim::{AgentSim, AgentSimConfig, SimEvents};
use kas_gateway::certs::DevCa;
use kas_gateway::clock::SystemClock;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::net::TcpListener;

const TOKEN: &str = "glpat-cluster-bench-root-token-0000";
const ENCRYPTION_KEYS: &str = "k1=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const DEFAULT_TTL: u64 = 15;
/// How often the agent-side sampler looks at every agent.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// What one run (a fresh database and cluster) does.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    agents: usize,
    ttl: u64,
    failover: bool,
}

/// Settings shared by every run.
struct Bench {
    bin: String,
    admin_url: String,
    idle: Duration,
    root: tempfile::TempDir,
    ca_pem: String,
    server: (String, String),
    client: reqwest::Client,
}

/// One run's database: its name and URL.
struct Run {
    name: String,
    database: String,
}

/// A `kas-gateway serve` child process.
struct Replica {
    name: String,
    child: Child,
    base: String,
}

impl Replica {
    fn spawn(bench: &Bench, run: &Run, name: &str, ttl: u64) -> Result<Self> {
        let database = run.database.as_str();
        let dir = bench.root.path().join(&run.name).join(name);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("log.json"))?;
        let port = free_port()?;
        let mut command = Command::new(&bench.bin);
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KAS_GATEWAY_DATA_DIR", &dir)
            .env("KAS_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("KAS_GATEWAY_OBSERVABILITY_LISTEN", "127.0.0.1:0")
            .env("KAS_GATEWAY_BOOTSTRAP_TOKEN", TOKEN)
            .env("KAS_GATEWAY_DATABASE_URL", database)
            .env("KAS_GATEWAY_ENCRYPTION_KEYS", ENCRYPTION_KEYS)
            .env("KAS_GATEWAY_REPLICA_ID", name)
            .env("KAS_GATEWAY_LOG_FORMAT", "json")
            .env("KAS_GATEWAY_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if ttl != DEFAULT_TTL {
            command.env("KAS_GATEWAY_LEASE_TTL_SECONDS", ttl.to_string());
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} (build it first)", bench.bin))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    /// Waits until `/-/readiness` answers 200.
    async fn ready(&mut self, client: &reqwest::Client) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = client
                .get(format!("{}/-/readiness", self.base))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok();
            if status == Some(200) {
                return Ok(());
            }
            if let Some(exit) = self.child.try_wait()? {
                bail!("{} exited at start: {exit}", self.name);
            }
            ensure!(
                Instant::now() < deadline,
                "{} not ready within 60 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 30 s).
    fn stop(mut self) -> Result<()> {
        common::stop(&mut self.child)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        common::reap(&mut self.child);
    }
}

async fn post(client: &reqwest::Client, base: &str, path: &str, body: Value) -> Result<Value> {
    let response = client
        .post(format!("{base}/api/v4{path}"))
        .header("Private-Token", TOKEN)
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

/// The simulated agents, with their agent ids.
struct Agents {
    sims: Vec<AgentSim>,
    events: Vec<Arc<SimEvents>>,
    index: HashMap<i64, usize>,
}

impl Agents {
    fn all_open(&self) -> bool {
        self.events
            .iter()
            .all(|e| e.open_sessions.load(Ordering::SeqCst) == 1)
    }

    fn accepted(&self) -> Vec<u64> {
        self.events
            .iter()
            .map(|e| e.accepted.load(Ordering::SeqCst))
            .collect()
    }

    fn most_sessions_at_once(&self) -> i64 {
        self.events
            .iter()
            .map(|e| e.max_open_sessions.load(Ordering::SeqCst))
            .max()
            .unwrap_or(0)
    }

    async fn stop(self) {
        for sim in self.sims {
            sim.stop().await;
        }
    }
}

/// Creates `count` agents, each with a token and a URL configuration, through a gateway that
/// leaves (SIGTERM: releases everything) before the agents are served, then serves them.
async fn create_agents(bench: &Bench, run: &Run, count: usize) -> Result<Agents> {
    let mut setup = Replica::spawn(bench, run, "setup", DEFAULT_TTL)?;
    setup.ready(&bench.client).await?;
    let project = post(
        &bench.client,
        &setup.base,
        "/projects",
        json!({"name": "bench"}),
    )
    .await?;
    let agents_path = format!("/projects/{}/cluster_agents", id_of(&project)?);
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        listeners.push(TcpListener::bind("127.0.0.1:0").await?);
    }
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    let base = setup.base.clone();
    let created: Vec<Result<(i64, String)>> = futures::stream::iter(ports.iter().enumerate())
        .map(|(i, port)| {
            let (client, base, agents_path, ca) = (
                bench.client.clone(),
                base.clone(),
                agents_path.clone(),
                bench.ca_pem.clone(),
            );
            let port = *port;
            async move {
                let agent = post(
                    &client,
                    &base,
                    &agents_path,
                    json!({"name": format!("agent-{i:05}")}),
                )
                .await?;
                let agent_id = id_of(&agent)?;
                let token = post(
                    &client,
                    &base,
                    &format!("{agents_path}/{agent_id}/tokens"),
                    json!({"name": "t"}),
                )
                .await?;
                post(
                    &client,
                    &base,
                    &format!("{agents_path}/{agent_id}/url_configurations"),
                    json!({"url": format!("grpcs://localhost:{port}"), "ca_cert": ca}),
                )
                .await?;
                let token = token["token"]
                    .as_str()
                    .ok_or_else(|| anyhow!("no token in {token}"))?
                    .to_owned();
                Ok((agent_id, token))
            }
        })
        .buffered(8)
        .collect()
        .await;
    setup.stop()?;
    let mut sims = Vec::with_capacity(count);
    let mut index = HashMap::with_capacity(count);
    for (i, (listener, created)) in listeners.into_iter().zip(created).enumerate() {
        let (agent_id, token) = created?;
        index.insert(agent_id, i);
        let config = AgentSimConfig {
            token,
            tls: Some(bench.server.clone()),
            client_ca: None,
            jwt_public_key: None,
            jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
            metadata: Default::default(),
            clock: Arc::new(SystemClock),
        };
        sims.push(AgentSim::start(config, listener)?);
    }
    let events = sims.iter().map(|s| Arc::clone(&s.events)).collect();
    Ok(Agents {
        sims,
        events,
        index,
    })
}

/// Samples every agent every few milliseconds on its own thread (not the runtime that serves
/// the agents): when each first accepted a new session after the start, and its longest time
/// with no session open.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Samples>,
}

struct Samples {
    reaccepted_at: Vec<Option<Instant>>,
    longest_down: Vec<Duration>,
}

impl Sampler {
    fn start(events: &[Arc<SimEvents>]) -> Self {
        let events: Vec<Arc<SimEvents>> = events.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let baseline: Vec<u64> = events
            .iter()
            .map(|e| e.accepted.load(Ordering::SeqCst))
            .collect();
        let thread = std::thread::spawn(move || {
            let n = events.len();
            let mut reaccepted_at = vec![None; n];
            let mut longest_down = vec![Duration::ZERO; n];
            let mut down_since: Vec<Option<Instant>> = vec![None; n];
            loop {
                let now = Instant::now();
                let last = stopped.load(Ordering::SeqCst);
                for (i, e) in events.iter().enumerate() {
                    if reaccepted_at[i].is_none() && e.accepted.load(Ordering::SeqCst) > baseline[i]
                    {
                        reaccepted_at[i] = Some(now);
                    }
                    let open = e.open_sessions.load(Ordering::SeqCst);
                    match (open, down_since[i]) {
                        (0, None) => down_since[i] = Some(now),
                        (0, Some(since)) if last => {
                            longest_down[i] = longest_down[i].max(now - since);
                        }
                        (0, Some(_)) => {}
                        (_, Some(since)) => {
                            longest_down[i] = longest_down[i].max(now - since);
                            down_since[i] = None;
                        }
                        (_, None) => {}
                    }
                }
                if last {
                    return Samples {
                        reaccepted_at,
                        longest_down,
                    };
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Self { stop, thread }
    }

    fn finish(self) -> Result<Samples> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow!("the sampler thread panicked"))
    }
}

/// Watches every agent for the whole run and notes each time one is seen with two sessions
/// open at once (the high-water mark in [`SimEvents`] catches overlaps shorter than a sample).
struct Doubles {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(usize, Instant)>>,
}

impl Doubles {
    fn watch(events: &[Arc<SimEvents>]) -> Self {
        let events: Vec<Arc<SimEvents>> = events.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut double = vec![false; events.len()];
            while !stopped.load(Ordering::SeqCst) {
                let now = Instant::now();
                for (i, e) in events.iter().enumerate() {
                    let two = e.open_sessions.load(Ordering::SeqCst) >= 2;
                    if two && !double[i] {
                        seen.push((i, now));
                    }
                    double[i] = two;
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
            seen
        });
        Self { stop, thread }
    }

    fn finish(self) -> Result<Vec<(usize, Instant)>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow!("the watching thread panicked"))
    }
}

/// `q`-quantile (nearest rank) of sorted values.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Agents held per live replica, by replica id.
async fn held_per_replica(db: &mut PgConnection) -> Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT r.replica_id, count(a.agent_id) FROM replicas r \
         LEFT JOIN agent_assignments a ON a.holder = r.incarnation \
         WHERE r.expires_at > now() GROUP BY r.replica_id",
    )
    .fetch_all(&mut *db)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Waits until every agent has one session, the replicas' shares are balanced (each at most
/// its fair share + 1) and no agent accepted a new session for `quiet`.
async fn settle(
    db: &mut PgConnection,
    agents: &Agents,
    replicas: usize,
    quiet: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let n = i64::try_from(agents.sims.len())?;
    let live = i64::try_from(replicas)?;
    let share = (n + live - 1) / live;
    let mut last = agents.accepted();
    let mut unchanged_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let accepted = agents.accepted();
        if accepted != last {
            last = accepted;
            unchanged_since = Instant::now();
        }
        let held = held_per_replica(db).await?;
        let balanced = held.len() == replicas
            && held.values().sum::<i64>() == n
            && held.values().all(|c| *c <= share + 1);
        if balanced && agents.all_open() && unchanged_since.elapsed() >= quiet {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the cluster did not settle within 600 s: {held:?}"
        );
    }
}

/// Statements per second the idle cluster sends, with what they touched.
struct Load {
    window: Duration,
    /// Statements in the window before, which may still hold some warm-up.
    first_commits: i64,
    commits: i64,
    rollbacks: i64,
    rows_returned: i64,
    rows_fetched: i64,
    tables: Vec<String>,
    sessions_accepted: u64,
}

/// Samples, four times a second for `window`, whether an autovacuum worker is at work on the
/// database; returns how many samples found one.
async fn autovacuum_during(admin: &mut PgConnection, name: &str, window: Duration) -> Result<u32> {
    let until = Instant::now() + window;
    let mut seen = 0;
    while Instant::now() < until {
        let workers: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND backend_type = 'autovacuum worker'",
        )
        .bind(name)
        .fetch_one(&mut *admin)
        .await?;
        if workers > 0 {
            seen += 1;
        }
        tokio::time::sleep(
            Duration::from_millis(250).min(until.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    Ok(seen)
}

/// The database's transaction and row counters, and the server's time.
async fn stat_database(
    admin: &mut PgConnection,
    name: &str,
) -> Result<(i64, i64, i64, i64, String)> {
    Ok(sqlx::query_as(
        "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, now()::text \
         FROM pg_stat_database WHERE datname = $1",
    )
    .bind(name)
    .fetch_one(&mut *admin)
    .await?)
}

type TableStats = BTreeMap<String, [i64; 6]>;

async fn stat_tables(db: &mut PgConnection) -> Result<TableStats> {
    let rows: Vec<(String, i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, seq_scan, coalesce(idx_scan, 0), seq_tup_read, n_tup_ins, \
         n_tup_upd, n_tup_del FROM pg_stat_user_tables",
    )
    .fetch_all(&mut *db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(t, a, b, c, d, e, f)| (t, [a, b, c, d, e, f]))
        .collect())
}

/// Measures two windows of `window` back to back, with nothing else talking to the
/// benchmark's database: the counters are read over a connection to another database. The
/// first window shows what is left of the warm-up (each pooled connection prepares each
/// statement once, and a prepare is a transaction of its own); the second is the figure.
async fn measure_load(
    admin: &mut PgConnection,
    db: &mut PgConnection,
    name: &str,
    agents: &Agents,
    window: Duration,
) -> Result<Load> {
    // Autovacuum's transactions count in the database's counters too: vacuum and analyse
    // what the setup and the start wrote now, so that no autovacuum is due in the windows
    // (they are watched for all the same).
    sqlx::raw_sql("VACUUM (ANALYZE)").execute(&mut *db).await?;
    // Idle backends report their counters up to 10 s late: let the settling settle in them.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let tables_before = stat_tables(db).await?;
    let tables_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let accepted_before: u64 = agents.accepted().iter().sum();
    let first = stat_database(admin, name).await?;
    let mut autovacuum = autovacuum_during(admin, name, window).await?;
    let before = stat_database(admin, name).await?;
    let started = Instant::now();
    autovacuum += autovacuum_during(admin, name, window).await?;
    let after = stat_database(admin, name).await?;
    let window = started.elapsed();
    let accepted_after: u64 = agents.accepted().iter().sum();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let tables_after = stat_tables(db).await?;
    let span = tables_from.elapsed().as_secs_f64();
    let mut tables = Vec::new();
    for (table, after) in &tables_after {
        let before = tables_before.get(table).copied().unwrap_or_default();
        let d: Vec<f64> = after
            .iter()
            .zip(before)
            .map(|(a, b)| (a - b) as f64 / span)
            .collect();
        if d.iter().any(|v| *v != 0.0) {
            tables.push(format!(
                "{table}: per second over {span:.0} s: seq scans {:.2}, index scans {:.2}, \
                 rows read by seq scans {:.0}, inserted {:.2}, updated {:.2}, deleted {:.2}",
                d[0], d[1], d[2], d[3], d[4], d[5]
            ));
        }
    }
    println!(
        "  (windows by the server's clock: {} to {} to {}; autovacuum seen at work in {} of \
         the samples taken every 250 ms)",
        first.4, before.4, after.4, autovacuum
    );
    Ok(Load {
        window,
        first_commits: before.0 - first.0,
        commits: after.0 - before.0,
        rollbacks: after.1 - before.1,
        rows_returned: after.2 - before.2,
        rows_fetched: after.3 - before.3,
        tables,
        sessions_accepted: accepted_after - accepted_before,
    })
}

struct Failover {
    count: usize,
    lease_left: f64,
    p50: Duration,
    p90: Duration,
    min: Duration,
    max: Duration,
    others_reconnected: usize,
}

struct Join {
    ready: Duration,
    share_claimed: Duration,
    share: i64,
    moved: usize,
    first_moved: Duration,
    last_moved: Duration,
    down_p50: Duration,
    down_max: Duration,
    held: BTreeMap<String, i64>,
}

struct Outcome {
    scenario: Scenario,
    connected: Duration,
    load: Load,
    failover: Option<Failover>,
    join: Option<Join>,
    most_at_once: i64,
    doubles: usize,
    load_average: String,
}

async fn kill_one(
    db: &mut PgConnection,
    agents: &Agents,
    victim: &mut Replica,
    ttl: u64,
) -> Result<Failover> {
    let (incarnation, lease_left): (String, f64) = sqlx::query_as(
        "SELECT incarnation, extract(epoch FROM expires_at - now())::float8 FROM replicas \
         WHERE replica_id = $1 AND expires_at > now()",
    )
    .bind(&victim.name)
    .fetch_one(&mut *db)
    .await?;
    let held: Vec<i64> =
        sqlx::query_scalar("SELECT agent_id FROM agent_assignments WHERE holder = $1")
            .bind(&incarnation)
            .fetch_all(&mut *db)
            .await?;
    let held: Vec<usize> = held
        .iter()
        .map(|id| {
            agents
                .index
                .get(id)
                .copied()
                .ok_or_else(|| anyhow!("unknown agent {id}"))
        })
        .collect::<Result<_>>()?;
    let baseline = agents.accepted();
    let sampler = Sampler::start(&agents.events);
    let killed_at = Instant::now();
    victim.child.kill()?;
    victim.child.wait()?;
    let deadline = killed_at + Duration::from_secs(ttl + 90);
    loop {
        let accepted = agents.accepted();
        if held.iter().all(|i| accepted[*i] > baseline[*i]) && agents.all_open() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the killed replica's agents were not all taken over within {} s",
            ttl + 90
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let samples = sampler.finish()?;
    let mut times = Vec::with_capacity(held.len());
    for i in &held {
        let at = samples.reaccepted_at[*i].ok_or_else(|| anyhow!("agent {i} not sampled"))?;
        times.push(at.saturating_duration_since(killed_at));
    }
    times.sort();
    let others_reconnected = samples
        .reaccepted_at
        .iter()
        .enumerate()
        .filter(|(i, at)| at.is_some() && !held.contains(i))
        .count();
    Ok(Failover {
        count: held.len(),
        lease_left,
        p50: quantile(&times, 0.5),
        p90: quantile(&times, 0.9),
        min: times.first().copied().unwrap_or_default(),
        max: times.last().copied().unwrap_or_default(),
        others_reconnected,
    })
}

async fn join_one(
    bench: &Bench,
    run: &Run,
    db: &mut PgConnection,
    agents: &Agents,
    replicas: &mut Vec<Replica>,
    ttl: u64,
) -> Result<Join> {
    let n = i64::try_from(agents.sims.len())?;
    let live = i64::try_from(replicas.len() + 1)?;
    let share = (n + live - 1) / live;
    // The others keep up to share + 1 each: the newcomer's share is what is left then, at least.
    let target = (n - (live - 1) * (share + 1)).max(1).min(share);
    let sampler = Sampler::start(&agents.events);
    let started = Instant::now();
    let mut newcomer = Replica::spawn(bench, run, "gw-3", ttl)?;
    newcomer.ready(&bench.client).await?;
    let ready = started.elapsed();
    replicas.push(newcomer);
    let deadline = started + Duration::from_secs(ttl * 3 + 60);
    let share_claimed = loop {
        let held = held_per_replica(db).await?;
        if held.get("gw-3").copied().unwrap_or(0) >= target && agents.all_open() {
            break started.elapsed();
        }
        ensure!(
            Instant::now() < deadline,
            "the new replica did not take its share: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Later moves, if any, are in the figures too.
    settle(db, agents, replicas.len(), Duration::from_secs(ttl / 3 + 1)).await?;
    let samples = sampler.finish()?;
    let mut moved = Vec::new();
    let mut down = Vec::new();
    for (at, longest) in samples.reaccepted_at.iter().zip(&samples.longest_down) {
        if let Some(at) = at {
            moved.push(at.saturating_duration_since(started));
            down.push(*longest);
        }
    }
    moved.sort();
    down.sort();
    Ok(Join {
        ready,
        share_claimed,
        share,
        moved: moved.len(),
        first_moved: moved.first().copied().unwrap_or_default(),
        last_moved: moved.last().copied().unwrap_or_default(),
        down_p50: quantile(&down, 0.5),
        down_max: down.last().copied().unwrap_or_default(),
        held: held_per_replica(db).await?,
    })
}

async fn measure(bench: &Bench, scenario: Scenario, run: &Run) -> Result<Outcome> {
    let Scenario {
        agents: count,
        ttl,
        failover,
    } = scenario;
    println!(
        "\n== {count} agents, 3 replicas, lease TTL {ttl} s{} (load average {})",
        if ttl == DEFAULT_TTL { " (default)" } else { "" },
        load_average()
    );
    let setup_started = Instant::now();
    let agents = create_agents(bench, run, count).await?;
    if std::env::var("BENCH_LOG_STATEMENTS").is_ok_and(|v| v == "1") {
        // Every statement of the replicas (not of the setup) in the server's log, with its
        // parse and bind steps: what the idle statements are.
        let mut admin = PgConnection::connect(&bench.admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {} SET log_min_duration_statement = 0",
            run.name
        )))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
    }
    println!(
        "setup: {count} agents, tokens and URL configurations in {}",
        secs(setup_started.elapsed())
    );
    let mut admin = PgConnection::connect(&bench.admin_url).await?;
    let mut db = PgConnection::connect(&run.database).await?;
    let doubles = Doubles::watch(&agents.events);
    let mut phases: Vec<(&str, Instant)> = vec![("start of 3 replicas", Instant::now())];

    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Replica::spawn(bench, run, &format!("gw-{i}"), ttl)?);
    }
    for replica in &mut replicas {
        replica.ready(&bench.client).await?;
    }
    let quiet = Duration::from_secs(ttl / 3 + 1);
    let connected = settle(&mut db, &agents, 3, quiet).await?;
    println!(
        "3 replicas started, every agent connected and the shares balanced after {} \
         (including {} without a new session): {:?}",
        secs(connected),
        secs(quiet),
        held_per_replica(&mut db).await?
    );

    phases.push(("idle windows", Instant::now()));
    let load = measure_load(&mut admin, &mut db, &run.name, &agents, bench.idle).await?;
    let per_second = load.commits as f64 / load.window.as_secs_f64();
    let rounds = 3.0 * load.window.as_secs_f64() / (ttl as f64 / 3.0);
    println!(
        "idle load, first window of {}: {} statements (warm-up left, if any)",
        secs(load.window),
        load.first_commits
    );
    println!(
        "idle load over the next {}: {} statements committed ({} rolled back) = {per_second:.2}/s, \
         {:.2}/s per 1,000 agents, {:.1} per replica per heartbeat ({} s); \
         rows returned {:.0}/s, fetched {:.0}/s; sessions accepted meanwhile: {}",
        secs(load.window),
        load.commits,
        load.rollbacks,
        per_second / (count as f64 / 1000.0),
        load.commits as f64 / rounds,
        ttl / 3,
        load.rows_returned as f64 / load.window.as_secs_f64(),
        load.rows_fetched as f64 / load.window.as_secs_f64(),
        load.sessions_accepted,
    );
    for table in &load.tables {
        println!("  {table}");
    }

    let mut outcome = Outcome {
        scenario,
        connected,
        load,
        failover: None,
        join: None,
        most_at_once: 0,
        doubles: 0,
        load_average: String::new(),
    };
    if failover {
        phases.push(("kill -9", Instant::now()));
        let mut victim = replicas.remove(0);
        let f = kill_one(&mut db, &agents, &mut victim, ttl).await?;
        println!(
            "kill -9 of {} (lease left {:.2} s by the database's clock): its {} agents accepted \
             a new session after p50 {}, p90 {}, min {}, max {} (other agents reconnected: {}; \
             load average {})",
            victim.name,
            f.lease_left,
            f.count,
            secs(f.p50),
            secs(f.p90),
            secs(f.min),
            secs(f.max),
            f.others_reconnected,
            load_average()
        );
        drop(victim);
        outcome.failover = Some(f);

        // Back to three, then a fourth joins.
        phases.push(("replacement joining", Instant::now()));
        let replacement_started = Instant::now();
        let mut replacement = Replica::spawn(bench, run, "gw-0r", ttl)?;
        replacement.ready(&bench.client).await?;
        replicas.push(replacement);
        let took = settle(&mut db, &agents, 3, quiet).await?;
        println!(
            "a replacement replica joined the 2 survivors; balanced after {} ({} since its start)",
            secs(took),
            secs(replacement_started.elapsed())
        );
        phases.push(("4th replica joining", Instant::now()));
        let j = join_one(bench, run, &mut db, &agents, &mut replicas, ttl).await?;
        println!(
            "a 4th replica: ready after {}, held its share ({} of {count}, fair share {}) with \
             every agent connected after {}; {} agents moved, accepted by their new holder \
             from {} to {} after the start; longest down time per moved agent p50 {}, max {}; \
             now {:?} (load average {})",
            secs(j.ready),
            j.held.get("gw-3").copied().unwrap_or(0),
            j.share,
            secs(j.share_claimed),
            j.moved,
            secs(j.first_moved),
            secs(j.last_moved),
            secs(j.down_p50),
            secs(j.down_max),
            j.held,
            load_average()
        );
        outcome.join = Some(j);
    }
    let seen = doubles.finish()?;
    let ids: HashMap<usize, i64> = agents.index.iter().map(|(id, i)| (*i, *id)).collect();
    for (k, (phase, from)) in phases.iter().enumerate() {
        let until = phases.get(k + 1).map(|(_, at)| *at);
        let during: Vec<String> = seen
            .iter()
            .filter(|(_, at)| at >= from && until.is_none_or(|u| *at < u))
            .map(|(i, at)| {
                format!(
                    "agent {} at +{:.2} s",
                    ids.get(i).copied().unwrap_or(-1),
                    at.duration_since(*from).as_secs_f64()
                )
            })
            .collect();
        if !during.is_empty() {
            println!(
                "TWO SESSIONS AT ONCE during {phase}: {} times: {}",
                during.len(),
                during.join(", ")
            );
        }
    }
    outcome.doubles = seen.len();
    outcome.most_at_once = agents.most_sessions_at_once();
    outcome.load_average = load_average();
    println!(
        "most sessions any agent had at once: {}",
        outcome.most_at_once
    );
    for replica in replicas {
        replica.stop()?;
    }
    agents.stop().await;
    admin.close().await?;
    db.close().await?;
    Ok(outcome)
}

async fn with_database(bench: &Bench, scenario: Scenario) -> Result<Outcome> {
    let name = format!(
        "kasgw_bench_cluster_{}_{}_{}",
        std::process::id(),
        scenario.agents,
        scenario.ttl
    );
    let mut admin = PgConnection::connect(&bench.admin_url)
        .await
        .with_context(|| format!("connecting to {}", bench.admin_url))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let base = bench
        .admin_url
        .rsplit_once('/')
        .map_or(bench.admin_url.as_str(), |(b, _)| b);
    let database = format!("{base}/{name}");
    let run = Run {
        name: name.clone(),
        database,
    };
    let outcome = measure(bench, scenario, &run).await;
    let keep = match &outcome {
        Ok(o) => o.most_at_once > 1,
        Err(_) => true,
    };
    if keep {
        // The replicas' logs, for a look at what went wrong.
        match copy_logs(&bench.root.path().join(&name), &name) {
            Ok(kept) => eprintln!("the replicas' logs are in {}", kept.display()),
            Err(error) => eprintln!("could not keep the replicas' logs: {error}"),
        }
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    outcome
}

/// Copies every replica's log under `root` to a directory that outlives the run.
fn copy_logs(root: &Path, name: &str) -> Result<std::path::PathBuf> {
    let kept = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&kept)?;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let log = entry.path().join("log.json");
        if log.is_file() {
            std::fs::copy(
                &log,
                kept.join(format!("{}.json", entry.file_name().to_string_lossy())),
            )?;
        }
    }
    Ok(kept)
}

fn summary(outcomes: &[Outcome]) {
    println!("\n== summary");
    println!(
        "{:>6} {:>5} {:>10} {:>12} {:>16} {:>16} {:>18}",
        "agents",
        "TTL",
        "stmts/s",
        "/s per 1000",
        "per repl·beat",
        "kill -9 p50",
        "kill -9 max (n)"
    );
    for o in outcomes {
        let s = o.scenario;
        let per_second = o.load.commits as f64 / o.load.window.as_secs_f64();
        let rounds = 3.0 * o.load.window.as_secs_f64() / (s.ttl as f64 / 3.0);
        let (p50, max) = match &o.failover {
            Some(f) => (secs(f.p50), format!("{} ({})", secs(f.max), f.count)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:>6} {:>4}s {:>10.2} {:>12.2} {:>16.1} {:>16} {:>18}",
            s.agents,
            s.ttl,
            per_second,
            per_second / (s.agents as f64 / 1000.0),
            o.load.commits as f64 / rounds,
            p50,
            max
        );
    }
    for o in outcomes {
        if let Some(j) = &o.join {
            println!(
                "join, {} agents, TTL {} s: share held and connected after {}, {} moved, \
                 longest down p50 {} max {}",
                o.scenario.agents,
                o.scenario.ttl,
                secs(j.share_claimed),
                j.moved,
                secs(j.down_p50),
                secs(j.down_max)
            );
        }
        println!(
            "{} agents, TTL {} s: first connected and balanced after {}; most sessions at once {} \
             (seen {} times); load average at the end {}",
            o.scenario.agents,
            o.scenario.ttl,
            secs(o.connected),
            o.most_at_once,
            o.doubles,
            o.load_average
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let agents: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("AGENTS must be a number")?,
        None => 1000,
    };
    let ttls: Vec<u64> = std::env::var("TTLS")
        .unwrap_or_else(|_| "15,6".into())
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().parse().context("TTLS: seconds, comma-separated"))
        .collect::<Result<_>>()?;
    let load_agents: usize = env_or("LOAD_AGENTS", agents * 3)?;
    let idle = Duration::from_secs(env_or("IDLE_SECONDS", 30)?);
    let now = time::OffsetDateTime::from_unix_timestamp(
        kas_gateway::clock::Clock::now(&SystemClock).as_secs(),
    )?;
    let ca = DevCa::new("bench CA", now)?;
    let server = ca.server(&["localhost"], now)?;
    let bench = Bench {
        bin: std::env::var("GATEWAY_BIN").unwrap_or_else(|_| "target/release/kas-gateway".into()),
        admin_url: std::env::var("BENCH_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        idle,
        root: tempfile::tempdir()?,
        ca_pem: ca.pair().cert,
        server: (server.cert, server.key),
        client: reqwest::Client::new(),
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "kas-gateway cluster benchmark: {agents} agents, TTLs {ttls:?} s, idle window {} s; \
         {cpus} CPUs, load average {}",
        idle.as_secs(),
        load_average()
    );
    let mut outcomes = Vec::new();
    for ttl in ttls {
        outcomes.push(
            with_database(
                &bench,
                Scenario {
                    agents,
                    ttl,
                    failover: true,
                },
            )
            .await?,
        );
    }
    if load_agents > 0 {
        outcomes.push(
            with_database(
                &bench,
                Scenario {
                    agents: load_agents,
                    ttl: DEFAULT_TTL,
                    failover: false,
                },
            )
            .await?,
        );
    }
    summary(&outcomes);
    Ok(())
}
