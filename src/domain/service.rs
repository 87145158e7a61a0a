//! The operations the transports call: authentication, roles, validation, then the store.

use std::collections::HashMap;
use std::sync::Arc;

use ring::rand::SystemRandom;
use time::Date;

use super::destinations::DeniedNetworks;
use super::error::{Error, Missing, ParamProblem, Result};
use super::model::*;
use super::validate::{self, AgentHost, AgentUrl, UrlProblem};
use tokio::sync::Notify;

use super::last_used::LastUsed;
use super::sessions::{Connection, NoSessions, Sessions};
use super::token_lookups::TokenLookups;
use crate::clock::SharedClock;
use crate::crypto::envelope::Place;
use crate::crypto::keys::Secrets;
use crate::crypto::{self, Secret, TokenDigest, x509};
use crate::store::{
    AgentDeleted, Error as StoreError, MemberRemoved, NewAgentToken, NewPersonalToken, NewProject,
    NewUrlConfiguration, NewUser, Rotation, SharedStore, TokenCreated, TokenFilter, TokenSuccessor,
    UserFilter,
};

/// A rotated token's new expiry when none is asked for: a week, as GitLab.
const ROTATED_TOKEN_DAYS: i64 = 7;

/// At most this many active tokens per agent.
pub const AGENT_TOKEN_LIMIT: i64 = 2;

/// How many configurations' credentials [`Service::dial_credentials_of`] reads in one
/// statement: bounds the statement's parameter and each result set.
pub const DIAL_CREDENTIALS_CHUNK: usize = 1_000;

/// What a request intends to do, which decides the scope it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    /// GET and HEAD: `read_api` suffices.
    Read,
    /// Everything else: needs `api`.
    Write,
    /// The Kubernetes API proxy: needs `k8s_proxy` (`api` alone is not enough, as in GitLab).
    KubernetesProxy,
}

/// A caller of the Kubernetes API proxy, allowed to reach an agent's cluster.
#[derive(Clone, Debug)]
pub struct ProxyAccess {
    /// Who.
    pub caller: Caller,
    /// Whose cluster.
    pub agent: Agent,
    /// Their role on the agent's project (`None` for an administrator who is not a member).
    pub access_level: Option<AccessLevel>,
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Who is calling (under sudo: the user acted as).
    pub user: User,
    operator: bool,
    /// The personal access token the request came with.
    token_id: Option<Id>,
    /// Under sudo: the administrator acting as `user`.
    sudo_by: Option<Id>,
}

impl Caller {
    /// The operator at the command line: an administrator without an account.
    pub fn operator() -> Self {
        Self {
            user: User {
                id: 0,
                username: "operator".into(),
                name: "Operator".into(),
                email: String::new(),
                is_admin: true,
                state: "active".into(),
                created_at: Timestamp::from_millis(0),
            },
            operator: true,
            token_id: None,
            sudo_by: None,
        }
    }

    /// A GitLab instance calling the gRPC API with its shared secret: an administrator.
    pub fn gitlab() -> Self {
        let mut caller = Self::operator();
        caller.user.username = "gitlab".into();
        caller.user.name = "GitLab".into();
        caller
    }

    /// Whether the caller passes every role check.
    pub fn is_admin(&self) -> bool {
        self.operator || self.user.is_admin
    }

    /// The personal access token the request came with (none for the operator and GitLab).
    pub fn token_id(&self) -> Option<Id> {
        self.token_id
    }

    /// Under sudo, the id of the administrator acting as [`Caller::user`].
    pub fn sudo_by(&self) -> Option<Id> {
        self.sudo_by
    }
}

/// A user to create (`POST /users`).
#[derive(Clone, Debug)]
pub struct NewUserInput {
    /// Login name.
    pub username: String,
    /// Display name.
    pub name: String,
    /// E-mail.
    pub email: String,
    /// Administrator flag.
    pub admin: bool,
}

/// A project to create (`POST /projects`).
#[derive(Clone, Debug, Default)]
pub struct NewProjectInput {
    /// Display name; derived from the path when absent.
    pub name: Option<String>,
    /// Path; derived from the name when absent.
    pub path: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// The user namespace to create it in (administrators only; default: the caller's).
    pub namespace_id: Option<Id>,
}

/// A personal access token to create.
#[derive(Clone, Debug)]
pub struct NewTokenInput {
    /// Name.
    pub name: String,
    /// Scopes (at least one).
    pub scopes: Vec<Scope>,
    /// Expiry date.
    pub expires_at: Option<Date>,
}

/// Switches that change what the service offers.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Receptive agents (URL configurations); when off, their endpoints answer 404.
    pub receptive_agents: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            receptive_agents: true,
        }
    }
}

/// A URL configuration to create, as given by a client.
#[derive(Clone, Debug, Default)]
pub struct UrlConfigurationInput {
    /// `grpc://` or `grpcs://` URL.
    pub url: String,
    /// Client certificate (PEM or base64 of PEM), for mTLS.
    pub client_cert: Option<String>,
    /// Client key (PEM or base64 of PEM), for mTLS.
    pub client_key: Option<String>,
    /// CA certificate (PEM or base64 of PEM).
    pub ca_cert: Option<String>,
    /// TLS server name.
    pub tls_host: Option<String>,
}

/// The secret a dialer authenticates with, decrypted in memory only.
pub enum DialCredentials {
    /// JWT mode: the Ed25519 private key (PKCS#8).
    Jwt {
        /// PKCS#8 document.
        pkcs8: zeroize::Zeroizing<Vec<u8>>,
    },
    /// mTLS mode: the client certificate's private key (PEM).
    Mtls {
        /// PEM text.
        client_key: zeroize::Zeroizing<Vec<u8>>,
    },
}

impl std::fmt::Debug for DialCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Jwt { .. } => f.write_str("DialCredentials::Jwt([REDACTED])"),
            Self::Mtls { .. } => f.write_str("DialCredentials::Mtls([REDACTED])"),
        }
    }
}

/// Largest accepted PEM field (certificates, keys), in characters.
pub const MAX_PEM_LEN: usize = 64 * 1024;
/// Largest accepted URL, in characters.
pub const MAX_URL_LEN: usize = 2048;

/// Why the gateway refuses an agent's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentRefusal {
    /// Unknown or revoked.
    InvalidToken,
    /// The token belongs to another agent.
    WrongAgent,
}

impl AgentRefusal {
    /// The message the agent and the operator see.
    pub const fn message(&self) -> &'static str {
        match self {
            Self::InvalidToken => "the agent token is unknown or revoked",
            Self::WrongAgent => "provided agent token belongs to a different agent id",
        }
    }
}

/// The domain service every transport calls.
#[derive(Clone)]
pub struct Service {
    store: SharedStore,
    clock: SharedClock,
    rng: Arc<SystemRandom>,
    secrets: Arc<Secrets>,
    settings: Settings,
    denied_networks: Arc<DeniedNetworks>,
    sessions: Arc<dyn Sessions>,
    changed: Arc<Notify>,
    rebalance: Arc<Notify>,
    last_used: LastUsed,
    token_lookups: TokenLookups,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service over `store`, reading time from `clock`, sealing secrets with `secrets`.
    pub fn new(
        store: SharedStore,
        clock: SharedClock,
        secrets: Arc<Secrets>,
        settings: Settings,
    ) -> Self {
        Self {
            last_used: LastUsed::new(Arc::clone(&store)),
            token_lookups: TokenLookups::new(Arc::clone(&store)),
            store,
            clock,
            rng: Arc::new(crypto::system_random()),
            secrets,
            settings,
            denied_networks: Arc::new(DeniedNetworks::default()),
            sessions: Arc::new(NoSessions::default()),
            changed: Arc::new(Notify::new()),
            rebalance: Arc::new(Notify::new()),
        }
    }

    /// The same service, refusing URL configurations whose address is in `networks` (the
    /// dialer's list; the default list until this is called).
    #[must_use]
    pub fn with_denied_networks(mut self, networks: DeniedNetworks) -> Self {
        self.denied_networks = Arc::new(networks);
        self
    }

    /// The same service, reading agents' sessions from `sessions` (none until this is called).
    #[must_use]
    pub fn with_sessions(mut self, sessions: Arc<dyn Sessions>) -> Self {
        self.sessions = sessions;
        self
    }

    /// The agents' sessions.
    pub fn sessions(&self) -> &Arc<dyn Sessions> {
        &self.sessions
    }

    /// Woken whenever something the dialer depends on changed (configurations, agents,
    /// tokens).
    pub fn changes(&self) -> &Arc<Notify> {
        &self.changed
    }

    /// Woken whenever the set of configurations changed, for a balancing round of the
    /// replicas' leases.
    pub fn rebalance(&self) -> &Arc<Notify> {
        &self.rebalance
    }

    fn changed(&self) {
        self.changed.notify_one();
        self.rebalance.notify_one();
        // The other replicas look now too, rather than at their next round.
        if let Some(leases) = self.store.leases() {
            tokio::spawn(async move {
                if let Err(error) = leases.announce().await {
                    tracing::debug!(%error, "could not announce a change to the other replicas");
                }
            });
        }
    }

    /// Every URL configuration: what the dialer should keep connected.
    pub async fn desired_sessions(&self) -> Result<Vec<UrlConfiguration>> {
        Ok(self.store.all_url_configurations().await?)
    }

    /// Every agent with a URL configuration, named, for the operators' status page (served
    /// on the observability listener only, which reads no token).
    pub async fn receptive_agents(&self) -> Result<Vec<super::ReceptiveAgent>> {
        Ok(self.store.receptive_agents().await?)
    }

    /// Checks the token an agent presents after the gateway dialled `agent_id`; success
    /// records its use (at most once a minute per token), written in the background within
    /// about a second together with other agents' (see [`super::last_used`]). Checks that
    /// arrive together are read together (see [`super::token_lookups`]).
    pub async fn authenticate_agent(
        &self,
        agent_id: Id,
        token: &str,
    ) -> Result<std::result::Result<AgentToken, AgentRefusal>> {
        let found = self.token_lookups.by_digest(TokenDigest::of(token)).await?;
        let token = match found {
            Some(token) if token.status == TokenStatus::Active => token,
            _ => return Ok(Err(AgentRefusal::InvalidToken)),
        };
        if token.agent_id != agent_id {
            return Ok(Err(AgentRefusal::WrongAgent));
        }
        let now = self.now();
        if token
            .last_used_at
            .is_none_or(|last| now.as_millis() - last.as_millis() >= 60_000)
        {
            self.last_used.record(token.id, now);
        }
        Ok(Ok(token))
    }

    /// Writes the agent token uses not yet written (at shutdown, before the store closes).
    pub async fn flush_token_uses(&self) {
        self.last_used.flush().await;
    }

    /// Which of `token_ids` can still authenticate their agents.
    pub async fn active_agent_tokens(
        &self,
        token_ids: &[Id],
    ) -> Result<std::collections::HashSet<Id>> {
        Ok(self
            .store
            .active_agent_tokens(token_ids)
            .await?
            .into_iter()
            .collect())
    }

    /// An agent's connection state (Developer); 404 when it has no URL configuration.
    pub async fn connection(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
    ) -> Result<(UrlConfiguration, Option<Connection>)> {
        let agent = self
            .agent_for_url_configurations(caller, project, agent_id, AccessLevel::Developer)
            .await?;
        let config = self
            .store
            .url_configurations(agent.id)
            .await?
            .into_iter()
            .next()
            .ok_or(Error::NotFound(Missing::Resource))?;
        // Only the configuration's own state: an older one may linger while a new
        // configuration is being dialled for the first time.
        let connection = self
            .sessions
            .get(agent.id)
            .await?
            .filter(|c| c.url_configuration_id == config.id);
        Ok((config, connection))
    }

    /// The store underneath (for health checks and shutdown).
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    // ---- authentication -------------------------------------------------------------

    /// Authenticates a personal access token for a request with `intent`; with `sudo` (a
    /// user id or username), as GitLab does: only administrators' tokens with the `sudo`
    /// scope may act as another user, and the request then runs as that user.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        intent: Intent,
        sudo: Option<&str>,
    ) -> Result<Caller> {
        let token = token.filter(|t| !t.is_empty()).ok_or(Error::Unauthorized)?;
        let digest = TokenDigest::of(token);
        let (pat, user) = self
            .store
            .personal_token(&digest)
            .await?
            .ok_or(Error::Unauthorized)?;
        if !pat.is_active(self.now()) || user.state != "active" {
            return Err(Error::Unauthorized);
        }
        if let Some(who) = sudo {
            if !user.is_admin {
                return Err(Error::ForbiddenBecause("Must be admin to use sudo"));
            }
            if !pat.scopes.contains(&Scope::Sudo) {
                return Err(Error::InsufficientScope { scope: "sudo" });
            }
            let target = if !who.is_empty() && who.bytes().all(|b| b.is_ascii_digit()) {
                match who.parse::<Id>() {
                    Ok(id) => self.store.user(id).await?,
                    Err(_) => None,
                }
            } else {
                self.store.user_by_username(who).await?
            };
            let target = target.ok_or_else(|| Error::SudoUserNotFound(who.to_owned()))?;
            if target.id != user.id {
                // As GitLab: acting as another user, the endpoint's scope is not asked for.
                self.touch_personal_token(&pat).await?;
                tracing::info!(
                    administrator = %user.username,
                    acting_as = %target.username,
                    "sudo"
                );
                return Ok(Caller {
                    sudo_by: Some(user.id),
                    user: target,
                    operator: false,
                    token_id: Some(pat.id),
                });
            }
        }
        let allowed = match intent {
            Intent::Read => pat
                .scopes
                .iter()
                .any(|s| matches!(s, Scope::Api | Scope::ReadApi)),
            Intent::Write => pat.scopes.contains(&Scope::Api),
            Intent::KubernetesProxy => pat.scopes.contains(&Scope::K8sProxy),
        };
        if !allowed {
            let scope = match intent {
                Intent::KubernetesProxy => "k8s_proxy",
                Intent::Read | Intent::Write => "api",
            };
            return Err(Error::InsufficientScope { scope });
        }
        self.touch_personal_token(&pat).await?;
        Ok(Caller {
            user,
            operator: false,
            token_id: Some(pat.id),
            sudo_by: None,
        })
    }

    /// Records the use of a token at most once a minute, so that reads stay reads.
    async fn touch_personal_token(&self, pat: &PersonalAccessToken) -> Result<()> {
        let now = self.now();
        if pat
            .last_used_at
            .is_none_or(|last| now.as_millis() - last.as_millis() >= 60_000)
        {
            self.store.touch_personal_token(pat.id, now).await?;
        }
        Ok(())
    }

    /// On an empty database, creates the administrator `root` with an `api` token: `token`
    /// when given, else a new random one. Returns the token when it was created here.
    pub async fn bootstrap(&self, token: Option<Secret>) -> Result<Option<Secret>> {
        let token = match token {
            Some(token) => token,
            None => crypto::new_personal_token(self.rng.as_ref())?,
        };
        let now = self.now();
        let created = self
            .store
            .bootstrap_admin(
                NewUser {
                    username: "root".into(),
                    name: "Administrator".into(),
                    email: "admin@example.com".into(),
                    is_admin: true,
                    created_at: now,
                },
                NewPersonalToken {
                    name: "bootstrap".into(),
                    digest: token.digest(),
                    scopes: vec![Scope::Api],
                    expires_at: None,
                    created_at: now,
                },
            )
            .await?;
        Ok(created.then_some(token))
    }

    // ---- users ----------------------------------------------------------------------

    /// Creates a user (administrators only).
    pub async fn create_user(&self, caller: &Caller, input: NewUserInput) -> Result<User> {
        require_admin(caller)?;
        let mut fields = Vec::new();
        for (field, errors) in [
            ("email", validate::email(&input.email)),
            ("name", validate::display_name(&input.name)),
            ("username", validate::username(&input.username)),
        ] {
            if !errors.is_empty() {
                fields.push((field.to_owned(), errors));
            }
        }
        if !fields.is_empty() {
            return Err(Error::AttributeValidation(fields));
        }
        let conflict = |(username, email): (bool, bool)| {
            if username {
                Error::AlreadyExists("Username has already been taken".into())
            } else if email {
                Error::AlreadyExists("Email has already been taken".into())
            } else {
                Error::AlreadyExists("User already exists".into())
            }
        };
        let taken = self.store.user_taken(&input.username, &input.email).await?;
        if taken.0 || taken.1 {
            return Err(conflict(taken));
        }
        let created = self
            .store
            .create_user(NewUser {
                username: input.username.clone(),
                name: input.name,
                email: input.email.clone(),
                is_admin: input.admin,
                created_at: self.now(),
            })
            .await;
        match created {
            Err(StoreError::Conflict(_)) => Err(conflict(
                self.store.user_taken(&input.username, &input.email).await?,
            )),
            other => Ok(other?),
        }
    }

    /// A user by id; any authenticated caller may look.
    pub async fn user(&self, _caller: &Caller, id: Id) -> Result<User> {
        self.store
            .user(id)
            .await?
            .ok_or(Error::NotFound(Missing::User))
    }

    /// A user by username.
    pub async fn user_by_username(&self, username: &str) -> Result<User> {
        self.store
            .user_by_username(username)
            .await?
            .ok_or(Error::NotFound(Missing::User))
    }

    /// Creates a personal access token for a user (administrators only).
    pub async fn create_personal_token(
        &self,
        caller: &Caller,
        user_id: Id,
        input: NewTokenInput,
    ) -> Result<(PersonalAccessToken, Secret)> {
        require_admin(caller)?;
        if input.name.trim().is_empty() {
            return Err(Error::AttributeValidation(vec![(
                "name".into(),
                vec!["can't be blank".into()],
            )]));
        }
        if input.scopes.is_empty() {
            return Err(Error::param(ParamProblem::NotAllowed("scopes".into())));
        }
        let user = self.user(caller, user_id).await?;
        let secret = crypto::new_personal_token(self.rng.as_ref())?;
        let token = self
            .store
            .create_personal_token(
                user.id,
                NewPersonalToken {
                    name: input.name,
                    digest: secret.digest(),
                    scopes: input.scopes,
                    expires_at: input.expires_at,
                    created_at: self.now(),
                },
            )
            .await?;
        Ok((token, secret))
    }

    /// Personal access tokens: every user's for administrators, else the caller's own (a
    /// `user_id` of someone else is 401, as GitLab answers).
    pub async fn list_personal_tokens(
        &self,
        caller: &Caller,
        mut filter: TokenFilter,
        page: PageRequest,
    ) -> Result<Paged<PersonalAccessToken>> {
        filter.user_id = if caller.is_admin() {
            if let Some(id) = filter.user_id {
                self.store
                    .user(id)
                    .await?
                    .ok_or(Error::NotFound(Missing::Resource))?;
            }
            filter.user_id
        } else {
            match filter.user_id {
                // GitLab answers 401, not 403, for someone else's tokens.
                Some(id) if id != caller.user.id => return Err(Error::Unauthorized),
                _ => Some(caller.user.id),
            }
        };
        let today = format_date(self.now().date());
        Ok(self
            .store
            .list_personal_tokens(&filter, &today, page)
            .await?)
    }

    /// A personal access token the caller may see: its own, or any for administrators
    /// (someone else's or a missing one: 401 for users, 404 for administrators).
    pub async fn personal_token(&self, caller: &Caller, id: Id) -> Result<PersonalAccessToken> {
        match self.store.personal_token_by_id(id).await? {
            Some(token) if token.user_id == caller.user.id || caller.is_admin() => Ok(token),
            _ if caller.is_admin() => Err(Error::NotFound(Missing::Resource)),
            _ => Err(Error::Unauthorized),
        }
    }

    /// The token the request came with (also under sudo: the administrator's).
    pub async fn own_personal_token(&self, caller: &Caller) -> Result<PersonalAccessToken> {
        let id = caller_token(caller)?;
        self.store
            .personal_token_by_id(id)
            .await?
            .ok_or(Error::Unauthorized)
    }

    /// Revokes a token: the caller's own, or any for administrators. Revoking a revoked
    /// token succeeds again, as in GitLab.
    pub async fn revoke_personal_token(&self, caller: &Caller, id: Id) -> Result<()> {
        let token = self
            .store
            .personal_token_by_id(id)
            .await?
            .ok_or(Error::NotFound(Missing::Record))?;
        if token.user_id != caller.user.id && !caller.is_admin() {
            return Err(Error::BadRequest("Not permitted to revoke".into()));
        }
        self.revoke(&token).await
    }

    /// Revokes the token the request came with.
    pub async fn revoke_own_personal_token(&self, caller: &Caller) -> Result<()> {
        let token = self.own_personal_token(caller).await?;
        self.revoke(&token).await
    }

    async fn revoke(&self, token: &PersonalAccessToken) -> Result<()> {
        if !self.store.revoke_personal_token(token.id).await? {
            return Err(Error::NotFound(Missing::Record));
        }
        tracing::info!(
            token_id = token.id,
            user_id = token.user_id,
            "personal access token revoked"
        );
        Ok(())
    }

    /// Revokes a token and gives its owner a new one with the same name and scopes, expiring
    /// on `expires_at` (default: in a week); the caller's own, or any for administrators.
    pub async fn rotate_personal_token(
        &self,
        caller: &Caller,
        id: Id,
        expires_at: Option<Date>,
    ) -> Result<(PersonalAccessToken, Secret)> {
        let token = self.personal_token(caller, id).await?;
        self.rotate(token.id, expires_at).await
    }

    /// Rotates the token the request came with.
    pub async fn rotate_own_personal_token(
        &self,
        caller: &Caller,
        expires_at: Option<Date>,
    ) -> Result<(PersonalAccessToken, Secret)> {
        let id = caller_token(caller)?;
        self.rotate(id, expires_at).await
    }

    async fn rotate(
        &self,
        id: Id,
        expires_at: Option<Date>,
    ) -> Result<(PersonalAccessToken, Secret)> {
        let today = self.now().date();
        let expires_at = match expires_at {
            Some(date) if date <= today => {
                return Err(Error::BadRequest("Expires at cannot be in the past".into()));
            }
            Some(date) => date,
            None => today
                .checked_add(time::Duration::days(ROTATED_TOKEN_DAYS))
                .unwrap_or(today),
        };
        let secret = crypto::new_personal_token(self.rng.as_ref())?;
        let successor = TokenSuccessor {
            digest: secret.digest(),
            expires_at: Some(expires_at),
            created_at: self.now(),
        };
        match self.store.rotate_personal_token(id, successor).await? {
            Rotation::Rotated(token) => {
                tracing::info!(
                    revoked_token_id = id,
                    token_id = token.id,
                    user_id = token.user_id,
                    "personal access token rotated"
                );
                Ok((token, secret))
            }
            Rotation::AlreadyRevoked => Err(Error::BadRequest("Token already revoked".into())),
            Rotation::Missing => Err(Error::NotFound(Missing::Resource)),
        }
    }

    /// Users (any authenticated caller; what each sees is the transport's to decide).
    /// Only administrators may filter on administrators.
    pub async fn list_users(
        &self,
        caller: &Caller,
        mut filter: UserFilter,
        page: PageRequest,
    ) -> Result<Paged<User>> {
        if !caller.is_admin() {
            filter.admins = false;
        }
        Ok(self.store.list_users(&filter, page).await?)
    }

    // ---- projects and members -------------------------------------------------------

    async fn find_project(&self, project: &ProjectRef) -> Result<Project> {
        let found = match project {
            ProjectRef::Id(id) => self.store.project(*id).await?,
            ProjectRef::Path { namespace, project } => {
                self.store.project_by_path(namespace, project).await?
            }
            ProjectRef::Invalid => None,
        };
        found.ok_or(Error::NotFound(Missing::Project))
    }

    /// The project, if the caller is a member with at least `need`; `below` otherwise.
    /// Non-members get `404 Project Not Found`, as projects are private.
    async fn project_with_role(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        need: AccessLevel,
        below: Error,
    ) -> Result<(Project, Option<AccessLevel>)> {
        let project = self.find_project(project).await?;
        let level = self.store.access_level(project.id, caller.user.id).await?;
        if caller.is_admin() {
            return Ok((project, level));
        }
        match level {
            None => Err(Error::NotFound(Missing::Project)),
            Some(level) if level >= need => Ok((project, Some(level))),
            Some(_) => Err(below),
        }
    }

    /// Creates a project in the caller's namespace (or, for administrators, `namespace_id`'s).
    pub async fn create_project(&self, caller: &Caller, input: NewProjectInput) -> Result<Project> {
        let owner = match input.namespace_id {
            Some(id) if id == caller.user.id => caller.user.clone(),
            Some(id) if caller.is_admin() => self
                .store
                .user(id)
                .await?
                .ok_or(Error::NotFound(Missing::Resource))?,
            Some(_) => return Err(Error::NotFound(Missing::Resource)),
            None if caller.operator => {
                return Err(Error::param(ParamProblem::Missing("namespace_id".into())));
            }
            None => caller.user.clone(),
        };
        let (name, path) = match (input.name, input.path) {
            (Some(name), Some(path)) => (name, path),
            (Some(name), None) => {
                let path = validate::path_from_name(&name);
                (name, path)
            }
            (None, Some(path)) => (path.clone(), path),
            (None, None) => {
                return Err(Error::param(ParamProblem::Rule(
                    "name, path are missing, at least one parameter must be provided".into(),
                )));
            }
        };
        let mut fields = Vec::new();
        for (field, errors) in [
            ("name", validate::project_name(&name)),
            ("path", validate::project_path(&path)),
        ] {
            if !errors.is_empty() {
                fields.push((field.to_owned(), errors));
            }
        }
        if !fields.is_empty() {
            return Err(Error::AttributeValidation(fields));
        }
        let created = self
            .store
            .create_project(NewProject {
                creator_id: owner.id,
                name,
                path,
                description: input.description.unwrap_or_default(),
                created_at: self.now(),
            })
            .await?;
        created.map_err(|taken| {
            let mut fields = Vec::new();
            if taken.name {
                fields.push(("name".to_owned(), vec!["has already been taken".to_owned()]));
            }
            if taken.path {
                fields.push(("path".to_owned(), vec!["has already been taken".to_owned()]));
            }
            Error::AttributeValidation(fields)
        })
    }

    /// A project any member (or an administrator) can see.
    pub async fn project(&self, caller: &Caller, project: &ProjectRef) -> Result<Project> {
        let (project, _) = self
            .project_with_role(
                caller,
                project,
                AccessLevel::Guest,
                Error::NotFound(Missing::Project),
            )
            .await?;
        Ok(project)
    }

    /// The projects the caller is a member of (all of them for administrators).
    pub async fn list_projects(
        &self,
        caller: &Caller,
        page: PageRequest,
    ) -> Result<Paged<Project>> {
        let member = (!caller.is_admin()).then_some(caller.user.id);
        Ok(self.store.list_projects(member, page).await?)
    }

    /// Adds a member (Maintainer; Owner to add an Owner).
    pub async fn add_member(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        user_id: Id,
        level: AccessLevel,
    ) -> Result<Member> {
        let (project, caller_level) = self
            .project_with_role(caller, project, AccessLevel::Maintainer, Error::Forbidden)
            .await?;
        if level == AccessLevel::Owner
            && !caller.is_admin()
            && caller_level != Some(AccessLevel::Owner)
        {
            return Err(Error::Forbidden);
        }
        let user = self
            .store
            .user(user_id)
            .await?
            .ok_or(Error::NotFound(Missing::User))?;
        match self
            .store
            .add_member(project.id, user.id, level, self.now())
            .await
        {
            Err(StoreError::Conflict(_)) => {
                Err(Error::AlreadyExists("Member already exists".into()))
            }
            other => other?.ok_or(Error::NotFound(Missing::Member)),
        }
    }

    /// The members of a project (any member may list them).
    pub async fn list_members(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        page: PageRequest,
    ) -> Result<Paged<Member>> {
        let project = self.project(caller, project).await?;
        Ok(self.store.list_members(project.id, page).await?)
    }

    /// One member of a project.
    pub async fn member(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        user_id: Id,
    ) -> Result<Member> {
        let project = self.project(caller, project).await?;
        self.store
            .member(project.id, user_id)
            .await?
            .ok_or(Error::NotFound(Missing::Member))
    }

    /// Removes a member (Maintainer, Owner to remove an Owner; anyone may leave).
    /// The last Owner stays.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        user_id: Id,
    ) -> Result<()> {
        let leaving = user_id == caller.user.id;
        let need = if leaving {
            AccessLevel::Guest
        } else {
            AccessLevel::Maintainer
        };
        let (project, caller_level) = self
            .project_with_role(caller, project, need, Error::Forbidden)
            .await?;
        let member = self
            .store
            .member(project.id, user_id)
            .await?
            .ok_or(Error::NotFound(Missing::Member))?;
        if member.access_level == AccessLevel::Owner
            && !leaving
            && !caller.is_admin()
            && caller_level != Some(AccessLevel::Owner)
        {
            return Err(Error::Forbidden);
        }
        match self.store.remove_member(project.id, user_id).await? {
            MemberRemoved::Removed => Ok(()),
            MemberRemoved::NotMember => Err(Error::NotFound(Missing::Member)),
            MemberRemoved::LastOwner => Err(Error::Forbidden),
        }
    }

    // ---- agents ---------------------------------------------------------------------

    /// The project's agents (Developer).
    pub async fn list_agents(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        page: PageRequest,
    ) -> Result<Paged<Agent>> {
        let (project, _) = self
            .project_with_role(
                caller,
                project,
                AccessLevel::Developer,
                Error::NotFound(Missing::ClusterAgents),
            )
            .await?;
        Ok(self.store.list_agents(project.id, page).await?)
    }

    async fn agent_of(&self, project: &Project, agent_id: Id) -> Result<Agent> {
        self.store
            .agent(project.id, agent_id)
            .await?
            .ok_or(Error::NotFound(Missing::Record))
    }

    /// One agent (Developer).
    pub async fn agent(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
    ) -> Result<Agent> {
        let (project, _) = self
            .project_with_role(
                caller,
                project,
                AccessLevel::Developer,
                Error::NotFound(Missing::Record),
            )
            .await?;
        self.agent_of(&project, agent_id).await
    }

    /// Registers an agent (Maintainer).
    pub async fn register_agent(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        name: &str,
    ) -> Result<Agent> {
        let (project, _) = self
            .project_with_role(caller, project, AccessLevel::Maintainer, Error::Forbidden)
            .await?;
        let errors = validate::agent_name(name);
        if !errors.is_empty() {
            return Err(Error::Validation(errors));
        }
        match self
            .store
            .register_agent(project.id, name, caller.user.id, self.now())
            .await
        {
            Err(StoreError::Conflict(_)) => Err(Error::invalid("Name has already been taken")),
            other => Ok(other?),
        }
    }

    /// Deletes an agent with its tokens (Maintainer, checked before the agent is looked up).
    pub async fn delete_agent(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        unmodified_since: Option<Timestamp>,
    ) -> Result<()> {
        let (project, _) = self
            .project_with_role(caller, project, AccessLevel::Maintainer, Error::Forbidden)
            .await?;
        match self
            .store
            .delete_agent(project.id, agent_id, unmodified_since)
            .await?
        {
            AgentDeleted::Deleted => {
                self.changed();
                Ok(())
            }
            AgentDeleted::Modified => Err(Error::PreconditionFailed),
        }
    }

    // ---- agent tokens ---------------------------------------------------------------

    async fn agent_with_role(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        need: AccessLevel,
    ) -> Result<Agent> {
        let below = if need >= AccessLevel::Maintainer {
            Error::Forbidden
        } else {
            Error::NotFound(Missing::Record)
        };
        let (project, _) = self.project_with_role(caller, project, need, below).await?;
        self.agent_of(&project, agent_id).await
    }

    /// An agent's active tokens (Developer).
    pub async fn list_agent_tokens(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        page: PageRequest,
    ) -> Result<Paged<AgentToken>> {
        let agent = self
            .agent_with_role(caller, project, agent_id, AccessLevel::Developer)
            .await?;
        Ok(self.store.list_agent_tokens(agent.id, page).await?)
    }

    /// One active token (Developer).
    pub async fn agent_token(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        token_id: Id,
    ) -> Result<AgentToken> {
        let agent = self
            .agent_with_role(caller, project, agent_id, AccessLevel::Developer)
            .await?;
        self.store
            .agent_token(agent.id, token_id)
            .await?
            .ok_or(Error::NotFound(Missing::Record))
    }

    /// Creates a token (Maintainer); at most [`AGENT_TOKEN_LIMIT`] active per agent.
    pub async fn create_agent_token(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        name: &str,
        description: Option<&str>,
    ) -> Result<(AgentToken, Secret)> {
        let agent = self
            .agent_with_role(caller, project, agent_id, AccessLevel::Maintainer)
            .await?;
        let errors = validate::agent_token(name, description);
        if !errors.is_empty() {
            return Err(Error::Validation(errors));
        }
        let secret = crypto::new_agent_token(self.rng.as_ref())?;
        let created = self
            .store
            .create_agent_token(
                agent.id,
                NewAgentToken {
                    name: name.to_owned(),
                    description: description.map(str::to_owned),
                    digest: secret.digest(),
                    created_by_user_id: caller.user.id,
                    created_at: self.now(),
                },
                AGENT_TOKEN_LIMIT,
            )
            .await?;
        match created {
            TokenCreated::Created(token) => Ok((token, secret)),
            TokenCreated::LimitReached => Err(Error::LimitReached(
                "An agent can have only two active tokens at a time".into(),
            )),
        }
    }

    /// Revokes a token (Maintainer); revoking a revoked token succeeds.
    pub async fn revoke_agent_token(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        token_id: Id,
    ) -> Result<()> {
        let agent = self
            .agent_with_role(caller, project, agent_id, AccessLevel::Maintainer)
            .await?;
        if self.store.revoke_agent_token(agent.id, token_id).await? {
            self.changed();
            Ok(())
        } else {
            Err(Error::NotFound(Missing::Record))
        }
    }
}

impl Service {
    // ---- URL configurations (receptive agents) ------------------------------------

    fn require_receptive(&self) -> Result<()> {
        if self.settings.receptive_agents {
            Ok(())
        } else {
            Err(Error::NotFound(Missing::Resource))
        }
    }

    async fn agent_for_url_configurations(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        need: AccessLevel,
    ) -> Result<Agent> {
        self.require_receptive()?;
        let (project, _) = self
            .project_with_role(caller, project, need, Error::Forbidden)
            .await?;
        self.agent_of(&project, agent_id).await
    }

    /// An agent's URL configurations (Developer).
    pub async fn list_url_configurations(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
    ) -> Result<Vec<UrlConfiguration>> {
        let agent = self
            .agent_for_url_configurations(caller, project, agent_id, AccessLevel::Developer)
            .await?;
        Ok(self.store.url_configurations(agent.id).await?)
    }

    /// One URL configuration (Developer).
    pub async fn url_configuration(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        id: Id,
    ) -> Result<UrlConfiguration> {
        let agent = self
            .agent_for_url_configurations(caller, project, agent_id, AccessLevel::Developer)
            .await?;
        self.store
            .url_configuration(agent.id, id)
            .await?
            .ok_or(Error::NotFound(Missing::Resource))
    }

    /// Creates an agent's URL configuration (Maintainer): mTLS when a client certificate
    /// is given, else JWT with a new Ed25519 key pair. At most one per agent.
    pub async fn create_url_configuration(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        input: UrlConfigurationInput,
    ) -> Result<UrlConfiguration> {
        let agent = self
            .agent_for_url_configurations(caller, project, agent_id, AccessLevel::Maintainer)
            .await?;
        let checked = check_url_configuration(input, self.now(), &self.denied_networks)?;
        let (secret_column, public_key, secret) = match checked.client_key {
            Some(client_key) => (SecretColumn::ClientKey, None, client_key),
            None => {
                let (pkcs8, public) = x509::generate_ed25519(self.rng.as_ref())
                    .ok_or_else(|| Error::Internal("Ed25519 key generation failed".into()))?;
                (SecretColumn::PrivateKey, Some(x509::base64(&public)), pkcs8)
            }
        };
        let secrets = Arc::clone(&self.secrets);
        let seal = move |row: Id| {
            secrets.seal(
                &secret,
                Place {
                    table: SecretColumn::TABLE,
                    column: secret_column.column(),
                    row,
                },
            )
        };
        let created = self
            .store
            .create_url_configuration(
                NewUrlConfiguration {
                    agent_id: agent.id,
                    project_id: agent.project.id,
                    url: checked.url,
                    public_key,
                    client_cert: checked.client_cert,
                    ca_cert: checked.ca_cert,
                    tls_host: checked.tls_host,
                    secret_column,
                    created_by_user_id: caller.user.id,
                    created_at: self.now(),
                },
                &seal,
            )
            .await;
        let created = match created {
            Err(StoreError::Conflict(_)) => Err(Error::LimitReached(
                "URL configuration already exists for this agent".into(),
            )),
            other => Ok(other?),
        };
        if created.is_ok() {
            self.changed();
        }
        created
    }

    /// Deletes a URL configuration (Maintainer).
    pub async fn delete_url_configuration(
        &self,
        caller: &Caller,
        project: &ProjectRef,
        agent_id: Id,
        id: Id,
    ) -> Result<()> {
        let agent = self
            .agent_for_url_configurations(caller, project, agent_id, AccessLevel::Maintainer)
            .await?;
        if self.store.delete_url_configuration(agent.id, id).await? {
            self.changed();
            Ok(())
        } else {
            Err(Error::NotFound(Missing::Resource))
        }
    }

    /// Who may reach agent `agent_id`'s cluster through the Kubernetes API proxy: a token
    /// with the `k8s_proxy` scope whose user is at least a Developer of the agent's project
    /// (administrators too), with their role there.
    pub async fn kubernetes_proxy_access(
        &self,
        token: Option<&str>,
        agent_id: Id,
    ) -> Result<ProxyAccess> {
        let caller = self
            .authenticate(token, Intent::KubernetesProxy, None)
            .await?;
        let agent = self
            .store
            .agent_by_id(agent_id)
            .await?
            .ok_or(Error::NotFound(Missing::Record))?;
        let (_, level) = self
            .project_with_role(
                &caller,
                &ProjectRef::Id(agent.project.id),
                AccessLevel::Developer,
                Error::Forbidden,
            )
            .await
            // Whether the project exists is not for a non-member to learn here either.
            .map_err(|e| match e {
                Error::NotFound(Missing::Project) => Error::Forbidden,
                e => e,
            })?;
        Ok(ProxyAccess {
            caller,
            agent,
            access_level: level,
        })
    }

    /// An agent by id alone (for callers that address agents globally, such as the gRPC
    /// API); the caller's role in its project is checked as for `agent`.
    pub async fn agent_by_id(&self, caller: &Caller, agent_id: Id) -> Result<Agent> {
        let agent = self
            .store
            .agent_by_id(agent_id)
            .await?
            .ok_or(Error::NotFound(Missing::Record))?;
        self.agent(caller, &ProjectRef::Id(agent.project.id), agent_id)
            .await
    }

    /// A URL configuration by id alone (Developer of its project).
    pub async fn url_configuration_by_id(
        &self,
        caller: &Caller,
        id: Id,
    ) -> Result<UrlConfiguration> {
        self.require_receptive()?;
        let config = self
            .store
            .url_configuration_by_id(id)
            .await?
            .ok_or(Error::NotFound(Missing::Resource))?;
        self.url_configuration(
            caller,
            &ProjectRef::Id(config.project_id),
            config.agent_id,
            id,
        )
        .await
    }

    /// URL configurations across projects (administrators), optionally of one project or
    /// one agent.
    pub async fn list_all_url_configurations(
        &self,
        caller: &Caller,
        project_id: Option<Id>,
        agent_id: Option<Id>,
        page: PageRequest,
    ) -> Result<Paged<UrlConfiguration>> {
        self.require_receptive()?;
        require_admin(caller)?;
        Ok(self
            .store
            .list_url_configurations(project_id, agent_id, page)
            .await?)
    }

    /// An agent's connection state by agent id alone (Developer of its project).
    pub async fn connection_by_agent(
        &self,
        caller: &Caller,
        agent_id: Id,
    ) -> Result<(UrlConfiguration, Option<Connection>)> {
        let agent = self.agent_by_id(caller, agent_id).await?;
        self.connection(caller, &ProjectRef::Id(agent.project.id), agent_id)
            .await
    }

    /// Authenticates an operator's personal access token for the gRPC API: only
    /// administrators' `api` tokens.
    pub async fn authenticate_admin(&self, token: &str) -> Result<Caller> {
        let caller = self.authenticate(Some(token), Intent::Write, None).await?;
        if caller.is_admin() {
            Ok(caller)
        } else {
            Err(Error::Unauthorized)
        }
    }

    /// The decrypted credentials of a URL configuration, for the dialer.
    pub async fn dial_credentials(&self, config_id: Id) -> Result<DialCredentials> {
        let sealed = self
            .store
            .url_configuration_secret(config_id)
            .await?
            .ok_or(Error::NotFound(Missing::Resource))?;
        self.open_dial_credentials(&sealed)
    }

    /// The decrypted credentials of many URL configurations, read in one statement per
    /// [`DIAL_CREDENTIALS_CHUNK`] ids. `Err` when the store could not be read; otherwise a
    /// result per configuration found, so that one secret that cannot be decrypted fails only
    /// its own configuration. Ids without a configuration are left out.
    pub async fn dial_credentials_of(
        &self,
        config_ids: &[Id],
    ) -> Result<HashMap<Id, Result<DialCredentials>>> {
        let mut credentials = HashMap::with_capacity(config_ids.len());
        for chunk in config_ids.chunks(DIAL_CREDENTIALS_CHUNK) {
            for sealed in self.store.url_configuration_secrets(chunk).await? {
                credentials.insert(sealed.row, self.open_dial_credentials(&sealed));
            }
        }
        Ok(credentials)
    }

    fn open_dial_credentials(&self, sealed: &SealedSecret) -> Result<DialCredentials> {
        let plaintext = self.secrets.open(
            &sealed.envelope,
            Place {
                table: SecretColumn::TABLE,
                column: sealed.column.column(),
                row: sealed.row,
            },
        )?;
        Ok(match sealed.column {
            SecretColumn::PrivateKey => DialCredentials::Jwt { pkcs8: plaintext },
            SecretColumn::ClientKey => DialCredentials::Mtls {
                client_key: plaintext,
            },
        })
    }

    /// With a generated key file, adds a new active key to it and returns its id; with
    /// configured keys, does nothing (the operator puts the new key first).
    pub fn add_encryption_key(&self) -> anyhow::Result<Option<String>> {
        match self.secrets.source() {
            crate::crypto::keys::KeySource::File(_) => self.secrets.add_file_key().map(Some),
            crate::crypto::keys::KeySource::Configured => Ok(None),
        }
    }

    /// The id of the key that seals new secrets.
    pub fn active_encryption_key(&self) -> String {
        self.secrets.active_id()
    }

    /// Re-encrypts every stored secret that is not under the active key. Returns how many
    /// were re-encrypted and how many were already current.
    pub async fn reencrypt_secrets(&self) -> Result<(usize, usize)> {
        let active = self.secrets.active_id();
        let (mut changed, mut current) = (0, 0);
        for sealed in self.store.sealed_secrets().await? {
            if crypto::envelope::key_id(&sealed.envelope).ok().as_deref() == Some(active.as_str()) {
                current += 1;
                continue;
            }
            let place = Place {
                table: SecretColumn::TABLE,
                column: sealed.column.column(),
                row: sealed.row,
            };
            let plaintext = self.secrets.open(&sealed.envelope, place)?;
            let envelope = self.secrets.seal(&plaintext, place)?;
            // A row deleted meanwhile needs nothing more.
            if self.store.replace_sealed_secret(&sealed, &envelope).await? {
                changed += 1;
            }
        }
        Ok((changed, current))
    }
}

/// A validated URL configuration, certificates normalised to PEM.
struct CheckedUrlConfiguration {
    url: String,
    client_cert: Option<String>,
    client_key: Option<zeroize::Zeroizing<Vec<u8>>>,
    ca_cert: Option<String>,
    tls_host: Option<String>,
}

/// GitLab's validations, then kas-gateway's: the URL is stored normalised and may not name a
/// refused address; the pair must come together, belong together, and be in date; a client
/// certificate needs TLS.
fn check_url_configuration(
    input: UrlConfigurationInput,
    now: Timestamp,
    denied: &DeniedNetworks,
) -> Result<CheckedUrlConfiguration> {
    let blank_to_none = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let client_cert = blank_to_none(input.client_cert);
    let client_key = blank_to_none(input.client_key).map(zeroize::Zeroizing::new);
    let ca_cert = blank_to_none(input.ca_cert);
    let tls_host = blank_to_none(input.tls_host).map(|h| h.trim().to_owned());
    let mut errors = Vec::new();

    let too_long = |name: &str, value: Option<&str>, max: usize| {
        value
            .filter(|v| v.chars().count() > max)
            .map(|_| format!("{name} is too long (maximum is {max} characters)"))
    };
    errors.extend(too_long("Url", Some(&input.url), MAX_URL_LEN));
    errors.extend(too_long("Client cert", client_cert.as_deref(), MAX_PEM_LEN));
    errors.extend(too_long(
        "Client key",
        client_key.as_deref().map(String::as_str),
        MAX_PEM_LEN,
    ));
    errors.extend(too_long("Ca cert", ca_cert.as_deref(), MAX_PEM_LEN));
    if !errors.is_empty() {
        return Err(Error::Validation(errors));
    }

    let url = match AgentUrl::parse(&input.url) {
        Ok(url) => Some(url),
        Err(problem) => {
            errors.push(problem.message().to_owned());
            None
        }
    };
    // A host name is checked when dialled, after resolution; an address can be refused now.
    if let Some(AgentHost::Ip(addr)) = url.as_ref().map(|u| &u.host)
        && let Some(network) = denied.refusing(*addr)
    {
        errors.push(format!(
            "Url points to a refused destination: {addr} is in {network}"
        ));
    }

    let ca_cert = match ca_cert {
        None => None,
        Some(value) => {
            let pem =
                x509::normalize_pem(&value).filter(|pem| x509::parse_certificates(pem).is_some());
            if pem.is_none() {
                errors.push("Ca cert must be a valid PEM certificate".to_owned());
            }
            pem
        }
    };
    if let Some(host) = &tls_host
        && rustls_pki_types::ServerName::try_from(host.as_str()).is_err()
    {
        errors.push("Tls host must be a valid hostname!".to_owned());
    }

    let cert = client_cert.as_ref().map(|value| {
        x509::normalize_pem(value)
            .and_then(|pem| x509::parse_certificates(&pem).map(|info| (pem, info)))
    });
    if matches!(cert, Some(None)) {
        errors.push("Client cert must be a valid PEM certificate".to_owned());
    }
    let key = client_key.as_ref().map(|value| {
        x509::normalize_pem(value)
            .map(zeroize::Zeroizing::new)
            .and_then(|pem| x509::parse_private_key(&pem).map(|public| (pem, public)))
    });
    if matches!(key, Some(None)) {
        errors.push("Client key must be a valid PEM private key".to_owned());
    }
    match (&cert, &key) {
        (Some(_), None) => {
            errors.push("Client key can't be blank when a client cert is given".to_owned())
        }
        (None, Some(_)) => {
            errors.push("Client cert can't be blank when a client key is given".to_owned())
        }
        (Some(Some((_, info))), Some(Some((_, public)))) => {
            if info.public_key != *public {
                errors.push("Client key does not belong to the client cert".to_owned());
            }
            if info.not_after <= now {
                errors.push("Client cert has expired".to_owned());
            }
        }
        _ => {}
    }
    if cert.is_some() && url.as_ref().is_some_and(|u| !u.tls) {
        errors.push("Url must use grpcs:// when a client cert is given".to_owned());
    }
    if !errors.is_empty() {
        return Err(Error::Validation(errors));
    }
    let Some(url) = url else {
        // A refused URL left its message above; this only keeps the types honest.
        return Err(Error::invalid(UrlProblem::Invalid.message()));
    };
    let (client_cert, client_key) = match (cert, key) {
        (Some(Some((cert_pem, _))), Some(Some((key_pem, _)))) => (
            Some(cert_pem),
            Some(zeroize::Zeroizing::new(key_pem.as_bytes().to_vec())),
        ),
        _ => (None, None),
    };
    Ok(CheckedUrlConfiguration {
        url: url.to_string(),
        client_cert,
        client_key,
        ca_cert,
        tls_host,
    })
}

/// The personal access token a request came with; the operator and GitLab have none.
fn caller_token(caller: &Caller) -> Result<Id> {
    caller.token_id().ok_or_else(|| {
        Error::BadRequest("This endpoint requires token type to be a personal access token".into())
    })
}

fn require_admin(caller: &Caller) -> Result<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(Error::Forbidden)
    }
}
