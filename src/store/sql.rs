//! The SQL both backends share, and the rows it reads.
//!
//! Every statement uses `$N` placeholders and standard SQL that SQLite and PostgreSQL
//! both accept; `sql_store!` instantiates the one implementation of [`super::Store`] for
//! each backend's pool type. Timestamps are stored as milliseconds since the epoch.

use super::{Error, Result};
use crate::crypto::TokenDigest;
use crate::domain::{
    AccessLevel, Agent, AgentToken, Member, Namespace, PersonalAccessToken, Project, Scope,
    SealedSecret, SecretColumn, Timestamp, TokenStatus, UrlConfiguration, User, parse_date,
};

/// Columns of a user, aliased so that a user can be joined to anything.
macro_rules! user_columns {
    ($alias:literal) => {
        concat!(
            $alias,
            ".id AS user_id, ",
            $alias,
            ".username AS user_username, ",
            $alias,
            ".name AS user_name, ",
            $alias,
            ".email AS user_email, ",
            $alias,
            ".is_admin AS user_is_admin, ",
            $alias,
            ".state AS user_state, ",
            $alias,
            ".created_at AS user_created_at"
        )
    };
}

/// Columns of a project and its namespace (`p` joined to its owner `ns`).
macro_rules! project_columns {
    () => {
        "p.id AS project_id, p.name AS project_name, p.path AS project_path, \
         p.description AS project_description, p.created_at AS project_created_at, \
         ns.id AS namespace_id, ns.name AS namespace_name, ns.username AS namespace_path"
    };
}

/// `projects p` joined to its namespace owner `ns`.
macro_rules! project_from {
    () => {
        " FROM projects p JOIN users ns ON ns.id = p.namespace_id "
    };
}

/// Columns of an agent (`a`), its project and namespace.
macro_rules! agent_select {
    () => {
        concat!(
            "SELECT a.id, a.name, a.created_at, a.updated_at, a.created_by_user_id, \
             EXISTS (SELECT 1 FROM agent_url_configurations c WHERE c.agent_id = a.id) AS is_receptive, ",
            project_columns!(),
            " FROM cluster_agents a JOIN projects p ON p.id = a.project_id \
             JOIN users ns ON ns.id = p.namespace_id "
        )
    };
}

/// Columns of an agent token.
macro_rules! token_select {
    () => {
        "SELECT id, agent_id, name, description, status, created_at, created_by_user_id, \
         last_used_at FROM cluster_agent_tokens "
    };
}

/// Columns of a member (`m`) and its user (`u`).
macro_rules! member_select {
    () => {
        concat!(
            "SELECT m.access_level, m.created_at AS member_created_at, ",
            user_columns!("u"),
            " FROM project_members m JOIN users u ON u.id = m.user_id "
        )
    };
}

#[derive(sqlx::FromRow)]
pub(crate) struct UserRow {
    user_id: i64,
    user_username: String,
    user_name: String,
    user_email: String,
    user_is_admin: bool,
    user_state: String,
    user_created_at: i64,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> Self {
        User {
            id: row.user_id,
            username: row.user_username,
            name: row.user_name,
            email: row.user_email,
            is_admin: row.user_is_admin,
            state: row.user_state,
            created_at: Timestamp::from_millis(row.user_created_at),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct PersonalTokenRow {
    pat_id: i64,
    pat_name: String,
    pat_scopes: String,
    pat_expires_at: Option<String>,
    pat_revoked: bool,
    pat_created_at: i64,
    pat_last_used_at: Option<i64>,
    #[sqlx(flatten)]
    user: UserRow,
}

impl PersonalTokenRow {
    pub(crate) fn into_domain(self) -> (PersonalAccessToken, User) {
        let token = PersonalAccessToken {
            id: self.pat_id,
            user_id: self.user.user_id,
            name: self.pat_name,
            scopes: decode_scopes(&self.pat_scopes),
            expires_at: self.pat_expires_at.as_deref().and_then(parse_date),
            revoked: self.pat_revoked,
            created_at: Timestamp::from_millis(self.pat_created_at),
            last_used_at: self.pat_last_used_at.map(Timestamp::from_millis),
        };
        (token, self.user.into())
    }
}

/// Scopes as stored: names separated by spaces.
pub(crate) fn encode_scopes(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A `LIKE` pattern (with `\` as the escape) matching any text that holds `text`, ignoring
/// case (the column is compared lower-cased).
pub(crate) fn like_pattern(text: &str) -> String {
    let escaped = text
        .to_lowercase()
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

pub(crate) fn decode_scopes(stored: &str) -> Vec<Scope> {
    stored.split_whitespace().filter_map(Scope::parse).collect()
}

#[derive(sqlx::FromRow)]
pub(crate) struct ProjectRow {
    project_id: i64,
    project_name: String,
    project_path: String,
    project_description: String,
    project_created_at: i64,
    namespace_id: i64,
    namespace_name: String,
    namespace_path: String,
}

impl From<ProjectRow> for Project {
    fn from(row: ProjectRow) -> Self {
        Project {
            id: row.project_id,
            name: row.project_name,
            path: row.project_path,
            description: row.project_description,
            created_at: Timestamp::from_millis(row.project_created_at),
            namespace: Namespace {
                id: row.namespace_id,
                name: row.namespace_name,
                path: row.namespace_path,
            },
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct MemberRow {
    access_level: i64,
    member_created_at: i64,
    #[sqlx(flatten)]
    user: UserRow,
}

impl TryFrom<MemberRow> for Member {
    type Error = Error;

    fn try_from(row: MemberRow) -> Result<Self> {
        let access_level = AccessLevel::from_value(row.access_level).ok_or_else(|| {
            Error::other(format!(
                "stored access level {} is unknown",
                row.access_level
            ))
        })?;
        Ok(Member {
            user: row.user.into(),
            access_level,
            created_at: Timestamp::from_millis(row.member_created_at),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AgentRow {
    id: i64,
    name: String,
    created_at: i64,
    updated_at: i64,
    created_by_user_id: i64,
    is_receptive: bool,
    #[sqlx(flatten)]
    project: ProjectRow,
}

impl From<AgentRow> for Agent {
    fn from(row: AgentRow) -> Self {
        Agent {
            id: row.id,
            name: row.name,
            project: row.project.into(),
            created_at: Timestamp::from_millis(row.created_at),
            updated_at: Timestamp::from_millis(row.updated_at),
            created_by_user_id: row.created_by_user_id,
            is_receptive: row.is_receptive,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct TokenRow {
    id: i64,
    agent_id: i64,
    name: String,
    description: Option<String>,
    status: String,
    created_at: i64,
    created_by_user_id: i64,
    last_used_at: Option<i64>,
}

/// A token row with its digest, for lookups of many digests at once.
#[derive(sqlx::FromRow)]
pub(crate) struct DigestTokenRow {
    token_digest: Vec<u8>,
    #[sqlx(flatten)]
    token: TokenRow,
}

impl DigestTokenRow {
    pub(crate) fn into_pair(self) -> Result<(TokenDigest, AgentToken)> {
        Ok((
            TokenDigest::from_stored(self.token_digest),
            AgentToken::try_from(self.token)?,
        ))
    }
}

impl TryFrom<TokenRow> for AgentToken {
    type Error = Error;

    fn try_from(row: TokenRow) -> Result<Self> {
        let status = TokenStatus::parse(&row.status)
            .ok_or_else(|| Error::other(format!("stored token status {:?}", row.status)))?;
        Ok(AgentToken {
            id: row.id,
            agent_id: row.agent_id,
            name: row.name,
            description: row.description,
            status,
            created_at: Timestamp::from_millis(row.created_at),
            created_by_user_id: row.created_by_user_id,
            last_used_at: row.last_used_at.map(Timestamp::from_millis),
        })
    }
}

/// Columns of a URL configuration (never its sealed secrets).
macro_rules! url_configuration_select {
    () => {
        "SELECT c.id, c.agent_id, a.project_id, c.url, c.public_key, c.client_cert, c.ca_cert, \
         c.tls_host, c.created_by_user_id, c.created_at FROM agent_url_configurations c \
         JOIN cluster_agents a ON a.id = c.agent_id "
    };
}

#[derive(sqlx::FromRow)]
pub(crate) struct UrlConfigurationRow {
    id: i64,
    agent_id: i64,
    project_id: i64,
    url: String,
    public_key: Option<String>,
    client_cert: Option<String>,
    ca_cert: Option<String>,
    tls_host: Option<String>,
    created_by_user_id: i64,
    created_at: i64,
}

impl From<UrlConfigurationRow> for UrlConfiguration {
    fn from(row: UrlConfigurationRow) -> Self {
        UrlConfiguration {
            id: row.id,
            agent_id: row.agent_id,
            project_id: row.project_id,
            url: row.url,
            public_key: row.public_key,
            client_cert: row.client_cert,
            ca_cert: row.ca_cert,
            tls_host: row.tls_host,
            created_by_user_id: row.created_by_user_id,
            created_at: Timestamp::from_millis(row.created_at),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SealedRow {
    id: i64,
    private_key: Option<Vec<u8>>,
    client_key: Option<Vec<u8>>,
}

impl SealedRow {
    pub(crate) fn into_secrets(self) -> impl Iterator<Item = SealedSecret> {
        let row = self.id;
        [
            (SecretColumn::PrivateKey, self.private_key),
            (SecretColumn::ClientKey, self.client_key),
        ]
        .into_iter()
        .filter_map(move |(column, envelope)| {
            envelope.map(|envelope| SealedSecret {
                column,
                row,
                envelope,
            })
        })
    }
}

/// Stores a sealed secret in its column; binds envelope, row id.
pub(crate) const fn store_sealed_sql(column: SecretColumn) -> &'static str {
    match column {
        SecretColumn::PrivateKey => {
            "UPDATE agent_url_configurations SET private_key = $1 WHERE id = $2"
        }
        SecretColumn::ClientKey => {
            "UPDATE agent_url_configurations SET client_key = $1 WHERE id = $2"
        }
    }
}

/// Replaces a sealed secret that is still the old one; binds new envelope, row id, old envelope.
pub(crate) const fn replace_sealed_sql(column: SecretColumn) -> &'static str {
    match column {
        SecretColumn::PrivateKey => {
            "UPDATE agent_url_configurations SET private_key = $1 WHERE id = $2 AND private_key = $3"
        }
        SecretColumn::ClientKey => {
            "UPDATE agent_url_configurations SET client_key = $1 WHERE id = $2 AND client_key = $3"
        }
    }
}

/// Digest bytes as bound to a statement.
pub(crate) fn digest_bytes(digest: &TokenDigest) -> Vec<u8> {
    digest.as_bytes().to_vec()
}

/// Implements [`super::Store`] for a store type with a `pool` field and inherent
/// `begin_write` and `run_migrations` methods.
macro_rules! sql_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> &'static str {
                Self::BACKEND
            }

            async fn migrate(&self) -> Result<()> {
                self.run_migrations().await
            }

            fn leases(&self) -> Option<std::sync::Arc<dyn super::leases::LeaseStore>> {
                self.lease_store()
            }

            fn connection_states(
                &self,
            ) -> Option<std::sync::Arc<dyn super::connections::ConnectionStates>> {
                self.connection_store()
            }

            fn pool_stats(&self) -> super::PoolStats {
                super::PoolStats {
                    size: self.pool.size(),
                    idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
                    max: self.pool.options().get_max_connections(),
                }
            }

            async fn ping(&self) -> Result<()> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn close(&self) {
                self.pool.close().await;
            }

            async fn encryption_key_checks(
                &self,
                checks: &[(String, String)],
                now: Timestamp,
            ) -> Result<Vec<(String, String)>> {
                let mut stored = Vec::with_capacity(checks.len());
                for (id, check) in checks {
                    sqlx::query(
                        "INSERT INTO encryption_key_checks (key_id, check_value, created_at) \
                         VALUES ($1, $2, $3) ON CONFLICT (key_id) DO NOTHING",
                    )
                    .bind(id)
                    .bind(check)
                    .bind(now.as_millis())
                    .execute(&self.pool)
                    .await?;
                    let value: String = sqlx::query_scalar(
                        "SELECT check_value FROM encryption_key_checks WHERE key_id = $1",
                    )
                    .bind(id)
                    .fetch_one(&self.pool)
                    .await?;
                    stored.push((id.clone(), value));
                }
                Ok(stored)
            }

            async fn bootstrap_admin(
                &self,
                user: NewUser,
                token: NewPersonalToken,
            ) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
                    .fetch_one(&mut *tx)
                    .await?;
                if users > 0 {
                    return Ok(false);
                }
                let inserted = async {
                    let user_id: i64 = sqlx::query_scalar(INSERT_USER)
                        .bind(&user.username)
                        .bind(&user.name)
                        .bind(&user.email)
                        .bind(user.is_admin)
                        .bind(user.created_at.as_millis())
                        .fetch_one(&mut *tx)
                        .await?;
                    sqlx::query_scalar::<_, i64>(INSERT_PERSONAL_TOKEN)
                        .bind(user_id)
                        .bind(&token.name)
                        .bind(digest_bytes(&token.digest))
                        .bind(encode_scopes(&token.scopes))
                        .bind(token.expires_at.map(format_date))
                        .bind(token.created_at.as_millis())
                        .fetch_one(&mut *tx)
                        .await?;
                    Ok::<_, sqlx::Error>(())
                }
                .await
                .map_err(Error::from);
                match inserted {
                    // Another replica bootstrapped at the same moment.
                    Err(Error::Conflict(_)) => Ok(false),
                    Err(other) => Err(other),
                    Ok(()) => {
                        tx.commit().await?;
                        Ok(true)
                    }
                }
            }

            async fn create_user(&self, user: NewUser) -> Result<User> {
                let id: i64 = sqlx::query_scalar(INSERT_USER)
                    .bind(&user.username)
                    .bind(&user.name)
                    .bind(&user.email)
                    .bind(user.is_admin)
                    .bind(user.created_at.as_millis())
                    .fetch_one(&self.pool)
                    .await?;
                Ok(User {
                    id,
                    username: user.username,
                    name: user.name,
                    email: user.email,
                    is_admin: user.is_admin,
                    state: "active".into(),
                    created_at: user.created_at,
                })
            }

            async fn user(&self, id: Id) -> Result<Option<User>> {
                let row: Option<UserRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    user_columns!("u"),
                    " FROM users u WHERE u.id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(User::from))
            }

            async fn user_by_username(&self, username: &str) -> Result<Option<User>> {
                let row: Option<UserRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    user_columns!("u"),
                    " FROM users u WHERE lower(u.username) = lower($1)"
                ))
                .bind(username)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(User::from))
            }

            async fn user_taken(&self, username: &str, email: &str) -> Result<(bool, bool)> {
                sqlx::query_as(
                    "SELECT EXISTS (SELECT 1 FROM users WHERE lower(username) = lower($1)), \
                     EXISTS (SELECT 1 FROM users WHERE lower(email) = lower($2))",
                )
                .bind(username)
                .bind(email)
                .fetch_one(&self.pool)
                .await
                .map_err(Error::from)
            }

            async fn create_personal_token(
                &self,
                user_id: Id,
                token: NewPersonalToken,
            ) -> Result<PersonalAccessToken> {
                let id: i64 = sqlx::query_scalar(INSERT_PERSONAL_TOKEN)
                    .bind(user_id)
                    .bind(&token.name)
                    .bind(digest_bytes(&token.digest))
                    .bind(encode_scopes(&token.scopes))
                    .bind(token.expires_at.map(format_date))
                    .bind(token.created_at.as_millis())
                    .fetch_one(&self.pool)
                    .await?;
                Ok(PersonalAccessToken {
                    id,
                    user_id,
                    name: token.name,
                    scopes: token.scopes,
                    expires_at: token.expires_at,
                    revoked: false,
                    created_at: token.created_at,
                    last_used_at: None,
                })
            }

            async fn personal_token(
                &self,
                digest: &TokenDigest,
            ) -> Result<Option<(PersonalAccessToken, User)>> {
                let row: Option<PersonalTokenRow> = sqlx::query_as(concat!(
                    "SELECT t.id AS pat_id, t.name AS pat_name, t.scopes AS pat_scopes, \
                     t.expires_at AS pat_expires_at, t.revoked AS pat_revoked, \
                     t.created_at AS pat_created_at, t.last_used_at AS pat_last_used_at, ",
                    user_columns!("u"),
                    " FROM personal_access_tokens t JOIN users u ON u.id = t.user_id \
                     WHERE t.token_digest = $1"
                ))
                .bind(digest_bytes(digest))
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(PersonalTokenRow::into_domain))
            }

            async fn touch_personal_token(&self, token_id: Id, at: Timestamp) -> Result<()> {
                sqlx::query("UPDATE personal_access_tokens SET last_used_at = $2 WHERE id = $1")
                    .bind(token_id)
                    .bind(at.as_millis())
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn list_personal_tokens(
                &self,
                filter: &TokenFilter,
                today: &str,
                page: PageRequest,
            ) -> Result<Paged<PersonalAccessToken>> {
                // One statement for both backends: an absent filter is a NULL parameter.
                const WHERE: &str = "WHERE ($1 IS NULL OR t.user_id = $1) \
                     AND ($2 IS NULL OR t.revoked = $2) \
                     AND ($3 IS NULL OR $3 = (NOT t.revoked \
                          AND (t.expires_at IS NULL OR t.expires_at > $4))) \
                     AND ($5 IS NULL OR lower(t.name) LIKE $5 ESCAPE '\\') ";
                let search = filter.search.as_deref().map(like_pattern);
                let rows: Vec<PersonalTokenRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT t.id AS pat_id, t.name AS pat_name, t.scopes AS pat_scopes, \
                     t.expires_at AS pat_expires_at, t.revoked AS pat_revoked, \
                     t.created_at AS pat_created_at, t.last_used_at AS pat_last_used_at, {} \
                     FROM personal_access_tokens t JOIN users u ON u.id = t.user_id {WHERE} \
                     ORDER BY t.id ASC LIMIT $6 OFFSET $7",
                    user_columns!("u")
                )))
                .bind(filter.user_id)
                .bind(filter.revoked)
                .bind(filter.active)
                .bind(today)
                .bind(&search)
                .bind(page.per_page)
                .bind(page.offset())
                .fetch_all(&self.pool)
                .await?;
                let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT COUNT(*) FROM personal_access_tokens t {WHERE}"
                )))
                .bind(filter.user_id)
                .bind(filter.revoked)
                .bind(filter.active)
                .bind(today)
                .bind(&search)
                .fetch_one(&self.pool)
                .await?;
                Ok(Paged {
                    items: rows.into_iter().map(|r| r.into_domain().0).collect(),
                    total,
                })
            }

            async fn personal_token_by_id(&self, id: Id) -> Result<Option<PersonalAccessToken>> {
                let row: Option<PersonalTokenRow> = sqlx::query_as(concat!(
                    "SELECT t.id AS pat_id, t.name AS pat_name, t.scopes AS pat_scopes, \
                     t.expires_at AS pat_expires_at, t.revoked AS pat_revoked, \
                     t.created_at AS pat_created_at, t.last_used_at AS pat_last_used_at, ",
                    user_columns!("u"),
                    " FROM personal_access_tokens t JOIN users u ON u.id = t.user_id \
                     WHERE t.id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|r| r.into_domain().0))
            }

            async fn revoke_personal_token(&self, id: Id) -> Result<bool> {
                let done = sqlx::query("UPDATE personal_access_tokens SET revoked = TRUE WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn rotate_personal_token(
                &self,
                id: Id,
                successor: TokenSuccessor,
            ) -> Result<Rotation> {
                let mut tx = self.begin_write().await?;
                // Revoking and reading in one statement: of two rotations at once, one wins.
                let revoked: Option<(Id, String, String)> = sqlx::query_as(
                    "UPDATE personal_access_tokens SET revoked = TRUE \
                     WHERE id = $1 AND NOT revoked RETURNING user_id, name, scopes",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((user_id, name, scopes)) = revoked else {
                    let exists: Option<i64> =
                        sqlx::query_scalar("SELECT id FROM personal_access_tokens WHERE id = $1")
                            .bind(id)
                            .fetch_optional(&mut *tx)
                            .await?;
                    return Ok(if exists.is_some() {
                        Rotation::AlreadyRevoked
                    } else {
                        Rotation::Missing
                    });
                };
                let new_id: i64 = sqlx::query_scalar(INSERT_PERSONAL_TOKEN)
                    .bind(user_id)
                    .bind(&name)
                    .bind(digest_bytes(&successor.digest))
                    .bind(&scopes)
                    .bind(successor.expires_at.map(format_date))
                    .bind(successor.created_at.as_millis())
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Rotation::Rotated(PersonalAccessToken {
                    id: new_id,
                    user_id,
                    name,
                    scopes: decode_scopes(&scopes),
                    expires_at: successor.expires_at,
                    revoked: false,
                    created_at: successor.created_at,
                    last_used_at: None,
                }))
            }

            async fn list_users(&self, filter: &UserFilter, page: PageRequest) -> Result<Paged<User>> {
                const WHERE: &str = "WHERE ($1 IS NULL OR lower(u.username) = lower($1)) \
                     AND ($2 IS NULL OR lower(u.username) LIKE $2 ESCAPE '\\' \
                          OR lower(u.name) LIKE $2 ESCAPE '\\' \
                          OR lower(u.email) LIKE $2 ESCAPE '\\') \
                     AND ($3 = FALSE OR u.state = 'active') \
                     AND ($4 = FALSE OR u.state = 'blocked') \
                     AND ($5 = FALSE OR u.is_admin) ";
                // Whitelisted words only: the order is not a parameter.
                let column = match filter.order {
                    UserOrder::Id => "u.id",
                    UserOrder::Name => "u.name",
                    UserOrder::Username => "u.username",
                    UserOrder::CreatedAt => "u.created_at",
                };
                let direction = if filter.ascending { "ASC" } else { "DESC" };
                let search = filter.search.as_deref().map(like_pattern);
                let rows: Vec<UserRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {} FROM users u {WHERE} ORDER BY {column} {direction}, \
                     u.id {direction} LIMIT $6 OFFSET $7",
                    user_columns!("u")
                )))
                .bind(&filter.username)
                .bind(&search)
                .bind(filter.active)
                .bind(filter.blocked)
                .bind(filter.admins)
                .bind(page.per_page)
                .bind(page.offset())
                .fetch_all(&self.pool)
                .await?;
                let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT COUNT(*) FROM users u {WHERE}"
                )))
                .bind(&filter.username)
                .bind(&search)
                .bind(filter.active)
                .bind(filter.blocked)
                .bind(filter.admins)
                .fetch_one(&self.pool)
                .await?;
                Ok(Paged {
                    items: rows.into_iter().map(User::from).collect(),
                    total,
                })
            }

            async fn create_project(
                &self,
                project: NewProject,
            ) -> Result<std::result::Result<Project, ProjectTaken>> {
                let mut tx = self.begin_write().await?;
                let (name, path): (bool, bool) = sqlx::query_as(
                    "SELECT EXISTS (SELECT 1 FROM projects WHERE namespace_id = $1 AND name = $2), \
                     EXISTS (SELECT 1 FROM projects WHERE namespace_id = $1 AND lower(path) = lower($3))",
                )
                .bind(project.creator_id)
                .bind(&project.name)
                .bind(&project.path)
                .fetch_one(&mut *tx)
                .await?;
                if name || path {
                    return Ok(Err(ProjectTaken { name, path }));
                }
                let inserted = async {
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO projects (namespace_id, name, path, description, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $5) RETURNING id",
                    )
                    .bind(project.creator_id)
                    .bind(&project.name)
                    .bind(&project.path)
                    .bind(&project.description)
                    .bind(project.created_at.as_millis())
                    .fetch_one(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO project_members (project_id, user_id, access_level, created_at) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(id)
                    .bind(project.creator_id)
                    .bind(AccessLevel::Owner.value())
                    .bind(project.created_at.as_millis())
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query_as::<_, ProjectRow>(concat!(
                        "SELECT ",
                        project_columns!(),
                        project_from!(),
                        "WHERE p.id = $1"
                    ))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                }
                .await
                .map_err(Error::from);
                match inserted {
                    // A concurrent create took the path between the check and the insert.
                    Err(Error::Conflict(_)) => Ok(Err(ProjectTaken { name: false, path: true })),
                    Err(other) => Err(other),
                    Ok(row) => {
                        tx.commit().await?;
                        Ok(Ok(row.into()))
                    }
                }
            }

            async fn project(&self, id: Id) -> Result<Option<Project>> {
                let row: Option<ProjectRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    project_columns!(),
                    project_from!(),
                    "WHERE p.id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Project::from))
            }

            async fn project_by_path(&self, namespace: &str, path: &str) -> Result<Option<Project>> {
                let row: Option<ProjectRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    project_columns!(),
                    project_from!(),
                    "WHERE lower(ns.username) = lower($1) AND lower(p.path) = lower($2)"
                ))
                .bind(namespace)
                .bind(path)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Project::from))
            }

            async fn list_projects(
                &self,
                member_id: Option<Id>,
                page: PageRequest,
            ) -> Result<Paged<Project>> {
                let (rows, total): (Vec<ProjectRow>, i64) = match member_id {
                    None => (
                        sqlx::query_as(concat!(
                            "SELECT ",
                            project_columns!(),
                            project_from!(),
                            "ORDER BY p.id DESC LIMIT $1 OFFSET $2"
                        ))
                        .bind(page.per_page)
                        .bind(page.offset())
                        .fetch_all(&self.pool)
                        .await?,
                        sqlx::query_scalar("SELECT COUNT(*) FROM projects")
                            .fetch_one(&self.pool)
                            .await?,
                    ),
                    Some(user_id) => (
                        sqlx::query_as(concat!(
                            "SELECT ",
                            project_columns!(),
                            project_from!(),
                            "JOIN project_members m ON m.project_id = p.id AND m.user_id = $1 \
                             ORDER BY p.id DESC LIMIT $2 OFFSET $3"
                        ))
                        .bind(user_id)
                        .bind(page.per_page)
                        .bind(page.offset())
                        .fetch_all(&self.pool)
                        .await?,
                        sqlx::query_scalar("SELECT COUNT(*) FROM project_members WHERE user_id = $1")
                            .bind(user_id)
                            .fetch_one(&self.pool)
                            .await?,
                    ),
                };
                Ok(Paged {
                    items: rows.into_iter().map(Project::from).collect(),
                    total,
                })
            }

            async fn access_level(
                &self,
                project_id: Id,
                user_id: Id,
            ) -> Result<Option<AccessLevel>> {
                let level: Option<i64> = sqlx::query_scalar(
                    "SELECT access_level FROM project_members WHERE project_id = $1 AND user_id = $2",
                )
                .bind(project_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(level.and_then(AccessLevel::from_value))
            }

            async fn add_member(
                &self,
                project_id: Id,
                user_id: Id,
                level: AccessLevel,
                at: Timestamp,
            ) -> Result<Option<Member>> {
                sqlx::query(
                    "INSERT INTO project_members (project_id, user_id, access_level, created_at) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(project_id)
                .bind(user_id)
                .bind(level.value())
                .bind(at.as_millis())
                .execute(&self.pool)
                .await?;
                self.member(project_id, user_id).await
            }

            async fn member(&self, project_id: Id, user_id: Id) -> Result<Option<Member>> {
                let row: Option<MemberRow> = sqlx::query_as(concat!(
                    member_select!(),
                    "WHERE m.project_id = $1 AND m.user_id = $2"
                ))
                .bind(project_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
                row.map(Member::try_from).transpose()
            }

            async fn list_members(&self, project_id: Id, page: PageRequest) -> Result<Paged<Member>> {
                let rows: Vec<MemberRow> = sqlx::query_as(concat!(
                    member_select!(),
                    "WHERE m.project_id = $1 ORDER BY m.created_at ASC, u.id ASC LIMIT $2 OFFSET $3"
                ))
                .bind(project_id)
                .bind(page.per_page)
                .bind(page.offset())
                .fetch_all(&self.pool)
                .await?;
                let total: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM project_members WHERE project_id = $1")
                        .bind(project_id)
                        .fetch_one(&self.pool)
                        .await?;
                Ok(Paged {
                    items: rows.into_iter().map(Member::try_from).collect::<Result<_>>()?,
                    total,
                })
            }

            async fn remove_member(&self, project_id: Id, user_id: Id) -> Result<MemberRemoved> {
                let mut tx = self.begin_write().await?;
                // Serialises membership changes of this project (a row lock on PostgreSQL).
                sqlx::query("UPDATE projects SET updated_at = updated_at WHERE id = $1")
                    .bind(project_id)
                    .execute(&mut *tx)
                    .await?;
                let level: Option<i64> = sqlx::query_scalar(
                    "SELECT access_level FROM project_members WHERE project_id = $1 AND user_id = $2",
                )
                .bind(project_id)
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(level) = level else {
                    return Ok(MemberRemoved::NotMember);
                };
                if level == AccessLevel::Owner.value() {
                    let owners: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM project_members WHERE project_id = $1 AND access_level = $2",
                    )
                    .bind(project_id)
                    .bind(AccessLevel::Owner.value())
                    .fetch_one(&mut *tx)
                    .await?;
                    if owners <= 1 {
                        return Ok(MemberRemoved::LastOwner);
                    }
                }
                sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
                    .bind(project_id)
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(MemberRemoved::Removed)
            }

            async fn register_agent(
                &self,
                project_id: Id,
                name: &str,
                created_by: Id,
                at: Timestamp,
            ) -> Result<Agent> {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO cluster_agents (project_id, name, created_by_user_id, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $4) RETURNING id",
                )
                .bind(project_id)
                .bind(name)
                .bind(created_by)
                .bind(at.as_millis())
                .fetch_one(&self.pool)
                .await?;
                self.agent(project_id, id)
                    .await?
                    .ok_or(Error::NotFound)
            }

            async fn list_agents(&self, project_id: Id, page: PageRequest) -> Result<Paged<Agent>> {
                let rows: Vec<AgentRow> = sqlx::query_as(concat!(
                    agent_select!(),
                    "WHERE a.project_id = $1 ORDER BY a.name ASC, a.id ASC LIMIT $2 OFFSET $3"
                ))
                .bind(project_id)
                .bind(page.per_page)
                .bind(page.offset())
                .fetch_all(&self.pool)
                .await?;
                let total: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM cluster_agents WHERE project_id = $1")
                        .bind(project_id)
                        .fetch_one(&self.pool)
                        .await?;
                Ok(Paged {
                    items: rows.into_iter().map(Agent::from).collect(),
                    total,
                })
            }

            async fn agent(&self, project_id: Id, agent_id: Id) -> Result<Option<Agent>> {
                let row: Option<AgentRow> = sqlx::query_as(concat!(
                    agent_select!(),
                    "WHERE a.project_id = $1 AND a.id = $2"
                ))
                .bind(project_id)
                .bind(agent_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Agent::from))
            }

            async fn delete_agent(
                &self,
                project_id: Id,
                agent_id: Id,
                unmodified_since: Option<Timestamp>,
            ) -> Result<AgentDeleted> {
                let mut tx = self.begin_write().await?;
                let updated_at: Option<i64> = sqlx::query_scalar(
                    "SELECT updated_at FROM cluster_agents WHERE project_id = $1 AND id = $2",
                )
                .bind(project_id)
                .bind(agent_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(updated_at) = updated_at else {
                    return Err(Error::NotFound);
                };
                // HTTP dates have whole seconds: compare at that precision.
                if let Some(since) = unmodified_since
                    && Timestamp::from_millis(updated_at).as_secs() > since.as_secs()
                {
                    return Ok(AgentDeleted::Modified);
                }
                sqlx::query("DELETE FROM cluster_agents WHERE id = $1")
                    .bind(agent_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(AgentDeleted::Deleted)
            }

            async fn create_agent_token(
                &self,
                agent_id: Id,
                token: NewAgentToken,
                limit: i64,
            ) -> Result<TokenCreated> {
                let mut tx = self.begin_write().await?;
                // Writing the agent row first takes its lock (PostgreSQL) or the database's
                // write lock (SQLite), so concurrent creates for one agent count one at a time.
                let locked = sqlx::query(
                    "UPDATE cluster_agents SET token_generation = token_generation + 1 WHERE id = $1",
                )
                .bind(agent_id)
                .execute(&mut *tx)
                .await?;
                if locked.rows_affected() == 0 {
                    return Err(Error::NotFound);
                }
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM cluster_agent_tokens WHERE agent_id = $1 AND status = 'active'",
                )
                .bind(agent_id)
                .fetch_one(&mut *tx)
                .await?;
                if active >= limit {
                    return Ok(TokenCreated::LimitReached);
                }
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO cluster_agent_tokens \
                     (agent_id, name, description, token_digest, status, created_by_user_id, created_at) \
                     VALUES ($1, $2, $3, $4, 'active', $5, $6) RETURNING id",
                )
                .bind(agent_id)
                .bind(&token.name)
                .bind(&token.description)
                .bind(digest_bytes(&token.digest))
                .bind(token.created_by_user_id)
                .bind(token.created_at.as_millis())
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(TokenCreated::Created(AgentToken {
                    id,
                    agent_id,
                    name: token.name,
                    description: token.description,
                    status: TokenStatus::Active,
                    created_at: token.created_at,
                    created_by_user_id: token.created_by_user_id,
                    last_used_at: None,
                }))
            }

            async fn list_agent_tokens(
                &self,
                agent_id: Id,
                page: PageRequest,
            ) -> Result<Paged<AgentToken>> {
                let rows: Vec<TokenRow> = sqlx::query_as(concat!(
                    token_select!(),
                    "WHERE agent_id = $1 AND status = 'active' \
                     ORDER BY last_used_at DESC NULLS LAST, id ASC LIMIT $2 OFFSET $3"
                ))
                .bind(agent_id)
                .bind(page.per_page)
                .bind(page.offset())
                .fetch_all(&self.pool)
                .await?;
                let total: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM cluster_agent_tokens WHERE agent_id = $1 AND status = 'active'",
                )
                .bind(agent_id)
                .fetch_one(&self.pool)
                .await?;
                Ok(Paged {
                    items: rows
                        .into_iter()
                        .map(AgentToken::try_from)
                        .collect::<Result<_>>()?,
                    total,
                })
            }

            async fn agent_token(&self, agent_id: Id, token_id: Id) -> Result<Option<AgentToken>> {
                let row: Option<TokenRow> = sqlx::query_as(concat!(
                    token_select!(),
                    "WHERE agent_id = $1 AND id = $2 AND status = 'active'"
                ))
                .bind(agent_id)
                .bind(token_id)
                .fetch_optional(&self.pool)
                .await?;
                row.map(AgentToken::try_from).transpose()
            }

            async fn create_url_configuration(
                &self,
                config: NewUrlConfiguration,
                seal: Sealer<'_>,
            ) -> Result<UrlConfiguration> {
                let mut tx = self.begin_write().await?;
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO agent_url_configurations \
                     (agent_id, url, public_key, client_cert, ca_cert, tls_host, created_by_user_id, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                )
                .bind(config.agent_id)
                .bind(&config.url)
                .bind(&config.public_key)
                .bind(&config.client_cert)
                .bind(&config.ca_cert)
                .bind(&config.tls_host)
                .bind(config.created_by_user_id)
                .bind(config.created_at.as_millis())
                .fetch_one(&mut *tx)
                .await?;
                let envelope = seal(id).map_err(Error::other)?;
                sqlx::query(store_sealed_sql(config.secret_column))
                    .bind(envelope)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(UrlConfiguration {
                    id,
                    agent_id: config.agent_id,
                    project_id: config.project_id,
                    url: config.url,
                    public_key: config.public_key,
                    client_cert: config.client_cert,
                    ca_cert: config.ca_cert,
                    tls_host: config.tls_host,
                    created_by_user_id: config.created_by_user_id,
                    created_at: config.created_at,
                })
            }

            async fn url_configurations(&self, agent_id: Id) -> Result<Vec<UrlConfiguration>> {
                let rows: Vec<UrlConfigurationRow> = sqlx::query_as(concat!(
                    url_configuration_select!(),
                    "WHERE c.agent_id = $1 ORDER BY c.id"
                ))
                .bind(agent_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(UrlConfiguration::from).collect())
            }

            async fn url_configuration(
                &self,
                agent_id: Id,
                id: Id,
            ) -> Result<Option<UrlConfiguration>> {
                let row: Option<UrlConfigurationRow> = sqlx::query_as(concat!(
                    url_configuration_select!(),
                    "WHERE c.agent_id = $1 AND c.id = $2"
                ))
                .bind(agent_id)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(UrlConfiguration::from))
            }

            async fn delete_url_configuration(&self, agent_id: Id, id: Id) -> Result<bool> {
                let done = sqlx::query(
                    "DELETE FROM agent_url_configurations WHERE agent_id = $1 AND id = $2",
                )
                .bind(agent_id)
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn url_configuration_secret(&self, id: Id) -> Result<Option<SealedSecret>> {
                let row: Option<SealedRow> = sqlx::query_as(
                    "SELECT id, private_key, client_key FROM agent_url_configurations WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.and_then(|row| row.into_secrets().next()))
            }

            async fn url_configuration_secrets(&self, ids: &[Id]) -> Result<Vec<SealedSecret>> {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                // One parameter whatever the number: a JSON array of ids.
                let json = serde_json::to_string(ids).map_err(Error::other)?;
                let rows: Vec<SealedRow> = sqlx::query_as(Self::URL_CONFIGURATION_SECRETS)
                    .bind(json)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows
                    .into_iter()
                    .filter_map(|row| row.into_secrets().next())
                    .collect())
            }

            async fn agent_by_id(&self, agent_id: Id) -> Result<Option<Agent>> {
                let row: Option<AgentRow> =
                    sqlx::query_as(concat!(agent_select!(), "WHERE a.id = $1"))
                        .bind(agent_id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(Agent::from))
            }

            async fn url_configuration_by_id(&self, id: Id) -> Result<Option<UrlConfiguration>> {
                let row: Option<UrlConfigurationRow> =
                    sqlx::query_as(concat!(url_configuration_select!(), "WHERE c.id = $1"))
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(UrlConfiguration::from))
            }

            async fn list_url_configurations(
                &self,
                project_id: Option<Id>,
                agent_id: Option<Id>,
                page: PageRequest,
            ) -> Result<Paged<UrlConfiguration>> {
                let rows: Vec<UrlConfigurationRow> = sqlx::query_as(concat!(
                    url_configuration_select!(),
                    "WHERE (CAST($1 AS BIGINT) IS NULL OR a.project_id = $1) \
                     AND (CAST($2 AS BIGINT) IS NULL OR c.agent_id = $2) \
                     ORDER BY c.id LIMIT $3 OFFSET $4"
                ))
                .bind(project_id)
                .bind(agent_id)
                .bind(page.per_page)
                .bind(page.offset())
                .fetch_all(&self.pool)
                .await?;
                let total: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM agent_url_configurations c \
                     JOIN cluster_agents a ON a.id = c.agent_id \
                     WHERE (CAST($1 AS BIGINT) IS NULL OR a.project_id = $1) \
                     AND (CAST($2 AS BIGINT) IS NULL OR c.agent_id = $2)",
                )
                .bind(project_id)
                .bind(agent_id)
                .fetch_one(&self.pool)
                .await?;
                Ok(Paged {
                    items: rows.into_iter().map(UrlConfiguration::from).collect(),
                    total,
                })
            }

            async fn all_url_configurations(&self) -> Result<Vec<UrlConfiguration>> {
                let rows: Vec<UrlConfigurationRow> =
                    sqlx::query_as(concat!(url_configuration_select!(), "ORDER BY c.id"))
                        .fetch_all(&self.pool)
                        .await?;
                Ok(rows.into_iter().map(UrlConfiguration::from).collect())
            }

            async fn receptive_agents(&self) -> Result<Vec<crate::domain::ReceptiveAgent>> {
                let rows: Vec<(Id, String, Id, String, String)> = sqlx::query_as(
                    "SELECT c.agent_id, a.name AS agent_name, p.id AS project_id, \
                     ns.username || '/' || p.path AS project_path, c.url \
                     FROM agent_url_configurations c \
                     JOIN cluster_agents a ON a.id = c.agent_id \
                     JOIN projects p ON p.id = a.project_id \
                     JOIN users ns ON ns.id = p.namespace_id \
                     ORDER BY project_path, a.name",
                )
                .fetch_all(&self.pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(agent_id, agent_name, project_id, project_path, url)| {
                        crate::domain::ReceptiveAgent {
                            agent_id,
                            agent_name,
                            project_id,
                            project_path,
                            url,
                        }
                    })
                    .collect())
            }

            async fn agent_tokens_by_digests(
                &self,
                digests: &[TokenDigest],
            ) -> Result<Vec<(TokenDigest, AgentToken)>> {
                if digests.is_empty() {
                    return Ok(Vec::new());
                }
                // One parameter whatever the number: a JSON array of hexadecimal digests.
                let hex: Vec<String> =
                    digests.iter().map(|d| crate::crypto::to_hex(d.as_bytes())).collect();
                let json = serde_json::to_string(&hex).map_err(Error::other)?;
                let rows: Vec<DigestTokenRow> = sqlx::query_as(Self::AGENT_TOKENS_BY_DIGESTS)
                    .bind(json)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(DigestTokenRow::into_pair).collect()
            }

            async fn touch_agent_token(&self, token_id: Id, at: Timestamp) -> Result<()> {
                sqlx::query(
                    "UPDATE cluster_agent_tokens SET last_used_at = $2 \
                     WHERE id = $1 AND (last_used_at IS NULL OR last_used_at <= $3)",
                )
                .bind(token_id)
                .bind(at.as_millis())
                .bind(at.as_millis() - 60_000)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn touch_agent_tokens(&self, uses: &[(Id, Timestamp)]) -> Result<()> {
                if uses.is_empty() {
                    return Ok(());
                }
                // One parameter whatever the batch size: `[[id, millis], ...]`.
                let pairs: Vec<[i64; 2]> =
                    uses.iter().map(|(id, at)| [*id, at.as_millis()]).collect();
                let json = serde_json::to_string(&pairs).map_err(Error::other)?;
                sqlx::query(Self::TOUCH_AGENT_TOKENS)
                    .bind(json)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn active_agent_tokens(&self, token_ids: &[Id]) -> Result<Vec<Id>> {
                if token_ids.is_empty() {
                    return Ok(Vec::new());
                }
                // One parameter whatever the number: a JSON array of ids.
                let json = serde_json::to_string(token_ids).map_err(Error::other)?;
                Ok(sqlx::query_scalar(Self::ACTIVE_AGENT_TOKENS)
                    .bind(json)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn sealed_secrets(&self) -> Result<Vec<SealedSecret>> {
                let rows: Vec<SealedRow> = sqlx::query_as(
                    "SELECT id, private_key, client_key FROM agent_url_configurations ORDER BY id",
                )
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().flat_map(SealedRow::into_secrets).collect())
            }

            async fn replace_sealed_secret(&self, old: &SealedSecret, envelope: &[u8]) -> Result<bool> {
                let done = sqlx::query(replace_sealed_sql(old.column))
                    .bind(envelope)
                    .bind(old.row)
                    .bind(&old.envelope)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn revoke_agent_token(&self, agent_id: Id, token_id: Id) -> Result<bool> {
                let done = sqlx::query(
                    "UPDATE cluster_agent_tokens SET status = 'revoked' WHERE agent_id = $1 AND id = $2",
                )
                .bind(agent_id)
                .bind(token_id)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() > 0)
            }
        }
    };
}

/// Inserts a user; binds username, name, email, is_admin, created_at.
pub(crate) const INSERT_USER: &str = "INSERT INTO users (username, name, email, is_admin, state, created_at) \
     VALUES ($1, $2, $3, $4, 'active', $5) RETURNING id";

/// Inserts a personal access token; binds user_id, name, digest, scopes, expires_at, created_at.
pub(crate) const INSERT_PERSONAL_TOKEN: &str = "INSERT INTO personal_access_tokens (user_id, name, token_digest, scopes, expires_at, revoked, created_at) \
     VALUES ($1, $2, $3, $4, $5, FALSE, $6) RETURNING id";
