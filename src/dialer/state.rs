//! What the dialer knows about each agent's connection: the [`Sessions`] the transports read,
//! as this replica's dialer keeps them.

use std::collections::HashMap;
use std::sync::Mutex;

use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use super::session::SessionRequest;
use crate::domain::{Connection, Id, Phase, RequestError, SessionResponse, Sessions};
use crate::proto::agent::v1 as pb;

/// Every connection this replica holds, with a feed of changes.
#[derive(Debug)]
pub struct Registry {
    replica: String,
    /// Per agent, the parts of its sessions still alive (dialling loops, sessions, closing
    /// connections): an agent is given back to the cluster only once it has none.
    holds: Arc<Mutex<HashMap<Id, usize>>>,
    connections: Mutex<HashMap<Id, Connection>>,
    sessions: Mutex<HashMap<Id, mpsc::Sender<SessionRequest>>>,
    tunnels: Mutex<HashMap<Id, super::tunnel::Tunnels>>,
    wakers: Mutex<HashMap<Id, Arc<Notify>>>,
    changes: broadcast::Sender<Connection>,
}

impl Registry {
    /// An empty registry for replica `replica`.
    pub fn new(replica: impl Into<String>) -> Self {
        let (changes, _) = broadcast::channel(1024);
        Self {
            replica: replica.into(),
            holds: Arc::new(Mutex::new(HashMap::new())),
            connections: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            tunnels: Mutex::new(HashMap::new()),
            wakers: Mutex::new(HashMap::new()),
            changes,
        }
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<Id, Connection>) -> T) -> T {
        match self.connections.lock() {
            Ok(mut guard) => f(&mut guard),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Starts tracking an agent (phase `connecting`) held with fencing `epoch`; `requests`
    /// reaches its session.
    pub fn track(
        &self,
        agent_id: Id,
        url_configuration_id: Id,
        url: &str,
        epoch: i64,
        requests: mpsc::Sender<SessionRequest>,
    ) {
        match self.sessions.lock() {
            Ok(mut map) => map.insert(agent_id, requests),
            Err(poisoned) => poisoned.into_inner().insert(agent_id, requests),
        };
        match self.wakers.lock() {
            Ok(mut map) => map.insert(agent_id, Arc::new(Notify::new())),
            Err(poisoned) => poisoned
                .into_inner()
                .insert(agent_id, Arc::new(Notify::new())),
        };
        let connection = Connection {
            agent_id,
            url_configuration_id,
            url: url.to_owned(),
            phase: Phase::Connecting,
            last_error: None,
            last_attempt_at: None,
            connected_since: None,
            last_error_at: None,
            metadata: None,
            token_id: None,
            replica: self.replica.clone(),
            epoch,
        };
        self.with(|map| map.insert(agent_id, connection.clone()));
        let _ = self.changes.send(connection);
    }

    /// Changes an agent's connection; a phase change is logged.
    pub fn update(&self, agent_id: Id, change: impl FnOnce(&mut Connection)) {
        let updated = self.with(|map| {
            let connection = map.get_mut(&agent_id)?;
            let before = connection.phase;
            change(connection);
            Some((before, connection.clone()))
        });
        if let Some((before, connection)) = updated {
            if before != connection.phase {
                tracing::info!(
                    agent_id,
                    epoch = connection.epoch,
                    url = %connection.url,
                    from = before.as_str(),
                    to = connection.phase.as_str(),
                    error = connection.last_error.as_deref().unwrap_or(""),
                    "agent connection changed"
                );
            }
            let _ = self.changes.send(connection);
        }
    }

    /// Sends a request through the agent's live session and waits for its response.
    pub async fn request(
        &self,
        agent_id: Id,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<pb::Response, RequestError> {
        if self.get(agent_id).map(|c| c.phase) != Some(Phase::Connected) {
            return Err(RequestError::NotConnected);
        }
        let sender = match self.sessions.lock() {
            Ok(map) => map.get(&agent_id).cloned(),
            Err(poisoned) => poisoned.into_inner().get(&agent_id).cloned(),
        }
        .ok_or(RequestError::NotConnected)?;
        let (reply, answer) = oneshot::channel();
        let request = pb::Request {
            id: 0,
            method: method.to_owned(),
            payload,
        };
        // The deadline covers the wait for room in the session's queue too: a session whose
        // agent takes nothing must not hold the caller past it.
        let sent_and_answered = async {
            sender
                .send((request, reply))
                .await
                .map_err(|_| RequestError::SessionEnded)?;
            answer.await.map_err(|_| RequestError::SessionEnded)
        };
        tokio::time::timeout(timeout, sent_and_answered)
            .await
            .map_err(|_| RequestError::Timeout)?
    }

    /// Opens (with `Some`) or closes an agent's tunnels, as its session comes up or ends.
    pub fn set_tunnels(&self, agent_id: Id, tunnels: Option<super::tunnel::Tunnels>) {
        let mut map = match self.tunnels.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        match tunnels {
            Some(tunnels) => map.insert(agent_id, tunnels),
            None => map.remove(&agent_id),
        };
    }

    /// Sends an HTTP request through the agent's live session.
    pub async fn proxy(
        &self,
        agent_id: Id,
        user: &crate::domain::ProxyUser,
        request: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, RequestError> {
        if self.get(agent_id).map(|c| c.phase) != Some(Phase::Connected) {
            return Err(RequestError::NotConnected);
        }
        let tunnels = match self.tunnels.lock() {
            Ok(map) => map.get(&agent_id).cloned(),
            Err(poisoned) => poisoned.into_inner().get(&agent_id).cloned(),
        }
        .ok_or(RequestError::NotConnected)?;
        tunnels.send(user, request).await
    }

    /// What wakes an agent's dialling loop out of its backoff.
    pub fn waker(&self, agent_id: Id) -> Option<Arc<Notify>> {
        match self.wakers.lock() {
            Ok(map) => map.get(&agent_id).cloned(),
            Err(poisoned) => poisoned.into_inner().get(&agent_id).cloned(),
        }
    }

    /// Asks for an immediate attempt, skipping the backoff; false when not tracked here.
    pub fn dial_now(&self, agent_id: Id) -> bool {
        self.waker(agent_id).map(|w| w.notify_one()).is_some()
    }

    /// Marks something of an agent's session as alive until the returned hold is dropped.
    pub fn hold(&self, agent_id: Id) -> Hold {
        let mut holds = match self.holds.lock() {
            Ok(holds) => holds,
            Err(poisoned) => poisoned.into_inner(),
        };
        *holds.entry(agent_id).or_insert(0) += 1;
        Hold {
            agent_id,
            holds: Arc::clone(&self.holds),
        }
    }

    /// Whether anything of a session with `agent_id` is still alive here.
    pub fn is_dialling(&self, agent_id: Id) -> bool {
        match self.holds.lock() {
            Ok(holds) => holds.contains_key(&agent_id),
            Err(poisoned) => poisoned.into_inner().contains_key(&agent_id),
        }
    }

    /// Stops tracking an agent.
    pub fn forget(&self, agent_id: Id) {
        match self.wakers.lock() {
            Ok(mut map) => map.remove(&agent_id),
            Err(poisoned) => poisoned.into_inner().remove(&agent_id),
        };
        match self.sessions.lock() {
            Ok(mut map) => map.remove(&agent_id),
            Err(poisoned) => poisoned.into_inner().remove(&agent_id),
        };
        if let Some(connection) = self.with(|map| map.remove(&agent_id)) {
            tracing::info!(agent_id, url = %connection.url, "agent connection closed");
        }
    }

    /// One agent's connection.
    pub fn get(&self, agent_id: Id) -> Option<Connection> {
        self.with(|map| map.get(&agent_id).cloned())
    }

    /// Every connection, by agent id.
    pub fn all(&self) -> Vec<Connection> {
        let mut all: Vec<Connection> = self.with(|map| map.values().cloned().collect());
        all.sort_by_key(|c| c.agent_id);
        all
    }

    /// A feed of every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Connection> {
        self.changes.subscribe()
    }
}

/// Part of an agent's session, alive until dropped (see [`Registry::hold`]).
#[derive(Debug)]
pub struct Hold {
    agent_id: Id,
    holds: Arc<Mutex<HashMap<Id, usize>>>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut holds = match self.holds.lock() {
            Ok(holds) => holds,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(count) = holds.get_mut(&self.agent_id) {
            *count -= 1;
            if *count == 0 {
                holds.remove(&self.agent_id);
            }
        }
    }
}

impl crate::cluster::Dialling for Registry {
    fn is_dialling(&self, agent_id: Id) -> bool {
        Registry::is_dialling(self, agent_id)
    }
}

#[async_trait::async_trait]
impl Sessions for Registry {
    async fn get(&self, agent_id: Id) -> crate::domain::Result<Option<Connection>> {
        Ok(Registry::get(self, agent_id))
    }

    async fn all(&self) -> crate::domain::Result<Vec<Connection>> {
        Ok(Registry::all(self))
    }

    fn subscribe(&self) -> broadcast::Receiver<Connection> {
        Registry::subscribe(self)
    }

    async fn dial_now(&self, agent_id: Id, _timeout: Duration) -> Result<(), RequestError> {
        if Registry::dial_now(self, agent_id) {
            Ok(())
        } else {
            Err(RequestError::NotConnected)
        }
    }

    async fn request(
        &self,
        agent_id: Id,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<SessionResponse, RequestError> {
        Registry::request(self, agent_id, method, payload, timeout)
            .await
            .map(|response| SessionResponse {
                ok: response.status() == pb::response::Status::Ok,
                payload: response.payload,
            })
    }

    async fn proxy(
        &self,
        agent_id: Id,
        user: &crate::domain::ProxyUser,
        request: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, RequestError> {
        Registry::proxy(self, agent_id, user, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request to a session whose queue stays full (its agent takes nothing) ends at the
    /// caller's deadline; it does not wait for room in the queue first.
    #[tokio::test]
    async fn a_request_to_a_stuck_session_ends_at_its_deadline() {
        let registry = Registry::new("replica");
        let (requests, _held) = mpsc::channel(1);
        let (reply, _) = oneshot::channel();
        requests
            .try_send((pb::Request::default(), reply))
            .unwrap_or_else(|_| panic!("the queue has room for one"));
        registry.track(7, 1, "grpc://agent:1", 1, requests);
        registry.update(7, |c| c.phase = Phase::Connected);
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            registry.request(7, "ping", Vec::new(), Duration::from_millis(100)),
        )
        .await;
        assert!(
            matches!(outcome, Ok(Err(RequestError::Timeout))),
            "{outcome:?}"
        );
    }
}
