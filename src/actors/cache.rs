//! The `KeyCache` actor: decrypted user keys and pools in memory, bounded, with a TTL,
//! zeroed when evicted. A hit answers without touching SQLite or Redis.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use lru::LruCache;
use rand::seq::SliceRandom;

use super::keystore::{Keystore, LoadUserKey};
use super::store::{PoolRef, Store};
use crate::config::CacheConfig;
use crate::crypto::Secret;
use crate::error::Result;

struct Entry<T> {
    value: T,
    expires: Instant,
}

/// Owns the decrypted keys. Misses are loaded from the keystore or the store; a load
/// that raced with an invalidation is answered but not cached, so a write is never
/// shadowed by an older read.
pub struct KeyCache {
    keystore: Addr<Keystore>,
    store: Store,
    /// (user_id, service) → the key, or `None` for "this user has none".
    users: LruCache<(String, String), Entry<Option<Arc<Secret>>>>,
    pools: LruCache<PoolRef, Entry<Arc<Vec<Arc<Secret>>>>>,
    user_ttl: Duration,
    pool_ttl: Duration,
    /// How long the keystore may take to answer (`server.request_timeout_ms`).
    deadline: Duration,
    /// Bumped by every invalidation.
    generation: u64,
    hits: u64,
    misses: u64,
}

fn capacity(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN)
}

impl KeyCache {
    /// An empty cache in front of `keystore` and `store`.
    pub fn new(
        keystore: Addr<Keystore>,
        store: Store,
        deadline: Duration,
        config: &CacheConfig,
    ) -> Self {
        KeyCache {
            keystore,
            store,
            users: LruCache::new(capacity(config.max_entries)),
            pools: LruCache::new(capacity(config.max_entries)),
            user_ttl: Duration::from_secs(config.user_key_ttl_s),
            pool_ttl: Duration::from_secs(config.pool_ttl_s),
            deadline,
            generation: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// Makes room so that users and pools together stay within `max_entries`.
    fn fits(&mut self) {
        while self.users.len() + self.pools.len() >= self.users.cap().get() {
            let evicted = if self.pools.len() > self.users.len() {
                self.pools.pop_lru().is_some()
            } else {
                self.users.pop_lru().is_some()
            };
            if !evicted {
                break;
            }
        }
    }
}

impl Actor for KeyCache {
    type Context = Context<Self>;
}

/// A user's own key for a service, from the cache or the keystore.
#[derive(Message)]
#[rtype(result = "Result<Option<Arc<Secret>>>")]
pub struct LookupUserKey {
    pub user_id: String,
    pub service: String,
}

impl Handler<LookupUserKey> for KeyCache {
    type Result = ResponseActFuture<Self, Result<Option<Arc<Secret>>>>;

    fn handle(&mut self, msg: LookupUserKey, _: &mut Self::Context) -> Self::Result {
        let slot = (msg.user_id, msg.service);
        let now = Instant::now();
        match self.users.get(&slot) {
            Some(e) if e.expires > now => {
                self.hits += 1;
                return Box::pin(fut::ready(Ok(e.value.clone())));
            }
            Some(_) => {
                self.users.pop(&slot);
            }
            None => {}
        }
        self.misses += 1;
        let generation = self.generation;
        let load = self.keystore.send(LoadUserKey {
            user_id: slot.0.clone(),
            service: slot.1.clone(),
        });
        let deadline = self.deadline;
        Box::pin(
            async move { super::within(deadline, load).await }
                .into_actor(self)
                .map(move |loaded, cache, _| {
                    let value = loaded?.map(Arc::new);
                    if cache.generation == generation && !cache.user_ttl.is_zero() {
                        cache.fits();
                        cache.users.put(
                            slot,
                            Entry {
                                value: value.clone(),
                                expires: Instant::now() + cache.user_ttl,
                            },
                        );
                    }
                    Ok(value)
                }),
        )
    }
}

/// One key of a pool picked uniformly at random, from the cache or the store.
#[derive(Message)]
#[rtype(result = "Result<Option<Arc<Secret>>>")]
pub struct PickPoolKey {
    pub pool: PoolRef,
}

fn pick(keys: &[Arc<Secret>]) -> Option<Arc<Secret>> {
    keys.choose(&mut rand::thread_rng()).cloned()
}

impl Handler<PickPoolKey> for KeyCache {
    type Result = ResponseActFuture<Self, Result<Option<Arc<Secret>>>>;

    fn handle(&mut self, msg: PickPoolKey, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        match self.pools.get(&msg.pool) {
            Some(e) if e.expires > now => {
                self.hits += 1;
                return Box::pin(fut::ready(Ok(pick(&e.value))));
            }
            Some(_) => {
                self.pools.pop(&msg.pool);
            }
            None => {}
        }
        self.misses += 1;
        let generation = self.generation;
        let store = self.store.clone();
        let pool = msg.pool;
        let wanted = pool.clone();
        Box::pin(
            async move { store.load_pool(wanted).await }
                .into_actor(self)
                .map(move |loaded, cache, _| {
                    let keys: Arc<Vec<Arc<Secret>>> =
                        Arc::new(loaded?.into_iter().map(Arc::new).collect());
                    let picked = pick(&keys);
                    if cache.generation == generation && !cache.pool_ttl.is_zero() {
                        cache.fits();
                        cache.pools.put(
                            pool,
                            Entry {
                                value: keys,
                                expires: Instant::now() + cache.pool_ttl,
                            },
                        );
                    }
                    Ok(picked)
                }),
        )
    }
}

/// Drops a user's cached key (after a set or delete).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetUserKey {
    pub user_id: String,
    pub service: String,
}

impl Handler<ForgetUserKey> for KeyCache {
    type Result = ();

    fn handle(&mut self, msg: ForgetUserKey, _: &mut Self::Context) {
        self.generation += 1;
        self.users.pop(&(msg.user_id, msg.service));
    }
}

/// Drops a cached pool (after an add or remove, here or on another daemon).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetPool {
    pub pool: PoolRef,
}

impl Handler<ForgetPool> for KeyCache {
    type Result = ();

    fn handle(&mut self, msg: ForgetPool, _: &mut Self::Context) {
        self.generation += 1;
        self.pools.pop(&msg.pool);
    }
}

/// Drops every cached pool (after a pub/sub reconnect, when announcements may have
/// been missed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetAllPools;

impl Handler<ForgetAllPools> for KeyCache {
    type Result = ();

    fn handle(&mut self, _: ForgetAllPools, _: &mut Self::Context) {
        self.generation += 1;
        self.pools.clear();
    }
}

/// Applies reloaded `[cache]` settings; shrinking evicts the least recently used.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Configure {
    pub cache: CacheConfig,
}

impl Handler<Configure> for KeyCache {
    type Result = ();

    fn handle(&mut self, msg: Configure, _: &mut Self::Context) {
        self.generation += 1;
        self.user_ttl = Duration::from_secs(msg.cache.user_key_ttl_s);
        self.pool_ttl = Duration::from_secs(msg.cache.pool_ttl_s);
        self.users.resize(capacity(msg.cache.max_entries));
        self.pools.resize(capacity(msg.cache.max_entries));
        self.fits();
    }
}

/// The cache's counters, for `stats`.
#[derive(serde::Serialize)]
pub struct CacheFigures {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
}

/// Reads the counters.
#[derive(Message)]
#[rtype(result = "CacheFigures")]
pub struct ReadCacheFigures;

impl Handler<ReadCacheFigures> for KeyCache {
    type Result = MessageResult<ReadCacheFigures>;

    fn handle(&mut self, _: ReadCacheFigures, _: &mut Self::Context) -> Self::Result {
        MessageResult(CacheFigures {
            hits: self.hits,
            misses: self.misses,
            entries: self.users.len() + self.pools.len(),
        })
    }
}
