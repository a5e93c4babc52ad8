//! The `KeyCache` actor: decrypted user keys and pools in memory, bounded, with a TTL,
//! zeroed when evicted. A hit answers without touching SQLite or Redis.
//!
//! The actor lives on the same arbiter thread as the connections it serves. Its
//! state is a `Contents` that it shares with them through a `CacheReader`, so a hit is a
//! plain lookup on that thread rather than a mailbox round trip (the actor sits where
//! the data is used). Everything that fills or empties the contents — loads on a miss,
//! invalidations, reconfiguration — goes through the actor's messages.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use lru::LruCache;
use rand::seq::SliceRandom;
use rand::Rng;

use super::handle::{Store, UserKeys};
use crate::error::Result;
use crate::keys::Secret;
use crate::model::clock;
use crate::model::figures::CacheFigures;
use crate::model::pool::{PoolEntry, PoolRef};
pub use crate::model::user_key::UserKey;
use crate::process::config::CacheConfig;
use crate::store::messages::{CountPicks, LoadUserKey};

/// How often picks counted in memory are added to the store's daily counters.
const FLUSH_PICKS_EVERY: Duration = Duration::from_secs(1);

struct Entry<T> {
    value: T,
    expires: Instant,
}

/// One key of a cached pool, with what a pick needs to skip it without a store call.
struct Pooled {
    key: Arc<Secret>,
    key_id: Arc<str>,
    cooling_until: i64,
    disabled: bool,
    /// Picks not yet added to the store's counters (shared with `Contents::counters`).
    picks: Rc<Cell<u64>>,
}

impl Pooled {
    fn usable(&self, now: i64) -> bool {
        !self.disabled && self.cooling_until <= now
    }

    fn hand_out(&self) -> Pick {
        self.picks.set(self.picks.get() + 1);
        Pick::Key {
            key: self.key.clone(),
            key_id: self.key_id.clone(),
        }
    }
}

/// A pool's keys as cached.
struct CachedPool {
    keys: Vec<Pooled>,
    /// The latest end of any cooldown (0: no key ever cooled) and whether any key is
    /// disabled: a pool of healthy keys picks without reading the clock.
    latest_cooling: i64,
    any_disabled: bool,
}

/// The outcome of a pick.
pub enum Pick {
    /// A key, with its id for `report_key_result`.
    Key { key: Arc<Secret>, key_id: Arc<str> },
    /// No usable key, and none comes back by itself.
    Empty,
    /// Every key that is not disabled is cooling down; the first is back in this many
    /// whole seconds.
    Cooling { retry_after_s: u64 },
}

impl CachedPool {
    /// Uniform over the usable keys. Allocates nothing: a pool with cooling keys is
    /// walked twice instead of filtered into a new list.
    fn pick(&self) -> Pick {
        let mut rng = rand::thread_rng();
        let healthy = |keys: &[Pooled], rng: &mut rand::rngs::ThreadRng| {
            keys.choose(rng).map_or(Pick::Empty, Pooled::hand_out)
        };
        if !self.any_disabled && self.latest_cooling == 0 {
            return healthy(&self.keys, &mut rng);
        }
        let now = clock::now_s();
        if !self.any_disabled && self.latest_cooling <= now {
            return healthy(&self.keys, &mut rng);
        }
        let usable = self.keys.iter().filter(|k| k.usable(now)).count();
        if usable == 0 {
            return match self
                .keys
                .iter()
                .filter(|k| !k.disabled)
                .map(|k| k.cooling_until)
                .min()
            {
                Some(back) if back > now => Pick::Cooling {
                    retry_after_s: (back - now) as u64,
                },
                _ => Pick::Empty,
            };
        }
        let n = rng.gen_range(0..usable);
        self.keys
            .iter()
            .filter(|k| k.usable(now))
            .nth(n)
            .map_or(Pick::Empty, Pooled::hand_out)
    }
}

/// The cached keys. There is one: the actor and every connection run on the same
/// thread, which is what lets connections read it without a message.
struct Contents {
    /// (user_id, service) → the key, or `None` for "this user has none".
    users: LruCache<(String, String), Entry<UserKey>>,
    pools: LruCache<PoolRef, Entry<CachedPool>>,
    /// Picks per pool key since the last flush; outlives the cached pools, so a pool
    /// dropped by an invalidation loses no counts.
    counters: HashMap<(PoolRef, Arc<str>), Rc<Cell<u64>>>,
    user_ttl: Duration,
    pool_ttl: Duration,
    /// Bumped by every invalidation.
    generation: u64,
    /// Keep user entries past their TTL (user keys in Redis), so that they can still
    /// be served, flagged degraded, while Redis is down. They stay bounded by the LRU
    /// and are dropped by invalidations like any other.
    keep_stale_users: bool,
    hits: u64,
    misses: u64,
}

fn capacity(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN)
}
/// An empty LRU of at most `n` entries whose table grows as they come (`LruCache::new`
/// allocates it for all `n` at once: 4 MB of an idle daemon for the default).
fn lru<K: std::hash::Hash + Eq, V>(n: usize) -> LruCache<K, V> {
    let mut cache = LruCache::unbounded();
    cache.resize(capacity(n));
    cache
}

impl Contents {
    /// Builds the cached form of a loaded pool, each key tied to its pick counter.
    fn cached(&mut self, pool: &PoolRef, loaded: Vec<PoolEntry>) -> CachedPool {
        let mut latest_cooling = 0;
        let mut any_disabled = false;
        let keys = loaded
            .into_iter()
            .map(|e| {
                let key_id: Arc<str> = Arc::from(e.key_id);
                latest_cooling = latest_cooling.max(e.health.cooling_until);
                any_disabled |= e.health.disabled;
                Pooled {
                    picks: self
                        .counters
                        .entry((pool.clone(), key_id.clone()))
                        .or_default()
                        .clone(),
                    key: Arc::new(e.key),
                    key_id,
                    cooling_until: e.health.cooling_until,
                    disabled: e.health.disabled,
                }
            })
            .collect();
        CachedPool {
            keys,
            latest_cooling,
            any_disabled,
        }
    }

    /// Takes the picks counted since the last call, and forgets counters that no
    /// cached pool uses any more.
    fn take_picks(&mut self) -> Vec<(PoolRef, String, u64)> {
        let mut out = Vec::new();
        self.counters.retain(|(pool, key_id), n| {
            let picks = n.take();
            if picks > 0 {
                out.push((pool.clone(), key_id.to_string(), picks));
            }
            picks > 0 || Rc::strong_count(n) > 1
        });
        out
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

    /// `Some(answer)` on a live hit; an expired entry is dropped (and zeroed).
    fn user(&mut self, slot: &(String, String)) -> Option<UserKey> {
        let now = Instant::now();
        match self.users.get(slot) {
            Some(e) if e.expires > now => {
                self.hits += 1;
                Some(e.value.clone())
            }
            Some(_) if self.keep_stale_users => None,
            Some(_) => {
                self.users.pop(slot);
                None
            }
            None => None,
        }
    }

    /// An entry past its TTL, for when the store cannot be asked (see
    /// `keep_stale_users`).
    fn stale_user(&mut self, slot: &(String, String)) -> Option<UserKey> {
        if !self.keep_stale_users {
            return None;
        }
        self.users.peek(slot).map(|e| UserKey {
            stale: true,
            ..e.value.clone()
        })
    }

    /// `Some(pick)` on a live hit.
    fn pool(&mut self, pool: &PoolRef) -> Option<Pick> {
        let now = Instant::now();
        match self.pools.get(pool) {
            Some(e) if e.expires > now => {
                self.hits += 1;
                Some(e.value.pick())
            }
            Some(_) => {
                self.pools.pop(pool);
                None
            }
            None => None,
        }
    }
}

/// How connections on the actor's thread read the cache: a hit is a plain lookup in
/// the actor's contents (no message, no timer); a miss asks the actor, which loads the
/// key from its store. Not `Send`: it only exists on the actor's own thread.
#[derive(Clone)]
pub struct CacheReader {
    contents: Rc<RefCell<Contents>>,
    actor: Addr<KeyCache>,
}

impl CacheReader {
    /// A user's own key: from the contents on a hit (with `key: None` = cached "has
    /// none"), else through [`LookupUserKey`]. The strings move into the lookup and
    /// back, so a hit allocates nothing.
    pub async fn user_key(&self, user_id: &mut String, service: &mut String) -> Result<UserKey> {
        let slot = (std::mem::take(user_id), std::mem::take(service));
        let hit = self.contents.borrow_mut().user(&slot);
        (*user_id, *service) = slot;
        match hit {
            Some(key) => Ok(key),
            None => {
                let msg = LookupUserKey {
                    user_id: user_id.clone(),
                    service: service.clone(),
                };
                self.actor.send(msg).await?
            }
        }
    }

    /// A uniformly picked usable key of `pool`: from the contents on a hit, else through
    /// [`PickPoolKey`]. Borrows `pool`, so a hit copies nothing.
    pub async fn pool_key(&self, pool: &PoolRef) -> Result<Pick> {
        let hit = self.contents.borrow_mut().pool(pool);
        match hit {
            Some(pick) => Ok(pick),
            None => {
                let pool = pool.clone();
                self.actor.send(PickPoolKey { pool }).await?
            }
        }
    }
}

/// Owns the decrypted keys. Misses are loaded through `UserKeys` (per-user keys) and
/// `Store` (pools), the handles in `store::handle`; a load
/// that raced with an invalidation is answered but not cached, so a write is never
/// shadowed by an older read.
pub struct KeyCache {
    user_keys: UserKeys,
    store: Store,
    contents: Rc<RefCell<Contents>>,
}

impl KeyCache {
    /// An empty cache in front of `user_keys` and `store`.
    pub fn new(user_keys: UserKeys, store: Store, config: &CacheConfig) -> Self {
        KeyCache {
            contents: Rc::new(RefCell::new(Contents {
                keep_stale_users: user_keys.in_redis,
                users: lru(config.max_entries),
                pools: lru(config.max_entries),
                user_ttl: Duration::from_secs(config.user_key_ttl_s),
                pool_ttl: Duration::from_secs(config.pool_ttl_s),
                counters: HashMap::new(),
                generation: 0,
                hits: 0,
                misses: 0,
            })),
            user_keys,
            store,
        }
    }

    /// Starts the cache on this thread: its address, and the read handle for the
    /// connections served here.
    pub fn start_here(self) -> (Addr<KeyCache>, CacheReader) {
        let contents = self.contents.clone();
        let actor = self.start();
        let reader = CacheReader {
            contents,
            actor: actor.clone(),
        };
        (actor, reader)
    }
}

impl Actor for KeyCache {
    type Context = Context<Self>;

    /// Counts picks in memory and adds them to the store once a second, in one batch:
    /// never a store write per pick. A failed flush drops its counts (they are
    /// statistics; docs/operations.md gives their precision).
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(FLUSH_PICKS_EVERY, |cache, ctx| {
            let picks = cache.contents.borrow_mut().take_picks();
            if picks.is_empty() {
                return;
            }
            let store = cache.store.clone();
            ctx.spawn(
                async move {
                    if let Err(e) = store.count_picks(CountPicks { picks }).await {
                        tracing::debug!(error = %e, "pool pick counts not recorded");
                    }
                }
                .into_actor(cache),
            );
        });
    }
}

/// A user's own key for a service, from the cache or else through `UserKeys` (the
/// keystore, or Redis when user keys live there).
#[derive(Message)]
#[rtype(result = "Result<UserKey>")]
pub struct LookupUserKey {
    pub user_id: String,
    pub service: String,
}

impl Handler<LookupUserKey> for KeyCache {
    type Result = ResponseActFuture<Self, Result<UserKey>>;

    fn handle(&mut self, msg: LookupUserKey, _: &mut Self::Context) -> Self::Result {
        let slot = (msg.user_id, msg.service);
        let generation = {
            let mut contents = self.contents.borrow_mut();
            if let Some(hit) = contents.user(&slot) {
                return Box::pin(fut::ready(Ok(hit)));
            }
            contents.misses += 1;
            contents.generation
        };
        let user_keys = self.user_keys.clone();
        let load = LoadUserKey {
            user_id: slot.0.clone(),
            service: slot.1.clone(),
        };
        Box::pin(
            async move { user_keys.load(load).await }
                .into_actor(self)
                .map(move |loaded, cache, _| {
                    let mut contents = cache.contents.borrow_mut();
                    let loaded = match loaded {
                        Ok(l) => l,
                        // Whatever failed, the copy this daemon has seen is served
                        // (flagged degraded) rather than none.
                        Err(e) => return contents.stale_user(&slot).ok_or(e),
                    };
                    let value = UserKey {
                        key: loaded.key.map(Arc::new),
                        rejected: loaded.rejected,
                        stale: false,
                    };
                    if contents.generation == generation && !contents.user_ttl.is_zero() {
                        contents.fits();
                        let expires = Instant::now() + contents.user_ttl;
                        contents.users.put(
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

/// One usable key of a pool picked uniformly at random, from the cache or the store.
#[derive(Message)]
#[rtype(result = "Result<Pick>")]
pub struct PickPoolKey {
    pub pool: PoolRef,
}

impl Handler<PickPoolKey> for KeyCache {
    type Result = ResponseActFuture<Self, Result<Pick>>;

    fn handle(&mut self, msg: PickPoolKey, _: &mut Self::Context) -> Self::Result {
        let generation = {
            let mut contents = self.contents.borrow_mut();
            if let Some(hit) = contents.pool(&msg.pool) {
                return Box::pin(fut::ready(Ok(hit)));
            }
            contents.misses += 1;
            contents.generation
        };
        let store = self.store.clone();
        let pool = msg.pool;
        let wanted = pool.clone();
        Box::pin(
            async move { store.load_pool(wanted).await }
                .into_actor(self)
                .map(move |loaded, cache, _| {
                    let loaded = loaded?;
                    let mut contents = cache.contents.borrow_mut();
                    let keys = contents.cached(&pool, loaded);
                    let picked = keys.pick();
                    if contents.generation == generation && !contents.pool_ttl.is_zero() {
                        contents.fits();
                        let expires = Instant::now() + contents.pool_ttl;
                        contents.pools.put(
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
        let mut contents = self.contents.borrow_mut();
        contents.generation += 1;
        contents.users.pop(&(msg.user_id, msg.service));
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
        let mut contents = self.contents.borrow_mut();
        contents.generation += 1;
        contents.pools.pop(&msg.pool);
    }
}

/// Expires every cached user key (after a pub/sub reconnect with user keys in Redis,
/// when announcements may have been missed): each is loaded again before it is
/// served as fresh, but while Redis cannot be asked it is still served, flagged
/// degraded (a reconnect often comes with a Redis restart, when loads fail for a
/// moment). Without `keep_stale_users` they are dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetAllUserKeys;

impl Handler<ForgetAllUserKeys> for KeyCache {
    type Result = ();

    fn handle(&mut self, _: ForgetAllUserKeys, _: &mut Self::Context) {
        let mut contents = self.contents.borrow_mut();
        contents.generation += 1;
        if !contents.keep_stale_users {
            contents.users.clear();
            return;
        }
        let now = Instant::now();
        for (_, entry) in contents.users.iter_mut() {
            entry.expires = entry.expires.min(now);
        }
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
        let mut contents = self.contents.borrow_mut();
        contents.generation += 1;
        contents.pools.clear();
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
        let mut contents = self.contents.borrow_mut();
        contents.generation += 1;
        contents.user_ttl = Duration::from_secs(msg.cache.user_key_ttl_s);
        contents.pool_ttl = Duration::from_secs(msg.cache.pool_ttl_s);
        contents.users.resize(capacity(msg.cache.max_entries));
        contents.pools.resize(capacity(msg.cache.max_entries));
        contents.fits();
    }
}

/// Reads the counters.
#[derive(Message)]
#[rtype(result = "CacheFigures")]
pub struct ReadCacheFigures;

impl Handler<ReadCacheFigures> for KeyCache {
    type Result = MessageResult<ReadCacheFigures>;

    fn handle(&mut self, _: ReadCacheFigures, _: &mut Self::Context) -> Self::Result {
        let contents = self.contents.borrow();
        MessageResult(CacheFigures {
            hits: contents.hits,
            misses: contents.misses,
            entries: contents.users.len() + contents.pools.len(),
        })
    }
}
