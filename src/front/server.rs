//! The socket: binding it safely, the accept loop with peer credentials and the
//! connection caps (total, per uid, slots kept for admins), and draining open connections on shutdown.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::Error;
use crate::front::session;
use crate::ops::app::App;
use crate::process::access::{self, Peer, Role};
use crate::process::logfmt::{Repeated, Say};
use crate::process::metrics::ACCEPT_BACKOFF;
use crate::wire::protocol::write_response;

/// How long shutdown waits for open connections to answer what they have in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Binds the Unix socket at `path` so that it is never reachable by others, even
/// for a moment: its folder is created 0750, the socket is created under umask 0177
/// and then given `mode`. A stale socket file is replaced; a live one is an error.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)?;
            // The process umask (0077) would narrow it; the group must traverse it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
        }
    }
    if check_bind(path)? {
        std::fs::remove_file(path)?;
    }
    // The previous mask is restored right after.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Whether `path` may be bound, changing nothing (the start-up preflight runs it
/// before anything is created; `bind` again right before binding): its folder not
/// writable by everyone, the path free or a stale socket, no daemon listening there.
/// Answers whether a stale socket is to be removed first.
pub fn check_bind(path: &Path) -> std::io::Result<bool> {
    if let Some(dir) = path.parent().filter(|d| d.exists()) {
        // In a folder others may write to, someone else could swap the socket file.
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o002 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the socket's folder {} is writable by everyone (mode {:o}); use a private folder such as /run/apikeyd",
                    dir.display(),
                    mode & 0o7777
                ),
            ));
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only ever replace a stale socket: a mistyped path must not delete a file.
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it (check server.socket)",
                    path.display()
                ),
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another daemon is listening on {}", path.display()),
            ));
        }
        return Ok(true);
    }
    Ok(false)
}

/// `server.socket` names one of the daemon's own files; `what` says which.
#[derive(Debug, thiserror::Error)]
#[error(
    "server.socket {} is the same file as {what}; binding there would delete it",
    socket.display()
)]
pub struct SocketIsOwnFile {
    pub socket: std::path::PathBuf,
    pub what: &'static str,
}

/// Refuses a `server.socket` that names one of the daemon's own files (keystore, its
/// journal and lock, master key, audit file): binding there would first delete it.
pub fn check_socket_path(config: &crate::process::config::Config) -> Result<(), SocketIsOwnFile> {
    let same = |a: &Path, b: &Path| {
        let norm = |p: &Path| {
            std::fs::canonicalize(p)
                .or_else(|_| std::path::absolute(p))
                .unwrap_or_else(|_| p.to_path_buf())
        };
        norm(a) == norm(b)
    };
    let keystore = &config.keystore.path;
    let with = |suffix: &str| {
        let mut p = keystore.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let mut own = vec![
        ("keystore.path", keystore.clone()),
        ("the keystore's journal", with("-wal")),
        ("the keystore's journal", with("-shm")),
        (
            "the keystore's lock",
            crate::process::lock::lock_path(keystore),
        ),
        (
            "keystore.master_key_file",
            config.keystore.master_key_file.clone(),
        ),
        (
            "the master key's temporary file",
            crate::keys::keyring_temp(&config.keystore.master_key_file),
        ),
    ];
    if let Some(audit) = &config.log.audit_file {
        own.push(("log.audit_file", audit.clone()));
    }
    let socket = &config.server.socket;
    match own.iter().find(|(_, p)| same(socket, p)) {
        Some((what, _)) => Err(SocketIsOwnFile {
            socket: socket.clone(),
            what,
        }),
        None => Ok(()),
    }
}

/// One connection counted against its uid's `server.max_connections_per_uid`;
/// released when dropped. Root and the daemon's own uid are not counted.
struct UidSlot {
    counts: Rc<RefCell<HashMap<u32, usize>>>,
    uid: u32,
}

impl UidSlot {
    fn take(
        counts: &Rc<RefCell<HashMap<u32, usize>>>,
        uid: u32,
        max: usize,
    ) -> Option<Option<UidSlot>> {
        if uid == 0 || uid == rustix::process::geteuid().as_raw() {
            return Some(None);
        }
        let mut c = counts.borrow_mut();
        let n = c.entry(uid).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Some(UidSlot {
            counts: counts.clone(),
            uid,
        }))
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut c = self.counts.borrow_mut();
        if let Some(n) = c.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.uid);
            }
        }
    }
}

/// Writes one error line to a connection that will not be served, then closes it.
async fn refuse(mut stream: UnixStream, error: Error) {
    let mut line = Vec::new();
    write_response(&mut line, &None, &Err(error));
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
}

/// Turns a peer away before any request: records the refusal in the audit under
/// the wire code of `error` and `reason`, runs `warn` (the log line) only when the
/// audit wrote this one in full (a client reconnecting in a loop is counted, not
/// logged each time), then answers `error` and closes the connection.
fn turn_away(
    app: &App,
    tracker: &TaskTracker,
    stream: UnixStream,
    peer: &Peer,
    reason: &str,
    error: Error,
    warn: impl FnOnce(),
) {
    if app.audit.refused(peer, error.code(), reason) {
        warn();
    }
    tracker.spawn_local(refuse(stream, error));
}

/// A descriptor kept in reserve (on /dev/null). When accept fails for want of
/// descriptors, the reserve is given up so that one waiting client can be accepted
/// and told why it is not served, instead of waiting in the backlog; then it is
/// taken again.
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn take() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    /// Out of descriptors: accepts one waiting client with the reserve's descriptor
    /// and answers it `unavailable`, then takes the reserve again.
    fn turn_away_one(&mut self, listener: &UnixListener) {
        if self.0.take().is_none() {
            *self = Reserve::take();
            return;
        }
        if let Ok(stream) = listener_poll_accept(listener) {
            let mut line = Vec::new();
            write_response(
                &mut line,
                &None,
                &Err(Error::Unavailable(
                    "the daemon is out of file descriptors; retry shortly".into(),
                )),
            );
            let _ = stream.try_write(&line);
        }
        *self = Reserve::take();
    }
}

/// One connection waiting in the backlog, if any, accepted without waiting.
fn listener_poll_accept(listener: &UnixListener) -> std::io::Result<UnixStream> {
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    match listener.poll_accept(&mut cx) {
        std::task::Poll::Ready(accepted) => accepted.map(|(stream, _)| stream),
        std::task::Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
    }
}

/// How long accepts must succeed before the log says accepting has recovered.
const ACCEPT_QUIET: Duration = Duration::from_secs(3);

/// Whether an accept failed for want of descriptors (the process's or the system's).
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Accepts connections until `shutdown` resolves, then stops accepting and waits
/// (up to a limit) for open connections to answer what they have in flight.
pub async fn serve(app: Rc<App>, listener: UnixListener, shutdown: impl Future<Output = ()>) {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let max = app.config().server.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let by_uid: Rc<RefCell<HashMap<u32, usize>>> = Rc::default();
    let mut reserve = Reserve::take();
    let flusher = {
        let app = app.clone();
        tokio::task::spawn_local(async move {
            let mut every = tokio::time::interval(crate::process::audit::REFUSALS_EVERY / 4);
            loop {
                every.tick().await;
                app.audit.flush_refusals(false);
            }
        })
    };
    let mut failing = Repeated::default();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Some((n, lasted)) =
                        failing.end_when_quiet(std::time::Instant::now(), ACCEPT_QUIET)
                    {
                        tracing::info!(failures = n, seconds = lasted.as_secs(),
                            "accepting connections again after {n} failed accepts");
                    }
                    stream
                }
                Err(e) => {
                    // Out of descriptors or similar: said once (then counted), one
                    // waiting client is told why, and accepting pauses instead of
                    // spinning; it never stops.
                    match failing.hit(std::time::Instant::now()) {
                        Say::First => tracing::error!(error = %e,
                            "cannot accept connections (out of file descriptors?); turning clients away until descriptors are free"),
                        Say::Again { times, total } => tracing::error!(error = %e, times, total,
                            "still cannot accept connections; {times} failed accepts in the last minute"),
                        Say::Nothing => {}
                    }
                    if out_of_descriptors(&e) {
                        reserve.turn_away_one(&listener);
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(cred) = stream.peer_cred() else {
            tracing::warn!("cannot read peer credentials; closing the connection");
            continue;
        };
        let (uid, gid) = (cred.uid(), cred.gid());
        let groups = access::peer_groups(&stream).unwrap_or_else(|e| {
            tracing::warn!(uid, error = %e, "cannot read the peer's supplementary groups; checking its uid and gid only");
            Vec::new()
        });
        let role = access::role(&app.config().access.ids, uid, gid, &groups);
        let peer = Peer {
            uid,
            gid,
            pid: cred.pid(),
            role,
        };
        if role == Role::Denied {
            let e = Error::Forbidden(format!(
                "uid {uid} gid {gid} may not use apikeyd; an operator can add it to access.allow_uids or access.allow_gids"
            ));
            turn_away(&app, &tracker, stream, &peer, "peer not allowed", e, || {
                tracing::warn!(
                    uid,
                    gid,
                    pid = peer.pid,
                    "connection refused: peer not allowed (more from this uid are counted in the audit once a minute)"
                );
            });
            continue;
        }
        let config = app.config();
        // A few slots stay free for admins, so an operator can always get in; never
        // more than a quarter of them, so a small max_connections still serves users.
        let reserve = config.server.admin_reserved_connections.min(max / 4);
        if role != Role::Admin && slots.available_permits() <= reserve {
            let e = Error::Unavailable(format!(
                "too many connections (server.max_connections = {max}, {reserve} kept for admins); retry later"
            ));
            let reason = "server.admin_reserved_connections left";
            turn_away(&app, &tracker, stream, &peer, reason, e, || {
                tracing::warn!(
                    uid,
                    max,
                    reserve,
                    "connection refused: only slots reserved for admins are left"
                );
            });
            continue;
        }
        let per_uid = config.server.max_connections_per_uid;
        drop(config);
        let Some(uid_slot) = UidSlot::take(&by_uid, uid, per_uid) else {
            let e = Error::Unavailable(format!(
                "too many connections from uid {uid} (server.max_connections_per_uid = {per_uid}); close some or retry later"
            ));
            let reason = "server.max_connections_per_uid reached";
            turn_away(&app, &tracker, stream, &peer, reason, e, || {
                tracing::warn!(
                    uid,
                    per_uid,
                    "connection refused: server.max_connections_per_uid reached"
                );
            });
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let e = Error::Unavailable(format!(
                "too many connections (server.max_connections = {max}); retry later"
            ));
            let reason = "server.max_connections reached";
            turn_away(&app, &tracker, stream, &peer, reason, e, || {
                tracing::warn!(
                    uid,
                    max,
                    "connection refused: server.max_connections reached"
                );
            });
            continue;
        };
        let app = app.clone();
        let stop = stop.clone();
        tracker.spawn_local(async move {
            app.connections.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(uid, gid, pid = peer.pid, "connection opened");
            session::run(app.clone(), stream, peer, stop).await;
            app.connections.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
            drop(uid_slot);
        });
    }
    drop(listener);
    flusher.abort();
    app.audit.flush_refusals(true);
    tracing::info!("stopped accepting; answering requests in flight");
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_LIMIT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain limit; closing them");
    }
}
