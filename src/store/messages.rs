//! The messages the stores answer. Pools and quota counters: the embedded
//! `SqliteStore` and the `RedisStore` answer the same ones; per-user keys: the
//! `Keystore` and (with `keystore.user_keys = "redis"`) the `RedisStore`. They are
//! declared here, below both actors and the handles that send them (`handle::Store`,
//! `handle::UserKeys`), so that neither store names the other. Messages only one
//! actor answers are declared beside it (`keystore::MarkClean`, `cache::Pick`, …).

use actix::prelude::*;

use crate::error::Result;
use crate::keys::Secret;
use crate::model::idempotency::{Idem, Written};
use crate::model::pool::*;
use crate::model::user_key::{LoadedUserKey, UserKeyInfo};

// Pools and quota counters.

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

// Per-user keys.

/// Reads and decrypts one user's key for one service. A row that does not open is
/// treated as absent and logged as an integrity error.
#[derive(Message)]
#[rtype(result = "Result<LoadedUserKey>")]
pub struct LoadUserKey {
    pub user_id: String,
    pub service: String,
}

/// Records a report on a user's own key: `unauthorized` marks it rejected until the
/// user stores a new one. Answers `None` when the user has no key for the service,
/// else whether it is rejected now.
#[derive(Message)]
#[rtype(result = "Result<Written<Option<bool>>>")]
pub struct ReportUserKey {
    pub user_id: String,
    pub service: String,
    pub unauthorized: bool,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
    /// The reporting client's uid, `None` for an admin: `unauthorized` is only taken
    /// from the uid that stored the key (or an admin), else `forbidden`.
    pub reporter: Option<u32>,
}

/// Encrypts and stores (or replaces) a user's key; durable when it returns.
#[derive(Message)]
#[rtype(result = "Result<Written<()>>")]
pub struct StoreUserKey {
    pub user_id: String,
    pub service: String,
    pub key: Secret,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
    /// The uid of the client that stores it (the only non-admin that may report it
    /// `unauthorized`).
    pub owner: u32,
}

/// Deletes a user's key; answers whether one was there.
#[derive(Message)]
#[rtype(result = "Result<Written<bool>>")]
pub struct DeleteUserKey {
    pub user_id: String,
    pub service: String,
    /// The write's idempotency key, when one was sent.
    pub idem: Option<Idem>,
}

/// Lists a user's keys, masked, by service.
#[derive(Message)]
#[rtype(result = "Result<Vec<UserKeyInfo>>")]
pub struct ListUserKeys {
    pub user_id: String,
}

/// Why a report of `unauthorized` on a user's key is refused.
pub fn not_the_owner(reporter: u32) -> crate::error::Error {
    crate::error::Error::Forbidden(format!(
        "only the uid that stored this user's key (or an admin) may report it unauthorized; uid {reporter} did not store it"
    ))
}
