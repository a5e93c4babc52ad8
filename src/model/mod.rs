//! The domain types every layer above speaks of: pools, key health and counters,
//! loaded user keys, what the stores count for `stats` (`figures`), idempotency
//! records (with the records' SQLite table and the Redis counting Lua both stores
//! share), the clock; no actor.

pub mod clock;
pub mod figures;
pub mod idempotency;
pub mod pool;
pub mod user_key;
