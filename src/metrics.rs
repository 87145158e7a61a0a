//! Prometheus metrics: every name, label and help text in one place, the process-wide
//! recorder, and the rendering `/metrics` serves.
//!
//! Labels have few values by construction: route templates (never paths), gRPC methods the
//! gateway serves (anything else is `unknown`), status codes, states and causes from closed
//! lists. No id ever becomes a label.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// HTTP requests, by `method`, `route` (template) and `status`.
pub const HTTP_REQUESTS: &str = "kas_gateway_http_requests_total";
/// HTTP request latency, by `method`, `route` and `status`.
pub const HTTP_DURATION: &str = "kas_gateway_http_request_duration_seconds";
/// gRPC calls finished, by `grpc_service`, `grpc_method` and `grpc_code`.
pub const GRPC_HANDLED: &str = "kas_gateway_grpc_server_handled_total";
/// gRPC call latency (to the end of the response), by `grpc_service`, `grpc_method`, `grpc_code`.
pub const GRPC_DURATION: &str = "kas_gateway_grpc_server_handling_seconds";
/// Agents this replica dials, by `state`.
pub const SESSIONS: &str = "kas_gateway_agent_sessions";
/// Dial attempts started.
pub const DIAL_ATTEMPTS: &str = "kas_gateway_dial_attempts_total";
/// Sessions accepted (the agent's hello and token checked).
pub const SESSIONS_ESTABLISHED: &str = "kas_gateway_sessions_established_total";
/// Attempts that failed and sessions that ended against the gateway's will, by `cause`.
pub const DIAL_FAILURES: &str = "kas_gateway_dial_failures_total";
/// TCP, TLS and HTTP/2 set-up of a dial.
pub const HANDSHAKE_DURATION: &str = "kas_gateway_dial_handshake_duration_seconds";
/// From the session call to the agent's hello.
pub const HELLO_DURATION: &str = "kas_gateway_session_hello_duration_seconds";
/// From a heartbeat ping to its pong.
pub const HEARTBEAT_ROUND_TRIP: &str = "kas_gateway_heartbeat_round_trip_seconds";
/// Agents this replica holds the lease of (PostgreSQL).
pub const AGENTS_HELD: &str = "kas_gateway_cluster_agents_held";
/// Agents taken over from a replica whose lease had expired.
pub const TAKEOVERS: &str = "kas_gateway_cluster_takeovers_total";
/// Times this replica found its own lease expired and rejoined.
pub const LEASES_LOST: &str = "kas_gateway_cluster_leases_lost_total";
/// Database connections, by `state` (`in_use`, `idle`).
pub const DB_CONNECTIONS: &str = "kas_gateway_database_connections";
/// The pool's maximum number of connections.
pub const DB_CONNECTIONS_MAX: &str = "kas_gateway_database_connections_max";
/// Time spent waiting for a database connection from the pool.
pub const DB_WAIT: &str = "kas_gateway_database_acquire_wait_seconds";
/// Requests through the Kubernetes API proxy, by `method` and `code` (HTTP status).
pub const K8S_PROXY_REQUESTS: &str = "kas_gateway_k8s_proxy_requests_total";
/// Proxied requests' durations, to the end of the response.
pub const K8S_PROXY_DURATION: &str = "kas_gateway_k8s_proxy_request_duration_seconds";
/// Body bytes through the proxy, by `direction` (`sent` to agents, `received` from them).
pub const K8S_PROXY_BYTES: &str = "kas_gateway_k8s_proxy_body_bytes_total";
/// 1, labelled with the `version` and `commit` built.
pub const BUILD_INFO: &str = "kas_gateway_build_info";

/// The commit this binary was built from (`unknown` without git at build time).
pub const COMMIT: &str = env!("KAS_GATEWAY_COMMIT");

/// Latency buckets (seconds) of every histogram: a millisecond to half a minute.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why an attempt failed or a session ended, as a metric label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cause {
    /// The host name did not resolve.
    Dns,
    /// The agent's address refused the connection.
    Refused,
    /// A step did not finish in time (connect, HTTP/2, session call, hello).
    Timeout,
    /// The address is in the denied networks.
    Denied,
    /// The agent's certificate is not valid for the name dialled.
    TlsName,
    /// The agent's certificate is signed by a CA the configuration does not trust.
    UnknownCa,
    /// The agent rejected the gateway's client certificate.
    ClientCertificate,
    /// Any other TLS failure.
    Tls,
    /// The agent rejected the gateway's JWT.
    Jwt,
    /// The agent's token was refused.
    AgentToken,
    /// The agent stopped answering heartbeats.
    Heartbeat,
    /// The agent broke the session protocol, or HTTP/2 failed.
    Protocol,
    /// The agent closed the session.
    Closed,
    /// The configuration cannot be used (credentials, URL).
    Configuration,
    /// The database was unavailable.
    Database,
    /// Anything else.
    #[default]
    Other,
}

impl Cause {
    /// Every cause, to start each counter at zero.
    pub const ALL: [Self; 16] = [
        Self::Dns,
        Self::Refused,
        Self::Timeout,
        Self::Denied,
        Self::TlsName,
        Self::UnknownCa,
        Self::ClientCertificate,
        Self::Tls,
        Self::Jwt,
        Self::AgentToken,
        Self::Heartbeat,
        Self::Protocol,
        Self::Closed,
        Self::Configuration,
        Self::Database,
        Self::Other,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Dns => "dns",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Denied => "denied",
            Self::TlsName => "tls_name",
            Self::UnknownCa => "unknown_ca",
            Self::ClientCertificate => "client_certificate",
            Self::Tls => "tls",
            Self::Jwt => "jwt",
            Self::AgentToken => "agent_token",
            Self::Heartbeat => "heartbeat",
            Self::Protocol => "protocol",
            Self::Closed => "closed",
            Self::Configuration => "configuration",
            Self::Database => "database",
            Self::Other => "other",
        }
    }
}

/// The session states, as labels of [`SESSIONS`].
pub const STATES: [crate::domain::Phase; 4] = [
    crate::domain::Phase::Connecting,
    crate::domain::Phase::Connected,
    crate::domain::Phase::BackingOff,
    crate::domain::Phase::Failed,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use (and kept: several gateways in one test
/// process share it). `None` when another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Some(handle);
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map(PrometheusBuilder::build_recorder);
    let recorder = match recorder {
        Ok(recorder) => recorder,
        Err(error) => {
            tracing::error!(%error, "metrics are not recorded");
            return None;
        }
    };
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        return HANDLE.get();
    }
    let handle = HANDLE.get_or_init(|| handle);
    describe();
    Some(handle)
}

/// Help texts, units, the build info, and every closed label set at zero: a counter that
/// exists from the start gives `rate()` its first sample.
fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by method, route template and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request latency by method, route template and status"
    );
    describe_counter!(
        GRPC_HANDLED,
        "gRPC calls finished, by service, method and gRPC status code"
    );
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "gRPC call latency to the end of the response, by service, method and code"
    );
    describe_gauge!(SESSIONS, "Agents this replica dials, by session state");
    describe_counter!(DIAL_ATTEMPTS, "Dial attempts started");
    describe_counter!(
        SESSIONS_ESTABLISHED,
        "Sessions accepted (hello received, agent token valid)"
    );
    describe_counter!(
        DIAL_FAILURES,
        "Failed attempts and sessions ended against the gateway's will, by cause"
    );
    describe_histogram!(
        HANDSHAKE_DURATION,
        Unit::Seconds,
        "TCP, TLS and HTTP/2 set-up of a dial"
    );
    describe_histogram!(
        HELLO_DURATION,
        Unit::Seconds,
        "From the session call to the agent's hello"
    );
    describe_histogram!(
        HEARTBEAT_ROUND_TRIP,
        Unit::Seconds,
        "Heartbeat round trip through a session"
    );
    describe_gauge!(
        AGENTS_HELD,
        "Agents whose lease this replica holds (PostgreSQL)"
    );
    describe_counter!(
        TAKEOVERS,
        "Agents taken over from a replica whose lease had expired"
    );
    describe_counter!(
        LEASES_LOST,
        "Times this replica found its lease expired and rejoined"
    );
    describe_gauge!(DB_CONNECTIONS, "Database connections by state");
    describe_gauge!(DB_CONNECTIONS_MAX, "Database connection pool size");
    describe_histogram!(
        DB_WAIT,
        Unit::Seconds,
        "Time spent waiting for a connection from the pool"
    );
    describe_counter!(
        K8S_PROXY_REQUESTS,
        "Requests through the Kubernetes API proxy, by method and HTTP status"
    );
    describe_histogram!(
        K8S_PROXY_DURATION,
        Unit::Seconds,
        "Proxied requests' durations, to the end of the response"
    );
    describe_counter!(
        K8S_PROXY_BYTES,
        Unit::Bytes,
        "Body bytes through the Kubernetes API proxy, sent to agents and received from them"
    );
    describe_gauge!(BUILD_INFO, "The version and commit of this build");
    process().describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => COMMIT).set(1.0);
    counter!(DIAL_ATTEMPTS).absolute(0);
    counter!(SESSIONS_ESTABLISHED).absolute(0);
    counter!(TAKEOVERS).absolute(0);
    counter!(LEASES_LOST).absolute(0);
    for cause in Cause::ALL {
        counter!(DIAL_FAILURES, "cause" => cause.as_str()).absolute(0);
    }
    for state in STATES {
        gauge!(SESSIONS, "state" => state.as_str()).set(0.0);
    }
}

/// The standard `process_*` metrics (CPU, memory, open files, threads, start time).
fn process() -> &'static metrics_process::Collector {
    static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();
    PROCESS.get_or_init(metrics_process::Collector::default)
}

/// Reads the process's figures now, for a scrape.
pub fn collect_process() {
    process().collect();
}

/// Keeps the recorder's histograms from growing between scrapes, until `shutdown`.
pub fn run_upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let Some(handle) = handle() else { return };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
            }
        }
    });
}

/// An attempt starts.
pub fn dial_attempt() {
    counter!(DIAL_ATTEMPTS).increment(1);
}

/// A session was accepted after `handshake` (TCP, TLS, HTTP/2) and `hello`.
pub fn session_established(handshake: Duration, hello: Duration) {
    counter!(SESSIONS_ESTABLISHED).increment(1);
    metrics::histogram!(HANDSHAKE_DURATION).record(handshake);
    metrics::histogram!(HELLO_DURATION).record(hello);
}

/// An attempt failed, or a session ended, for `cause`.
pub fn dial_failure(cause: Cause) {
    counter!(DIAL_FAILURES, "cause" => cause.as_str()).increment(1);
}

/// A heartbeat's pong came back after `round_trip`.
/// Thousands of sessions record one every interval: the histogram's handle is looked up once
/// (after the recorder is in place), not on every pong.
pub fn heartbeat(round_trip: Duration) {
    static ROUND_TRIP: OnceLock<metrics::Histogram> = OnceLock::new();
    ROUND_TRIP
        .get_or_init(|| {
            let _ = handle();
            metrics::histogram!(HEARTBEAT_ROUND_TRIP)
        })
        .record(round_trip);
}

/// The number of agents whose lease this replica holds.
pub fn agents_held(count: usize) {
    gauge!(AGENTS_HELD).set(count as f64);
}

/// `count` agents were taken over from replicas whose lease had expired.
pub fn takeovers(count: u64) {
    if count > 0 {
        counter!(TAKEOVERS).increment(count);
    }
}

/// This replica found its lease expired.
pub fn lease_lost() {
    counter!(LEASES_LOST).increment(1);
}

/// A request through the Kubernetes API proxy ended.
pub fn k8s_proxy_request(method: &str, status: u16, duration: Duration, sent: u64, received: u64) {
    // A closed list: any other method is counted as OTHER.
    let method: &'static str = match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    };
    counter!(K8S_PROXY_REQUESTS, "method" => method, "code" => status.to_string()).increment(1);
    metrics::histogram!(K8S_PROXY_DURATION).record(duration);
    counter!(K8S_PROXY_BYTES, "direction" => "sent").increment(sent);
    counter!(K8S_PROXY_BYTES, "direction" => "received").increment(received);
}

/// The database pool's connections now.
pub fn database_pool(stats: crate::store::PoolStats) {
    gauge!(DB_CONNECTIONS, "state" => "in_use")
        .set(f64::from(stats.size - stats.idle.min(stats.size)));
    gauge!(DB_CONNECTIONS, "state" => "idle").set(f64::from(stats.idle));
    gauge!(DB_CONNECTIONS_MAX).set(f64::from(stats.max));
}

/// How many agents this replica dials in each state, now.
pub fn sessions(connections: &[crate::domain::Connection]) {
    for state in STATES {
        let count = connections.iter().filter(|c| c.phase == state).count();
        gauge!(SESSIONS, "state" => state.as_str()).set(count as f64);
    }
}

/// Records sqlx's own acquire timing events (target `sqlx::pool::acquire`, with
/// `acquired_after_secs`) as [`DB_WAIT`]: every wait for a connection, whatever the query.
#[derive(Debug, Default)]
pub struct PoolWaitLayer;

/// The target sqlx logs acquire times under.
pub const POOL_ACQUIRE_TARGET: &str = "sqlx::pool::acquire";

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PoolWaitLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _context: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() != POOL_ACQUIRE_TARGET {
            return;
        }
        struct Seconds(Option<f64>);
        impl tracing::field::Visit for Seconds {
            fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
                if field.name() == "acquired_after_secs" {
                    self.0 = Some(value);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut seconds = Seconds(None);
        event.record(&mut seconds);
        if let Some(seconds) = seconds.0 {
            metrics::histogram!(DB_WAIT).record(seconds);
        }
    }
}
