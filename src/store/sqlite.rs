//! The embedded default: one SQLite file, WAL mode, foreign keys on.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

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

/// The SQLite store.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    const BACKEND: &'static str = "sqlite";

    /// The batched `last_used_at` update; `$1` is a JSON array of `[token id, millis]`.
    const TOUCH_AGENT_TOKENS: &'static str = "UPDATE cluster_agent_tokens SET last_used_at = u.at \
         FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS at \
               FROM json_each($1)) AS u \
         WHERE cluster_agent_tokens.id = u.id \
           AND (cluster_agent_tokens.last_used_at IS NULL \
                OR cluster_agent_tokens.last_used_at <= u.at - 60000)";

    const ACTIVE_AGENT_TOKENS: &'static str = "SELECT t.id FROM cluster_agent_tokens t \
         JOIN json_each($1) AS e ON t.id = e.value \
         WHERE t.status = 'active'";

    /// The agent tokens whose digests `$1` (a JSON array of hexadecimal strings) lists.
    const AGENT_TOKENS_BY_DIGESTS: &'static str = "SELECT t.token_digest, t.id, t.agent_id, t.name, t.description, t.status, \
         t.created_at, t.created_by_user_id, t.last_used_at FROM cluster_agent_tokens t \
         JOIN json_each($1) AS e ON t.token_digest = unhex(e.value)";

    /// The sealed secrets of the configurations whose ids `$1` (a JSON array) lists.
    const URL_CONFIGURATION_SECRETS: &'static str = "SELECT c.id, c.private_key, c.client_key FROM agent_url_configurations c \
         JOIN json_each($1) AS e ON c.id = e.value";

    /// Opens (creating if missing, mode 0600) the database file named by `url`.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?;
        create_private_file(&options, url)?;
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before it is acknowledged.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            // Every wait for a connection, as an event the metrics count (see
            // `metrics::PoolWaitLayer`); the log's own filter leaves these out.
            .acquire_time_level(log::LevelFilter::Trace)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// Starts a transaction that holds the write lock from its first statement, so that
    /// a read followed by a write never fails to upgrade.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// One gateway per SQLite database (its data directory is locked): it holds every agent.
    fn lease_store(&self) -> Option<std::sync::Arc<dyn super::leases::LeaseStore>> {
        None
    }

    /// One gateway per SQLite database: its memory holds every agent's state.
    fn connection_store(&self) -> Option<std::sync::Arc<dyn super::connections::ConnectionStates>> {
        None
    }

    async fn run_migrations(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }
}

sql_store!(SqliteStore);

/// Creates a missing database file with mode 0600 before SQLite opens it: SQLite would create
/// it with the umask's mode (0644 usually), and it gives its -wal and -shm files the mode of
/// the database file. An existing file keeps the mode its operator gave it.
fn create_private_file(options: &SqliteConnectOptions, url: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // In-memory and read-only databases have no file to create.
    if url.contains(":memory:") || url.contains("mode=memory") || url.contains("mode=ro") {
        return Ok(());
    }
    let path = options.get_filename();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating {}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::Store;

    /// The batched token lookup finds each digest through the unique index on
    /// `token_digest`, never by scanning the tokens.
    #[tokio::test]
    async fn token_lookups_use_the_digest_index() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url, 1).await.unwrap();
        store.migrate().await.unwrap();
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {}",
            SqliteStore::AGENT_TOKENS_BY_DIGESTS
        )))
        .bind("[\"00\"]")
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let steps: Vec<&str> = plan.iter().map(|(_, _, _, step)| step.as_str()).collect();
        assert!(
            steps
                .iter()
                .any(|s| s.starts_with("SEARCH t USING INDEX") && s.contains("token_digest")),
            "{steps:?}"
        );
        assert!(!steps.iter().any(|s| s.starts_with("SCAN t")), "{steps:?}");
    }
}
