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

/// Lua shared by the Redis scripts that write records: the records are counted per
/// window of TTL seconds (one counter per window, named by
/// `Names::idempotency_count` and the window's number; see [`Counters`]). A record
/// lives TTL seconds, so the records held are at most those counted in the current
/// and the previous window; a script adds a record only while that sum is below
/// the cap (`server.idempotency_max_records`), which bounds the records Redis holds.
/// `records_open(current, previous, expire_at, k)` counts `k` (text) records up
/// front (one `INCRBY`, which also answers the count; the counter's expiry is set
/// when it is created) and answers the counter and the sum held before them;
/// `records_close(counter, added)` gives back those not added. The script runs
/// alone, so nobody sees the count in between. Counters are written only here.
pub const REDIS_COUNT_LUA: &str = r"
local function records_open(current, previous, expire_at, k)
  local after = redis.call('INCRBY', current, k)
  k = tonumber(k)
  if after == k then redis.call('EXPIREAT', current, expire_at) end
  return {current, k}, after - k + (tonumber(redis.call('GET', previous)) or 0)
end
local function records_close(counter, added)
  if added < counter[2] then redis.call('DECRBY', counter[1], counter[2] - added) end
end
";

/// The words a Redis script needs to count records of TTL `ttl_s` (see
/// [`REDIS_COUNT_LUA`]): the current window's counter, the previous one's, and when
/// the current one may go (once the next window is over). Windows follow the
/// daemon's clock, as the daily counters do; records themselves expire by Redis's.
pub struct Counters {
    pub current: String,
    pub previous: String,
    pub expire_at: u64,
}

impl Counters {
    /// The counters of the window holding `now_s`; `start` is
    /// `Names::idempotency_count(ttl_s)`.
    pub fn at(start: &str, ttl_s: u64, now_s: i64) -> Self {
        let ttl_s = ttl_s.max(1);
        let window = u64::try_from(now_s).unwrap_or(0) / ttl_s;
        Counters {
            current: format!("{start}{window}"),
            previous: format!("{start}{}", window.saturating_sub(1)),
            expire_at: (window + 2) * ttl_s,
        }
    }
}

/// When (unix seconds) a full embedded store last counted its live records.
static RECOUNTED_AT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

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
    /// `server.idempotency_max_records` when the write was received.
    pub max_records: u64,
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
    /// Records held: in embedded mode those in the keystore file (recounted by each
    /// prune); in Redis mode the fleet's count as last seen: stored by each quota
    /// batch that records (the count its script saw) and by the background look once
    /// a second, plus one for each record a keyed write or report adds in between.
    /// With `"local"` user keys in Redis mode the keystore's recounts store it too.
    pub records: AtomicU64,
}

impl Figures {
    /// One write recorded now by this daemon; the records held are one more until
    /// they are counted again.
    pub fn noted_record(&self) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(1, Ordering::Relaxed);
    }
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

/// The error a write with a new key answers when `max_records` records are held.
pub fn full(max_records: u64) -> Error {
    tracing::warn!(
        max_records,
        "idempotency records are full: a write with a new key was refused"
    );
    Error::IdempotencyFull(max_records)
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
/// applies nothing), else (unless `max_records` live records are held: then it is
/// refused) applies and, when `worth_recording` says the answer changed
/// something, records it. Two connections with the same key are serialised
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
    if FIGURES.records.load(Ordering::Relaxed) >= idem.max_records {
        // The running count may include expired records: count the live ones, at
        // most once a second (a count reads the whole expiry index).
        if RECOUNTED_AT.swap(now, Ordering::Relaxed) != now {
            let live: i64 = db
                .prepare_cached("SELECT count(*) FROM idempotency WHERE expires_at > ?1")?
                .query_row(params![now], |r| r.get(0))?;
            FIGURES
                .records
                .store(u64::try_from(live).unwrap_or(0), Ordering::Relaxed);
        }
        if FIGURES.records.load(Ordering::Relaxed) >= idem.max_records {
            return Err(full(idem.max_records));
        }
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
        // Recounted exactly by the next prune.
        FIGURES.noted_record();
    }
    tx.commit()?;
    Ok(Written::fresh(value))
}

/// Drops expired records at most once per [`PRUNE_EVERY_S`] (`last` is when it
/// last ran); notes how many are left. A failure is logged: it must not fail the
/// write that came along.
pub fn prune(db: &Connection, last: &mut i64) {
    let now = clock::now_s();
    if now - *last < PRUNE_EVERY_S {
        return;
    }
    *last = now;
    if let Err(e) = prune_to(db, now) {
        tracing::warn!(error = %e, "expired idempotency records not dropped this time");
    }
}

/// Drops the records expired at `now` and notes how many are left.
fn prune_to(db: &Connection, now: i64) -> Result<()> {
    db.prepare_cached("DELETE FROM idempotency WHERE expires_at <= ?1")?
        .execute(params![now])?;
    let held: i64 = db.query_row("SELECT count(*) FROM idempotency", [], |r| r.get(0))?;
    FIGURES
        .records
        .store(u64::try_from(held).unwrap_or(0), Ordering::Relaxed);
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
            max_records: 1_000_000,
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
    fn expired_records_are_ignored_and_pruned_and_the_cap_refuses_new_keys() {
        let db = db();
        let mut short = idem(1, "old", "f1");
        short.ttl_s = 0;
        once(&db, Some(&short), |_| true, || bump(&db)).unwrap();
        let again = once(&db, Some(&short), |_| true, || bump(&db)).unwrap();
        assert!(!again.replayed, "an expired record is not replayed");
        prune_to(&db, clock::now_s()).unwrap();
        let held = |db: &Connection| -> i64 {
            db.query_row("SELECT count(*) FROM idempotency", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(held(&db), 0, "expired records are dropped");
        let capped = |key: &str| {
            let mut k = idem(1, key, "f");
            k.max_records = 3;
            k
        };
        for i in 0..3 {
            once(&db, Some(&capped(&format!("k{i}"))), |_| true, || bump(&db)).unwrap();
        }
        let before = value(&db);
        let e = once(&db, Some(&capped("k3")), |_| true, || bump(&db)).unwrap_err();
        assert_eq!((e.code(), e.applied()), ("unavailable", Some(false)));
        assert_eq!(value(&db), before, "a refused write applies nothing");
        let replay = once(&db, Some(&capped("k0")), |_| true, || bump(&db)).unwrap();
        assert!(replay.replayed, "a repeat is still answered when full");
        assert_eq!(held(&db), 3);
    }
}
