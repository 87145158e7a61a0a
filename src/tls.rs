//! TLS for the gateway's own listeners: certificate and key files, read again when they
//! change, so a renewed certificate is served without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// The certificate the listeners present, replaced when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} holds no valid certificate", cert_path.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{} holds no certificate",
        cert_path.display()
    );
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("{} holds no valid private key", key_path.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).with_context(|| {
        format!(
            "{} does not belong to {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(Arc::new(certified))
}

fn modified(paths: [&Path; 2]) -> Option<SystemTime> {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

impl ReloadingCert {
    /// Reads the files once; fails when they do not hold a matching certificate and key.
    pub fn new(cert_path: PathBuf, key_path: PathBuf) -> anyhow::Result<Arc<Self>> {
        let certified = load(&cert_path, &key_path)?;
        let stamp = modified([&cert_path, &key_path]);
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            current: RwLock::new((certified, stamp)),
        }))
    }

    /// Reads the files again if they changed; a broken new pair is logged and ignored.
    pub fn refresh(&self) {
        let stamp = modified([&self.cert_path, &self.key_path]);
        let unchanged = match self.current.read() {
            Ok(current) => current.1 == stamp,
            Err(_) => false,
        };
        if unchanged {
            return;
        }
        match load(&self.cert_path, &self.key_path) {
            Ok(certified) => {
                if let Ok(mut current) = self.current.write() {
                    *current = (certified, stamp);
                }
                tracing::info!(cert = %self.cert_path.display(), "reloaded the TLS certificate");
            }
            Err(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "the new TLS certificate is unusable; still serving the old one"
                );
                if let Ok(mut current) = self.current.write() {
                    current.1 = stamp;
                }
            }
        }
    }

    /// Checks the files every `interval` until `shutdown`.
    pub fn watch(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(interval) => this.refresh(),
                }
            }
        });
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .ok()
            .map(|current| Arc::clone(&current.0))
    }
}

/// The server configuration: TLS 1.2 and 1.3 (ring), ALPN `h2` and `http/1.1`.
pub fn server_config(cert: Arc<ReloadingCert>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
