//! The store: the messages for pools and quota counters, and `Store`, the handle the
//! ops and the cache talk to. Embedded (SQLite) and Redis stores serve the same
//! messages, so nothing above this file knows which one is behind it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::crypto::Secret;
use crate::error::Result;

/// One pool: a channel's (`channel: Some`) or the global one, for one service.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PoolRef {
    pub channel: Option<String>,
    pub service: String,
}

/// Every key of a pool, decrypted; values that do not open are left out and logged.
#[derive(Message)]
#[rtype(result = "Result<Vec<Secret>>")]
pub struct LoadPool {
    pub pool: PoolRef,
}

/// Adds a key to a pool. Answers its `key_id` and whether it was new.
#[derive(Message)]
#[rtype(result = "Result<(String, bool)>")]
pub struct AddPoolKey {
    pub pool: PoolRef,
    pub key: Secret,
    pub label: Option<String>,
}

/// Removes a key from a pool by id; answers whether it was there.
#[derive(Message)]
#[rtype(result = "Result<bool>")]
pub struct RemovePoolKey {
    pub pool: PoolRef,
    pub key_id: String,
}

/// One row of `list_pool_keys`.
#[derive(serde::Serialize)]
pub struct PoolKeyInfo {
    pub key_id: String,
    pub masked: String,
    pub label: Option<String>,
    pub added_at: Option<String>,
}

/// Lists a pool's keys, masked.
#[derive(Message)]
#[rtype(result = "Result<Vec<PoolKeyInfo>>")]
pub struct ListPoolKeys {
    pub pool: PoolRef,
}

/// Today's count for a (user, tool).
#[derive(Message)]
#[rtype(result = "Result<u64>")]
pub struct ReadUsage {
    pub user_id: String,
    pub tool_name: String,
}

/// Adds one to today's count; answers the count after it.
#[derive(Message)]
#[rtype(result = "Result<u64>")]
pub struct IncrementUsage {
    pub user_id: String,
    pub tool_name: String,
}

/// Atomically: if today's count is below `limit`, add one. Answers whether it was
/// allowed and the count after the call.
#[derive(Message)]
#[rtype(result = "Result<(bool, u64)>")]
pub struct ConsumeUsage {
    pub user_id: String,
    pub tool_name: String,
    pub limit: u64,
}

/// Which kind of store is behind the handle.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    Embedded,
    Redis,
}

/// The handle to whichever store actor serves pools and quotas.
#[derive(Clone)]
pub struct Store {
    pub mode: StoreMode,
    /// Redis mode: whether the connection is up right now.
    connected: Option<Arc<AtomicBool>>,
    /// How long a store may take to answer (`server.request_timeout_ms`).
    deadline: Duration,
    load_pool: Recipient<LoadPool>,
    add_pool_key: Recipient<AddPoolKey>,
    remove_pool_key: Recipient<RemovePoolKey>,
    list_pool_keys: Recipient<ListPoolKeys>,
    read_usage: Recipient<ReadUsage>,
    increment_usage: Recipient<IncrementUsage>,
    consume_usage: Recipient<ConsumeUsage>,
}

async fn ask<M, T>(deadline: Duration, to: &Recipient<M>, msg: M) -> Result<T>
where
    M: Message<Result = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    super::within(deadline, to.send(msg)).await
}

impl Store {
    /// A handle to `addr`, which serves every store message.
    pub fn new<A>(
        mode: StoreMode,
        connected: Option<Arc<AtomicBool>>,
        deadline: Duration,
        addr: Addr<A>,
    ) -> Self
    where
        A: Actor
            + Handler<LoadPool>
            + Handler<AddPoolKey>
            + Handler<RemovePoolKey>
            + Handler<ListPoolKeys>
            + Handler<ReadUsage>
            + Handler<IncrementUsage>
            + Handler<ConsumeUsage>,
        A::Context: ToEnvelope<A, LoadPool>
            + ToEnvelope<A, AddPoolKey>
            + ToEnvelope<A, RemovePoolKey>
            + ToEnvelope<A, ListPoolKeys>
            + ToEnvelope<A, ReadUsage>
            + ToEnvelope<A, IncrementUsage>
            + ToEnvelope<A, ConsumeUsage>,
    {
        Store {
            mode,
            connected,
            deadline,
            load_pool: addr.clone().recipient(),
            add_pool_key: addr.clone().recipient(),
            remove_pool_key: addr.clone().recipient(),
            list_pool_keys: addr.clone().recipient(),
            read_usage: addr.clone().recipient(),
            increment_usage: addr.clone().recipient(),
            consume_usage: addr.recipient(),
        }
    }

    /// `None` in embedded mode; in Redis mode whether Redis answers.
    pub fn redis_connected(&self) -> Option<bool> {
        self.connected.as_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// See [`LoadPool`].
    pub async fn load_pool(&self, pool: PoolRef) -> Result<Vec<Secret>> {
        ask(self.deadline, &self.load_pool, LoadPool { pool }).await
    }

    /// See [`AddPoolKey`].
    pub async fn add_pool_key(&self, msg: AddPoolKey) -> Result<(String, bool)> {
        ask(self.deadline, &self.add_pool_key, msg).await
    }

    /// See [`RemovePoolKey`].
    pub async fn remove_pool_key(&self, msg: RemovePoolKey) -> Result<bool> {
        ask(self.deadline, &self.remove_pool_key, msg).await
    }

    /// See [`ListPoolKeys`].
    pub async fn list_pool_keys(&self, pool: PoolRef) -> Result<Vec<PoolKeyInfo>> {
        ask(self.deadline, &self.list_pool_keys, ListPoolKeys { pool }).await
    }

    /// See [`ReadUsage`].
    pub async fn read_usage(&self, msg: ReadUsage) -> Result<u64> {
        ask(self.deadline, &self.read_usage, msg).await
    }

    /// See [`IncrementUsage`].
    pub async fn increment_usage(&self, msg: IncrementUsage) -> Result<u64> {
        ask(self.deadline, &self.increment_usage, msg).await
    }

    /// See [`ConsumeUsage`].
    pub async fn consume_usage(&self, msg: ConsumeUsage) -> Result<(bool, u64)> {
        ask(self.deadline, &self.consume_usage, msg).await
    }
}
