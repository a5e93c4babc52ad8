//! `UserKeys`: the handle to wherever per-user keys live — the SQLite `Keystore`, or
//! the `RedisStore` with `keystore.user_keys = "redis"`. Both serve the same messages
//! (declared in `keystore`), so the cache and the ops never know which one it is.

use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use super::keystore::{
    DeleteUserKey, ListUserKeys, LoadUserKey, LoadedUserKey, ReportUserKey, StoreUserKey,
    UserKeyInfo,
};
use crate::error::Result;
use crate::model::idempotency::Written;

/// Where per-user keys are read and written.
#[derive(Clone)]
pub struct UserKeys {
    /// The keys live in Redis, shared by the fleet: a cached key may then be served
    /// past its TTL while Redis is down (flagged degraded).
    pub in_redis: bool,
    deadline: Duration,
    load: Recipient<LoadUserKey>,
    store: Recipient<StoreUserKey>,
    delete: Recipient<DeleteUserKey>,
    list: Recipient<ListUserKeys>,
    report: Recipient<ReportUserKey>,
}

impl UserKeys {
    /// A handle to `addr`, which serves every user-key message; each call waits at
    /// most `deadline` (`server.request_timeout_ms`).
    pub fn new<A>(in_redis: bool, deadline: Duration, addr: Addr<A>) -> Self
    where
        A: Actor
            + Handler<LoadUserKey>
            + Handler<StoreUserKey>
            + Handler<DeleteUserKey>
            + Handler<ListUserKeys>
            + Handler<ReportUserKey>,
        A::Context: ToEnvelope<A, LoadUserKey>
            + ToEnvelope<A, StoreUserKey>
            + ToEnvelope<A, DeleteUserKey>
            + ToEnvelope<A, ListUserKeys>
            + ToEnvelope<A, ReportUserKey>,
    {
        UserKeys {
            in_redis,
            deadline,
            load: addr.clone().recipient(),
            store: addr.clone().recipient(),
            delete: addr.clone().recipient(),
            list: addr.clone().recipient(),
            report: addr.recipient(),
        }
    }

    /// See [`LoadUserKey`].
    pub async fn load(&self, msg: LoadUserKey) -> Result<LoadedUserKey> {
        super::within(self.deadline, self.load.send(msg)).await
    }

    /// See [`StoreUserKey`].
    pub async fn store(&self, msg: StoreUserKey) -> Result<Written<()>> {
        super::within(self.deadline, self.store.send(msg)).await
    }

    /// See [`DeleteUserKey`].
    pub async fn delete(&self, msg: DeleteUserKey) -> Result<Written<bool>> {
        super::within(self.deadline, self.delete.send(msg)).await
    }

    /// See [`ListUserKeys`].
    pub async fn list(&self, msg: ListUserKeys) -> Result<Vec<UserKeyInfo>> {
        super::within(self.deadline, self.list.send(msg)).await
    }

    /// See [`ReportUserKey`].
    pub async fn report(&self, msg: ReportUserKey) -> Result<Written<Option<bool>>> {
        super::within(self.deadline, self.report.send(msg)).await
    }
}
