//! Agents' connection states in PostgreSQL, so that every replica gives the same answer: the
//! holder writes each transition (in batches), fenced by its assignment; every replica reads
//! them, and hears of changes through `LISTEN`/`NOTIFY`.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Error, Result};
use crate::domain::{AgentMetadata, Connection, Id, Phase, Timestamp};

/// The replica that holds an agent, as the others reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its incarnation.
    pub incarnation: String,
    /// Its name.
    pub replica_id: String,
    /// Where its private API listens, if it serves one.
    pub private_api_url: Option<String>,
}

/// Connection states shared by the replicas.
#[async_trait]
pub trait ConnectionStates: Send + Sync + std::fmt::Debug {
    /// Writes the states of agents held by `incarnation` and tells every replica which
    /// changed. A state is written only while the agent's assignment names `incarnation` with
    /// the state's epoch; the others are dropped (the agent has changed hands).
    async fn record(&self, incarnation: &str, states: &[Connection]) -> Result<()>;
    /// One agent's state, as the cluster knows it.
    async fn get(&self, agent_id: Id) -> Result<Option<Connection>>;
    /// Every agent's state, by agent id.
    async fn all(&self) -> Result<Vec<Connection>>;
    /// The states of `agent_ids`.
    async fn these(&self, agent_ids: &[Id]) -> Result<Vec<Connection>>;
    /// The live replica that holds `agent_id`, if any.
    async fn holder(&self, agent_id: Id) -> Result<Option<Holder>>;
    /// Sends the ids of agents whose state changed, as replicas record them, until
    /// `shutdown`; an empty list after each (re)connection, when changes may have been missed.
    fn follow(&self, changed: mpsc::Sender<Vec<Id>>, shutdown: CancellationToken);
}

/// The channel states are announced on: comma-separated agent ids.
const CHANNEL: &str = "kas_gateway_sessions";

/// Rows per statement: the ids of one batch fit in one notification (at most 8,000 bytes).
const BATCH: usize = 400;

/// [`ConnectionStates`] on PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgConnectionStates {
    pool: PgPool,
}

impl PgConnectionStates {
    /// States in the database behind `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The states of `agent_ids`, or of every agent.
    async fn read(&self, agent_ids: Option<&[Id]>) -> Result<Vec<Connection>> {
        let rows: Vec<Row> = sqlx::query_as(SELECT)
            .bind(agent_ids)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)?;
        Ok(rows.into_iter().map(Row::into_connection).collect())
    }
}

const SELECT: &str = "SELECT s.agent_id, s.url_configuration_id, s.url, s.phase, s.last_error, \
     s.last_attempt_at, s.connected_since, s.last_error_at, s.agent_version, s.agent_commit, \
     s.pod_namespace, s.pod_name, s.kubernetes_version, s.token_id, s.replica_id, s.epoch, \
     COALESCE(r.expires_at > now(), false) AS live, \
     COALESCE(a.holder = s.holder AND a.epoch = s.epoch, false) AS current \
     FROM agent_connections s \
     LEFT JOIN replicas r ON r.incarnation = s.holder \
     LEFT JOIN agent_assignments a ON a.agent_id = s.agent_id \
     WHERE $1::bigint[] IS NULL OR s.agent_id = ANY($1) \
     ORDER BY s.agent_id";

#[derive(sqlx::FromRow)]
struct Row {
    agent_id: Id,
    url_configuration_id: Id,
    url: String,
    phase: String,
    last_error: Option<String>,
    last_attempt_at: Option<i64>,
    connected_since: Option<i64>,
    last_error_at: Option<i64>,
    agent_version: Option<String>,
    agent_commit: Option<String>,
    pod_namespace: Option<String>,
    pod_name: Option<String>,
    kubernetes_version: Option<String>,
    token_id: Option<Id>,
    replica_id: String,
    epoch: i64,
    live: bool,
    current: bool,
}

impl Row {
    /// The state as the cluster sees it: as the holder wrote it while the holder is alive
    /// and still holds the agent; otherwise waiting for a replica to take the agent.
    fn into_connection(self) -> Connection {
        let phase = match self.phase.as_str() {
            "connected" => Phase::Connected,
            "backing_off" => Phase::BackingOff,
            "failed" => Phase::Failed,
            _ => Phase::Connecting,
        };
        let time = |t: Option<i64>| t.map(Timestamp::from_millis);
        let metadata = self.agent_version.map(|version| AgentMetadata {
            version,
            commit: self.agent_commit.unwrap_or_default(),
            pod_namespace: self.pod_namespace.unwrap_or_default(),
            pod_name: self.pod_name.unwrap_or_default(),
            kubernetes_version: self.kubernetes_version.unwrap_or_default(),
        });
        let connection = Connection {
            agent_id: self.agent_id,
            url_configuration_id: self.url_configuration_id,
            url: self.url,
            phase,
            last_error: self.last_error,
            last_attempt_at: time(self.last_attempt_at),
            connected_since: time(self.connected_since),
            last_error_at: time(self.last_error_at),
            metadata,
            token_id: self.token_id,
            replica: self.replica_id,
            epoch: self.epoch,
        };
        match (self.live, self.current) {
            (true, true) => connection,
            (false, _) => Connection {
                phase: Phase::Connecting,
                last_error: Some(format!(
                    "the gateway replica {} that held the agent stopped; another replica \
                     takes it over",
                    connection.replica
                )),
                connected_since: None,
                metadata: None,
                token_id: None,
                replica: String::new(),
                ..connection
            },
            (true, false) => Connection {
                phase: Phase::Connecting,
                connected_since: None,
                metadata: None,
                token_id: None,
                replica: String::new(),
                ..connection
            },
        }
    }
}

#[async_trait]
impl ConnectionStates for PgConnectionStates {
    async fn record(&self, incarnation: &str, states: &[Connection]) -> Result<()> {
        for chunk in states.chunks(BATCH) {
            let column = |f: &dyn Fn(&Connection) -> Option<String>| -> Vec<Option<String>> {
                chunk.iter().map(f).collect()
            };
            let millis = |f: &dyn Fn(&Connection) -> Option<Timestamp>| -> Vec<Option<i64>> {
                chunk
                    .iter()
                    .map(|c| f(c).map(Timestamp::as_millis))
                    .collect()
            };
            let meta = |f: &dyn Fn(&AgentMetadata) -> &str| -> Vec<Option<String>> {
                chunk
                    .iter()
                    .map(|c| c.metadata.as_ref().map(|m| f(m).to_owned()))
                    .collect()
            };
            // One statement: the fenced upsert, then a notification with the ids written.
            sqlx::query(
                "WITH v AS (SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], \
                   $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bigint[], \
                   $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], \
                   $14::bigint[], $15::bigint[]) AS v(agent_id, url_configuration_id, url, \
                   phase, last_error, last_attempt_at, connected_since, last_error_at, \
                   agent_version, agent_commit, pod_namespace, pod_name, kubernetes_version, \
                   token_id, epoch)), \
                 written AS (INSERT INTO agent_connections (agent_id, url_configuration_id, \
                   url, phase, last_error, last_attempt_at, connected_since, last_error_at, \
                   agent_version, agent_commit, pod_namespace, pod_name, kubernetes_version, \
                   token_id, holder, replica_id, epoch) \
                   SELECT v.agent_id, v.url_configuration_id, v.url, v.phase, v.last_error, \
                     v.last_attempt_at, v.connected_since, v.last_error_at, v.agent_version, \
                     v.agent_commit, v.pod_namespace, v.pod_name, v.kubernetes_version, \
                     v.token_id, $16, $17, v.epoch \
                   FROM v \
                   JOIN agent_assignments a ON a.agent_id = v.agent_id AND a.holder = $16 \
                     AND a.epoch = v.epoch \
                   JOIN agent_url_configurations c ON c.id = v.url_configuration_id \
                   ON CONFLICT (agent_id) DO UPDATE SET \
                     url_configuration_id = EXCLUDED.url_configuration_id, url = EXCLUDED.url, \
                     phase = EXCLUDED.phase, last_error = EXCLUDED.last_error, \
                     last_attempt_at = EXCLUDED.last_attempt_at, \
                     connected_since = EXCLUDED.connected_since, \
                     last_error_at = EXCLUDED.last_error_at, \
                     agent_version = EXCLUDED.agent_version, \
                     agent_commit = EXCLUDED.agent_commit, \
                     pod_namespace = EXCLUDED.pod_namespace, pod_name = EXCLUDED.pod_name, \
                     kubernetes_version = EXCLUDED.kubernetes_version, \
                     token_id = EXCLUDED.token_id, holder = EXCLUDED.holder, \
                     replica_id = EXCLUDED.replica_id, epoch = EXCLUDED.epoch \
                   RETURNING agent_id) \
                 SELECT pg_notify($18, string_agg(agent_id::text, ',')) FROM written \
                 HAVING count(*) > 0",
            )
            .bind(chunk.iter().map(|c| c.agent_id).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|c| c.url_configuration_id)
                    .collect::<Vec<_>>(),
            )
            .bind(chunk.iter().map(|c| c.url.clone()).collect::<Vec<_>>())
            .bind(column(&|c| Some(c.phase.as_str().to_owned())))
            .bind(column(&|c| c.last_error.clone()))
            .bind(millis(&|c| c.last_attempt_at))
            .bind(millis(&|c| c.connected_since))
            .bind(millis(&|c| c.last_error_at))
            .bind(meta(&|m| &m.version))
            .bind(meta(&|m| &m.commit))
            .bind(meta(&|m| &m.pod_namespace))
            .bind(meta(&|m| &m.pod_name))
            .bind(meta(&|m| &m.kubernetes_version))
            .bind(chunk.iter().map(|c| c.token_id).collect::<Vec<_>>())
            .bind(chunk.iter().map(|c| c.epoch).collect::<Vec<_>>())
            .bind(incarnation)
            .bind(chunk.first().map(|c| c.replica.clone()).unwrap_or_default())
            .bind(CHANNEL)
            .execute(&self.pool)
            .await
            .map_err(Error::from)?;
        }
        Ok(())
    }

    async fn get(&self, agent_id: Id) -> Result<Option<Connection>> {
        Ok(self.read(Some(&[agent_id])).await?.into_iter().next())
    }

    async fn all(&self) -> Result<Vec<Connection>> {
        self.read(None).await
    }

    async fn these(&self, agent_ids: &[Id]) -> Result<Vec<Connection>> {
        self.read(Some(agent_ids)).await
    }

    async fn holder(&self, agent_id: Id) -> Result<Option<Holder>> {
        let row: Option<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT r.incarnation, r.replica_id, r.private_api_url \
             FROM agent_assignments a JOIN replicas r ON r.incarnation = a.holder \
             WHERE a.agent_id = $1 AND r.expires_at > now()",
        )
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::from)?;
        Ok(
            row.map(|(incarnation, replica_id, private_api_url)| Holder {
                incarnation,
                replica_id,
                private_api_url,
            }),
        )
    }

    fn follow(&self, changed: mpsc::Sender<Vec<Id>>, shutdown: CancellationToken) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    Err(error) = listen(&pool, &changed) => {
                        tracing::debug!(%error, "listening for connection states failed; retrying");
                    }
                }
                if changed.is_closed() {
                    return;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
}

/// Forwards each notification's ids; an empty list at the start and after each reconnection.
async fn listen(
    pool: &PgPool,
    changed: &mpsc::Sender<Vec<Id>>,
) -> std::result::Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    if changed.send(Vec::new()).await.is_err() {
        return Ok(());
    }
    loop {
        // `None`: the connection was lost and is being re-established.
        let ids = match listener.try_recv().await? {
            Some(notification) => notification
                .payload()
                .split(',')
                .filter_map(|id| id.parse().ok())
                .collect(),
            None => Vec::new(),
        };
        if changed.send(ids).await.is_err() {
            return Ok(());
        }
    }
}
