//! The master key rules (docs/operations.md, "The master key"): where it is read
//! from, loading or creating it, checking it against the keystore's check value and
//! its stored keys, and writing a user key row sealed with it.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::file::{KeystoreError, Refusal};
use crate::error::Result;
use crate::keys::{MasterKey, MasterKeyError, Place, Secret};
use crate::model::clock;
use crate::process::config::Config;

/// Where the master key is read from: `$CREDENTIALS_DIRECTORY/master.key` when it
/// exists (systemd `LoadCredential=`), else `keystore.master_key_file`.
pub fn master_key_path(config: &Config) -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let cred = Path::new(&dir).join("master.key");
        if cred.exists() {
            return cred;
        }
    }
    config.keystore.master_key_file.clone()
}

/// Reads the master key (never creates one): for reloads and tools.
pub fn read_master_key(config: &Config) -> Result<MasterKey, MasterKeyError> {
    MasterKey::read_file(&master_key_path(config))
}

pub(super) fn load_master_key(
    config: &Config,
    held: bool,
    may_create_key: &dyn Fn() -> Result<(), Refusal>,
) -> Result<MasterKey, KeystoreError> {
    let path = master_key_path(config);
    if path.exists() {
        tracing::info!(path = %path.display(), "master key");
        return Ok(MasterKey::read_file(&path)?);
    }
    let file = &config.keystore.master_key_file;
    if held {
        return Err(KeystoreError::MasterKeyMissing {
            key_file: file.clone(),
            keystore: config.keystore.path.clone(),
        });
    }
    may_create_key()?;
    let key = MasterKey::create_file(file)?;
    tracing::warn!(path = %file.display(), "created a new master key; back it up together with the keystore");
    Ok(key)
}

/// The `meta.keycheck` row holds a value sealed with the master key: if it does not
/// open, the key is not the one the keystore was written with.
pub(super) fn verify_master_key(
    db: &Connection,
    key: &MasterKey,
    held: bool,
) -> Result<(), KeystoreError> {
    let place = Place::Meta("keycheck");
    match check_master_key(db, key, held)? {
        KeyCheck::Opens => return Ok(()),
        KeyCheck::Wrong => return Err(KeystoreError::WrongMasterKey),
        KeyCheck::Unchecked => {}
    }
    let sealed = key.seal(b"apikeyd", place);
    db.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES ('keycheck', ?1)",
        params![sealed],
    )
    .map_err(KeystoreError::WriteCheck)?;
    Ok(())
}

/// What the keystore says of a master key.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// It opens the check value.
    Opens,
    /// It is not the keystore's key.
    Wrong,
    /// Nothing proves either way (no keys held, or the check value is gone and a
    /// stored key opens): the check value is to be written.
    Unchecked,
}

/// Whether `key` is the keystore's (`held`: the keystore holds keys). Reads only:
/// the start (which then writes the check value) and the start-up preflight share it.
pub fn check_master_key(
    db: &Connection,
    key: &MasterKey,
    held: bool,
) -> Result<KeyCheck, KeystoreError> {
    let sealed: Option<Vec<u8>> = db
        .query_row("SELECT value FROM meta WHERE name = 'keycheck'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(KeystoreError::ReadCheck)?;
    Ok(match sealed {
        Some(s) if key.open(&s, Place::Meta("keycheck")).is_ok() => KeyCheck::Opens,
        Some(_) if held => KeyCheck::Wrong,
        // Keys are held but the check value is gone (deleted by whoever can write
        // the file): a stored key must open, or this is not the keystore's key.
        None if held && !opens_a_stored_key(db, key)? => KeyCheck::Wrong,
        _ => KeyCheck::Unchecked,
    })
}

/// Whether `key` opens one stored key (a user key, else a pool key) of `db`.
pub(super) fn opens_a_stored_key(db: &Connection, key: &MasterKey) -> Result<bool, KeystoreError> {
    let fail = KeystoreError::ReadCheck;
    let user: Option<(String, String, Vec<u8>)> = db
        .query_row(
            "SELECT user_id, service, sealed FROM user_keys LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(fail)?;
    if let Some((user_id, service, sealed)) = user {
        let place = Place::User {
            user_id: &user_id,
            service: &service,
        };
        return Ok(key.open(&sealed, place).is_ok());
    }
    let pool: Option<(String, String, String, Vec<u8>)> = db
        .query_row(
            "SELECT channel_id, service, key_id, sealed FROM pool_keys LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()
        .map_err(fail)?;
    Ok(pool.is_some_and(|(channel, service, key_id, sealed)| {
        let place = Place::Pool {
            namespace: "sqlite",
            channel: Some(channel.as_str()).filter(|c| !c.is_empty()),
            service: &service,
            key_id: &key_id,
        };
        key.open(&sealed, place).is_ok()
    }))
}

/// Seals `key` for (user, service) and commits it, replacing any earlier key.
/// Shared by the `Keystore` actor and `apikeyd import-legacy`.
pub fn store_user_key(
    db: &Connection,
    master: &MasterKey,
    user_id: &str,
    service: &str,
    key: &Secret,
) -> Result<()> {
    let sealed = master.seal(key.expose().as_bytes(), Place::User { user_id, service });
    db.prepare_cached(
        "INSERT INTO user_keys (user_id, service, sealed, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id, service) DO UPDATE SET sealed = ?3, updated_at = ?4",
    )?
    .execute(params![user_id, service, sealed, clock::now_s()])?;
    // A new key is not the one the provider rejected, and whoever stored the old
    // one does not own it (the caller records the new owner, when it knows it).
    db.prepare_cached("DELETE FROM user_key_rejected WHERE user_id = ?1 AND service = ?2")?
        .execute(params![user_id, service])?;
    db.prepare_cached("DELETE FROM user_key_owner WHERE user_id = ?1 AND service = ?2")?
        .execute(params![user_id, service])?;
    Ok(())
}

/// Whether `key` opens the keystore's check value.
pub fn opens_keycheck(db: &Connection, key: &MasterKey) -> rusqlite::Result<bool> {
    let sealed: Option<Vec<u8>> = db
        .query_row("SELECT value FROM meta WHERE name = 'keycheck'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(sealed.is_some_and(|s| key.open(&s, Place::Meta("keycheck")).is_ok()))
}
