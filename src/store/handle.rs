//! The store: the messages for pools and quota counters, and `Store`, the handle the
//! ops and the cache talk to. Embedded (SQLite) and Redis stores serve the same
//! messages, so nothing above this file knows which one is behind it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::error::Result;
use crate::keys::Secret;
use crate::model::idempotency::{Idem, Written};
use crate::model::pool::*;

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

/// Lists a pool's keys, masked.
#[derive(Message)]
#[rtype(result = "Result<Vec<PoolKeyInfo>>")]
pub struct ListPoolKeys {
    pub pool: PoolRef,
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
    redis_status: Option<Arc<crate::model::figures::RedisStatus>>,
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
    pub fn with_redis_status(mut self, status: Arc<crate::model::figures::RedisStatus>) -> Self {
        self.redis_status = Some(status);
        self
    }

    /// Redis mode: the master's address as Sentinel named it, and the failovers
    /// followed since start.
    pub fn redis_status(&self) -> Option<&crate::model::figures::RedisStatus> {
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
