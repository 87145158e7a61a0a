//! The state of agents' sessions as the transports read it (get, list, watch, dial now,
//! requests through a session), behind an interface: this replica's dialer implements it, and
//! the domain imports no dialer.

use std::time::Duration;

use tokio::sync::broadcast;

use super::{Id, Timestamp};

/// The phase of an agent's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Dialling, or waiting for the agent's hello.
    Connecting,
    /// A session is up and answers heartbeats.
    Connected,
    /// The last attempt failed; the next one waits for the backoff.
    BackingOff,
    /// The configuration itself cannot be used (for example its credentials cannot be
    /// decrypted); no retry until it changes.
    Failed,
}

impl Phase {
    /// The phase's name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::BackingOff => "backing_off",
            Self::Failed => "failed",
        }
    }
}

/// What the agent said about itself in its hello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentMetadata {
    /// Agent version.
    pub version: String,
    /// Agent commit.
    pub commit: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Kubernetes version.
    pub kubernetes_version: String,
}

/// One agent's connection state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The agent.
    pub agent_id: Id,
    /// Its URL configuration.
    pub url_configuration_id: Id,
    /// The dialled URL.
    pub url: String,
    /// Phase.
    pub phase: Phase,
    /// The last error, in words a person can act on.
    pub last_error: Option<String>,
    /// When the last attempt started.
    pub last_attempt_at: Option<Timestamp>,
    /// When the current session came up.
    pub connected_since: Option<Timestamp>,
    /// When the last error happened.
    pub last_error_at: Option<Timestamp>,
    /// The agent's metadata, once it said hello.
    pub metadata: Option<AgentMetadata>,
    /// The agent token the current session was accepted with.
    pub token_id: Option<Id>,
    /// The gateway replica that holds the agent; empty while none does.
    pub replica: String,
    /// The fencing epoch of the holder's assignment (0 with a single gateway).
    pub epoch: i64,
}

/// Why a request through a session did not get an answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// This replica has no session with the agent.
    #[error("the agent is not connected")]
    NotConnected,
    /// The agent did not answer in time.
    #[error("the agent did not answer in time")]
    Timeout,
    /// The session ended before the answer came.
    #[error("the session ended")]
    SessionEnded,
    /// No live replica holds the agent (it is being handed over, or none is up).
    #[error("no gateway replica holds the agent's session right now; try again shortly")]
    NoHolder,
    /// The replica that holds the agent did not answer.
    #[error(
        "the gateway replica {replica} that holds the agent's session did not answer: {reason}"
    )]
    HolderUnreachable {
        /// The holder's name.
        replica: String,
        /// What went wrong, without secrets.
        reason: String,
    },
    /// The state could not be read (the database).
    #[error("{0}")]
    Store(String),
    /// The agent already has as many requests open through it as allowed.
    #[error("too many requests are open through the agent right now; try again shortly")]
    TooManyStreams,
    /// A request through the session failed before its response started.
    #[error("{0}")]
    Tunnel(String),
}

/// The GitLab user a request through a session is made for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyUser {
    /// User id.
    pub id: Id,
    /// Username.
    pub username: String,
    /// GitLab's access level on the agent's project (0 for an administrator who is not a
    /// member).
    pub access_level: i32,
    /// The agent's project.
    pub project_id: Id,
    /// Its path, `namespace/project`.
    pub project_path: String,
}

/// An agent's answer to a request sent through its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionResponse {
    /// Whether the agent handled the method (`STATUS_OK`).
    pub ok: bool,
    /// What it answered.
    pub payload: Vec<u8>,
}

/// The sessions of the agents: this replica's own, or the cluster's.
#[async_trait::async_trait]
pub trait Sessions: Send + Sync + std::fmt::Debug {
    /// One agent's connection state.
    async fn get(&self, agent_id: Id) -> super::Result<Option<Connection>>;
    /// Every connection state, by agent id.
    async fn all(&self) -> super::Result<Vec<Connection>>;
    /// A feed of every change from now on.
    fn subscribe(&self) -> broadcast::Receiver<Connection>;
    /// Asks for an immediate attempt, skipping the backoff; `NotConnected` when no dialler
    /// tracks the agent.
    async fn dial_now(&self, agent_id: Id, timeout: Duration) -> Result<(), RequestError>;
    /// Sends a request through the agent's live session and waits for its answer.
    async fn request(
        &self,
        agent_id: Id,
        method: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<SessionResponse, RequestError>;
    /// Sends an HTTP request to the agent's cluster (its path relative to the cluster's
    /// Kubernetes API) through its live session; the response streams back.
    async fn proxy(
        &self,
        agent_id: Id,
        user: &ProxyUser,
        request: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, RequestError>;
}

/// No sessions at all: for the command-line tools, which dial nothing.
#[derive(Debug)]
pub struct NoSessions {
    changes: broadcast::Sender<Connection>,
}

impl Default for NoSessions {
    fn default() -> Self {
        Self {
            changes: broadcast::channel(1).0,
        }
    }
}

#[async_trait::async_trait]
impl Sessions for NoSessions {
    async fn get(&self, _agent_id: Id) -> super::Result<Option<Connection>> {
        Ok(None)
    }

    async fn all(&self) -> super::Result<Vec<Connection>> {
        Ok(Vec::new())
    }

    fn subscribe(&self) -> broadcast::Receiver<Connection> {
        self.changes.subscribe()
    }

    async fn dial_now(&self, _agent_id: Id, _timeout: Duration) -> Result<(), RequestError> {
        Err(RequestError::NotConnected)
    }

    async fn request(
        &self,
        _agent_id: Id,
        _method: &str,
        _payload: Vec<u8>,
        _timeout: Duration,
    ) -> Result<SessionResponse, RequestError> {
        Err(RequestError::NotConnected)
    }

    async fn proxy(
        &self,
        _agent_id: Id,
        _user: &ProxyUser,
        _request: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, RequestError> {
        Err(RequestError::NotConnected)
    }
}
