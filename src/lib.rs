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
//!   SQLite keystore (on a `SyncArbiter`); `store::handle::Store` is the handle to
//!   pools and quota counters (`Backend`: the embedded `SqliteStore` or the
//!   `RedisStore`); `store::user_keys::UserKeys` the handle to per-user keys (the
//!   `Keystore`, or with `keystore.user_keys = "redis"` the `RedisStore`, sealed and
//!   shared by the fleet); the messages both stores answer are `store::messages`; `store::cache::KeyCache` keeps decrypted keys in memory,
//!   and connections on its thread read hits straight from it, so a hit touches no
//!   store and sends no message. Every call into a store is bounded by
//!   `server.request_timeout_ms` (`store::within`). Redis: `store::keyspace` is the key
//!   layout, `store::envelope` the sealed-value format, `store::redis` the store (its
//!   command runner, pools, user keys, quota scripts, connection), `store::invalidation`
//!   the pub/sub listener that keeps the cache current.
//! - `process`: the running process: `config`, `access` (peer credentials to a
//!   role), `audit`, `metrics`, `logfmt`, `systemd` (readiness, watchdog),
//!   `hardening`, `lock` (the keystore's and the master key file's flocks).
//! - `wire`: the format: `protocol` parses lines (one reader per parameter) and
//!   encodes answers; `catalog::Op` is every op with its wire name and rules (write,
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
