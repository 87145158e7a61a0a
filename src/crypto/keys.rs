//! Where the encryption keys come from, and the reloadable keyring the service uses.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::Secret;
use super::envelope::{KEY_LEN, Key, Keyring, OpenError, Place};
use crate::domain::{Error, Result};

/// Name of the key file generated in the data directory when no keys are configured.
pub const KEY_FILE: &str = "encryption-keys";

/// Where the keys were read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `KAS_GATEWAY_ENCRYPTION_KEYS` (or its file): the operator rotates them.
    Configured,
    /// The key file in the data directory: `admin rotate-encryption-key` adds keys to it.
    File(PathBuf),
}

/// The keyring behind every secret at rest.
#[derive(Debug)]
pub struct Secrets {
    keyring: RwLock<Arc<Keyring>>,
    source: KeySource,
    rng: SystemRandom,
}

/// Parses `id=base64key` entries separated by commas or new lines; `#` starts a comment.
/// The first entry is the active key.
pub fn parse_keys(text: &str) -> anyhow::Result<Vec<Key>> {
    let mut keys = Vec::new();
    for entry in text
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
    {
        let Some((id, material)) = entry.split_once('=') else {
            bail!("an encryption key entry is not of the form id=base64key");
        };
        let material = Zeroizing::new(
            STANDARD
                .decode(material.trim())
                .with_context(|| format!("key {:?} is not base64", id.trim()))?,
        );
        keys.push(Key::new(id.trim(), &material).map_err(anyhow::Error::msg)?);
    }
    Ok(keys)
}

fn read_key_file(path: &Path) -> anyhow::Result<Keyring> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    Keyring::new(parse_keys(&text)?).map_err(anyhow::Error::msg)
}

fn new_key_line(rng: &dyn SecureRandom, id: &str) -> anyhow::Result<String> {
    let mut material = Zeroizing::new([0u8; KEY_LEN]);
    rng.fill(material.as_mut())
        .map_err(|_| anyhow::anyhow!("the random generator failed"))?;
    Ok(format!("{id}={}", STANDARD.encode(material.as_ref())))
}

fn write_key_file(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Write beside, then rename: a reader never sees half a file.
    let staging = path.with_extension("new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staging)
        .with_context(|| format!("writing {}", staging.display()))?;
    let mut text = Zeroizing::new(String::from(
        "# kas-gateway encryption keys, id=base64: the first seals, all of them open.\n",
    ));
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&staging, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

impl Secrets {
    /// The configured keys, or else the key file in `data_dir`, generated when missing.
    /// Returns whether a key file was generated.
    pub fn load(configured: Option<&Secret>, data_dir: &Path) -> anyhow::Result<(Self, bool)> {
        let rng = SystemRandom::new();
        if let Some(configured) = configured {
            let keyring = Keyring::new(parse_keys(configured.expose())?)
                .map_err(anyhow::Error::msg)
                .context("in the configured encryption keys")?;
            return Ok((Self::with(keyring, KeySource::Configured, rng), false));
        }
        let path = data_dir.join(KEY_FILE);
        let generated = !path.exists();
        if generated {
            write_key_file(&path, &[new_key_line(&rng, "k1")?])?;
        }
        let keyring = read_key_file(&path)?;
        Ok((Self::with(keyring, KeySource::File(path), rng), generated))
    }

    fn with(keyring: Keyring, source: KeySource, rng: SystemRandom) -> Self {
        Self {
            keyring: RwLock::new(Arc::new(keyring)),
            source,
            rng,
        }
    }

    fn current(&self) -> Arc<Keyring> {
        match self.keyring.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Where the keys come from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Every key's id and check value (see [`Key::check`]).
    pub fn checks(&self) -> Vec<(String, String)> {
        self.current().checks()
    }

    /// The id of the key that seals.
    pub fn active_id(&self) -> String {
        self.current().active_id().to_owned()
    }

    /// Encrypts `plaintext` for `place` under the active key.
    pub fn seal(&self, plaintext: &[u8], place: Place<'_>) -> Result<Vec<u8>> {
        self.current()
            .seal(&self.rng, plaintext, place)
            .map_err(Error::Internal)
    }

    /// Decrypts a secret of `place`. A key file that gained keys since it was read (another
    /// process rotated) is read again once.
    pub fn open(&self, envelope: &[u8], place: Place<'_>) -> Result<Zeroizing<Vec<u8>>> {
        match self.current().open(envelope, place) {
            Err(OpenError::UnknownKey(id)) if matches!(self.source, KeySource::File(_)) => {
                self.reload()
                    .map_err(|e| Error::Internal(format!("{e:#}")))?;
                self.current()
                    .open(envelope, place)
                    .map_err(|_| Error::Internal(format!("no encryption key {id:?}")))
            }
            other => other.map_err(|e| Error::Internal(e.to_string())),
        }
    }

    /// Reads the key file again.
    pub fn reload(&self) -> anyhow::Result<()> {
        if let KeySource::File(path) = &self.source {
            let keyring = Arc::new(read_key_file(path)?);
            match self.keyring.write() {
                Ok(mut guard) => *guard = keyring,
                Err(poisoned) => *poisoned.into_inner() = keyring,
            }
        }
        Ok(())
    }

    /// Adds a new active key to the key file (the old keys stay, to open what they sealed).
    /// Returns the new key's id.
    pub fn add_file_key(&self) -> anyhow::Result<String> {
        let KeySource::File(path) = &self.source else {
            bail!(
                "the encryption keys are configured (KAS_GATEWAY_ENCRYPTION_KEYS): put the new key first there"
            );
        };
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        let existing: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        let next = existing
            .iter()
            .filter_map(|l| l.split('=').next()?.strip_prefix('k')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let id = format!("k{next}");
        let mut lines = vec![new_key_line(&self.rng, &id)?];
        lines.extend(existing);
        write_key_file(path, &lines)?;
        self.reload()?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLACE: Place<'static> = Place {
        table: "t",
        column: "c",
        row: 1,
    };

    #[test]
    fn configured_keys_parse() {
        let a = STANDARD.encode([1u8; 32]);
        let b = STANDARD.encode([2u8; 32]);
        let keys = parse_keys(&format!("new={a}, old={b}\n# comment\n")).unwrap_or_default();
        assert_eq!(keys.iter().map(Key::id).collect::<Vec<_>>(), ["new", "old"]);
        assert!(parse_keys("nokey").is_err());
        assert!(parse_keys("k=!!!").is_err());
        assert!(parse_keys(&format!("k={}", STANDARD.encode([1u8; 16]))).is_err());
    }

    #[test]
    fn key_file_is_generated_private_and_rotates() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let (secrets, generated) =
            Secrets::load(None, dir.path()).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(generated);
        let path = dir.path().join(KEY_FILE);
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        assert_eq!(mode & 0o777, 0o600);
        let sealed = secrets.seal(b"x", PLACE).unwrap_or_default();

        // Another process rotates; this one still opens old and new envelopes.
        let (other, generated) =
            Secrets::load(None, dir.path()).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!generated);
        assert_eq!(other.add_file_key().ok().as_deref(), Some("k2"));
        let resealed = other.seal(b"y", PLACE).unwrap_or_default();
        assert_eq!(
            secrets.open(&resealed, PLACE).map(|p| p.to_vec()),
            Ok(b"y".to_vec())
        );
        assert_eq!(secrets.active_id(), "k2");
        assert_eq!(
            secrets.open(&sealed, PLACE).map(|p| p.to_vec()),
            Ok(b"x".to_vec())
        );
    }
}
