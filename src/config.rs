//! Configuration: flags, then `KAS_GATEWAY_*` environment variables, then a TOML file,
//! then defaults. Any secret may be read from a file (`*_FILE`). Unknown keys are errors.
//!
//! Every setting is declared once, in the table of `settings!` below: its file key, flag,
//! environment variable, type, default and help. `packaging/kas-gateway.toml` shows them all.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::crypto::{Secret, SecretBytes};
use crate::dialer::DialerSettings;
use crate::listener::Limits;

/// Declares the settings, one row each:
///
/// ```text
/// name: Type [= "default"], "KAS_GATEWAY_NAME", "help";
/// ```
///
/// The name is the file key and, with dashes, the flag. A default is written as it would be
/// on the command line: the help shows it, and it is parsed like a flag's value. Attributes
/// before a row go to its flag, such as `hide_env_values` for secrets.
///
/// Generates `Settings`, one layer of settings, each optional (clap fills it from the flags
/// and the environment, serde from the file), and `Resolved`, two layers merged: each
/// setting from the upper layer, else from the lower, else its default.
macro_rules! settings {
    (@type $ty:ty) => { Option<$ty> };
    (@type $ty:ty = $default:literal) => { $ty };
    (@value $name:ident, $value:expr) => { $value };
    (@value $name:ident, $value:expr, $default:literal) => {
        match $value {
            Some(value) => value,
            None => parse_default(stringify!($name), $default)?,
        }
    };
    ($(
        $(#[$attr:meta])*
        $name:ident: $ty:ty $(= $default:literal)?, $env:literal, $help:literal;
    )*) => {
        /// One layer of settings: the flags and environment variables, or the file's keys.
        #[derive(Args, Deserialize, Clone, Debug, Default)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {$(
            #[doc = $help]
            $(#[$attr])*
            #[arg(long, env = $env, global = true,
                  help = concat!($help $(, " [default: ", $default, "]")?))]
            pub $name: Option<$ty>,
        )*}

        /// Every setting's value, the defaults filled in.
        struct Resolved {$(
            $name: settings!(@type $ty $(= $default)?),
        )*}

        impl Resolved {
            /// Each setting from `upper`, else from `lower`, else its default.
            fn merge(upper: Settings, lower: Settings) -> anyhow::Result<Self> {
                Ok(Self {$(
                    $name: settings!(@value $name, upper.$name.or(lower.$name) $(, $default)?),
                )*})
            }
        }
    };
}

settings! {
    // Listeners.
    listen: SocketAddr = "127.0.0.1:8080", "KAS_GATEWAY_LISTEN",
        "Address of the HTTP listener (REST and gRPC)";
    grpc_listen: SocketAddr, "KAS_GATEWAY_GRPC_LISTEN",
        "A separate gRPC-only listener [default: none; gRPC shares the HTTP listener]";
    external_url: String, "KAS_GATEWAY_EXTERNAL_URL",
        "Public URL of the gateway, for Link headers [default: http://<listen>]";
    tls_cert_file: PathBuf, "KAS_GATEWAY_TLS_CERT_FILE",
        "TLS certificate (PEM chain) for the listeners; with --tls-key-file";
    tls_key_file: PathBuf, "KAS_GATEWAY_TLS_KEY_FILE",
        "TLS private key (PEM) for the listeners";

    // Database.
    data_dir: PathBuf = "./data", "KAS_GATEWAY_DATA_DIR",
        "Data directory: the SQLite database, generated keys and the root token file";
    #[arg(hide_env_values = true)]
    database_url: Secret, "KAS_GATEWAY_DATABASE_URL",
        "Database URL (sqlite://… or postgres://…) [default: SQLite file in the data directory]";
    database_url_file: PathBuf, "KAS_GATEWAY_DATABASE_URL_FILE",
        "File holding the database URL";
    database_max_connections: u32 = "10", "KAS_GATEWAY_DATABASE_MAX_CONNECTIONS",
        "Database connection pool size";

    // Secrets.
    #[arg(hide_env_values = true)]
    bootstrap_token: Secret, "KAS_GATEWAY_BOOTSTRAP_TOKEN",
        "Token of the root user created on first start [default: random, written to the \
         data directory]";
    bootstrap_token_file: PathBuf, "KAS_GATEWAY_BOOTSTRAP_TOKEN_FILE",
        "File holding the bootstrap token";
    #[arg(hide_env_values = true)]
    encryption_keys: Secret, "KAS_GATEWAY_ENCRYPTION_KEYS",
        "Encryption keys for secrets at rest, `id=base64,...`, the first active [default: a \
         key file generated in the data directory]";
    encryption_keys_file: PathBuf, "KAS_GATEWAY_ENCRYPTION_KEYS_FILE",
        "File holding the encryption keys";
    gitlab_secret_file: PathBuf, "KAS_GATEWAY_GITLAB_SECRET_FILE",
        "GitLab's KAS secret file (base64 of 32 bytes): GitLab's gRPC calls are signed with it";
    gitlab_issuer: String, "KAS_GATEWAY_GITLAB_ISSUER",
        "The `iss` GitLab's JWTs must carry: its host name (GitLab's `gitlab.host`) \
         [default: any non-empty issuer]";

    // Receptive agents and the dialer.
    receptive_agents: bool = "true", "KAS_GATEWAY_RECEPTIVE_AGENTS",
        "Receptive agents (URL configurations) on or off";
    dialer_heartbeat_seconds: u64 = "15", "KAS_GATEWAY_DIALER_HEARTBEAT_SECONDS",
        "Seconds between the dialer's heartbeats on each session";
    dialer_keepalive_seconds: u64 = "55", "KAS_GATEWAY_DIALER_KEEPALIVE_SECONDS",
        "Seconds between HTTP/2 keepalive pings to agents";
    dialer_resync_seconds: u64 = "300", "KAS_GATEWAY_DIALER_RESYNC_SECONDS",
        "Seconds between full resynchronisations of the dialer with the store";
    dialer_connect_timeout_seconds: u64 = "10", "KAS_GATEWAY_DIALER_CONNECT_TIMEOUT_SECONDS",
        "Seconds for DNS, TCP and TLS when dialling an agent";
    dialer_denied_networks: String, "KAS_GATEWAY_DIALER_DENIED_NETWORKS",
        "Networks the dialer never connects to, comma-separated CIDRs; empty for none \
         [default: link-local, unspecified, multicast and broadcast addresses]";

    // HTTP limits and shutdown.
    http_header_timeout_seconds: u64 = "10", "KAS_GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS",
        "Seconds a client has to send a complete request head (and, on a new connection, to \
         finish its TLS handshake)";
    http_body_timeout_seconds: u64 = "30", "KAS_GATEWAY_HTTP_BODY_TIMEOUT_SECONDS",
        "Seconds a client has to send a request body";
    http_idle_timeout_seconds: u64 = "120", "KAS_GATEWAY_HTTP_IDLE_TIMEOUT_SECONDS",
        "Seconds after which a connection with no request in progress is closed";
    http_max_connections: usize = "4096", "KAS_GATEWAY_HTTP_MAX_CONNECTIONS",
        "Open client connections over all listeners";
    http2_max_concurrent_streams: u32 = "100", "KAS_GATEWAY_HTTP2_MAX_CONCURRENT_STREAMS",
        "Concurrent HTTP/2 streams (gRPC calls) per connection";
    shutdown_blackout_seconds: u64 = "0", "KAS_GATEWAY_SHUTDOWN_BLACKOUT_SECONDS",
        "Seconds between SIGTERM and closing the listeners, while readiness already answers 503";
    shutdown_drain_seconds: u64 = "20", "KAS_GATEWAY_SHUTDOWN_DRAIN_SECONDS",
        "Seconds that open requests and streams get to finish after SIGTERM";

    // Several replicas.
    replica_id: String, "KAS_GATEWAY_REPLICA_ID",
        "This replica's name in the cluster [default: the host name]";
    lease_ttl_seconds: u64 = "15", "KAS_GATEWAY_LEASE_TTL_SECONDS",
        "Seconds a replica's lease on its agents lasts without renewal, on PostgreSQL; at \
         least 6";
    private_api_listen: SocketAddr, "KAS_GATEWAY_PRIVATE_API_LISTEN",
        "Listener of the private API other replicas forward calls to [default: none]";
    private_api_url: String, "KAS_GATEWAY_PRIVATE_API_URL",
        "The URL other replicas reach this one's private API at [default: from the \
         listener's address, when it is not a wildcard]";
    private_api_secret_file: PathBuf, "KAS_GATEWAY_PRIVATE_API_SECRET_FILE",
        "The replicas' shared secret for the private API (base64 of 32 bytes)";

    // Logging.
    log_level: String = "info", "KAS_GATEWAY_LOG_LEVEL",
        "Log filter, such as `info` or `kas_gateway=debug`";
    log_format: LogFormat = "text", "KAS_GATEWAY_LOG_FORMAT",
        "Log format";

    // The Kubernetes API proxy.
    k8s_proxy_max_streams_per_agent: usize = "500",
        "KAS_GATEWAY_K8S_PROXY_MAX_STREAMS_PER_AGENT",
        "Requests open through one agent's session at once";
    k8s_proxy_max_requests_per_user: usize = "100",
        "KAS_GATEWAY_K8S_PROXY_MAX_REQUESTS_PER_USER",
        "Requests one GitLab user may have open through this replica at once";
    k8s_proxy_max_body_bytes: u64 = "16777216", "KAS_GATEWAY_K8S_PROXY_MAX_BODY_BYTES",
        "Largest request body passed on to an agent's cluster, in bytes";
    k8s_proxy_idle_timeout_seconds: u64 = "900", "KAS_GATEWAY_K8S_PROXY_IDLE_TIMEOUT_SECONDS",
        "Seconds a proxied response may go without a byte (a quiet watch) before it is ended";
    k8s_proxy_timeout_seconds: u64 = "3600", "KAS_GATEWAY_K8S_PROXY_TIMEOUT_SECONDS",
        "Seconds a proxied request may last in all (a long watch)";

    // Observability.
    observability_listen: SocketAddr = "127.0.0.1:8151", "KAS_GATEWAY_OBSERVABILITY_LISTEN",
        "Listener of the observability endpoints: Prometheus /metrics, /liveness, /readiness \
         and the status page; never the API";
}

/// Configuration flags shared by `serve`, `migrate` and `admin`.
#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// TOML configuration file, keys named like the flags with underscores.
    #[arg(long, env = "KAS_GATEWAY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Every other setting.
    #[command(flatten)]
    pub settings: Settings,
}

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

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        <Self as ValueEnum>::from_str(text, false)
    }
}

/// The resolved configuration of a running gateway.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the SQLite database, generated keys and the bootstrap token file live.
    pub data_dir: PathBuf,
    /// `sqlite:` or `postgres:` URL.
    pub database_url: DatabaseUrl,
    /// Connection pool size.
    pub database_max_connections: u32,
    /// Address of the HTTP listener.
    pub listen: SocketAddr,
    /// Address of the observability listener (metrics, liveness, readiness, status page).
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
    pub dialer: DialerSettings,
    /// The shared secret GitLab signs gRPC calls with (the decoded 32 bytes).
    pub gitlab_secret: Option<SecretBytes>,
    /// The `iss` GitLab's JWTs must carry; `None`: any non-empty one (GitLab sends its host name).
    pub gitlab_issuer: Option<String>,
    /// A separate listener for gRPC only (gRPC is always served on `listen` too).
    pub grpc_listen: Option<SocketAddr>,
    /// TLS certificate and key files for the listeners (read again when they change).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Connection, stream and time limits of the listeners, and the shutdown drain time.
    pub limits: Limits,
    /// This replica's name in the cluster, in logs and in connection states.
    pub replica_id: String,
    /// How long a replica's lease lasts without renewal (PostgreSQL).
    pub lease_ttl: Duration,
    /// The replicas' private API: where it listens, the URL the others reach it at, and the
    /// shared secret its calls are signed with.
    pub private_api: Option<PrivateApiConfig>,
    /// The Kubernetes API proxy's limits.
    pub k8s_proxy: ProxyLimits,
}

/// The Kubernetes API proxy's limits (the streams per agent are the dialer's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyLimits {
    /// Requests one user may have open through this replica at once.
    pub max_requests_per_user: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// A response with no byte for this long is ended.
    pub idle_timeout: Duration,
    /// A request lasting this long in all is ended.
    pub timeout: Duration,
}

/// The private API between replicas.
#[derive(Clone, Debug)]
pub struct PrivateApiConfig {
    /// Listener address.
    pub listen: SocketAddr,
    /// The URL other replicas call; from the bound address when unset.
    pub url: Option<String>,
    /// The shared secret (the decoded 32 bytes).
    pub secret: SecretBytes,
}

/// A database URL. It may hold a password, so its `Debug` shows only the backend.
#[derive(Clone)]
pub struct DatabaseUrl(Secret);

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(Secret::new(url))
    }

    /// The URL itself, for connecting.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(database_kind(self.expose()))
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

/// The lease must outlast the safety margin by a few seconds.
const MIN_LEASE_TTL_SECS: u64 = 6;
/// A configured root token must be at least this long: it is stored as a fast digest.
const MIN_BOOTSTRAP_TOKEN_LEN: usize = 20;

impl ConfigArgs {
    /// Resolves flags, environment and file into a configuration.
    pub fn resolve(self) -> anyhow::Result<Config> {
        check_environment(
            std::env::vars_os().map(|(name, _)| name.to_string_lossy().into_owned()),
        )?;
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => Settings::default(),
        };
        Config::from_layers(self.settings, file)
    }
}

impl Config {
    /// The defaults, with `data_dir`, for gateways run inside tests. The observability
    /// listener takes a port of the system's choosing (`127.0.0.1:0`) rather than its
    /// default, so that tests running together never collide.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let given = Settings {
            data_dir: Some(data_dir.into()),
            ..Settings::default()
        };
        let mut config = Self::from_layers(given, Settings::default())?;
        config.observability_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        Ok(config)
    }

    /// The configuration from two layers of settings, `upper` before `lower`, then the
    /// defaults; every value checked.
    pub fn from_layers(upper: Settings, mut lower: Settings) -> anyhow::Result<Self> {
        // A secret comes whole from one layer: given above, directly or as a file, it hides
        // both forms below.
        if upper.database_url.is_some() || upper.database_url_file.is_some() {
            (lower.database_url, lower.database_url_file) = (None, None);
        }
        if upper.bootstrap_token.is_some() || upper.bootstrap_token_file.is_some() {
            (lower.bootstrap_token, lower.bootstrap_token_file) = (None, None);
        }
        if upper.encryption_keys.is_some() || upper.encryption_keys_file.is_some() {
            (lower.encryption_keys, lower.encryption_keys_file) = (None, None);
        }
        let settings = Resolved::merge(upper, lower)?;
        let dialer = dialer_settings(&settings)?;
        let limits = limits(&settings)?;
        let database_url = secret_value(
            "database URL",
            settings.database_url,
            settings.database_url_file,
        )?
        .unwrap_or_else(|| Secret::new(default_database_url(&settings.data_dir)));
        let bootstrap_token = secret_value(
            "bootstrap token",
            settings.bootstrap_token,
            settings.bootstrap_token_file,
        )?;
        if let Some(token) = &bootstrap_token
            && token.expose().len() < MIN_BOOTSTRAP_TOKEN_LEN
        {
            bail!("the bootstrap token must be at least {MIN_BOOTSTRAP_TOKEN_LEN} characters long");
        }
        if let Some(url) = &settings.external_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("the external URL must start with http:// or https://");
        }
        Ok(Config {
            data_dir: settings.data_dir,
            database_url: DatabaseUrl(database_url),
            database_max_connections: settings.database_max_connections,
            listen: settings.listen,
            observability_listen: settings.observability_listen,
            external_url: settings
                .external_url
                .map(|u| u.trim_end_matches('/').to_owned()),
            bootstrap_token,
            log_level: settings.log_level,
            log_format: settings.log_format,
            encryption_keys: secret_value(
                "encryption keys",
                settings.encryption_keys,
                settings.encryption_keys_file,
            )?,
            receptive_agents: settings.receptive_agents,
            dialer,
            gitlab_secret: settings
                .gitlab_secret_file
                .map(|path| read_gitlab_secret(&path))
                .transpose()?,
            gitlab_issuer: match settings.gitlab_issuer {
                Some(issuer) if issuer.is_empty() || issuer.chars().any(char::is_whitespace) => {
                    bail!("the GitLab issuer must be a host name, such as gitlab.example.com")
                }
                issuer => issuer,
            },
            grpc_listen: settings.grpc_listen,
            tls: match (settings.tls_cert_file, settings.tls_key_file) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => bail!("give both the TLS certificate file and the TLS key file, or neither"),
            },
            limits,
            replica_id: match settings.replica_id {
                Some(id) if id.trim().is_empty() || id.chars().any(char::is_control) => {
                    bail!("the replica id must be a non-empty name")
                }
                Some(id) => id,
                None => crate::dialer::replica_name(),
            },
            lease_ttl: match settings.lease_ttl_seconds {
                seconds if seconds < MIN_LEASE_TTL_SECS => bail!(
                    "the lease TTL must be at least {MIN_LEASE_TTL_SECS} seconds (replicas hang up 3 s before it ends)"
                ),
                seconds => Duration::from_secs(seconds),
            },
            private_api: private_api(
                settings.private_api_listen,
                settings.private_api_url,
                settings.private_api_secret_file,
            )?,
            k8s_proxy: ProxyLimits {
                max_requests_per_user: at_least_one(
                    "Kubernetes proxy's requests per user",
                    settings.k8s_proxy_max_requests_per_user,
                )?,
                max_body_bytes: settings.k8s_proxy_max_body_bytes,
                idle_timeout: seconds(
                    "Kubernetes proxy's idle timeout",
                    settings.k8s_proxy_idle_timeout_seconds,
                )?,
                timeout: seconds(
                    "Kubernetes proxy's timeout",
                    settings.k8s_proxy_timeout_seconds,
                )?,
            },
        })
    }
}

fn default_database_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("kas-gateway.db").display())
}

/// A declared default, parsed like a flag's value.
fn parse_default<T: std::str::FromStr>(name: &str, text: &str) -> anyhow::Result<T>
where
    T::Err: fmt::Display,
{
    text.parse()
        .map_err(|error| anyhow!("the default of {name}, {text:?}, does not parse: {error}"))
}

/// Every environment variable the gateway reads, as its flags declare them.
pub fn environment_variables() -> Vec<String> {
    ConfigArgs::augment_args(clap::Command::new("kas-gateway"))
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .collect()
}

/// Every key of the configuration file.
pub fn file_keys() -> Vec<String> {
    Settings::augment_args(clap::Command::new("kas-gateway"))
        .get_arguments()
        .map(|arg| arg.get_id().to_string())
        .collect()
}

/// Reads a configuration file.
pub fn read_file(path: &Path) -> anyhow::Result<Settings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration file {}", path.display()))?;
    parse_file(&text).with_context(|| format!("in configuration file {}", path.display()))
}

/// Parses a configuration file's text; unknown keys are errors. A mistake is told by its line
/// number, never quoted, as the line may hold a secret.
pub fn parse_file(text: &str) -> anyhow::Result<Settings> {
    toml::from_str(text).map_err(|error| {
        let message = error.message().trim().replace('\n', "; ");
        match error.span() {
            Some(span) => {
                let line = 1 + text
                    .bytes()
                    .take(span.start)
                    .filter(|&b| b == b'\n')
                    .count();
                anyhow!("line {line}: {message}")
            }
            None => anyhow!("{message}"),
        }
    })
}

/// The dialer's settings, with the configured intervals (seconds, at least 1).
fn dialer_settings(settings: &Resolved) -> anyhow::Result<DialerSettings> {
    let mut dialer = DialerSettings {
        heartbeat_interval: seconds("dialer heartbeat", settings.dialer_heartbeat_seconds)?,
        keepalive: seconds("dialer keepalive", settings.dialer_keepalive_seconds)?,
        resync_interval: seconds("dialer resync", settings.dialer_resync_seconds)?,
        connect_timeout: seconds(
            "dialer connect timeout",
            settings.dialer_connect_timeout_seconds,
        )?,
        max_tunnel_streams: at_least_one(
            "Kubernetes proxy's streams per agent",
            settings.k8s_proxy_max_streams_per_agent,
        )?,
        ..DialerSettings::default()
    };
    if let Some(networks) = &settings.dialer_denied_networks {
        dialer.denied_networks = crate::dialer::parse_denied_networks(networks)
            .context("in the dialer's denied networks")?;
    }
    Ok(dialer)
}

/// The listeners' limits: every count and time at least 1, but the blackout.
fn limits(settings: &Resolved) -> anyhow::Result<Limits> {
    if settings.http_max_connections == 0 {
        bail!("the maximum number of HTTP connections must be at least 1");
    }
    if settings.http2_max_concurrent_streams == 0 {
        bail!("the maximum number of concurrent HTTP/2 streams must be at least 1");
    }
    Ok(Limits {
        header_timeout: seconds("HTTP header timeout", settings.http_header_timeout_seconds)?,
        body_timeout: seconds("HTTP body timeout", settings.http_body_timeout_seconds)?,
        idle_timeout: seconds("HTTP idle timeout", settings.http_idle_timeout_seconds)?,
        max_connections: settings.http_max_connections,
        max_concurrent_streams: settings.http2_max_concurrent_streams,
        drain_timeout: seconds("shutdown drain time", settings.shutdown_drain_seconds)?,
        shutdown_blackout: Duration::from_secs(settings.shutdown_blackout_seconds),
    })
}

/// A count, at least one.
fn at_least_one(name: &str, count: usize) -> anyhow::Result<usize> {
    if count == 0 {
        bail!("the {name} must be at least 1");
    }
    Ok(count)
}

/// A time in whole seconds, at least one.
fn seconds(name: &str, seconds: u64) -> anyhow::Result<Duration> {
    if seconds == 0 {
        bail!("the {name} must be at least one second");
    }
    Ok(Duration::from_secs(seconds))
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
pub fn read_gitlab_secret(path: &Path) -> anyhow::Result<SecretBytes> {
    read_secret_file("GitLab secret", path)
}

/// Reads a shared secret file: base64 of 32 random bytes.
fn read_secret_file(what: &str, path: &Path) -> anyhow::Result<SecretBytes> {
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
    Ok(SecretBytes::new(secret))
}

/// A secret given directly or through a file (`*_FILE`), not both.
fn secret_value(
    what: &str,
    value: Option<Secret>,
    file: Option<PathBuf>,
) -> anyhow::Result<Option<Secret>> {
    match (value, file) {
        (Some(_), Some(_)) => bail!("the {what} is given both directly and as a file: give one"),
        (Some(value), None) => Ok(Some(value)),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the {what} from {}", path.display()))?;
            Ok(Some(Secret::new(text.trim_end_matches(['\n', '\r']))))
        }
        (None, None) => Ok(None),
    }
}

/// Refuses `KAS_GATEWAY_*` variables the gateway does not know (most likely typos).
fn check_environment(names: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let known = environment_variables();
    let unknown: Vec<String> = names
        .filter(|name| name.starts_with("KAS_GATEWAY_") && !known.contains(name))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        bail!(
            "unknown environment variable(s): {} (known: {})",
            unknown.join(", "),
            known.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `settings` as the flags and variables, `file` as the configuration file.
    fn resolve(given: Settings, file: &str) -> anyhow::Result<Config> {
        Config::from_layers(given, parse_file(file)?)
    }

    fn error(result: anyhow::Result<Config>) -> String {
        format!("{:#}", result.expect_err("an error"))
    }

    #[test]
    fn flags_then_file_then_defaults() {
        let given = Settings {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ..Settings::default()
        };
        let file =
            "listen = \"127.0.0.1:2\"\ngrpc_listen = \"127.0.0.1:3\"\nlog_format = \"json\"\n";
        let config = resolve(given, file).unwrap();
        assert_eq!(config.listen.port(), 1);
        assert_eq!(config.grpc_listen.map(|a| a.port()), Some(3));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.database_max_connections, 10);
        assert_eq!(config.observability_listen.to_string(), "127.0.0.1:8151");
        assert_eq!(
            config.database_url.expose(),
            "sqlite://./data/kas-gateway.db"
        );
    }

    #[test]
    fn the_declared_defaults_are_the_modules_defaults() {
        // Every declared default parses, or this would fail.
        let config = Config::with_data_dir("/nonexistent").unwrap();
        let dialer = DialerSettings::default();
        assert_eq!(config.dialer.heartbeat_interval, dialer.heartbeat_interval);
        assert_eq!(config.dialer.keepalive, dialer.keepalive);
        assert_eq!(config.dialer.resync_interval, dialer.resync_interval);
        assert_eq!(config.dialer.connect_timeout, dialer.connect_timeout);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.lease_ttl, Duration::from_secs(15));
        assert_eq!(config.observability_listen.to_string(), "127.0.0.1:0");
    }

    #[test]
    fn a_secret_comes_whole_from_one_layer() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "glpat-from-a-file-0000000000000\n").unwrap();
        let file = "bootstrap_token = \"glpat-from-the-config-file-0000\"\n";
        // A file given as a flag hides the value in the configuration file.
        let given = Settings {
            bootstrap_token_file: Some(token_file.clone()),
            ..Settings::default()
        };
        let config = resolve(given, file).unwrap();
        assert_eq!(
            config.bootstrap_token.unwrap().expose(),
            "glpat-from-a-file-0000000000000"
        );
        let config = resolve(Settings::default(), file).unwrap();
        assert_eq!(
            config.bootstrap_token.unwrap().expose(),
            "glpat-from-the-config-file-0000"
        );
        let both = Settings {
            bootstrap_token: Some(Secret::new("glpat-given-directly-000000000")),
            bootstrap_token_file: Some(token_file),
            ..Settings::default()
        };
        assert!(error(resolve(both, "")).contains("both directly and as a file"));
        assert!(
            error(resolve(Settings::default(), "bootstrap_token = \"short\""))
                .contains("at least 20")
        );
    }

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
        assert_eq!(config.secret.expose().len(), 32);
        assert!(!format!("{config:?}").contains("cHJp"));
    }

    #[test]
    fn unknown_environment_is_refused() {
        let names = ["PATH".to_owned(), "KAS_GATEWAY_LISTN".to_owned()];
        let err = check_environment(names.into_iter())
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("KAS_GATEWAY_LISTN")));
        for known in [
            "KAS_GATEWAY_LISTEN",
            "KAS_GATEWAY_CONFIG",
            "KAS_GATEWAY_DATABASE_URL_FILE",
            "KAS_GATEWAY_OBSERVABILITY_LISTEN",
        ] {
            assert!(check_environment([known.to_owned()].into_iter()).is_ok());
        }
    }

    #[test]
    fn file_mistakes_name_the_line_not_the_value() {
        let unknown = parse_file("listen = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap_err();
        assert!(format!("{unknown:#}").contains("line 2"), "{unknown:#}");
        assert!(
            format!("{unknown:#}").contains("listen_port"),
            "{unknown:#}"
        );
        let unquoted = parse_file("bootstrap_token = glpat-secret-value-0000000\n").unwrap_err();
        let shown = format!("{unquoted:#}");
        assert!(shown.contains("line 1"), "{shown}");
        assert!(!shown.contains("secret-value"), "{shown}");
        assert!(!shown.contains('\n'), "{shown}");
    }

    #[test]
    fn gitlab_issuer() {
        let config = resolve(
            Settings::default(),
            "gitlab_issuer = \"gitlab.example.com\"\n",
        );
        assert_eq!(
            config.unwrap().gitlab_issuer.as_deref(),
            Some("gitlab.example.com")
        );
        let resolve = |issuer: &str| {
            let given = Settings {
                gitlab_issuer: Some(issuer.into()),
                ..Settings::default()
            };
            resolve(given, "")
        };
        assert!(error(resolve("")).contains("host name"));
        assert!(error(resolve("gitlab example")).contains("host name"));
    }

    #[test]
    fn dialer_intervals() {
        let file = "dialer_heartbeat_seconds = 5\ndialer_resync_seconds = 60\n";
        let settings = resolve(Settings::default(), file).unwrap().dialer;
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(settings.resync_interval, Duration::from_secs(60));
        assert_eq!(settings.keepalive, Duration::from_secs(55));
        assert_eq!(
            error(resolve(Settings::default(), "dialer_heartbeat_seconds = 0")),
            "the dialer heartbeat must be at least one second"
        );
    }

    #[test]
    fn listener_limits() {
        let file = "http_header_timeout_seconds = 2\nhttp2_max_concurrent_streams = 8\n";
        let limits = resolve(Settings::default(), file).unwrap().limits;
        assert_eq!(limits.header_timeout, Duration::from_secs(2));
        assert_eq!(limits.max_concurrent_streams, 8);
        assert_eq!(limits.idle_timeout, Limits::default().idle_timeout);
        assert_eq!(
            error(resolve(Settings::default(), "shutdown_drain_seconds = 0")),
            "the shutdown drain time must be at least one second"
        );
        assert!(
            error(resolve(Settings::default(), "http_max_connections = 0")).contains("at least 1")
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "cHJpdmF0ZS1hcGktc2VjcmV0LWZvci10ZXN0cy0wMDA=").unwrap();
        let given = Settings {
            database_url: Some(Secret::new("postgres://u:hunter2@db/x")),
            bootstrap_token: Some(Secret::new("glpat-topsecret-000000000000")),
            encryption_keys: Some(Secret::new("k1=c2VjcmV0LWtleQ==")),
            gitlab_secret_file: Some(secret),
            ..Settings::default()
        };
        let shown = format!("{given:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("topsecret"),
            "{shown}"
        );
        let config = resolve(given, "").unwrap();
        let shown = format!("{config:?}");
        assert!(shown.contains("database_url: postgres"), "{shown}");
        for secret in ["hunter2", "topsecret", "c2VjcmV0", "cHJp", "[112, "] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn help_hides_secret_values_and_shows_defaults() {
        let mut command = ConfigArgs::augment_args(clap::Command::new("kas-gateway"));
        let help = command.render_help().to_string();
        assert!(help.contains("[default: 127.0.0.1:8151]"), "{help}");
        for arg in command.get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let secret = ["DATABASE_URL", "BOOTSTRAP_TOKEN", "ENCRYPTION_KEYS"]
                .iter()
                .any(|name| env.to_string_lossy().ends_with(name));
            assert_eq!(arg.is_hide_env_values_set(), secret, "{env:?}");
        }
    }
}
