//! Several replicas on one PostgreSQL, as real processes: the agents are spread over them by
//! leases, never dialled twice at once (checked from the agents' side), taken over after a
//! `kill -9` within the TTL and a few seconds, and handed over at once on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::binary::{Gateway, send, with_token};
use kas_gateway::agent_sim::{AgentSim, AgentSimConfig};
use kas_gateway::clock::SystemClock;
use kas_gateway::proto::agent::v1 as agent_pb;
use kas_gateway::proto::v1 as pb;
use reqwest::Method;
use serde_json::json;
use tokio::net::TcpListener;

const TOKEN: &str = "glpat-cluster-test-token-0000000";
const AGENTS: usize = 30;
const TTL_SECONDS: u64 = 6;

/// The replicas' shared secret for the private API.
const PRIVATE_API_SECRET: &str = "cHJpdmF0ZS1hcGktc2VjcmV0LWZvci10ZXN0cy0wMDA=";

fn replica(dir: &Path, database: &str, name: &str) -> Gateway {
    let secret = dir.join("private-api-secret");
    std::fs::write(&secret, PRIVATE_API_SECRET).unwrap();
    let mut command = with_token(dir, TOKEN);
    command
        .env("KAS_GATEWAY_PRIVATE_API_LISTEN", "127.0.0.1:0")
        .env("KAS_GATEWAY_PRIVATE_API_SECRET_FILE", &secret)
        .env("KAS_GATEWAY_DATABASE_URL", database)
        .env("KAS_GATEWAY_ENCRYPTION_KEYS", common::PG_ENCRYPTION_KEYS)
        .env("KAS_GATEWAY_REPLICA_ID", name)
        .env("KAS_GATEWAY_LEASE_TTL_SECONDS", TTL_SECONDS.to_string())
        .env("KAS_GATEWAY_LOG_LEVEL", "info");
    Gateway::start(command)
}

/// Project `p` with `count` agents created through `gateway`, each served by a simulated
/// agent; returns the agents' path and the simulators.
async fn agents(gateway: &Gateway, count: usize) -> (String, Vec<AgentSim>) {
    let (_, project) = send(
        Method::POST,
        &gateway.url("/api/v4/projects"),
        TOKEN,
        Some(json!({"name": "p"})),
    )
    .await;
    let agents_path = format!("/api/v4/projects/{}/cluster_agents", project["id"]);
    let mut sims = Vec::new();
    for i in 0..count {
        sims.push(new_agent(gateway, &agents_path, &format!("a{i}")).await);
    }
    (agents_path, sims)
}

/// A gRPC request with the administrator's token.
fn admin<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("private-token", TOKEN.parse().unwrap());
    request
}

async fn sessions_client(
    gateway: &Gateway,
) -> pb::sessions_client::SessionsClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(gateway.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::sessions_client::SessionsClient::new(channel)
}

/// Every session in `state` (or all), as `gateway` reports the cluster's.
async fn list_sessions(gateway: &Gateway, state: pb::SessionState) -> Vec<pb::Session> {
    sessions_client(gateway)
        .await
        .list_sessions(admin(pb::ListSessionsRequest {
            state: state.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .sessions
}

/// Connected sessions held by each of replicas `gw-0` … `gw-{replicas - 1}`, as `gateway`
/// reports them.
async fn connected_by(gateway: &Gateway, replicas: usize) -> Vec<usize> {
    let sessions = list_sessions(gateway, pb::SessionState::Connected).await;
    (0..replicas)
        .map(|i| {
            let name = format!("gw-{i}");
            sessions.iter().filter(|s| s.replica == name).count()
        })
        .collect()
}

/// Waits until every agent has exactly one open session; returns how long it took.
async fn all_connected(sims: &[AgentSim], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let open: Vec<i64> = sims
            .iter()
            .map(|s| s.events.open_sessions.load(Ordering::SeqCst))
            .collect();
        if open.iter().all(|n| *n == 1) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not every agent was connected within {limit:?}: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_never_two(sims: &[AgentSim]) {
    let most: Vec<i64> = sims
        .iter()
        .map(|s| s.events.max_open_sessions.load(Ordering::SeqCst))
        .collect();
    assert!(
        most.iter().all(|n| *n <= 1),
        "an agent had two sessions at once: {most:?}"
    );
}

/// Creates agent `name` with a token and a URL configuration through `gateway`, and serves
/// it with a simulated agent.
async fn new_agent(gateway: &Gateway, agents_path: &str, name: &str) -> AgentSim {
    let (_, agent) = send(
        Method::POST,
        &gateway.url(agents_path),
        TOKEN,
        Some(json!({ "name": name })),
    )
    .await;
    let base = format!("{agents_path}/{}", agent["id"]);
    let (_, token) = send(
        Method::POST,
        &gateway.url(&format!("{base}/tokens")),
        TOKEN,
        Some(json!({"name": "t"})),
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (status, config) = send(
        Method::POST,
        &gateway.url(&format!("{base}/url_configurations")),
        TOKEN,
        Some(json!({"url": format!("grpc://127.0.0.1:{port}")})),
    )
    .await;
    assert_eq!(status, 201, "{config}");
    AgentSim::start(
        AgentSimConfig {
            token: token["token"].as_str().unwrap().to_owned(),
            tls: None,
            client_ca: None,
            jwt_public_key: Some(config["public_key"].as_str().unwrap().to_owned()),
            jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
            metadata: agent_pb::AgentMetadata::default(),
            clock: Arc::new(SystemClock),
        },
        listener,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_agents_and_take_over() {
    if common::postgres_skipped() {
        return;
    }
    let pg = common::PgDatabase::create().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas: Vec<Option<Gateway>> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| Some(replica(dir.path(), &pg.url, &format!("gw-{i}"))))
        .collect();
    let first = replicas[0].as_ref().unwrap();

    let (agents_path, mut sims) = agents(first, AGENTS).await;
    // All connected, each by one replica, spread by fair shares (10 each, ±1).
    all_connected(&sims, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(TTL_SECONDS)).await;
    all_connected(&sims, Duration::from_secs(5)).await;
    // States are written in batches: give the last ones a moment.
    let mut counts = connected_by(first, 3).await;
    for _ in 0..20 {
        if counts.iter().sum::<usize>() == AGENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        counts = connected_by(first, 3).await;
    }
    eprintln!("connected per replica: {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), AGENTS, "{counts:?}");
    assert!(counts.iter().all(|n| (9..=11).contains(n)), "{counts:?}");
    assert_never_two(&sims);

    // A configuration created through any replica is dialled, by whichever takes it, at once.
    let second = replicas[1].as_ref().unwrap();
    let created = Instant::now();
    sims.push(new_agent(second, &agents_path, "late").await);
    all_connected(&sims, Duration::from_secs(10)).await;
    let took = created.elapsed();
    // Typically within 0.1–0.3 s; the bound leaves room for a loaded machine.
    assert!(
        took < Duration::from_secs(TTL_SECONDS / 2),
        "a new configuration was dialled after {took:?}"
    );
    eprintln!("a configuration created through a replica was connected within {took:?}");

    // kill -9 of one replica: the others take its agents once its lease has expired.
    let held = |samples: &[(common::binary::Sample, f64)]| {
        common::binary::metric_value(samples, "kas_gateway_cluster_agents_held", &[])
    };
    let takeovers = |samples: &[(common::binary::Sample, f64)]| {
        common::binary::metric_value(samples, "kas_gateway_cluster_takeovers_total", &[])
    };
    // Read until the shares add up: a replica giving an agent back and another claiming it
    // are a moment apart.
    let deadline = Instant::now() + Duration::from_secs(5);
    let held_before = loop {
        let mut held_now = Vec::new();
        for replica in replicas.iter().flatten() {
            let samples = replica.metrics().await;
            assert_eq!(
                takeovers(&samples),
                0.0,
                "a takeover while every replica was up"
            );
            held_now.push(held(&samples));
        }
        if held_now.iter().sum::<f64>() == (AGENTS + 1) as f64 {
            break held_now;
        }
        assert!(Instant::now() < deadline, "agents held: {held_now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut killed = replicas[0].take().unwrap();
    killed.signal("KILL");
    killed.wait();
    let took = all_connected(&sims, Duration::from_secs(TTL_SECONDS + 10)).await;
    assert!(
        took <= Duration::from_secs(TTL_SECONDS + 3),
        "the agents of a killed replica came back after {took:?}"
    );
    eprintln!("after kill -9, every agent was connected again within {took:?}");
    assert_never_two(&sims);
    // The survivors counted exactly the killed replica's agents as taken over.
    // Read until every one of them is claimed: the agents may notice the dead connections
    // before the survivors' next round.
    let deadline = Instant::now() + Duration::from_secs(TTL_SECONDS + 10);
    let taken = loop {
        let mut taken = 0.0;
        for replica in replicas.iter().flatten() {
            taken += takeovers(&replica.metrics().await);
        }
        if taken >= held_before[0] || Instant::now() >= deadline {
            break taken;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(taken, held_before[0], "takeovers counted");

    // SIGTERM: the replica hangs up and releases at once; the last one takes everything.
    let mut leaving = replicas[1].take().unwrap();
    leaving.signal("TERM");
    assert_eq!(leaving.wait(), Some(0));
    let took = all_connected(&sims, Duration::from_secs(TTL_SECONDS + 10)).await;
    // Released and announced at once: typically taken within 0.1 s; the bound leaves room for
    // a loaded machine.
    assert!(
        leaving
            .log_text()
            .contains("left the cluster: agents released"),
        "the leaving replica did not release its agents"
    );
    assert!(
        took < Duration::from_secs(TTL_SECONDS),
        "the agents of a replica that left came back after {took:?}"
    );
    eprintln!("after SIGTERM, every agent was connected again within {took:?}");
    // The sessions are open; their hellos are being accepted.
    let last = replicas[2].as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while connected_by(last, 3).await[2] != AGENTS + 1 {
        assert!(
            Instant::now() < deadline,
            "the last replica does not hold every agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_never_two(&sims);
    for sim in sims {
        sim.stop().await;
    }
}

/// A TCP proxy in front of PostgreSQL that a test can cut and restore.
struct Proxy {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, watch) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = watch.clone();
                if !*watch.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { port, up }
    }

    fn set(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

/// The database cut for longer than the lease: every replica hangs up by the safety rule
/// (never two sessions for one agent, nothing `failed`), and every agent is connected again
/// shortly after the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_cut_ends_sessions_by_the_safety_rule() {
    if common::postgres_skipped() || !common::postgres_admin_url().contains("127.0.0.1:5432") {
        return;
    }
    let pg = common::PgDatabase::create().await;
    let proxy = Proxy::start().await;
    let url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, pg.name);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let replicas: Vec<Gateway> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| replica(dir.path(), &url, &format!("gw-{i}")))
        .collect();
    let (_, sims) = agents(&replicas[0], 6).await;
    all_connected(&sims, Duration::from_secs(20)).await;

    let cut = Instant::now();
    proxy.set(false);
    // Within TTL − 3 s of the last renewal (at most TTL / 3 before the cut), plus slack.
    let deadline = cut + Duration::from_secs(TTL_SECONDS);
    loop {
        let open: Vec<i64> = sims
            .iter()
            .map(|s| s.events.open_sessions.load(Ordering::SeqCst))
            .collect();
        if open.iter().all(|n| *n == 0) {
            break;
        }
        if Instant::now() >= deadline {
            for gateway in &replicas {
                eprintln!("{}", gateway.log_text());
            }
        }
        assert!(
            Instant::now() < deadline,
            "sessions still up {:?} after the cut: {open:?}",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("every session ended {:?} after the cut", cut.elapsed());
    // Cut for 30 s in all, well past the lease.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(cut.elapsed())).await;
    proxy.set(true);
    let back = Instant::now();
    all_connected(&sims, Duration::from_secs(20)).await;
    eprintln!(
        "every agent was connected again {:?} after the database came back",
        back.elapsed()
    );
    assert_never_two(&sims);
    // The states written during the cut waited and were written once it was back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while connected_by(&replicas[1], 2).await.iter().sum::<usize>() != sims.len() {
        assert!(
            Instant::now() < deadline,
            "the connection states did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for gateway in &replicas {
        let log = gateway.log_text();
        assert!(log.contains("agent connection changed"));
        assert!(
            !log.contains("\"to\":\"failed\""),
            "an agent went to failed"
        );
    }
}

/// Samples every agent's open sessions and keeps, per agent, the longest time it had none.
struct DownTime {
    longest: Arc<std::sync::Mutex<Vec<Duration>>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl DownTime {
    fn watch(sims: &[AgentSim]) -> Self {
        let events: Vec<_> = sims.iter().map(|s| Arc::clone(&s.events)).collect();
        let longest = Arc::new(std::sync::Mutex::new(vec![Duration::ZERO; events.len()]));
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let record = Arc::clone(&longest);
        tokio::spawn(async move {
            let mut down_since: Vec<Option<Instant>> = vec![None; events.len()];
            loop {
                for (i, events) in events.iter().enumerate() {
                    let open = events.open_sessions.load(Ordering::SeqCst);
                    match (open, down_since[i]) {
                        (0, None) => down_since[i] = Some(Instant::now()),
                        (0, Some(_)) => {}
                        (_, Some(since)) => {
                            let mut longest = record.lock().unwrap();
                            longest[i] = longest[i].max(since.elapsed());
                            down_since[i] = None;
                        }
                        (_, None) => {}
                    }
                }
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
        Self { longest, stop }
    }

    fn longest(self) -> Duration {
        let _ = self.stop.send(());
        self.longest
            .lock()
            .unwrap()
            .iter()
            .copied()
            .max()
            .unwrap_or_default()
    }
}

/// A fourth replica takes a share within a few renewals, and a rolling SIGTERM restart of
/// every replica keeps each agent down for a moment only, never dialled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_and_rolling_restarts() {
    if common::postgres_skipped() {
        return;
    }
    let pg = common::PgDatabase::create().await;
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas: Vec<Gateway> = dirs[..3]
        .iter()
        .enumerate()
        .map(|(i, dir)| replica(dir.path(), &pg.url, &format!("gw-{i}")))
        .collect();
    let (_, sims) = agents(&replicas[0], AGENTS).await;
    all_connected(&sims, Duration::from_secs(30)).await;

    // A fourth replica: within three renewals (one TTL) the others have given back their
    // excess over the new share (8) and the newcomer holds it.
    let down = DownTime::watch(&sims);
    let joined = Instant::now();
    replicas.push(replica(dirs[3].path(), &pg.url, "gw-3"));
    let mut counts: Vec<usize>;
    loop {
        counts = connected_by(&replicas[0], 4).await;
        if counts[3] >= 6 && counts.iter().sum::<usize>() == AGENTS {
            break;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(TTL_SECONDS + 4),
            "the new replica did not take a share: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "after a join, per replica: {counts:?} within {:?}",
        joined.elapsed()
    );
    assert!(counts.iter().all(|n| *n <= 9), "{counts:?}");
    all_connected(&sims, Duration::from_secs(5)).await;
    let longest = down.longest();
    eprintln!("longest time an agent was down during the join: {longest:?}");
    assert!(
        longest < Duration::from_secs(2),
        "an agent was down {longest:?}"
    );
    assert_never_two(&sims);

    // A rolling restart: each replica in turn stops (SIGTERM) and starts again.
    let down = DownTime::watch(&sims);
    for (i, dir) in dirs.iter().enumerate() {
        replicas[i].signal("TERM");
        assert_eq!(replicas[i].wait(), Some(0));
        replicas[i] = replica(dir.path(), &pg.url, &format!("gw-{i}"));
        all_connected(&sims, Duration::from_secs(10)).await;
    }
    let longest = down.longest();
    eprintln!("longest time an agent was down during the rolling restart: {longest:?}");
    assert!(
        longest < Duration::from_secs(2),
        "an agent was down {longest:?}"
    );
    assert_never_two(&sims);
}

/// Agents created through `gateway`, ten at a time.
async fn many_agents(gateway: &Gateway, count: usize) -> (String, Vec<AgentSim>) {
    let (agents_path, mut sims) = agents(gateway, 0).await;
    let names: Vec<String> = (0..count).map(|i| format!("a{i}")).collect();
    for chunk in names.chunks(10) {
        let created = futures::future::join_all(
            chunk
                .iter()
                .map(|name| new_agent(gateway, &agents_path, name)),
        )
        .await;
        sims.extend(created);
    }
    (agents_path, sims)
}

/// What a session says that every replica must agree on.
fn essence(s: &pb::Session) -> (i64, i64, i32, String, i64, Option<i64>, Option<i64>) {
    (
        s.agent_id,
        s.url_configuration_id,
        s.state,
        s.replica.clone(),
        s.epoch,
        s.connected_since
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
        s.last_attempt_at
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_agents_one_answer_on_every_replica() {
    const MANY: usize = 300;
    if common::postgres_skipped() {
        return;
    }
    let pg = common::PgDatabase::create().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas: Vec<Gateway> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| replica(dir.path(), &pg.url, &format!("gw-{i}")))
        .collect();
    let (agents_path, mut sims) = many_agents(&replicas[0], MANY).await;
    all_connected(&sims, Duration::from_secs(60)).await;
    // Rebalanced within a TTL: each replica within ±10 % of the fair share.
    let started = Instant::now();
    let counts = loop {
        let counts = connected_by(&replicas[1], 3).await;
        if counts.iter().sum::<usize>() == MANY && counts.iter().all(|n| (90..=110).contains(n)) {
            break counts;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3 * TTL_SECONDS),
            "not spread within ±10 %: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{MANY} agents per replica: {counts:?}");
    all_connected(&sims, Duration::from_secs(5)).await;
    assert_never_two(&sims);

    // ListSessions, GetSession and …/connection: the same answer on every replica.
    let lists = futures::future::join_all(
        replicas
            .iter()
            .map(|g| list_sessions(g, pb::SessionState::Unspecified)),
    )
    .await;
    let lists: Vec<Vec<_>> = lists
        .iter()
        .map(|l| l.iter().map(essence).collect())
        .collect();
    assert_eq!(lists[0].len(), MANY);
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[0], lists[2]);
    let sample: Vec<i64> = lists[0].iter().step_by(37).map(|s| s.0).collect();
    for agent_id in &sample {
        let mut answers = Vec::new();
        let mut connections = Vec::new();
        for gateway in &replicas {
            let session = sessions_client(gateway)
                .await
                .get_session(admin(pb::GetSessionRequest {
                    agent_id: *agent_id,
                }))
                .await
                .unwrap()
                .into_inner();
            answers.push(essence(&session));
            let (status, connection) = send(
                Method::GET,
                &gateway.url(&format!("{agents_path}/{agent_id}/connection")),
                TOKEN,
                None,
            )
            .await;
            assert_eq!(status, 200, "{connection}");
            connections.push(connection);
        }
        assert_eq!(answers[0], answers[1]);
        assert_eq!(answers[0], answers[2]);
        assert_eq!(answers[0].2, i32::from(pb::SessionState::Connected));
        assert!(answers[0].4 > 0, "no epoch: {:?}", answers[0]);
        assert_eq!(connections[0], connections[1]);
        assert_eq!(connections[0], connections[2]);
        assert_eq!(connections[0]["state"], "connected");
    }

    // WatchSessions: a new agent, created through one replica and held by whichever, is
    // seen connected through every replica, alike.
    let mut watches = Vec::new();
    for gateway in &replicas {
        let stream = sessions_client(gateway)
            .await
            .watch_sessions(admin(pb::WatchSessionsRequest {}))
            .await
            .unwrap()
            .into_inner();
        watches.push(stream);
    }
    sims.push(new_agent(&replicas[2], &agents_path, "watched").await);
    let watched = lists[0].iter().map(|s| s.0).max().unwrap();
    let mut seen = Vec::new();
    for stream in &mut watches {
        let connected = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let session = stream.message().await.unwrap().unwrap();
                if session.agent_id > watched
                    && session.state == i32::from(pb::SessionState::Connected)
                {
                    return session;
                }
            }
        })
        .await
        .expect("a watch did not see the new agent connected");
        seen.push(essence(&connected));
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);

    // PingAgent through every replica, for agents held by each replica.
    let holders: Vec<(i64, String)> = list_sessions(&replicas[0], pb::SessionState::Connected)
        .await
        .into_iter()
        .map(|s| (s.agent_id, s.replica))
        .collect();
    for held_by in ["gw-0", "gw-1", "gw-2"] {
        let agent_id = holders.iter().find(|(_, r)| r == held_by).unwrap().0;
        for gateway in &replicas {
            let pong = sessions_client(gateway)
                .await
                .ping_agent(admin(pb::PingAgentRequest {
                    agent_id,
                    payload: b"through any replica".to_vec(),
                }))
                .await
                .unwrap_or_else(|e| panic!("ping of an agent held by {held_by}: {e:?}"))
                .into_inner();
            assert_eq!(pong.payload, b"through any replica");
        }
    }

    // DialNow through a replica that does not hold the agent: the holder dials at once,
    // skipping a backoff that has grown to seconds.
    let (agent_id, holder) = holders.iter().find(|(_, r)| r == "gw-0").unwrap().clone();
    let url = list_sessions(&replicas[0], pb::SessionState::Unspecified)
        .await
        .into_iter()
        .find(|s| s.agent_id == agent_id)
        .unwrap()
        .url;
    let position = sims
        .iter()
        .position(|s| url.ends_with(&format!(":{}", s.addr.port())))
        .unwrap();
    let stopped = sims.remove(position);
    stopped.stop().await;
    // Attempts at about 1, 2.6, 4.6, 7.9 s: after 6 s the next one is seconds away.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let asked = Duration::from_millis(
        u64::try_from(kas_gateway::clock::Clock::now(&SystemClock).as_millis()).unwrap(),
    );
    let started = Instant::now();
    let session = sessions_client(&replicas[1])
        .await
        .dial_now(admin(pb::DialNowRequest {
            agent_id,
            deadline_ms: 5_000,
        }))
        .await
        .unwrap()
        .into_inner();
    let attempted = session.last_attempt_at.unwrap();
    let attempted = Duration::new(
        u64::try_from(attempted.seconds).unwrap(),
        u32::try_from(attempted.nanos).unwrap(),
    );
    eprintln!(
        "DialNow through another replica than the holder ({holder}) answered in {:?}",
        started.elapsed()
    );
    assert!(
        attempted + Duration::from_millis(5) >= asked,
        "no new attempt: {session:?}"
    );
    assert_eq!(session.replica, holder);

    // A token revoked through one replica closes the session another holds within a second.
    let (agent_id, _) = holders.iter().find(|(_, r)| r == "gw-2").unwrap().clone();
    let tokens_path = format!("{agents_path}/{agent_id}/tokens");
    let (_, tokens) = send(Method::GET, &replicas[0].url(&tokens_path), TOKEN, None).await;
    let token_id = tokens[0]["id"].as_i64().unwrap();
    let url = list_sessions(&replicas[0], pb::SessionState::Unspecified)
        .await
        .into_iter()
        .find(|s| s.agent_id == agent_id)
        .unwrap()
        .url;
    let position = sims
        .iter()
        .position(|s| url.ends_with(&format!(":{}", s.addr.port())))
        .unwrap();
    let revoked = sims.remove(position);
    assert_eq!(revoked.events.open_sessions.load(Ordering::SeqCst), 1);
    let started = Instant::now();
    let (status, _) = send(
        Method::DELETE,
        &replicas[0].url(&format!("{tokens_path}/{token_id}")),
        TOKEN,
        None,
    )
    .await;
    assert_eq!(status, 204);
    while revoked.events.open_sessions.load(Ordering::SeqCst) != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a token revoked through another replica left its session up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "a token revoked through gw-0 closed gw-2's session within {:?}",
        started.elapsed()
    );
    revoked.stop().await;

    // The holder killed: until its lease expires nobody else may dial its agents, and
    // calls that need their sessions say the holder does not answer.
    let (agent_id, _) = holders.iter().find(|(_, r)| r == "gw-0").unwrap().clone();
    replicas[0].signal("KILL");
    replicas[0].wait();
    let error = sessions_client(&replicas[1])
        .await
        .ping_agent(admin(pb::PingAgentRequest {
            agent_id,
            payload: Vec::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(error.message().contains("gw-0"), "{error:?}");
    all_connected(&sims, Duration::from_secs(TTL_SECONDS + 10)).await;
    assert_never_two(&sims);
    for sim in sims {
        sim.stop().await;
    }
}

/// The private API answers only calls signed with the replicas' shared secret, and checks
/// them before it reads a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_api_takes_only_signed_calls() {
    use kas_gateway::proto::private::v1 as private;
    if common::postgres_skipped() {
        return;
    }
    let pg = common::PgDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = replica(dir.path(), &pg.url, "gw-0");
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        let found = gateway.log_text().lines().find_map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).ok()?;
            (event["serves"] == "the private API between replicas")
                .then(|| event["addr"].as_str().unwrap().to_owned())
        });
        if let Some(addr) = found {
            break addr;
        }
        assert!(Instant::now() < deadline, "no private API listener");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        private::replica_client::ReplicaClient::new(channel).max_encoding_message_size(8 << 20);
    let now = kas_gateway::clock::Clock::now(&SystemClock).as_secs();
    let signed = |secret: &[u8], message: private::SessionRequest| {
        let token = kas_gateway::crypto::jwt::sign_hs256(
            secret,
            &json!({"iss": "kas-gateway", "aud": "kas-gateway-private-api",
                    "iat": now, "exp": now + 30}),
        );
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let ping = |payload: Vec<u8>| private::SessionRequest {
        agent_id: 1,
        method: "ping".into(),
        payload,
        timeout_ms: 1_000,
    };
    // No token, even with a message far over the limit: refused before it is read.
    let error = client
        .request(tonic::Request::new(ping(vec![0; 4 << 20])))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unauthenticated, "{error:?}");
    // Another secret.
    let error = client
        .request(signed(&[7u8; 32], ping(Vec::new())))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unauthenticated, "{error:?}");
    // The shared secret: authenticated, and this replica holds no session with agent 1.
    use base64::Engine;
    let secret = base64::engine::general_purpose::STANDARD
        .decode(PRIVATE_API_SECRET)
        .unwrap();
    let error = client
        .request(signed(&secret, ping(Vec::new())))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    // Signed, but over the message limit.
    let error = client
        .request(signed(&secret, ping(vec![0; 4 << 20])))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::OutOfRange, "{error:?}");
}
