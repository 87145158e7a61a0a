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
    Scope, SealedSecret, SecretColumn, Timestamp, UrlConfiguration, User,
};
pub use connections::{ConnectionStates, Holder};
pub use error::{Error, Result};
pub use leases::LeaseStore;

#[macro_use]
mod sql;
pub mod connections;
mod error;
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

/// How long a health check waits for the database before it counts as unreachable.
pub const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Which personal access tokens to list.
#[derive(Clone, Debug, Default)]
pub struct TokenFilter {
    /// One user's tokens; every user's when `None`.
    pub user_id: Option<Id>,
    /// Only revoked (`true`) or only not revoked (`false`) tokens.
    pub revoked: Option<bool>,
    /// Only active (`true`: not revoked, not expired) or only inactive (`false`) tokens.
    pub active: Option<bool>,
    /// Only tokens whose name holds this, ignoring case.
    pub search: Option<String>,
}

/// The successor of a rotated token: the same name and scopes, a new secret and expiry.
#[derive(Clone, Debug)]
pub struct TokenSuccessor {
    /// Digest of the new secret.
    pub digest: TokenDigest,
    /// Expiry date of the new token.
    pub expires_at: Option<time::Date>,
    /// Creation time.
    pub created_at: Timestamp,
}

/// What rotating a token did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// Revoked, and replaced by this token.
    Rotated(PersonalAccessToken),
    /// No such token.
    Missing,
    /// The token was already revoked: nothing changed.
    AlreadyRevoked,
}

/// How to order a list of users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UserOrder {
    /// By id.
    #[default]
    Id,
    /// By display name.
    Name,
    /// By username.
    Username,
    /// By creation time.
    CreatedAt,
}

/// Which users to list.
#[derive(Clone, Debug, Default)]
pub struct UserFilter {
    /// Exactly this username, ignoring case.
    pub username: Option<String>,
    /// Username, name or e-mail address holding this, ignoring case.
    pub search: Option<String>,
    /// Only active users.
    pub active: bool,
    /// Only blocked users.
    pub blocked: bool,
    /// Only administrators.
    pub admins: bool,
    /// Order.
    pub order: UserOrder,
    /// Ascending rather than descending.
    pub ascending: bool,
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

/// Seals a secret for the row id it is given (called inside the create transaction); its
/// domain error comes back unchanged through [`Error::Other`].
pub type Sealer<'a> = &'a (dyn Fn(Id) -> crate::domain::Result<Vec<u8>> + Send + Sync);

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

/// The outcome of deleting an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentDeleted {
    /// Deleted.
    Deleted,
    /// It changed after the given time, and stays.
    Modified,
}

/// A connection pool's connections at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections, in use or idle.
    pub size: u32,
    /// Open connections nobody uses.
    pub idle: u32,
    /// The most the pool opens.
    pub max: u32,
}

/// The domain's storage operations. Errors are the store's own: a missing row is
/// [`Error::NotFound`], a unique violation [`Error::Conflict`], an unreachable database
/// [`Error::Unavailable`]; the domain maps them in one place.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Applies pending migrations.
    async fn migrate(&self) -> Result<()>;
    /// Checks that the database answers.
    async fn ping(&self) -> Result<()>;
    /// The connection pool's connections now.
    fn pool_stats(&self) -> PoolStats;
    /// Leases between replicas, where several can share the database (PostgreSQL); `None`
    /// where one gateway holds every agent (SQLite).
    fn leases(&self) -> Option<Arc<dyn LeaseStore>>;
    /// Connection states shared by the replicas (PostgreSQL); `None` where the one gateway's
    /// memory is the truth (SQLite).
    fn connection_states(&self) -> Option<Arc<dyn ConnectionStates>>;
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
    /// Personal access tokens matching `filter`, by id; `today` (`YYYY-MM-DD`, UTC) decides
    /// which have expired (a token expires at the start of its expiry date).
    async fn list_personal_tokens(
        &self,
        filter: &TokenFilter,
        today: &str,
        page: PageRequest,
    ) -> Result<Paged<PersonalAccessToken>>;
    /// A personal access token by id.
    async fn personal_token_by_id(&self, id: Id) -> Result<Option<PersonalAccessToken>>;
    /// Revokes a token (again, if it was); false when there is no such token.
    async fn revoke_personal_token(&self, id: Id) -> Result<bool>;
    /// Revokes token `id` and creates its successor, in one transaction.
    async fn rotate_personal_token(&self, id: Id, successor: TokenSuccessor) -> Result<Rotation>;
    /// Users matching `filter`.
    async fn list_users(&self, filter: &UserFilter, page: PageRequest) -> Result<Paged<User>>;

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
    /// Adds a member. Conflict when already a member; `None` when the membership was removed
    /// again before it could be read back.
    async fn add_member(
        &self,
        project_id: Id,
        user_id: Id,
        level: AccessLevel,
        at: Timestamp,
    ) -> Result<Option<Member>>;
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
    /// Deletes an agent and everything that belongs to it, unless it changed after
    /// `unmodified_since`. NotFound when there is no such agent.
    async fn delete_agent(
        &self,
        project_id: Id,
        agent_id: Id,
        unmodified_since: Option<Timestamp>,
    ) -> Result<AgentDeleted>;

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
    /// The sealed secrets of many URL configurations in one statement, one per configuration
    /// found (in `row`); ids without a configuration are left out.
    async fn url_configuration_secrets(&self, ids: &[Id]) -> Result<Vec<SealedSecret>>;
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
    /// Every agent with a URL configuration, with its project's path, by project path and
    /// agent name.
    async fn receptive_agents(&self) -> Result<Vec<crate::domain::ReceptiveAgent>>;
    /// The agent tokens with these digests, whatever their status, each with its digest, in
    /// one statement (digests that match no token are left out).
    async fn agent_tokens_by_digests(
        &self,
        digests: &[TokenDigest],
    ) -> Result<Vec<(TokenDigest, AgentToken)>>;
    /// Records that a token authenticated an agent at `at`, unless it did so within the
    /// last minute (one write per token per minute at most).
    async fn touch_agent_token(&self, token_id: Id, at: Timestamp) -> Result<()>;
    /// [`Store::touch_agent_token`] for many tokens in one statement (`(token id, time)`,
    /// each id once), so that session starts never queue behind each other's writes.
    async fn touch_agent_tokens(&self, uses: &[(Id, Timestamp)]) -> Result<()>;
    /// Which of `token_ids` are active agent tokens (not revoked), in one statement.
    async fn active_agent_tokens(&self, token_ids: &[Id]) -> Result<Vec<Id>>;
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
