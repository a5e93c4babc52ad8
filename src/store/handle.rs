//! The handles the ops and the cache reach the stores by: `Store` for pools and quota
//! counters (the embedded `SqliteStore` or the `RedisStore`), `UserKeys` for per-user
//! keys (the SQLite `Keystore`, or the `RedisStore` with `keystore.user_keys =
//! "redis"`). Each wraps one `Backend`, the actor behind it, and every call goes
//! through `Backend::ask`, the one place the request deadline
//! (`server.request_timeout_ms`) is applied (and `App::keystore`, for the keystore's
//! own messages). Both actors behind a handle answer the same messages
//! (`store::messages`), so nothing above this file knows which one it is; each
//! actor's `Handler` sits beside the code that answers.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use super::embedded::SqliteStore;
use super::keystore::Keystore;
use super::messages::*;
use super::redis::RedisStore;
use crate::error::{Error, Result};
use crate::model::figures::RedisStatus;
use crate::model::idempotency::Written;
use crate::model::pool::*;
use crate::model::user_key::{LoadedUserKey, UserKeyInfo};

/// Awaits an actor's answer for at most `deadline` (`server.request_timeout_ms`).
/// Every call that may block on a store goes through here, so no request waits
/// forever, while cache hits need no timer at all. A write cut off this way may still
/// be applied: only a success response promises anything.
pub async fn within<T>(
    deadline: Duration,
    answer: impl Future<Output = std::result::Result<Result<T>, actix::MailboxError>>,
) -> Result<T> {
    match tokio::time::timeout(deadline, answer).await {
        Ok(answer) => answer?,
        Err(_) => {
            tracing::warn!("a store did not answer within the request deadline");
            Err(Error::Unavailable(format!(
                "the request did not finish within {} ms (server.request_timeout_ms); a write may or may not have been applied",
                deadline.as_millis()
            )))
        }
    }
}

/// The actor behind a handle: on this host (SQLite) or in Redis. Every call through
/// a handle goes through [`Backend::ask`], the one place the request deadline is
/// applied (and `App::keystore`, for the keystore's own messages).
pub enum Backend<L: Actor, R: Actor> {
    Local(Addr<L>),
    Redis(Addr<R>),
}

impl<L: Actor, R: Actor> Clone for Backend<L, R> {
    fn clone(&self) -> Self {
        match self {
            Backend::Local(a) => Backend::Local(a.clone()),
            Backend::Redis(a) => Backend::Redis(a.clone()),
        }
    }
}

impl<L: Actor, R: Actor> Backend<L, R> {
    /// Sends `msg` and waits at most `deadline` for the answer ([`within`]).
    pub async fn ask<M, T>(&self, deadline: Duration, msg: M) -> Result<T>
    where
        M: Message<Result = Result<T>> + Send + 'static,
        T: Send + 'static,
        L: Handler<M>,
        R: Handler<M>,
        L::Context: ToEnvelope<L, M>,
        R::Context: ToEnvelope<R, M>,
    {
        match self {
            Backend::Local(a) => within(deadline, a.send(msg)).await,
            Backend::Redis(a) => within(deadline, a.send(msg)).await,
        }
    }
}

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

/// The actor that serves per-user keys: the SQLite `Keystore` or the `RedisStore`.
pub type UserKeysAt = Backend<Keystore, RedisStore>;

/// Where per-user keys are read and written.
#[derive(Clone)]
pub struct UserKeys {
    /// The keys live in Redis, shared by the fleet: a cached key may then be served
    /// past its TTL while Redis is down (flagged degraded).
    pub in_redis: bool,
    at: UserKeysAt,
    deadline: Duration,
}

impl UserKeys {
    /// A handle to `at`; each call waits at most `deadline`
    /// (`server.request_timeout_ms`).
    pub fn new(at: UserKeysAt, deadline: Duration) -> Self {
        UserKeys {
            in_redis: matches!(at, Backend::Redis(_)),
            at,
            deadline,
        }
    }

    /// See [`LoadUserKey`].
    pub async fn load(&self, msg: LoadUserKey) -> Result<LoadedUserKey> {
        self.at.ask(self.deadline, msg).await
    }

    /// See [`StoreUserKey`].
    pub async fn store(&self, msg: StoreUserKey) -> Result<Written<()>> {
        self.at.ask(self.deadline, msg).await
    }

    /// See [`DeleteUserKey`].
    pub async fn delete(&self, msg: DeleteUserKey) -> Result<Written<bool>> {
        self.at.ask(self.deadline, msg).await
    }

    /// See [`ListUserKeys`].
    pub async fn list(&self, msg: ListUserKeys) -> Result<Vec<UserKeyInfo>> {
        self.at.ask(self.deadline, msg).await
    }

    /// See [`ReportUserKey`].
    pub async fn report(&self, msg: ReportUserKey) -> Result<Written<Option<bool>>> {
        self.at.ask(self.deadline, msg).await
    }
}
