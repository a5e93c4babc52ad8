//! The keystore lock: one process at a time owns a keystore. The daemon holds an
//! exclusive `flock` on `<keystore>.lock` for its whole life and writes its pid and
//! socket into it, so a second daemon, or a tool run against the wrong socket, can
//! tell a live owner from a dead one and refuse with a name to look for.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock file of a keystore: `<keystore>.lock`, beside it.
pub fn lock_path(keystore: &Path) -> PathBuf {
    let mut p = keystore.as_os_str().to_owned();
    p.push(".lock");
    p.into()
}

/// Who holds a keystore's lock, as it wrote itself into the lock file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    /// The socket a daemon serves on; `None` for a tool.
    pub socket: Option<PathBuf>,
    /// `serve`, or the tool's subcommand.
    pub what: Option<String>,
}

impl Holder {
    fn parse(text: &str) -> Holder {
        let mut h = Holder::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("pid", v)) => h.pid = v.trim().parse().ok(),
                Some(("socket", v)) => h.socket = Some(PathBuf::from(v)),
                Some(("what", v)) => h.what = Some(v.to_string()),
                _ => {}
            }
        }
        h
    }

    /// "apikeyd serve (pid 123, socket /run/apikeyd/apikeyd.sock)".
    pub fn describe(&self) -> String {
        let pid = self
            .pid
            .map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
        let what = self.what.as_deref().unwrap_or("another process");
        match &self.socket {
            Some(s) => format!("apikeyd {what} ({pid}, socket {})", s.display()),
            None => format!("apikeyd {what} ({pid})"),
        }
    }
}

/// Taking the lock failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("the keystore {keystore} is in use by {}; stop it first, or give this one its own keystore.path", holder.describe())]
    Held { keystore: PathBuf, holder: Holder },
    /// The master key file is locked by a daemon or tool of another keystore.
    #[error(
        "the master key file {} is in use by {holder}; a key file serves one keystore at a time: \
         use that daemon's config (or stop it first); nothing changed",
        key_file.display()
    )]
    KeyHeld { key_file: PathBuf, holder: String },
    /// A journal without its database: the keystore was moved while open.
    #[error(
        "{} exists but the keystore {} does not: was the keystore moved or renamed while a daemon had it open? \
         Move it back (or remove the journal if no daemon runs); nothing was touched",
        journal.display(),
        keystore.display()
    )]
    OrphanJournal { keystore: PathBuf, journal: PathBuf },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a tool may not work on a keystore; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ToolAccessError {
    #[error(
        "the keystore {} does not exist: is keystore.path in this config the daemon's?",
        keystore.display()
    )]
    NoKeystore { keystore: PathBuf },
    /// The lock was free, yet a daemon answers on the configured socket.
    #[error(
        "a daemon (pid {pid}) answers on {}, but it does not hold the keystore {} (no daemon does): \
         this config's keystore.path is not that daemon's; use the config it runs with; nothing changed",
        socket.display(),
        keystore.display()
    )]
    NotThatDaemons {
        pid: u64,
        socket: PathBuf,
        keystore: PathBuf,
    },
    /// The lock is held, and another daemon (`pid`) answers on the configured socket.
    #[error(
        "the keystore {} is in use by {}, but the daemon answering on {} is pid {pid}: \
         this config's server.socket belongs to another daemon; nothing changed",
        keystore.display(),
        holder.describe(),
        socket.display()
    )]
    OtherDaemon {
        keystore: PathBuf,
        holder: Holder,
        socket: PathBuf,
        pid: u64,
    },
    /// The lock is held, and nothing answers on the configured socket.
    #[error(
        "the keystore {} is in use by {}, but no daemon answers on {}: \
         use the config that daemon runs with (its server.socket), or stop it first; nothing changed",
        keystore.display(),
        holder.describe(),
        socket.display()
    )]
    NoAnswer {
        keystore: PathBuf,
        holder: Holder,
        socket: PathBuf,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// An exclusive lock on a keystore, released when dropped (or when the process ends,
/// however it ends: the kernel drops `flock`s with the last descriptor).
pub struct KeystoreLock {
    _keystore: File,
    /// The note, locked too: it stays where it is when the keystore is renamed.
    _info: File,
    /// The master key file in use, locked so that no other daemon or tool uses it.
    key: Option<File>,
    /// Where the holder's pid and socket are written.
    pub path: PathBuf,
}

impl KeystoreLock {
    /// Locks the master key file at `path` too (after a reload, the file a rotation
    /// wrote in its place); refused when another process holds it.
    pub fn lock_key(&mut self, path: &Path) -> Result<(), LockError> {
        use std::os::unix::fs::MetadataExt;
        let same = |f: &File| {
            let (Ok(held), Ok(now)) = (f.metadata(), std::fs::metadata(path)) else {
                return false;
            };
            (held.dev(), held.ino()) == (now.dev(), now.ino())
        };
        if !self.key.as_ref().is_some_and(same) {
            self.key = Some(lock_key_file(path)?);
        }
        Ok(())
    }
}

/// Takes an exclusive `flock` on the master key file `path` (opened read only).
/// Refused, naming the holder, when a daemon or tool of another keystore uses it.
pub fn lock_key_file(path: &Path) -> Result<File, LockError> {
    let file = File::open(path).map_err(|source| LockError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(LockError::KeyHeld {
            key_file: path.to_path_buf(),
            holder: key_holder(path).unwrap_or_else(|| "another process".into()),
        }),
        Err(TryLockError::Error(source)) => Err(LockError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The process holding an `flock` on `path`, as /proc/locks and its command line
/// name it: "apikeyd serve --config /etc/apikeyd/config.toml (pid 123)".
pub fn key_holder(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(path).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, place) = (f.get(1)?, f.get(4)?, f.get(5)?);
        let ino: u64 = place.rsplit(':').next()?.parse().ok()?;
        (*kind == "FLOCK" && ino == inode).then(|| pid.to_string())
    })?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).escape_debug().to_string())
        .collect();
    let program = words.first().map(|w| {
        Path::new(w)
            .file_name()
            .map_or(w.clone(), |n| n.to_string_lossy().into())
    });
    let text = match program {
        Some(p) => std::iter::once(p)
            .chain(words.iter().skip(1).cloned())
            .collect::<Vec<_>>()
            .join(" "),
        None => "a process".into(),
    };
    Some(format!("{text} (pid {pid})"))
}

/// Who holds the master key file `path` locked now, if anyone; takes nothing.
pub fn key_in_use(path: &Path) -> Option<String> {
    let f = File::open(path).ok()?;
    match f.try_lock_shared() {
        Err(TryLockError::WouldBlock) => {
            Some(key_holder(path).unwrap_or_else(|| "another process".into()))
        }
        _ => None,
    }
}

/// Who holds the lock of `keystore` now, if anyone; takes nothing (a shared lock
/// tried and released at once). For the start-up preflight and `check-config`.
pub fn holder(keystore: &Path) -> Option<Holder> {
    let note = note_path(keystore).ok()?;
    for file in [&note, &keystore.to_path_buf()] {
        let Ok(f) = File::open(file) else {
            continue;
        };
        if let Err(TryLockError::WouldBlock) = f.try_lock_shared() {
            return Some(read_holder(&note));
        }
    }
    None
}

/// Reads the holder's note, waiting a moment for a holder that has just taken the
/// lock and not written its pid yet.
fn read_holder(info: &Path) -> Holder {
    let mut holder = Holder::default();
    for _ in 0..20 {
        let mut text = String::new();
        if let Ok(mut f) = File::open(info) {
            let _ = f.read_to_string(&mut text);
        }
        holder = Holder::parse(&text);
        if holder.pid.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    holder
}

/// The note of `keystore`: `<keystore>.lock` beside the file's real path (its
/// folder's real path when it does not exist yet), whatever spelling led here.
fn note_path(keystore: &Path) -> std::io::Result<PathBuf> {
    if let Ok(real) = std::fs::canonicalize(keystore) {
        return Ok(lock_path(&real));
    }
    let name = keystore
        .file_name()
        .ok_or_else(|| std::io::Error::other("the keystore path names no file"))?;
    let dir = match keystore.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok(lock_path(&std::fs::canonicalize(dir)?.join(name)))
}

/// Takes the lock of `keystore` without waiting and records `what` (and the socket
/// of a daemon) beside it. Two `flock`s: on the note `<keystore>.lock` first, which
/// stays where it is when the keystore is renamed (so a start with the old path
/// finds the live daemon before anything is created), then on the keystore file
/// itself (SQLite's own locks are `fcntl` locks, which do not interact with it), so
/// every path to the file — another spelling, a symlink, a hard link — collides, and
/// removing the note changes nothing. Only the holder of both writes the note. A
/// journal (`-wal`, `-shm`) without its database is refused untouched: it belongs
/// to a keystore that was moved while a daemon had it open. `create`: make an empty
/// keystore file when there is none (SQLite takes an empty file as an empty database).
pub fn acquire(
    keystore: &Path,
    what: &str,
    socket: Option<&Path>,
    create: bool,
) -> Result<KeystoreLock, LockError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LockError::Io { path, source }
    };
    let path = note_path(keystore).map_err(io(keystore))?;
    // Never through a symlink: a tool run as root must not write where a link in
    // the service user's folder points. Not truncated until it is ours.
    let mut info = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io(&path))?;
    let held = |path: &Path| LockError::Held {
        keystore: keystore.to_path_buf(),
        holder: read_holder(path),
    };
    match info.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(held(&path)),
        Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    if !keystore.exists() {
        for suffix in ["-wal", "-shm"] {
            let mut journal = keystore.as_os_str().to_owned();
            journal.push(suffix);
            let journal = PathBuf::from(journal);
            if journal.exists() {
                return Err(LockError::OrphanJournal {
                    keystore: keystore.to_path_buf(),
                    journal,
                });
            }
        }
    }
    let db = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .open(keystore)
        .map_err(io(keystore))?;
    match db.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(held(&path)),
        Err(TryLockError::Error(e)) => return Err(io(keystore)(e)),
    }
    let mut text = format!("pid={}\nwhat={what}\n", std::process::id());
    if let Some(s) = socket {
        let s = std::path::absolute(s).unwrap_or_else(|_| s.to_path_buf());
        text.push_str(&format!("socket={}\n", s.display()));
    }
    info.set_len(0).map_err(io(&path))?;
    info.rewind().map_err(io(&path))?;
    info.write_all(text.as_bytes()).map_err(io(&path))?;
    Ok(KeystoreLock {
        _keystore: db,
        _info: info,
        key: None,
        path,
    })
}

/// What a tool found when it tried to lock a keystore.
pub enum ToolAccess {
    /// No daemon runs on the keystore; the tool holds the lock until it ends, so
    /// none can start meanwhile.
    Alone(KeystoreLock),
    /// A daemon holds the lock and answers on the configured socket.
    Daemon(Holder),
}

/// For `rotate-master-key`, `import-legacy` and `migrate-user-keys`: takes the lock
/// when no daemon runs on the keystore; when one does, proves it answers on
/// `socket` (its `stats` pid is the holder's). Refuses, changing nothing, when the
/// holder does not answer there, or when a daemon answers there that does not hold
/// this keystore (the config names another daemon's socket or another keystore).
/// `create`: the keystore may be created (import); otherwise it must exist.
///
/// `key_file`, the master key the tool uses, must not be another daemon's (or
/// another tool's): with no daemon on the keystore the tool locks it too.
pub fn for_tool(
    keystore: &Path,
    key_file: &Path,
    what: &str,
    socket: &Path,
    create: bool,
) -> Result<ToolAccess, ToolAccessError> {
    if !create && !keystore.exists() {
        return Err(ToolAccessError::NoKeystore {
            keystore: keystore.to_path_buf(),
        });
    }
    let answered = crate::wire::client::request(socket, r#"{"op":"stats"}"#)
        .ok()
        .and_then(|v| v["result"]["pid"].as_u64());
    let holder = match acquire(keystore, what, None, create) {
        Ok(mut lock) => {
            if let Some(pid) = answered {
                return Err(ToolAccessError::NotThatDaemons {
                    pid,
                    socket: socket.to_path_buf(),
                    keystore: keystore.to_path_buf(),
                });
            }
            if key_file.exists() {
                lock.lock_key(key_file)?;
            }
            return Ok(ToolAccess::Alone(lock));
        }
        Err(LockError::Held { holder, .. }) => holder,
        Err(e) => return Err(e.into()),
    };
    match (answered, holder.pid) {
        (Some(pid), Some(held)) if pid == u64::from(held) => {
            // The daemon may use this key file (it holds its lock); no one else may.
            match key_holder(key_file) {
                Some(other) if !other.ends_with(&format!("(pid {held})")) => {
                    Err(LockError::KeyHeld {
                        key_file: key_file.to_path_buf(),
                        holder: other,
                    }
                    .into())
                }
                _ => Ok(ToolAccess::Daemon(holder)),
            }
        }
        (Some(pid), _) => Err(ToolAccessError::OtherDaemon {
            keystore: keystore.to_path_buf(),
            holder,
            socket: socket.to_path_buf(),
            pid,
        }),
        (None, _) => Err(ToolAccessError::NoAnswer {
            keystore: keystore.to_path_buf(),
            holder,
            socket: socket.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_first_holder() {
        let dir = tempfile::tempdir().unwrap();
        let ks = dir.path().join("keystore.sqlite3");
        let first = acquire(&ks, "serve", Some(Path::new("/run/x.sock")), true).unwrap();
        // Another spelling of the same file collides too.
        let other = dir.path().join(".").join("keystore.sqlite3");
        match acquire(&other, "serve", None, true) {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder.pid, Some(std::process::id()));
                assert_eq!(holder.socket.as_deref(), Some(Path::new("/run/x.sock")));
                assert!(holder.describe().contains("serve"));
            }
            _ => panic!("a second lock was granted"),
        }
        drop(first);
        assert!(
            acquire(&ks, "serve", None, true).is_ok(),
            "released on drop"
        );
    }

    #[test]
    fn the_note_holds_the_lock_across_a_rename_and_a_journal_needs_its_database() {
        let dir = tempfile::tempdir().unwrap();
        let ks = dir.path().join("keystore.sqlite3");
        let first = acquire(&ks, "serve", None, true).unwrap();
        let note = std::fs::read(&first.path).unwrap();
        std::fs::rename(&ks, dir.path().join("moved.sqlite3")).unwrap();
        assert!(
            matches!(
                acquire(&ks, "serve", None, true),
                Err(LockError::Held { .. })
            ),
            "the old path is still held"
        );
        assert!(!ks.exists(), "nothing created at the old path");
        assert_eq!(std::fs::read(&first.path).unwrap(), note, "note unchanged");
        assert!(holder(&ks).is_some_and(|h| h.pid == Some(std::process::id())));
        drop(first);

        let wal = dir.path().join("keystore.sqlite3-wal");
        std::fs::write(&wal, b"journal").unwrap();
        assert!(matches!(
            acquire(&ks, "serve", None, true),
            Err(LockError::OrphanJournal { .. })
        ));
        assert_eq!(std::fs::read(&wal).unwrap(), b"journal", "untouched");
        assert!(!ks.exists());
    }

    #[test]
    fn a_locked_key_file_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        std::fs::write(&key, "k").unwrap();
        let held = lock_key_file(&key).unwrap();
        let me = format!("(pid {})", std::process::id());
        match lock_key_file(&key) {
            Err(LockError::KeyHeld { holder, .. }) => assert!(holder.ends_with(&me), "{holder}"),
            _ => panic!("a second key lock was granted"),
        }
        assert!(key_in_use(&key).is_some_and(|h| h.ends_with(&me)));
        drop(held);
        assert!(key_in_use(&key).is_none());
    }

    #[test]
    fn tool_refusals_keep_their_text() {
        let holder = Holder {
            pid: Some(7),
            socket: Some(PathBuf::from("/s")),
            what: Some("serve".into()),
        };
        let (keystore, socket) = (PathBuf::from("/ks"), PathBuf::from("/c"));
        let cases = [
            (
                ToolAccessError::NoKeystore {
                    keystore: keystore.clone(),
                },
                "the keystore /ks does not exist: is keystore.path in this config the daemon's?",
            ),
            (
                ToolAccessError::NotThatDaemons {
                    pid: 9,
                    socket: socket.clone(),
                    keystore: keystore.clone(),
                },
                "a daemon (pid 9) answers on /c, but it does not hold the keystore /ks (no daemon does): \
                 this config's keystore.path is not that daemon's; use the config it runs with; nothing changed",
            ),
            (
                ToolAccessError::OtherDaemon {
                    keystore: keystore.clone(),
                    holder: holder.clone(),
                    socket: socket.clone(),
                    pid: 9,
                },
                "the keystore /ks is in use by apikeyd serve (pid 7, socket /s), but the daemon answering on /c is pid 9: \
                 this config's server.socket belongs to another daemon; nothing changed",
            ),
            (
                ToolAccessError::NoAnswer {
                    keystore,
                    holder,
                    socket,
                },
                "the keystore /ks is in use by apikeyd serve (pid 7, socket /s), but no daemon answers on /c: \
                 use the config that daemon runs with (its server.socket), or stop it first; nothing changed",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }
}
