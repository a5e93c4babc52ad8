//! Opening the keystore for the daemon or a tool: the folder, the schema on a first
//! start, the master key loaded and checked, the full integrity check now or
//! deferred, the clean-shutdown marker, and one connection per keystore thread.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;

use rusqlite::Connection;

use super::file::{connect, KeystoreError, Refusal, SCHEMA};
use super::integrity::{test_hook_gate, PendingCheck, WriteGate};
use super::master_key::{load_master_key, verify_master_key};
use crate::keys::MasterKey;
use crate::process::config::Config;

/// `<keystore>.clean`: written at a clean shutdown with the file's size and mtime.
pub(super) fn clean_marker(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".clean");
    p.into()
}

/// Size and modification time (ns) of a file, as the clean marker records them.
pub(super) fn fingerprint(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!("{} {} {}", m.len(), m.mtime(), m.mtime_nsec()))
}

/// Whether the keystore is exactly as a clean shutdown left it (marker matches, WAL
/// empty), so the O(size) `quick_check` can be skipped. Always removes the marker:
/// whatever happens during this run, the next start decides afresh.
pub(super) fn closed_cleanly(path: &Path) -> bool {
    let marker = clean_marker(path);
    let recorded = std::fs::read_to_string(&marker).ok();
    let _ = std::fs::remove_file(&marker);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal_empty = std::fs::metadata(std::path::PathBuf::from(wal)).map_or(true, |m| m.len() == 0);
    wal_empty && recorded.is_some() && recorded == fingerprint(path)
}

/// The keystore opened and checked at start: the master key and `n` connections.
pub struct Opened {
    pub key: Arc<MasterKey>,
    pub connections: Vec<Connection>,
    /// The daemon's exclusive lock on the keystore, held for as long as this lives.
    pub lock: Option<crate::process::lock::KeystoreLock>,
    /// Redis mode: whether the key was checked against the fleet's at start.
    pub fleet_verified: bool,
    /// The full integrity check still to run (see [`open_serving`]); until it passes
    /// every connection above refuses writes.
    pub check: Option<PendingCheck>,
}

/// Creates the keystore's folder (0700) when it is missing.
pub fn create_folder(path: &Path) -> Result<(), KeystoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| KeystoreError::CreateFolder {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

/// Opens the keystore, creates the schema, and loads (or on a first start creates)
/// the master key, applying the rules of docs/operations.md, "The master key".
/// Returns `connections` connections.
pub fn open(config: &Config, connections: usize) -> Result<Opened, KeystoreError> {
    open_with(config, connections, &|| Ok(()))
}

/// [`open`], asking `may_create_key` before a new master key is made (in Redis mode
/// the fleet's check: a new key must not be made while Redis holds a fleet's).
pub fn open_with(
    config: &Config,
    connections: usize,
    may_create_key: &dyn Fn() -> Result<(), Refusal>,
) -> Result<Opened, KeystoreError> {
    open_checked(config, connections, may_create_key, false)
}

/// [`open_with`] for the daemon: a keystore that holds keys, has its whole schema
/// and was not closed cleanly is not checked before this returns. Its full
/// `quick_check` is left in [`Opened::check`], to run in the background while the
/// daemon serves reads; until it passes, the connections refuse every write (and
/// the WAL checkpoint), so nothing is built on a file that may be corrupt and the
/// file itself is not touched. Reads are served meanwhile: every key is sealed with
/// AES-256-GCM bound to its place, so a corrupt row cannot be served as a key.
pub fn open_serving(
    config: &Config,
    connections: usize,
    may_create_key: &dyn Fn() -> Result<(), Refusal>,
) -> Result<Opened, KeystoreError> {
    open_checked(config, connections, may_create_key, true)
}

pub(super) fn open_checked(
    config: &Config,
    connections: usize,
    may_create_key: &dyn Fn() -> Result<(), Refusal>,
    background: bool,
) -> Result<Opened, KeystoreError> {
    let path = &config.keystore.path;
    let open = |source| KeystoreError::Open {
        path: path.clone(),
        source,
    };
    let not_sqlite = |source| KeystoreError::NotSqlite {
        path: path.clone(),
        source,
    };
    create_folder(path)?;
    let unchanged = closed_cleanly(path);
    let db = connect(path).map_err(open)?;
    // Deferred only for a file whose check would delay the start (a smaller one is
    // checked at once, in a few milliseconds), and where opening writes nothing: the
    // schema complete, the check value present, keys held.
    let deferred = background
        && !unchanged
        && (big_enough_to_defer(path) || test_hook_gate().is_some())
        && established(&db).map_err(not_sqlite)?
        && holds_keys(&db);
    if unchanged {
        tracing::info!(
            "keystore was closed cleanly and is unchanged since; skipping the full check"
        );
        db.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
            .map_err(not_sqlite)?;
    } else if deferred {
        tracing::info!(
            "keystore was not closed cleanly: its full integrity check runs in the background; \
             writes are refused until it passes"
        );
    } else {
        let check: String = db
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(not_sqlite)?;
        if check != "ok" {
            return Err(KeystoreError::Corrupt {
                path: path.clone(),
                check,
            });
        }
    }
    if !deferred {
        db.execute_batch(SCHEMA)
            .map_err(|source| KeystoreError::Schema {
                path: path.clone(),
                source,
            })?;
    }
    // Whether any key is stored; counting them all would cost a scan at start.
    let held: bool = db
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM user_keys) OR EXISTS (SELECT 1 FROM pool_keys)",
            [],
            |r| r.get(0),
        )
        .map_err(|source| KeystoreError::Unreadable {
            path: path.clone(),
            source,
        })?;

    let key = load_master_key(config, held, may_create_key)?;
    verify_master_key(&db, &key, held)?;

    let mut conns = vec![db];
    while conns.len() < connections {
        conns.push(connect(path).map_err(open)?);
    }
    let check = deferred.then(|| PendingCheck {
        path: path.clone(),
        gate: Arc::new(WriteGate::default()),
    });
    if let Some(c) = &check {
        for db in &conns {
            c.gate.guard(db);
        }
    }
    Ok(Opened {
        key: Arc::new(key),
        connections: conns,
        lock: None,
        fleet_verified: false,
        check,
    })
}

/// From this size on, a keystore's full check (about 2 ms per MiB when the file is
/// in the page cache) runs in the background rather than before the daemon serves.
pub(super) const DEFER_CHECK_FROM: u64 = 4 << 20;

pub(super) fn big_enough_to_defer(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() >= DEFER_CHECK_FROM)
}

/// Whether every object SCHEMA creates exists, the file's `user_version` is SCHEMA's
/// and the master key's check value is stored: then opening writes nothing.
pub(super) fn established(db: &Connection) -> rusqlite::Result<bool> {
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let wanted = SCHEMA
        .split("PRAGMA user_version =")
        .nth(1)
        .and_then(|v| v.trim().trim_end_matches(';').trim().parse::<i64>().ok());
    if Some(version) != wanted {
        return Ok(false);
    }
    for name in SCHEMA
        .split("IF NOT EXISTS ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
    {
        let exists: bool = db.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = ?1)",
            [name],
            |r| r.get(0),
        )?;
        if !exists {
            return Ok(false);
        }
    }
    db.query_row(
        "SELECT EXISTS (SELECT 1 FROM meta WHERE name = 'keycheck')",
        [],
        |r| r.get(0),
    )
}

/// Whether any key is stored (the tables exist).
pub(super) fn holds_keys(db: &Connection) -> bool {
    db.query_row(
        "SELECT EXISTS (SELECT 1 FROM user_keys) OR EXISTS (SELECT 1 FROM pool_keys)",
        [],
        |r| r.get(0),
    )
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Until the gate opens a guarded connection reads but refuses every write, the
    /// WAL checkpoint of a clean stop included, with SQLITE_AUTH; then it writes.
    #[test]
    fn a_closed_gate_refuses_writes_and_checkpoints_but_not_reads() {
        let dir = tempfile::tempdir().unwrap();
        let db = connect(&dir.path().join("k.sqlite3")).unwrap();
        db.execute_batch(SCHEMA).unwrap();
        db.execute("INSERT INTO meta VALUES ('a', x'01')", [])
            .unwrap();
        let gate = Arc::new(WriteGate::default());
        gate.guard(&db);
        let read =
            |db: &Connection| db.query_row("SELECT count(*) FROM meta", [], |r| r.get::<_, i64>(0));
        assert_eq!(read(&db).unwrap(), 1);
        let refused = |e: rusqlite::Error| {
            e.sqlite_error_code() == Some(rusqlite::ErrorCode::AuthorizationForStatementDenied)
        };
        for write in [
            "INSERT INTO meta VALUES ('b', x'02')",
            "UPDATE meta SET value = x'03'",
            "DELETE FROM meta",
            "CREATE TABLE t (x)",
            "PRAGMA user_version = 7",
        ] {
            assert!(refused(db.execute_batch(write).unwrap_err()), "{write}");
        }
        assert!(refused(
            db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap_err()
        ));
        db.query_row("PRAGMA user_version", [], |_| Ok(())).unwrap();
        assert_eq!(read(&db).unwrap(), 1);
        assert_eq!(
            crate::error::Error::from(db.execute("DELETE FROM meta", []).unwrap_err()).code(),
            "unavailable"
        );
        gate.0.store(true, std::sync::atomic::Ordering::Release);
        db.execute("INSERT INTO meta VALUES ('b', x'02')", [])
            .unwrap();
        assert_eq!(read(&db).unwrap(), 2);
    }

    /// `established` reads SCHEMA's objects and version: a fresh file is not, a file
    /// with the whole schema and a check value is.
    #[test]
    fn only_a_keystore_with_its_whole_schema_is_established() {
        let dir = tempfile::tempdir().unwrap();
        let db = connect(&dir.path().join("k.sqlite3")).unwrap();
        assert!(!established(&db).unwrap());
        db.execute_batch(SCHEMA).unwrap();
        assert!(!established(&db).unwrap(), "no check value yet");
        db.execute("INSERT INTO meta VALUES ('keycheck', x'01')", [])
            .unwrap();
        assert!(established(&db).unwrap());
        db.execute_batch("DROP TABLE user_key_rejected").unwrap();
        assert!(!established(&db).unwrap());
        assert!(!holds_keys(&db));
    }

    #[test]
    fn refusals_keep_their_text() {
        let cases = [
            (
                KeystoreError::Corrupt {
                    path: "/ks".into(),
                    check: "row 3 missing".into(),
                },
                "keystore /ks: integrity check failed; restore it from a backup: row 3 missing",
            ),
            (
                KeystoreError::MasterKeyMissing {
                    key_file: "/k".into(),
                    keystore: "/ks".into(),
                },
                "master key /k is missing but the keystore /ks holds keys; \
                 restore the key file from your backup (without it those keys cannot be decrypted)",
            ),
            (
                KeystoreError::WrongMasterKey,
                "the master key does not decrypt this keystore; start with the key file it was written with",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
        let dir = tempfile::tempdir().unwrap();
        let not_db = dir.path().join("keystore.sqlite3");
        std::fs::write(
            &not_db,
            "not an SQLite file, and long enough to have a header",
        )
        .unwrap();
        let e = open(
            &Config::parse(&format!(
                "keystore.path = {:?}\nkeystore.master_key_file = {:?}",
                not_db,
                dir.path().join("master.key")
            ))
            .unwrap(),
            1,
        )
        .err()
        .unwrap()
        .to_string();
        assert_eq!(
            e,
            format!(
                "keystore {}: cannot open: file is not a database",
                not_db.display()
            )
        );
    }
}
