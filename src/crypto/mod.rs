//! Secrets: generation of tokens, their digests, and a wrapper that keeps them out of logs.

use std::fmt;

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

use crate::domain::{Error, Result};

pub mod envelope;
pub mod jwt;
pub mod keys;
pub mod x509;

/// Prefix of agent tokens, as GitLab issues them.
pub const AGENT_TOKEN_PREFIX: &str = "glagent-";
/// Prefix of personal access tokens, as GitLab issues them.
pub const PERSONAL_TOKEN_PREFIX: &str = "glpat-";

const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A secret string: compared, hashed and handed out once, never printed.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it must leave the process (a response, a file).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digest under which the secret is stored.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest::of(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// A secret key of raw bytes, such as a shared HMAC key: zeroed when dropped, never printed.
#[derive(Clone)]
pub struct SecretBytes(zeroize::Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wraps secret bytes.
    pub fn new(bytes: zeroize::Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }

    /// The bytes; call only where they are used (signing, verifying).
    pub fn expose(&self) -> &zeroize::Zeroizing<Vec<u8>> {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes([REDACTED])")
    }
}

/// The SHA-256 digest of a token: the only form in which tokens are stored.
///
/// Tokens carry 120 (personal) or 300 (agent) random bits, so an unsalted fast hash is
/// enough: nobody can brute-force the preimage, and an index on the digest finds a token
/// without a timing-sensitive comparison of secrets.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenDigest(Vec<u8>);

impl TokenDigest {
    /// The digest of `token`.
    pub fn of(token: &str) -> Self {
        Self(
            digest::digest(&digest::SHA256, token.as_bytes())
                .as_ref()
                .to_vec(),
        )
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A digest as the store keeps it (its bytes).
    pub fn from_stored(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenDigest(..)")
    }
}

/// Lower-case hexadecimal (as the databases' `unhex` and `decode(…, 'hex')` read it).
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// `len` random characters from the URL-safe alphabet (6 bits each, no bias).
pub fn random_url_safe(rng: &dyn SecureRandom, len: usize) -> Result<String> {
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes)
        .map_err(|_| Error::Internal("the system random generator failed".into()))?;
    Ok(bytes
        .iter()
        .map(|b| char::from(URL_SAFE[usize::from(b & 63)]))
        .collect())
}

/// A new agent token: `glagent-` and 50 random URL-safe characters.
pub fn new_agent_token(rng: &dyn SecureRandom) -> Result<Secret> {
    Ok(Secret(format!(
        "{AGENT_TOKEN_PREFIX}{}",
        random_url_safe(rng, 50)?
    )))
}

/// A new personal access token: `glpat-` and 20 random URL-safe characters (as GitLab).
pub fn new_personal_token(rng: &dyn SecureRandom) -> Result<Secret> {
    Ok(Secret(format!(
        "{PERSONAL_TOKEN_PREFIX}{}",
        random_url_safe(rng, 20)?
    )))
}

/// The process-wide random generator.
pub fn system_random() -> SystemRandom {
    SystemRandom::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_tokens_have_gitlab_shape() {
        let rng = system_random();
        let token = new_agent_token(&rng).unwrap_or_else(|e| unreachable!("{e}"));
        let value = token.expose();
        assert!(value.starts_with("glagent-"));
        assert_eq!(value.len(), "glagent-".len() + 50);
        assert!(
            value["glagent-".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let other = new_agent_token(&rng).unwrap_or_else(|e| unreachable!("{e}"));
        assert_ne!(token, other);
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("glpat-verysecret");
        assert!(!format!("{secret:?}").contains("verysecret"));
        assert!(!format!("{:?}", secret.digest()).contains(|c: char| c.is_ascii_digit()));
    }

    #[test]
    fn digests_are_sha256() {
        let a = TokenDigest::of("a");
        assert_eq!(a, TokenDigest::of("a"));
        assert_ne!(a, TokenDigest::of("b"));
        assert_eq!(a.as_bytes().len(), 32);
    }
}
