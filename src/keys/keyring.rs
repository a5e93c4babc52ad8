//! The keyring: its versions (`Ring`), the key file's text format, and the errors of
//! loading or creating it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aes_gcm::{Aes256Gcm, KeyInit};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Loading or creating the master key failed; the message is for the operator.
/// Holds paths, line tags, version numbers and causes: never a byte of a key.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("cannot read master key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is open to group or others; `mode` holds its permission bits.
    #[error(
        "master key {} is readable by group or others (mode {mode:o}); run: chmod 600 {}",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// The text of the file at `path` is not a key file.
    #[error("master key {}: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: Box<MasterKeyError>,
    },
    #[error("cannot create master key {}: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{line} is not base64 text of 32 bytes")]
    NotBase64 { line: KeyLine },
    #[error("{line} does not hold exactly 32 bytes")]
    WrongLength { line: KeyLine },
    #[error("the master key file holds no key")]
    Empty,
    #[error("a keyring without version 1 needs an `id:` line")]
    NoIdLine,
    #[error("the master key file has a line that is neither `id:…` nor `vN:…`")]
    UntaggedLine,
    #[error("the master key file has an unknown line tag `{tag}`")]
    UnknownTag { tag: String },
    #[error("the master key file has version {version} twice")]
    DuplicateVersion { version: u32 },
}

/// Which part of a key file a decoding error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLine {
    /// The one bare line of a single-key file.
    Whole,
    /// The `id:` line of a keyring.
    Id,
    /// The `vN:` line of a keyring.
    Version(u32),
}

impl std::fmt::Display for KeyLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyLine::Whole => f.write_str("the master key file"),
            KeyLine::Id => f.write_str("the id line of the master key file"),
            KeyLine::Version(v) => write!(f, "version {v} of the master key file"),
        }
    }
}

/// One immutable set of key versions.
pub(super) struct Ring {
    /// Version → raw key bytes (kept to write the keyring file back).
    pub(super) keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
    pub(super) ciphers: BTreeMap<u32, Aes256Gcm>,
    /// The version new values are sealed with: the highest.
    pub(super) current: u32,
    /// Keys the HMAC behind `key_id`s. Stable across rotations, so ids never change.
    pub(super) id_key: Zeroizing<[u8; 32]>,
}

fn derive_id_key(v1: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(v1).expect("HMAC takes any key");
    mac.update(b"apikeyd key-id v1");
    let mut id_key = Zeroizing::new([0u8; 32]);
    id_key.copy_from_slice(&mac.finalize().into_bytes());
    id_key
}

fn decode_32(text: &str, line: KeyLine) -> Result<Zeroizing<[u8; 32]>, MasterKeyError> {
    let bytes = Zeroizing::new(
        B64.decode(text.trim())
            .map_err(|_| MasterKeyError::NotBase64 { line })?,
    );
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| MasterKeyError::WrongLength { line })?;
    Ok(Zeroizing::new(arr))
}

impl Ring {
    pub(super) fn new(
        keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
        id_key: Option<Zeroizing<[u8; 32]>>,
    ) -> Result<Ring, MasterKeyError> {
        let current = *keys.keys().next_back().ok_or(MasterKeyError::Empty)?;
        let id_key = match id_key {
            Some(k) => k,
            None => derive_id_key(keys.get(&1).ok_or(MasterKeyError::NoIdLine)?),
        };
        let ciphers = keys
            .iter()
            .map(|(v, k)| (*v, Aes256Gcm::new((&**k).into())))
            .collect();
        Ok(Ring {
            keys,
            ciphers,
            current,
            id_key,
        })
    }

    /// Parses a key file (docs/security.md, "The keyring and rotation"): either one
    /// bare base64 line (version 1, as first starts write it), or a keyring of
    /// `vN:<base64>` lines with an `id:<base64>` line, as rotation writes it. `#`
    /// starts a comment line.
    pub(super) fn parse(text: &str) -> Result<Ring, MasterKeyError> {
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let mut keys = BTreeMap::new();
        let mut id_key = None;
        if let [only] = lines.as_slice() {
            if !only.contains(':') {
                keys.insert(1, decode_32(only, KeyLine::Whole)?);
                return Ring::new(keys, None);
            }
        }
        for line in lines {
            let (tag, value) = line.split_once(':').ok_or(MasterKeyError::UntaggedLine)?;
            if tag == "id" {
                id_key = Some(decode_32(value, KeyLine::Id)?);
                continue;
            }
            let version: u32 = tag
                .strip_prefix('v')
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| MasterKeyError::UnknownTag {
                    tag: tag.to_string(),
                })?;
            let key = decode_32(value, KeyLine::Version(version))?;
            if keys.insert(version, key).is_some() {
                return Err(MasterKeyError::DuplicateVersion { version });
            }
        }
        Ring::new(keys, id_key)
    }

    pub(super) fn to_text(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::from(
            "# apikeyd keyring: keep it secret, mode 0600, backed up with the keystore\n",
        ));
        out.push_str("id:");
        out.push_str(&B64.encode(*self.id_key));
        out.push('\n');
        for (v, k) in &self.keys {
            out.push_str(&format!("v{v}:"));
            out.push_str(&B64.encode(**k));
            out.push('\n');
        }
        out
    }
}
