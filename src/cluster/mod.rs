//! Several replicas on one PostgreSQL: this replica's lease, and which agents it holds.
//!
//! Each start is a new *incarnation* with a lease renewed every TTL / 3 (one statement,
//! whatever the number of agents). After each renewal the replica claims free agents up to its
//! fair share (`ceil(agents / live replicas)`) and gives back what it holds beyond share + 1:
//! first it stops dialling them, and only once nothing of their sessions is left here (looked
//! at every half second) does it release them, so that no agent is ever dialled by two
//! replicas. **Safety rule:** a replica that has not renewed its
//! lease for TTL − 3 s (by its own monotonic clock) stops dialling everything, before the lease
//! can expire in the database and another replica take its agents.

pub mod private_api;
pub mod sessions;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::Id;
use crate::store::LeaseStore;

/// How often a replica looks whether the agents it gives back are hung up, to release them.
const RELEASE_AFTER: Duration = Duration::from_millis(500);

/// Hang up this long before the lease could expire elsewhere.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(3);

/// The agents this replica dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// Every agent: the only gateway on its database (SQLite).
    All,
    /// These agents, by lease, with the epoch of each assignment.
    These(Arc<BTreeMap<Id, i64>>),
}

impl Held {
    /// Whether `agent_id` is dialled here.
    pub fn holds(&self, agent_id: Id) -> bool {
        match self {
            Self::All => true,
            Self::These(agents) => agents.contains_key(&agent_id),
        }
    }

    /// The fencing epoch `agent_id` is held with (0 for a single gateway).
    pub fn epoch(&self, agent_id: Id) -> i64 {
        match self {
            Self::All => 0,
            Self::These(agents) => agents.get(&agent_id).copied().unwrap_or(0),
        }
    }

    fn none() -> Self {
        Self::These(Arc::new(BTreeMap::new()))
    }
}

/// Whether this replica still has a session with an agent, open or closing: an agent it
/// gives back is released only once this says no, so that its next holder never dials it
/// while the old session lingers.
pub trait Dialling: Send + Sync + std::fmt::Debug {
    /// True while a session with `agent_id` is open or still closing here.
    fn is_dialling(&self, agent_id: Id) -> bool;
}

/// Lease settings.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// This replica's name (the host name by default).
    pub replica_id: String,
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// Where the other replicas reach this one's private API, if it serves one.
    pub private_api_url: Option<String>,
}

/// This replica's membership: what it holds, and how to leave.
#[derive(Debug)]
pub struct Membership {
    /// The agents to dial, updated after every round.
    pub held: watch::Receiver<Held>,
    leases: Option<Arc<dyn LeaseStore>>,
    incarnation: Arc<std::sync::Mutex<String>>,
    task: Option<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Membership {
    /// One gateway holding every agent: no leases.
    pub fn all() -> Self {
        let (_, held) = watch::channel(Held::All);
        Self {
            held,
            leases: None,
            incarnation: Arc::new(std::sync::Mutex::new(String::new())),
            task: None,
            stop: CancellationToken::new(),
        }
    }

    /// Joins the cluster; `wake` asks for a round now (a configuration was created or
    /// deleted). From `shutdown` on it claims nothing more, but keeps renewing the lease (and
    /// the safety rule keeps watching) until [`Membership::leave`], so that sessions still
    /// being hung up stay covered.
    pub fn join(
        leases: Arc<dyn LeaseStore>,
        settings: ClusterSettings,
        dialling: Arc<dyn Dialling>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, held) = watch::channel(Held::none());
        let incarnation = Arc::new(std::sync::Mutex::new(new_incarnation()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            Arc::clone(&leases),
            settings,
            dialling,
            Arc::clone(&incarnation),
            tx,
            wake,
            Stops {
                shutdown,
                stop: stop.clone(),
            },
        ));
        Self {
            held,
            leases: Some(leases),
            incarnation,
            task: Some(task),
            stop,
        }
    }

    /// This replica's current incarnation (empty without leases; a new one after a lost
    /// lease).
    pub fn incarnation(&self) -> Incarnation {
        Incarnation(Arc::clone(&self.incarnation))
    }

    /// After the sessions are hung up: gives every agent back and ends the lease, so that
    /// the others take over at once instead of after the TTL.
    pub async fn leave(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let Some(leases) = self.leases else { return };
        let incarnation = self
            .incarnation
            .lock()
            .map(|i| i.clone())
            .unwrap_or_default();
        match tokio::time::timeout(Duration::from_secs(5), leases.leave(&incarnation)).await {
            Ok(Ok(())) => tracing::info!(%incarnation, "left the cluster: agents released"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not release the agents; they are free once the lease expires")
            }
            Err(_) => tracing::warn!(
                "releasing the agents timed out; they are free once the lease expires"
            ),
        }
    }
}

/// Reads a replica's current incarnation.
#[derive(Clone, Debug)]
pub struct Incarnation(Arc<std::sync::Mutex<String>>);

impl Incarnation {
    /// The incarnation now.
    pub fn current(&self) -> String {
        self.0.lock().map(|i| i.clone()).unwrap_or_default()
    }
}

fn new_incarnation() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    crate::crypto::to_hex(&bytes)
}

/// `ceil(agents / replicas)`, at least 1 replica.
pub fn fair_share(agents: i64, replicas: i64) -> i64 {
    let replicas = replicas.max(1);
    (agents.max(0) + replicas - 1) / replicas
}

/// The lease as the loop and the watchdog share it: when it was last renewed, and what is
/// published to the dialer.
#[derive(Debug)]
struct Lease {
    renewed_at: std::sync::Mutex<Option<Instant>>,
    /// Hang up this long after the last renewal: TTL − the safety margin.
    hang_up_after: Duration,
    held: watch::Sender<Held>,
    renewed: Notify,
}

impl Lease {
    fn renewed_at(&self) -> Option<Instant> {
        self.renewed_at.lock().ok().and_then(|at| *at)
    }

    fn renewed(&self, at: Instant) {
        if let Ok(mut renewed_at) = self.renewed_at.lock() {
            *renewed_at = Some(at);
        }
        self.renewed.notify_one();
    }

    /// Hangs up everything: the lease may be gone, or soon.
    fn hang_up(&self) {
        if let Ok(mut renewed_at) = self.renewed_at.lock() {
            *renewed_at = None;
            let _ = self.held.send(Held::none());
        }
    }

    /// Publishes what a round found, unless the renewal it followed is too old by now (a
    /// slow round must not revive sessions the safety rule ended).
    fn publish(&self, agents: BTreeMap<Id, i64>) {
        let Ok(renewed_at) = self.renewed_at.lock() else {
            return;
        };
        if renewed_at.is_some_and(|at| at.elapsed() < self.hang_up_after) {
            self.held.send_if_modified(|current| {
                let next = Held::These(Arc::new(agents));
                let changed = *current != next;
                *current = next;
                changed
            });
        }
    }
}

/// The safety rule, apart from the loop so that a stuck database call cannot delay it.
async fn watchdog(lease: Arc<Lease>, shutdown: CancellationToken) {
    loop {
        let deadline = lease.renewed_at().map(|at| at + lease.hang_up_after);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = lease.renewed.notified() => {}
            () = sleep_until(deadline) => {
                if lease
                    .renewed_at()
                    .is_some_and(|at| at.elapsed() >= lease.hang_up_after)
                {
                    tracing::warn!("the lease could not be renewed in time: hanging up every agent");
                    lease.hang_up();
                }
            }
        }
    }
}

/// When the loop stops: `shutdown` ends claiming, `stop` ends the loop (after the leave).
#[derive(Debug)]
struct Stops {
    shutdown: CancellationToken,
    stop: CancellationToken,
}

async fn run(
    leases: Arc<dyn LeaseStore>,
    settings: ClusterSettings,
    dialling: Arc<dyn Dialling>,
    incarnation: Arc<std::sync::Mutex<String>>,
    held: watch::Sender<Held>,
    wake: Arc<Notify>,
    stops: Stops,
) {
    let Stops { shutdown, stop } = stops;
    let ttl = settings.lease_ttl;
    let heartbeat = ttl / 3;
    let lease = Arc::new(Lease {
        renewed_at: std::sync::Mutex::new(None),
        hang_up_after: ttl.saturating_sub(SAFETY_MARGIN),
        held,
        renewed: Notify::new(),
    });
    tokio::spawn(watchdog(Arc::clone(&lease), stop.clone()));
    let current = || incarnation.lock().map(|i| i.clone()).unwrap_or_default();
    let mut joined = false;
    let mut releasing: Vec<Id> = Vec::new();
    let mut holding: usize = 0;
    loop {
        let me = current();
        let started = Instant::now();
        // Bounded: a database that does not answer is a failed renewal, not a stuck loop.
        let renewal = tokio::time::timeout(heartbeat, async {
            if joined {
                leases.renew(&me, ttl).await
            } else {
                leases
                    .join(
                        &me,
                        &settings.replica_id,
                        settings.private_api_url.as_deref(),
                        ttl,
                    )
                    .await
                    .map(|()| true)
            }
        })
        .await
        .unwrap_or_else(|_| Err(crate::store::Error::other("no answer within a heartbeat")));
        match renewal {
            Ok(true) => {
                if !joined {
                    tracing::info!(incarnation = %me, replica = %settings.replica_id, "joined the cluster");
                    // The others give back their excess at their next round: now, rather than
                    // up to a heartbeat later.
                    if let Err(error) = leases.announce().await {
                        tracing::debug!(%error, "announcing the join failed");
                    }
                }
                joined = true;
                // The lease runs from before the statement: measure from there.
                lease.renewed(started);
                if shutdown.is_cancelled() {
                    // Shutting down: keep the lease, take nothing new.
                    continue_after(&stop, heartbeat).await;
                    if stop.is_cancelled() {
                        return;
                    }
                    continue;
                }
                let balanced = tokio::time::timeout(
                    heartbeat,
                    round(
                        leases.as_ref(),
                        dialling.as_ref(),
                        &me,
                        &mut releasing,
                        holding,
                    ),
                )
                .await;
                match balanced {
                    Ok(Ok(agents)) => {
                        // Agents given back but not yet released are still ours in the
                        // database: counted, so that the next claim does not overshoot.
                        holding = agents.len() + releasing.len();
                        lease.publish(agents);
                    }
                    Ok(Err(error)) => tracing::warn!(%error, "balancing the agents failed"),
                    Err(_) => tracing::warn!("balancing the agents timed out"),
                }
            }
            Ok(false) => {
                // Declared dead (the lease expired): the others may have our agents. Stop
                // everything and come back as a new incarnation.
                tracing::warn!(incarnation = %me, "the lease was lost: hanging up and rejoining");
                crate::metrics::lease_lost();
                lease.hang_up();
                holding = 0;
                releasing.clear();
                joined = false;
                if let Ok(mut incarnation) = incarnation.lock() {
                    *incarnation = new_incarnation();
                }
                continue;
            }
            Err(error) => tracing::warn!(%error, "renewing the lease failed"),
        }
        if lease.renewed_at().is_none() {
            // Hung up by the safety rule: nothing is dialled, nothing is being released.
            holding = 0;
        }
        // Agents being given back are hung up by now (every step of a session ends at once
        // when cancelled): release them soon rather than a whole heartbeat later, so that
        // they are down for a moment only.
        let pause = if releasing.is_empty() {
            heartbeat
        } else {
            RELEASE_AFTER.min(heartbeat)
        };
        tokio::select! {
            () = stop.cancelled() => return,
            // Shutting down: the next round only renews.
            () = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
            () = tokio::time::sleep(pause) => {}
            // Not while giving agents back: the pause is what keeps them from two replicas.
            () = wake.notified(), if releasing.is_empty() => {}
        }
    }
}

/// Waits `pause`, or until `stop`.
async fn continue_after(stop: &CancellationToken, pause: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(pause) => {}
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One round after a renewal: release what has been hung up since it was given back, claim
/// up to the fair share, and pick the excess to hang up now (released once its sessions have
/// ended).
async fn round(
    leases: &dyn LeaseStore,
    dialling: &dyn Dialling,
    me: &str,
    releasing: &mut Vec<Id>,
    holding: usize,
) -> crate::store::Result<BTreeMap<Id, i64>> {
    let (live, agents) = leases.census().await?;
    let share = fair_share(agents, live);
    // Given back but still dialled (the dialer has not got to it, or its session is still
    // closing): kept, and released at a later round.
    let (ended, lingering): (Vec<Id>, Vec<Id>) = releasing
        .iter()
        .copied()
        .partition(|agent_id| !dialling.is_dialling(*agent_id));
    let holding = i64::try_from(holding).unwrap_or(i64::MAX);
    let claim = (share - holding).max(0);
    let mut held = leases.balance(me, &ended, claim).await?;
    for agent_id in &lingering {
        held.remove(agent_id);
    }
    *releasing = lingering;
    let count = i64::try_from(held.len()).unwrap_or(i64::MAX);
    if releasing.is_empty() && count > share + 1 {
        let excess = usize::try_from(count - share).unwrap_or(0);
        let give_back: Vec<Id> = held.keys().rev().take(excess).copied().collect();
        for agent_id in &give_back {
            held.remove(agent_id);
        }
        tracing::info!(
            count = give_back.len(),
            share,
            "giving agents back to balance the replicas"
        );
        *releasing = give_back;
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_shares() {
        assert_eq!(fair_share(300, 3), 100);
        assert_eq!(fair_share(301, 3), 101);
        assert_eq!(fair_share(0, 3), 0);
        assert_eq!(fair_share(5, 0), 5);
    }

    #[test]
    fn held_sets() {
        assert!(Held::All.holds(7));
        assert!(!Held::none().holds(7));
        assert!(Held::These(Arc::new([(7, 3)].into_iter().collect())).holds(7));
    }
}
