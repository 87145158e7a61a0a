//! Certificates and keys given by users: PEM (or base64 of PEM) parsing and the checks that
//! a client certificate and key can actually be used. Ed25519 key pairs for JWT mode.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SecureRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::SubjectPublicKeyInfo;
use zeroize::Zeroizing;

use crate::domain::Timestamp;

/// PEM text as given, or decoded from base64 of PEM (as GitLab's own code expects).
pub fn normalize_pem(input: &str) -> Option<String> {
    let trimmed = input.trim();
    if trimmed.contains("-----BEGIN ") {
        return Some(format!("{trimmed}\n"));
    }
    let compact: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
    let decoded = STANDARD.decode(compact).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let text = text.trim();
    text.contains("-----BEGIN ").then(|| format!("{text}\n"))
}

/// A parsed certificate's facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// DER of each certificate, in order.
    pub ders: Vec<Vec<u8>>,
    /// The first certificate's public key bits.
    pub public_key: Vec<u8>,
    /// The first certificate's end of validity.
    pub not_after: Timestamp,
}

/// Parses one or more `CERTIFICATE` blocks; `None` unless every block is a valid X.509
/// certificate and there is at least one.
pub fn parse_certificates(pem: &str) -> Option<CertificateInfo> {
    let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .ok()?;
    let mut info: Option<CertificateInfo> = None;
    for der in &ders {
        let (rest, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
        if !rest.is_empty() {
            return None;
        }
        if info.is_none() {
            let not_after = cert.validity().not_after.timestamp().saturating_mul(1000);
            info = Some(CertificateInfo {
                ders: Vec::new(),
                public_key: cert.public_key().subject_public_key.data.to_vec(),
                not_after: Timestamp::from_millis(not_after),
            });
        }
    }
    let mut info = info?;
    info.ders = ders.iter().map(|d| d.as_ref().to_vec()).collect();
    Some(info)
}

/// A private key that rustls can sign with: RSA, ECDSA P-256/P-384 or Ed25519, in PKCS#8,
/// PKCS#1 or SEC1 PEM. Returns the public key bits it belongs to.
pub fn parse_private_key(pem: &str) -> Option<Vec<u8>> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).ok()?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).ok()?;
    let spki = signer.public_key()?;
    let (_, spki) = SubjectPublicKeyInfo::from_der(spki.as_ref()).ok()?;
    Some(spki.subject_public_key.data.to_vec())
}

/// A new Ed25519 key pair: the PKCS#8 document (secret) and the raw 32-byte public key.
pub fn generate_ed25519(rng: &dyn SecureRandom) -> Option<(Zeroizing<Vec<u8>>, Vec<u8>)> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(rng).ok()?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).ok()?;
    Some((
        Zeroizing::new(pkcs8.as_ref().to_vec()),
        pair.public_key().as_ref().to_vec(),
    ))
}

/// Standard base64, as `public_key` is returned.
pub fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };

    fn cert_and_key(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
        let key = KeyPair::generate_for(alg).unwrap();
        let cert = CertificateParams::new(vec!["client.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn keys_match_their_certificates() {
        for alg in [
            &PKCS_ECDSA_P256_SHA256,
            &PKCS_ECDSA_P384_SHA384,
            &PKCS_ED25519,
        ] {
            let (cert, key) = cert_and_key(alg);
            let info = parse_certificates(&cert).unwrap();
            assert_eq!(
                parse_private_key(&key),
                Some(info.public_key.clone()),
                "{alg:?}"
            );
            let (_, other) = cert_and_key(alg);
            assert_ne!(parse_private_key(&other), Some(info.public_key), "{alg:?}");
        }
    }

    #[test]
    fn rsa_keys_in_pkcs1_and_pkcs8() {
        // rcgen cannot generate RSA keys with ring: a fixed 2048-bit test key made by OpenSSL.
        let pkcs8 = include_str!("testdata/rsa-pkcs8.pem");
        let pkcs1 = include_str!("testdata/rsa-pkcs1.pem");
        let cert = include_str!("testdata/rsa-cert.pem");
        let info = parse_certificates(cert).unwrap();
        assert_eq!(parse_private_key(pkcs8), Some(info.public_key.clone()));
        assert_eq!(parse_private_key(pkcs1), Some(info.public_key));
    }

    #[test]
    fn traditional_ec_keys() {
        let info = parse_certificates(include_str!("testdata/ec-cert.pem")).unwrap();
        assert_eq!(
            parse_private_key(include_str!("testdata/ec-sec1.pem")),
            Some(info.public_key)
        );
    }

    #[test]
    fn garbage_is_refused() {
        let (cert, key) = cert_and_key(&PKCS_ECDSA_P256_SHA256);
        assert!(parse_certificates("hello").is_none());
        assert!(
            parse_certificates(&key).is_none(),
            "a key is not a certificate"
        );
        assert!(
            parse_private_key(&cert).is_none(),
            "a certificate is not a key"
        );
        let truncated = &cert[..cert.len() / 2];
        assert!(parse_certificates(truncated).is_none());
        let corrupted = cert.replacen("MII", "MIJ", 1);
        assert!(parse_certificates(&corrupted).is_none());
    }

    #[test]
    fn base64_of_pem_is_accepted() {
        let (cert, _) = cert_and_key(&PKCS_ED25519);
        let encoded = STANDARD.encode(cert.as_bytes());
        assert_eq!(normalize_pem(&encoded), normalize_pem(&cert));
        assert!(
            normalize_pem("bm90IHBlbQ==").is_none(),
            "base64 of something else"
        );
        assert!(normalize_pem("!!").is_none());
    }

    #[test]
    fn ed25519_pairs() {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let (pkcs8, public) = generate_ed25519(&rng).unwrap();
        assert_eq!(public.len(), 32);
        assert_eq!(base64(&public).len(), 44);
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(pair.public_key().as_ref(), public.as_slice());
    }
}
