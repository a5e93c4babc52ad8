//! Key material: the master key, the `Secret` newtype, sealing with AES-256-GCM and
//! associated data that binds a ciphertext to its place, and pool key ids.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

/// A decrypted key. It has no `Debug` or `Display`, and its bytes are zeroed on drop.
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Takes ownership of `s`; the string's buffer is zeroed when the secret is dropped.
    pub fn new(s: String) -> Self {
        Secret(Zeroizing::new(s))
    }

    /// The key in clear, for sealing or for the one response that returns it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The masked form of SPEC §3: first 4 and last 4 characters, or `****` below 12.
    pub fn masked(&self) -> String {
        let n = self.0.chars().count();
        if n < 12 {
            return "****".into();
        }
        let head: String = self.0.chars().take(4).collect();
        let tail: String = self.0.chars().skip(n - 4).collect();
        format!("{head}…{tail}")
    }
}

/// Where a ciphertext lives. It becomes the associated data, so a ciphertext copied
/// to another place does not open.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    /// A per-user key in the keystore.
    User { user_id: &'a str, service: &'a str },
    /// A pool key: `channel` is `None` for the global pool. `namespace` is `"sqlite"`
    /// for the embedded store, or the Redis prefix in Redis mode.
    Pool {
        namespace: &'a str,
        channel: Option<&'a str>,
        service: &'a str,
    },
    /// A row of the keystore's own bookkeeping.
    Meta(&'a str),
}

impl Place<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let parts: [&str; 4] = match *self {
            Place::User { user_id, service } => ["user", "", user_id, service],
            Place::Pool {
                namespace,
                channel: None,
                service,
            } => ["pool", namespace, "", service],
            Place::Pool {
                namespace,
                channel: Some(c),
                service,
            } => ["channel_pool", namespace, c, service],
            Place::Meta(name) => ["meta", "", name, ""],
        };
        // Length-prefixed, so no two places share an encoding.
        let mut out = b"apikeyd/1".to_vec();
        for p in parts {
            out.extend_from_slice(&(p.len() as u32).to_be_bytes());
            out.extend_from_slice(p.as_bytes());
        }
        out
    }
}

/// Opening failed. Deliberately says nothing about why.
#[derive(Debug, thiserror::Error)]
#[error("ciphertext does not open with this master key at this place")]
pub struct OpenError;

/// Loading or creating the master key failed; the message is for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MasterKeyError(pub String);

const FORMAT: u8 = 1;
const KEY_VERSION: u32 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;

/// The 32-byte master key, ready to seal and open. No `Debug`; the cipher's round
/// keys and the derived id key are zeroed on drop.
pub struct MasterKey {
    cipher: Aes256Gcm,
    id_key: Zeroizing<[u8; 32]>,
}

impl MasterKey {
    /// Builds the key from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let cipher = Aes256Gcm::new(bytes.into());
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(bytes).expect("HMAC takes any key");
        mac.update(b"apikeyd key-id v1");
        let mut id_key = Zeroizing::new([0u8; 32]);
        id_key.copy_from_slice(&mac.finalize().into_bytes());
        MasterKey { cipher, id_key }
    }

    /// A fresh random key as base64 text, for a new key file.
    pub fn generate_base64() -> Zeroizing<String> {
        let key = Aes256Gcm::generate_key(OsRng);
        let text = Zeroizing::new(B64.encode(key.as_slice()));
        let mut key = key;
        key.as_mut_slice().zeroize();
        text
    }

    /// Parses the base64 text of a key file.
    pub fn from_base64(text: &str) -> Result<Self, MasterKeyError> {
        let bytes = Zeroizing::new(B64.decode(text.trim()).map_err(|_| {
            MasterKeyError("master key file is not base64 text of 32 bytes".into())
        })?);
        let arr: &[u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| MasterKeyError("master key file does not hold exactly 32 bytes".into()))?;
        Ok(MasterKey::from_bytes(arr))
    }

    /// Reads a key file, refusing one that group or others may read.
    pub fn read_file(path: &Path) -> Result<Self, MasterKeyError> {
        let meta = std::fs::metadata(path).map_err(|e| {
            MasterKeyError(format!("cannot read master key {}: {e}", path.display()))
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(MasterKeyError(format!(
                "master key {} is readable by group or others (mode {:o}); run: chmod 600 {}",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            MasterKeyError(format!("cannot read master key {}: {e}", path.display()))
        })?);
        MasterKey::from_base64(&text)
            .map_err(|e| MasterKeyError(format!("master key {}: {e}", path.display())))
    }

    /// Writes a new random key to `path` with mode 0600; fails if the file exists.
    pub fn create_file(path: &Path) -> Result<Self, MasterKeyError> {
        let fail = |e: std::io::Error| {
            MasterKeyError(format!("cannot create master key {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let text = MasterKey::generate_base64();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)?;
        f.write_all(b"\n").map_err(fail)?;
        f.sync_all().map_err(fail)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(fail)?;
        }
        MasterKey::from_base64(&text)
    }

    /// Encrypts `plain` for `place` under a fresh random nonce.
    ///
    /// Layout: format byte, key version (u32 BE), 12-byte nonce, ciphertext and tag.
    pub fn seal(&self, plain: &[u8], place: Place<'_>) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = place.associated_data();
        let ct = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.push(FORMAT);
        out.extend_from_slice(&KEY_VERSION.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts what `seal` produced for the same place. Shape is checked before any
    /// decryption; every failure is the same opaque `OpenError`.
    pub fn open(&self, sealed: &[u8], place: Place<'_>) -> Result<Secret, OpenError> {
        if sealed.len() < HEADER_LEN + TAG_LEN
            || sealed[0] != FORMAT
            || sealed[1..5] != KEY_VERSION.to_be_bytes()
        {
            return Err(OpenError);
        }
        let nonce = Nonce::from_slice(&sealed[5..HEADER_LEN]);
        let aad = place.associated_data();
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    nonce,
                    Payload {
                        msg: &sealed[HEADER_LEN..],
                        aad: &aad,
                    },
                )
                .map_err(|_| OpenError)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| OpenError)?;
        Ok(Secret::new(text.to_owned()))
    }

    /// A short, stable id for a pool key that reveals nothing of it: 16 hex digits of
    /// an HMAC keyed by a key derived from the master key.
    pub fn key_id(&self, key: &Secret) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&*self.id_key).expect("HMAC takes any key");
        mac.update(key.expose().as_bytes());
        let digest = mac.finalize().into_bytes();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_base64(&MasterKey::generate_base64()).unwrap()
    }

    const ALICE: Place<'static> = Place::User {
        user_id: "alice",
        service: "openai",
    };

    #[test]
    fn round_trip() {
        let k = key();
        let sealed = k.seal(b"sk-canary-123456", ALICE);
        assert_eq!(k.open(&sealed, ALICE).unwrap().expose(), "sk-canary-123456");
    }

    #[test]
    fn flipped_byte_fails_anywhere() {
        let k = key();
        let sealed = k.seal(b"sk-canary-123456", ALICE);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(
                k.open(&bad, ALICE).is_err(),
                "flip at byte {i} still opened"
            );
        }
        assert!(k.open(&sealed[..sealed.len() - 1], ALICE).is_err());
        assert!(k.open(&[], ALICE).is_err());
    }

    #[test]
    fn moved_to_another_place_fails() {
        let k = key();
        let sealed = k.seal(b"sk-canary-123456", ALICE);
        let others = [
            Place::User {
                user_id: "bob",
                service: "openai",
            },
            Place::User {
                user_id: "alice",
                service: "anthropic",
            },
            Place::Pool {
                namespace: "sqlite",
                channel: None,
                service: "openai",
            },
            Place::Pool {
                namespace: "sqlite",
                channel: Some("alice"),
                service: "openai",
            },
        ];
        for p in others {
            assert!(k.open(&sealed, p).is_err());
        }
    }

    #[test]
    fn two_seals_differ_and_other_key_fails() {
        let k = key();
        let a = k.seal(b"sk-canary-123456", ALICE);
        let b = k.seal(b"sk-canary-123456", ALICE);
        assert_ne!(a, b);
        assert_ne!(a[5..17], b[5..17], "nonces must differ");
        assert!(key().open(&a, ALICE).is_err());
    }

    #[test]
    fn key_id_is_stable_short_and_keyed() {
        let k = key();
        let s = Secret::new("sk-canary-123456".into());
        assert_eq!(
            k.key_id(&s),
            k.key_id(&Secret::new("sk-canary-123456".into()))
        );
        assert_eq!(k.key_id(&s).len(), 16);
        assert_ne!(k.key_id(&s), key().key_id(&s));
    }

    #[test]
    fn masking() {
        assert_eq!(Secret::new("short".into()).masked(), "****");
        assert_eq!(Secret::new("12345678901".into()).masked(), "****");
        assert_eq!(Secret::new("sk-abcdefgh1234".into()).masked(), "sk-a…1234");
    }
}
