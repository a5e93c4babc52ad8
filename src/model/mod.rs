//! The domain types every layer above speaks of: pools, key health and counters,
//! loaded user keys, idempotency records, the clock; no actor, store or wire format.

pub mod clock;
pub mod figures;
pub mod idempotency;
pub mod pool;
pub mod user_key;
