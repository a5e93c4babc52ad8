//! The start-up preflight: every check `serve` runs before it creates, binds or
//! changes anything (paths and their permissions, the socket, the lock, the master
//! key against the keystore and against the fleet in Redis, the credential files).
//! `serve` refuses on its first problem; `apikeyd check-config` runs the same
//! function, goes on after a problem and prints every finding.

mod viewer;

pub use viewer::Viewer;

use rustix::fs::Access;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::keys::MasterKey;
use crate::process::config::Config;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// `serve` refuses to start.
    Problem,
    /// `serve` starts, but something is off (e.g. Redis does not answer yet).
    Warning,
}

/// One thing the preflight found.
#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    /// What is wrong and what to do, for the operator (never a secret).
    pub text: String,
}

/// Who runs the preflight: `serve` stops at the first problem (nothing after it
/// matters); `check-config` goes on to list everything, and reports a daemon that
/// runs on this config now as a warning (serve would wait for it to stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Serve,
    Check,
}

/// What the preflight found, and what `serve` carries on with.
#[derive(Default)]
pub struct Report {
    /// In the order found.
    pub findings: Vec<Finding>,
    /// Redis mode: whether Redis answered (`serve` does not wait for it twice).
    pub redis_answered: Option<bool>,
}

impl Report {
    fn problem(&mut self, text: impl Into<String>) {
        self.findings.push(Finding {
            severity: Severity::Problem,
            text: text.into(),
        });
    }

    fn warning(&mut self, text: impl Into<String>) {
        self.findings.push(Finding {
            severity: Severity::Warning,
            text: text.into(),
        });
    }

    /// The first problem found, if any.
    pub fn first_problem(&self) -> Option<&str> {
        self.findings
            .iter()
            .find(|f| f.severity == Severity::Problem)
            .map(|f| f.text.as_str())
    }

    /// How many problems were found (each would refuse the start).
    pub fn problems(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Problem)
            .count()
    }

    /// `serve` stops at the first problem.
    fn done(&self, purpose: Purpose) -> bool {
        purpose == Purpose::Serve && self.problems() > 0
    }
}

/// Every check that can refuse a start, run before anything is created, bound or
/// changed. `serve` runs it as itself and refuses on the first problem;
/// `check-config` runs it with `Purpose::Check` (and perhaps as another user).
pub fn preflight(config: &Config, viewer: &Viewer, purpose: Purpose) -> Report {
    let mut r = Report::default();
    // The keystore (and its lock, which names a running daemon) first.
    let steps: [fn(&Config, &Viewer, Purpose, &mut Report); 6] = [
        check_keystore_place,
        check_socket,
        check_audit,
        check_master_key,
        check_credentials,
        check_redis,
    ];
    for step in steps {
        step(config, viewer, purpose, &mut r);
        if r.done(purpose) {
            break;
        }
    }
    r
}

/// The config as TOML with the Redis password (if any) replaced by `***`, and
/// defaults that depend on other settings written out.
pub fn effective(config: &Config) -> Option<String> {
    let mut shown = config.clone();
    shown.redis.url = redact_url(&shown.redis.url);
    if !config.redis.url.is_empty() && shown.keystore.user_keys.is_none() {
        shown.keystore.user_keys = Some(crate::process::config::UserKeysIn::Redis);
    }
    if config.redis.url.is_empty() {
        shown.keystore.user_keys = Some(crate::process::config::UserKeysIn::Local);
    }
    toml::to_string(&shown).ok()
}

/// `url` without its password: `redis://user:***@host/0`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// Whether systemd passed this process its listening socket (then it owns the path).
fn socket_activated() -> bool {
    std::env::var("LISTEN_PID").is_ok_and(|p| p.trim() == std::process::id().to_string())
        && std::env::var_os("LISTEN_FDS").is_some()
}

/// The socket: not one of the daemon's own files; its folder not writable by
/// everyone and writable by the service user; the path free or a stale socket;
/// no daemon listening there. The metrics port free.
fn check_socket(config: &Config, viewer: &Viewer, purpose: Purpose, r: &mut Report) {
    if let Err(e) = crate::front::server::check_socket_path(config) {
        r.problem(e.to_string());
        return;
    }
    if !(purpose == Purpose::Serve && socket_activated()) {
        let socket = &config.server.socket;
        match crate::front::server::check_bind(socket) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && purpose == Purpose::Check => r
                .warning(format!(
                    "{e}: is it the daemon of this config? A second serve would refuse until it stops"
                )),
            Err(e) => r.problem(format!("cannot bind server.socket: {e}")),
            Ok(_) => {
                if let Err(dir) = viewer.may_create(socket) {
                    r.problem(format!(
                        "cannot create server.socket {}: {} may not write in {}",
                        socket.display(),
                        viewer.who(),
                        dir.display()
                    ));
                }
            }
        }
    }
    if purpose == Purpose::Check && !config.metrics.listen.is_empty() {
        if let Err(e) = std::net::TcpListener::bind(&config.metrics.listen) {
            r.warning(format!(
                "metrics.listen {} cannot be bound now ({e}); serve would refuse unless it is the running daemon's",
                config.metrics.listen
            ));
        }
    }
}

fn check_audit(config: &Config, viewer: &Viewer, _: Purpose, r: &mut Report) {
    let Some(path) = &config.log.audit_file else {
        return;
    };
    if path.exists() {
        if !path.is_file() || !viewer.may(path, Access::WRITE_OK) {
            r.problem(format!(
                "cannot open log.audit_file {} for appending: {} may not write it",
                path.display(),
                viewer.who()
            ));
        }
    } else if let Err(dir) = viewer.may_create(path) {
        r.problem(format!(
            "cannot create log.audit_file {}: {} is not a folder {} may write in",
            path.display(),
            dir.display(),
            viewer.who()
        ));
    }
}

/// `<keystore><suffix>`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

/// The keystore's folder and file: usable by the service user; no journal left
/// without its database (the keystore was moved while a daemon had it open); the
/// lock free.
fn check_keystore_place(config: &Config, viewer: &Viewer, purpose: Purpose, r: &mut Report) {
    let store = &config.keystore.path;
    let dir = match store.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if dir.exists() {
        if !dir.is_dir() || !viewer.may(&dir, Access::WRITE_OK | Access::EXEC_OK) {
            r.problem(format!(
                "the keystore's folder {} is not a folder {} may write in (SQLite keeps its journal beside the keystore)",
                dir.display(),
                viewer.who()
            ));
            return;
        }
    } else if let Err(d) = viewer.may_create(store) {
        r.problem(format!(
            "cannot create the keystore's folder {}: {} may not write in {}",
            dir.display(),
            viewer.who(),
            d.display()
        ));
        return;
    }
    if let Some(holder) = crate::process::lock::holder(store) {
        let text = format!(
            "the keystore {} is in use by {}",
            store.display(),
            holder.describe()
        );
        match purpose {
            Purpose::Serve => {
                r.problem(format!(
                    "{text}; stop it first, or give this one its own keystore.path"
                ));
                return;
            }
            Purpose::Check => r.warning(format!(
                "{text}; a second serve would refuse until it stops"
            )),
        }
    }
    if !store.exists() {
        for suffix in ["-wal", "-shm"] {
            let journal = with_suffix(store, suffix);
            if journal.exists() {
                r.problem(
                    crate::process::lock::LockError::OrphanJournal {
                        keystore: store.clone(),
                        journal,
                    }
                    .to_string(),
                );
                return;
            }
        }
        return;
    }
    if !viewer.may(store, Access::READ_OK | Access::WRITE_OK) {
        r.problem(format!(
            "{} may not read and write the keystore {}",
            viewer.who(),
            store.display()
        ));
    }
}

/// The master key as `serve` would read it (`$CREDENTIALS_DIRECTORY/master.key`,
/// else `keystore.master_key_file`): readable by the service user, private, well
/// formed and the keystore's; when missing, whether `serve` may create it.
fn check_master_key(config: &Config, viewer: &Viewer, purpose: Purpose, r: &mut Report) {
    let key_path = crate::store::keystore::master_key_path(config);
    let store = &config.keystore.path;
    let exists = match std::fs::metadata(&key_path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            r.problem(format!(
                "cannot reach the master key {}: {e}",
                key_path.display()
            ));
            return;
        }
    };
    let key = if exists {
        if !viewer.may(&key_path, Access::READ_OK) {
            r.problem(format!(
                "{} may not read the master key {}{}",
                viewer.who(),
                key_path.display(),
                if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
                    " (under systemd, pass it with LoadCredential=master.key:...; set CREDENTIALS_DIRECTORY to check that way)"
                } else {
                    ""
                }
            ));
            return;
        }
        if let Some(holder) = crate::process::lock::key_in_use(&key_path) {
            let text = format!(
                "the master key file {} is in use by {holder}",
                key_path.display()
            );
            match purpose {
                Purpose::Serve => {
                    r.problem(format!(
                        "{text}; a key file serves one keystore at a time: use that daemon's config (or stop it first)"
                    ));
                    return;
                }
                Purpose::Check => r.warning(format!(
                    "{text}; a second serve would refuse until it stops"
                )),
            }
        }
        match MasterKey::read_file(&key_path) {
            Ok(k) => Some(k),
            Err(e) => {
                r.problem(e.to_string());
                return;
            }
        }
    } else {
        None
    };
    let held = match keystore_holds_keys(store) {
        Ok(h) => h,
        Err(e) => {
            r.problem(e);
            return;
        }
    };
    match &key {
        None if held => r.problem(
            crate::store::keystore::KeystoreError::MasterKeyMissing {
                key_file: config.keystore.master_key_file.clone(),
                keystore: store.clone(),
            }
            .to_string(),
        ),
        None => {
            let file = &config.keystore.master_key_file;
            if let Err(dir) = viewer.may_create(file) {
                r.problem(format!(
                    "master key {} does not exist and {} may not create it in {}",
                    file.display(),
                    viewer.who(),
                    dir.display()
                ));
            }
        }
        Some(key) if held => {
            use crate::store::keystore::{KeyCheck, KeystoreError};
            let checked = Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(KeystoreError::ReadCheck)
                .and_then(|db| crate::store::keystore::check_master_key(&db, key, held));
            match checked {
                Ok(KeyCheck::Wrong) => r.problem(KeystoreError::WrongMasterKey.to_string()),
                Ok(_) => {}
                Err(e) => r.problem(format!("keystore {}: {e}", store.display())),
            }
        }
        Some(_) => {}
    }
}

/// Whether the keystore (if it exists) holds any key; read only.
fn keystore_holds_keys(store: &Path) -> Result<bool, String> {
    if !store.exists() || std::fs::metadata(store).is_ok_and(|m| m.len() == 0) {
        return Ok(false);
    }
    let db = Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("keystore {}: cannot open: {e}", store.display()))?;
    let tables: i64 = db
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name IN ('user_keys', 'pool_keys')",
            [],
            |row| row.get(0),
        )
        .map_err(|e| {
            format!(
                "keystore {}: cannot read (is it an SQLite file?): {e}",
                store.display()
            )
        })?;
    if tables < 2 {
        return Ok(false);
    }
    db.query_row(
        "SELECT EXISTS (SELECT 1 FROM user_keys) OR EXISTS (SELECT 1 FROM pool_keys)",
        [],
        |row| row.get(0),
    )
    .map_err(|e| format!("keystore {}: cannot read: {e}", store.display()))
}

/// A file holding a secret (the Redis password, TLS client key): readable by the
/// service user, mode 0600 or 0400, owned by the service user or root.
fn check_secret_file(setting: &str, path: &Path, viewer: &Viewer, r: &mut Report) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            r.problem(format!("cannot read {setting} {}: {e}", path.display()));
            return;
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        r.problem(format!(
            "{setting} {} has mode {mode:03o}: others can read it; chmod 600 it",
            path.display()
        ));
    }
    if meta.uid() != 0 && meta.uid() != viewer.uid {
        r.problem(format!(
            "{setting} {} is owned by uid {}, not by the service user ({}) or root; chown it",
            path.display(),
            meta.uid(),
            viewer.who()
        ));
    }
    if !viewer.may(path, Access::READ_OK) {
        r.problem(format!(
            "{} may not read {setting} {}",
            viewer.who(),
            path.display()
        ));
    }
}

fn check_credentials(config: &Config, viewer: &Viewer, _: Purpose, r: &mut Report) {
    if config.redis.url.is_empty() {
        return;
    }
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| Path::new(&d).join(crate::store::redis::PASSWORD_CREDENTIAL))
        .filter(|p| p.exists());
    match (credential, &config.redis.password_file) {
        (Some(c), _) => check_secret_file("the credential redis.password", &c, viewer, r),
        (None, Some(p)) => check_secret_file("redis.password_file", p, viewer, r),
        (None, None) => {}
    }
    if let Some(p) = &config.redis.tls_key_file {
        check_secret_file("redis.tls_key_file", p, viewer, r);
    }
}

/// Redis mode: the store's own connection (URL, TLS, credentials, Sentinel), then
/// the fleet's key check, read only. Unreachable is a warning when a master key is
/// there (serve starts and checks once Redis answers), a problem when the key
/// would have to be created (serve may not make one without asking Redis).
fn check_redis(config: &Config, _: &Viewer, _: Purpose, r: &mut Report) {
    use crate::fleet::FleetError;
    if config.redis.url.is_empty() {
        return;
    }
    let key_path = crate::store::keystore::master_key_path(config);
    // A key file that is there but unusable was reported above: only the
    // connection is checked then.
    let present = std::fs::symlink_metadata(&key_path).is_ok();
    let key = MasterKey::read_file(&key_path).ok();
    let names = crate::store::keyspace::Names {
        prefix: config.redis.prefix.clone(),
    };
    let checked =
        crate::fleet::connect(&config.redis, crate::fleet::DAEMON_WAIT).and_then(|mut con| {
            match &key {
                Some(k) => crate::fleet::check(&mut con, &names, k),
                None if present => redis::cmd("PING")
                    .query::<String>(&mut con)
                    .map(drop)
                    .map_err(crate::fleet::FleetError::Unreachable),
                None => {
                    crate::fleet::refuse_new_key(&mut con, &names, &config.keystore.master_key_file)
                }
            }
        });
    r.redis_answered = Some(true);
    match checked {
        Ok(()) => {}
        Err(e) if e.is_unreachable() => {
            r.redis_answered = Some(false);
            let redis = redact_url(&config.redis.url);
            if present {
                r.warning(format!(
                    "Redis ({redis}) does not answer now ({e}); serve starts, answers unavailable for pools until it does, and checks the master key against the fleet's then"
                ));
            } else {
                r.problem(
                    FleetError::CannotCheckForFleet {
                        file: config.keystore.master_key_file.clone(),
                        source: Box::new(e),
                    }
                    .to_string(),
                );
            }
        }
        Err(e) => r.problem(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("redis://u:pw@h/0"), "redis://u:***@h/0");
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(
            redact_url("redis+unix:///run/r.sock"),
            "redis+unix:///run/r.sock"
        );
        assert_eq!(redact_url(""), "");
    }
}
