//! The dialer: keeps one authenticated session open to every receptive agent this replica
//! holds, reconnects with backoff, and reports each agent's state.
//!
//! Its interface towards the rest is small: the service says which configurations should be
//! connected (and wakes it on changes); the [`state::Registry`] says how each one is doing.

pub mod connect;
pub mod session;
pub mod state;
pub mod tunnel;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SecureRandom;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cluster::Held;
use crate::domain::{
    AgentRefusal, AgentToken, DeniedNetworks, DialCredentials, Id, Phase, Service, Timestamp,
    UrlConfiguration,
};
use session::SessionRequest;
use state::Registry;
use tokio::sync::Notify;

/// Exponential backoff with jitter (grpc-go's defaults, as GitLab's KAS uses them).
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// First delay.
    pub base: Duration,
    /// Growth per attempt.
    pub factor: f64,
    /// ± this fraction of randomness.
    pub jitter: f64,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            factor: 1.6,
            jitter: 0.2,
            max: Duration::from_secs(120),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based), with `random` in [-1, 1].
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let exponent = i32::try_from(attempt.min(64)).unwrap_or(64);
        let raw = self.base.as_secs_f64() * self.factor.powi(exponent);
        let capped = raw.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 + self.jitter * random.clamp(-1.0, 1.0));
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

/// How the dialer behaves.
#[derive(Clone, Debug)]
pub struct DialerSettings {
    /// Time for DNS, TCP and TLS together.
    pub connect_timeout: Duration,
    /// Time for the agent's hello.
    pub hello_timeout: Duration,
    /// Gateway pings this often.
    pub heartbeat_interval: Duration,
    /// The session ends after this many intervals without a reply.
    pub heartbeat_misses: u32,
    /// HTTP/2 keepalive ping interval.
    pub keepalive: Duration,
    /// HTTP/2 keepalive timeout.
    pub keepalive_timeout: Duration,
    /// Full resynchronisation with the store, whatever happened.
    pub resync_interval: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// A session up this long resets the backoff.
    pub backoff_reset_after: Duration,
    /// Addresses never dialled, checked on every address a host resolves to.
    pub denied_networks: DeniedNetworks,
    /// At most this many dials at once, each from its TCP connect until its session is
    /// accepted or fails.
    pub max_concurrent_dials: usize,
    /// Requests through one agent's session at most at once (each its own HTTP/2 stream).
    pub max_tunnel_streams: usize,
}

impl Default for DialerSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_misses: 3,
            keepalive: Duration::from_secs(55),
            keepalive_timeout: Duration::from_secs(20),
            resync_interval: Duration::from_secs(300),
            backoff: Backoff::default(),
            backoff_reset_after: Duration::from_secs(60),
            denied_networks: DeniedNetworks::default(),
            max_concurrent_dials: 256,
            max_tunnel_streams: 500,
        }
    }
}

/// What every dial of this dialer shares: the settings, turns to dial, and the TLS
/// configurations (one copy of each, not one per agent).
pub struct Dialing {
    /// How dials and sessions behave.
    pub settings: DialerSettings,
    /// Dials in progress take a turn each (see [`DialerSettings::max_concurrent_dials`]).
    pub turns: tokio::sync::Semaphore,
    /// TLS client configurations shared by agents that trust the same CA.
    pub tls: connect::TlsConfigs,
    /// The origin of the grid sessions' heartbeats fall due on.
    pub epoch: tokio::time::Instant,
}

impl Dialing {
    /// Shared state for dials with `settings`.
    pub fn new(settings: &DialerSettings) -> Self {
        Self {
            settings: settings.clone(),
            turns: tokio::sync::Semaphore::new(settings.max_concurrent_dials.max(1)),
            tls: connect::TlsConfigs::default(),
            epoch: tokio::time::Instant::now(),
        }
    }
}

/// An entry of the refused-networks setting that is neither a network nor an address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not a network in CIDR notation (such as 169.254.0.0/16) nor an address")]
pub struct InvalidNetwork {
    /// The entry as written.
    pub entry: String,
}

/// Reads the refused-networks setting: comma-separated CIDRs (`169.254.0.0/16,fe80::/10`);
/// a bare address stands for itself alone; the empty string refuses nothing.
pub fn parse_denied_networks(value: &str) -> Result<DeniedNetworks, InvalidNetwork> {
    let mut networks = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        let network = entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| InvalidNetwork {
                entry: entry.to_owned(),
            })?;
        networks.push(network);
    }
    Ok(DeniedNetworks::new(networks))
}

/// What the dialer needs from the rest of the gateway, and nothing more: the configurations,
/// their credentials, the agent token checks, and a wake-up when any of them change.
#[async_trait::async_trait]
pub trait Port: Send + Sync + 'static {
    /// Every URL configuration (which of them this replica dials is [`Held`]'s to say).
    async fn configurations(&self) -> crate::domain::Result<Vec<UrlConfiguration>>;
    /// The decrypted credentials of a configuration.
    async fn credentials(&self, config_id: Id) -> crate::domain::Result<DialCredentials>;
    /// The decrypted credentials of many configurations in a few reads (one per thousand):
    /// `Err` when the store could not be read, else a result per configuration found.
    async fn credentials_of(
        &self,
        config_ids: &[Id],
    ) -> crate::domain::Result<HashMap<Id, crate::domain::Result<DialCredentials>>>;
    /// Checks the token an agent presented after being dialled as `agent_id`.
    async fn check_agent_token(
        &self,
        agent_id: Id,
        token: &str,
    ) -> crate::domain::Result<Result<AgentToken, AgentRefusal>>;
    /// Which of the tokens sessions were accepted with are still active (not revoked), in one
    /// read whatever their number.
    async fn active_tokens(
        &self,
        token_ids: &[Id],
    ) -> crate::domain::Result<std::collections::HashSet<Id>>;
    /// Woken whenever configurations, agents or tokens changed.
    fn changes(&self) -> Arc<Notify>;
    /// The time, from the gateway's clock.
    fn now(&self) -> Timestamp;
}

#[async_trait::async_trait]
impl Port for Service {
    async fn configurations(&self) -> crate::domain::Result<Vec<UrlConfiguration>> {
        self.desired_sessions().await
    }

    async fn credentials(&self, config_id: Id) -> crate::domain::Result<DialCredentials> {
        self.dial_credentials(config_id).await
    }

    async fn credentials_of(
        &self,
        config_ids: &[Id],
    ) -> crate::domain::Result<HashMap<Id, crate::domain::Result<DialCredentials>>> {
        self.dial_credentials_of(config_ids).await
    }

    async fn check_agent_token(
        &self,
        agent_id: Id,
        token: &str,
    ) -> crate::domain::Result<Result<AgentToken, AgentRefusal>> {
        self.authenticate_agent(agent_id, token).await
    }

    async fn active_tokens(
        &self,
        token_ids: &[Id],
    ) -> crate::domain::Result<std::collections::HashSet<Id>> {
        self.active_agent_tokens(token_ids).await
    }

    fn changes(&self) -> Arc<Notify> {
        Arc::clone(Service::changes(self))
    }

    fn now(&self) -> Timestamp {
        Service::now(self)
    }
}

struct Running {
    config: UrlConfiguration,
    epoch: i64,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// This replica's name: the host name, else a placeholder.
pub fn replica_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kas-gateway".to_owned())
}

/// Starts the dialer, which keeps `registry` up to date; it stops when `shutdown` is
/// cancelled, hanging up every session.
pub fn spawn(
    port: Arc<dyn Port>,
    registry: Arc<Registry>,
    held: watch::Receiver<Held>,
    settings: DialerSettings,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(reconcile_loop(port, registry, held, settings, shutdown))
}

async fn reconcile_loop(
    port: Arc<dyn Port>,
    registry: Arc<Registry>,
    mut held: watch::Receiver<Held>,
    settings: DialerSettings,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<Id, Running> = HashMap::new();
    let mut stopping: HashMap<Id, JoinHandle<()>> = HashMap::new();
    let dialing = Arc::new(Dialing::new(&settings));
    let changes = port.changes();
    loop {
        stopping.retain(|_, task| !task.is_finished());
        let holding = held.borrow_and_update().clone();
        if let Err(error) = reconcile(
            &port,
            &registry,
            &holding,
            &dialing,
            &shutdown,
            &mut running,
            &mut stopping,
        )
        .await
        {
            tracing::warn!(%error, "the dialer could not read the configurations; retrying");
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = changes.notified() => {}
            // A closed channel (the lease task ended at shutdown) changes nothing.
            Ok(()) = held.changed() => {}
            () = tokio::time::sleep(settings.resync_interval) => {}
        }
    }
    for session in running.values() {
        session.cancel.cancel();
    }
    for (agent_id, session) in running.drain() {
        let _ = session.task.await;
        registry.forget(agent_id);
    }
    for (_, task) in stopping.drain() {
        let _ = task.await;
    }
}

/// Brings the running sessions in line with the store: starts what is new, hangs up what
/// went away or changed, and redials sessions whose agent token was revoked.
async fn reconcile(
    port: &Arc<dyn Port>,
    registry: &Arc<Registry>,
    held: &Held,
    dialing: &Arc<Dialing>,
    shutdown: &CancellationToken,
    running: &mut HashMap<Id, Running>,
    stopping: &mut HashMap<Id, JoinHandle<()>>,
) -> crate::domain::Result<()> {
    let configurations = match port.configurations().await {
        Ok(configurations) => configurations,
        Err(error) => {
            // Without the database, what is no longer held is still hung up (the safety
            // rule); sessions that are held stay up.
            let released: Vec<Id> = running
                .keys()
                .copied()
                .filter(|agent_id| !held.holds(*agent_id))
                .collect();
            for agent_id in released {
                if let Some(session) = running.remove(&agent_id) {
                    session.cancel.cancel();
                    registry.forget(agent_id);
                    stopping.insert(agent_id, session.task);
                }
            }
            return Err(error);
        }
    };
    let desired: HashMap<Id, UrlConfiguration> = configurations
        .into_iter()
        .filter(|c| held.holds(c.agent_id))
        .map(|c| (c.agent_id, c))
        .collect();
    // First what is no longer held, or changed: hung up before anything else is read, so that
    // an agent given back to the cluster is free at once.
    let stop: Vec<Id> = running
        .iter()
        .filter(|(agent_id, session)| match desired.get(agent_id) {
            Some(config) => {
                *config != session.config
                    || held.epoch(**agent_id) != session.epoch
                    || session.task.is_finished()
            }
            None => true,
        })
        .map(|(agent_id, _)| *agent_id)
        .collect();
    hang_up(registry, running, stopping, stop);
    // Then the tokens the live sessions were accepted with, all in one read.
    let accepted: Vec<(Id, Id)> = running
        .keys()
        .filter_map(|agent_id| {
            let token_id = registry.get(*agent_id).and_then(|c| c.token_id)?;
            Some((*agent_id, token_id))
        })
        .collect();
    if !accepted.is_empty() {
        let token_ids: Vec<Id> = accepted.iter().map(|(_, token_id)| *token_id).collect();
        let active = port.active_tokens(&token_ids).await?;
        let revoked: Vec<Id> = accepted
            .iter()
            .filter(|(_, token_id)| !active.contains(token_id))
            .map(|(agent_id, token_id)| {
                tracing::info!(
                    agent_id,
                    token_id,
                    "the agent's token was revoked: hanging up"
                );
                *agent_id
            })
            .collect();
        hang_up(registry, running, stopping, revoked);
    }
    let new: Vec<(Id, UrlConfiguration)> = desired
        .into_iter()
        .filter(|(agent_id, _)| !running.contains_key(agent_id))
        .collect();
    // The new sessions' first credentials, read together: at a cold start that is a few
    // reads instead of one per agent. Without them (the store is away), each session reads
    // its own, as it does on every later attempt.
    let mut first_credentials = if new.is_empty() {
        HashMap::new()
    } else {
        let config_ids: Vec<Id> = new.iter().map(|(_, config)| config.id).collect();
        port.credentials_of(&config_ids)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot read the new sessions' credentials together");
                HashMap::new()
            })
    };
    for (agent_id, config) in new {
        let cancel = shutdown.child_token();
        let (requests, requests_rx) = mpsc::channel(16);
        let epoch = held.epoch(agent_id);
        registry.track(agent_id, config.id, &config.url, epoch, requests);
        // Taken before the task starts: the agent counts as dialled from now on.
        let hold = registry.hold(agent_id);
        let session = keep_connected(
            Arc::clone(port),
            Arc::clone(registry),
            config.clone(),
            first_credentials.remove(&config.id),
            Arc::clone(dialing),
            requests_rx,
            cancel.clone(),
            stopping.remove(&agent_id),
        );
        // Every line an agent's dialler logs carries the agent: its lines can be followed.
        let span =
            tracing::info_span!("session", agent_id, url_configuration_id = config.id, epoch);
        let task = tokio::spawn(
            async move {
                session.await;
                drop(hold);
            }
            .instrument(span),
        );
        running.insert(
            agent_id,
            Running {
                config,
                epoch,
                cancel,
                task,
            },
        );
    }
    Ok(())
}

/// Hangs up without waiting: a session ends at once when cancelled, and the agent's next
/// session (if any) waits for it, so the reconciler never waits on one agent.
fn hang_up(
    registry: &Registry,
    running: &mut HashMap<Id, Running>,
    stopping: &mut HashMap<Id, JoinHandle<()>>,
    agents: Vec<Id>,
) {
    for agent_id in agents {
        if let Some(session) = running.remove(&agent_id) {
            session.cancel.cancel();
            registry.forget(agent_id);
            stopping.insert(agent_id, session.task);
        }
    }
}

/// Dials an agent again and again, with backoff, until cancelled; first waits for the agent's
/// previous session, if one is still ending, so that there are never two. The first attempt
/// uses `first_credentials` when given; every later one reads them again, so that a changed or
/// re-encrypted secret is picked up after a failure.
#[allow(clippy::too_many_arguments)]
async fn keep_connected(
    port: Arc<dyn Port>,
    registry: Arc<Registry>,
    config: UrlConfiguration,
    mut first_credentials: Option<crate::domain::Result<DialCredentials>>,
    dialing: Arc<Dialing>,
    mut requests: mpsc::Receiver<SessionRequest>,
    cancel: CancellationToken,
    previous: Option<JoinHandle<()>>,
) {
    if let Some(previous) = previous {
        // Already cancelled, so it ends promptly; waited for even if this one is cancelled
        // too, which keeps a chain of replacements in order.
        let _ = previous.await;
    }
    if cancel.is_cancelled() {
        return;
    }
    let rng = ring::rand::SystemRandom::new();
    let mut attempt: u32 = 0;
    let waker = registry.waker(config.agent_id);
    loop {
        let now = port.now();
        registry.update(config.agent_id, |c| {
            c.phase = Phase::Connecting;
            c.last_attempt_at = Some(now);
            c.connected_since = None;
        });
        crate::metrics::dial_attempt();
        let outcome = session::run(
            &port,
            &registry,
            &config,
            first_credentials.take(),
            &dialing,
            &mut requests,
            &cancel,
        )
        .await;
        if cancel.is_cancelled() {
            return;
        }
        let error = match outcome {
            Ok(ended) => {
                if ended.up_for >= dialing.settings.backoff_reset_after {
                    attempt = 0;
                }
                ended
                    .error
                    .unwrap_or_else(|| connect::DialError::transient("the session ended"))
            }
            Err(error) => error,
        };
        crate::metrics::dial_failure(error.cause);
        let now = port.now();
        let phase = session::phase_after(&error);
        registry.update(config.agent_id, |c| {
            c.phase = phase;
            c.last_error = Some(error.message.clone());
            c.last_error_at = Some(now);
            c.connected_since = None;
        });
        if phase == Phase::Failed {
            // Nothing changes until the configuration does; the reconciler restarts us then.
            cancel.cancelled().await;
            return;
        }
        let delay = dialing.settings.backoff.delay(attempt, random_unit(&rng));
        attempt = attempt.saturating_add(1);
        let dial_now = async {
            match &waker {
                Some(waker) => waker.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
            () = dial_now => {}
        }
    }
}

fn random_unit(rng: &dyn SecureRandom) -> f64 {
    let mut bytes = [0u8; 4];
    if rng.fill(&mut bytes).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX) * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(1, 0.0), Duration::from_secs_f64(1.6));
        assert_eq!(b.delay(2, 0.0), Duration::from_secs_f64(1.6 * 1.6));
        assert_eq!(b.delay(30, 0.0), Duration::from_secs(120));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(144));
        assert_eq!(b.delay(0, -1.0), Duration::from_secs_f64(0.8));
    }

    #[test]
    fn denied_networks_setting() {
        let parsed = parse_denied_networks(" 169.254.0.0/16, fe80::/10,10.1.2.3 ,::1").unwrap();
        assert_eq!(
            parsed.to_string(),
            "169.254.0.0/16,fe80::/10,10.1.2.3/32,::1/128"
        );
        assert!(parsed.refusing("10.1.2.3".parse().unwrap()).is_some());
        assert!(parsed.refusing("10.1.2.4".parse().unwrap()).is_none());
        assert_eq!(parse_denied_networks("").unwrap(), DeniedNetworks::none());
        assert_eq!(
            parse_denied_networks(" , ").unwrap(),
            DeniedNetworks::none()
        );
        // The default, written out, reads back as the default.
        let default = DeniedNetworks::default();
        assert_eq!(
            parse_denied_networks(&default.to_string()).unwrap(),
            default
        );
    }

    #[test]
    fn denied_networks_setting_errors() {
        for bad in [
            "169.254.0.0/33",
            "localhost",
            "169.254.0.0/16;fe80::/10",
            "10.0.0.0/8,nope",
        ] {
            let error = parse_denied_networks(bad).unwrap_err();
            assert!(bad.contains(&error.entry), "{bad}: {error}");
        }
        assert_eq!(
            parse_denied_networks("10.0.0.0/8,nope")
                .unwrap_err()
                .to_string(),
            "\"nope\" is not a network in CIDR notation (such as 169.254.0.0/16) nor an address"
        );
    }

    #[test]
    fn jitter_is_in_range() {
        let rng = ring::rand::SystemRandom::new();
        for _ in 0..1000 {
            let r = random_unit(&rng);
            assert!((-1.0..=1.0).contains(&r));
        }
    }
}
