//! Key material: the master keyring and sealing with AES-256-GCM (here), the
//! `Secret` newtype (`secret`), the place a sealed value is bound to (`place`), the
//! keyring's versions and text format (`keyring`) and the key file on disk (`keyfile`).

mod keyfile;
mod keyring;
mod place;
mod secret;

pub use keyfile::keyring_temp;
pub use keyring::{KeyLine, MasterKeyError};
pub use place::Place;
pub use secret::Secret;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use keyring::Ring;

/// Opening failed. Deliberately says nothing about why.
#[derive(Debug, thiserror::Error)]
#[error("ciphertext does not open with this master key at this place")]
pub struct OpenError;

const FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;

/// The key version a sealed value records, or `None` when it is not a sealed value.
pub fn sealed_version(sealed: &[u8]) -> Option<u32> {
    if sealed.len() < HEADER_LEN + TAG_LEN || sealed[0] != FORMAT {
        return None;
    }
    Some(u32::from_be_bytes([
        sealed[1], sealed[2], sealed[3], sealed[4],
    ]))
}

/// The master keyring, ready to seal and open; shared by every actor and swapped
/// whole on reload. No `Debug`; key bytes and cipher round keys are zeroed on drop.
pub struct MasterKey {
    ring: RwLock<Arc<Ring>>,
    /// In Redis mode, the highest version every live daemon of the fleet holds
    /// (0: no cap). New values are sealed with it while it is below `current`, so a
    /// version added on one host is not used before every host can open it.
    seal_cap: AtomicU32,
}

impl MasterKey {
    fn from_ring(ring: Ring) -> Self {
        MasterKey {
            ring: RwLock::new(Arc::new(ring)),
            seal_cap: AtomicU32::new(0),
        }
    }

    fn ring(&self) -> Arc<Ring> {
        match self.ring.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A fresh random key as base64 text, for a new key file.
    pub fn generate_base64() -> Zeroizing<String> {
        let mut key = Aes256Gcm::generate_key(OsRng);
        let text = Zeroizing::new(B64.encode(key.as_slice()));
        key.as_mut_slice().zeroize();
        text
    }

    /// Parses the text of a key file (see the file format in docs/security.md).
    pub fn from_text(text: &str) -> Result<Self, MasterKeyError> {
        Ring::parse(text).map(MasterKey::from_ring)
    }

    /// The versions this keyring opens, oldest first.
    pub fn versions(&self) -> Vec<u32> {
        self.ring().keys.keys().copied().collect()
    }

    /// The newest version of this keyring.
    pub fn current_version(&self) -> u32 {
        self.ring().current
    }

    /// Caps the version `seal` uses (see `seal_cap`); 0 lifts the cap.
    pub fn set_seal_cap(&self, version: u32) {
        self.seal_cap.store(version, Ordering::Relaxed);
    }

    /// The version `seal` uses now: the current one, or the fleet's cap when it is
    /// lower and held here.
    pub fn sealing_version(&self) -> u32 {
        Self::sealing_in(&self.ring(), self.seal_cap.load(Ordering::Relaxed))
    }

    fn sealing_in(ring: &Ring, cap: u32) -> u32 {
        if cap != 0 && cap < ring.current && ring.ciphers.contains_key(&cap) {
            cap
        } else {
            ring.current
        }
    }

    /// Per version, a value that proves which key it is without revealing it: 32 hex
    /// digits of an HMAC of a fixed label. Daemons sharing a Redis compare these.
    pub fn check_values(&self) -> Vec<(u32, String)> {
        self.ring()
            .keys
            .iter()
            .map(|(v, k)| {
                let mut mac =
                    <Hmac<Sha256> as Mac>::new_from_slice(&**k).expect("HMAC takes any key");
                mac.update(b"apikeyd fleet key check v1");
                let digest = mac.finalize().into_bytes();
                (
                    *v,
                    digest[..16].iter().map(|b| format!("{b:02x}")).collect(),
                )
            })
            .collect()
    }

    /// This keyring plus a new random version, which becomes current.
    pub fn with_new_version(&self) -> MasterKey {
        let ring = self.ring();
        let mut keys: BTreeMap<u32, Zeroizing<[u8; 32]>> =
            ring.keys.iter().map(|(v, k)| (*v, k.clone())).collect();
        let mut fresh = Aes256Gcm::generate_key(OsRng);
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(fresh.as_slice());
        fresh.as_mut_slice().zeroize();
        keys.insert(ring.current + 1, bytes);
        MasterKey::from_ring(Ring::new(keys, Some(ring.id_key.clone())).expect("keys are present"))
    }

    /// The key that authenticates fleet heartbeats under `version`, derived from that
    /// version's key with its own label: HKDF-Expand (RFC 5869) with PRK = the
    /// version's key (already 32 uniformly random bytes, so Extract is skipped, as
    /// §3.3 allows) and info = the label; one block, so one HMAC. It opens nothing.
    fn heartbeat_key(&self, version: u32) -> Option<Hmac<Sha256>> {
        let ring = self.ring();
        let k = ring.keys.get(&version)?;
        let mut expand = <Hmac<Sha256> as Mac>::new_from_slice(&**k).expect("HMAC takes any key");
        expand.update(b"apikeyd fleet heartbeat v1");
        expand.update(&[1]);
        let mut derived = Zeroizing::new([0u8; 32]);
        derived.copy_from_slice(&expand.finalize().into_bytes());
        Some(<Hmac<Sha256> as Mac>::new_from_slice(&*derived).expect("HMAC takes any key"))
    }

    /// The tag of a fleet heartbeat `record` under `version` (hex), or `None` when
    /// this keyring lacks the version.
    pub fn heartbeat_tag(&self, version: u32, record: &[u8]) -> Option<String> {
        let mut mac = self.heartbeat_key(version)?;
        mac.update(record);
        Some(
            mac.finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    /// Whether `tag` (hex) authenticates `record` under `version` (compared in
    /// constant time); false when this keyring lacks the version.
    pub fn heartbeat_tag_matches(&self, version: u32, record: &[u8], tag: &str) -> bool {
        let Some(mut mac) = self.heartbeat_key(version) else {
            return false;
        };
        let Some(bytes) = (0..tag.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(tag.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()
        else {
            return false;
        };
        mac.update(record);
        mac.verify_slice(&bytes).is_ok()
    }

    /// This keyring with only its current version left.
    pub fn current_only(&self) -> MasterKey {
        let ring = self.ring();
        let mut keys = BTreeMap::new();
        keys.insert(ring.current, ring.keys[&ring.current].clone());
        MasterKey::from_ring(
            Ring::new(keys, Some(ring.id_key.clone())).expect("current is present"),
        )
    }

    /// Replaces this keyring with `other`'s, for every holder of this `MasterKey`.
    pub fn replace_with(&self, other: &MasterKey) {
        let new = other.ring();
        match self.ring.write() {
            Ok(mut r) => *r = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Encrypts `plain` for `place` under the sealing version and a fresh random nonce.
    ///
    /// Layout: format byte, key version (u32 BE), 12-byte nonce, ciphertext and tag.
    pub fn seal(&self, plain: &[u8], place: Place<'_>) -> Vec<u8> {
        self.seal_with(plain, &place.associated_data())
    }

    /// Seals a pool value the way daemons did before pool values were bound to
    /// their key_id, for tests of the upgrade path.
    #[doc(hidden)]
    pub fn seal_unbound_pool_value(&self, plain: &[u8], place: Place<'_>) -> Vec<u8> {
        let aad = place
            .unbound_pool_data()
            .unwrap_or_else(|| place.associated_data());
        self.seal_with(plain, &aad)
    }

    fn seal_with(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        let ring = self.ring();
        let version = Self::sealing_in(&ring, self.seal_cap.load(Ordering::Relaxed));
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ct = ring.ciphers[&version]
            .encrypt(&nonce, Payload { msg: plain, aad })
            .expect("AES-GCM encryption of a short message cannot fail");
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.push(FORMAT);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts what `seal` produced for the same place, under whichever version
    /// sealed it. Shape is checked before any decryption; every failure (tampered,
    /// moved, unknown version) is the same opaque `OpenError`.
    ///
    /// A pool value sealed before pool values were bound to their key_id still opens,
    /// but only where the key inside has that very key_id: the id is an HMAC of the
    /// key, so such a value moved under another key's field or row is refused too.
    pub fn open(&self, sealed: &[u8], place: Place<'_>) -> Result<Secret, OpenError> {
        match self.open_with(sealed, &place.associated_data()) {
            Ok(secret) => Ok(secret),
            Err(e) => {
                let (Some(old), Place::Pool { key_id, .. }) = (place.unbound_pool_data(), place)
                else {
                    return Err(e);
                };
                let secret = self.open_with(sealed, &old)?;
                if self.key_id(&secret) == key_id {
                    Ok(secret)
                } else {
                    Err(OpenError)
                }
            }
        }
    }

    fn open_with(&self, sealed: &[u8], aad: &[u8]) -> Result<Secret, OpenError> {
        let version = sealed_version(sealed).ok_or(OpenError)?;
        let ring = self.ring();
        let cipher = ring.ciphers.get(&version).ok_or(OpenError)?;
        let nonce = Nonce::from_slice(&sealed[5..HEADER_LEN]);
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    nonce,
                    Payload {
                        msg: &sealed[HEADER_LEN..],
                        aad,
                    },
                )
                .map_err(|_| OpenError)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| OpenError)?;
        Ok(Secret::new(text.to_owned()))
    }

    /// A short, stable id for a pool key that reveals nothing of it: 16 hex digits of
    /// an HMAC under the keyring's id key (unchanged by rotation).
    pub fn key_id(&self, key: &Secret) -> String {
        let ring = self.ring();
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&*ring.id_key).expect("HMAC takes any key");
        mac.update(key.expose().as_bytes());
        let digest = mac.finalize().into_bytes();
        // By hand, not a `format!` per byte: this runs for every write with an
        // idempotency key (its fingerprint), and eight small strings per call showed.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = String::with_capacity(16);
        for b in &digest[..8] {
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::keyfile::write_private;
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key() -> MasterKey {
        MasterKey::from_text(&MasterKey::generate_base64()).unwrap()
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
                key_id: "alice",
            },
            Place::Pool {
                namespace: "sqlite",
                channel: Some("alice"),
                service: "openai",
                key_id: "openai",
            },
            Place::RedisUser {
                namespace: "stargazer",
                user_id: "alice",
                service: "openai",
            },
        ];
        for p in others {
            assert!(k.open(&sealed, p).is_err());
        }
        let in_redis = |namespace| Place::RedisUser {
            namespace,
            user_id: "alice",
            service: "openai",
        };
        let sealed = k.seal(b"sk-canary-123456", in_redis("stargazer"));
        assert!(k.open(&sealed, in_redis("stargazer")).is_ok());
        assert!(k.open(&sealed, in_redis("other")).is_err());
        assert!(k.open(&sealed, ALICE).is_err());
    }

    #[test]
    fn rotation_keeps_old_values_open_and_ids_stable() {
        let k1 = key();
        let old = k1.seal(b"sk-canary-123456", ALICE);
        let id = k1.key_id(&Secret::new("sk-canary-123456".into()));
        let k2 = k1.with_new_version();
        assert_eq!(k2.versions(), vec![1, 2]);
        let new = k2.seal(b"sk-canary-123456", ALICE);
        assert_eq!(sealed_version(&new), Some(2));
        assert_eq!(k2.open(&old, ALICE).unwrap().expose(), "sk-canary-123456");
        assert!(
            k1.open(&new, ALICE).is_err(),
            "an unknown version does not open"
        );
        let k3 = k2.current_only();
        assert_eq!(k3.versions(), vec![2]);
        assert!(
            k3.open(&old, ALICE).is_err(),
            "retired versions no longer open"
        );
        assert_eq!(k3.open(&new, ALICE).unwrap().expose(), "sk-canary-123456");
        // Ids survive rotation and the round trip through the keyring file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        k3.write_keyring(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = MasterKey::read_file(&path).unwrap();
        assert_eq!(back.key_id(&Secret::new("sk-canary-123456".into())), id);
        assert_eq!(back.open(&new, ALICE).unwrap().expose(), "sk-canary-123456");
    }

    #[test]
    fn keyring_file_errors() {
        for bad in ["", "v1:abc", "x:", "v0:AAAA", "id:AAAA\nv2:AAAA"] {
            assert!(MasterKey::from_text(bad).is_err(), "{bad:?}");
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
    fn pool_values_are_bound_to_their_key_id() {
        let k = key();
        let plain = Secret::new("sk-canary-123456".into());
        let id = k.key_id(&plain);
        let at = |key_id| Place::Pool {
            namespace: "stargazer",
            channel: Some("c1"),
            service: "openai",
            key_id,
        };
        let sealed = k.seal(plain.expose().as_bytes(), at(&id));
        assert_eq!(k.open(&sealed, at(&id)).unwrap().expose(), plain.expose());
        assert!(k.open(&sealed, at("0000000000000000")).is_err());
        // Sealed before the binding: opens only under the key's own id.
        let old = k.seal_unbound_pool_value(plain.expose().as_bytes(), at(&id));
        assert_eq!(k.open(&old, at(&id)).unwrap().expose(), plain.expose());
        assert!(k.open(&old, at("0000000000000000")).is_err());
        // The two forms never open as each other's place of another kind.
        assert!(k.open(&sealed, ALICE).is_err());
        assert!(k.open(&old, ALICE).is_err());
    }

    #[test]
    fn masking() {
        assert_eq!(Secret::new("short".into()).masked(), "****");
        assert_eq!(Secret::new("12345678901".into()).masked(), "****");
        assert_eq!(Secret::new("sk-abcdefgh1234".into()).masked(), "sk-a…1234");
    }

    /// The operator reads these; they say which line is wrong, never what it holds.
    #[test]
    fn key_file_errors_keep_their_text() {
        let k = MasterKey::generate_base64();
        let text = |t: &str| MasterKey::from_text(t).err().map(|e| e.to_string());
        let cases = [
            (String::new(), "the master key file holds no key"),
            (
                "not base64!".into(),
                "the master key file is not base64 text of 32 bytes",
            ),
            (
                format!("v2:{}", *k),
                "a keyring without version 1 needs an `id:` line",
            ),
            (
                format!("id:AAAA\nv1:{}", *k),
                "the id line of the master key file does not hold exactly 32 bytes",
            ),
            (
                format!("v3:AAAA\nv1:{}", *k),
                "version 3 of the master key file does not hold exactly 32 bytes",
            ),
            (
                format!("x1:{}\nv1:{}", *k, *k),
                "the master key file has an unknown line tag `x1`",
            ),
            (
                format!("stray\nv1:{}", *k),
                "the master key file has a line that is neither `id:…` nor `vN:…`",
            ),
            (
                format!("v1:{}\nv1:{}", *k, *k),
                "the master key file has version 1 twice",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(text(&input).as_deref(), Some(want));
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        write_private(&path, "\n", true).unwrap();
        let e = MasterKey::read_file(&path).err().unwrap().to_string();
        let shown = path.display();
        assert_eq!(
            e,
            format!("master key {shown}: the master key file holds no key")
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = MasterKey::read_file(&path).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "master key {shown} is readable by group or others (mode 640); run: chmod 600 {shown}"
            )
        );
        let gone = dir.path().join("gone.key");
        let e = MasterKey::read_file(&gone).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "cannot read master key {}: No such file or directory (os error 2)",
                gone.display()
            )
        );
    }
}
