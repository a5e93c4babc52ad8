//! Idempotency keys on writes: a write sent with `idempotency_key` is applied once per
//! (peer uid, key) within `server.idempotency_ttl_s`; a repeat answers the first
//! answer, marked replayed. The record is written by the store in the same
//! transaction (SQLite) or script (Redis) as the write itself, so there is never a
//! write without its record, nor a record without its write.
//!
//! A record holds a keyed fingerprint of the op and its parameters (never a key) and
//! the store's answer to the write (counts, flags, key ids: never a key).

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::clock;

/// Records the embedded store keeps at most; past it the oldest go first (each still
/// expires after the TTL). Redis bounds its records by their TTL alone.
pub const MAX_RECORDS: i64 = 100_000;

/// How often (seconds) the embedded store drops expired records.
const PRUNE_EVERY_S: i64 = 60;

/// One write's idempotency key, as the store needs it.
#[derive(Clone, Debug)]
pub struct Idem {
    /// The peer's uid: keys of different uids never meet.
    pub uid: u32,
    /// `idempotency_key` as sent (1–128 bytes, the rules of `user_id`).
    pub key: String,
    /// Keyed hash (hex) of the op and its parameters.
    pub fingerprint: String,
    /// `server.idempotency_ttl_s` when the write was received.
    pub ttl_s: u64,
}

/// A write's answer from a store, and whether it is the recorded answer of an
/// earlier request with the same idempotency key (then nothing was applied now).
#[derive(Debug)]
pub struct Written<T> {
    pub value: T,
    pub replayed: bool,
}

impl<T> Written<T> {
    /// Applied now.
    pub fn fresh(value: T) -> Self {
        Written {
            value,
            replayed: false,
        }
    }

    /// The same flag around another value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Written<U> {
        Written {
            value: f(self.value),
            replayed: self.replayed,
        }
    }
}

/// What a recorded answer is compared with.
pub enum Found {
    /// Same fingerprint: the recorded answer (JSON).
    Replay(String),
    /// Same key, other op or parameters.
    Conflict,
}

/// Counters for `stats` and metrics.
#[derive(Default)]
pub struct Figures {
    /// Writes recorded by this daemon.
    pub recorded: AtomicU64,
    /// Repeats answered from a record.
    pub replayed: AtomicU64,
    /// Repeats refused with `idempotency_conflict`.
    pub conflicts: AtomicU64,
    /// Embedded mode: records held in the keystore file after the last prune.
    pub records: AtomicU64,
}

/// This process's counters (one daemon per process).
pub static FIGURES: Figures = Figures {
    recorded: AtomicU64::new(0),
    replayed: AtomicU64::new(0),
    conflicts: AtomicU64::new(0),
    records: AtomicU64::new(0),
};

/// The error a conflicting repeat answers, counted.
pub fn conflict(idem: &Idem) -> Error {
    FIGURES.conflicts.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        uid = idem.uid,
        "idempotency key reused with other parameters"
    );
    Error::IdempotencyConflict
}

/// Decodes a recorded answer.
pub fn decode<T: DeserializeOwned>(answer: &str) -> Result<T> {
    serde_json::from_str(answer).map_err(|e| {
        tracing::error!(error = %e, "an idempotency record does not decode");
        Error::Internal("an idempotency record does not decode (see the daemon log)".into())
    })
}

/// Decodes a recorded answer, counting the replay.
pub fn replay<T: DeserializeOwned>(answer: &str) -> Result<Written<T>> {
    let value = decode(answer)?;
    FIGURES.replayed.fetch_add(1, Ordering::Relaxed);
    Ok(Written {
        value,
        replayed: true,
    })
}

/// Encodes an answer for its record.
pub fn encode<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The embedded records' table; created by each connection that writes records.
pub fn create_table(db: &Connection) -> rusqlite::Result<()> {
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS idempotency (
            uid INTEGER NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            answer TEXT NOT NULL,
            expires_at INTEGER NOT NULL,
            PRIMARY KEY (uid, key)
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);",
    )
}

/// Runs `apply` once per idempotency key on `db`: with a key, in one `IMMEDIATE`
/// transaction that first looks for a live record (a replay or a conflict then
/// applies nothing), else applies and, when `worth_recording` says the answer
/// changed something, records it. Two connections with the same key are serialised
/// by the transaction. Without a key, `apply` runs as it is.
pub fn once<T: Serialize + DeserializeOwned>(
    db: &Connection,
    idem: Option<&Idem>,
    worth_recording: impl FnOnce(&T) -> bool,
    apply: impl FnOnce() -> Result<T>,
) -> Result<Written<T>> {
    let Some(idem) = idem else {
        return apply().map(Written::fresh);
    };
    let tx = rusqlite::Transaction::new_unchecked(db, TransactionBehavior::Immediate)?;
    let now = clock::now_s();
    let found: Option<(String, String)> = db
        .prepare_cached(
            "SELECT fingerprint, answer FROM idempotency
             WHERE uid = ?1 AND key = ?2 AND expires_at > ?3",
        )?
        .query_row(params![idem.uid, idem.key, now], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    if let Some((fingerprint, answer)) = found {
        return if fingerprint == idem.fingerprint {
            replay(&answer)
        } else {
            Err(conflict(idem))
        };
    }
    let value = apply()?;
    if worth_recording(&value) {
        let expires = now.saturating_add(i64::try_from(idem.ttl_s).unwrap_or(i64::MAX));
        db.prepare_cached(
            "INSERT OR REPLACE INTO idempotency (uid, key, fingerprint, answer, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            idem.uid,
            idem.key,
            idem.fingerprint,
            encode(&value),
            expires
        ])?;
        FIGURES.recorded.fetch_add(1, Ordering::Relaxed);
        // Recounted exactly by the next prune.
        FIGURES.records.fetch_add(1, Ordering::Relaxed);
    }
    tx.commit()?;
    Ok(Written::fresh(value))
}

/// Drops expired records, and the oldest past [`MAX_RECORDS`], at most once per
/// [`PRUNE_EVERY_S`] (`last` is when it last ran); notes how many are left. A
/// failure is logged: it must not fail the write that came along.
pub fn prune(db: &Connection, last: &mut i64) {
    let now = clock::now_s();
    if now - *last < PRUNE_EVERY_S {
        return;
    }
    *last = now;
    if let Err(e) = prune_to(db, now, MAX_RECORDS) {
        tracing::warn!(error = %e, "expired idempotency records not dropped this time");
    }
}

/// Drops the records expired at `now`, then the oldest past `cap`.
fn prune_to(db: &Connection, now: i64, cap: i64) -> Result<()> {
    db.prepare_cached("DELETE FROM idempotency WHERE expires_at <= ?1")?
        .execute(params![now])?;
    let held: i64 = db.query_row("SELECT count(*) FROM idempotency", [], |r| r.get(0))?;
    if held > cap {
        db.prepare_cached(
            "DELETE FROM idempotency WHERE (uid, key) IN
             (SELECT uid, key FROM idempotency ORDER BY expires_at LIMIT ?1)",
        )?
        .execute(params![held - cap])?;
    }
    FIGURES
        .records
        .store(held.clamp(0, cap) as u64, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let db = Connection::open_in_memory().unwrap();
        create_table(&db).unwrap();
        db.execute_batch("CREATE TABLE n (v INTEGER); INSERT INTO n VALUES (0);")
            .unwrap();
        db
    }

    fn idem(uid: u32, key: &str, fingerprint: &str) -> Idem {
        Idem {
            uid,
            key: key.into(),
            fingerprint: fingerprint.into(),
            ttl_s: 600,
        }
    }

    /// Adds one to the counter and answers it, as a write does.
    fn bump(db: &Connection) -> Result<i64> {
        Ok(db.query_row("UPDATE n SET v = v + 1 RETURNING v", [], |r| r.get(0))?)
    }

    fn value(db: &Connection) -> i64 {
        db.query_row("SELECT v FROM n", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_repeat_is_replayed_and_applies_nothing() {
        let db = db();
        let k = idem(1, "k", "f1");
        let first = once(&db, Some(&k), |_| true, || bump(&db)).unwrap();
        assert_eq!((first.value, first.replayed), (1, false));
        let again = once(&db, Some(&k), |_| true, || bump(&db)).unwrap();
        assert_eq!((again.value, again.replayed), (1, true));
        assert_eq!(value(&db), 1);
        // Another uid with the same key is its own write.
        let other = once(&db, Some(&idem(2, "k", "f1")), |_| true, || bump(&db)).unwrap();
        assert_eq!((other.value, other.replayed), (2, false));
        // Without a key every call applies.
        once(&db, None, |_: &i64| true, || bump(&db)).unwrap();
        assert_eq!(value(&db), 3);
    }

    #[test]
    fn other_parameters_conflict_and_apply_nothing() {
        let db = db();
        once(&db, Some(&idem(1, "k", "f1")), |_| true, || bump(&db)).unwrap();
        let e = once(&db, Some(&idem(1, "k", "f2")), |_| true, || bump(&db)).unwrap_err();
        assert_eq!(e.code(), "idempotency_conflict");
        assert_eq!(value(&db), 1);
    }

    #[test]
    fn errors_and_unrecorded_answers_leave_no_record() {
        let db = db();
        let k = idem(1, "k", "f1");
        let e = once(
            &db,
            Some(&k),
            |_: &i64| true,
            || {
                bump(&db)?;
                Err(Error::Unavailable("x".into()))
            },
        );
        assert!(e.is_err());
        assert_eq!(value(&db), 0, "the failed write is rolled back");
        once(&db, Some(&k), |_| false, || bump(&db)).unwrap();
        let second = once(&db, Some(&k), |_| true, || bump(&db)).unwrap();
        assert_eq!((second.value, second.replayed), (2, false));
    }

    #[test]
    fn expired_records_are_ignored_and_pruned_and_the_cap_holds() {
        let db = db();
        let mut short = idem(1, "old", "f1");
        short.ttl_s = 0;
        once(&db, Some(&short), |_| true, || bump(&db)).unwrap();
        let again = once(&db, Some(&short), |_| true, || bump(&db)).unwrap();
        assert!(!again.replayed, "an expired record is not replayed");
        for i in 0..5 {
            once(
                &db,
                Some(&idem(1, &format!("k{i}"), "f")),
                |_| true,
                || bump(&db),
            )
            .unwrap();
        }
        prune_to(&db, clock::now_s(), 3).unwrap();
        let held: i64 = db
            .query_row("SELECT count(*) FROM idempotency", [], |r| r.get(0))
            .unwrap();
        assert_eq!(held, 3);
    }
}
