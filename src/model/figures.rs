//! What the stores count for `stats` and `/metrics`: the cache's hits and misses and
//! the Redis connection's status, read by the ops and the metrics without reaching
//! into an actor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::RedisRefusal;

/// The cache's counters, for `stats`.
#[derive(serde::Serialize)]
pub struct CacheFigures {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
}

/// What `stats` shows of the Redis connection.
#[derive(Default)]
pub struct RedisStatus {
    /// Master changes followed since start (Sentinel).
    pub failovers: AtomicU64,
    /// Quota scripts sent since start, each with one or more increments or consumes.
    pub quota_batches: AtomicU64,
    /// Increments and consumes sent in those scripts.
    pub quota_calls: AtomicU64,
    /// Fleet heartbeats ignored because the master key does not authenticate them
    /// (each member id counted once).
    pub unauthenticated_heartbeats: AtomicU64,
    /// This daemon's fleet heartbeats that could not be written (Redis down).
    pub heartbeat_failures: AtomicU64,
    /// The master's `host:port` as Sentinel last named it.
    master: Mutex<Option<String>>,
    /// Sentinels in `redis.sentinels`, and how many answered the last time all were
    /// asked (every health check).
    pub sentinels: AtomicU64,
    pub sentinels_reachable: AtomicU64,
    /// Commands Redis refused, by [`RedisRefusal`] (index in `RedisRefusal::ALL`).
    refusals: [AtomicU64; RedisRefusal::ALL.len()],
}

impl RedisStatus {
    /// The master's `host:port` (Sentinel only).
    pub fn master(&self) -> Option<String> {
        match self.master.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Counts one command Redis refused.
    pub fn count_refusal(&self, refusal: RedisRefusal) {
        if let Some(i) = RedisRefusal::ALL.iter().position(|r| *r == refusal) {
            self.refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals so far, by cause (the ones that happened).
    pub fn refusals(&self) -> Vec<(RedisRefusal, u64)> {
        RedisRefusal::ALL
            .iter()
            .zip(&self.refusals)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub(crate) fn set_master(&self, address: &str) {
        match self.master.lock() {
            Ok(mut m) => *m = Some(address.to_string()),
            Err(p) => *p.into_inner() = Some(address.to_string()),
        }
    }
}
