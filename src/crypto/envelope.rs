//! Encryption at rest: AES-256-GCM in a self-describing envelope.
//!
//! Layout: `version (1) | key id length (1) | key id | nonce (12) | ciphertext | tag (16)`.
//! The associated data binds the header and the secret's place (table, column, row), so an
//! envelope copied to another row, or given another key id, does not open.

use std::fmt;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::SecureRandom;
use zeroize::Zeroizing;

/// The envelope format this code writes.
pub const VERSION: u8 = 1;
/// Length of a data-encryption key.
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Where a secret lives; bound into its envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place<'a> {
    /// Table.
    pub table: &'a str,
    /// Column.
    pub column: &'a str,
    /// Row id.
    pub row: i64,
}

impl Place<'_> {
    fn bytes(&self) -> Vec<u8> {
        format!("{}.{}#{}", self.table, self.column, self.row).into_bytes()
    }
}

/// Why an envelope did not open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not an envelope of a known version.
    #[error("not an encrypted value of a known format")]
    Malformed,
    /// Sealed under a key this keyring does not hold.
    #[error("sealed under unknown key {0:?}")]
    UnknownKey(String),
    /// Tampered with, moved to another place, or sealed under another key with the same id.
    #[error("the encrypted value does not authenticate")]
    Forged,
}

/// One named data-encryption key.
pub struct Key {
    id: String,
    key: LessSafeKey,
    check: String,
}

impl Key {
    /// A key from 32 bytes of material; `id` is 1–64 characters of `[A-Za-z0-9_-]`.
    pub fn new(id: &str, material: &[u8]) -> Result<Self, String> {
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "key id {id:?} must be 1-64 letters, digits, '-' or '_'"
            ));
        }
        if material.len() != KEY_LEN {
            return Err(format!("key {id:?} must be {KEY_LEN} bytes"));
        }
        let key = UnboundKey::new(&AES_256_GCM, material)
            .map_err(|_| format!("key {id:?} is not an AES-256 key"))?;
        Ok(Self {
            id: id.to_owned(),
            key: LessSafeKey::new(key),
            check: check_value(material),
        })
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A value that tells two keys apart without revealing either: 128 bits of
    /// HMAC-SHA256 keyed with the material, base64. Replicas compare it through the database.
    pub fn check(&self) -> &str {
        &self.check
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.id)
    }
}

fn check_value(material: &[u8]) -> String {
    use base64::Engine;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, material);
    let tag = ring::hmac::sign(&key, b"kas-gateway encryption key check v1");
    base64::engine::general_purpose::STANDARD.encode(&tag.as_ref()[..16])
}

/// The keys in use: the first seals, all of them open.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// A keyring whose first key is the active one.
    pub fn new(keys: Vec<Key>) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("at least one encryption key is needed".into());
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|other| other.id == key.id) {
                return Err(format!("key id {:?} is listed twice", key.id));
            }
        }
        Ok(Self { keys })
    }

    /// The id of the key that seals.
    pub fn active_id(&self) -> &str {
        self.keys.first().map_or("", |k| k.id.as_str())
    }

    /// Every key's id and check value.
    pub fn checks(&self) -> Vec<(String, String)> {
        self.keys
            .iter()
            .map(|k| (k.id.clone(), k.check.clone()))
            .collect()
    }

    /// Encrypts `plaintext` for `place` under the active key.
    pub fn seal(
        &self,
        rng: &dyn SecureRandom,
        plaintext: &[u8],
        place: Place<'_>,
    ) -> Result<Vec<u8>, String> {
        let key = self.keys.first().ok_or("no active key")?;
        let id = key.id.as_bytes();
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce)
            .map_err(|_| "the random generator failed")?;
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(VERSION);
        out.push(u8::try_from(id.len()).map_err(|_| "key id too long")?);
        out.extend_from_slice(id);
        let header_len = out.len();
        out.extend_from_slice(&nonce);
        let mut sealed = plaintext.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&out[..header_len], place)),
                &mut sealed,
            )
            .map_err(|_| "encryption failed")?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts an envelope sealed for `place`.
    pub fn open(&self, envelope: &[u8], place: Place<'_>) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let parsed = parse(envelope)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id.as_bytes() == parsed.key_id)
            .ok_or_else(|| OpenError::UnknownKey(String::from_utf8_lossy(parsed.key_id).into()))?;
        let nonce =
            Nonce::try_assume_unique_for_key(parsed.nonce).map_err(|_| OpenError::Malformed)?;
        let mut buffer = Zeroizing::new(parsed.sealed.to_vec());
        let plaintext_len = key
            .key
            .open_in_place(nonce, Aad::from(aad(parsed.header, place)), &mut buffer)
            .map_err(|_| OpenError::Forged)?
            .len();
        buffer.truncate(plaintext_len);
        Ok(buffer)
    }
}

/// The id of the key an envelope was sealed under.
pub fn key_id(envelope: &[u8]) -> Result<String, OpenError> {
    parse(envelope).map(|p| String::from_utf8_lossy(p.key_id).into_owned())
}

struct Parsed<'a> {
    header: &'a [u8],
    key_id: &'a [u8],
    nonce: &'a [u8],
    sealed: &'a [u8],
}

fn parse(envelope: &[u8]) -> Result<Parsed<'_>, OpenError> {
    let (&version, rest) = envelope.split_first().ok_or(OpenError::Malformed)?;
    if version != VERSION {
        return Err(OpenError::Malformed);
    }
    let (&id_len, rest) = rest.split_first().ok_or(OpenError::Malformed)?;
    let id_len = usize::from(id_len);
    if id_len == 0 || rest.len() < id_len + NONCE_LEN + TAG_LEN {
        return Err(OpenError::Malformed);
    }
    let (key_id, rest) = rest.split_at(id_len);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    Ok(Parsed {
        header: &envelope[..2 + id_len],
        key_id,
        nonce,
        sealed,
    })
}

fn aad(header: &[u8], place: Place<'_>) -> Vec<u8> {
    let mut aad = b"kas-gateway envelope|".to_vec();
    aad.extend_from_slice(header);
    aad.push(b'|');
    aad.extend_from_slice(&place.bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;

    const PLACE: Place<'static> = Place {
        table: "agent_url_configurations",
        column: "private_key",
        row: 7,
    };

    fn keyring(ids: &[(&str, u8)]) -> Keyring {
        Keyring::new(
            ids.iter()
                .map(|(id, fill)| {
                    Key::new(id, &[*fill; KEY_LEN]).unwrap_or_else(|e| unreachable!("{e}"))
                })
                .collect(),
        )
        .unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn seal(ring: &Keyring, plaintext: &[u8], place: Place<'_>) -> Vec<u8> {
        ring.seal(&SystemRandom::new(), plaintext, place)
            .unwrap_or_else(|e| unreachable!("{e}"))
    }

    proptest! {
        #[test]
        fn round_trip(plaintext in proptest::collection::vec(any::<u8>(), 0..2048), row in any::<i64>()) {
            let ring = keyring(&[("k1", 1)]);
            let place = Place { row, ..PLACE };
            let envelope = seal(&ring, &plaintext, place);
            prop_assert_eq!(envelope[0], VERSION);
            prop_assert_eq!(ring.open(&envelope, place).map(|p| p.to_vec()), Ok(plaintext.clone()));
        }

        #[test]
        fn any_flipped_byte_fails(plaintext in proptest::collection::vec(any::<u8>(), 1..256), index in any::<prop::sample::Index>(), bit in 0u8..8) {
            let ring = keyring(&[("k1", 1)]);
            let mut envelope = seal(&ring, &plaintext, PLACE);
            let i = index.index(envelope.len());
            envelope[i] ^= 1 << bit;
            prop_assert!(ring.open(&envelope, PLACE).is_err());
        }

        #[test]
        fn another_place_fails(plaintext in proptest::collection::vec(any::<u8>(), 0..256), row in any::<i64>()) {
            prop_assume!(row != PLACE.row);
            let ring = keyring(&[("k1", 1)]);
            let envelope = seal(&ring, &plaintext, PLACE);
            prop_assert_eq!(ring.open(&envelope, Place { row, ..PLACE }).err(), Some(OpenError::Forged));
            prop_assert_eq!(ring.open(&envelope, Place { column: "client_key", ..PLACE }).err(), Some(OpenError::Forged));
            prop_assert_eq!(ring.open(&envelope, Place { table: "other", ..PLACE }).err(), Some(OpenError::Forged));
        }

        #[test]
        fn truncated_envelopes_fail(plaintext in proptest::collection::vec(any::<u8>(), 0..64), cut in any::<prop::sample::Index>()) {
            let ring = keyring(&[("k1", 1)]);
            let envelope = seal(&ring, &plaintext, PLACE);
            let cut = cut.index(envelope.len());
            prop_assert!(ring.open(&envelope[..cut], PLACE).is_err());
        }
    }

    #[test]
    fn old_keys_open_new_keys_seal() {
        let old = keyring(&[("k1", 1)]);
        let envelope = seal(&old, b"secret", PLACE);
        let rotated = keyring(&[("k2", 2), ("k1", 1)]);
        assert_eq!(
            rotated.open(&envelope, PLACE).map(|p| p.to_vec()),
            Ok(b"secret".to_vec())
        );
        let resealed = seal(&rotated, b"secret", PLACE);
        assert_eq!(key_id(&resealed).as_deref(), Ok("k2"));
        assert_eq!(
            old.open(&resealed, PLACE).err(),
            Some(OpenError::UnknownKey("k2".into()))
        );
        // A different key under the same id does not open it.
        let impostor = keyring(&[("k2", 9)]);
        assert_eq!(
            impostor.open(&resealed, PLACE).err(),
            Some(OpenError::Forged)
        );
    }

    #[test]
    fn keys_are_checked() {
        assert!(Key::new("", &[0; 32]).is_err());
        assert!(Key::new("a b", &[0; 32]).is_err());
        assert!(Key::new("k1", &[0; 16]).is_err());
        assert!(Keyring::new(vec![]).is_err());
        let dup = Keyring::new(vec![
            Key::new("k", &[0; 32]).unwrap_or_else(|e| unreachable!("{e}")),
            Key::new("k", &[1; 32]).unwrap_or_else(|e| unreachable!("{e}")),
        ]);
        assert!(dup.is_err());
        assert!(!format!("{:?}", keyring(&[("k1", 1)])).contains("01"));
    }
}
