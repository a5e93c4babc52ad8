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

pub mod access;
pub mod actors;
pub mod app;
pub mod audit;
pub mod check;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod envelope;
pub mod error;
pub mod fleet;
pub mod hardening;
pub mod idempotency;
pub mod keyspace;
pub mod legacy;
pub mod lock;
pub mod logfmt;
pub mod metrics;
pub mod migrate;
pub mod op;
pub mod ops;
pub mod protocol;
pub mod resolver;
pub mod rotate;
pub mod sequencer;
pub mod server;
pub mod services;
pub mod session;
pub mod systemd;

use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use actors::cache::KeyCache;
use actors::embedded::SqliteStore;
use actors::keystore::{Keystore, KeystoreError, Opened};
use actors::redis::RedisStore;
use actors::store::{Store, StoreMode};
use actors::user_keys::UserKeys;
use app::App;
use config::Config;
use crypto::MasterKey;
use rusqlite::Connection;

/// Why the daemon refuses to start; the message tells the operator what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another process holds the keystore's lock.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// The keystore or the master key cannot be opened, or do not match.
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    /// In Redis mode: the master key is not the fleet's.
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
    /// In Redis mode: `[redis]` cannot be used to reach Redis.
    #[error(transparent)]
    Redis(#[from] actors::redis::ConnectError),
    /// Opening the audit file when the daemon is built (the preflight checked it).
    #[error("cannot open log.audit_file for appending: {0}")]
    Audit(#[source] std::io::Error),
    #[error("no keystore connection for the store")]
    NoStoreConnection,
    #[error("cannot serve metrics.listen: {0}")]
    MetricsThread(#[source] std::io::Error),
    #[error("cannot start the keystore's integrity check: {0}")]
    CheckThread(#[source] std::io::Error),
}

/// Threads (each with its own SQLite connection) serving per-user keys.
const KEYSTORE_THREADS: usize = 2;

/// What the process tells a running daemon.
pub enum Control {
    /// Re-read the config file and the keyring and apply them (see `App::reload`).
    Reload,
    /// Stop accepting, answer what is in flight, return.
    Shutdown,
}

/// Opens and checks the keystore and master key, creating them on a first start;
/// run after [`preflight`], which refused everything it could see before anything
/// was created. Takes the keystore's lock first: a second daemon on the same
/// keystore is refused before it touches anything; then the master key file's.
/// `redis_answered`: what the preflight found of Redis (`Some(false)`: down, so the
/// fleet check is left to the heartbeat instead of waiting for Redis again).
pub fn open_keystore(config: &Config, redis_answered: Option<bool>) -> Result<Opened, StartError> {
    actors::keystore::create_folder(&config.keystore.path)?;
    let mut lock = lock::acquire(
        &config.keystore.path,
        "serve",
        Some(config.server.socket.as_path()),
        true,
    )?;
    let key_path = actors::keystore::master_key_path(config);
    if key_path.exists() {
        lock.lock_key(&key_path)?;
    }
    let mut opened = actors::keystore::open_serving(config, KEYSTORE_THREADS + 1, &|| {
        fleet::may_create_key(config)
    })?;
    // A key made just now is locked as soon as it exists.
    lock.lock_key(&key_path)?;
    opened.lock = Some(lock);
    if !config.redis.url.is_empty() && redis_answered != Some(false) {
        opened.fleet_verified = fleet::verify_at_start(config, &opened.key)?;
    }
    Ok(opened)
}

/// Everything that can refuse a start, checked before anything is created, bound
/// or changed ([`check::preflight`], which `check-config` runs too): the first
/// problem, or what the checks found of Redis. Warnings are logged.
pub fn preflight(config: &Config) -> Result<Option<bool>, String> {
    let report = check::preflight(config, &check::Viewer::current(), check::Purpose::Serve);
    if let Some(problem) = report.first_problem() {
        return Err(problem.to_string());
    }
    for f in &report.findings {
        tracing::warn!("{}", f.text);
    }
    Ok(report.redis_answered)
}

/// What `run` needs of the Redis store beyond the `Store` handle.
struct RedisParts {
    target: actors::redis::Target,
    names: actors::redis::Names,
    /// The store's address, which also serves user keys when they live in Redis.
    addr: Addr<RedisStore>,
    /// The store's switches for the `App` (reloadable legacy setting, "has answered").
    switches: app::RedisSwitches,
    member: FleetMember,
}

/// This daemon as a member of the fleet, for removing its heartbeat on a clean stop.
struct FleetMember {
    id: String,
    leaving: Arc<AtomicBool>,
}

/// Starts the store actor the config asks for: Redis when `redis.url` is set, else
/// the embedded store on `db`. In Redis mode also starts the fleet heartbeat.
fn start_store(
    config: &Config,
    key: Arc<MasterKey>,
    db: Connection,
    fleet_verified: bool,
    audit: &Arc<audit::Audit>,
) -> Result<(Store, Option<RedisParts>), StartError> {
    if config.redis.url.is_empty() {
        let db = Mutex::new(Some(db));
        let addr = SyncArbiter::start(1, move || {
            let db = db.lock().ok().and_then(|mut d| d.take());
            SqliteStore::new(
                db.expect("the store's connection is taken once"),
                key.clone(),
            )
        });
        return Ok((
            Store::new(StoreMode::Embedded, None, config.request_timeout(), addr),
            None,
        ));
    }
    let target = actors::redis::Target::new(&config.redis)?;
    // "Not known to be down": the first command tries, and the first ping runs at once.
    let connected = Arc::new(AtomicBool::new(true));
    let store = RedisStore::new(
        target.clone(),
        &config.redis,
        key.clone(),
        connected.clone(),
        audit.clone(),
    )?;
    store.count_records_of_ttl(config.server.idempotency_ttl_s);
    let me = fleet::Identity::new(config.server.socket.clone());
    let member = FleetMember {
        id: me.id.clone(),
        leaving: me.leaving.clone(),
    };
    actix_rt::spawn(fleet::heartbeat(
        store.connection(),
        config.redis.clone(),
        key,
        me,
        fleet_verified,
        store.status(),
    ));
    let names = actors::redis::Names {
        prefix: config.redis.prefix.clone(),
    };
    let switches = app::RedisSwitches {
        accept_legacy: store.accept_legacy_switch(),
        answered: store.answered_flag(),
    };
    let status = store.status();
    let addr = store.start();
    Ok((
        Store::new(
            StoreMode::Redis,
            Some(connected),
            config.request_timeout(),
            addr.clone(),
        )
        .with_redis_status(status),
        Some(RedisParts {
            target,
            names,
            addr,
            switches,
            member,
        }),
    ))
}

/// Sends WATCHDOG=1 every `every` for as long as the cache actor (on the thread that
/// serves connections) and a keystore thread both answer within that time; a wedged
/// daemon stops the heartbeat and systemd restarts it.
async fn watchdog(app: Rc<App>, every: std::time::Duration) {
    loop {
        let alive = async {
            app.cache
                .send(actors::cache::ReadCacheFigures)
                .await
                .is_ok()
                && app.keystore.send(actors::keystore::Ping).await.is_ok()
        };
        match tokio::time::timeout(every, alive).await {
            Ok(true) => systemd::watchdog(),
            _ => tracing::error!("an actor did not answer the watchdog in time"),
        }
        tokio::time::sleep(every).await;
    }
}

/// The daemon built: every actor started and wired (and in Redis mode the fleet
/// heartbeat and the invalidation listener), not yet serving. Holds the keystore lock.
pub struct Started {
    pub app: Rc<App>,
    /// Redis mode: this daemon in the fleet (its heartbeat goes on a clean stop).
    member: Option<FleetMember>,
}

/// Builds the daemon on an opened keystore: the store, keystore and cache actors and
/// the shared `App`. Must be called inside an actix `System`. The benches and
/// in-process tests use it as the daemon does, so the wiring exists once.
pub fn start(config: Config, opened: Opened) -> Result<Started, StartError> {
    let Opened {
        key,
        mut connections,
        lock,
        fleet_verified,
        check,
    } = opened;
    if let Some(check) = check {
        // A keystore that fails its deferred check stops the daemon as a refused
        // start would: no write was accepted, and it is not marked clean.
        check
            .spawn(|e| {
                if tracing::enabled!(tracing::Level::ERROR) {
                    tracing::error!("refusing to go on: {e}");
                } else {
                    eprintln!("apikeyd: refusing to go on: {e}");
                }
                std::process::exit(1);
            })
            .map_err(StartError::CheckThread)?;
    }
    let store_db = connections.pop().ok_or(StartError::NoStoreConnection)?;
    let audit =
        Arc::new(audit::Audit::open(config.log.audit_file.as_deref()).map_err(StartError::Audit)?);
    let (store, redis) = start_store(&config, key.clone(), store_db, fleet_verified, &audit)?;
    let key_for_app = key.clone();
    let threads = connections.len();
    let pool = Mutex::new(connections);
    let keystore = SyncArbiter::start(threads, move || {
        let db = pool.lock().ok().and_then(|mut p| p.pop());
        Keystore::new(db.expect("one connection per keystore thread"), key.clone())
    });
    let in_redis = config.user_keys_in_redis();
    let user_keys = match &redis {
        Some(r) if in_redis => UserKeys::new(true, config.request_timeout(), r.addr.clone()),
        _ => UserKeys::new(false, config.request_timeout(), keystore.clone()),
    };
    tracing::info!(
        user_keys = if in_redis { "redis" } else { "local" },
        "per-user keys"
    );
    let cache = KeyCache::new(user_keys.clone(), store.clone(), &config.cache);
    let cache_reader = cache.reader();
    let cache = cache.start();
    let mut switches = None;
    let mut member = None;
    if let Some(r) = redis {
        member = Some(r.member);
        actix_rt::spawn(actors::redis::listen(
            r.target,
            r.names,
            cache.clone(),
            in_redis,
        ));
        switches = Some(r.switches);
    }
    let mut app = App::new(
        config,
        keystore,
        user_keys,
        cache,
        cache_reader,
        store,
        audit,
        key_for_app,
    );
    app.redis = switches;
    app.hold_lock(lock);
    let app = Rc::new(app);
    Ok(Started { app, member })
}

/// Serves the daemon built by `start` on `listener` until `Control::Shutdown` (or the sender is dropped).
/// Must be called inside an actix `System`.
///
/// `metrics`: the `metrics.listen` port bound by [`metrics::bind`], served from here on.
pub async fn run(
    started: Started,
    listener: UnixListener,
    mut control: mpsc::UnboundedReceiver<Control>,
    metrics: Option<metrics::Listener>,
) -> Result<(), StartError> {
    let app = started.app.clone();
    let mode = app.store.mode;

    if let Some(listener) = metrics {
        let addr = listener.addr();
        let app = app.clone();
        listener
            .serve(move || {
                let app = app.clone();
                async move { app.metrics_text().await }
            })
            .map_err(StartError::MetricsThread)?;
        tracing::info!(%addr, "serving GET /metrics");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reload_app = app.clone();
    actix_rt::spawn(async move {
        while let Some(c) = control.recv().await {
            match c {
                Control::Reload => {
                    if let Err(e) = reload_app.reload().await {
                        tracing::error!(
                            "reload failed, keeping the running config and keyring: {e}"
                        );
                    }
                }
                Control::Shutdown => {
                    systemd::stopping();
                    break;
                }
            }
        }
        let _ = stop_tx.send(());
    });
    if let Some(every) = systemd::watchdog_interval() {
        actix_rt::spawn(watchdog(app.clone(), every / 2));
    }
    tracing::info!(mode = ?mode, "apikeyd ready");
    systemd::ready();
    server::serve(app.clone(), listener, async {
        let _ = stop_rx.await;
    })
    .await;
    if let Some(m) = &started.member {
        let (redis, id, leaving) = (app.config().redis.clone(), m.id.clone(), m.leaving.clone());
        let _ = tokio::task::spawn_blocking(move || fleet::leave(&redis, &id, &leaving)).await;
    }
    if let Err(e) = app.keystore(actors::keystore::MarkClean).await {
        tracing::warn!(error = %e, "keystore not marked clean; the next start runs the full check");
    }
    Ok(())
}
