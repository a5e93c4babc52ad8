//! The `KeyCache` actor: decrypted user keys and pools in memory, bounded, with a TTL,
//! zeroed when evicted. A hit answers without touching SQLite or Redis.
//!
//! The actor lives on the same arbiter thread as the connections it serves. Its
//! state is a `Shard` that it shares with them through a `CacheReader`, so a hit is a
//! plain lookup on that thread rather than a mailbox round trip (the actor sits where
//! the data is used). Everything that fills or empties the shard — loads on a miss,
//! invalidations, reconfiguration — goes through the actor's messages.

use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::rc::Rc;
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

/// The cached keys of one arbiter thread.
struct Shard {
    /// (user_id, service) → the key, or `None` for "this user has none".
    users: LruCache<(String, String), Entry<Option<Arc<Secret>>>>,
    pools: LruCache<PoolRef, Entry<Arc<Vec<Arc<Secret>>>>>,
    user_ttl: Duration,
    pool_ttl: Duration,
    /// Bumped by every invalidation.
    generation: u64,
    hits: u64,
    misses: u64,
}

fn capacity(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN)
}

fn pick(keys: &[Arc<Secret>]) -> Option<Arc<Secret>> {
    keys.choose(&mut rand::thread_rng()).cloned()
}

impl Shard {
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

    /// `Some(answer)` on a live hit; an expired entry is dropped (and zeroed).
    fn user(&mut self, slot: &(String, String)) -> Option<Option<Arc<Secret>>> {
        let now = Instant::now();
        match self.users.get(slot) {
            Some(e) if e.expires > now => {
                self.hits += 1;
                Some(e.value.clone())
            }
            Some(_) => {
                self.users.pop(slot);
                None
            }
            None => None,
        }
    }

    /// `Some(pick)` on a live hit.
    fn pool(&mut self, pool: &PoolRef) -> Option<Option<Arc<Secret>>> {
        let now = Instant::now();
        match self.pools.get(pool) {
            Some(e) if e.expires > now => {
                self.hits += 1;
                Some(pick(&e.value))
            }
            Some(_) => {
                self.pools.pop(pool);
                None
            }
            None => None,
        }
    }
}

/// Same-thread read access to the actor's shard, for cache hits without a message.
/// Not `Send`: it only exists on the actor's own thread.
#[derive(Clone)]
pub struct CacheReader {
    shard: Rc<RefCell<Shard>>,
}

impl CacheReader {
    /// A user's key on a hit (`Some(None)` = cached "has none"); `None` on a miss.
    pub fn user_key(
        &self,
        user_id: String,
        service: String,
    ) -> (Option<Option<Arc<Secret>>>, String, String) {
        let slot = (user_id, service);
        let hit = self.shard.borrow_mut().user(&slot);
        (hit, slot.0, slot.1)
    }

    /// A pick from a cached pool on a hit; `None` on a miss.
    pub fn pool_key(&self, pool: &PoolRef) -> Option<Option<Arc<Secret>>> {
        self.shard.borrow_mut().pool(pool)
    }
}

/// Owns the decrypted keys. Misses are loaded from the keystore or the store; a load
/// that raced with an invalidation is answered but not cached, so a write is never
/// shadowed by an older read.
pub struct KeyCache {
    keystore: Addr<Keystore>,
    store: Store,
    shard: Rc<RefCell<Shard>>,
    /// How long the keystore may take to answer (`server.request_timeout_ms`).
    deadline: Duration,
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
            shard: Rc::new(RefCell::new(Shard {
                users: LruCache::new(capacity(config.max_entries)),
                pools: LruCache::new(capacity(config.max_entries)),
                user_ttl: Duration::from_secs(config.user_key_ttl_s),
                pool_ttl: Duration::from_secs(config.pool_ttl_s),
                generation: 0,
                hits: 0,
                misses: 0,
            })),
            deadline,
        }
    }

    /// The read handle for connections served on this actor's thread.
    pub fn reader(&self) -> CacheReader {
        CacheReader {
            shard: self.shard.clone(),
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
        let generation = {
            let mut shard = self.shard.borrow_mut();
            if let Some(hit) = shard.user(&slot) {
                return Box::pin(fut::ready(Ok(hit)));
            }
            shard.misses += 1;
            shard.generation
        };
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
                    let mut shard = cache.shard.borrow_mut();
                    if shard.generation == generation && !shard.user_ttl.is_zero() {
                        shard.fits();
                        let expires = Instant::now() + shard.user_ttl;
                        shard.users.put(
                            slot,
                            Entry {
                                value: value.clone(),
                                expires,
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

impl Handler<PickPoolKey> for KeyCache {
    type Result = ResponseActFuture<Self, Result<Option<Arc<Secret>>>>;

    fn handle(&mut self, msg: PickPoolKey, _: &mut Self::Context) -> Self::Result {
        let generation = {
            let mut shard = self.shard.borrow_mut();
            if let Some(hit) = shard.pool(&msg.pool) {
                return Box::pin(fut::ready(Ok(hit)));
            }
            shard.misses += 1;
            shard.generation
        };
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
                    let mut shard = cache.shard.borrow_mut();
                    if shard.generation == generation && !shard.pool_ttl.is_zero() {
                        shard.fits();
                        let expires = Instant::now() + shard.pool_ttl;
                        shard.pools.put(
                            pool,
                            Entry {
                                value: keys,
                                expires,
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
        let mut shard = self.shard.borrow_mut();
        shard.generation += 1;
        shard.users.pop(&(msg.user_id, msg.service));
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
        let mut shard = self.shard.borrow_mut();
        shard.generation += 1;
        shard.pools.pop(&msg.pool);
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
        let mut shard = self.shard.borrow_mut();
        shard.generation += 1;
        shard.pools.clear();
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
        let mut shard = self.shard.borrow_mut();
        shard.generation += 1;
        shard.user_ttl = Duration::from_secs(msg.cache.user_key_ttl_s);
        shard.pool_ttl = Duration::from_secs(msg.cache.pool_ttl_s);
        shard.users.resize(capacity(msg.cache.max_entries));
        shard.pools.resize(capacity(msg.cache.max_entries));
        shard.fits();
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
        let shard = self.shard.borrow();
        MessageResult(CacheFigures {
            hits: shard.hits,
            misses: shard.misses,
            entries: shard.users.len() + shard.pools.len(),
        })
    }
}
