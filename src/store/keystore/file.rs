//! The keystore file: its schema, opening it with the pragmas every connection
//! needs, the start-up integrity check and clean-shutdown marker, the master key
//! rules of SPEC §4 (load, create, check value), and writing a user key row.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::Result;
use crate::keys::{MasterKey, MasterKeyError, Place, Secret};
use crate::model::clock;
use crate::process::config::Config;

const SCHEMA: &str = "
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
fn closed_cleanly(path: &Path) -> bool {
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
/// the master key, applying the rules of SPEC §4. Returns `connections` connections.
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

fn open_checked(
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
const DEFER_CHECK_FROM: u64 = 4 << 20;

fn big_enough_to_defer(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() >= DEFER_CHECK_FROM)
}

/// Whether every object SCHEMA creates exists, the file's `user_version` is SCHEMA's
/// and the master key's check value is stored: then opening writes nothing.
fn established(db: &Connection) -> rusqlite::Result<bool> {
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
fn holds_keys(db: &Connection) -> bool {
    db.query_row(
        "SELECT EXISTS (SELECT 1 FROM user_keys) OR EXISTS (SELECT 1 FROM pool_keys)",
        [],
        |r| r.get(0),
    )
    .unwrap_or(false)
}

/// Whether the keystore may be written: closed until its full check has passed.
#[derive(Default)]
pub struct WriteGate(std::sync::atomic::AtomicBool);

impl WriteGate {
    fn is_open(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Makes `db` refuse, while the gate is closed, every statement that could write
    /// (SQLITE_AUTH, answered as `unavailable`): only reads, transactions and pragmas
    /// that only read are allowed. SQLite asks when a statement is prepared; a
    /// refused statement is not cached, so it is asked again next time.
    fn guard(self: &Arc<Self>, db: &Connection) {
        use rusqlite::hooks::{AuthAction, Authorization};
        let gate = self.clone();
        db.authorizer(Some(move |ctx: rusqlite::hooks::AuthContext<'_>| {
            let reads = matches!(
                ctx.action,
                AuthAction::Select
                    | AuthAction::Read { .. }
                    | AuthAction::Function { .. }
                    | AuthAction::Recursive
                    | AuthAction::Transaction { .. }
                    | AuthAction::Savepoint { .. }
                    | AuthAction::Pragma {
                        pragma_value: None,
                        ..
                    }
            );
            if reads || gate.is_open() {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }));
    }
}

/// The full integrity check of a keystore opened by [`open_serving`] without it.
pub struct PendingCheck {
    path: PathBuf,
    gate: Arc<WriteGate>,
}

impl PendingCheck {
    /// Runs `PRAGMA quick_check` on a connection of its own, on a thread of its own.
    /// When it passes, writes are accepted; when it fails (or cannot run), they stay
    /// refused and `on_failure` is called on that thread with the refusal.
    pub fn spawn(
        self,
        on_failure: impl FnOnce(KeystoreError) + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("keystore-check".into())
            .spawn(move || {
                // Below the threads that serve: the check may take a while, requests
                // should not wait for it. (On Linux the nice value is per thread.)
                // SAFETY: setpriority on this thread's own id changes nothing else.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
                }
                let began = std::time::Instant::now();
                match self.run() {
                    Ok(()) => {
                        self.gate
                            .0
                            .store(true, std::sync::atomic::Ordering::Release);
                        tracing::info!(
                            ms = began.elapsed().as_millis() as u64,
                            "keystore integrity check passed; writes accepted"
                        );
                    }
                    Err(e) => on_failure(e),
                }
            })
    }

    fn run(&self) -> Result<(), KeystoreError> {
        test_hook_wait();
        let db = connect(&self.path).map_err(|source| KeystoreError::Open {
            path: self.path.clone(),
            source,
        })?;
        let check: String = db
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|source| KeystoreError::NotSqlite {
                path: self.path.clone(),
                source,
            })?;
        if check == "ok" {
            Ok(())
        } else {
            Err(KeystoreError::Corrupt {
                path: self.path.clone(),
                check,
            })
        }
    }
}

/// Tests only (debug builds with `APIKEYD_TEST_HOOKS` set): the background check
/// waits until the file named by `APIKEYD_TEST_KEYSTORE_CHECK_GATE` exists, so a
/// test sees the daemon before the check has run.
/// With it, the check is deferred whatever the keystore's size.
fn test_hook_wait() {
    if let Some(file) = test_hook_gate() {
        while !file.exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

fn test_hook_gate() -> Option<PathBuf> {
    if !cfg!(debug_assertions) || std::env::var_os("APIKEYD_TEST_HOOKS").is_none() {
        return None;
    }
    std::env::var_os("APIKEYD_TEST_KEYSTORE_CHECK_GATE").map(PathBuf::from)
}

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

fn load_master_key(
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
fn verify_master_key(db: &Connection, key: &MasterKey, held: bool) -> Result<(), KeystoreError> {
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
fn opens_a_stored_key(db: &Connection, key: &MasterKey) -> Result<bool, KeystoreError> {
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
