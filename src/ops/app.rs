//! `App`: what every connection shares — the actor addresses, the live config, counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use actix::Addr;

use crate::keys::{MasterKey, MasterKeyError};
use crate::process::audit::Audit;
use crate::process::config::{Config, ConfigError};
use crate::store::cache::{CacheReader, Configure, KeyCache};
use crate::store::handle::{Store, UserKeys};
use crate::store::keystore::{read_master_key, CheckKeyring, Keystore};

/// Why a reload changed nothing; the running config and keyring stay.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the running config was not read from a file")]
    NoConfigFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    MasterKey(#[from] MasterKeyError),
    /// The keystore could not be asked whether the new keyring opens it.
    #[error(transparent)]
    Keystore(#[from] crate::error::Error),
    #[error("the master key file does not open this keystore; keeping the running keyring")]
    KeyringDoesNotOpen,
}

impl From<ReloadError> for crate::error::Error {
    /// The files are wrong (`bad_config`, with the problem), or the keystore could
    /// not be asked (its own code).
    fn from(e: ReloadError) -> Self {
        match e {
            ReloadError::Keystore(e) => e,
            e => crate::error::Error::BadConfig(format!(
                "reload failed, the running config and keyring stay: {e}"
            )),
        }
    }
}

/// A reload applied: the key versions now in service, and the settings that
/// changed in the file but need a restart (named every time until restarted).
pub struct Reloaded {
    pub key_versions: Vec<u32>,
    pub warnings: Vec<String>,
}

/// Redis mode: the store's state that the rest of the daemon reads or switches.
pub struct RedisSwitches {
    /// `redis.accept_legacy_plaintext`, applied by reloads.
    pub accept_legacy: Arc<AtomicBool>,
    /// Whether Redis has answered once since start.
    pub answered: Arc<AtomicBool>,
}

/// Shared by every connection of one daemon.
pub struct App {
    config: RwLock<Arc<Config>>,
    /// The config the daemon started with: restart-only settings are compared
    /// with it, so a reload names them until the daemon is restarted.
    started_config: Arc<Config>,
    /// The keystore's lock and the master key file's (re-taken on the file a
    /// rotation wrote in its place).
    lock: std::sync::Mutex<Option<crate::process::lock::KeystoreLock>>,
    /// The SQLite keystore (on a `SyncArbiter`): per-user keys unless they live in
    /// Redis, and the keyring's check value.
    pub keystore: Addr<Keystore>,
    /// Per-user keys, wherever they live (`keystore.user_keys`).
    pub user_keys: UserKeys,
    /// Decrypted keys in memory: the actor, for changes…
    pub cache: Addr<KeyCache>,
    /// …and its same-thread read handle: hits without a message, misses through
    /// the actor.
    pub cache_reader: CacheReader,
    /// Pools and quota counters.
    pub store: Store,
    /// Where audit lines go.
    pub audit: Arc<Audit>,
    /// The master keyring every actor seals and opens with; swapped on reload.
    pub key: Arc<MasterKey>,
    /// `server.request_timeout_ms` as read at start, like the store's and the cache's.
    deadline: std::time::Duration,
    /// Open connections right now.
    pub connections: AtomicU64,
    /// Non-blank request lines since start.
    pub requests_total: AtomicU64,
    pub started: Instant,
    /// Redis mode only (set by `start` after `new`).
    pub redis: Option<RedisSwitches>,
    /// Request counters and the Prometheus registry.
    pub metrics: crate::process::metrics::Metrics,
}

impl App {
    /// The shared state around running actors.
    // One argument per actor or shared part; a builder would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        keystore: Addr<Keystore>,
        user_keys: UserKeys,
        cache: Addr<KeyCache>,
        cache_reader: CacheReader,
        store: Store,
        audit: Arc<Audit>,
        key: Arc<MasterKey>,
    ) -> Self {
        let metrics = crate::process::metrics::Metrics::new(
            store.mode == crate::store::handle::StoreMode::Redis,
        );
        let config = Arc::new(config);
        App {
            deadline: config.request_timeout(),
            cache_reader,
            audit,
            key,
            started_config: config.clone(),
            lock: std::sync::Mutex::new(None),
            config: RwLock::new(config),
            keystore,
            user_keys,
            cache,
            store,
            connections: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            started: Instant::now(),
            redis: None,
            metrics,
        }
    }

    /// `None` in embedded mode; in Redis mode whether Redis has answered since start
    /// and is not known to be down now.
    pub fn redis_up(&self) -> Option<bool> {
        self.store.redis_connected().map(|up| {
            up && self
                .redis
                .as_ref()
                .is_some_and(|r| r.answered.load(Ordering::Relaxed))
        })
    }

    /// Asks the keystore, for at most `server.request_timeout_ms`.
    pub async fn keystore<M, T>(&self, msg: M) -> crate::error::Result<T>
    where
        Keystore: actix::Handler<M>,
        M: actix::Message<Result = crate::error::Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        crate::store::handle::within(self.deadline, self.keystore.send(msg)).await
    }

    /// The Prometheus text of the daemon's metrics now (`metrics` op, `/metrics`).
    pub async fn metrics_text(&self) -> crate::error::Result<String> {
        let cache = self
            .cache
            .send(crate::store::cache::ReadCacheFigures)
            .await?;
        self.metrics.render(&crate::process::metrics::Gauges {
            cache,
            connections: self.connections.load(std::sync::atomic::Ordering::Relaxed),
            redis_up: self.redis_up(),
            redis: self.store.redis_status(),
            pools: match self.store.count_pool_keys().await {
                Ok(pools) => Some(pools),
                Err(e) => {
                    tracing::debug!(error = %e, "pool key counts left out of the metrics");
                    None
                }
            },
            unauthenticated_heartbeats: self.store.redis_status().map(|s| {
                s.unauthenticated_heartbeats
                    .load(std::sync::atomic::Ordering::Relaxed)
            }),
        })
    }

    /// The config in force now (replaced whole on reload).
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Hands the keystore's lock to the daemon's shared state, for its whole life.
    pub fn hold_lock(&self, lock: Option<crate::process::lock::KeystoreLock>) {
        match self.lock.lock() {
            Ok(mut l) => *l = lock,
            Err(poisoned) => *poisoned.into_inner() = lock,
        }
    }

    /// Installs a reloaded config.
    fn set_config(&self, config: Config) {
        let new = Arc::new(config);
        match self.config.write() {
            Ok(mut c) => *c = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Re-reads the config file and the master keyring and applies them: services,
    /// access (new connections, names resolved again), quota, cache, the keyring,
    /// `redis.accept_legacy_plaintext` and `log.audit_quota`; reopens the audit file.
    /// Each setting changed since the start that needs a restart is logged as a
    /// warning and answered, at every reload until the daemon is restarted. The
    /// keyring is only put in service when it opens the keystore's check value; on
    /// any failure nothing changes.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        crate::process::systemd::reloading();
        let outcome = self.reload_now().await;
        crate::process::systemd::ready();
        outcome
    }

    async fn reload_now(&self) -> Result<Reloaded, ReloadError> {
        let path = self
            .config()
            .source
            .clone()
            .ok_or(ReloadError::NoConfigFile)?;
        let new = Config::load(&path, false)?;
        let candidate = Arc::new(read_master_key(&new)?);
        // Bounded like every other store call: a wedged keystore fails the reload.
        let opens = self
            .keystore(CheckKeyring {
                candidate: candidate.clone(),
            })
            .await?;
        if !opens {
            return Err(ReloadError::KeyringDoesNotOpen);
        }
        self.key.replace_with(&candidate);
        self.cache.do_send(Configure {
            cache: new.cache.clone(),
        });
        let mut warnings = Vec::new();
        for setting in crate::process::config::needs_restart(&self.started_config, &new) {
            let text = format!(
                "{setting} changed in the config file but needs a restart; the running value stays"
            );
            tracing::warn!(setting, "{text}");
            warnings.push(text);
        }
        // The key file a rotation wrote in place of the one locked at start.
        let key_path = crate::store::keystore::master_key_path(&new);
        if let Ok(mut guard) = self.lock.lock() {
            if let Some(lock) = guard.as_mut() {
                if let Err(e) = lock.lock_key(&key_path) {
                    tracing::error!("cannot lock the master key file after the reload: {e}");
                }
            }
        }
        if let Some(r) = &self.redis {
            r.accept_legacy
                .store(new.redis.accept_legacy_plaintext, Ordering::Relaxed);
        }
        if let Err(e) = self.audit.reopen() {
            tracing::error!(error = %e, "cannot reopen log.audit_file; still appending to the old one");
        }
        self.set_config(new);
        let key_versions = self.key.versions();
        tracing::info!(key_versions = ?key_versions, "config and keyring reloaded");
        Ok(Reloaded {
            key_versions,
            warnings,
        })
    }
}
