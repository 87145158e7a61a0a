//! Start-up and shutdown: data directory, store, migrations, bootstrap, listeners.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::{Config, database_kind};
use crate::crypto::keys::{KeySource, Secrets};
use crate::domain::{Service, Settings};
use crate::store::{self, SharedStore};
use crate::{listener, rest};

/// Name of the file, in the data directory, that receives a generated root token.
pub const ROOT_TOKEN_FILE: &str = "root-token";

/// Creates the data directory, opens the store and applies migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<SharedStore> {
    create_private_dir(&config.data_dir)?;
    let url = config.database_url.expose();
    let store = store::connect(url, config.database_max_connections)
        .await
        .with_context(|| format!("opening the {} database", database_kind(url)))?;
    store.migrate().await.context("applying migrations")?;
    tracing::info!(backend = store.backend(), "database ready");
    Ok(store)
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data directory is readable by other users; it holds the database and keys"
        );
    }
    Ok(())
}

/// Loads the encryption keys: the configured ones, or the key file in the data directory
/// (generated on first start, with a log line that says so).
pub fn load_secrets(config: &Config) -> anyhow::Result<Arc<Secrets>> {
    let (secrets, generated) = Secrets::load(config.encryption_keys.as_ref(), &config.data_dir)
        .context("loading the encryption keys")?;
    if let KeySource::File(path) = secrets.source() {
        if generated {
            tracing::warn!(
                file = %path.display(),
                "generated an encryption key file: back it up with the database, or configure KAS_GATEWAY_ENCRYPTION_KEYS"
            );
        } else {
            tracing::info!(file = %path.display(), "encryption keys read from the key file");
        }
    }
    Ok(Arc::new(secrets))
}

/// Opens the store and builds the domain service over it.
pub async fn open_service(
    config: &Config,
    clock: SharedClock,
) -> anyhow::Result<(SharedStore, Service)> {
    // The keys are checked before the database is touched: a mistake in them must not
    // leave migrations applied by a gateway that then refuses to start.
    if database_kind(config.database_url.expose()) == "postgres" && config.encryption_keys.is_none()
    {
        anyhow::bail!(
            "on PostgreSQL every replica must use the same encryption keys: set \
             KAS_GATEWAY_ENCRYPTION_KEYS (or KAS_GATEWAY_ENCRYPTION_KEYS_FILE) to the same value \
             on each of them (a key is 32 random bytes, base64: `head -c 32 /dev/urandom | base64`)"
        );
    }
    create_private_dir(&config.data_dir)?;
    let secrets = load_secrets(config)?;
    let store = open_store(config).await?;
    check_keys(store.as_ref(), &secrets, clock.now()).await?;
    let settings = Settings {
        receptive_agents: config.receptive_agents,
    };
    let service = Service::new(Arc::clone(&store), clock, secrets, settings)
        .with_denied_networks(config.dialer.denied_networks.clone());
    Ok((store, service))
}

/// Compares each encryption key's check value with the one the database recorded for its id
/// (recording it when the id is new): a gateway whose key differs from the others' for the
/// same id would seal secrets they cannot open, and fail to open theirs.
async fn check_keys(
    store: &dyn store::Store,
    secrets: &Secrets,
    now: crate::domain::Timestamp,
) -> anyhow::Result<()> {
    let ours = secrets.checks();
    let recorded = store
        .encryption_key_checks(&ours, now)
        .await
        .context("checking the encryption keys against the database")?;
    for ((id, check), (_, stored)) in ours.iter().zip(&recorded) {
        if check != stored {
            anyhow::bail!(
                "the encryption key with id {id:?} differs from the key this database has used \
                 with that id (its check value does not match): give this gateway the same \
                 KAS_GATEWAY_ENCRYPTION_KEYS as the others, or a new id for a new key"
            );
        }
    }
    Ok(())
}

/// Name of the lock file that keeps a second `serve` off a SQLite data directory.
pub const LOCK_FILE: &str = "kas-gateway.lock";

/// Takes the data directory's lock, held for as long as the returned file is open: SQLite
/// is one gateway's database, and a second `serve` on it would dial every agent again.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another kas-gateway is serving the data directory {} (it holds {}): stop it \
             first, or give this one its own --data-dir",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// On an empty database, creates `root` with the configured token, or with a random one
/// written to a mode-0600 file in the data directory (the log names the file, never the token).
pub async fn bootstrap(service: &Service, config: &Config) -> anyhow::Result<()> {
    let configured = config.bootstrap_token.clone();
    let from_config = configured.is_some();
    let Some(token) = service.bootstrap(configured).await? else {
        if from_config {
            tracing::info!("users exist already: the bootstrap token is not used");
        }
        return Ok(());
    };
    if from_config {
        tracing::info!("created the administrator root with the configured bootstrap token");
        return Ok(());
    }
    let path = config.data_dir.join(ROOT_TOKEN_FILE);
    write_private_file(&path, token.expose())?;
    tracing::info!(file = %path.display(), "created the administrator root; its token is in the file");
    Ok(())
}

fn write_private_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{contents}")?;
    file.sync_all()?;
    Ok(())
}

/// A running gateway.
#[derive(Debug)]
pub struct Server {
    /// The bound HTTP address (REST and gRPC).
    pub addr: SocketAddr,
    /// The bound gRPC-only address, if configured.
    pub grpc_addr: Option<SocketAddr>,
    /// The bound observability address (metrics, probes, status page).
    pub ops_addr: SocketAddr,
    /// The URL the gateway announces.
    pub external_url: String,
    /// The domain service the transports call.
    pub service: Service,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Waits until the server has shut down and the database is closed.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the server task failed")?
    }
}

/// Opens everything and starts serving. Once `requested` is cancelled: readiness turns 503 at
/// once; after the blackout time the listeners stop accepting and sessions are hung up; open
/// requests and streams get the drain time to finish; the database is closed.
pub async fn start(
    config: &Config,
    clock: SharedClock,
    requested: CancellationToken,
) -> anyhow::Result<Server> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = ?config,
        "starting kas-gateway"
    );
    // From the start: what happens while starting counts too.
    crate::metrics::handle();
    let lock = if database_kind(config.database_url.expose()) == "sqlite" {
        create_private_dir(&config.data_dir)?;
        Some(lock_data_dir(&config.data_dir)?)
    } else {
        None
    };
    let (store, service) = open_service(config, clock.clone()).await?;
    let registry = Arc::new(crate::dialer::state::Registry::new(
        config.replica_id.clone(),
    ));

    let shutdown = CancellationToken::new();
    {
        let (requested, shutdown) = (requested.clone(), shutdown.clone());
        let blackout = config.limits.shutdown_blackout;
        tokio::spawn(async move {
            requested.cancelled().await;
            if !blackout.is_zero() {
                tracing::info!(
                    blackout_seconds = blackout.as_secs(),
                    "readiness now fails; still serving until the blackout ends"
                );
                tokio::time::sleep(blackout).await;
            }
            shutdown.cancel();
        });
    }

    // The private API is bound first: the lease row says where it is.
    let private_api = match &config.private_api {
        None => None,
        Some(private) => {
            let listener = TcpListener::bind(private.listen)
                .await
                .with_context(|| format!("listening on {} (private API)", private.listen))?;
            let addr = listener.local_addr()?;
            let url = private
                .url
                .clone()
                .unwrap_or_else(|| format!("http://{addr}"));
            Some((listener, url))
        }
    };
    let membership = match store.leases() {
        Some(leases) if config.receptive_agents => {
            leases.follow(
                vec![
                    Arc::clone(service.rebalance()),
                    Arc::clone(service.changes()),
                ],
                shutdown.clone(),
            );
            crate::cluster::Membership::join(
                leases,
                crate::cluster::ClusterSettings {
                    replica_id: config.replica_id.clone(),
                    lease_ttl: config.lease_ttl,
                    private_api_url: private_api.as_ref().map(|(_, url)| url.clone()),
                },
                Arc::clone(&registry) as Arc<dyn crate::cluster::Dialling>,
                Arc::clone(service.rebalance()),
                shutdown.clone(),
            )
        }
        _ => crate::cluster::Membership::all(),
    };
    let sessions: Arc<dyn crate::domain::Sessions> = match store.connection_states() {
        Some(states) if config.receptive_agents => {
            crate::cluster::sessions::ClusterSessions::start(
                Arc::clone(&registry),
                states,
                membership.incarnation(),
                config.private_api.as_ref().map(|private| {
                    crate::cluster::private_api::Forwarder::new(
                        private.secret.expose().clone(),
                        clock.clone(),
                    )
                }),
                shutdown.clone(),
            )
        }
        _ => Arc::clone(&registry) as Arc<dyn crate::domain::Sessions>,
    };
    let service = service.with_sessions(sessions);
    bootstrap(&service, config).await?;

    let (tls, reloading) = match &config.tls {
        None => (None, None),
        Some((cert, key)) => {
            let reloading = crate::tls::ReloadingCert::new(cert.clone(), key.clone())
                .context("loading the listeners' TLS certificate")?;
            reloading.watch(Duration::from_secs(2), shutdown.child_token());
            (
                Some(crate::tls::server_config(Arc::clone(&reloading))?),
                Some(reloading),
            )
        }
    };
    reload_on_hangup(reloading, requested.clone());
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let external_url = config
        .external_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{addr}"));
    let app = rest::App {
        service: service.clone(),
        external_url: Arc::from(external_url.as_str()),
        shutdown: requested.clone(),
        k8s_proxy: Arc::new(rest::k8s_proxy::Proxy::new(config.k8s_proxy.clone())),
    };
    let grpc = crate::grpc::router(
        crate::grpc::Api::new(
            service.clone(),
            config.gitlab_secret.as_ref().map(|s| s.expose().clone()),
            config.gitlab_issuer.clone(),
            shutdown.clone(),
        ),
        requested.clone(),
    );
    let router = rest::finish(rest::routes(app).merge(grpc.clone()));
    let shared = listener::Shared::new(config.limits.clone());
    tracing::info!(%addr, %external_url, serves = "REST and gRPC", tls = tls.is_some(), "listening");
    let mut listeners = tokio::task::JoinSet::new();
    let grpc_addr = match config.grpc_listen {
        None => None,
        Some(grpc_listen) => {
            let grpc_listener = TcpListener::bind(grpc_listen)
                .await
                .with_context(|| format!("listening on {grpc_listen}"))?;
            let grpc_addr = grpc_listener.local_addr()?;
            tracing::info!(addr = %grpc_addr, serves = "gRPC", tls = tls.is_some(), "listening");
            listeners.spawn(listener::serve(
                grpc_listener,
                tls.clone(),
                rest::finish(grpc),
                shared.clone(),
                shutdown.clone(),
            ));
            Some(grpc_addr)
        }
    };
    listeners.spawn(listener::serve(
        listener,
        tls,
        router,
        shared.clone(),
        shutdown.clone(),
    ));
    if let (Some((listener, url)), Some(private)) = (private_api, &config.private_api) {
        // Logged after the public listener, which stays the first "listening" line.
        let addr = listener.local_addr()?;
        tracing::info!(%addr, %url, serves = "the private API between replicas", "listening");
        // Its own connection budget: the public listeners' clients cannot crowd it out.
        let limits = crate::listener::Limits {
            max_connections: PRIVATE_API_MAX_CONNECTIONS,
            // One connection carries every request relayed from a replica, watches included.
            max_concurrent_streams: PRIVATE_API_MAX_STREAMS,
            ..config.limits.clone()
        };
        listeners.spawn(listener::serve(
            listener,
            None,
            rest::finish(crate::cluster::private_api::router(
                Arc::clone(&registry),
                private.secret.expose().clone(),
                clock,
            )),
            listener::Shared::new(limits),
            shutdown.clone(),
        ));
    }
    let ops_listener = TcpListener::bind(config.observability_listen)
        .await
        .with_context(|| {
            format!(
                "listening on {} (observability)",
                config.observability_listen
            )
        })?;
    let ops_addr = ops_listener.local_addr()?;
    tracing::info!(addr = %ops_addr, serves = "metrics, probes and the status page", "listening");
    crate::metrics::run_upkeep(shutdown.clone());
    listeners.spawn(listener::serve(
        ops_listener,
        None,
        crate::ops::router(crate::ops::Ops {
            service: service.clone(),
            registry: Arc::clone(&registry),
            held: membership.held.clone(),
            shutdown: requested.clone(),
        }),
        listener::Shared::new(crate::listener::Limits {
            max_connections: crate::ops::MAX_CONNECTIONS,
            ..config.limits.clone()
        }),
        shutdown.clone(),
    ));
    let held = membership.held.clone();
    let dialer = config.receptive_agents.then(|| {
        crate::dialer::spawn(
            Arc::new(service.clone()) as Arc<dyn crate::dialer::Port>,
            registry,
            held,
            config.dialer.clone(),
            shutdown.child_token(),
        )
    });
    let drain = shared.limits().drain_timeout;
    let flushing = service.clone();
    let task = tokio::spawn(async move {
        while listeners.join_next().await.is_some() {}
        // Sessions are hung up before the database closes; neither may hold the exit up.
        if let Some(dialer) = dialer
            && tokio::time::timeout(drain, dialer).await.is_err()
        {
            tracing::warn!("the dialer did not stop within the drain time");
        }
        // Only now, with every session hung up, may another replica take the agents.
        membership.leave().await;
        if tokio::time::timeout(CLOSE_TIMEOUT, flushing.flush_token_uses())
            .await
            .is_err()
        {
            tracing::warn!("agent token uses could not be recorded before the shutdown");
        }
        if tokio::time::timeout(CLOSE_TIMEOUT, store.close())
            .await
            .is_err()
        {
            tracing::warn!("the database connections did not close in time");
        }
        tracing::info!("stopped");
        drop(lock);
        Ok(())
    });
    Ok(Server {
        addr,
        grpc_addr,
        ops_addr,
        external_url,
        service,
        task,
    })
}

/// Connections the private API accepts (from the other replicas).
const PRIVATE_API_MAX_CONNECTIONS: usize = 256;

/// Concurrent streams on one connection from another replica: each relayed request to an
/// agent's cluster is one for as long as it lasts (a watch for minutes).
const PRIVATE_API_MAX_STREAMS: u32 = 10_000;

/// How long closing the database's connections may take at exit.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Raises the soft limit on open files to the hard limit, as Go's runtime does: every agent
/// session and every client connection is a file descriptor, and the usual soft limit of 1,024
/// is far below what a gateway with thousands of agents needs.
pub fn raise_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
    }
}

/// On SIGHUP (which would otherwise end the process without a word): says so, and reads the
/// TLS files again, the one thing that can be reloaded; until `shutdown`.
fn reload_on_hangup(cert: Option<Arc<crate::tls::ReloadingCert>>, shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = hangups.recv() => if received.is_none() { return },
            }
            match &cert {
                Some(cert) => {
                    tracing::info!("SIGHUP: reading the TLS certificate and key again");
                    cert.refresh();
                }
                None => tracing::info!(
                    "SIGHUP: nothing to reload (no TLS files); restart to change the configuration"
                ),
            }
        }
    });
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        token.cancel();
        tracing::info!("shutting down: finishing in-flight requests");
    });
}
