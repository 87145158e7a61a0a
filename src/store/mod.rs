//! Persistence: one trait of domain operations, implemented for SQLite and PostgreSQL.
//!
//! Both implementations share their SQL (`$N` placeholders work on both) through the
//! `sql_store!` macro in [`sql`]; each backend owns its connection set-up, its
//! transaction start and its migrations folder.

use std::sync::Arc;

use async_trait::async_trait;

use crate::crypto::TokenDigest;
use crate::domain::{
    AccessLevel, Agent, AgentToken, Id, Member, PageRequest, Paged, PersonalAccessToken, Project,
    Result, Scope, SealedSecret, SecretColumn, Timestamp, UrlConfiguration, User,
};
pub use leases::LeaseStore;

#[macro_use]
mod sql;
pub mod leases;
mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A user to create.
#[derive(Clone, Debug)]
pub struct NewUser {
    /// Login name.
    pub username: String,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Administrator flag.
    pub is_admin: bool,
    /// Creation time.
    pub created_at: Timestamp,
}

/// A personal access token to create.
#[derive(Clone, Debug)]
pub struct NewPersonalToken {
    /// Name.
    pub name: String,
    /// Digest of the secret.
    pub digest: TokenDigest,
    /// Scopes.
    pub scopes: Vec<Scope>,
    /// Expiry date, if any.
    pub expires_at: Option<time::Date>,
    /// Creation time.
    pub created_at: Timestamp,
}

/// A project to create, in its creator's namespace.
#[derive(Clone, Debug)]
pub struct NewProject {
    /// Creator; the project lives in their namespace and they become its Owner.
    pub creator_id: Id,
    /// Display name.
    pub name: String,
    /// Path.
    pub path: String,
    /// Description.
    pub description: String,
    /// Creation time.
    pub created_at: Timestamp,
}

/// Which unique attribute of a project a create collided with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectTaken {
    /// A project with this name exists in the namespace.
    pub name: bool,
    /// A project with this path exists in the namespace.
    pub path: bool,
}

/// An agent token to create.
#[derive(Clone, Debug)]
pub struct NewAgentToken {
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Digest of the secret.
    pub digest: TokenDigest,
    /// Creator.
    pub created_by_user_id: Id,
    /// Creation time.
    pub created_at: Timestamp,
}

/// The outcome of an agent token create.
#[derive(Clone, Debug)]
pub enum TokenCreated {
    /// Created.
    Created(AgentToken),
    /// The agent already has the maximum number of active tokens.
    LimitReached,
}

/// A URL configuration to create; its secret is sealed once the row has an id.
#[derive(Clone, Debug)]
pub struct NewUrlConfiguration {
    /// The agent.
    pub agent_id: Id,
    /// The agent's project.
    pub project_id: Id,
    /// URL.
    pub url: String,
    /// JWT mode: the public key.
    pub public_key: Option<String>,
    /// mTLS mode: the client certificate.
    pub client_cert: Option<String>,
    /// CA certificate.
    pub ca_cert: Option<String>,
    /// TLS server name.
    pub tls_host: Option<String>,
    /// Which column receives the sealed secret.
    pub secret_column: SecretColumn,
    /// Creator.
    pub created_by_user_id: Id,
    /// Creation time.
    pub created_at: Timestamp,
}

/// Seals a secret for the row id it is given (called inside the create transaction).
pub type Sealer<'a> = &'a (dyn Fn(Id) -> Result<Vec<u8>> + Send + Sync);

/// The outcome of removing a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRemoved {
    /// Removed.
    Removed,
    /// Not a member.
    NotMember,
    /// The member is the project's last Owner and stays.
    LastOwner,
}

/// The domain's storage operations. Errors are already domain errors: a missing row is
/// [`crate::domain::Error::NotFound`], a unique violation [`crate::domain::Error::Conflict`],
/// an unreachable database [`crate::domain::Error::Unavailable`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<()>;
    /// Checks that the database answers.
    async fn ping(&self) -> Result<()>;
    /// Leases between replicas, where several can share the database (PostgreSQL); `None`
    /// where one gateway holds every agent (SQLite).
    fn leases(&self) -> Option<Arc<dyn LeaseStore>>;
    /// Records the check value of every key id not seen before, and returns the value stored
    /// for each given id (the first replica to use an id decides its value).
    async fn encryption_key_checks(
        &self,
        checks: &[(String, String)],
        now: Timestamp,
    ) -> Result<Vec<(String, String)>>;
    /// Closes every connection, waiting for in-flight queries.
    async fn close(&self);

    /// Creates the first administrator and its token if, and only if, there is no user yet.
    /// Returns whether it did.
    async fn bootstrap_admin(&self, user: NewUser, token: NewPersonalToken) -> Result<bool>;
    /// Creates a user. Conflict when the username or e-mail is taken.
    async fn create_user(&self, user: NewUser) -> Result<User>;
    /// A user by id.
    async fn user(&self, id: Id) -> Result<Option<User>>;
    /// A user by username (case-insensitive).
    async fn user_by_username(&self, username: &str) -> Result<Option<User>>;
    /// Whether a username or an e-mail address is taken (case-insensitive).
    async fn user_taken(&self, username: &str, email: &str) -> Result<(bool, bool)>;

    /// Creates a personal access token for `user_id`.
    async fn create_personal_token(
        &self,
        user_id: Id,
        token: NewPersonalToken,
    ) -> Result<PersonalAccessToken>;
    /// The token with this digest and its user, whatever its state.
    async fn personal_token(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<(PersonalAccessToken, User)>>;

    /// Records that a personal access token authenticated a request at `at`.
    async fn touch_personal_token(&self, token_id: Id, at: Timestamp) -> Result<()>;

    /// Creates a project and makes its creator Owner, unless the name or path is taken.
    async fn create_project(&self, project: NewProject) -> Result<Result<Project, ProjectTaken>>;
    /// A project by id.
    async fn project(&self, id: Id) -> Result<Option<Project>>;
    /// A project by namespace and project path (case-insensitive).
    async fn project_by_path(&self, namespace: &str, path: &str) -> Result<Option<Project>>;
    /// Projects `member_id` belongs to (all projects when `None`), newest first.
    async fn list_projects(
        &self,
        member_id: Option<Id>,
        page: PageRequest,
    ) -> Result<Paged<Project>>;

    /// The role `user_id` has in `project_id`, if a member.
    async fn access_level(&self, project_id: Id, user_id: Id) -> Result<Option<AccessLevel>>;
    /// Adds a member. Conflict when already a member.
    async fn add_member(
        &self,
        project_id: Id,
        user_id: Id,
        level: AccessLevel,
        at: Timestamp,
    ) -> Result<Member>;
    /// One member.
    async fn member(&self, project_id: Id, user_id: Id) -> Result<Option<Member>>;
    /// The members of a project, by username.
    async fn list_members(&self, project_id: Id, page: PageRequest) -> Result<Paged<Member>>;
    /// Removes a member, keeping at least one Owner.
    async fn remove_member(&self, project_id: Id, user_id: Id) -> Result<MemberRemoved>;

    /// Registers an agent. Conflict when the name is taken in the project.
    async fn register_agent(
        &self,
        project_id: Id,
        name: &str,
        created_by: Id,
        at: Timestamp,
    ) -> Result<Agent>;
    /// The agents of a project, by name.
    async fn list_agents(&self, project_id: Id, page: PageRequest) -> Result<Paged<Agent>>;
    /// One agent of a project.
    async fn agent(&self, project_id: Id, agent_id: Id) -> Result<Option<Agent>>;
    /// Deletes an agent and everything that belongs to it. NotFound when there is no such
    /// agent; PreconditionFailed when it changed after `unmodified_since`.
    async fn delete_agent(
        &self,
        project_id: Id,
        agent_id: Id,
        unmodified_since: Option<Timestamp>,
    ) -> Result<()>;

    /// Creates an agent token unless the agent already has `limit` active ones; the check
    /// and the insert are one serialised transaction, so the limit holds under concurrency.
    async fn create_agent_token(
        &self,
        agent_id: Id,
        token: NewAgentToken,
        limit: i64,
    ) -> Result<TokenCreated>;
    /// An agent's active tokens, most recently used first.
    async fn list_agent_tokens(&self, agent_id: Id, page: PageRequest)
    -> Result<Paged<AgentToken>>;
    /// One active token of an agent.
    async fn agent_token(&self, agent_id: Id, token_id: Id) -> Result<Option<AgentToken>>;
    /// Revokes a token; false when the agent has no such token (active or revoked).
    async fn revoke_agent_token(&self, agent_id: Id, token_id: Id) -> Result<bool>;

    /// Creates an agent's URL configuration with its sealed secret, in one transaction.
    /// Conflict when the agent has one already (a unique index decides, also under
    /// concurrency); NotFound when the agent is gone.
    async fn create_url_configuration(
        &self,
        config: NewUrlConfiguration,
        seal: Sealer<'_>,
    ) -> Result<UrlConfiguration>;
    /// An agent's URL configurations (zero or one).
    async fn url_configurations(&self, agent_id: Id) -> Result<Vec<UrlConfiguration>>;
    /// One URL configuration of an agent.
    async fn url_configuration(&self, agent_id: Id, id: Id) -> Result<Option<UrlConfiguration>>;
    /// Deletes one URL configuration of an agent; false when there is none with that id.
    async fn delete_url_configuration(&self, agent_id: Id, id: Id) -> Result<bool>;
    /// The sealed secret of a URL configuration.
    async fn url_configuration_secret(&self, id: Id) -> Result<Option<SealedSecret>>;
    /// An agent by id, whatever its project.
    async fn agent_by_id(&self, agent_id: Id) -> Result<Option<Agent>>;
    /// A URL configuration by id.
    async fn url_configuration_by_id(&self, id: Id) -> Result<Option<UrlConfiguration>>;
    /// URL configurations by id, optionally of one project and/or one agent.
    async fn list_url_configurations(
        &self,
        project_id: Option<Id>,
        agent_id: Option<Id>,
        page: PageRequest,
    ) -> Result<Paged<UrlConfiguration>>;
    /// Every URL configuration, for the dialer.
    async fn all_url_configurations(&self) -> Result<Vec<UrlConfiguration>>;
    /// The agent token with this digest, whatever its status.
    async fn agent_token_by_digest(&self, digest: &TokenDigest) -> Result<Option<AgentToken>>;
    /// Records that a token authenticated an agent at `at`, unless it did so within the
    /// last minute (one write per token per minute at most).
    async fn touch_agent_token(&self, token_id: Id, at: Timestamp) -> Result<()>;
    /// [`Store::touch_agent_token`] for many tokens in one statement (`(token id, time)`,
    /// each id once), so that session starts never queue behind each other's writes.
    async fn touch_agent_tokens(&self, uses: &[(Id, Timestamp)]) -> Result<()>;
    /// Every sealed secret, for re-encryption.
    async fn sealed_secrets(&self) -> Result<Vec<SealedSecret>>;
    /// Replaces a sealed secret if it is still `old`; false when it changed or went away.
    async fn replace_sealed_secret(&self, old: &SealedSecret, envelope: &[u8]) -> Result<bool>;
}

/// The handle the rest of the service holds.
pub type SharedStore = Arc<dyn Store>;

/// Opens the store named by `url` (`sqlite:` or `postgres:`/`postgresql:`).
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<SharedStore> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, max_connections).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(PgStore::connect(url, max_connections).await?))
    } else {
        anyhow::bail!("unsupported database URL scheme (expected sqlite: or postgres:)")
    }
}

/// Maps a storage error to a domain error, at the store boundary. Every way of not reaching
/// the database is [`crate::domain::Error::Unavailable`] (503, `UNAVAILABLE`, a warning in
/// the log): it is an operator's matter, not a bug.
pub(crate) fn map_sqlx(error: sqlx::Error) -> crate::domain::Error {
    use crate::domain::{Error, Missing};
    match error {
        sqlx::Error::RowNotFound => Error::NotFound(Missing::Record),
        sqlx::Error::Database(db) if db.is_unique_violation() => Error::Conflict,
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            Error::NotFound(Missing::Record)
        }
        sqlx::Error::Database(db) if database_unavailable(db.as_ref()) => {
            Error::Unavailable(db.to_string())
        }
        // A connection the pool opens on demand fails with these too: the configuration names
        // a TLS or authentication mode the server refuses, or the worker thread of a SQLite
        // connection died.
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Configuration(_)
        | sqlx::Error::WorkerCrashed => Error::Unavailable(error.to_string()),
        other => Error::Internal(other.to_string()),
    }
}

/// Whether a database error means the database cannot serve now, rather than a bad statement.
/// The pool opens connections on demand, so connect-time refusals arrive here as they are.
fn database_unavailable(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        let code = pg.code();
        // 08: connection exceptions. 53: insufficient resources (53300 too many connections,
        // 53100 disk full). 55000: the database is not accepting connections (`ALLOW_CONNECTIONS
        // false`; this store never uses the other causes of 55000). 57P0x: shutdown, crash,
        // starting up, database dropped. 3D000: no such database. 28: authentication failed.
        return code.starts_with("08")
            || code.starts_with("53")
            || code == "55000"
            || code.starts_with("57P0")
            || code == "3D000"
            || code.starts_with("28");
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // Primary result codes (the low byte of an extended one): BUSY and LOCKED once the
        // busy timeout has run out, IOERR, FULL (disk full), CANTOPEN.
        let primary = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        return matches!(primary, Some(5 | 6 | 10 | 13 | 14));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Error;

    #[tokio::test]
    async fn sqlite_refusals_are_unavailable_and_bugs_are_internal() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("db").display());
        let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect_with(
            &options.create_if_missing(true),
        )
        .await
        .unwrap();
        let syntax = sqlx::query("SELEC 1").execute(&mut conn).await;
        assert!(matches!(syntax.map_err(map_sqlx), Err(Error::Internal(_))));
        // A second connection that wants the write lock another holds, with no busy timeout.
        let mut other = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("PRAGMA busy_timeout = 0")
            .execute(&mut other)
            .await
            .unwrap();
        let busy = sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await;
        assert!(
            matches!(busy.map_err(map_sqlx), Err(Error::Unavailable(_))),
            "SQLITE_BUSY"
        );
    }

    #[test]
    fn pool_and_connection_failures_are_unavailable() {
        for error in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
            sqlx::Error::Configuration("server does not support TLS".into()),
        ] {
            assert!(matches!(map_sqlx(error), Error::Unavailable(_)));
        }
        assert!(matches!(
            map_sqlx(sqlx::Error::ColumnNotFound("x".into())),
            Error::Internal(_)
        ));
    }
}
