//! The offline tools that change the keystore or the Redis keyspace while no daemon
//! serves it: master-key rotation, import of the legacy layout, migration of per-user
//! keys between the keystore and Redis.

pub mod legacy;
pub mod migrate;
pub mod rotate;
