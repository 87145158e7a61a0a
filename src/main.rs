//! The `kas-gateway` command.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use kas_gateway::clock::SystemClock;
use kas_gateway::config::ConfigArgs;
use kas_gateway::domain::{
    AccessLevel, Caller, NewProjectInput, NewTokenInput, NewUserInput, PageRequest, ProjectRef,
    Scope, Service, TokenFilter, format_date, parse_date,
};
use kas_gateway::respond::Respond;
use kas_gateway::{server, telemetry};

#[derive(Parser, Debug)]
#[command(
    name = "kas-gateway",
    version,
    about = "The GitLab side of receptive Kubernetes agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the gateway.
    Serve(WithConfig),
    /// Applies database migrations and exits.
    Migrate(WithConfig),
    /// Administration of users, tokens, projects, members and encryption keys.
    Admin(AdminArgs),
    /// Certificates for trying the gateway out.
    #[command(subcommand)]
    Certs(Certs),
    /// Runs a receptive agent in a cluster: kas-gateway dials it, and the requests it
    /// tunnels go to the cluster's Kubernetes API.
    Agent(AgentArgs),
    /// Serves simulated receptive agents, to check connectivity or to load a gateway.
    AgentSim(AgentSimArgs),
    /// Asks a running gateway's observability listener whether it is ready (or alive), as a
    /// container's health check does: exit status 0 when it is.
    Probe(ProbeArgs),
}

#[derive(clap::Args, Debug)]
struct ProbeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Ask /liveness (the process is up) instead of /readiness (it can serve).
    #[arg(long)]
    liveness: bool,
}

#[derive(clap::Args, Debug)]
struct WithConfig {
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(clap::Args, Debug)]
struct AdminArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// What to print: sentences for people, or the REST API's JSON for scripts.
    #[arg(long, value_enum, default_value = "text", global = true)]
    output: Output,
    #[command(subcommand)]
    action: Admin,
}

/// The admin commands' output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    /// Sentences and tables.
    Text,
    /// The objects as the REST API renders them, one JSON document.
    Json,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Where the gateway dials this agent.
    #[arg(long, env = "KAS_AGENT_LISTEN", default_value = "0.0.0.0:8082")]
    listen: std::net::SocketAddr,
    /// File holding the agent token (glagent-…), which the agent presents to the gateway.
    #[arg(long, env = "KAS_AGENT_TOKEN_FILE")]
    token_file: std::path::PathBuf,
    /// Verify the gateway's JWT with this public key: the URL configuration's public_key
    /// (JWT mode). Give it, or --client-ca-file (mTLS mode), or both.
    #[arg(long, env = "KAS_AGENT_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<String>,
    /// Server certificate (PEM) for grpcs://; cleartext grpc:// without it.
    #[arg(long, env = "KAS_AGENT_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<std::path::PathBuf>,
    /// Server key (PEM).
    #[arg(long, env = "KAS_AGENT_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<std::path::PathBuf>,
    /// Require a gateway client certificate signed by this CA (PEM): mTLS mode.
    #[arg(long, env = "KAS_AGENT_CLIENT_CA_FILE", requires = "tls_cert_file")]
    client_ca_file: Option<std::path::PathBuf>,
    /// The Kubernetes API to send tunnelled requests to [default: the cluster the agent
    /// runs in, from KUBERNETES_SERVICE_HOST and the pod's service account].
    #[arg(long, env = "KAS_AGENT_UPSTREAM_URL")]
    upstream_url: Option<String>,
    /// CA (PEM) of --upstream-url [default: the system's CAs].
    #[arg(long, env = "KAS_AGENT_UPSTREAM_CA_FILE", requires = "upstream_url")]
    upstream_ca_file: Option<std::path::PathBuf>,
    /// Bearer token file for --upstream-url.
    #[arg(long, env = "KAS_AGENT_UPSTREAM_TOKEN_FILE", requires = "upstream_url")]
    upstream_token_file: Option<std::path::PathBuf>,
    /// Whom requests act as upstream: the agent's own identity, or the GitLab user
    /// (impersonated; the agent's identity needs the `impersonate` permission).
    #[arg(long, env = "KAS_AGENT_ACCESS_AS", value_enum, default_value = "agent")]
    access_as: kas_gateway::agent::AccessAs,
    /// Log filter.
    #[arg(long, env = "KAS_AGENT_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, env = "KAS_AGENT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: kas_gateway::config::LogFormat,
}

#[derive(clap::Args, Debug)]
struct AgentSimArgs {
    /// Address of the (first) agent.
    #[arg(long, default_value = "127.0.0.1:4242")]
    listen: std::net::SocketAddr,
    /// The agent token to present (glagent-…); or give --agents-file.
    #[arg(long, env = "KAS_AGENT_SIM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Verify the gateway's JWT with this public key (the URL configuration's public_key).
    #[arg(long)]
    jwt_public_key: Option<String>,
    /// Many agents: one per line, `<port> <agent token> [<jwt public key>]`.
    #[arg(long)]
    agents_file: Option<std::path::PathBuf>,
    /// Server certificate (PEM); cleartext h2c without it.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Server key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require gateway client certificates signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<std::path::PathBuf>,
    /// Also print a status line (JSON: agents, listening, accepted_agents, open_sessions,
    /// pongs) on standard output this often, for programs that drive many agents.
    #[arg(long, value_name = "MILLISECONDS")]
    status_every_ms: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Certs {
    /// Writes a development CA, a server certificate for an agent host and an mTLS client
    /// certificate (with their keys, mode 0600).
    Dev {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: std::path::PathBuf,
        /// Host name of the agent's server certificate (localhost and 127.0.0.1 are added).
        #[arg(long, default_value = "agent.local")]
        host: String,
    },
}

#[derive(Subcommand, Debug)]
enum Admin {
    /// Creates a user.
    CreateUser {
        /// Login name.
        #[arg(long)]
        username: String,
        /// Display name.
        #[arg(long)]
        name: String,
        /// E-mail address.
        #[arg(long)]
        email: String,
        /// Makes the user an administrator.
        #[arg(long)]
        admin: bool,
    },
    /// Creates a personal access token and prints it (once).
    CreateToken {
        /// The user's username.
        #[arg(long)]
        user: String,
        /// Token name.
        #[arg(long)]
        name: String,
        /// Scopes, comma-separated: api, read_api, sudo (administrators).
        #[arg(long, value_delimiter = ',', default_value = "api")]
        scopes: Vec<String>,
        /// Expiry date, YYYY-MM-DD.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Creates a project in a user's namespace, with that user as Owner.
    CreateProject {
        /// The owner's username.
        #[arg(long)]
        owner: String,
        /// Project name.
        #[arg(long)]
        name: String,
        /// Project path (derived from the name by default).
        #[arg(long)]
        path: Option<String>,
        /// Description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Adds a user to a project.
    AddMember {
        /// Project id or full path (namespace/project).
        #[arg(long)]
        project: String,
        /// The user's username.
        #[arg(long)]
        user: String,
        /// guest, planner, reporter, developer, maintainer, owner, or the number.
        #[arg(long)]
        access_level: String,
    },
    /// Lists personal access tokens (never their secrets): every user's, or one user's.
    ListTokens {
        /// Only this user's tokens (username).
        #[arg(long)]
        user: Option<String>,
        /// Revoked and expired tokens too.
        #[arg(long)]
        all: bool,
    },
    /// Revokes a personal access token by id (see list-tokens).
    RevokeToken {
        /// The token's id.
        #[arg(long)]
        id: i64,
    },
    /// Re-encrypts every stored secret under the active key. With the generated key file,
    /// first adds a new key to it; with configured keys, put the new key first beforehand.
    RotateEncryptionKey,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // One line, causes included, never a backtrace: a mistake in the configuration is
        // the operator's to fix, not a crash (even with RUST_BACKTRACE set).
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Certs(Certs::Dev { out, host }) => {
            #[allow(clippy::disallowed_methods)] // certificates are dated by the wall clock
            let now = time::OffsetDateTime::now_utc();
            for file in kas_gateway::certs::write_dev_certs(&out, &host, now)? {
                println!("wrote {}", file.display());
            }
            Ok(())
        }
        Command::Agent(args) => {
            telemetry::init(&args.log_level, args.log_format)?;
            run_agent(args).await
        }
        Command::AgentSim(args) => {
            telemetry::init("info", kas_gateway::config::LogFormat::Text)?;
            server::raise_file_limit();
            run_agent_sim(args).await
        }
        Command::Serve(WithConfig { config }) => {
            let config = config.resolve()?;
            telemetry::init(&config.log_level, config.log_format)?;
            server::raise_file_limit();
            let shutdown = CancellationToken::new();
            server::cancel_on_signals(shutdown.clone());
            let running = server::start(&config, Arc::new(SystemClock), shutdown.clone()).await?;
            // The drain time bounds the listeners and the dialer, and closing the database
            // has its own bound; this is the last resort should anything still hang.
            let hard_stop = config.limits.shutdown_blackout
                + config.limits.drain_timeout
                + std::time::Duration::from_secs(10);
            tokio::select! {
                stopped = running.wait() => stopped,
                () = async {
                    shutdown.cancelled().await;
                    tokio::time::sleep(hard_stop).await;
                } => {
                    tracing::error!("the shutdown took too long: exiting now");
                    Ok(())
                }
            }
        }
        Command::Probe(ProbeArgs { config, liveness }) => {
            let config = config.resolve()?;
            let path = if liveness { "/liveness" } else { "/readiness" };
            let status = probe(config.observability_listen, path).await?;
            if status.is_success() {
                println!("{path}: {status}");
                Ok(())
            } else {
                anyhow::bail!("{path}: {status}")
            }
        }
        Command::Migrate(WithConfig { config }) => {
            let config = config.resolve()?;
            telemetry::init(&config.log_level, config.log_format)?;
            let store = server::open_store(&config).await?;
            store.close().await;
            Ok(())
        }
        Command::Admin(AdminArgs {
            config,
            output,
            action,
        }) => {
            let config = config.resolve()?;
            telemetry::init(&config.log_level, config.log_format)?;
            let (store, service) = server::open_service(&config, Arc::new(SystemClock)).await?;
            server::bootstrap(&service, &config).await?;
            let external_url = config.external_url.clone().unwrap_or_else(|| {
                let scheme = if config.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{}", config.listen)
            });
            let outcome = run_admin(&service, action, output, &external_url).await;
            store.close().await;
            outcome
        }
    }
}

/// GETs `path` from the observability listener at `addr` (its loopback address when it
/// listens on every address), within a few seconds.
async fn probe(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<http::StatusCode> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let ask = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, axum::body::Body>(
                hyper_util::rt::TokioIo::new(stream),
            )
            .await?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(axum::body::Body::empty())?;
        Ok::<_, anyhow::Error>(sender.send_request(request).await?.status())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), ask)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer {path} within 5 s"))?
}

/// Prints `value` as one JSON document.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn run_admin(
    service: &Service,
    admin: Admin,
    output: Output,
    external_url: &str,
) -> anyhow::Result<()> {
    use kas_gateway::rest::repr::{MemberJson, PersonalTokenJson, ProjectJson, UserJson};
    let operator = Caller::operator();
    let json = output == Output::Json;
    match admin {
        Admin::CreateUser {
            username,
            name,
            email,
            admin,
        } => {
            let user = service
                .create_user(
                    &operator,
                    NewUserInput {
                        username,
                        name,
                        email,
                        admin,
                    },
                )
                .await
                .map_err(explain)?;
            if json {
                print_json(&UserJson::new(&user, external_url))?;
            } else {
                println!("created user {} (id {})", user.username, user.id);
            }
        }
        Admin::CreateToken {
            user,
            name,
            scopes,
            expires_at,
        } => {
            let user = service.user_by_username(&user).await.map_err(explain)?;
            let scopes = scopes
                .iter()
                .map(|s| Scope::parse(s.trim()).with_context(|| format!("unknown scope {s:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let expires_at = expires_at
                .map(|d| parse_date(&d).with_context(|| format!("{d:?} is not a YYYY-MM-DD date")))
                .transpose()?;
            let (token, secret) = service
                .create_personal_token(
                    &operator,
                    user.id,
                    NewTokenInput {
                        name,
                        scopes,
                        expires_at,
                    },
                )
                .await
                .map_err(explain)?;
            if json {
                print_json(&PersonalTokenJson::new(
                    &token,
                    service.now(),
                    Some(&secret),
                ))?;
            } else {
                println!("{}", secret.expose());
            }
        }
        Admin::CreateProject {
            owner,
            name,
            path,
            description,
        } => {
            let owner = service.user_by_username(&owner).await.map_err(explain)?;
            let project = service
                .create_project(
                    &operator,
                    NewProjectInput {
                        name: Some(name),
                        path,
                        description,
                        namespace_id: Some(owner.id),
                    },
                )
                .await
                .map_err(explain)?;
            if json {
                print_json(&ProjectJson::new(&project, external_url))?;
            } else {
                println!(
                    "created project {} (id {})",
                    project.path_with_namespace(),
                    project.id
                );
            }
        }
        Admin::AddMember {
            project,
            user,
            access_level,
        } => {
            let level = AccessLevel::parse(&access_level)
                .with_context(|| format!("unknown access level {access_level:?}"))?;
            let user = service.user_by_username(&user).await.map_err(explain)?;
            let member = service
                .add_member(&operator, &ProjectRef::parse(&project), user.id, level)
                .await
                .map_err(explain)?;
            if json {
                print_json(&MemberJson::new(&member, external_url))?;
            } else {
                println!(
                    "{} is now {} of {project}",
                    member.user.username,
                    member.access_level.name()
                );
            }
        }
        Admin::ListTokens { user, all } => {
            let user_id = match user {
                Some(username) => Some(
                    service
                        .user_by_username(&username)
                        .await
                        .map_err(explain)?
                        .id,
                ),
                None => None,
            };
            let mut tokens = Vec::new();
            let mut page = 1;
            loop {
                let query = TokenFilter {
                    user_id,
                    active: (!all).then_some(true),
                    ..TokenFilter::default()
                };
                let request = PageRequest {
                    page,
                    per_page: PageRequest::MAX_PER_PAGE,
                };
                let found = service
                    .list_personal_tokens(&operator, query, request)
                    .await
                    .map_err(explain)?;
                let done = found.items.len() < usize::try_from(request.per_page).unwrap_or(0);
                tokens.extend(found.items);
                if done {
                    break;
                }
                page += 1;
            }
            let now = service.now();
            if json {
                let rendered: Vec<PersonalTokenJson> = tokens
                    .iter()
                    .map(|t| PersonalTokenJson::new(t, now, None))
                    .collect();
                print_json(&rendered)?;
            } else {
                println!(
                    "{:>6}  {:>7}  {:<24}  {:<20}  {:<8}  {:<10}  last used",
                    "id", "user id", "name", "scopes", "state", "expires"
                );
                for t in &tokens {
                    let state = if t.revoked {
                        "revoked"
                    } else if t.is_expired(now) {
                        "expired"
                    } else {
                        "active"
                    };
                    let scopes: Vec<&str> = t.scopes.iter().map(|s| s.as_str()).collect();
                    println!(
                        "{:>6}  {:>7}  {:<24}  {:<20}  {:<8}  {:<10}  {}",
                        t.id,
                        t.user_id,
                        t.name.escape_debug().to_string(),
                        scopes.join(","),
                        state,
                        t.expires_at
                            .map(format_date)
                            .unwrap_or_else(|| "never".into()),
                        t.last_used_at
                            .map(|at| at.to_iso8601())
                            .unwrap_or_else(|| "never".into()),
                    );
                }
            }
        }
        Admin::RevokeToken { id } => {
            service
                .revoke_personal_token(&operator, id)
                .await
                .map_err(explain)?;
            if json {
                print_json(&serde_json::json!({"id": id, "revoked": true}))?;
            } else {
                println!("revoked personal access token {id}");
            }
        }
        Admin::RotateEncryptionKey => {
            let added = service.add_encryption_key()?;
            if let Some(id) = &added
                && !json
            {
                println!("added encryption key {id} to the key file; it is now the active key");
            }
            let (changed, current) = service.reencrypt_secrets().await.map_err(explain)?;
            if json {
                print_json(&serde_json::json!({
                    "added_key": added,
                    "active_key": service.active_encryption_key(),
                    "reencrypted": changed,
                    "unchanged": current,
                }))?;
            } else {
                println!(
                    "re-encrypted {changed} secret(s) under key {}; {current} already were",
                    service.active_encryption_key()
                );
            }
        }
    }
    Ok(())
}

/// Refuses an agent token or a public key that cannot be valid (such as the `null` that `jq -r`
/// prints for a missing field), rather than serving an agent every gateway would refuse.
fn check_sim_credentials(token: &str, jwt_public_key: Option<&str>) -> anyhow::Result<()> {
    use base64::Engine;
    let prefix = kas_gateway::crypto::AGENT_TOKEN_PREFIX;
    let valid_token = token.len() > prefix.len() + 16
        && token.starts_with(prefix)
        && token[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid_token {
        // Not echoed: it may be a real token with a typo.
        anyhow::bail!(
            "the agent token given is not one (agent tokens start with {prefix} and are shown \
             once, when the token is created)"
        );
    }
    if let Some(key) = jwt_public_key {
        let decoded = base64::engine::general_purpose::STANDARD.decode(key.trim());
        if decoded.map(|k| k.len()) != Ok(32) {
            anyhow::bail!(
                "the JWT public key given is not one (it is the URL configuration's \
                 public_key: base64 of 32 bytes)"
            );
        }
    }
    Ok(())
}

/// `kas-gateway agent`: one agent, until SIGTERM.
async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    use kas_gateway::agent::server::{AgentConfig, AgentServer};
    use kas_gateway::agent::upstream::{Upstream, token_from_file};
    let read = |path: &std::path::PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let token = token_from_file(&args.token_file)?;
    check_sim_credentials(token.expose(), args.jwt_public_key.as_deref())?;
    if args.jwt_public_key.is_none() && args.client_ca_file.is_none() {
        anyhow::bail!(
            "give --jwt-public-key (the URL configuration's public_key) or --client-ca-file \
             (mTLS): without either, anyone who reaches this agent could use its cluster"
        );
    }
    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    let upstream = match &args.upstream_url {
        Some(url) => Upstream::new(
            url,
            args.upstream_ca_file
                .as_ref()
                .map(read)
                .transpose()?
                .as_deref(),
            args.upstream_token_file
                .as_deref()
                .map(token_from_file)
                .transpose()?,
            args.access_as,
        )?,
        None => Upstream::in_cluster(args.access_as)?,
    };
    let kubernetes_version = upstream.version().await.unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot read the Kubernetes API's version (yet)");
        String::new()
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let config = AgentConfig {
        token: token.expose().to_owned(),
        tls: tls.clone(),
        client_ca: args.client_ca_file.as_ref().map(read).transpose()?,
        jwt_public_key: args.jwt_public_key.clone(),
        jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
        metadata: kas_gateway::proto::agent::v1::AgentMetadata {
            version: format!("kas-gateway agent {}", env!("CARGO_PKG_VERSION")),
            commit: kas_gateway::metrics::COMMIT.to_owned(),
            pod_namespace: std::env::var("POD_NAMESPACE").unwrap_or_default(),
            pod_name: std::env::var("POD_NAME").unwrap_or_default(),
            kubernetes_version,
        },
        clock: Arc::new(SystemClock),
    };
    let agent = AgentServer::start_with_upstream(config, Some(Arc::new(upstream)), listener)?;
    tracing::info!(
        addr = %agent.addr,
        tls = tls.is_some(),
        mtls = args.client_ca_file.is_some(),
        jwt = args.jwt_public_key.is_some(),
        access_as = ?args.access_as,
        "agent listening for the gateway"
    );
    let shutdown = CancellationToken::new();
    server::cancel_on_signals(shutdown.clone());
    shutdown.cancelled().await;
    agent.stop().await;
    Ok(())
}

async fn run_agent_sim(args: AgentSimArgs) -> anyhow::Result<()> {
    use kas_gateway::agent_sim::{AgentSim, AgentSimConfig};
    let read = |path: &std::path::PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        _ => None,
    };
    let client_ca = args.client_ca.as_ref().map(read).transpose()?;
    let mut agents: Vec<(std::net::SocketAddr, String, Option<String>)> = Vec::new();
    if let Some(file) = &args.agents_file {
        for (n, line) in read(file)?.lines().enumerate() {
            let mut fields = line.split_whitespace();
            let (Some(port), Some(token)) = (fields.next(), fields.next()) else {
                continue;
            };
            let port: u16 = port
                .parse()
                .with_context(|| format!("line {}: {port:?} is not a port", n + 1))?;
            let addr = std::net::SocketAddr::new(args.listen.ip(), port);
            let key = fields.next().map(str::to_owned);
            check_sim_credentials(token, key.as_deref())
                .with_context(|| format!("{} line {}", file.display(), n + 1))?;
            agents.push((addr, token.to_owned(), key));
        }
    } else {
        let token = args
            .token
            .clone()
            .context("give --token (or --agents-file)")?;
        check_sim_credentials(&token, args.jwt_public_key.as_deref())?;
        agents.push((args.listen, token, args.jwt_public_key.clone()));
    }
    let mut sims = Vec::new();
    for (addr, token, jwt_public_key) in agents {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let config = AgentSimConfig {
            token,
            tls: tls.clone(),
            client_ca: client_ca.clone(),
            jwt_public_key,
            jwt_audience: kas_gateway::crypto::jwt::AUDIENCE.into(),
            metadata: kas_gateway::proto::agent::v1::AgentMetadata {
                version: format!("agent-sim {}", env!("CARGO_PKG_VERSION")),
                ..Default::default()
            },
            clock: Arc::new(SystemClock),
        };
        sims.push(AgentSim::start(config, listener)?);
    }
    tracing::info!(
        agents = sims.len(),
        first = %sims.first().map(|s| s.addr.to_string()).unwrap_or_default(),
        tls = tls.is_some(),
        mtls = client_ca.is_some(),
        "simulated agents listening"
    );
    let shutdown = CancellationToken::new();
    server::cancel_on_signals(shutdown.clone());
    let mut report = tokio::time::interval(std::time::Duration::from_secs(10));
    let mut status = tokio::time::interval(std::time::Duration::from_millis(
        args.status_every_ms.unwrap_or(u64::MAX / 4).max(10),
    ));
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = report.tick() => {
                let now = SimStatus::of(&sims);
                tracing::info!(open_sessions = now.open_sessions, accepted = now.accepted, "agent-sim");
            }
            _ = status.tick(), if args.status_every_ms.is_some() => {
                let now = SimStatus::of(&sims);
                println!(
                    "{}",
                    serde_json::json!({
                        "agents": sims.len(),
                        "listening": sims.len(),
                        "accepted_agents": now.accepted_agents,
                        "accepted": now.accepted,
                        "open_sessions": now.open_sessions,
                        "pongs": now.pongs,
                    })
                );
            }
        }
    }
    for sim in sims {
        sim.stop().await;
    }
    Ok(())
}

/// What a set of simulated agents saw, summed.
struct SimStatus {
    accepted: u64,
    accepted_agents: usize,
    open_sessions: i64,
    pongs: u64,
}

impl SimStatus {
    fn of(sims: &[kas_gateway::agent_sim::AgentSim]) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let mut status = Self {
            accepted: 0,
            accepted_agents: 0,
            open_sessions: 0,
            pongs: 0,
        };
        for sim in sims {
            let accepted = sim.events.accepted.load(Relaxed);
            status.accepted += accepted;
            status.accepted_agents += usize::from(accepted > 0);
            status.open_sessions += sim.events.open_sessions.load(Relaxed);
            status.pongs += sim.events.pongs.load(Relaxed);
        }
        status
    }
}

/// The error as a client would see it, for the operator.
fn explain(error: kas_gateway::domain::Error) -> anyhow::Error {
    anyhow::anyhow!("{}", error.reply().body)
}
