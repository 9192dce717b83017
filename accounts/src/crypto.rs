//! Secrets at rest: AES-256-GCM under keys from `ENCRYPTION_KEYS`, with a key id so that keys
//! can be rotated.
//!
//! Rules kept here:
//! - There is no plain-text fallback: without a valid key nothing is stored, and a value that
//!   does not decrypt is an error, never passed through.
//! - Each ciphertext is bound to where it belongs (associated data such as
//!   `tenant/environment/api_key`), so a value copied into another tenant's row does not
//!   decrypt.
//! - Keys and plaintexts are never printed: `Debug` is redacted, errors name only key ids.
//!
//! Stored form: `v1:<key_id>:<base64(nonce || ciphertext || tag)>`.

use std::collections::HashMap;
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use meterline_common::config::{ConfigError, Env};

const NONCE_BYTES: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("encrypted value is malformed")]
    Malformed,
    #[error("encrypted with key {0}, which ENCRYPTION_KEYS does not hold")]
    UnknownKey(String),
    #[error("encrypted value does not decrypt with key {0} (wrong key or tampered)")]
    Undecryptable(String),
    #[error("encryption failed")]
    Encrypt,
}

/// The keys of `ENCRYPTION_KEYS`; the first encrypts, all decrypt.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<Inner>,
}

struct Inner {
    primary: String,
    keys: HashMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Keyring(primary: {}, keys: <redacted>)",
            self.inner.primary
        )
    }
}

impl Keyring {
    /// Parses `key_id:base64_32_bytes[,key_id:base64_32_bytes...]`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut keys = HashMap::new();
        let mut primary = None;
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, material) = entry
                .split_once(':')
                .ok_or("each key is key_id:base64_32_bytes")?;
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err("a key id is letters, digits, '_' and '-'".into());
            }
            // The decoded bytes are never echoed: only the id and what is wrong.
            let bytes = STANDARD
                .decode(material)
                .map_err(|_| format!("key {id} is not valid base64"))?;
            if bytes.len() != 32 {
                return Err(format!("key {id} must decode to 32 bytes"));
            }
            if keys.contains_key(id) {
                return Err(format!("key id {id} appears twice"));
            }
            keys.insert(
                id.to_owned(),
                Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)),
            );
            primary.get_or_insert_with(|| id.to_owned());
        }
        let primary = primary.ok_or("at least one key is required")?;
        Ok(Self {
            inner: Arc::new(Inner { primary, keys }),
        })
    }

    /// `ENCRYPTION_KEYS`, required.
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let spec = env.required("ENCRYPTION_KEYS")?;
        Self::parse(&spec).map_err(|reason| ConfigError::Malformed {
            var: "ENCRYPTION_KEYS",
            reason,
        })
    }

    /// The id of the key that encrypts.
    pub fn primary_id(&self) -> &str {
        &self.inner.primary
    }

    /// Encrypts `plaintext` under the primary key, bound to `context`.
    pub fn encrypt(&self, plaintext: &[u8], context: &str) -> Result<String, CryptoError> {
        let cipher = self
            .inner
            .keys
            .get(&self.inner.primary)
            .ok_or(CryptoError::Encrypt)?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Encrypt)?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        Ok(format!(
            "v1:{}:{}",
            self.inner.primary,
            STANDARD.encode(blob)
        ))
    }

    /// Decrypts a stored value that was bound to `context`.
    pub fn decrypt(&self, stored: &str, context: &str) -> Result<Vec<u8>, CryptoError> {
        let (key_id, blob) = parse_stored(stored)?;
        let cipher = self
            .inner
            .keys
            .get(key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        if blob.len() <= NONCE_BYTES {
            return Err(CryptoError::Malformed);
        }
        let (nonce, sealed) = blob.split_at(NONCE_BYTES);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Undecryptable(key_id.to_owned()))
    }

    /// The key id a stored value was encrypted with.
    pub fn key_id_of(stored: &str) -> Result<&str, CryptoError> {
        stored
            .strip_prefix("v1:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(id, _)| id)
            .ok_or(CryptoError::Malformed)
    }

    /// Re-encrypts a stored value under the primary key (rotation); unchanged when it already
    /// uses it.
    pub fn reencrypt(&self, stored: &str, context: &str) -> Result<Option<String>, CryptoError> {
        if Self::key_id_of(stored)? == self.primary_id() {
            return Ok(None);
        }
        let plain = self.decrypt(stored, context)?;
        self.encrypt(&plain, context).map(Some)
    }
}

fn parse_stored(stored: &str) -> Result<(&str, Vec<u8>), CryptoError> {
    let rest = stored.strip_prefix("v1:").ok_or(CryptoError::Malformed)?;
    let (key_id, encoded) = rest.split_once(':').ok_or(CryptoError::Malformed)?;
    let blob = STANDARD
        .decode(encoded)
        .map_err(|_| CryptoError::Malformed)?;
    Ok((key_id, blob))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "k2:HyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4=";

    #[test]
    fn round_trip_bound_to_its_context() {
        let ring = Keyring::parse(K1).unwrap();
        let stored = ring.encrypt(b"sk_test_123", "t/e/api_key").unwrap();
        assert!(stored.starts_with("v1:k1:"));
        assert!(!stored.contains("sk_test"));
        assert_eq!(
            ring.decrypt(&stored, "t/e/api_key").unwrap(),
            b"sk_test_123"
        );
        assert_eq!(
            ring.decrypt(&stored, "other/e/api_key"),
            Err(CryptoError::Undecryptable("k1".into()))
        );
        // Two encryptions of one value differ (fresh nonce).
        assert_ne!(stored, ring.encrypt(b"sk_test_123", "t/e/api_key").unwrap());
    }

    #[test]
    fn rotation_reads_old_and_writes_new() {
        let old = Keyring::parse(K1).unwrap();
        let stored = old.encrypt(b"secret", "c").unwrap();
        let rotated = Keyring::parse(&format!("{K2},{K1}")).unwrap();
        assert_eq!(rotated.primary_id(), "k2");
        assert_eq!(rotated.decrypt(&stored, "c").unwrap(), b"secret");
        let moved = rotated.reencrypt(&stored, "c").unwrap().unwrap();
        assert!(moved.starts_with("v1:k2:"));
        assert_eq!(rotated.reencrypt(&moved, "c").unwrap(), None);
        // Once k1 is retired, the old value is refused, not passed through.
        let only_new = Keyring::parse(K2).unwrap();
        assert_eq!(
            only_new.decrypt(&stored, "c"),
            Err(CryptoError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn tampering_and_garbage_are_refused() {
        let ring = Keyring::parse(K1).unwrap();
        let stored = ring.encrypt(b"secret", "c").unwrap();
        let mut tampered = stored.clone().into_bytes();
        let last = tampered.len() - 3;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(ring.decrypt(&tampered, "c").is_err());
        assert_eq!(ring.decrypt("plain-text", "c"), Err(CryptoError::Malformed));
        assert_eq!(ring.decrypt("v1:k1:!!!", "c"), Err(CryptoError::Malformed));
    }

    #[test]
    fn bad_key_specs_never_echo_material() {
        for spec in [
            "",
            "k1",
            "k1:short",
            "k1:AAEC",
            "bad id:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        ] {
            let err = Keyring::parse(spec).unwrap_err();
            assert!(!err.contains("AAEC"), "{err}");
        }
        assert!(Keyring::parse(&format!("{K1},{K1}")).is_err());
        let ring = Keyring::parse(K1).unwrap();
        assert!(!format!("{ring:?}").contains("AAEC"));
    }
}
