//! The sessions of a cluster, as every replica answers for them: states are read from the
//! database (written there by each agent's holder, in batches, on every transition), changes
//! come through `LISTEN`/`NOTIFY`, and what needs the live session is done here when this
//! replica holds it, else forwarded to the replica that does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::Incarnation;
use super::private_api::Forwarder;
use crate::dialer::state::Registry;
use crate::domain::{Connection, Id, RequestError, SessionResponse, Sessions};
use crate::store::ConnectionStates;

/// Transitions are gathered this long before they are written together.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// At most this many states per write.
const MAX_BATCH: usize = 2_000;
/// A failed write is tried again after this long (the states wait in memory, newest first).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// [`Sessions`] across the replicas on one PostgreSQL.
#[derive(Debug)]
pub struct ClusterSessions {
    local: Arc<Registry>,
    states: Arc<dyn ConnectionStates>,
    incarnation: Incarnation,
    forwarder: Option<Forwarder>,
    changes: broadcast::Sender<Connection>,
}

impl ClusterSessions {
    /// Starts writing `local`'s transitions as `incarnation` and following everyone's, until
    /// `shutdown`; calls for sessions held elsewhere go through `forwarder`.
    pub fn start(
        local: Arc<Registry>,
        states: Arc<dyn ConnectionStates>,
        incarnation: Incarnation,
        forwarder: Option<Forwarder>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        let sessions = Arc::new(Self {
            local,
            states,
            incarnation,
            forwarder,
            changes,
        });
        tokio::spawn(write(
            Arc::clone(&sessions.local),
            Arc::clone(&sessions.states),
            sessions.incarnation.clone(),
            shutdown.clone(),
        ));
        let (changed, ids) = mpsc::channel(64);
        sessions.states.follow(changed, shutdown);
        tokio::spawn(relay(
            Arc::clone(&sessions.states),
            sessions.changes.clone(),
            ids,
        ));
        sessions
    }

    /// Where the session of `agent_id` is held, when not here.
    async fn holder(&self, agent_id: Id) -> Result<(String, String), RequestError> {
        let holder = self
            .states
            .holder(agent_id)
            .await
            .map_err(|e| RequestError::Store(e.to_string()))?
            .ok_or(RequestError::NoHolder)?;
        if holder.incarnation == self.incarnation.current() {
            // Ours, but the dialer has not started on it yet.
            return Err(RequestError::NotConnected);
        }
        let url = holder
            .private_api_url
            .ok_or_else(|| RequestError::HolderUnreachable {
                replica: holder.replica_id.clone(),
                reason: "it serves no private API (KAS_GATEWAY_PRIVATE_API_LISTEN)".into(),
            })?;
        Ok((holder.replica_id, url))
    }

    fn forwarder(&self, replica: &str) -> Result<&Forwarder, RequestError> {
        self.forwarder
            .as_ref()
            .ok_or_else(|| RequestError::HolderUnreachable {
                replica: replica.to_owned(),
                reason: "this replica has no private API secret to call it with".into(),
            })
    }
}

#[async_trait::async_trait]
impl Sessions for ClusterSessions {
    async fn get(&self, agent_id: Id) -> crate::domain::Result<Option<Connection>> {
        Ok(self.states.get(agent_id).await?)
    }

    async fn all(&self) -> crate::domain::Result<Vec<Connection>> {
        Ok(self.states.all().await?)
    }

    fn subscribe(&self) -> broadcast::Receiver<Connection> {
        self.changes.subscribe()
    }

    async fn dial_now(&self, agent_id: Id, timeout: Duration) -> Result<(), RequestError> {
        if self.local.dial_now(agent_id) {
            return Ok(());
        }
        let (replica, url) = self.holder(agent_id).await?;
        self.forwarder(&replica)?
            .dial_now(&replica, &url, agent_id, timeout)
            .await
    }

    async fn request(
        &self,
        agent_id: Id,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<SessionResponse, RequestError> {
        if self.local.get(agent_id).is_some() {
            return Sessions::request(self.local.as_ref(), agent_id, method, payload, timeout)
                .await;
        }
        let (replica, url) = self.holder(agent_id).await?;
        self.forwarder(&replica)?
            .request(&replica, &url, agent_id, method, payload, timeout)
            .await
    }

    async fn proxy(
        &self,
        agent_id: Id,
        user: &crate::domain::ProxyUser,
        request: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, RequestError> {
        if self.local.get(agent_id).is_some() {
            return self.local.proxy(agent_id, user, request).await;
        }
        let (replica, url) = self.holder(agent_id).await?;
        self.forwarder(&replica)?
            .proxy(&replica, &url, agent_id, user, request)
            .await
    }
}

/// Writes this replica's transitions to the database in batches: the newest state of each
/// agent wins, and a failed write keeps the batch for the next try (a newer state replaces
/// an older one meanwhile), so that nothing queues behind a slow or absent database.
async fn write(
    local: Arc<Registry>,
    states: Arc<dyn ConnectionStates>,
    incarnation: Incarnation,
    shutdown: CancellationToken,
) {
    let mut feed = local.subscribe();
    let mut pending: HashMap<Id, Connection> = HashMap::new();
    loop {
        if pending.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                next = feed.recv() => {
                    if !take(next, &local, &mut pending) {
                        return;
                    }
                }
            }
        }
        // Gather what else happens within the window.
        let window = tokio::time::sleep(BATCH_WINDOW);
        tokio::pin!(window);
        while pending.len() < MAX_BATCH {
            tokio::select! {
                () = &mut window => break,
                next = feed.recv() => {
                    if !take(next, &local, &mut pending) {
                        return;
                    }
                }
            }
        }
        let mut batch: Vec<Connection> = pending.drain().map(|(_, c)| c).collect();
        batch.sort_by_key(|c| c.agent_id);
        let me = incarnation.current();
        if let Err(error) = states.record(&me, &batch).await {
            tracing::warn!(%error, states = batch.len(), "writing connection states failed; retrying");
            for connection in batch {
                pending.entry(connection.agent_id).or_insert(connection);
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY_AFTER) => {}
            }
        }
    }
}

/// Adds a change to `pending`; after missed changes, every state this replica tracks.
/// False once the feed has ended.
fn take(
    next: Result<Connection, broadcast::error::RecvError>,
    local: &Registry,
    pending: &mut HashMap<Id, Connection>,
) -> bool {
    match next {
        Ok(connection) => {
            pending.insert(connection.agent_id, connection);
            true
        }
        Err(broadcast::error::RecvError::Lagged(_)) => {
            for connection in local.all() {
                pending.insert(connection.agent_id, connection);
            }
            true
        }
        Err(broadcast::error::RecvError::Closed) => false,
    }
}

/// Reads the states that replicas announce and passes them on to watchers; after a
/// reconnection (an empty list), every state, since announcements may have been missed.
async fn relay(
    states: Arc<dyn ConnectionStates>,
    changes: broadcast::Sender<Connection>,
    mut ids: mpsc::Receiver<Vec<Id>>,
) {
    let mut first = true;
    while let Some(agent_ids) = ids.recv().await {
        if agent_ids.is_empty() && std::mem::take(&mut first) {
            continue;
        }
        if changes.receiver_count() == 0 {
            continue;
        }
        let read = if agent_ids.is_empty() {
            states.all().await
        } else {
            states.these(&agent_ids).await
        };
        match read {
            Ok(connections) => {
                for connection in connections {
                    let _ = changes.send(connection);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "reading announced connection states failed");
            }
        }
    }
}
