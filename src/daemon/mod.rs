//! The daemon assembled: `open_keystore` and `preflight` (in `check`, which `apikeyd
//! check-config` shares) before anything is bound, `start` wires the actors and the
//! shared `App`, `run` serves them on a listener until told to stop; the systemd
//! watchdog.

pub mod check;

use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use rusqlite::Connection;

use crate::fleet;
use crate::front::server;
use crate::keys::MasterKey;
use crate::ops::app::{self, App};
use crate::process::config::Config;
use crate::process::{audit, lock, metrics, systemd};
use crate::store::cache::KeyCache;
use crate::store::embedded::SqliteStore;
use crate::store::handle::{Backend, Store, UserKeys};
use crate::store::keystore::{Keystore, KeystoreError, Opened};
use crate::store::redis::RedisStore;

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
    Redis(#[from] crate::store::redis::ConnectError),
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
    crate::store::keystore::create_folder(&config.keystore.path)?;
    let mut lock = lock::acquire(
        &config.keystore.path,
        "serve",
        Some(config.server.socket.as_path()),
        true,
    )?;
    let key_path = crate::store::keystore::master_key_path(config);
    if key_path.exists() {
        lock.lock_key(&key_path)?;
    }
    let mut opened = crate::store::keystore::open_serving(config, KEYSTORE_THREADS + 1, &|| {
        fleet::may_create_key(config).map_err(Into::into)
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
    target: crate::store::redis::Target,
    names: crate::store::redis::Names,
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
        return Ok((Store::embedded(config.request_timeout(), addr), None));
    }
    let target = crate::store::redis::Target::new(&config.redis)?;
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
    let names = crate::store::redis::Names {
        prefix: config.redis.prefix.clone(),
    };
    let switches = app::RedisSwitches {
        accept_legacy: store.accept_legacy_switch(),
        answered: store.answered_flag(),
    };
    let status = store.status();
    let addr = store.start();
    Ok((
        Store::redis(config.request_timeout(), addr.clone(), connected, status),
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
                .send(crate::store::cache::ReadCacheFigures)
                .await
                .is_ok()
                && app
                    .keystore
                    .send(crate::store::keystore::Ping)
                    .await
                    .is_ok()
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
        Some(r) if in_redis => {
            UserKeys::new(Backend::Redis(r.addr.clone()), config.request_timeout())
        }
        _ => UserKeys::new(Backend::Local(keystore.clone()), config.request_timeout()),
    };
    tracing::info!(
        user_keys = if in_redis { "redis" } else { "local" },
        "per-user keys"
    );
    let (cache, cache_reader) =
        KeyCache::new(user_keys.clone(), store.clone(), &config.cache).start_here();
    let mut switches = None;
    let mut member = None;
    if let Some(r) = redis {
        member = Some(r.member);
        actix_rt::spawn(crate::store::invalidation::listen(
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
    if let Err(e) = app.keystore(crate::store::keystore::MarkClean).await {
        tracing::warn!(error = %e, "keystore not marked clean; the next start runs the full check");
    }
    Ok(())
}
