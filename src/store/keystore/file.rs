//! The keystore file: its schema, a connection with the pragmas every connection
//! needs, and the errors of opening it. Opening it for the daemon or a tool is
//! `open`, the deferred integrity check `integrity`, the master key rules
//! `master_key`.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::keys::MasterKeyError;
use crate::model::idempotency::{self, Idem, Written};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_keys (
    user_id TEXT NOT NULL,
    service TEXT NOT NULL,
    sealed BLOB NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, service)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pool_keys (
    channel_id TEXT NOT NULL,          -- '' for the global pool
    service TEXT NOT NULL,
    key_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    label TEXT,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (channel_id, service, key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota (
    day TEXT NOT NULL,
    user_id TEXT NOT NULL,
    tool_name TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, user_id, tool_name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pool_health (
    channel_id TEXT NOT NULL,          -- '' for the global pool
    service TEXT NOT NULL,
    key_id TEXT NOT NULL,
    cooling_until INTEGER NOT NULL,
    disabled INTEGER NOT NULL,
    errors_since INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    PRIMARY KEY (channel_id, service, key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pool_counts (
    day TEXT NOT NULL,
    channel_id TEXT NOT NULL,
    service TEXT NOT NULL,
    key_id TEXT NOT NULL,
    counter TEXT NOT NULL,             -- picks, ok, rate_limited, unauthorized, errors
    count INTEGER NOT NULL,
    PRIMARY KEY (day, channel_id, service, key_id, counter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_key_rejected (
    user_id TEXT NOT NULL,
    service TEXT NOT NULL,
    reported_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, service)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_key_owner (
    user_id TEXT NOT NULL,
    service TEXT NOT NULL,
    uid INTEGER NOT NULL,              -- the client uid that stored the key
    PRIMARY KEY (user_id, service)
) WITHOUT ROWID;
PRAGMA user_version = 1;
";

/// Opening the keystore and its master key failed (at start, or in a tool); the
/// message tells the operator what to do. Holds paths and causes, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("keystore {}: cannot create its folder: {source}", path.display())]
    CreateFolder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keystore {}: cannot open: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("keystore {}: cannot read (is it an SQLite file?): {source}", path.display())]
    NotSqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// `PRAGMA quick_check` answered `check` instead of `ok`.
    #[error(
        "keystore {}: integrity check failed; restore it from a backup: {check}",
        path.display()
    )]
    Corrupt { path: PathBuf, check: String },
    #[error("keystore {}: cannot create the schema: {source}", path.display())]
    Schema {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("keystore {}: cannot read the keystore: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// Reading the check value, or a stored key to try the master key on.
    #[error("cannot read the keystore: {0}")]
    ReadCheck(#[source] rusqlite::Error),
    #[error("cannot write the keystore: {0}")]
    WriteCheck(#[source] rusqlite::Error),
    #[error(
        "the master key does not decrypt this keystore; start with the key file it was written with"
    )]
    WrongMasterKey,
    #[error(
        "master key {} is missing but the keystore {} holds keys; \
         restore the key file from your backup (without it those keys cannot be decrypted)",
        key_file.display(),
        keystore.display()
    )]
    MasterKeyMissing {
        key_file: PathBuf,
        keystore: PathBuf,
    },
    #[error(transparent)]
    MasterKey(#[from] MasterKeyError),
    /// In Redis mode a new master key may not be made (the fleet's refusal, from
    /// `fleet::may_create_key`).
    #[error(transparent)]
    NewKeyRefused(#[from] Refusal),
}

/// Why a new master key may not be made: the fleet's answer, passed in by the caller
/// so that the keystore needs nothing of the fleet.
pub type Refusal = Box<dyn std::error::Error + Send + Sync>;

/// Opens a connection to the keystore with the pragmas every connection needs:
/// WAL, and `synchronous=FULL` so a committed write survives a crash.
pub fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.busy_timeout(std::time::Duration::from_secs(5))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    Ok(db)
}

/// An actor whose writes to the keystore file are recorded by idempotency key (the
/// `Keystore` for user keys, the embedded store for pools and counters): both record
/// in the file's one idempotency table, and drop its expired records alike.
pub(crate) trait RecordsWrites: Sized {
    /// The connection the records are kept on.
    fn db(&self) -> &Connection;

    /// That connection, and when expired records were last dropped (unix seconds).
    fn records(&mut self) -> (&Connection, &mut i64);

    /// Runs `apply` once per idempotency key (see [`idempotency::once`]), dropping
    /// expired records now and then before a write that records.
    fn once<T: serde::Serialize + serde::de::DeserializeOwned>(
        &mut self,
        idem: Option<&Idem>,
        worth_recording: impl FnOnce(&T) -> bool,
        apply: impl FnOnce(&Self) -> crate::error::Result<T>,
    ) -> crate::error::Result<Written<T>> {
        if idem.is_some() {
            let (db, pruned_at) = self.records();
            idempotency::prune(db, pruned_at);
        }
        idempotency::once(self.db(), idem, worth_recording, || apply(self))
    }
}
