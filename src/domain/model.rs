//! The domain's entities and value types, independent of storage and transport.

use std::fmt;

use time::macros::format_description;
use time::{Date, OffsetDateTime};

/// A database identifier; every id is a JSON number on the wire.
pub type Id = i64;

/// A point in time, in milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The timestamp `millis` milliseconds after the epoch.
    pub const fn from_millis(millis: i64) -> Self {
        Self(millis)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// Whole seconds since the epoch, rounded down.
    pub const fn as_secs(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// This timestamp moved by `millis` milliseconds.
    pub const fn plus_millis(self, millis: i64) -> Self {
        Self(self.0.saturating_add(millis))
    }

    fn to_datetime(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// The calendar date (UTC) this timestamp falls on.
    pub fn date(self) -> Date {
        self.to_datetime().date()
    }

    /// Midnight UTC at the start of `date`.
    pub fn start_of(date: Date) -> Self {
        let secs = date.midnight().assume_utc().unix_timestamp();
        Self(secs.saturating_mul(1000))
    }

    /// GitLab's JSON form: ISO 8601 UTC with milliseconds, `2022-04-20T20:42:40.221Z`.
    pub fn to_iso8601(self) -> String {
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        self.to_datetime()
            .format(&format)
            .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000Z"))
    }

    /// Parses an HTTP date (`Tue, 15 Nov 1994 08:12:31 GMT`) or an RFC 3339 timestamp.
    pub fn parse_http_date(value: &str) -> Option<Self> {
        use time::format_description::well_known::{Rfc2822, Rfc3339};
        let value = value.trim();
        let parsed = OffsetDateTime::parse(value, &Rfc2822)
            .or_else(|_| OffsetDateTime::parse(value, &Rfc3339))
            .ok()?;
        let millis = parsed.unix_timestamp_nanos() / 1_000_000;
        i64::try_from(millis).ok().map(Self)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_iso8601())
    }
}

/// Formats a date as `YYYY-MM-DD`.
pub fn format_date(date: Date) -> String {
    let format = format_description!("[year]-[month]-[day]");
    date.format(&format).unwrap_or_default()
}

/// Parses a `YYYY-MM-DD` date.
pub fn parse_date(value: &str) -> Option<Date> {
    let format = format_description!("[year]-[month]-[day]");
    Date::parse(value, &format).ok()
}

/// GitLab's project access levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AccessLevel {
    /// 10
    Guest,
    /// 15
    Planner,
    /// 20
    Reporter,
    /// 30
    Developer,
    /// 40
    Maintainer,
    /// 50
    Owner,
}

impl AccessLevel {
    /// Every level, lowest first.
    pub const ALL: [AccessLevel; 6] = [
        Self::Guest,
        Self::Planner,
        Self::Reporter,
        Self::Developer,
        Self::Maintainer,
        Self::Owner,
    ];

    /// The number GitLab uses for this level.
    pub const fn value(self) -> i64 {
        match self {
            Self::Guest => 10,
            Self::Planner => 15,
            Self::Reporter => 20,
            Self::Developer => 30,
            Self::Maintainer => 40,
            Self::Owner => 50,
        }
    }

    /// The level for GitLab's number, if it is one.
    pub fn from_value(value: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|level| level.value() == value)
    }

    /// The level for a number or a name (`developer`), as the command line accepts it.
    pub fn parse(value: &str) -> Option<Self> {
        if let Ok(number) = value.parse::<i64>() {
            return Self::from_value(number);
        }
        Self::ALL
            .into_iter()
            .find(|level| level.name().eq_ignore_ascii_case(value))
    }

    /// The level's name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Guest => "guest",
            Self::Planner => "planner",
            Self::Reporter => "reporter",
            Self::Developer => "developer",
            Self::Maintainer => "maintainer",
            Self::Owner => "owner",
        }
    }
}

/// What a personal access token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Everything.
    Api,
    /// Reads only (GET and HEAD).
    ReadApi,
    /// Acting as another user (`Sudo`), for administrators' tokens.
    Sudo,
    /// The Kubernetes API of agents' clusters, through the gateway (`/k8s-proxy`).
    K8sProxy,
}

impl Scope {
    /// The scope's name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::ReadApi => "read_api",
            Self::Sudo => "sudo",
            Self::K8sProxy => "k8s_proxy",
        }
    }

    /// The scope named `value`, if known.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "api" => Some(Self::Api),
            "read_api" => Some(Self::ReadApi),
            "sudo" => Some(Self::Sudo),
            "k8s_proxy" => Some(Self::K8sProxy),
            _ => None,
        }
    }
}

/// A user account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Id.
    pub id: Id,
    /// Unique login name; also the path of the user's namespace.
    pub username: String,
    /// Display name; also the name of the user's namespace.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Instance administrators pass every role check.
    pub is_admin: bool,
    /// `active` (the only state this service creates).
    pub state: String,
    /// Creation time.
    pub created_at: Timestamp,
}

/// A personal access token's metadata (never its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersonalAccessToken {
    /// Id.
    pub id: Id,
    /// Owner.
    pub user_id: Id,
    /// Name given at creation.
    pub name: String,
    /// What the token may do.
    pub scopes: Vec<Scope>,
    /// The date on which the token stops working (midnight UTC), if any.
    pub expires_at: Option<Date>,
    /// Whether the token was revoked.
    pub revoked: bool,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last time the token authenticated a request.
    pub last_used_at: Option<Timestamp>,
}

impl PersonalAccessToken {
    /// Whether the token has expired at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expires_at
            .is_some_and(|date| now >= Timestamp::start_of(date))
    }

    /// Whether the token can authenticate a request at `now`.
    pub fn is_active(&self, now: Timestamp) -> bool {
        !self.revoked && !self.is_expired(now)
    }
}

/// A user's namespace, where that user's projects live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Id (the owning user's id).
    pub id: Id,
    /// Display name (the user's name).
    pub name: String,
    /// Path (the user's username).
    pub path: String,
}

/// A project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project {
    /// Id.
    pub id: Id,
    /// Display name.
    pub name: String,
    /// Path within the namespace.
    pub path: String,
    /// Description (empty when none).
    pub description: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// The namespace it lives in.
    pub namespace: Namespace,
}

impl Project {
    /// `"<namespace name> / <project name>"`.
    pub fn name_with_namespace(&self) -> String {
        format!("{} / {}", self.namespace.name, self.name)
    }

    /// `"<namespace path>/<project path>"`.
    pub fn path_with_namespace(&self) -> String {
        format!("{}/{}", self.namespace.path, self.path)
    }
}

/// How a request names a project: `:id` as a number or a full path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectRef {
    /// A numeric id.
    Id(Id),
    /// `namespace/project`.
    Path {
        /// Namespace path.
        namespace: String,
        /// Project path.
        project: String,
    },
    /// Something that names no project.
    Invalid,
}

impl ProjectRef {
    /// Interprets an already percent-decoded `:id`.
    pub fn parse(decoded: &str) -> Self {
        if !decoded.is_empty() && decoded.bytes().all(|b| b.is_ascii_digit()) {
            return decoded.parse().map_or(Self::Invalid, Self::Id);
        }
        match decoded.split_once('/') {
            Some((namespace, project))
                if !namespace.is_empty() && !project.is_empty() && !project.contains('/') =>
            {
                Self::Path {
                    namespace: namespace.to_owned(),
                    project: project.to_owned(),
                }
            }
            _ => Self::Invalid,
        }
    }
}

/// A user's membership of a project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member.
    pub user: User,
    /// Their role.
    pub access_level: AccessLevel,
    /// When they were added.
    pub created_at: Timestamp,
}

/// A registered Kubernetes agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    /// Id.
    pub id: Id,
    /// Name, unique within the project.
    pub name: String,
    /// The project the agent is registered with.
    pub project: Project,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last change to the agent's own record.
    pub updated_at: Timestamp,
    /// Who registered it.
    pub created_by_user_id: Id,
    /// Whether the agent has a URL configuration (GitLab's receptive agents).
    pub is_receptive: bool,
}

/// An agent token's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenStatus {
    /// Can authenticate the agent.
    Active,
    /// Revoked; kept for the record only.
    Revoked,
}

impl TokenStatus {
    /// The status on the wire and in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
        }
    }

    /// Reads the stored form.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "active" => Some(Self::Active),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// An agent token's metadata (never its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentToken {
    /// Id.
    pub id: Id,
    /// The agent it authenticates.
    pub agent_id: Id,
    /// Name.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// Active or revoked.
    pub status: TokenStatus,
    /// Creation time.
    pub created_at: Timestamp,
    /// Who created it.
    pub created_by_user_id: Id,
    /// Last time an agent authenticated with it.
    pub last_used_at: Option<Timestamp>,
}

/// How a receptive agent is dialled: where, and with which credentials (never the secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlConfiguration {
    /// Id.
    pub id: Id,
    /// The agent it belongs to (one configuration per agent).
    pub agent_id: Id,
    /// The agent's project.
    pub project_id: Id,
    /// `grpc://` or `grpcs://` URL of the agent's server.
    pub url: String,
    /// JWT mode: standard base64 of the raw Ed25519 public key.
    pub public_key: Option<String>,
    /// mTLS mode: the client certificate (PEM).
    pub client_cert: Option<String>,
    /// The CA that signed the agent's server certificate (PEM), if not a public one.
    pub ca_cert: Option<String>,
    /// The server name to verify, if not the URL's host.
    pub tls_host: Option<String>,
    /// Who created it.
    pub created_by_user_id: Id,
    /// Creation time.
    pub created_at: Timestamp,
}

/// An agent with a URL configuration, named for people (the status page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceptiveAgent {
    /// The agent's id.
    pub agent_id: Id,
    /// The agent's name.
    pub agent_name: String,
    /// Its project's id.
    pub project_id: Id,
    /// Its project's full path (`namespace/project`).
    pub project_path: String,
    /// The URL the gateway dials.
    pub url: String,
}

/// Which secret column of a URL configuration holds its sealed key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretColumn {
    /// The generated Ed25519 private key (PKCS#8), JWT mode.
    PrivateKey,
    /// The client certificate's private key (PEM), mTLS mode.
    ClientKey,
}

impl SecretColumn {
    /// The table both columns live in.
    pub const TABLE: &'static str = "agent_url_configurations";

    /// The column's name.
    pub const fn column(self) -> &'static str {
        match self {
            Self::PrivateKey => "private_key",
            Self::ClientKey => "client_key",
        }
    }
}

/// One sealed secret as stored, for re-encryption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedSecret {
    /// Column.
    pub column: SecretColumn,
    /// Row id.
    pub row: Id,
    /// The envelope.
    pub envelope: Vec<u8>,
}

/// One page of a list request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// 1-based page number.
    pub page: i64,
    /// Items per page (1..=100).
    pub per_page: i64,
}

impl PageRequest {
    /// The largest page size.
    pub const MAX_PER_PAGE: i64 = 100;
    /// The page size when none is asked for.
    pub const DEFAULT_PER_PAGE: i64 = 20;

    /// Rows to skip.
    pub fn offset(self) -> i64 {
        self.page.saturating_sub(1).saturating_mul(self.per_page)
    }
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            page: 1,
            per_page: Self::DEFAULT_PER_PAGE,
        }
    }
}

/// A page of items and the total count across all pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paged<T> {
    /// The items on this page.
    pub items: Vec<T>,
    /// The number of items on all pages.
    pub total: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_with_milliseconds() {
        assert_eq!(
            Timestamp::from_millis(1_650_487_360_221).to_iso8601(),
            "2022-04-20T20:42:40.221Z"
        );
        assert_eq!(
            Timestamp::from_millis(0).to_iso8601(),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn http_dates_parse() {
        let ts = Timestamp::parse_http_date("Wed, 20 Apr 2022 20:42:40 GMT");
        assert_eq!(ts, Some(Timestamp::from_millis(1_650_487_360_000)));
        let ts = Timestamp::parse_http_date("2022-04-20T20:42:40.221Z");
        assert_eq!(ts, Some(Timestamp::from_millis(1_650_487_360_221)));
        assert_eq!(Timestamp::parse_http_date("yesterday"), None);
    }

    #[test]
    fn project_refs() {
        assert_eq!(ProjectRef::parse("42"), ProjectRef::Id(42));
        assert_eq!(
            ProjectRef::parse("root/my.project"),
            ProjectRef::Path {
                namespace: "root".into(),
                project: "my.project".into()
            }
        );
        assert_eq!(ProjectRef::parse("test"), ProjectRef::Invalid);
        assert_eq!(ProjectRef::parse("a/b/c"), ProjectRef::Invalid);
        assert_eq!(
            ProjectRef::parse("99999999999999999999999"),
            ProjectRef::Invalid
        );
    }

    #[test]
    fn token_expiry_is_midnight_utc() {
        let date = parse_date("2030-01-02");
        let token = PersonalAccessToken {
            id: 1,
            user_id: 1,
            name: "t".into(),
            scopes: vec![Scope::Api],
            expires_at: date,
            revoked: false,
            created_at: Timestamp::from_millis(0),
            last_used_at: None,
        };
        let Some(date) = date else {
            unreachable!("valid date")
        };
        let midnight = Timestamp::start_of(date);
        assert!(token.is_active(midnight.plus_millis(-1)));
        assert!(!token.is_active(midnight));
    }
}
