//! The actors that own the daemon's state: the keystore (per-user keys in SQLite),
//! the store (pools and quota counters), and the cache of decrypted keys.

pub mod cache;
pub mod embedded;
pub mod keystore;
pub mod redis;
pub mod store;
