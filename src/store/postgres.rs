//! PostgreSQL: for more than one machine; replicas share one database.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

use super::sql::*;
use super::{
    AgentDeleted, Error, MemberRemoved, NewAgentToken, NewPersonalToken, NewProject,
    NewUrlConfiguration, NewUser, ProjectTaken, Result, Rotation, Sealer, TokenCreated,
    TokenFilter, TokenSuccessor, UserFilter, UserOrder,
};
use crate::crypto::TokenDigest;
use crate::domain::{
    AccessLevel, Agent, AgentToken, Id, Member, PageRequest, Paged, PersonalAccessToken, Project,
    SealedSecret, Timestamp, TokenStatus, UrlConfiguration, User, format_date,
};

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL store.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    const BACKEND: &'static str = "postgres";

    /// The batched `last_used_at` update; `$1` is a JSON array of `[token id, millis]`.
    const TOUCH_AGENT_TOKENS: &'static str = "UPDATE cluster_agent_tokens t SET last_used_at = u.at \
         FROM (SELECT (e->>0)::bigint AS id, (e->>1)::bigint AS at \
               FROM json_array_elements($1::json) AS e) AS u \
         WHERE t.id = u.id AND (t.last_used_at IS NULL OR t.last_used_at <= u.at - 60000)";

    const ACTIVE_AGENT_TOKENS: &'static str = "SELECT t.id FROM cluster_agent_tokens t \
         JOIN json_array_elements_text($1::json) AS e(id) ON t.id = e.id::bigint \
         WHERE t.status = 'active'";

    /// The agent tokens whose digests `$1` (a JSON array of hexadecimal strings) lists.
    const AGENT_TOKENS_BY_DIGESTS: &'static str = "SELECT t.token_digest, t.id, t.agent_id, t.name, t.description, t.status, \
         t.created_at, t.created_by_user_id, t.last_used_at FROM cluster_agent_tokens t \
         JOIN json_array_elements_text($1::json) AS e(digest) ON t.token_digest = decode(e.digest, 'hex')";

    /// The sealed secrets of the configurations whose ids `$1` (a JSON array) lists.
    const URL_CONFIGURATION_SECRETS: &'static str = "SELECT c.id, c.private_key, c.client_key FROM agent_url_configurations c \
         JOIN json_array_elements_text($1::json) AS e(id) ON c.id = e.id::bigint";

    /// Connects to the database named by `url`.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.application_name("kas-gateway");
        // One connection first, on its own: its error says what is wrong (connection refused,
        // no such database, authentication), where the pool's would only say it timed out.
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
            Err(_) => anyhow::bail!(
                "the database did not answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            ),
            Ok(Err(error)) => return Err(error.into()),
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            // Every wait for a connection, as an event the metrics count (see
            // `metrics::PoolWaitLayer`); the log's own filter leaves these out.
            .acquire_time_level(log::LevelFilter::Trace)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// Starts a transaction (READ COMMITTED); write paths lock the rows they depend on.
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }

    fn lease_store(&self) -> Option<std::sync::Arc<dyn super::leases::LeaseStore>> {
        Some(std::sync::Arc::new(super::leases::PgLeases::new(
            self.pool.clone(),
        )))
    }

    fn connection_store(&self) -> Option<std::sync::Arc<dyn super::connections::ConnectionStates>> {
        Some(std::sync::Arc::new(
            super::connections::PgConnectionStates::new(self.pool.clone()),
        ))
    }

    async fn run_migrations(&self) -> Result<()> {
        // Takes an advisory lock, so replicas starting together migrate once.
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }
}

sql_store!(PgStore);
