//! `UserKeys`: the handle to wherever per-user keys live — the SQLite `Keystore`, or
//! the `RedisStore` with `keystore.user_keys = "redis"`. Both answer the same
//! messages (`store::messages`), so the cache and the ops never know which one it is;
//! every call goes through `Backend::ask`, which applies the request deadline.

use std::time::Duration;

use super::keystore::Keystore;
use super::redis::RedisStore;
use super::Backend;
use crate::error::Result;
use crate::model::idempotency::Written;
use crate::model::user_key::{LoadedUserKey, UserKeyInfo};
use crate::store::messages::{
    DeleteUserKey, ListUserKeys, LoadUserKey, ReportUserKey, StoreUserKey,
};

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
