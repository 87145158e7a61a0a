//! JSON representations, field for field as GitLab renders them.

use serde::Serialize;
use utoipa::{PartialSchema, ToSchema};

use crate::crypto::Secret;
use crate::domain::{
    Agent, AgentToken, Connection, Id, Member, PersonalAccessToken, Phase, Project,
    UrlConfiguration, User, format_date,
};

/// `config_project` of an agent (GitLab's `ProjectIdentity`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectIdentity {
    /// Project id.
    pub id: Id,
    /// Description (empty string when none).
    pub description: String,
    /// Name.
    pub name: String,
    /// `<namespace name> / <project name>`.
    pub name_with_namespace: String,
    /// Path.
    pub path: String,
    /// `<namespace path>/<project path>`.
    pub path_with_namespace: String,
    /// ISO 8601 creation time.
    #[schema(example = "2022-03-20T20:42:40.221Z")]
    pub created_at: String,
}

impl From<&Project> for ProjectIdentity {
    fn from(project: &Project) -> Self {
        Self {
            id: project.id,
            description: project.description.clone(),
            name: project.name.clone(),
            name_with_namespace: project.name_with_namespace(),
            path: project.path.clone(),
            path_with_namespace: project.path_with_namespace(),
            created_at: project.created_at.to_iso8601(),
        }
    }
}

/// A Kubernetes agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentJson {
    /// Agent id.
    pub id: Id,
    /// Agent name.
    pub name: String,
    /// The project the agent belongs to.
    pub config_project: ProjectIdentity,
    /// ISO 8601 creation time.
    pub created_at: String,
    /// Who registered the agent.
    pub created_by_user_id: Id,
    /// True while the agent has a URL configuration (receptive agent).
    pub is_receptive: bool,
}

impl From<&Agent> for AgentJson {
    fn from(agent: &Agent) -> Self {
        Self {
            id: agent.id,
            name: agent.name.clone(),
            config_project: (&agent.project).into(),
            created_at: agent.created_at.to_iso8601(),
            created_by_user_id: agent.created_by_user_id,
            is_receptive: agent.is_receptive,
        }
    }
}

/// An agent token as listed.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentTokenJson {
    /// Token id.
    pub id: Id,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// The agent the token belongs to.
    pub agent_id: Id,
    /// `active` or `revoked`.
    #[schema(example = "active")]
    pub status: String,
    /// ISO 8601 creation time.
    pub created_at: String,
    /// Who created the token.
    pub created_by_user_id: Id,
}

impl From<&AgentToken> for AgentTokenJson {
    fn from(token: &AgentToken) -> Self {
        Self {
            id: token.id,
            name: token.name.clone(),
            description: token.description.clone(),
            agent_id: token.agent_id,
            status: token.status.as_str().to_owned(),
            created_at: token.created_at.to_iso8601(),
            created_by_user_id: token.created_by_user_id,
        }
    }
}

/// A single agent token, with `last_used_at`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentTokenDetailJson {
    /// The listed fields.
    #[serde(flatten)]
    pub token: AgentTokenJson,
    /// Last time an agent authenticated with it.
    pub last_used_at: Option<String>,
}

impl From<&AgentToken> for AgentTokenDetailJson {
    fn from(token: &AgentToken) -> Self {
        Self {
            token: token.into(),
            last_used_at: token.last_used_at.map(|t| t.to_iso8601()),
        }
    }
}

/// A new agent token: the only response that carries the secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewAgentTokenJson {
    /// The token's fields.
    #[serde(flatten)]
    pub token: AgentTokenDetailJson,
    /// The secret, shown once.
    #[serde(rename = "token")]
    #[schema(example = "glagent-qeY8UVRisx9y3Loxo1scLxFuRxYcgeX3sxsdrpP_fR3Loq4xyg")]
    pub token_secret: SecretField,
}

/// A secret rendered as `"token"` in JSON; kept out of `Debug`.
#[derive(Serialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String)]
pub struct SecretField(String);

impl std::fmt::Debug for SecretField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl From<&Secret> for SecretField {
    fn from(secret: &Secret) -> Self {
        Self(secret.expose().to_owned())
    }
}

/// A user's public fields: what any authenticated caller sees of another user.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPublicJson {
    /// User id.
    pub id: Id,
    /// Username.
    pub username: String,
    /// Display name.
    pub name: String,
    /// `active`.
    pub state: String,
    /// Always false.
    pub locked: bool,
    /// Always null.
    pub avatar_url: Option<String>,
    /// Profile URL.
    pub web_url: String,
    /// ISO 8601 creation time.
    pub created_at: String,
}

/// A user as the user themselves and administrators see them: the public fields and the
/// private ones.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserJson {
    /// The public fields.
    #[serde(flatten)]
    pub public: UserPublicJson,
    /// The private fields.
    #[serde(flatten)]
    pub private: UserPrivateJson,
}

/// Fields only the user and administrators see.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPrivateJson {
    /// E-mail.
    pub email: String,
    /// Administrator flag.
    pub is_admin: bool,
    /// Always false.
    pub bot: bool,
}

impl UserPublicJson {
    /// Renders the public fields of `user`.
    pub fn new(user: &User, external_url: &str) -> Self {
        Self {
            id: user.id,
            username: user.username.clone(),
            name: user.name.clone(),
            state: user.state.clone(),
            locked: false,
            avatar_url: None,
            web_url: format!("{external_url}/{}", user.username),
            created_at: user.created_at.to_iso8601(),
        }
    }
}

impl UserJson {
    /// Renders every field of `user`.
    pub fn new(user: &User, external_url: &str) -> Self {
        Self {
            public: UserPublicJson::new(user, external_url),
            private: UserPrivateJson {
                email: user.email.clone(),
                is_admin: user.is_admin,
                bot: false,
            },
        }
    }
}

/// `GET /users/:id`: every field for the user themselves and administrators, the public ones
/// for anyone else.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum UserReplyJson {
    /// The user themselves, or an administrator, asked.
    Full(UserJson),
    /// Someone else asked.
    Public(UserPublicJson),
}

// By hand: derived untagged enums become `oneOf`, which a full user fails (it also matches the
// public schema, whose extra keys are allowed). `anyOf` says what is sent.
impl utoipa::PartialSchema for UserReplyJson {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AnyOfBuilder, Ref};
        AnyOfBuilder::new()
            .item(Ref::from_schema_name(UserJson::name()))
            .item(Ref::from_schema_name(UserPublicJson::name()))
            .description(Some(
                "Every field for the user themselves and administrators, the public ones for anyone else.",
            ))
            .into()
    }
}

impl ToSchema for UserReplyJson {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        schemas.push((UserJson::name().into(), UserJson::schema()));
        <UserJson as ToSchema>::schemas(schemas);
        schemas.push((UserPublicJson::name().into(), UserPublicJson::schema()));
        <UserPublicJson as ToSchema>::schemas(schemas);
    }
}

/// A personal access token.
#[derive(Debug, Serialize, ToSchema)]
pub struct PersonalTokenJson {
    /// Token id.
    pub id: Id,
    /// Name.
    pub name: String,
    /// Whether it was revoked.
    pub revoked: bool,
    /// ISO 8601 creation time.
    pub created_at: String,
    /// Always null.
    pub description: Option<String>,
    /// `api`, `read_api`.
    pub scopes: Vec<String>,
    /// Owner.
    pub user_id: Id,
    /// Last use.
    pub last_used_at: Option<String>,
    /// Not revoked and not expired.
    pub active: bool,
    /// `YYYY-MM-DD` or null.
    pub expires_at: Option<String>,
    /// The secret, in the create response only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretField>,
}

impl PersonalTokenJson {
    /// Renders a token as of `now`, with its secret when just created.
    pub fn new(
        token: &PersonalAccessToken,
        now: crate::domain::Timestamp,
        secret: Option<&Secret>,
    ) -> Self {
        Self {
            id: token.id,
            name: token.name.clone(),
            revoked: token.revoked,
            created_at: token.created_at.to_iso8601(),
            description: None,
            scopes: token.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
            user_id: token.user_id,
            last_used_at: token.last_used_at.map(|t| t.to_iso8601()),
            active: token.is_active(now),
            expires_at: token.expires_at.map(format_date),
            token: secret.map(SecretField::from),
        }
    }
}

/// A user namespace.
#[derive(Debug, Serialize, ToSchema)]
pub struct NamespaceJson {
    /// Id.
    pub id: Id,
    /// Name.
    pub name: String,
    /// Path.
    pub path: String,
    /// Always `user`.
    pub kind: String,
    /// Same as `path`.
    pub full_path: String,
    /// Always null.
    pub parent_id: Option<Id>,
    /// Always null.
    pub avatar_url: Option<String>,
    /// URL.
    pub web_url: String,
}

/// A project.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectJson {
    /// The identity fields.
    #[serde(flatten)]
    pub identity: ProjectIdentity,
    /// Always null.
    pub default_branch: Option<String>,
    /// Always empty.
    pub tag_list: Vec<String>,
    /// Always empty.
    pub topics: Vec<String>,
    /// URL.
    pub web_url: String,
    /// Always null.
    pub avatar_url: Option<String>,
    /// Always 0.
    pub forks_count: i64,
    /// Always 0.
    pub star_count: i64,
    /// Creation time.
    pub last_activity_at: String,
    /// The namespace.
    pub namespace: NamespaceJson,
    /// Always `private`.
    pub visibility: String,
}

impl ProjectJson {
    /// Renders a project.
    pub fn new(project: &Project, external_url: &str) -> Self {
        Self {
            identity: project.into(),
            default_branch: None,
            tag_list: Vec::new(),
            topics: Vec::new(),
            web_url: format!("{external_url}/{}", project.path_with_namespace()),
            avatar_url: None,
            forks_count: 0,
            star_count: 0,
            last_activity_at: project.created_at.to_iso8601(),
            namespace: NamespaceJson {
                id: project.namespace.id,
                name: project.namespace.name.clone(),
                path: project.namespace.path.clone(),
                kind: "user".into(),
                full_path: project.namespace.path.clone(),
                parent_id: None,
                avatar_url: None,
                web_url: format!("{external_url}/{}", project.namespace.path),
            },
            visibility: "private".into(),
        }
    }
}

/// A project member.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberJson {
    /// User id.
    pub id: Id,
    /// Username.
    pub username: String,
    /// Name.
    pub name: String,
    /// `active`.
    pub state: String,
    /// Always false.
    pub locked: bool,
    /// Always null.
    pub avatar_url: Option<String>,
    /// Profile URL.
    pub web_url: String,
    /// 10, 15, 20, 30, 40 or 50.
    pub access_level: i64,
    /// ISO 8601 time the membership was created.
    pub created_at: String,
    /// Always null.
    pub expires_at: Option<String>,
    /// Always `active`.
    pub membership_state: String,
}

impl MemberJson {
    /// Renders a member.
    pub fn new(member: &Member, external_url: &str) -> Self {
        Self {
            id: member.user.id,
            username: member.user.username.clone(),
            name: member.user.name.clone(),
            state: member.user.state.clone(),
            locked: false,
            avatar_url: None,
            web_url: format!("{external_url}/{}", member.user.username),
            access_level: member.access_level.value(),
            created_at: member.created_at.to_iso8601(),
            expires_at: None,
            membership_state: "active".into(),
        }
    }
}

/// GitLab's error bodies: `{"message": …}` or `{"error": …}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorJson {
    /// For most errors: `404 Not found`, `400 Bad request - [...]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<serde_json::Value>,
    /// For parameter errors: `name is missing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A receptive agent's URL configuration: all seven keys, null where unset.
#[derive(Debug, Serialize, ToSchema)]
pub struct UrlConfigurationJson {
    /// Id.
    pub id: Id,
    /// The agent.
    pub agent_id: Id,
    /// `grpc://` or `grpcs://` URL.
    pub url: String,
    /// JWT mode: standard base64 of the raw Ed25519 public key (44 characters).
    pub public_key: Option<String>,
    /// mTLS mode: the client certificate, PEM.
    pub client_cert: Option<String>,
    /// CA certificate, PEM.
    pub ca_cert: Option<String>,
    /// TLS server name.
    pub tls_host: Option<String>,
}

impl From<&UrlConfiguration> for UrlConfigurationJson {
    fn from(config: &UrlConfiguration) -> Self {
        Self {
            id: config.id,
            agent_id: config.agent_id,
            url: config.url.clone(),
            public_key: config.public_key.clone(),
            client_cert: config.client_cert.clone(),
            ca_cert: config.ca_cert.clone(),
            tls_host: config.tls_host.clone(),
        }
    }
}

/// What the dialer says about an agent's connection.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionJson {
    /// The agent.
    pub agent_id: Id,
    /// Its URL configuration.
    pub url_configuration_id: Id,
    /// The dialled URL.
    pub url: String,
    /// `connecting`, `connected`, `backing_off` or `failed`.
    pub state: String,
    /// The last error, in plain words.
    pub last_error: Option<String>,
    /// When the last attempt started.
    pub last_attempt_at: Option<String>,
    /// When the current session came up.
    pub connected_since: Option<String>,
    /// When the last error happened.
    pub last_error_at: Option<String>,
    /// What the agent said about itself once connected.
    pub agent: Option<AgentMetadataJson>,
    /// The gateway replica that dials the agent.
    pub replica: Option<String>,
}

/// The agent's own metadata.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentMetadataJson {
    /// Version.
    pub version: String,
    /// Commit.
    pub commit: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Kubernetes version.
    pub kubernetes_version: String,
}

impl ConnectionJson {
    /// Renders a connection; a configuration no replica tracks yet is `connecting`.
    pub fn new(config: &UrlConfiguration, connection: Option<&Connection>) -> Self {
        let time = |t: Option<crate::domain::Timestamp>| t.map(|t| t.to_iso8601());
        match connection {
            None => Self {
                agent_id: config.agent_id,
                url_configuration_id: config.id,
                url: config.url.clone(),
                state: Phase::Connecting.as_str().to_owned(),
                last_error: None,
                last_attempt_at: None,
                connected_since: None,
                last_error_at: None,
                agent: None,
                replica: None,
            },
            Some(c) => Self {
                agent_id: c.agent_id,
                url_configuration_id: c.url_configuration_id,
                url: c.url.clone(),
                state: c.phase.as_str().to_owned(),
                last_error: c.last_error.clone(),
                last_attempt_at: time(c.last_attempt_at),
                connected_since: time(c.connected_since),
                last_error_at: time(c.last_error_at),
                agent: c.metadata.as_ref().map(|m| AgentMetadataJson {
                    version: m.version.clone(),
                    commit: m.commit.clone(),
                    pod_namespace: m.pod_namespace.clone(),
                    pod_name: m.pod_name.clone(),
                    kubernetes_version: m.kubernetes_version.clone(),
                }),
                replica: Some(c.replica.clone()).filter(|r| !r.is_empty()),
            },
        }
    }
}
