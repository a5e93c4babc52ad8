//! `apikeyd check-config`: everything `serve` checks before it binds (config values,
//! access names, paths and their permissions, the master key against the keystore,
//! Redis), done without binding, creating or changing anything.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::config::Config;
use crate::crypto::MasterKey;

/// What `check` found.
#[derive(Default)]
pub struct Report {
    /// Each would refuse the start.
    pub problems: Vec<String>,
    /// Worth knowing, but `serve` would start.
    pub notes: Vec<String>,
    /// The effective configuration as TOML, without secrets (when it could be read).
    pub effective: Option<String>,
}

/// Checks the config at `path` (`must_exist` as for `serve`).
pub fn check(path: &Path, must_exist: bool) -> Report {
    let mut r = Report::default();
    let config = match Config::load(path, must_exist) {
        Ok(c) => c,
        Err(e) => {
            r.problems.push(e.to_string());
            return r;
        }
    };
    r.effective = effective(&config);
    check_keystore(&config, &mut r);
    check_socket(&config, &mut r);
    check_audit(&config, &mut r);
    check_redis(&config, &mut r);
    r
}

/// The config as TOML with the Redis password (if any) replaced by `***`.
fn effective(config: &Config) -> Option<String> {
    let mut shown = config.clone();
    shown.redis.url = redact_url(&shown.redis.url);
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

fn check_keystore(config: &Config, r: &mut Report) {
    let store = &config.keystore.path;
    let key_path = crate::actors::keystore::master_key_path(config);
    let key = if key_path.exists() {
        match MasterKey::read_file(&key_path) {
            Ok(k) => Some(k),
            Err(e) => {
                r.problems.push(e.to_string());
                return;
            }
        }
    } else {
        None
    };
    if !store.exists() {
        match store.parent() {
            Some(dir) if dir.exists() && !writable(dir) => r.problems.push(format!(
                "keystore {} does not exist and its folder {} is not writable",
                store.display(),
                dir.display()
            )),
            _ => r.notes.push(format!(
                "keystore {} does not exist yet; serve creates it",
                store.display()
            )),
        }
        if key.is_none() {
            r.notes.push(format!(
                "master key {} does not exist yet; serve creates it on the first start",
                config.keystore.master_key_file.display()
            ));
        }
        return;
    }
    let db = match Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY) {
        Ok(db) => db,
        Err(e) => {
            r.problems
                .push(format!("keystore {}: cannot open: {e}", store.display()));
            return;
        }
    };
    let exists = |table: &str| -> bool {
        db.query_row(
            &format!("SELECT EXISTS (SELECT 1 FROM {table})"),
            [],
            |row| row.get(0),
        )
        .unwrap_or(false)
    };
    let held = exists("user_keys") || exists("pool_keys");
    match key {
        None if held => r.problems.push(format!(
            "master key {} is missing but the keystore {} holds keys; restore the key file from your backup",
            config.keystore.master_key_file.display(),
            store.display()
        )),
        None => r.notes.push(format!(
            "master key {} does not exist yet; serve creates it on the first start",
            config.keystore.master_key_file.display()
        )),
        Some(key) => match crate::actors::keystore::opens_keycheck(&db, &key) {
            Ok(true) => {}
            Ok(false) if held => r.problems.push(
                "the master key does not decrypt this keystore; use the key file it was written with"
                    .into(),
            ),
            Ok(false) => {}
            Err(e) => r.problems.push(format!(
                "keystore {}: cannot read (is it an SQLite file?): {e}",
                store.display()
            )),
        },
    }
}

fn check_socket(config: &Config, r: &mut Report) {
    let socket = &config.server.socket;
    if let Some(dir) = socket.parent().filter(|d| d.exists()) {
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode();
            if mode & 0o002 != 0 {
                r.problems.push(format!(
                    "the socket's folder {} is writable by everyone (mode {:o}); use a private folder such as /run/apikeyd",
                    dir.display(),
                    mode & 0o7777
                ));
            }
        }
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if !meta.file_type().is_socket() => r.problems.push(format!(
            "server.socket {} exists and is not a socket",
            socket.display()
        )),
        Ok(_) if std::os::unix::net::UnixStream::connect(socket).is_ok() => r.notes.push(format!(
            "a daemon is listening on {} now; a second serve would refuse until it stops",
            socket.display()
        )),
        _ => {}
    }
}

fn check_audit(config: &Config, r: &mut Report) {
    let Some(path) = &config.log.audit_file else {
        return;
    };
    if path.exists() {
        if let Err(e) = std::fs::OpenOptions::new().append(true).open(path) {
            r.problems.push(format!(
                "cannot open log.audit_file {} for appending: {e}",
                path.display()
            ));
        }
        return;
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d.exists() {
            if !d.is_dir() || !writable(d) {
                r.problems.push(format!(
                    "cannot create log.audit_file {}: {} is not a writable folder",
                    path.display(),
                    d.display()
                ));
            }
            return;
        }
        dir = d.parent();
    }
}

fn check_redis(config: &Config, r: &mut Report) {
    if config.redis.url.is_empty() {
        return;
    }
    let timeout = Duration::from_millis(config.redis.timeout_ms.max(1)).max(Duration::from_secs(1));
    let reached = redis::Client::open(config.redis.url.as_str())
        .and_then(|c| c.get_connection_with_timeout(timeout))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    if let Err(e) = reached {
        r.problems.push(format!(
            "Redis at {} does not answer: {}",
            redact_url(&config.redis.url),
            crate::actors::redis::describe_error(&e)
        ));
    }
}

/// Whether this process may create files in `dir`.
fn writable(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: access() reads a NUL-terminated path and has no other preconditions.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
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
