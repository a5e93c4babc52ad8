//! `Store`, the handle the ops and the cache reach pools and quota counters by:
//! its `Backend` is the one actor behind it (the embedded `SqliteStore` or the
//! `RedisStore`), and every call goes through `Backend::ask`, the one place the
//! request deadline is applied. Both actors answer the same messages
//! (`store::messages`), so nothing above this file knows which one it is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::embedded::SqliteStore;
use super::messages::*;
use super::redis::RedisStore;
use super::Backend;
use crate::error::Result;
use crate::model::figures::RedisStatus;
use crate::model::idempotency::Written;
use crate::model::pool::*;

/// Which kind of store is behind the handle.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    Embedded,
    Redis,
}

/// The actor that serves pools and quota counters: the embedded `SqliteStore` or
/// the `RedisStore`.
pub type PoolBackend = Backend<SqliteStore, RedisStore>;

/// The handle to whichever store actor serves pools and quotas.
#[derive(Clone)]
pub struct Store {
    pub mode: StoreMode,
    backend: PoolBackend,
    /// Redis mode: whether the connection is up right now.
    connected: Option<Arc<AtomicBool>>,
    /// Redis mode: the master and the failovers followed (for `stats`).
    redis_status: Option<Arc<RedisStatus>>,
    /// How long a store may take to answer (`server.request_timeout_ms`).
    deadline: Duration,
}

impl Store {
    /// The embedded store on `addr`.
    pub fn embedded(deadline: Duration, addr: Addr<SqliteStore>) -> Self {
        Store {
            mode: StoreMode::Embedded,
            backend: Backend::Local(addr),
            connected: None,
            redis_status: None,
            deadline,
        }
    }

    /// The Redis store on `addr`; `connected` says whether Redis answers right now,
    /// `status` what `stats` shows of the connection.
    pub fn redis(
        deadline: Duration,
        addr: Addr<RedisStore>,
        connected: Arc<AtomicBool>,
        status: Arc<RedisStatus>,
    ) -> Self {
        Store {
            mode: StoreMode::Redis,
            backend: Backend::Redis(addr),
            connected: Some(connected),
            redis_status: Some(status),
            deadline,
        }
    }

    /// Redis mode: the master's address as Sentinel named it, and the failovers
    /// followed since start.
    pub fn redis_status(&self) -> Option<&RedisStatus> {
        self.redis_status.as_deref()
    }

    /// `None` in embedded mode; in Redis mode whether Redis answers.
    pub fn redis_connected(&self) -> Option<bool> {
        self.connected.as_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// See [`LoadPool`].
    pub async fn load_pool(&self, pool: PoolRef) -> Result<Vec<PoolEntry>> {
        self.backend.ask(self.deadline, LoadPool { pool }).await
    }

    /// See [`ReportPoolKey`].
    pub async fn report_pool_key(&self, msg: ReportPoolKey) -> Result<Written<Option<Health>>> {
        self.backend.ask(self.deadline, msg).await
    }

    /// See [`EnablePoolKey`].
    pub async fn enable_pool_key(&self, msg: EnablePoolKey) -> Result<Written<bool>> {
        self.backend.ask(self.deadline, msg).await
    }

    /// See [`CountPicks`].
    pub async fn count_picks(&self, msg: CountPicks) -> Result<()> {
        self.backend.ask(self.deadline, msg).await
    }

    /// See [`AddPoolKey`].
    pub async fn add_pool_key(&self, msg: AddPoolKey) -> Result<Written<(String, bool)>> {
        self.backend.ask(self.deadline, msg).await
    }

    /// See [`RemovePoolKey`].
    pub async fn remove_pool_key(&self, msg: RemovePoolKey) -> Result<Written<bool>> {
        self.backend.ask(self.deadline, msg).await
    }

    /// See [`ListPoolKeys`].
    pub async fn list_pool_keys(&self, pool: PoolRef) -> Result<Vec<PoolKeyInfo>> {
        self.backend.ask(self.deadline, ListPoolKeys { pool }).await
    }

    /// See [`CountPoolKeys`].
    pub async fn count_pool_keys(&self) -> Result<Vec<PoolKeyCount>> {
        self.backend.ask(self.deadline, CountPoolKeys).await
    }

    /// See [`ReadUsage`].
    pub async fn read_usage(&self, msg: ReadUsage) -> Result<u64> {
        self.backend.ask(self.deadline, msg).await
    }

    /// See [`IncrementUsage`].
    pub async fn increment_usage(&self, msg: IncrementUsage) -> Result<Written<u64>> {
        self.backend.ask(self.deadline, msg).await
    }

    /// See [`ConsumeUsage`].
    pub async fn consume_usage(&self, msg: ConsumeUsage) -> Result<Written<(bool, u64)>> {
        self.backend.ask(self.deadline, msg).await
    }
}
