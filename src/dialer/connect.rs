//! Dialling an agent: DNS, TCP, TLS (rustls, ring) or cleartext HTTP/2, and errors in words
//! a person can act on.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::domain::validate::{AgentHost, AgentUrl, UrlProblem};
use crate::domain::{DENIED_NETWORKS_SETTING, DeniedNetworks};
use crate::metrics::Cause;

/// Why an attempt failed, worded for the operator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DialError {
    /// What happened, in plain words.
    pub message: String,
    /// Whether retrying cannot help until the configuration changes.
    pub permanent: bool,
    /// The kind of failure, for the metrics.
    pub cause: Cause,
}

impl DialError {
    /// An error worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            cause: Cause::Other,
        }
    }

    /// An error in the configuration itself.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
            cause: Cause::Configuration,
        }
    }

    /// The same error, of kind `cause`.
    #[must_use]
    pub fn because(self, cause: Cause) -> Self {
        Self { cause, ..self }
    }
}

/// Where and how to dial.
#[derive(Clone, Debug)]
pub struct Target {
    /// Host of the URL: a name, or an address without brackets.
    pub host: String,
    /// The host, when it is an address rather than a name.
    pub address: Option<IpAddr>,
    /// Port of the URL (443 for grpcs, 80 for grpc by default).
    pub port: u16,
    /// `grpcs://`.
    pub tls: bool,
    /// The name to verify: `tls_host`, else the host.
    pub server_name: String,
}

impl Target {
    /// Reads a `grpc://` or `grpcs://` URL by the same rules as a new configuration, so a
    /// row stored before those rules cannot be dialled differently from how it reads. The
    /// message never repeats the URL, which might carry a password.
    pub fn parse(url: &str, tls_host: Option<&str>) -> Result<Self, DialError> {
        let parsed = AgentUrl::parse(url).map_err(|problem| {
            DialError::permanent(match problem {
                UrlProblem::Credentials => {
                    "the URL contains a user name or password: configure it again without"
                }
                UrlProblem::Invalid => {
                    "the URL is not a grpc:// or grpcs:// URL of a host and port: configure it again"
                }
            })
        })?;
        let host = parsed.host_str();
        let address = match parsed.host {
            AgentHost::Ip(addr) => Some(addr),
            AgentHost::Name(_) => None,
        };
        Ok(Self {
            server_name: tls_host.unwrap_or(&host).to_owned(),
            host,
            address,
            port: parsed.port_or_default(),
            tls: parsed.tls,
        })
    }

    /// `host:port`, with an IPv6 address in brackets.
    pub fn authority(&self) -> String {
        match self.address {
            Some(IpAddr::V6(addr)) => format!("[{addr}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

/// A connected byte stream, TLS or not.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Wraps a stream and keeps the first TLS error seen on it: with TLS 1.3 an agent rejects a
/// client certificate only after the handshake, so the alert surfaces in the HTTP/2 layer,
/// which does not say why.
pub struct Recording<T> {
    inner: T,
    seen: Arc<std::sync::Mutex<Option<rustls::Error>>>,
}

impl<T> Recording<T> {
    /// Wraps `inner`; `seen` receives the first TLS error.
    pub fn new(inner: T, seen: Arc<std::sync::Mutex<Option<rustls::Error>>>) -> Self {
        Self { inner, seen }
    }

    fn record<R>(
        &self,
        result: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        if let std::task::Poll::Ready(Err(error)) = &result
            && let Some(tls) = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
            && let Ok(mut seen) = self.seen.lock()
            && seen.is_none()
        {
            *seen = Some(tls.clone());
        }
        result
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Recording<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.record(result)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recording<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.record(result)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.record(result)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.record(result)
    }
}

/// The TLS client configuration of a URL configuration: `ca_cert` as the only trust root when
/// given (else the platform's roots), the client certificate for mTLS, ALPN `h2`.
pub fn tls_config(
    ca_cert: Option<&str>,
    client: Option<(&str, &[u8])>,
) -> Result<Arc<ClientConfig>, DialError> {
    let mut roots = RootCertStore::empty();
    match ca_cert {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert =
                    cert.map_err(|_| DialError::permanent("the CA certificate does not parse"))?;
                roots.add(cert).map_err(|e| {
                    DialError::permanent(format!("the CA certificate is unusable: {e}"))
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::permanent(format!("TLS set-up failed: {e}")))?
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|_| DialError::permanent("the client certificate does not parse"))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|_| DialError::permanent("the client key does not parse"))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                DialError::permanent(format!("the client certificate is unusable: {e}"))
            })?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS client configurations of configurations without a client certificate, shared by
/// every agent with the same trust roots: one parse of the CA (or one read of the platform's
/// roots) and one session cache instead of one per agent and per dial. Entries live as long
/// as a session or a dial uses them.
#[derive(Default)]
pub struct TlsConfigs {
    shared: std::sync::Mutex<SharedConfigs>,
}

#[derive(Default)]
struct SharedConfigs {
    by_ca: std::collections::HashMap<Option<String>, std::sync::Weak<ClientConfig>>,
    /// The size at which entries no longer used are next dropped.
    prune_at: usize,
}

impl TlsConfigs {
    /// The configuration trusting `ca_cert` (else the platform's roots), without a client
    /// certificate; built on first use.
    pub fn without_client_cert(
        &self,
        ca_cert: Option<&str>,
    ) -> Result<Arc<ClientConfig>, DialError> {
        let key = ca_cert.map(str::to_owned);
        if let Some(config) = self
            .lock()
            .by_ca
            .get(&key)
            .and_then(std::sync::Weak::upgrade)
        {
            return Ok(config);
        }
        // Built outside the lock: two dials may both build it; the last one stays shared.
        let config = tls_config(ca_cert, None)?;
        let mut shared = self.lock();
        if shared.by_ca.len() >= shared.prune_at {
            shared.by_ca.retain(|_, config| config.strong_count() > 0);
            shared.prune_at = (shared.by_ca.len() * 2).max(64);
        }
        shared.by_ca.insert(key, Arc::downgrade(&config));
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedConfigs> {
        match self.shared.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Resolves, drops the addresses in `denied`, connects (TCP, no delay) to the first that
/// answers and, for `grpcs://`, completes the TLS handshake.
pub async fn connect(
    target: &Target,
    tls: Option<Arc<ClientConfig>>,
    timeout: Duration,
    denied: &DeniedNetworks,
) -> Result<Box<dyn Io>, DialError> {
    let attempt = async {
        let resolved: Vec<SocketAddr> =
            tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|_| {
                    DialError::transient(format!("DNS lookup of {} failed", target.host))
                        .because(Cause::Dns)
                })?
                .collect();
        // Checked here, on the addresses actually dialled, so no name (nor a later change of
        // its DNS records) can lead past the list; refused ones are never connected to, so
        // the operator's error says nothing about what answers there.
        let (addrs, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
            .into_iter()
            .partition(|addr| denied.refusing(addr.ip()).is_none());
        if addrs.is_empty() && !refused.is_empty() {
            return Err(refused_destination(&refused, target.address.is_some()));
        }
        let mut last =
            DialError::transient(format!("DNS lookup of {} found no address", target.host))
                .because(Cause::Dns);
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    last = DialError::transient(format!("connection refused by {addr}"))
                        .because(Cause::Refused);
                }
                Err(e) => last = DialError::transient(format!("cannot connect to {addr}: {e}")),
            }
        }
        let stream = stream.ok_or(last)?;
        let _ = stream.set_nodelay(true);
        let Some(config) = tls else {
            return Ok(Box::new(stream) as Box<dyn Io>);
        };
        let name = ServerName::try_from(target.server_name.clone()).map_err(|_| {
            DialError::permanent(format!(
                "{} is not a valid TLS server name",
                target.server_name
            ))
        })?;
        let tls = TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| explain_io(&e, &target.server_name))?;
        Ok(Box::new(tls) as Box<dyn Io>)
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        DialError::transient(format!("connecting to {} timed out", target.authority()))
            .because(Cause::Timeout)
    })?
}

/// The error for a host whose every address is refused. An address in the URL stays refused
/// until the configuration or the setting changes (and the setting changes only with a
/// restart), so retrying it is pointless; a name's records may change, so it backs off.
fn refused_destination(refused: &[SocketAddr], literal: bool) -> DialError {
    const SHOWN: usize = 3;
    let mut list = refused
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if refused.len() > SHOWN {
        list.push_str(&format!(" and {} more", refused.len() - SHOWN));
    }
    let plural = if refused.len() > 1 { "s" } else { "" };
    let message = format!("refused destination{plural} {list} ({DENIED_NETWORKS_SETTING})");
    if literal {
        DialError::permanent(message).because(Cause::Denied)
    } else {
        DialError::transient(message).because(Cause::Denied)
    }
}

/// A TLS failure, in words and by kind.
pub fn explain_tls(error: &rustls::Error, server_name: &str) -> DialError {
    DialError::transient(tls_words(error, server_name)).because(tls_cause(error))
}

/// The kind of a TLS failure.
fn tls_cause(error: &rustls::Error) -> Cause {
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Cause::TlsName,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => Cause::UnknownCa,
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError,
        ) => Cause::ClientCertificate,
        _ => Cause::Tls,
    }
}

/// Words for a TLS failure.
fn tls_words(error: &rustls::Error, server_name: &str) -> String {
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "TLS: the agent's certificate is not valid for the name {server_name} (check tls_host)"
        ),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "TLS: the agent's certificate is signed by an unknown CA (check ca_cert)".to_owned()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "TLS: the agent's certificate has expired".to_owned(),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError),
        ) => format!("TLS: the agent rejected the client certificate ({alert:?})"),
        rustls::Error::NoApplicationProtocol => {
            "TLS: the agent does not speak HTTP/2 (ALPN h2)".to_owned()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// Words for an I/O error that may carry a TLS error.
pub fn explain_io(error: &std::io::Error, server_name: &str) -> DialError {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => explain_tls(tls, server_name),
        None => DialError::transient(format!("connection failed: {error}")),
    }
}

/// A TLS error anywhere in an error's source chain, explained.
pub fn explain_chain(
    error: &(dyn std::error::Error + 'static),
    server_name: &str,
) -> Option<DialError> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(explain_tls(tls, server_name));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(explain_tls(tls, server_name));
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("grpcs://agent.example.com:4242", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls, t.server_name.as_str()),
            ("agent.example.com", 4242, true, "agent.example.com")
        );
        let t = Target::parse("grpc://10.0.0.1", Some("agent.internal")).unwrap();
        assert_eq!(
            (t.port, t.tls, t.server_name.as_str()),
            (80, false, "agent.internal")
        );
        let t = Target::parse("grpcs://[::1]:5", None).unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.authority(), "[::1]:5");
        assert!(Target::parse("http://x", None).unwrap_err().permanent);
    }

    #[test]
    fn stored_urls_never_echo_credentials() {
        let error = Target::parse("grpcs://user:s3cret@agent:1", None).unwrap_err();
        assert!(error.permanent);
        assert!(!error.message.contains("s3cret"), "{error}");
    }

    /// Every address refused: no connection is attempted, whatever listens there.
    #[tokio::test]
    async fn refused_addresses_are_never_connected() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let denied = DeniedNetworks::new(["127.0.0.0/8".parse().unwrap()]);
        let target = Target::parse(&format!("grpc://127.0.0.1:{port}"), None).unwrap();
        let Err(error) = connect(&target, None, Duration::from_secs(2), &denied).await else {
            panic!("connected to a refused address");
        };
        assert_eq!(
            error,
            DialError::permanent(format!(
                "refused destination 127.0.0.1:{port} (KAS_GATEWAY_DIALER_DENIED_NETWORKS)"
            ))
            .because(Cause::Denied)
        );
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "the listener was connected to");
        // The same address through the default list is dialled.
        let stream = connect(
            &target,
            None,
            Duration::from_secs(2),
            &DeniedNetworks::default(),
        )
        .await;
        assert!(stream.is_ok());
    }

    #[test]
    fn refused_destinations_in_words() {
        let addrs: Vec<SocketAddr> = ["[::1]:5", "127.0.0.1:5", "127.0.0.2:5", "127.0.0.3:5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let error = refused_destination(&addrs, false);
        assert!(!error.permanent);
        assert_eq!(
            error.message,
            "refused destinations [::1]:5, 127.0.0.1:5, 127.0.0.2:5 and 1 more (KAS_GATEWAY_DIALER_DENIED_NETWORKS)"
        );
    }
}
