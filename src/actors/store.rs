//! The store: the messages for pools and quota counters, and `Store`, the handle the
//! ops and the cache talk to. Embedded (SQLite) and Redis stores serve the same
//! messages, so nothing above this file knows which one is behind it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::crypto::Secret;
use crate::error::Result;
use crate::idempotency::{Idem, Written};

/// One pool: a channel's (`channel: Some`) or the global one, for one service.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PoolRef {
    pub channel: Option<String>,
    pub service: String,
}

/// What a client reports about a key it was handed (`report_key_result`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Ok,
    RateLimited,
    Unauthorized,
    Error,
}

impl Outcome {
    /// The wire name parsed; `None` for anything else.
    pub fn parse(name: &str) -> Option<Outcome> {
        match name {
            "ok" => Some(Outcome::Ok),
            "rate_limited" => Some(Outcome::RateLimited),
            "unauthorized" => Some(Outcome::Unauthorized),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }

    /// The wire name, which is also the name of its daily counter (`error` counts as
    /// `errors`).
    pub fn counter(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RateLimited => "rate_limited",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Error => "errors",
        }
    }
}

/// `[pools]` rules a report is judged by.
#[derive(Clone, Copy, Debug)]
pub struct HealthRules {
    /// Cooldown of a rate-limited key without `retry_after_s`, and of a key that
    /// reached the error threshold.
    pub cooldown_s: u64,
    /// Errors within a minute that cool a key down.
    pub error_threshold: u32,
}

/// Seconds an error counts towards the threshold.
const ERROR_WINDOW_S: i64 = 60;

/// A pool key's health as stored (JSON in Redis, columns in SQLite). The default is a
/// key nobody reported on.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    /// Unix seconds until which picks skip the key; 0 when it never cooled down.
    #[serde(default)]
    pub cooling_until: i64,
    /// Reported unauthorized: skipped until an admin enables it again.
    #[serde(default)]
    pub disabled: bool,
    /// Start of the current error window (unix seconds).
    #[serde(default)]
    pub errors_since: i64,
    /// Errors in that window.
    #[serde(default)]
    pub errors: u32,
}

/// What picks make of a key now.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    Active,
    Cooling,
    Disabled,
}

impl Health {
    /// Applies one report at `now`. Cooldowns only ever move later: a report never
    /// shortens one that is running. The one place these rules live, for both stores.
    pub fn apply(
        &mut self,
        outcome: Outcome,
        now: i64,
        retry_after_s: Option<u64>,
        rules: HealthRules,
    ) {
        let cool_for = |s: u64| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX));
        match outcome {
            Outcome::Ok => {}
            Outcome::RateLimited => {
                let until = cool_for(retry_after_s.unwrap_or(rules.cooldown_s));
                self.cooling_until = self.cooling_until.max(until);
            }
            Outcome::Unauthorized => self.disabled = true,
            Outcome::Error => {
                if now - self.errors_since >= ERROR_WINDOW_S {
                    self.errors_since = now;
                    self.errors = 0;
                }
                self.errors += 1;
                if self.errors >= rules.error_threshold.max(1) {
                    self.cooling_until = self.cooling_until.max(cool_for(rules.cooldown_s));
                    self.errors = 0;
                    self.errors_since = now;
                }
            }
        }
    }

    /// Whether picks may hand the key out at `now`.
    pub fn usable(&self, now: i64) -> bool {
        !self.disabled && self.cooling_until <= now
    }

    /// The state at `now`.
    pub fn state(&self, now: i64) -> KeyState {
        if self.disabled {
            KeyState::Disabled
        } else if self.cooling_until > now {
            KeyState::Cooling
        } else {
            KeyState::Active
        }
    }

    /// The end of a running cooldown, or `None`.
    pub fn cooling_until(&self, now: i64) -> Option<i64> {
        (self.cooling_until > now).then_some(self.cooling_until)
    }

    /// Whether picks treat `self` and `other` alike (the cached pool then stays valid).
    pub fn same_for_picks(&self, other: &Health) -> bool {
        self.disabled == other.disabled && self.cooling_until == other.cooling_until
    }
}

/// One key of a pool as loaded: decrypted, with its id and health.
pub struct PoolEntry {
    pub key_id: String,
    pub key: Secret,
    pub health: Health,
}

/// Every key of a pool, decrypted, with its health; values that do not open are left
/// out and logged.
#[derive(Message)]
#[rtype(result = "Result<Vec<PoolEntry>>")]
pub struct LoadPool {
    pub pool: PoolRef,
}

/// Records a report on a pool key: its health and today's counter. Answers the
/// health after it, or `None` when the pool has no such key.
#[derive(Message)]
#[rtype(result = "Result<Written<Option<Health>>>")]
pub struct ReportPoolKey {
    pub pool: PoolRef,
    pub key_id: String,
    pub outcome: Outcome,
    pub retry_after_s: Option<u64>,
    pub rules: HealthRules,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
}

/// Clears a pool key's cooldown and disable; answers whether the pool has that key.
#[derive(Message)]
#[rtype(result = "Result<Written<bool>>")]
pub struct EnablePoolKey {
    pub pool: PoolRef,
    pub key_id: String,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
}

/// Adds picks counted in memory to today's counters, in one batch.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct CountPicks {
    /// (pool, key_id, picks)
    pub picks: Vec<(PoolRef, String, u64)>,
}

/// Today's counters of one pool key (UTC day).
#[derive(Default, Clone, Copy, serde::Serialize)]
pub struct Counters {
    pub picks: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub unauthorized: u64,
    pub errors: u64,
}

impl Counters {
    /// Sets the counter named `name` (as `Outcome::counter` or `picks`).
    pub fn set(&mut self, name: &str, n: u64) {
        match name {
            "picks" => self.picks = n,
            "ok" => self.ok = n,
            "rate_limited" => self.rate_limited = n,
            "unauthorized" => self.unauthorized = n,
            "errors" => self.errors = n,
            _ => {}
        }
    }
}

/// Days the daily pool counters are kept before they expire on their own.
pub const COUNTER_DAYS: i64 = 3;

/// Adds a key to a pool. Answers its `key_id` and whether it was new.
#[derive(Message)]
#[rtype(result = "Result<Written<(String, bool)>>")]
pub struct AddPoolKey {
    pub pool: PoolRef,
    pub key: Secret,
    pub label: Option<String>,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
}

/// Removes a key from a pool by id; answers whether it was there.
#[derive(Message)]
#[rtype(result = "Result<Written<bool>>")]
pub struct RemovePoolKey {
    pub pool: PoolRef,
    pub key_id: String,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
}

/// One row of `list_pool_keys`.
#[derive(serde::Serialize)]
pub struct PoolKeyInfo {
    pub key_id: String,
    pub masked: String,
    pub label: Option<String>,
    pub added_at: Option<String>,
    pub state: KeyState,
    pub cooling_until: Option<i64>,
    #[serde(flatten)]
    pub today: Counters,
}

/// Lists a pool's keys, masked.
#[derive(Message)]
#[rtype(result = "Result<Vec<PoolKeyInfo>>")]
pub struct ListPoolKeys {
    pub pool: PoolRef,
}

/// How many keys a pool has in each state (for `apikeyd_pool_keys`).
pub struct PoolKeyCount {
    pub pool: PoolRef,
    pub active: u64,
    pub cooling: u64,
    pub disabled: u64,
}

impl PoolKeyCount {
    /// No key yet.
    pub fn new(pool: PoolRef) -> Self {
        PoolKeyCount {
            pool,
            active: 0,
            cooling: 0,
            disabled: 0,
        }
    }

    /// Counts one more key in `state`.
    pub fn add(&mut self, state: KeyState) {
        match state {
            KeyState::Active => self.active += 1,
            KeyState::Cooling => self.cooling += 1,
            KeyState::Disabled => self.disabled += 1,
        }
    }
}

/// Counts every pool's keys by state; no key or key id leaves the store.
#[derive(Message)]
#[rtype(result = "Result<Vec<PoolKeyCount>>")]
pub struct CountPoolKeys;

/// Today's count for a (user, tool).
#[derive(Message)]
#[rtype(result = "Result<u64>")]
pub struct ReadUsage {
    pub user_id: String,
    pub tool_name: String,
}

/// Adds one to today's count; answers the count after it.
#[derive(Message)]
#[rtype(result = "Result<Written<u64>>")]
pub struct IncrementUsage {
    pub user_id: String,
    pub tool_name: String,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
}

/// Atomically: if today's count is below `limit`, add one. Answers whether it was
/// allowed and the count after the call.
#[derive(Message)]
#[rtype(result = "Result<Written<(bool, u64)>>")]
pub struct ConsumeUsage {
    pub user_id: String,
    pub tool_name: String,
    pub limit: u64,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
}

/// Which kind of store is behind the handle.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    Embedded,
    Redis,
}

/// The handle to whichever store actor serves pools and quotas.
#[derive(Clone)]
pub struct Store {
    pub mode: StoreMode,
    /// Redis mode: whether the connection is up right now.
    connected: Option<Arc<AtomicBool>>,
    /// Redis mode: the master and the failovers followed (for `stats`).
    redis_status: Option<Arc<super::redis::connection::RedisStatus>>,
    /// How long a store may take to answer (`server.request_timeout_ms`).
    deadline: Duration,
    load_pool: Recipient<LoadPool>,
    report_pool_key: Recipient<ReportPoolKey>,
    enable_pool_key: Recipient<EnablePoolKey>,
    count_picks: Recipient<CountPicks>,
    add_pool_key: Recipient<AddPoolKey>,
    remove_pool_key: Recipient<RemovePoolKey>,
    list_pool_keys: Recipient<ListPoolKeys>,
    count_pool_keys: Recipient<CountPoolKeys>,
    read_usage: Recipient<ReadUsage>,
    increment_usage: Recipient<IncrementUsage>,
    consume_usage: Recipient<ConsumeUsage>,
}

async fn ask<M, T>(deadline: Duration, to: &Recipient<M>, msg: M) -> Result<T>
where
    M: Message<Result = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    super::within(deadline, to.send(msg)).await
}

impl Store {
    /// A handle to `addr`, which serves every store message.
    pub fn new<A>(
        mode: StoreMode,
        connected: Option<Arc<AtomicBool>>,
        deadline: Duration,
        addr: Addr<A>,
    ) -> Self
    where
        A: Actor
            + Handler<LoadPool>
            + Handler<ReportPoolKey>
            + Handler<EnablePoolKey>
            + Handler<CountPicks>
            + Handler<AddPoolKey>
            + Handler<RemovePoolKey>
            + Handler<ListPoolKeys>
            + Handler<CountPoolKeys>
            + Handler<ReadUsage>
            + Handler<IncrementUsage>
            + Handler<ConsumeUsage>,
        A::Context: ToEnvelope<A, LoadPool>
            + ToEnvelope<A, ReportPoolKey>
            + ToEnvelope<A, EnablePoolKey>
            + ToEnvelope<A, CountPicks>
            + ToEnvelope<A, AddPoolKey>
            + ToEnvelope<A, RemovePoolKey>
            + ToEnvelope<A, ListPoolKeys>
            + ToEnvelope<A, CountPoolKeys>
            + ToEnvelope<A, ReadUsage>
            + ToEnvelope<A, IncrementUsage>
            + ToEnvelope<A, ConsumeUsage>,
    {
        Store {
            mode,
            connected,
            redis_status: None,
            deadline,
            load_pool: addr.clone().recipient(),
            report_pool_key: addr.clone().recipient(),
            enable_pool_key: addr.clone().recipient(),
            count_picks: addr.clone().recipient(),
            add_pool_key: addr.clone().recipient(),
            remove_pool_key: addr.clone().recipient(),
            list_pool_keys: addr.clone().recipient(),
            count_pool_keys: addr.clone().recipient(),
            read_usage: addr.clone().recipient(),
            increment_usage: addr.clone().recipient(),
            consume_usage: addr.recipient(),
        }
    }

    /// Adds what `stats` shows of a Redis connection.
    pub fn with_redis_status(mut self, status: Arc<super::redis::connection::RedisStatus>) -> Self {
        self.redis_status = Some(status);
        self
    }

    /// Redis mode: the master's address as Sentinel named it, and the failovers
    /// followed since start.
    pub fn redis_status(&self) -> Option<&super::redis::connection::RedisStatus> {
        self.redis_status.as_deref()
    }

    /// `None` in embedded mode; in Redis mode whether Redis answers.
    pub fn redis_connected(&self) -> Option<bool> {
        self.connected.as_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// See [`LoadPool`].
    pub async fn load_pool(&self, pool: PoolRef) -> Result<Vec<PoolEntry>> {
        ask(self.deadline, &self.load_pool, LoadPool { pool }).await
    }

    /// See [`ReportPoolKey`].
    pub async fn report_pool_key(&self, msg: ReportPoolKey) -> Result<Written<Option<Health>>> {
        ask(self.deadline, &self.report_pool_key, msg).await
    }

    /// See [`EnablePoolKey`].
    pub async fn enable_pool_key(&self, msg: EnablePoolKey) -> Result<Written<bool>> {
        ask(self.deadline, &self.enable_pool_key, msg).await
    }

    /// See [`CountPicks`].
    pub async fn count_picks(&self, msg: CountPicks) -> Result<()> {
        ask(self.deadline, &self.count_picks, msg).await
    }

    /// See [`AddPoolKey`].
    pub async fn add_pool_key(&self, msg: AddPoolKey) -> Result<Written<(String, bool)>> {
        ask(self.deadline, &self.add_pool_key, msg).await
    }

    /// See [`RemovePoolKey`].
    pub async fn remove_pool_key(&self, msg: RemovePoolKey) -> Result<Written<bool>> {
        ask(self.deadline, &self.remove_pool_key, msg).await
    }

    /// See [`ListPoolKeys`].
    pub async fn list_pool_keys(&self, pool: PoolRef) -> Result<Vec<PoolKeyInfo>> {
        ask(self.deadline, &self.list_pool_keys, ListPoolKeys { pool }).await
    }

    /// See [`CountPoolKeys`].
    pub async fn count_pool_keys(&self) -> Result<Vec<PoolKeyCount>> {
        ask(self.deadline, &self.count_pool_keys, CountPoolKeys).await
    }

    /// See [`ReadUsage`].
    pub async fn read_usage(&self, msg: ReadUsage) -> Result<u64> {
        ask(self.deadline, &self.read_usage, msg).await
    }

    /// See [`IncrementUsage`].
    pub async fn increment_usage(&self, msg: IncrementUsage) -> Result<Written<u64>> {
        ask(self.deadline, &self.increment_usage, msg).await
    }

    /// See [`ConsumeUsage`].
    pub async fn consume_usage(&self, msg: ConsumeUsage) -> Result<Written<(bool, u64)>> {
        ask(self.deadline, &self.consume_usage, msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: HealthRules = HealthRules {
        cooldown_s: 60,
        error_threshold: 3,
    };

    #[test]
    fn cooldowns_only_extend() {
        let mut h = Health::default();
        h.apply(Outcome::RateLimited, 1000, Some(120), RULES);
        assert_eq!(h.cooling_until, 1120);
        h.apply(Outcome::RateLimited, 1010, Some(5), RULES);
        assert_eq!(h.cooling_until, 1120, "a shorter report never shortens");
        h.apply(Outcome::RateLimited, 1010, None, RULES);
        assert_eq!(h.cooling_until, 1120);
        h.apply(Outcome::RateLimited, 1100, None, RULES);
        assert_eq!(h.cooling_until, 1160);
        assert_eq!(h.state(1159), KeyState::Cooling);
        assert_eq!(h.state(1160), KeyState::Active);
        assert!(h.usable(1160));
    }

    #[test]
    fn errors_cool_down_at_the_threshold_within_a_minute() {
        let mut h = Health::default();
        h.apply(Outcome::Error, 1000, None, RULES);
        h.apply(Outcome::Error, 1030, None, RULES);
        assert_eq!(h.state(1030), KeyState::Active);
        // The window ran out: counting starts again.
        h.apply(Outcome::Error, 1061, None, RULES);
        h.apply(Outcome::Error, 1062, None, RULES);
        assert_eq!(h.state(1062), KeyState::Active);
        h.apply(Outcome::Error, 1063, None, RULES);
        assert_eq!(h.state(1063), KeyState::Cooling);
        assert_eq!(h.cooling_until(1063), Some(1123));
    }

    #[test]
    fn unauthorized_disables() {
        let mut h = Health::default();
        h.apply(Outcome::Unauthorized, 5, None, RULES);
        assert_eq!(h.state(5), KeyState::Disabled);
        assert!(!h.usable(i64::MAX));
        h.apply(Outcome::Ok, 6, None, RULES);
        assert_eq!(h.state(6), KeyState::Disabled);
        assert_eq!(Outcome::parse("bogus"), None);
        assert_eq!(
            Outcome::parse("error").map(Outcome::counter),
            Some("errors")
        );
    }
}
