//! The audit trail: one structured line per write and per admin op, in the log and,
//! when `log.audit_file` is set, appended to that file. Never a key: the line holds
//! only identifiers that passed their parameter rules. Connections refused before any
//! request are recorded too (op `connect`): the first of a uid in full, then a count
//! a minute.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::process::access::Peer;
use crate::wire::protocol::Subject;

/// Where audit lines go besides the log.
pub struct Audit {
    file: Option<Mutex<File>>,
    path: Option<PathBuf>,
    /// Refused connections not yet written, per (uid, outcome, reason).
    refusals: Mutex<HashMap<RefusalKind, Repeats>>,
}

/// How often refused connections of one uid (and cause) are summed up.
pub const REFUSALS_EVERY: Duration = Duration::from_secs(60);

type RefusalKind = (u32, String, String);

/// The refusals of one kind since its last line.
struct Repeats {
    written_at: Instant,
    unwritten: u64,
    gid: u32,
    pid: Option<i32>,
}

/// A connection refused before any request: who, and with which code; with
/// `repeats`, the line that sums up that many more such refusals since the last one.
#[derive(Serialize)]
struct Refusal<'a> {
    ts: String,
    uid: u32,
    gid: u32,
    pid: Option<i32>,
    op: &'a str,
    outcome: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    repeats: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn open_append(p: &Path) -> std::io::Result<File> {
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(p)
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    uid: u32,
    gid: u32,
    pid: Option<i32>,
    op: &'a str,
    #[serde(flatten)]
    subject: &'a Subject,
    outcome: &'a str,
}

impl Audit {
    /// Opens `path` for appending (created 0600), or audits to the log only.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let file = match path {
            None => None,
            Some(p) => Some(Mutex::new(open_append(p)?)),
        };
        Ok(Audit {
            file,
            path: path.map(Path::to_path_buf),
            refusals: Mutex::default(),
        })
    }

    /// Opens the file again by its path (after logrotate moved it away); on failure
    /// the old file stays in use.
    pub fn reopen(&self) -> std::io::Result<()> {
        let (Some(file), Some(path)) = (&self.file, &self.path) else {
            return Ok(());
        };
        let fresh = open_append(path)?;
        match file.lock() {
            Ok(mut f) => *f = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// Records a connection refused before any request (`forbidden` peer, or no
    /// free slot: `unavailable`), in the log and the audit file: the first of a
    /// uid (for one outcome and reason) in full, then a count of the others at
    /// most once per [`REFUSALS_EVERY`], so that a client reconnecting in a loop
    /// cannot fill the disk. Answers whether this one was written in full (the
    /// caller logs it then, and not otherwise).
    pub fn refused(&self, peer: &Peer, outcome: &str, reason: &str) -> bool {
        let now = Instant::now();
        let due = {
            let mut refusals = lock(&self.refusals);
            let key = (peer.uid, outcome.to_string(), reason.to_string());
            match refusals.get_mut(&key) {
                None => {
                    refusals.insert(
                        key,
                        Repeats {
                            written_at: now,
                            unwritten: 0,
                            gid: peer.gid,
                            pid: peer.pid,
                        },
                    );
                    None
                }
                Some(r) => {
                    r.unwritten += 1;
                    r.gid = peer.gid;
                    r.pid = peer.pid;
                    if now.duration_since(r.written_at) < REFUSALS_EVERY {
                        return false;
                    }
                    r.written_at = now;
                    Some(std::mem::take(&mut r.unwritten))
                }
            }
        };
        match due {
            None => {
                self.refused_in_full(peer, outcome, reason);
                true
            }
            Some(repeats) => {
                self.write_refusal(peer.uid, peer.gid, peer.pid, outcome, reason, Some(repeats));
                false
            }
        }
    }

    /// Writes the counts of refusals not written yet: those a minute old, or all
    /// of them (at shutdown). Kinds quiet for a minute are forgotten, so that the
    /// next refusal of that uid is written in full again.
    pub fn flush_refusals(&self, all: bool) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut refusals = lock(&self.refusals);
            refusals.retain(|(uid, outcome, reason), r| {
                let old = now.duration_since(r.written_at) >= REFUSALS_EVERY;
                if r.unwritten > 0 && (old || all) {
                    due.push((
                        *uid,
                        r.gid,
                        r.pid,
                        outcome.clone(),
                        reason.clone(),
                        r.unwritten,
                    ));
                    r.unwritten = 0;
                    r.written_at = now;
                    return true;
                }
                !old
            });
        }
        for (uid, gid, pid, outcome, reason, repeats) in due {
            self.write_refusal(uid, gid, pid, &outcome, &reason, Some(repeats));
        }
    }

    fn refused_in_full(&self, peer: &Peer, outcome: &str, reason: &str) {
        self.write_refusal(peer.uid, peer.gid, peer.pid, outcome, reason, None);
    }

    /// Writes one refusal line: a refusal in full (`repeats` none), or the sum of
    /// `repeats` more refusals of the same peer, outcome and reason.
    fn write_refusal(
        &self,
        uid: u32,
        gid: u32,
        pid: Option<i32>,
        outcome: &str,
        reason: &str,
        repeats: Option<u64>,
    ) {
        let line = Refusal {
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            uid,
            gid,
            pid,
            op: "connect",
            outcome,
            reason,
            repeats,
        };
        if let Ok(text) = serde_json::to_string(&line) {
            self.write(text, true);
        }
    }

    fn write(&self, mut text: String, to_log: bool) {
        if to_log {
            tracing::info!(target: "apikeyd::audit", audit = %text);
        }
        if let Some(file) = &self.file {
            text.push('\n');
            let written = match file.lock() {
                Ok(mut f) => f.write_all(text.as_bytes()),
                Err(poisoned) => poisoned.into_inner().write_all(text.as_bytes()),
            };
            if let Err(e) = written {
                tracing::error!(error = %e, "cannot append to log.audit_file");
            }
        }
    }

    /// Records a security event the daemon noticed by itself (not a request): a
    /// short `event` name and where it happened (identifiers only, never a key), in
    /// the log (as a warning) and the audit file.
    pub fn security(&self, event: &str, place: &[(&str, &str)]) {
        #[derive(Serialize)]
        struct Event<'a> {
            ts: String,
            op: &'a str,
            event: &'a str,
            #[serde(flatten)]
            place: std::collections::BTreeMap<&'a str, &'a str>,
        }
        let line = Event {
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            op: "security",
            event,
            place: place.iter().copied().collect(),
        };
        if let Ok(text) = serde_json::to_string(&line) {
            tracing::warn!(target: "apikeyd::audit", audit = %text);
            self.write(text, false);
        }
    }

    /// Records one audited request and its outcome (`ok` or the error code).
    pub fn record<T>(&self, peer: &Peer, op: &str, subject: &Subject, outcome: &Result<T>) {
        let to_log = tracing::enabled!(target: "apikeyd::audit", tracing::Level::INFO);
        if !to_log && self.file.is_none() {
            return;
        }
        let now = std::time::SystemTime::now();
        let line = Line {
            ts: humantime::format_rfc3339_millis(now).to_string(),
            uid: peer.uid,
            gid: peer.gid,
            pid: peer.pid,
            op,
            subject,
            outcome: outcome.as_ref().map(|_| "ok").unwrap_or_else(|e| e.code()),
        };
        let Ok(text) = serde_json::to_string(&line) else {
            return;
        };
        self.write(text, to_log);
    }
}
