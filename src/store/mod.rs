//! The stores: the actors that own the daemon's state — the keystore (per-user keys
//! in SQLite), the pool and quota store (embedded SQLite or Redis) and the cache of
//! decrypted keys — with the messages they answer (`messages`), the handles the ops
//! reach them by (`handle`, where the request deadline is applied), the pub/sub
//! listener that keeps the cache current in Redis mode (`invalidation`), and the
//! Redis key layout (`keyspace`) and sealed-value format (`envelope`).

pub mod cache;
pub mod embedded;
pub mod envelope;
pub mod handle;
pub mod invalidation;
pub mod keyspace;
pub mod keystore;
pub mod messages;
pub mod redis;
