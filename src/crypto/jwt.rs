//! The JWTs of the gateway: EdDSA ones it sends receptive agents, HS256 ones a GitLab instance
//! (and another replica) signs its calls with. Encoding, decoding and the checks of header and
//! claims are jsonwebtoken's; its cryptography is a small provider on ring, installed by every
//! function here before it signs or verifies, so ring stays the only crypto library.
//!
//! Agents' tokens: header `{"typ":"JWT","alg":"EdDSA"}`; claims `iss` `gitlab-kas`, `aud`
//! `gitlab-agent`, `iat` now, `nbf` now − 5 s, `exp` now + 5 s (RECEPTIVE.md §2).
//!
//! Every verification refuses a header with `crit` (no extension is understood here), an `alg`
//! other than the expected one, and claims without `exp`. Times are compared with the `now`
//! passed in, never with the system clock.

use std::borrow::Borrow;
use std::sync::Once;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::signature::{Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::domain::Timestamp;

/// `iss` of the gateway's JWTs.
pub const ISSUER: &str = "gitlab-kas";
/// `aud` of the gateway's JWTs.
pub const AUDIENCE: &str = "gitlab-agent";
/// Lifetime on either side of `iat`, in seconds.
pub const LIFETIME_SECS: i64 = 5;

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

/// Why a JWT is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON of the expected shape.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not the one expected (or none at all).
    #[error("unexpected algorithm")]
    Algorithm,
    /// The header names critical extensions (`crit`), which nothing here understands.
    #[error("critical header extensions are not supported")]
    Critical,
    /// A claim that must be present is not (`exp` always).
    #[error("missing claim {0}")]
    MissingClaim(String),
    /// The signature does not verify with the configured key.
    #[error("invalid signature")]
    Signature,
    /// `iss` is not the expected issuer.
    #[error("wrong issuer")]
    Issuer,
    /// `aud` is not (or does not hold) the expected audience.
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

/// Signs `claims` with an Ed25519 key pair.
pub fn sign(key: &Ed25519KeyPair, claims: &Claims) -> Result<String, String> {
    install_provider();
    // jsonwebtoken's `encode` takes the key as PKCS#8 bytes, which a ring key pair cannot give
    // back; so the provider's own Ed25519 signer signs jsonwebtoken's header and the claims
    // in the compact serialization `encode` produces.
    let message = format!(
        "{}.{}",
        part(&Header::new(Algorithm::EdDSA))?,
        part(claims)?
    );
    let signature = EdDsaSigner(key)
        .try_sign(message.as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature)))
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
    let public_key = STANDARD
        .decode(public_key_base64)
        .map_err(|_| JwtError::Signature)?;
    let mut validation = validation(Algorithm::EdDSA, &["exp", "nbf", "iss", "aud"]);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[audience]);
    let claims = decode(token, &DecodingKey::from_ed_der(&public_key), &validation)?;
    let claims: Claims = serde_json::from_value(claims).map_err(|_| JwtError::Malformed)?;
    let now = now.as_secs();
    if now > claims.exp + leeway_secs {
        return Err(JwtError::Expired);
    }
    if now + leeway_secs < claims.nbf {
        return Err(JwtError::NotYetValid);
    }
    Ok(claims)
}

/// Signs HS256 claims with a shared secret, as a GitLab instance does (header
/// `{"typ":"JWT","alg":"HS256"}`); for the replicas' calls, tests and tools.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    install_provider();
    // Cannot fail: an HMAC key takes any bytes and JSON values always serialize. Were it to
    // fail, the empty token is refused by every verifier.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

/// Verifies an HS256 JWT such as a GitLab instance's: the shared secret, `iss` (exactly
/// `issuer` when given; otherwise any non-empty one, as GitLab puts its host name there),
/// `aud` (a string or a list holding it), `exp` present and at most `max_lifetime_secs`
/// ahead, `nbf` passed when present.
pub fn verify_hs256(
    token: &str,
    secret: &[u8],
    issuer: Option<&str>,
    audience: &str,
    now: Timestamp,
    max_lifetime_secs: i64,
) -> Result<(), JwtError> {
    let mut validation = validation(Algorithm::HS256, &["exp", "iss", "aud"]);
    validation.set_audience(&[audience]);
    let claims = decode(token, &DecodingKey::from_secret(secret), &validation)?;
    let iss = claims["iss"]
        .as_str()
        .filter(|iss| !iss.is_empty())
        .ok_or(JwtError::Issuer)?;
    if issuer.is_some_and(|expected| expected != iss) {
        return Err(JwtError::Issuer);
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

/// The token of an `authorization` value in the `Bearer` scheme, whatever the scheme's case
/// (schemes are case-insensitive, and GitLab sends `bearer`).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// jsonwebtoken's checks for `alg`, with `required` claims and without its own time checks,
/// which would read the system clock: the callers compare times with the `now` passed in.
fn validation(alg: Algorithm, required: &[&str]) -> Validation {
    let mut validation = Validation::new(alg);
    validation.set_required_spec_claims(required);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = 0;
    validation
}

/// Decodes and verifies `token`, refusing critical header extensions, and returns its claims.
fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<serde_json::Value, JwtError> {
    install_provider();
    let header = jsonwebtoken::decode_header(token).map_err(refusal)?;
    if header.crit.is_some() {
        return Err(JwtError::Critical);
    }
    jsonwebtoken::decode::<serde_json::Value>(token, key, validation)
        .map(|data| data.claims)
        .map_err(refusal)
}

fn refusal(error: jsonwebtoken::errors::Error) -> JwtError {
    match error.into_kind() {
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => JwtError::Algorithm,
        ErrorKind::MissingRequiredClaim(claim) => JwtError::MissingClaim(claim),
        ErrorKind::InvalidIssuer => JwtError::Issuer,
        ErrorKind::InvalidAudience => JwtError::Audience,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => JwtError::Signature,
        _ => JwtError::Malformed,
    }
}

/// Installs [`RING`] as jsonwebtoken's provider, once per process.
fn install_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err only when a provider is already installed, which then stays.
        let _ = RING.install_default();
    });
}

/// jsonwebtoken's cryptography on ring: HS256/384/512 and EdDSA (Ed25519), nothing else.
static RING: CryptoProvider = CryptoProvider {
    signer_factory: ring_signer,
    verifier_factory: ring_verifier,
    // No JWKs are used here; these answer an error instead of jsonwebtoken's panics.
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
        ec_pub_components_from_private_key: |_, _| Err(ErrorKind::UnsupportedAlgorithm.into()),
        ed_pub_components_from_private_key: |_, _| Err(ErrorKind::UnsupportedAlgorithm.into()),
        compute_digest: |_, _| Err(ErrorKind::UnsupportedAlgorithm.into()),
    },
};

fn ring_signer(
    alg: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(match alg.family() {
        AlgorithmFamily::Ed => Box::new(EdDsaSigner(
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.as_bytes())
                .map_err(|_| ErrorKind::InvalidEddsaKey)?,
        )),
        _ => Box::new(Hmac::new(*alg, key.as_bytes())?),
    })
}

fn ring_verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    // An HMAC secret is never taken for a public key, nor the other way round.
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    let bytes = key.try_get_as_bytes()?;
    Ok(match alg.family() {
        AlgorithmFamily::Ed => Box::new(EdDsaVerifier(bytes.to_vec())),
        _ => Box::new(Hmac::new(*alg, bytes)?),
    })
}

/// HMAC with SHA-2, signing and verifying (in constant time).
struct Hmac {
    alg: Algorithm,
    key: ring::hmac::Key,
}

impl Hmac {
    fn new(alg: Algorithm, secret: &[u8]) -> jsonwebtoken::errors::Result<Self> {
        let hmac = match alg {
            Algorithm::HS256 => ring::hmac::HMAC_SHA256,
            Algorithm::HS384 => ring::hmac::HMAC_SHA384,
            Algorithm::HS512 => ring::hmac::HMAC_SHA512,
            _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
        };
        Ok(Self {
            alg,
            key: ring::hmac::Key::new(hmac, secret),
        })
    }
}

impl Signer<Vec<u8>> for Hmac {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, jsonwebtoken::signature::Error> {
        Ok(ring::hmac::sign(&self.key, message).as_ref().to_vec())
    }
}

impl Verifier<Vec<u8>> for Hmac {
    fn verify(&self, message: &[u8], tag: &Vec<u8>) -> Result<(), jsonwebtoken::signature::Error> {
        ring::hmac::verify(&self.key, message, tag)
            .map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtSigner for Hmac {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

impl JwtVerifier for Hmac {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// Ed25519 signing with a key pair, owned (the provider's) or borrowed ([`sign`]).
struct EdDsaSigner<K>(K);

impl<K: Borrow<Ed25519KeyPair>> Signer<Vec<u8>> for EdDsaSigner<K> {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, jsonwebtoken::signature::Error> {
        Ok(self.0.borrow().sign(message).as_ref().to_vec())
    }
}

impl JwtSigner for EdDsaSigner<Ed25519KeyPair> {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

/// Ed25519 verification with a raw 32-byte public key.
struct EdDsaVerifier(Vec<u8>);

impl Verifier<Vec<u8>> for EdDsaVerifier {
    fn verify(
        &self,
        message: &[u8],
        signature: &Vec<u8>,
    ) -> Result<(), jsonwebtoken::signature::Error> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for EdDsaVerifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

/// One part of the compact serialization: base64url of the JSON, as jsonwebtoken writes it.
fn part<T: Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_vec(value)
        .map(|json| URL_SAFE_NO_PAD.encode(json))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::x509;
    use serde_json::json;

    const NOW: Timestamp = Timestamp::from_millis(1_767_225_600_000);
    const SECRET: [u8; 32] = [7; 32];

    /// A key pair, its PKCS#8 and its public key as an agent is given it.
    fn pair() -> (Ed25519KeyPair, Vec<u8>, String) {
        let (pkcs8, public) = x509::generate_ed25519(&ring::rand::SystemRandom::new()).unwrap();
        (
            Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap(),
            pkcs8.to_vec(),
            x509::base64(&public),
        )
    }

    fn json_part(token: &str, index: usize) -> serde_json::Value {
        let part = token.split('.').nth(index).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    /// A token with any header and claims, signed with HMAC-SHA256 over exactly those bytes.
    fn forge_hs256(header: &str, claims: &serde_json::Value, key: &[u8]) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            message.as_bytes(),
        );
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The claims GitLab's KAS client signs (`JSONWebToken::Token#default_payload`).
    fn gitlab_claims(iat: i64) -> serde_json::Value {
        json!({
            "jti": "8d4a5b27-6c1b-4f60-9c55-0c0e7a3f2d11",
            "aud": "gitlab-kas",
            "iss": "gitlab.example.com",
            "iat": iat,
            "nbf": iat - 5,
            "exp": iat + 60,
        })
    }

    fn hs256(token: &str) -> Result<(), JwtError> {
        verify_hs256(token, &SECRET, None, "gitlab-kas", NOW, 300)
    }

    #[test]
    fn header_and_claims_are_exact() {
        let (key, _, public) = pair();
        let token = sign(&key, &Claims::issued_at(NOW)).unwrap();
        assert_eq!(json_part(&token, 0), json!({"alg": "EdDSA", "typ": "JWT"}));
        let iat = NOW.as_secs();
        assert_eq!(
            json_part(&token, 1),
            json!({"iss": "gitlab-kas", "aud": "gitlab-agent", "iat": iat, "nbf": iat - 5, "exp": iat + 5})
        );
        assert_eq!(verify(&token, &public, NOW, 0), Ok(Claims::issued_at(NOW)));
    }

    #[test]
    fn the_provider_signs_eddsa_from_pkcs8_as_sign_does() {
        let (key, pkcs8, public) = pair();
        install_provider();
        let from_pkcs8 = jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &Claims::issued_at(NOW),
            &EncodingKey::from_ed_der(&pkcs8),
        )
        .unwrap();
        // Ed25519 is deterministic: the same key signs the same bytes alike.
        assert_eq!(from_pkcs8, sign(&key, &Claims::issued_at(NOW)).unwrap());
        assert!(verify(&from_pkcs8, &public, NOW, 0).is_ok());
    }

    #[test]
    fn refusals() {
        let (key, _, public) = pair();
        let (_, _, other_public) = pair();
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
    fn crit_is_refused() {
        let (_, pkcs8, public) = pair();
        install_provider();
        let mut header = Header::new(Algorithm::EdDSA);
        header.crit = Some(vec!["exp".into()]);
        let token = jsonwebtoken::encode(
            &header,
            &Claims::issued_at(NOW),
            &EncodingKey::from_ed_der(&pkcs8),
        )
        .unwrap();
        assert_eq!(verify(&token, &public, NOW, 0), Err(JwtError::Critical));

        let header = r#"{"typ":"JWT","alg":"HS256","crit":["b64"],"b64":true}"#;
        let token = forge_hs256(header, &gitlab_claims(NOW.as_secs()), &SECRET);
        assert_eq!(hs256(&token), Err(JwtError::Critical));
    }

    #[test]
    fn an_unexpected_alg_is_refused() {
        let (key, _, public) = pair();
        let iat = NOW.as_secs();
        // `none`, with or without a signature.
        let claims = URL_SAFE_NO_PAD.encode(gitlab_claims(iat).to_string());
        let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        for token in [format!("{none}.{claims}."), format!("{none}.{claims}.AAAA")] {
            assert!(
                matches!(
                    hs256(&token),
                    Err(JwtError::Algorithm | JwtError::Malformed)
                ),
                "{token}"
            );
        }
        // HS256 keyed with the agent's public key: the classic confusion.
        let raw_public = STANDARD.decode(&public).unwrap();
        let confused = forge_hs256(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &serde_json::to_value(Claims::issued_at(NOW)).unwrap(),
            &raw_public,
        );
        assert_eq!(verify(&confused, &public, NOW, 0), Err(JwtError::Algorithm));
        // EdDSA where HS256 is expected.
        let eddsa = sign(&key, &Claims::issued_at(NOW)).unwrap();
        assert_eq!(hs256(&eddsa), Err(JwtError::Algorithm));
        // Another HMAC than HS256.
        install_provider();
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &gitlab_claims(iat),
            &EncodingKey::from_secret(&SECRET),
        )
        .unwrap();
        assert_eq!(hs256(&hs512), Err(JwtError::Algorithm));
    }

    #[test]
    fn a_missing_exp_is_refused() {
        let mut claims = gitlab_claims(NOW.as_secs());
        claims.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            hs256(&sign_hs256(&SECRET, &claims)),
            Err(JwtError::MissingClaim("exp".into()))
        );
        let (_, pkcs8, public) = pair();
        let mut claims = serde_json::to_value(Claims::issued_at(NOW)).unwrap();
        claims.as_object_mut().unwrap().remove("exp");
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &EncodingKey::from_ed_der(&pkcs8),
        )
        .unwrap();
        assert_eq!(
            verify(&token, &public, NOW, 0),
            Err(JwtError::MissingClaim("exp".into()))
        );
    }

    #[test]
    fn gitlab_form_is_accepted() {
        let iat = NOW.as_secs();
        // GitLab's bytes: ruby-jwt writes `typ` before `alg`; `jti`, host-name `iss`, 60 s.
        let token = forge_hs256(
            r#"{"typ":"JWT","alg":"HS256"}"#,
            &gitlab_claims(iat),
            &SECRET,
        );
        assert_eq!(hs256(&token), Ok(()));
        let check = |issuer: Option<&str>, now: Timestamp| {
            verify_hs256(&token, &SECRET, issuer, "gitlab-kas", now, 300)
        };
        assert_eq!(check(Some("gitlab.example.com"), NOW), Ok(()));
        assert_eq!(check(Some("gitlab"), NOW), Err(JwtError::Issuer));
        // Its whole minute, not a second more; `nbf` allows five seconds of skew.
        assert_eq!(check(None, NOW.plus_millis(59_000)), Ok(()));
        assert_eq!(check(None, NOW.plus_millis(60_000)), Err(JwtError::Expired));
        assert_eq!(check(None, NOW.plus_millis(-5_000)), Ok(()));
        assert_eq!(
            check(None, NOW.plus_millis(-6_000)),
            Err(JwtError::NotYetValid)
        );
        // jsonwebtoken's own encoding is GitLab's, byte for byte.
        assert_eq!(
            sign_hs256(&SECRET, &gitlab_claims(iat)).split('.').next(),
            token.split('.').next()
        );
    }

    #[test]
    fn issuer_by_default_is_any_non_empty_name() {
        let iat = NOW.as_secs();
        for (iss, expected) in [
            (json!("gitlab"), Ok(())),
            (json!("gitlab.example.com"), Ok(())),
            (json!(""), Err(JwtError::Issuer)),
            (json!(["gitlab"]), Err(JwtError::Issuer)),
        ] {
            let claims = json!({"iss": iss, "aud": "gitlab-kas", "exp": iat + 60});
            assert_eq!(hs256(&sign_hs256(&SECRET, &claims)), expected, "{iss}");
        }
        let no_iss = json!({"aud": "gitlab-kas", "exp": iat + 60});
        assert_eq!(
            hs256(&sign_hs256(&SECRET, &no_iss)),
            Err(JwtError::MissingClaim("iss".into()))
        );
    }

    #[test]
    fn hs256_with_a_configured_issuer() {
        let iat = NOW.as_secs();
        let good = json!({"iss": "gitlab", "aud": "gitlab-kas", "iat": iat, "exp": iat + 60});
        let token = sign_hs256(&SECRET, &good);
        let check = |token: &str, secret: &[u8], audience: &str, now: Timestamp, max: i64| {
            verify_hs256(token, secret, Some("gitlab"), audience, now, max)
        };
        assert_eq!(check(&token, &SECRET, "gitlab-kas", NOW, 300), Ok(()));
        assert_eq!(
            check(&token, &[8; 32], "gitlab-kas", NOW, 300),
            Err(JwtError::Signature)
        );
        assert_eq!(
            check(&token, &SECRET, "gitlab-kas", NOW.plus_millis(61_000), 300),
            Err(JwtError::Expired)
        );
        assert_eq!(
            check(&token, &SECRET, "other", NOW, 300),
            Err(JwtError::Audience)
        );
        assert_eq!(
            check(&token, &SECRET, "gitlab-kas", NOW, 30),
            Err(JwtError::TooLong)
        );
        let list = json!({"iss": "gitlab", "aud": ["x", "gitlab-kas"], "exp": iat + 60});
        assert_eq!(
            check(&sign_hs256(&SECRET, &list), &SECRET, "gitlab-kas", NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn bearer_scheme_in_any_case() {
        assert_eq!(bearer("Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer("bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer("BEARER  abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
