//! The audit trail: one structured line per write and per admin op, in the log and,
//! when `log.audit_file` is set, appended to that file. Never a key: the line holds
//! only identifiers that passed their parameter rules. Connections refused before any
//! request are recorded too (op `connect`).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::access::Peer;
use crate::error::Result;
use crate::protocol::{Body, Subject};

/// Where audit lines go besides the log.
pub struct Audit {
    file: Option<Mutex<File>>,
    path: Option<PathBuf>,
}

/// A connection refused before any request: who, and with which code.
#[derive(Serialize)]
struct Refusal<'a> {
    ts: String,
    uid: u32,
    gid: u32,
    pid: Option<i32>,
    op: &'a str,
    outcome: &'a str,
    reason: &'a str,
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
    /// free slot: `unavailable`), in the log and the audit file.
    pub fn refused(&self, peer: &Peer, outcome: &str, reason: &str) {
        let line = Refusal {
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            uid: peer.uid,
            gid: peer.gid,
            pid: peer.pid,
            op: "connect",
            outcome,
            reason,
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
    pub fn record(&self, peer: &Peer, op: &str, subject: &Subject, outcome: &Result<Body>) {
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
