//! `App`: what every connection shares — the actor addresses, the live config, counters.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use actix::Addr;

use crate::actors::cache::KeyCache;
use crate::actors::keystore::Keystore;
use crate::actors::store::Store;
use crate::audit::Audit;
use crate::config::Config;

/// Shared by every connection of one daemon.
pub struct App {
    config: RwLock<Arc<Config>>,
    /// Per-user keys (SQLite, on a `SyncArbiter`).
    pub keystore: Addr<Keystore>,
    /// Decrypted keys in memory.
    pub cache: Addr<KeyCache>,
    /// Pools and quota counters.
    pub store: Store,
    /// Where audit lines go.
    pub audit: Audit,
    /// Open connections right now.
    pub connections: AtomicU64,
    /// Non-blank request lines since start.
    pub requests_total: AtomicU64,
    pub started: Instant,
}

impl App {
    /// The shared state around running actors.
    pub fn new(
        config: Config,
        keystore: Addr<Keystore>,
        cache: Addr<KeyCache>,
        store: Store,
        audit: Audit,
    ) -> Self {
        App {
            audit,
            config: RwLock::new(Arc::new(config)),
            keystore,
            cache,
            store,
            connections: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The config in force now (replaced whole on reload).
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Installs a reloaded config.
    pub fn set_config(&self, config: Config) {
        let new = Arc::new(config);
        match self.config.write() {
            Ok(mut c) => *c = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}
