//! The invalidation listener (Redis mode): a pub/sub subscription that drops changed
//! pools and user keys from this daemon's cache, resubscribing (and dropping
//! everything cached) after any gap. Beside the cache and the Redis store rather
//! than inside either, so that neither imports the other.

use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use redis::RedisResult;

use super::keyspace::{Changed, Names};
use super::redis::connection::Target;
use crate::store::cache::{ForgetAllPools, ForgetAllUserKeys, ForgetPool, ForgetUserKey, KeyCache};

/// Keeps a subscription to the invalidation channel, forever: every announced
/// change drops the matching cache entry. After each (re)subscription every cached
/// pool (and, with `user_keys` in Redis, every cached user key) is dropped, since
/// announcements may have been missed meanwhile. With Sentinel each subscription
/// goes to the master the sentinels name at that moment.
pub async fn listen(target: Target, names: Names, cache: Addr<KeyCache>, user_keys: bool) {
    let channel = names.invalidate();
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let client = target.client_async().await.map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::Io, "no client", e.to_string()))
            })?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            RedisResult::Ok(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
            Ok(Ok(mut pubsub)) => {
                backoff = Duration::from_millis(100);
                cache.do_send(ForgetAllPools);
                if user_keys {
                    cache.do_send(ForgetAllUserKeys);
                }
                tracing::info!(channel = %channel, "subscribed to pool invalidations");
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
                    match serde_json::from_slice::<Changed>(&payload) {
                        Ok(Changed::Pool(pool)) => cache.do_send(ForgetPool { pool }),
                        Ok(Changed::UserKey { user_id, service }) => {
                            cache.do_send(ForgetUserKey { user_id, service })
                        }
                        Err(_) => tracing::warn!("ignoring a malformed invalidation message"),
                    }
                }
                tracing::warn!("pool invalidation subscription lost; resubscribing");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to pool invalidations yet"),
            Err(_) => tracing::debug!("subscribing to pool invalidations timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
