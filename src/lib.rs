//! apikeyd: a resident daemon that hands API keys to local processes over a Unix
//! socket speaking JSON lines.
//!
//! Architecture: actors own the state; the socket front end forwards.
//! - `start` builds the daemon (actors, cache, `App`) on an opened keystore; `run`
//!   serves it on a listener until told to stop. `serve`, the benches and in-process
//!   users share that one wiring.
//! - `server` accepts connections, checks peer credentials and the connection cap;
//!   `session` reads request lines, runs them concurrently, answers in order
//!   (`sequencer` keeps a connection's reads and writes in order).
//! - `protocol` parses lines and has one reader per parameter; `op::Op` is every op
//!   with its wire name and rules (write, admin-only, audited), checked once before
//!   dispatch; `ops` has one file per op family: each op parses its request into its
//!   own struct (`ops::Params`), turns it into actor messages and encodes the result.
//! - `actors::keystore::Keystore` owns the SQLite keystore (on a `SyncArbiter`);
//!   `actors::store::Store` is the handle to pools and quota counters (the embedded
//!   `SqliteStore`, or `RedisStore` behind the same messages); `actors::user_keys::UserKeys`
//!   is the handle to per-user keys (the `Keystore`, or with `keystore.user_keys =
//!   "redis"` the `RedisStore`, sealed and shared by the fleet); `actors::cache::KeyCache`
//!   keeps decrypted keys in memory, and connections on its thread read hits straight
//!   from its shard, so a hit touches no store and sends no message. A cached pool
//!   carries each key's id and health, so picks skip cooling or disabled keys there
//!   too; picks are counted in the shard and flushed to the store once a second.
//! - Every call into a store is bounded by `server.request_timeout_ms`
//!   (`actors::within`); `systemd` reports readiness and the watchdog.
//! - `resolver` runs user key → channel pool → global pool → config default (never past
//!   a user key it cannot know).
//! - `idempotency`: writes sent with an `idempotency_key` are recorded by the store in
//!   the write's own transaction (SQLite) or script (Redis); a repeat is answered from
//!   the record.
//! - `crypto` seals every key with AES-256-GCM bound to its place; `error` maps every
//!   request failure to a wire code. Start-up, reload and the tools fail with typed
//!   errors of their own module (`StartError`, `ConfigError`, `KeystoreError`,
//!   `FleetError`, …; thiserror), printed by the CLI.
//! - `access` turns peer credentials (uid, gid, supplementary groups) into a role;
//!   `audit` records writes, admin ops and refused connections; `metrics` counts
//!   answers and renders the Prometheus text; `logfmt` escapes text-log values;
//!   `check` is the start-up preflight, which `serve` and `apikeyd check-config`
//!   share; `cli` holds the bodies of the subcommands (the binary's `main.rs` is only
//!   the command line).
//! - Redis: `keyspace` is the key layout (names, their inverse, scans), `envelope` the
//!   sealed-value format, `actors::redis` the store (with `connection`: Target,
//!   Sentinel, TLS; `listen`: pub/sub invalidation; `quota`: the counters, whose
//!   calls of one event-loop turn go to Redis as one script). `fleet` checks the master key
//!   against the fleet's and runs the heartbeat that gates rotation; `lock` holds the
//!   keystore's and the master key file's flocks. The tools `rotate`, `legacy`
//!   (import-legacy) and `migrate` depend on these, never on actor internals.

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
