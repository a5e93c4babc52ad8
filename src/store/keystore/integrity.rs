//! The keystore's deferred integrity check: a large keystore is checked in the
//! background while writes wait behind a gate (`WriteGate`) that opens once it passed.

use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::Connection;

use super::file::{connect, KeystoreError};
use crate::error::Result;

/// Whether the keystore may be written: closed until its full check has passed.
#[derive(Default)]
pub struct WriteGate(pub(super) std::sync::atomic::AtomicBool);

impl WriteGate {
    fn is_open(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Makes `db` refuse, while the gate is closed, every statement that could write
    /// (SQLITE_AUTH, answered as `unavailable`): only reads, transactions and pragmas
    /// that only read are allowed. SQLite asks when a statement is prepared; a
    /// refused statement is not cached, so it is asked again next time.
    pub(super) fn guard(self: &Arc<Self>, db: &Connection) {
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

/// The full integrity check of a keystore opened by [`super::open_serving`] without it.
pub struct PendingCheck {
    pub(super) path: PathBuf,
    pub(super) gate: Arc<WriteGate>,
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
                let me = rustix::thread::gettid();
                let _ = rustix::process::setpriority_process(Some(me), 10);
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
pub(super) fn test_hook_wait() {
    if let Some(file) = test_hook_gate() {
        while !file.exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

pub(super) fn test_hook_gate() -> Option<PathBuf> {
    if !cfg!(debug_assertions) || std::env::var_os("APIKEYD_TEST_HOOKS").is_none() {
        return None;
    }
    std::env::var_os("APIKEYD_TEST_KEYSTORE_CHECK_GATE").map(PathBuf::from)
}
