//! Development certificates: a CA, a server certificate for an agent's host name and a
//! client certificate for mTLS, made with rcgen, so both modes can be tried end to end.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Pair {
    /// Certificate, PEM.
    pub cert: String,
    /// Private key, PEM (PKCS#8).
    pub key: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("key", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// A development certificate authority.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

impl DevCa {
    /// A new CA named `name`, valid from `now` for ten years.
    pub fn new(name: &str, now: OffsetDateTime) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(3650);
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        Ok(Self { issuer, key_pem })
    }

    /// The CA certificate and key.
    pub fn pair(&self) -> Pair {
        Pair {
            cert: self.issuer.pem(),
            key: self.key_pem.clone(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str], now: OffsetDateTime) -> anyhow::Result<Pair> {
        self.leaf(
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            now,
            now + Duration::days(825),
        )
    }

    /// A client certificate named `name`.
    pub fn client(&self, name: &str, now: OffsetDateTime) -> anyhow::Result<Pair> {
        self.leaf(
            &[name],
            ExtendedKeyUsagePurpose::ClientAuth,
            now,
            now + Duration::days(825),
        )
    }

    /// A certificate valid between `not_before` and `not_after` (for expiry tests, too).
    pub fn leaf(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> anyhow::Result<Pair> {
        let key = KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.not_before = not_before - Duration::minutes(5);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Writes a development CA, a server certificate for `host` (and localhost) and a client
/// certificate into `dir`; keys with mode 0600. Returns the files written.
pub fn write_dev_certs(
    dir: &Path,
    host: &str,
    now: OffsetDateTime,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = DevCa::new("kas-gateway development CA", now)?;
    let server = ca.server(&[host, "localhost", "127.0.0.1"], now)?;
    let client = ca.client("kas-gateway", now)?;
    let files = [
        ("ca.pem", ca.pair().cert, false),
        ("ca-key.pem", ca.pair().key, true),
        ("server.pem", server.cert, false),
        ("server-key.pem", server.key, true),
        ("client.pem", client.cert, false),
        ("client-key.pem", client.key, true),
    ];
    let mut written = Vec::new();
    for (name, contents, secret) in files {
        let path = dir.join(name);
        write_file(&path, &contents, secret)?;
        written.push(path);
    }
    Ok(written)
}

fn write_file(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::x509;

    #[test]
    fn dev_certs_are_usable() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::UNIX_EPOCH + Duration::days(20_000);
        let files = write_dev_certs(dir.path(), "agent.test", now).unwrap();
        assert_eq!(files.len(), 6);
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        let client = x509::parse_certificates(&read("client.pem")).unwrap();
        assert_eq!(
            x509::parse_private_key(&read("client-key.pem")),
            Some(client.public_key)
        );
        let server = x509::parse_certificates(&read("server.pem")).unwrap();
        assert_eq!(
            x509::parse_private_key(&read("server-key.pem")),
            Some(server.public_key)
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("client-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
