//! apikeyd: a resident daemon that hands API keys to local processes over a Unix
//! socket speaking JSON lines.
//!
//! Architecture: actors own the state; the socket front end forwards. The folders
//! are the layers, top down; a module imports only from its own layer or below.
//! - `cli`: the bodies of the subcommands (the binary's `main.rs` is only the command
//!   line, `args.rs` its definition).
//! - `daemon`: `open_keystore` and `preflight` (`daemon::check`, which `apikeyd
//!   check-config` shares) before anything is bound; `start` builds the daemon
//!   (actors, cache, `App`) on an opened keystore and `run` serves it on a listener
//!   until told to stop. `serve`, the benches and in-process users share that wiring.
//! - `tools`: `rotate`, `legacy` (import-legacy) and `migrate`, offline, on the
//!   keystore, the fleet and the Redis keyspace; never on actor internals.
//! - `front`: `server` accepts connections, checks peer credentials and the
//!   connection cap; `session` reads request lines, runs them concurrently and
//!   answers in order (`sequencer`).
//! - `ops`: one file per op family: each op parses its request into its own struct
//!   (`ops::Params`), asks the stores and encodes the result; `ops::app::App` is what
//!   every connection shares (config, handles, metrics, audit); `ops::resolver` runs
//!   user key → channel pool → global pool → config default (never past a user key it
//!   cannot know).
//! - `fleet`: the start-time check of the master key against the fleet's
//!   (`fleet::keycheck`) and the authenticated heartbeats that gate rotation
//!   (`fleet::members`).
//! - `store`: the actors and their handles. `store::keystore::Keystore` owns the
//!   SQLite keystore (on a `SyncArbiter`); `store::handle` holds the handles the ops
//!   and the cache reach the stores by: `Store` for pools and quota counters (the
//!   embedded `SqliteStore` or the `RedisStore`) and `UserKeys` for per-user keys
//!   (the `Keystore`, or with `keystore.user_keys = "redis"` the `RedisStore`, sealed
//!   and shared by the fleet), each one typed `Backend` whose `ask` is the one place
//!   a call into a store is bounded by `server.request_timeout_ms` (and
//!   `App::keystore`, for the keystore's own messages). The messages both
//!   stores answer are `store::messages`; each actor's `Handler` stands beside the
//!   code that answers it. `store::cache::KeyCache` keeps decrypted keys in memory;
//!   connections on its thread read it through `CacheReader`, which answers a hit
//!   straight from its memory (no store, no message) and asks the actor on a miss.
//!   Redis: `store::keyspace` is the key layout, `store::envelope` the sealed-value
//!   format, `store::redis` the store (its command runner, pools, user keys, quota
//!   scripts, connection), `store::invalidation` the pub/sub listener that keeps the
//!   cache current.
//! - `process`: the running process: `config`, `access` (peer credentials to a
//!   role), `audit`, `metrics`, `logfmt`, `systemd` (readiness, watchdog),
//!   `hardening`, `lock` (the keystore's and the master key file's flocks).
//! - `wire`: the format: `protocol` parses lines (flat lines by a serde-free fast
//!   path, every other shape by serde_json; one reader per parameter) and encodes
//!   answers; `catalog::Op` is every op with its wire name and rules (write,
//!   admin-only, audited), checked once before dispatch; `client` is the one
//!   JSON-lines client.
//! - `model`: the domain types (pools, key health, counters, loaded user keys, the
//!   figures behind `stats`), `idempotency` (writes sent with an `idempotency_key`
//!   are recorded by the store in the write's own transaction or script; a repeat is
//!   answered from the record) and `clock`.
//! - `keys`: key material: the `MasterKey` that seals every key with AES-256-GCM
//!   bound to its `Place`, the `Secret` newtype, the keyring format and key file.
//! - `error` maps every request failure to a wire code. Start-up, reload and the
//!   tools fail with typed errors of their own module (`StartError`, `ConfigError`,
//!   `KeystoreError`, `FleetError`, …; thiserror), printed by the CLI.
//!
//! A cache miss for a user's own key (`get_user_api_key`), file by file:
//! 1. `ops/keys.rs`: the op parses its query and runs `ops::resolver::resolve`;
//! 2. `ops/resolver.rs`: the user key comes first, from `app.cache_reader.user_key`;
//! 3. `store/cache.rs`: `CacheReader::user_key` finds no entry and sends
//!    `LookupUserKey` to the `KeyCache`, whose handler loads through `UserKeys::load`
//!    (and caches the answer unless an invalidation raced with it);
//! 4. `store/handle.rs`: `UserKeys::load` → `Backend::ask` sends `LoadUserKey` to
//!    the actor, bounded by `server.request_timeout_ms` (`within`);
//! 5. user keys in SQLite: `store/keystore/mod.rs`, `Handler<LoadUserKey> for
//!    Keystore`: one query, opened with the master key (`keys`). Five files.
//!
//!    User keys in Redis: `store/redis/user_keys.rs`, `Handler<LoadUserKey> for
//!    RedisStore` → `load_user_key`: one pipeline, the hash named by
//!    `store::keyspace`, the value opened by `store::envelope` (and `keys`);
//! 6. `store/redis/runner.rs`: `pipeline` → `bounded` runs it within
//!    `redis.timeout_ms`, a read sent again once after a stale connection. Six files.
//!
//! `LoadUserKey` itself is declared in `store/messages.rs`; a value found stored in
//! clear also passes `clear_value` in `store/redis/mod.rs`.

pub mod cli;
pub mod daemon;
pub mod error;
pub mod fleet;
pub mod front;
pub mod keys;
pub mod model;
pub mod ops;
pub mod process;
pub mod store;
pub mod tools;
pub mod wire;

pub use daemon::{open_keystore, preflight, run, start, Control, StartError, Started};
