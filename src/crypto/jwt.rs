//! The EdDSA JWTs the gateway sends receptive agents, signed and verified with ring.
//!
//! Header `{"alg":"EdDSA","typ":"JWT"}`; claims `iss` `gitlab-kas`, `aud` `gitlab-agent`,
//! `iat` now, `nbf` now − 5 s, `exp` now + 5 s (RECEPTIVE.md §2).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::domain::Timestamp;

/// `iss` of the gateway's JWTs.
pub const ISSUER: &str = "gitlab-kas";
/// `aud` of the gateway's JWTs.
pub const AUDIENCE: &str = "gitlab-agent";
/// Lifetime on either side of `iat`, in seconds.
pub const LIFETIME_SECS: i64 = 5;

const HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;

/// The claims of a gateway JWT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at (seconds).
    pub iat: i64,
    /// Not before (seconds).
    pub nbf: i64,
    /// Expires (seconds).
    pub exp: i64,
}

impl Claims {
    /// The claims of a JWT issued at `now`.
    pub fn issued_at(now: Timestamp) -> Self {
        let iat = now.as_secs();
        Self {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat,
            nbf: iat - LIFETIME_SECS,
            exp: iat + LIFETIME_SECS,
        }
    }
}

/// Signs `claims` with an Ed25519 key pair.
pub fn sign(key: &Ed25519KeyPair, claims: &Claims) -> Result<String, String> {
    let claims = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = key.sign(signing_input.as_bytes());
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}

/// Why an agent refuses a JWT.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// Not `alg` EdDSA.
    #[error("unexpected algorithm")]
    Algorithm,
    /// The signature does not verify with the configured public key.
    #[error("invalid signature")]
    Signature,
    /// `iss` is not `gitlab-kas`.
    #[error("wrong issuer")]
    Issuer,
    /// `aud` is not `gitlab-agent`.
    #[error("wrong audience")]
    Audience,
    /// Past `exp`.
    #[error("token expired")]
    Expired,
    /// Before `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// `exp` further ahead than allowed.
    #[error("token lifetime too long")]
    TooLong,
}

/// Verifies a gateway JWT with the raw 32-byte public key given as standard base64, as an
/// agent does, expecting [`AUDIENCE`]. `leeway_secs` allows for clock skew.
pub fn verify(
    token: &str,
    public_key_base64: &str,
    now: Timestamp,
    leeway_secs: i64,
) -> Result<Claims, JwtError> {
    verify_for(token, public_key_base64, AUDIENCE, now, leeway_secs)
}

/// [`verify`] for an agent that expects the audience `audience`.
pub fn verify_for(
    token: &str,
    public_key_base64: &str,
    audience: &str,
    now: Timestamp,
    leeway_secs: i64,
) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| JwtError::Malformed)
    };
    let header: serde_json::Value =
        serde_json::from_slice(&decode(header)?).map_err(|_| JwtError::Malformed)?;
    if header["alg"] != "EdDSA" {
        return Err(JwtError::Algorithm);
    }
    let public_key = STANDARD
        .decode(public_key_base64)
        .map_err(|_| JwtError::Signature)?;
    let signing_input_len = token.len() - signature.len() - 1;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&token.as_bytes()[..signing_input_len], &decode(signature)?)
        .map_err(|_| JwtError::Signature)?;
    let claims: Claims =
        serde_json::from_slice(&decode(claims)?).map_err(|_| JwtError::Malformed)?;
    if claims.iss != ISSUER {
        return Err(JwtError::Issuer);
    }
    if claims.aud != audience {
        return Err(JwtError::Audience);
    }
    let now = now.as_secs();
    if now > claims.exp + leeway_secs {
        return Err(JwtError::Expired);
    }
    if now + leeway_secs < claims.nbf {
        return Err(JwtError::NotYetValid);
    }
    Ok(claims)
}

/// Signs HS256 claims with a shared secret (what a GitLab instance does; for tests and tools).
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Verifies a GitLab instance's HS256 JWT: the shared secret, `iss`, `aud` (a string or a
/// list holding it), `exp` present and at most `max_lifetime_secs` ahead, `nbf` passed.
pub fn verify_hs256(
    token: &str,
    secret: &[u8],
    issuer: &str,
    audience: &str,
    now: Timestamp,
    max_lifetime_secs: i64,
) -> Result<(), JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| JwtError::Malformed)
    };
    let header: serde_json::Value =
        serde_json::from_slice(&decode(header)?).map_err(|_| JwtError::Malformed)?;
    if header["alg"] != "HS256" {
        return Err(JwtError::Algorithm);
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let signing_input_len = token.len() - signature.len() - 1;
    ring::hmac::verify(
        &key,
        &token.as_bytes()[..signing_input_len],
        &decode(signature)?,
    )
    .map_err(|_| JwtError::Signature)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&decode(claims)?).map_err(|_| JwtError::Malformed)?;
    if claims["iss"] != issuer {
        return Err(JwtError::Issuer);
    }
    let audience_ok = match &claims["aud"] {
        serde_json::Value::String(aud) => aud == audience,
        serde_json::Value::Array(list) => list.iter().any(|a| a == audience),
        _ => false,
    };
    if !audience_ok {
        return Err(JwtError::Audience);
    }
    let now = now.as_secs();
    let exp = claims["exp"].as_i64().ok_or(JwtError::Malformed)?;
    if now >= exp {
        return Err(JwtError::Expired);
    }
    if exp - now > max_lifetime_secs {
        return Err(JwtError::TooLong);
    }
    if claims["nbf"].as_i64().is_some_and(|nbf| now < nbf) {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::x509;

    fn pair() -> (Ed25519KeyPair, String) {
        let (pkcs8, public) = x509::generate_ed25519(&ring::rand::SystemRandom::new()).unwrap();
        (
            Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap(),
            x509::base64(&public),
        )
    }

    const NOW: Timestamp = Timestamp::from_millis(1_767_225_600_000);

    #[test]
    fn header_and_claims_are_exact() {
        let (key, public) = pair();
        let token = sign(&key, &Claims::issued_at(NOW)).unwrap();
        let mut parts = token.split('.');
        let header = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
        assert_eq!(header, br#"{"alg":"EdDSA","typ":"JWT"}"#);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap())
                .unwrap();
        let iat = NOW.as_secs();
        assert_eq!(
            claims,
            serde_json::json!({"iss": "gitlab-kas", "aud": "gitlab-agent", "iat": iat, "nbf": iat - 5, "exp": iat + 5})
        );
        assert!(verify(&token, &public, NOW, 0).is_ok());
    }

    #[test]
    fn refusals() {
        let (key, public) = pair();
        let (_, other_public) = pair();
        let token = sign(&key, &Claims::issued_at(NOW)).unwrap();
        assert_eq!(
            verify(&token, &other_public, NOW, 0),
            Err(JwtError::Signature)
        );
        assert_eq!(
            verify(&token, &public, NOW.plus_millis(6_000), 0),
            Err(JwtError::Expired)
        );
        assert!(verify(&token, &public, NOW.plus_millis(6_000), 2).is_ok());
        assert_eq!(
            verify(&token, &public, NOW.plus_millis(-6_000), 0),
            Err(JwtError::NotYetValid)
        );
        let mut wrong = Claims::issued_at(NOW);
        wrong.aud = "someone".into();
        assert_eq!(
            verify(&sign(&key, &wrong).unwrap(), &public, NOW, 0),
            Err(JwtError::Audience)
        );
        let mut wrong = Claims::issued_at(NOW);
        wrong.iss = "someone".into();
        assert_eq!(
            verify(&sign(&key, &wrong).unwrap(), &public, NOW, 0),
            Err(JwtError::Issuer)
        );
        assert_eq!(verify("a.b", &public, NOW, 0), Err(JwtError::Malformed));
        let tampered = token.replacen('.', ".e", 1);
        assert!(verify(&tampered, &public, NOW, 0).is_err());
    }

    #[test]
    fn hs256() {
        let secret = [7u8; 32];
        let iat = NOW.as_secs();
        let good =
            serde_json::json!({"iss": "gitlab", "aud": "gitlab-kas", "iat": iat, "exp": iat + 60});
        let token = sign_hs256(&secret, &good);
        assert_eq!(
            verify_hs256(&token, &secret, "gitlab", "gitlab-kas", NOW, 300),
            Ok(())
        );
        assert_eq!(
            verify_hs256(&token, &[8u8; 32], "gitlab", "gitlab-kas", NOW, 300),
            Err(JwtError::Signature)
        );
        assert_eq!(
            verify_hs256(
                &token,
                &secret,
                "gitlab",
                "gitlab-kas",
                NOW.plus_millis(61_000),
                300
            ),
            Err(JwtError::Expired)
        );
        assert_eq!(
            verify_hs256(&token, &secret, "gitlab", "other", NOW, 300),
            Err(JwtError::Audience)
        );
        assert_eq!(
            verify_hs256(&token, &secret, "gitlab", "gitlab-kas", NOW, 30),
            Err(JwtError::TooLong)
        );
        let list =
            serde_json::json!({"iss": "gitlab", "aud": ["x", "gitlab-kas"], "exp": iat + 60});
        assert_eq!(
            verify_hs256(
                &sign_hs256(&secret, &list),
                &secret,
                "gitlab",
                "gitlab-kas",
                NOW,
                300
            ),
            Ok(())
        );
        let no_exp = serde_json::json!({"iss": "gitlab", "aud": "gitlab-kas"});
        assert_eq!(
            verify_hs256(
                &sign_hs256(&secret, &no_exp),
                &secret,
                "gitlab",
                "gitlab-kas",
                NOW,
                300
            ),
            Err(JwtError::Malformed)
        );
    }
}
