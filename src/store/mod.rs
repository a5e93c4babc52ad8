//! The stores: the actors that own the daemon's state — the keystore (per-user keys
//! in SQLite), the pool and quota store (embedded SQLite or Redis) and the cache of
//! decrypted keys — with the handles the ops reach them by, and the Redis key layout
//! (`keyspace`) and sealed-value format (`envelope`).

use std::future::Future;
use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::prelude::*;

use crate::error::{Error, Result};

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
/// applied.
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

pub mod cache;
pub mod embedded;
pub mod envelope;
pub mod handle;
pub mod invalidation;
pub mod keyspace;
pub mod keystore;
pub mod messages;
pub mod redis;
pub mod user_keys;
