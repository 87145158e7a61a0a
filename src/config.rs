//! Configuration: flags, then `KAS_GATEWAY_*` environment variables, then a TOML file,
//! then defaults. Any secret may be read from a file (`*_FILE`). Unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::crypto::Secret;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The resolved configuration of a running gateway.
#[derive(Clone)]
pub struct Config {
    /// Where the SQLite database, generated keys and the bootstrap token file live.
    pub data_dir: PathBuf,
    /// `sqlite:` or `postgres:` URL; may hold a password, so it is a secret.
    pub database_url: Secret,
    /// Connection pool size.
    pub database_max_connections: u32,
    /// Address of the HTTP listener.
    pub listen: SocketAddr,
    /// Address of the observability listener (metrics, probes, status page).
    pub observability_listen: SocketAddr,
    /// The URL clients reach the gateway at (for `Link` headers); from `listen` when unset.
    pub external_url: Option<String>,
    /// The root user's token on first start.
    pub bootstrap_token: Option<Secret>,
    /// `tracing` filter directive, such as `info` or `kas_gateway=debug`.
    pub log_level: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// `id=base64key` entries, the first active; `None`: a key file in the data directory.
    pub encryption_keys: Option<Secret>,
    /// Receptive agents (URL configurations) on or off.
    pub receptive_agents: bool,
    /// How the dialer behaves (timeouts, heartbeats, backoff).
    pub dialer: crate::dialer::DialerSettings,
    /// The shared secret GitLab signs gRPC calls with (the decoded 32 bytes).
    pub gitlab_secret: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// The `iss` GitLab's JWTs must carry; `None`: any non-empty one (GitLab sends its host name).
    pub gitlab_issuer: Option<String>,
    /// A separate listener for gRPC only (gRPC is always served on `listen` too).
    pub grpc_listen: Option<SocketAddr>,
    /// TLS certificate and key files for the listeners (read again when they change).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Connection, stream and time limits of the listeners, and the shutdown drain time.
    pub limits: crate::listener::Limits,
    /// This replica's name in the cluster, in logs and in connection states.
    pub replica_id: String,
    /// How long a replica's lease lasts without renewal (PostgreSQL).
    pub lease_ttl: std::time::Duration,
    /// The replicas' private API: where it listens, the URL the others reach it at, and the
    /// shared secret its calls are signed with.
    pub private_api: Option<PrivateApiConfig>,
}

/// The private API between replicas.
#[derive(Clone)]
pub struct PrivateApiConfig {
    /// Listener address.
    pub listen: SocketAddr,
    /// The URL other replicas call; from the bound address when unset.
    pub url: Option<String>,
    /// The shared secret (the decoded 32 bytes).
    pub secret: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for PrivateApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateApiConfig")
            .field("listen", &self.listen)
            .field("url", &self.url)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("database", &database_kind(self.database_url.expose()))
            .field("database_max_connections", &self.database_max_connections)
            .field("listen", &self.listen)
            .field("observability_listen", &self.observability_listen)
            .field("external_url", &self.external_url)
            .field(
                "bootstrap_token",
                &self.bootstrap_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("log_level", &self.log_level)
            .field("log_format", &self.log_format)
            .field(
                "encryption_keys",
                &self.encryption_keys.as_ref().map(|_| "[REDACTED]"),
            )
            .field("receptive_agents", &self.receptive_agents)
            .field(
                "gitlab_secret",
                &self.gitlab_secret.as_ref().map(|_| "[REDACTED]"),
            )
            .field("gitlab_issuer", &self.gitlab_issuer)
            .field("grpc_listen", &self.grpc_listen)
            .field("tls", &self.tls)
            .field("limits", &self.limits)
            .field("replica_id", &self.replica_id)
            .field("lease_ttl", &self.lease_ttl)
            .field("private_api", &self.private_api)
            .finish()
    }
}

/// The backend a URL names, for logs (never the URL itself: it may carry a password).
pub fn database_kind(url: &str) -> &'static str {
    if url.starts_with("sqlite:") {
        "sqlite"
    } else if url.starts_with("postgres") {
        "postgres"
    } else {
        "unknown"
    }
}

impl Config {
    /// Defaults for a data directory, as the first command of the README uses them.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            database_url: Secret::new(default_database_url(&data_dir)),
            data_dir,
            database_max_connections: DEFAULT_MAX_CONNECTIONS,
            listen: default_listen(),
            // Any free port: tests start many gateways at once.
            observability_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            external_url: None,
            bootstrap_token: None,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            encryption_keys: None,
            receptive_agents: true,
            dialer: crate::dialer::DialerSettings::default(),
            gitlab_secret: None,
            gitlab_issuer: None,
            grpc_listen: None,
            tls: None,
            limits: crate::listener::Limits::default(),
            replica_id: crate::dialer::replica_name(),
            lease_ttl: DEFAULT_LEASE_TTL,
            private_api: None,
        }
    }
}

const DEFAULT_MAX_CONNECTIONS: u32 = 10;
const DEFAULT_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(15);
/// The lease must outlast the safety margin by a few seconds.
const MIN_LEASE_TTL_SECS: u64 = 6;
/// A configured root token must be at least this long: it is stored as a fast digest.
const MIN_BOOTSTRAP_TOKEN_LEN: usize = 20;
const DEFAULT_DATA_DIR: &str = "./data";

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_database_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("kas-gateway.db").display())
}

/// Every environment variable the gateway reads; any other `KAS_GATEWAY_*` is an error.
const KNOWN_ENV: &[&str] = &[
    "KAS_GATEWAY_CONFIG",
    "KAS_GATEWAY_DATA_DIR",
    "KAS_GATEWAY_DATABASE_URL",
    "KAS_GATEWAY_DATABASE_URL_FILE",
    "KAS_GATEWAY_DATABASE_MAX_CONNECTIONS",
    "KAS_GATEWAY_LISTEN",
    "KAS_GATEWAY_OBSERVABILITY_LISTEN",
    "KAS_GATEWAY_EXTERNAL_URL",
    "KAS_GATEWAY_BOOTSTRAP_TOKEN",
    "KAS_GATEWAY_BOOTSTRAP_TOKEN_FILE",
    "KAS_GATEWAY_LOG_LEVEL",
    "KAS_GATEWAY_LOG_FORMAT",
    "KAS_GATEWAY_ENCRYPTION_KEYS",
    "KAS_GATEWAY_ENCRYPTION_KEYS_FILE",
    "KAS_GATEWAY_RECEPTIVE_AGENTS",
    "KAS_GATEWAY_GITLAB_SECRET_FILE",
    "KAS_GATEWAY_GITLAB_ISSUER",
    "KAS_GATEWAY_GRPC_LISTEN",
    "KAS_GATEWAY_TLS_CERT_FILE",
    "KAS_GATEWAY_TLS_KEY_FILE",
    "KAS_GATEWAY_DIALER_HEARTBEAT_SECONDS",
    "KAS_GATEWAY_DIALER_KEEPALIVE_SECONDS",
    "KAS_GATEWAY_DIALER_RESYNC_SECONDS",
    "KAS_GATEWAY_DIALER_CONNECT_TIMEOUT_SECONDS",
    "KAS_GATEWAY_DIALER_DENIED_NETWORKS",
    "KAS_GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS",
    "KAS_GATEWAY_HTTP_BODY_TIMEOUT_SECONDS",
    "KAS_GATEWAY_HTTP_IDLE_TIMEOUT_SECONDS",
    "KAS_GATEWAY_HTTP_MAX_CONNECTIONS",
    "KAS_GATEWAY_HTTP2_MAX_CONCURRENT_STREAMS",
    "KAS_GATEWAY_SHUTDOWN_DRAIN_SECONDS",
    "KAS_GATEWAY_SHUTDOWN_BLACKOUT_SECONDS",
    "KAS_GATEWAY_REPLICA_ID",
    "KAS_GATEWAY_LEASE_TTL_SECONDS",
    "KAS_GATEWAY_PRIVATE_API_LISTEN",
    "KAS_GATEWAY_PRIVATE_API_URL",
    "KAS_GATEWAY_PRIVATE_API_SECRET_FILE",
];

/// Configuration flags shared by `serve`, `migrate` and `admin`.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "KAS_GATEWAY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long, env = "KAS_GATEWAY_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Database URL (sqlite://… or postgres://…) [default: SQLite file in the data directory].
    #[arg(
        long,
        env = "KAS_GATEWAY_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// File holding the database URL.
    #[arg(long, env = "KAS_GATEWAY_DATABASE_URL_FILE", global = true)]
    pub database_url_file: Option<PathBuf>,
    /// Database connection pool size [default: 10].
    #[arg(long, env = "KAS_GATEWAY_DATABASE_MAX_CONNECTIONS", global = true)]
    pub database_max_connections: Option<u32>,
    /// Listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "KAS_GATEWAY_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// Listener of the observability endpoints: Prometheus /metrics, /liveness, /readiness and
    /// the status page; never the API [default: 127.0.0.1:8151].
    #[arg(long, env = "KAS_GATEWAY_OBSERVABILITY_LISTEN", global = true)]
    pub observability_listen: Option<SocketAddr>,
    /// Public URL of the gateway, for Link headers [default: http://<listen>].
    #[arg(long, env = "KAS_GATEWAY_EXTERNAL_URL", global = true)]
    pub external_url: Option<String>,
    /// Token of the root user created on first start.
    #[arg(
        long,
        env = "KAS_GATEWAY_BOOTSTRAP_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub bootstrap_token: Option<String>,
    /// File holding the bootstrap token.
    #[arg(long, env = "KAS_GATEWAY_BOOTSTRAP_TOKEN_FILE", global = true)]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Log filter [default: info].
    #[arg(long, env = "KAS_GATEWAY_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "KAS_GATEWAY_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Encryption keys for secrets at rest, `id=base64,...`, the first active
    /// [default: a key file generated in the data directory].
    #[arg(
        long,
        env = "KAS_GATEWAY_ENCRYPTION_KEYS",
        global = true,
        hide_env_values = true
    )]
    pub encryption_keys: Option<String>,
    /// File holding the encryption keys.
    #[arg(long, env = "KAS_GATEWAY_ENCRYPTION_KEYS_FILE", global = true)]
    pub encryption_keys_file: Option<PathBuf>,
    /// Receptive agents (URL configurations) on or off [default: true].
    #[arg(long, env = "KAS_GATEWAY_RECEPTIVE_AGENTS", global = true)]
    pub receptive_agents: Option<bool>,
    /// GitLab's KAS secret file (base64 of 32 bytes): GitLab's gRPC calls are signed with it.
    #[arg(long, env = "KAS_GATEWAY_GITLAB_SECRET_FILE", global = true)]
    pub gitlab_secret_file: Option<PathBuf>,
    /// The `iss` GitLab's JWTs must carry: its host name (GitLab's `gitlab.host`)
    /// [default: any non-empty issuer].
    #[arg(long, env = "KAS_GATEWAY_GITLAB_ISSUER", global = true)]
    pub gitlab_issuer: Option<String>,
    /// A separate gRPC-only listener [default: none; gRPC shares the HTTP listener].
    #[arg(long, env = "KAS_GATEWAY_GRPC_LISTEN", global = true)]
    pub grpc_listen: Option<SocketAddr>,
    /// TLS certificate (PEM chain) for the listeners; with --tls-key-file.
    #[arg(long, env = "KAS_GATEWAY_TLS_CERT_FILE", global = true)]
    pub tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM) for the listeners.
    #[arg(long, env = "KAS_GATEWAY_TLS_KEY_FILE", global = true)]
    pub tls_key_file: Option<PathBuf>,
    /// Seconds between the dialer's heartbeats on each session [default: 15].
    #[arg(long, env = "KAS_GATEWAY_DIALER_HEARTBEAT_SECONDS", global = true)]
    pub dialer_heartbeat_seconds: Option<u64>,
    /// Seconds between HTTP/2 keepalive pings to agents [default: 55].
    #[arg(long, env = "KAS_GATEWAY_DIALER_KEEPALIVE_SECONDS", global = true)]
    pub dialer_keepalive_seconds: Option<u64>,
    /// Seconds between full resynchronisations of the dialer with the store [default: 300].
    #[arg(long, env = "KAS_GATEWAY_DIALER_RESYNC_SECONDS", global = true)]
    pub dialer_resync_seconds: Option<u64>,
    /// Seconds for DNS, TCP and TLS when dialling an agent [default: 10].
    #[arg(
        long,
        env = "KAS_GATEWAY_DIALER_CONNECT_TIMEOUT_SECONDS",
        global = true
    )]
    pub dialer_connect_timeout_seconds: Option<u64>,
    /// Networks the dialer never connects to, comma-separated CIDRs; empty for none
    /// [default: link-local, unspecified, multicast and broadcast addresses].
    #[arg(long, env = "KAS_GATEWAY_DIALER_DENIED_NETWORKS", global = true)]
    pub dialer_denied_networks: Option<String>,
    /// Seconds a client has to send a complete request head (and, on a new connection, to
    /// finish its TLS handshake) [default: 10].
    #[arg(long, env = "KAS_GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS", global = true)]
    pub http_header_timeout_seconds: Option<u64>,
    /// Seconds a client has to send a request body [default: 30].
    #[arg(long, env = "KAS_GATEWAY_HTTP_BODY_TIMEOUT_SECONDS", global = true)]
    pub http_body_timeout_seconds: Option<u64>,
    /// Seconds after which a connection with no request in progress is closed [default: 120].
    #[arg(long, env = "KAS_GATEWAY_HTTP_IDLE_TIMEOUT_SECONDS", global = true)]
    pub http_idle_timeout_seconds: Option<u64>,
    /// Open client connections over all listeners [default: 4096].
    #[arg(long, env = "KAS_GATEWAY_HTTP_MAX_CONNECTIONS", global = true)]
    pub http_max_connections: Option<usize>,
    /// Concurrent HTTP/2 streams (gRPC calls) per connection [default: 100].
    #[arg(long, env = "KAS_GATEWAY_HTTP2_MAX_CONCURRENT_STREAMS", global = true)]
    pub http2_max_concurrent_streams: Option<u32>,
    /// Seconds that open requests and streams get to finish after SIGTERM [default: 20].
    #[arg(long, env = "KAS_GATEWAY_SHUTDOWN_DRAIN_SECONDS", global = true)]
    pub shutdown_drain_seconds: Option<u64>,
    /// Seconds between SIGTERM and closing the listeners, while readiness already answers 503
    /// [default: 0].
    #[arg(long, env = "KAS_GATEWAY_SHUTDOWN_BLACKOUT_SECONDS", global = true)]
    pub shutdown_blackout_seconds: Option<u64>,
    /// This replica's name in the cluster [default: the host name].
    #[arg(long, env = "KAS_GATEWAY_REPLICA_ID", global = true)]
    pub replica_id: Option<String>,
    /// Seconds a replica's lease on its agents lasts without renewal, on PostgreSQL
    /// [default: 15, at least 6].
    #[arg(long, env = "KAS_GATEWAY_LEASE_TTL_SECONDS", global = true)]
    pub lease_ttl_seconds: Option<u64>,
    /// Listener of the private API other replicas forward calls to [default: none].
    #[arg(long, env = "KAS_GATEWAY_PRIVATE_API_LISTEN", global = true)]
    pub private_api_listen: Option<SocketAddr>,
    /// The URL other replicas reach this one's private API at [default: from the listener's
    /// address, when it is not a wildcard].
    #[arg(long, env = "KAS_GATEWAY_PRIVATE_API_URL", global = true)]
    pub private_api_url: Option<String>,
    /// The replicas' shared secret for the private API (base64 of 32 bytes).
    #[arg(long, env = "KAS_GATEWAY_PRIVATE_API_SECRET_FILE", global = true)]
    pub private_api_secret_file: Option<PathBuf>,
}

/// The TOML file's keys: the same names as the flags, with underscores.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    database_url_file: Option<PathBuf>,
    database_max_connections: Option<u32>,
    listen: Option<SocketAddr>,
    observability_listen: Option<SocketAddr>,
    external_url: Option<String>,
    bootstrap_token: Option<String>,
    bootstrap_token_file: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    encryption_keys: Option<String>,
    encryption_keys_file: Option<PathBuf>,
    receptive_agents: Option<bool>,
    gitlab_secret_file: Option<PathBuf>,
    gitlab_issuer: Option<String>,
    grpc_listen: Option<SocketAddr>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    dialer_heartbeat_seconds: Option<u64>,
    dialer_keepalive_seconds: Option<u64>,
    dialer_resync_seconds: Option<u64>,
    dialer_connect_timeout_seconds: Option<u64>,
    dialer_denied_networks: Option<String>,
    http_header_timeout_seconds: Option<u64>,
    http_body_timeout_seconds: Option<u64>,
    http_idle_timeout_seconds: Option<u64>,
    http_max_connections: Option<usize>,
    http2_max_concurrent_streams: Option<u32>,
    shutdown_drain_seconds: Option<u64>,
    shutdown_blackout_seconds: Option<u64>,
    replica_id: Option<String>,
    lease_ttl_seconds: Option<u64>,
    private_api_listen: Option<SocketAddr>,
    private_api_url: Option<String>,
    private_api_secret_file: Option<PathBuf>,
}

impl ConfigArgs {
    /// Resolves flags, environment and file into a configuration.
    pub fn resolve(self) -> anyhow::Result<Config> {
        check_environment(std::env::vars().map(|(k, _)| k))?;
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading configuration file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("in configuration file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database_url = secret_value(
            "database URL",
            self.database_url,
            self.database_url_file,
            file.database_url,
            file.database_url_file,
        )?
        .unwrap_or_else(|| Secret::new(default_database_url(&data_dir)));
        let bootstrap_token = secret_value(
            "bootstrap token",
            self.bootstrap_token,
            self.bootstrap_token_file,
            file.bootstrap_token,
            file.bootstrap_token_file,
        )?;
        let encryption_keys = secret_value(
            "encryption keys",
            self.encryption_keys,
            self.encryption_keys_file,
            file.encryption_keys,
            file.encryption_keys_file,
        )?;
        if let Some(token) = &bootstrap_token
            && token.expose().len() < MIN_BOOTSTRAP_TOKEN_LEN
        {
            bail!("the bootstrap token must be at least {MIN_BOOTSTRAP_TOKEN_LEN} characters long");
        }
        let external_url = self.external_url.or(file.external_url);
        if let Some(url) = &external_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("the external URL must start with http:// or https://");
        }
        Ok(Config {
            data_dir,
            database_url,
            database_max_connections: self
                .database_max_connections
                .or(file.database_max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            listen: self.listen.or(file.listen).unwrap_or_else(default_listen),
            observability_listen: self
                .observability_listen
                .or(file.observability_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8151))),
            external_url: external_url.map(|u| u.trim_end_matches('/').to_owned()),
            bootstrap_token,
            log_level: self
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            encryption_keys,
            receptive_agents: self
                .receptive_agents
                .or(file.receptive_agents)
                .unwrap_or(true),
            dialer: {
                let mut dialer = dialer_settings(
                    self.dialer_heartbeat_seconds
                        .or(file.dialer_heartbeat_seconds),
                    self.dialer_keepalive_seconds
                        .or(file.dialer_keepalive_seconds),
                    self.dialer_resync_seconds.or(file.dialer_resync_seconds),
                    self.dialer_connect_timeout_seconds
                        .or(file.dialer_connect_timeout_seconds),
                )?;
                if let Some(networks) = self.dialer_denied_networks.or(file.dialer_denied_networks)
                {
                    dialer.denied_networks = crate::dialer::parse_denied_networks(&networks)
                        .context("in the dialer's denied networks")?;
                }
                dialer
            },
            gitlab_secret: self
                .gitlab_secret_file
                .or(file.gitlab_secret_file)
                .map(|path| read_gitlab_secret(&path))
                .transpose()?,
            gitlab_issuer: match self.gitlab_issuer.or(file.gitlab_issuer) {
                Some(issuer) if issuer.is_empty() || issuer.chars().any(char::is_whitespace) => {
                    bail!("the GitLab issuer must be a host name, such as gitlab.example.com")
                }
                issuer => issuer,
            },
            grpc_listen: self.grpc_listen.or(file.grpc_listen),
            tls: match (
                self.tls_cert_file.or(file.tls_cert_file),
                self.tls_key_file.or(file.tls_key_file),
            ) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => bail!("give both the TLS certificate file and the TLS key file, or neither"),
            },
            replica_id: match self.replica_id.or(file.replica_id) {
                Some(id) if id.trim().is_empty() || id.chars().any(char::is_control) => {
                    bail!("the replica id must be a non-empty name")
                }
                Some(id) => id,
                None => crate::dialer::replica_name(),
            },
            lease_ttl: match self.lease_ttl_seconds.or(file.lease_ttl_seconds) {
                Some(seconds) if seconds < MIN_LEASE_TTL_SECS => bail!(
                    "the lease TTL must be at least {MIN_LEASE_TTL_SECS} seconds (replicas hang up 3 s before it ends)"
                ),
                Some(seconds) => std::time::Duration::from_secs(seconds),
                None => DEFAULT_LEASE_TTL,
            },
            private_api: private_api(
                self.private_api_listen.or(file.private_api_listen),
                self.private_api_url.or(file.private_api_url),
                self.private_api_secret_file
                    .or(file.private_api_secret_file),
            )?,
            limits: limits(&LimitArgs {
                header_timeout: self
                    .http_header_timeout_seconds
                    .or(file.http_header_timeout_seconds),
                body_timeout: self
                    .http_body_timeout_seconds
                    .or(file.http_body_timeout_seconds),
                idle_timeout: self
                    .http_idle_timeout_seconds
                    .or(file.http_idle_timeout_seconds),
                max_connections: self.http_max_connections.or(file.http_max_connections),
                max_concurrent_streams: self
                    .http2_max_concurrent_streams
                    .or(file.http2_max_concurrent_streams),
                drain: self.shutdown_drain_seconds.or(file.shutdown_drain_seconds),
                blackout: self
                    .shutdown_blackout_seconds
                    .or(file.shutdown_blackout_seconds),
            })?,
        })
    }
}

/// The listeners' limits as configured, before defaults.
#[derive(Debug, Default)]
struct LimitArgs {
    header_timeout: Option<u64>,
    body_timeout: Option<u64>,
    idle_timeout: Option<u64>,
    max_connections: Option<usize>,
    max_concurrent_streams: Option<u32>,
    drain: Option<u64>,
    blackout: Option<u64>,
}

/// The listeners' limits: the configured ones (every one at least 1), defaults for the rest.
fn limits(args: &LimitArgs) -> anyhow::Result<crate::listener::Limits> {
    use std::time::Duration;
    let mut limits = crate::listener::Limits::default();
    for (name, value, field) in [
        (
            "HTTP header timeout",
            args.header_timeout,
            &mut limits.header_timeout,
        ),
        (
            "HTTP body timeout",
            args.body_timeout,
            &mut limits.body_timeout,
        ),
        (
            "HTTP idle timeout",
            args.idle_timeout,
            &mut limits.idle_timeout,
        ),
        ("shutdown drain time", args.drain, &mut limits.drain_timeout),
    ] {
        match value {
            Some(0) => bail!("the {name} must be at least one second"),
            Some(seconds) => *field = Duration::from_secs(seconds),
            None => {}
        }
    }
    if let Some(seconds) = args.blackout {
        limits.shutdown_blackout = Duration::from_secs(seconds);
    }
    match args.max_connections {
        Some(0) => bail!("the maximum number of HTTP connections must be at least 1"),
        Some(n) => limits.max_connections = n,
        None => {}
    }
    match args.max_concurrent_streams {
        Some(0) => bail!("the maximum number of concurrent HTTP/2 streams must be at least 1"),
        Some(n) => limits.max_concurrent_streams = n,
        None => {}
    }
    Ok(limits)
}

/// The dialer's settings, with the configured intervals (seconds, at least 1).
fn dialer_settings(
    heartbeat: Option<u64>,
    keepalive: Option<u64>,
    resync: Option<u64>,
    connect_timeout: Option<u64>,
) -> anyhow::Result<crate::dialer::DialerSettings> {
    use std::time::Duration;
    let mut settings = crate::dialer::DialerSettings::default();
    for (name, value, field) in [
        ("heartbeat", heartbeat, &mut settings.heartbeat_interval),
        ("keepalive", keepalive, &mut settings.keepalive),
        ("resync", resync, &mut settings.resync_interval),
        (
            "connect timeout",
            connect_timeout,
            &mut settings.connect_timeout,
        ),
    ] {
        match value {
            Some(0) => bail!("the dialer {name} must be at least one second"),
            Some(seconds) => *field = Duration::from_secs(seconds),
            None => {}
        }
    }
    Ok(settings)
}

/// The private API's settings: a listener needs the secret; a URL or secret alone means
/// nothing.
fn private_api(
    listen: Option<SocketAddr>,
    url: Option<String>,
    secret_file: Option<PathBuf>,
) -> anyhow::Result<Option<PrivateApiConfig>> {
    let Some(listen) = listen else {
        if url.is_some() || secret_file.is_some() {
            bail!(
                "the private API's URL and secret file need its listener: set \
                 KAS_GATEWAY_PRIVATE_API_LISTEN too"
            );
        }
        return Ok(None);
    };
    let Some(secret_file) = secret_file else {
        bail!(
            "the private API needs the replicas' shared secret: set \
             KAS_GATEWAY_PRIVATE_API_SECRET_FILE (base64 of 32 bytes: \
             `head -c 32 /dev/urandom | base64`)"
        );
    };
    if let Some(url) = &url
        && !url.starts_with("http://")
    {
        bail!("the private API URL must start with http:// (such as http://10.0.0.7:8156)");
    }
    if url.is_none() && listen.ip().is_unspecified() {
        bail!(
            "the private API listens on every address ({listen}): set \
             KAS_GATEWAY_PRIVATE_API_URL to the address other replicas reach this one at"
        );
    }
    Ok(Some(PrivateApiConfig {
        listen,
        url: url.map(|u| u.trim_end_matches('/').to_owned()),
        secret: read_secret_file("private API secret", &secret_file)?,
    }))
}

/// Reads GitLab's KAS secret file: base64 of 32 random bytes.
pub fn read_gitlab_secret(path: &Path) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    read_secret_file("GitLab secret", path)
}

/// Reads a shared secret file: base64 of 32 random bytes.
fn read_secret_file(what: &str, path: &Path) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    use base64::Engine;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} file {}", path.display()))?,
    );
    let secret = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .with_context(|| format!("{} is not base64", path.display()))?,
    );
    if secret.len() != 32 {
        bail!("{} must hold base64 of 32 bytes", path.display());
    }
    Ok(secret)
}

/// A secret given directly or through a file, flags before the configuration file.
fn secret_value(
    what: &str,
    value: Option<String>,
    value_file: Option<PathBuf>,
    file_value: Option<String>,
    file_value_file: Option<PathBuf>,
) -> anyhow::Result<Option<Secret>> {
    if value.is_some() && value_file.is_some() {
        bail!("the {what} is given both directly and as a file: give one");
    }
    let from_file = |path: PathBuf| -> anyhow::Result<Secret> {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the {what} from {}", path.display()))?;
        Ok(Secret::new(text.trim_end_matches(['\n', '\r'])))
    };
    match (value, value_file, file_value, file_value_file) {
        (Some(v), _, _, _) => Ok(Some(Secret::new(v))),
        (None, Some(path), _, _) => from_file(path).map(Some),
        (None, None, Some(v), _) => Ok(Some(Secret::new(v))),
        (None, None, None, Some(path)) => from_file(path).map(Some),
        (None, None, None, None) => Ok(None),
    }
}

/// Refuses `KAS_GATEWAY_*` variables the gateway does not know (most likely typos).
fn check_environment(names: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let unknown: Vec<String> = names
        .filter(|name| name.starts_with("KAS_GATEWAY_") && !KNOWN_ENV.contains(&name.as_str()))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        bail!(
            "unknown environment variable(s): {} (known: {})",
            unknown.join(", "),
            KNOWN_ENV.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_api_settings() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "cHJpdmF0ZS1hcGktc2VjcmV0LWZvci10ZXN0cy0wMDA=").unwrap();
        let listen: SocketAddr = "127.0.0.1:8156".parse().unwrap();
        let wildcard: SocketAddr = "0.0.0.0:8156".parse().unwrap();
        let error = |r: anyhow::Result<Option<PrivateApiConfig>>| r.err().unwrap().to_string();
        assert!(private_api(None, None, None).unwrap().is_none());
        assert!(error(private_api(Some(listen), None, None)).contains("SECRET_FILE"));
        assert!(
            error(private_api(None, Some("http://a:1".into()), None))
                .contains("KAS_GATEWAY_PRIVATE_API_LISTEN")
        );
        assert!(
            error(private_api(Some(wildcard), None, Some(secret.clone())))
                .contains("KAS_GATEWAY_PRIVATE_API_URL")
        );
        assert!(
            error(private_api(
                Some(listen),
                Some("grpc://a:1".into()),
                Some(secret.clone())
            ))
            .contains("http://")
        );
        let config = private_api(
            Some(wildcard),
            Some("http://gw-0:8156/".into()),
            Some(secret),
        )
        .unwrap()
        .unwrap();
        assert_eq!(config.url.as_deref(), Some("http://gw-0:8156"));
        assert_eq!(config.secret.len(), 32);
        assert!(!format!("{config:?}").contains("cHJp"));
    }

    #[test]
    fn unknown_environment_is_refused() {
        let names = ["PATH".to_owned(), "KAS_GATEWAY_LISTN".to_owned()];
        let err = check_environment(names.into_iter())
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("KAS_GATEWAY_LISTN")));
        assert!(check_environment(["KAS_GATEWAY_LISTEN".to_owned()].into_iter()).is_ok());
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let parsed = toml::from_str::<FileConfig>("listen = \"127.0.0.1:1\"\nlisten_port = 3\n");
        assert!(parsed.is_err());
    }

    #[test]
    fn gitlab_issuer() {
        let file =
            toml::from_str::<FileConfig>("gitlab_issuer = \"gitlab.example.com\"\n").unwrap();
        assert_eq!(file.gitlab_issuer.as_deref(), Some("gitlab.example.com"));
        assert!(KNOWN_ENV.contains(&"KAS_GATEWAY_GITLAB_ISSUER"));
        let resolve = |issuer: &str| {
            ConfigArgs {
                data_dir: Some("/nonexistent".into()),
                gitlab_issuer: Some(issuer.into()),
                ..ConfigArgs::default()
            }
            .resolve()
        };
        assert!(resolve("").is_err());
        assert!(resolve("gitlab example").is_err());
    }

    #[test]
    fn dialer_intervals() {
        let settings = dialer_settings(Some(5), None, Some(60), None).unwrap();
        assert_eq!(
            settings.heartbeat_interval,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(settings.resync_interval, std::time::Duration::from_secs(60));
        assert_eq!(settings.keepalive, std::time::Duration::from_secs(55));
        assert!(dialer_settings(Some(0), None, None, None).is_err());
    }

    #[test]
    fn listener_limits() {
        let configured = limits(&LimitArgs {
            header_timeout: Some(2),
            max_concurrent_streams: Some(8),
            ..LimitArgs::default()
        })
        .unwrap();
        assert_eq!(configured.header_timeout, std::time::Duration::from_secs(2));
        assert_eq!(configured.max_concurrent_streams, 8);
        assert_eq!(
            configured.idle_timeout,
            crate::listener::Limits::default().idle_timeout
        );
        assert!(
            limits(&LimitArgs {
                drain: Some(0),
                ..LimitArgs::default()
            })
            .is_err()
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let mut config = Config::with_data_dir("/tmp/x");
        config.database_url = Secret::new("postgres://u:hunter2@db/x");
        config.bootstrap_token = Some(Secret::new("glpat-topsecret"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("topsecret"));
    }
}
