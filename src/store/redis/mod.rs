//! The Redis store: pools, quota counters and (with `keystore.user_keys = "redis"`)
//! sealed per-user keys in Redis, shared by every daemon on it. `RedisStore` owns the
//! one `ConnectionManager` (cloned into each command; replaced when Sentinel names a
//! new master) and serves the same messages as the embedded store and the keystore.
//! Here: the shared state and the scripted writes. The key layout is
//! `crate::store::keyspace`, the value format `crate::store::envelope`; reaching Redis
//! is `connection`, running a command on it `runner`, reading pools `pool_reads`;
//! the actor is `actor`, per-user keys `user_keys`, the counters `quota`; each
//! message's `Handler` stands beside the code that answers it. The
//! pub/sub listener that keeps the cache current is `store::invalidation`.

mod actor;
pub mod connection;
mod pool_reads;
mod quota;
mod runner;
mod user_keys;

pub use actor::{client, RedisStore};
pub use connection::*;
pub use quota::CONSUME_SCRIPT;
pub use runner::describe_error;
use runner::Retry;

pub use crate::store::envelope::*;
pub use crate::store::keyspace::{Changed, Names};

use std::cell::RefCell;
use std::collections::HashSet;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult};

use super::keystore::{LoadedUserKey, UserKeyInfo};
use super::messages::*;
use crate::error::{Error, RedisRefusal, Result};
use crate::keys::MasterKey;
use crate::model::clock;
use crate::model::figures::RedisStatus;
use crate::model::idempotency::{self, Idem, Written};
use crate::model::pool::*;
use crate::process::config::RedisConfig;
use crate::process::logfmt::{Repeated, Say};
use crate::store::messages::{
    DeleteUserKey, ListUserKeys, LoadUserKey, ReportUserKey, StoreUserKey,
};

/// How often the connection is checked (and re-established) in the background.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// A hash read whole: (field, value) pairs as bytes, so a field that is not UTF-8
/// (written by someone else) cannot fail the whole read.
type HashFields = Vec<(Vec<u8>, Vec<u8>)>;

/// The fields of pool hash `hash` whose names are text; any other is logged (its
/// name escaped) and left out: no pool key of ours has such a name.
fn text_fields(hash: &str, fields: HashFields) -> Vec<(String, Vec<u8>)> {
    fields
        .into_iter()
        .filter_map(|(field, value)| match String::from_utf8(field) {
            Ok(field) => Some((field, value)),
            Err(e) => {
                tracing::error!(hash = %hash, field = %String::from_utf8_lossy(e.as_bytes()),
                    "integrity: a pool field name is not UTF-8; skipping it");
                None
            }
        })
        .collect()
}

/// Label and time of a pool key, as JSON in the pool-info hash.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Info {
    label: Option<String>,
    added_at: Option<i64>,
}

/// Seconds since the epoch when today's pool counters may go.
fn pool_counts_expiry() -> i64 {
    clock::now_s() + clock::seconds_to_midnight() + (COUNTER_DAYS - 1) * 86_400
}

/// Writes a pool key's new health only if it still holds what the report was judged
/// on (compare and set; the caller retries on 0), counts the report, and announces
/// a change that picks must see. Answers {-1} when the pool has no such key.
/// With an idempotency record (KEYS[4], fingerprint ARGV[8], TTL ARGV[9], the
/// record counters ARGV[10..12] and the most records held ARGV[13]: see
/// `idempotency::REDIS_COUNT_LUA`) a live record answers {2, health recorded} (or
/// {3} for another request's record) and applies nothing; with the records full a
/// new one answers {4} and applies nothing; a written report records its new health.
const REPORT_BODY: &str = r"
local head = ''
local counter
if KEYS[4] then
  head = ARGV[8] .. '\n'
  local rec = redis.call('GET', KEYS[4])
  if rec then
    if string.sub(rec, 1, #head) ~= head then return {3, ''} end
    return {2, string.sub(rec, #head + 1)}
  end
  local held
  counter, held = records_open(ARGV[10], ARGV[11], ARGV[12], '1')
  if held >= tonumber(ARGV[13]) then
    records_close(counter, 0)
    return {4, ''}
  end
end
local function unrecorded(reply)
  if counter then records_close(counter, 0) end
  return reply
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return unrecorded({-1, ''}) end
local cur = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if cur ~= ARGV[2] then return unrecorded({0, ''}) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('EXPIREAT', KEYS[3], ARGV[5])
if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
if KEYS[4] then
  redis.call('SET', KEYS[4], head .. ARGV[3], 'EX', ARGV[9])
end
return {1, ''}
";

/// Runs the commands of an atomic pipeline in one script, after
/// [`RETIRED_GUARD`] (KEYS[1] the fleet's key check hash, ARGV[1] the key version of
/// the sealed value written, 0 when none is): a value sealed with a retired version
/// never lands. With an idempotency record (KEYS[2], fingerprint ARGV[2]; '' for
/// none), a live record with the same fingerprint answers {1, its answer} and runs
/// nothing; one with another fingerprint answers {-1, ''}; with ARGV[7] records
/// already held (counted by ARGV[4..6]: see `idempotency::REDIS_COUNT_LUA`) a new
/// one answers {-2, ''} and runs nothing; otherwise the commands run and their
/// replies (JSON) are recorded for ARGV[3] seconds: {0, replies}. ARGV[8..] holds
/// the commands, each as its word count and its words. (The commands name their
/// keys among their words, not in KEYS: the daemon runs on a standalone Redis or
/// under Sentinel, never on a cluster.)
const WRITE_BODY: &str = r"
local head = ARGV[2] .. '\n'
local counter
if ARGV[2] ~= '' then
  local rec = redis.call('GET', KEYS[2])
  if rec then
    if string.sub(rec, 1, #head) ~= head then return {-1, ''} end
    return {1, string.sub(rec, #head + 1)}
  end
  local held
  counter, held = records_open(ARGV[4], ARGV[5], ARGV[6], '1')
  if held >= tonumber(ARGV[7]) then
    records_close(counter, 0)
    return {-2, ''}
  end
end
local out = {}
local i = 8
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  out[#out + 1] = redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
local answer = cjson.encode(out)
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], head .. answer, 'EX', ARGV[3])
end
return {0, answer}
";

/// Reply `i` of a pipeline's commands as a number (0 when missing).
fn reply(replies: &[i64], i: usize) -> i64 {
    replies.get(i).copied().unwrap_or(0)
}

/// Reports that lose a compare-and-set race this often in a row give up.
const REPORT_TRIES: usize = 8;

/// A stored health value; anything unreadable counts as healthy (and is overwritten
/// by the next report).
fn parse_health(raw: Option<&str>) -> Health {
    raw.and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default()
}

struct Inner {
    /// Replaced (never mutated) when Sentinel names a new master.
    conn: SharedConn,
    target: Target,
    status: Arc<RedisStatus>,
    /// Replicas a key write waits for (`WAIT`), 0 for none.
    replicas: u32,
    master: Arc<MasterKey>,
    names: Names,
    timeout: Duration,
    /// `redis.accept_legacy_plaintext`, switched by reloads.
    accept_legacy: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    /// Whether Redis has answered once since start (`stats` says "not connected" before).
    answered: Arc<AtomicBool>,
    /// The connection's outage going on, if any, so that the log says it once.
    down: RefCell<Repeated>,
    /// Refusals going on, by cause, so that the log says each once and then counts.
    refusals: RefCell<std::collections::HashMap<(Retry, RedisRefusal), Repeated>>,
    /// Pool hashes already warned about (legacy values), so the log is not flooded.
    warned: RefCell<HashSet<String>>,
    /// Increments and consumes waiting for their batch.
    quota: quota::Batcher,
    report: redis::Script,
    /// Pipeline writes: behind [`RETIRED_GUARD`], once per idempotency key.
    write: redis::Script,
    /// The idempotency TTL whose record counters the health check reads for
    /// `stats` (0: none yet); the TTL of the last write with a key.
    records_ttl: std::cell::Cell<u64>,
    /// Set once `import-legacy`'s cut-over is seen in Redis (it stays set: a Redis
    /// writer who deletes the record does not make clear values legacy again).
    cut_over: AtomicBool,
    /// Where a value in clear after the cut-over is recorded as a security event.
    audit: Arc<crate::process::audit::Audit>,
}

impl Inner {
    /// Whether `import-legacy` recorded its cut-over (read from Redis until seen once).
    async fn after_cut_over(&self) -> bool {
        if self.cut_over.load(Ordering::Relaxed) {
            return true;
        }
        let key = self.names.legacy_cutover();
        let seen: bool = self
            .bounded("read the legacy cut-over", Retry::Read, |mut c| {
                let key = key.clone();
                async move { c.exists(key).await }
            })
            .await
            .unwrap_or(false);
        if seen {
            self.cut_over.store(true, Ordering::Relaxed);
        }
        seen
    }

    /// A value in clear was read at `place`. Answers whether it may be served as a
    /// legacy value: before the cut-over, when `redis.accept_legacy_plaintext` allows
    /// (logged once per hash); after it, never: someone who can write Redis put it
    /// there, so it is recorded as a possible injection (a security event in the
    /// audit log, once per hash) and treated as absent.
    async fn clear_value(&self, hash: &str, kind: &str, place: &[(&str, &str)]) -> bool {
        if self.after_cut_over().await {
            if self.warned.borrow_mut().insert(hash.to_string()) {
                tracing::error!(hash, "security: a {kind} stored in clear after import-legacy's cut-over; \
                    possible injection by someone who can write redis; not served (see the audit log)");
                self.audit.security("clear_value_after_cut_over", place);
            }
            return false;
        }
        if self.accept_legacy.load(Ordering::Relaxed) {
            self.warn_once(hash, "serving values stored in clear (redis.accept_legacy_plaintext); run apikeyd import-legacy to encrypt them");
            true
        } else {
            self.warn_once(hash, "skipping values stored in clear; run apikeyd import-legacy or set redis.accept_legacy_plaintext");
            false
        }
    }

    fn announce(&self, changed: &Changed) -> String {
        serde_json::to_string(changed).unwrap_or_default()
    }

    /// Runs the atomic `pipe` once per idempotency key (see [`WRITE_BODY`]); answers
    /// the replies of its commands, those of the first run when replayed. Without a
    /// key it is a plain `MULTI` pipeline.
    async fn write_once(
        &self,
        what: &str,
        pipe: &redis::Pipeline,
        idem: Option<&Idem>,
        sealed_version: u32,
    ) -> Result<Written<Vec<i64>>> {
        if idem.is_none() && sealed_version == 0 {
            return self
                .pipeline(what, Retry::Write, pipe)
                .await
                .map(Written::fresh);
        }
        if let Some(idem) = idem {
            self.records_ttl.set(idem.ttl_s.max(1));
        }
        let mut call = self.write.prepare_invoke();
        call.key(self.names.keycheck());
        match idem {
            Some(idem) => call
                .key(self.names.idempotency(idem.uid, &idem.key))
                .arg(sealed_version)
                .arg(&idem.fingerprint)
                .arg(idem.ttl_s.max(1))
                .arg(self.counters(idem))
                .arg(idem.max_records),
            // KEYS[2] is not read without a fingerprint.
            None => call
                .key(self.names.keycheck())
                .arg(sealed_version)
                .arg("")
                .arg(1)
                .arg(vec!["", "", "0"])
                .arg(0),
        };
        for cmd in pipe.cmd_iter() {
            let words: Vec<&[u8]> = cmd
                .args_iter()
                .filter_map(|a| match a {
                    redis::Arg::Simple(word) => Some(word),
                    // Cursors belong to SCAN-like commands, never in a write.
                    _ => None,
                })
                .collect();
            call.arg(words.len());
            for word in words {
                call.arg(word);
            }
        }
        let (status, answer): (i64, String) = self
            .bounded(what, Retry::Write, |mut c| {
                let call = &call;
                async move { call.invoke_async(&mut c).await }
            })
            .await?;
        match (status, idem) {
            (0, _) => {
                if idem.is_some() {
                    idempotency::FIGURES.noted_record();
                }
                idempotency::decode(&answer).map(Written::fresh)
            }
            (1, _) => idempotency::replay(&answer),
            (-2, Some(idem)) => Err(idempotency::full(idem.max_records)),
            (_, Some(idem)) => Err(idempotency::conflict(idem)),
            (_, None) => Err(Error::Internal(format!(
                "redis answered {what} with an unknown status"
            ))),
        }
    }

    /// The words of `REDIS_COUNT_LUA`'s counters for `idem`'s record, now.
    fn counters(&self, idem: &Idem) -> Vec<String> {
        let c = idempotency::Counters::at(
            &self.names.idempotency_count(idem.ttl_s),
            idem.ttl_s,
            clock::now_s(),
        );
        vec![c.current, c.previous, c.expire_at.to_string()]
    }

    /// The live record of `idem`, read before a write that first reads what it will
    /// change: a replay, a conflict, or `None` (not used yet).
    async fn recorded<T: serde::de::DeserializeOwned>(
        &self,
        idem: &Idem,
    ) -> Result<Option<Written<T>>> {
        let name = self.names.idempotency(idem.uid, &idem.key);
        let record: Option<String> = self
            .bounded("read idempotency record", Retry::Read, |mut c| {
                let name = name.clone();
                async move { c.get(name).await }
            })
            .await?;
        let Some(record) = record else {
            return Ok(None);
        };
        match record.split_once('\n') {
            Some((print, answer)) if print == idem.fingerprint => {
                idempotency::replay(answer).map(Some)
            }
            _ => Err(idempotency::conflict(idem)),
        }
    }

    async fn add_pool_key(&self, msg: AddPoolKey) -> Result<Written<(String, bool)>> {
        let key_id = self.master.key_id(&msg.key);
        let value = envelope(&self.master, &self.names.prefix, &msg.pool, &msg.key);
        let info = serde_json::to_string(&Info {
            label: msg.label,
            added_at: Some(clock::now_s()),
        })
        .unwrap_or_default();
        let version = envelope_version(value.as_bytes());
        let pipe = redis::pipe()
            .atomic()
            .hset_nx(self.names.pool(&msg.pool), &key_id, value)
            .hset_nx(self.names.pool_info(&msg.pool), &key_id, info)
            .publish(
                self.names.invalidate(),
                self.announce(&Changed::Pool(msg.pool)),
            )
            .to_owned();
        let replies = self
            .write_once("add pool key", &pipe, msg.idem.as_ref(), version)
            .await?;
        self.confirm("add pool key").await?;
        Ok(replies.map(|r| (key_id, reply(&r, 0) == 1)))
    }

    async fn remove_pool_key(&self, msg: RemovePoolKey) -> Result<Written<bool>> {
        let pipe = redis::pipe()
            .atomic()
            .hdel(self.names.pool(&msg.pool), &msg.key_id)
            .hdel(self.names.pool_info(&msg.pool), &msg.key_id)
            .hdel(self.names.pool_health(&msg.pool), &msg.key_id)
            .publish(
                self.names.invalidate(),
                self.announce(&Changed::Pool(msg.pool)),
            )
            .to_owned();
        let replies = self
            .write_once("remove pool key", &pipe, msg.idem.as_ref(), 0)
            .await?;
        self.confirm("remove pool key").await?;
        Ok(replies.map(|r| reply(&r, 0) > 0))
    }

    async fn report_pool_key(&self, msg: ReportPoolKey) -> Result<Written<Option<Health>>> {
        let health_hash = self.names.pool_health(&msg.pool);
        let keys = [
            self.names.pool(&msg.pool),
            health_hash.clone(),
            self.names.pool_counts(&clock::utc_day(), &msg.pool),
        ];
        let counter = format!("{}:{}", msg.key_id, msg.outcome.counter());
        let expiry = pool_counts_expiry();
        let channel = self.names.invalidate();
        let changed = self.announce(&Changed::Pool(msg.pool.clone()));
        for _ in 0..REPORT_TRIES {
            let stored: Option<String> = self
                .bounded("HGET", Retry::Read, |mut c| {
                    let (hash, field) = (health_hash.clone(), msg.key_id.clone());
                    async move { c.hget(hash, field).await }
                })
                .await?;
            let before = parse_health(stored.as_deref());
            let mut after = before;
            after.apply(msg.outcome, clock::now_s(), msg.retry_after_s, msg.rules);
            let value = serde_json::to_string(&after).unwrap_or_default();
            let announce = if before.same_for_picks(&after) {
                ""
            } else {
                changed.as_str()
            };
            let (written, recorded): (i64, String) = self
                .bounded("report key result", Retry::Write, |mut c| {
                    let mut call = self.report.prepare_invoke();
                    call.key(&keys[0]).key(&keys[1]).key(&keys[2]);
                    call.arg(&msg.key_id)
                        .arg(stored.as_deref().unwrap_or(""))
                        .arg(&value)
                        .arg(&counter)
                        .arg(expiry)
                        .arg(&channel)
                        .arg(announce);
                    if let Some(idem) = &msg.idem {
                        call.key(self.names.idempotency(idem.uid, &idem.key))
                            .arg(&idem.fingerprint)
                            .arg(idem.ttl_s.max(1))
                            .arg(self.counters(idem))
                            .arg(idem.max_records);
                    }
                    async move { call.invoke_async(&mut c).await }
                })
                .await?;
            match (written, &msg.idem) {
                (-1, _) => return Ok(Written::fresh(None)),
                (1, idem) => {
                    if idem.is_some() {
                        idempotency::FIGURES.noted_record();
                    }
                    // Only a change of health is a key write worth a replica's
                    // confirmation; an `ok` report only counts.
                    if !announce.is_empty() {
                        self.confirm("report key result").await?;
                    }
                    return Ok(Written::fresh(Some(after)));
                }
                (2, _) => return idempotency::replay(&recorded),
                (3, Some(idem)) => return Err(idempotency::conflict(idem)),
                (4, Some(idem)) => return Err(idempotency::full(idem.max_records)),
                _ => continue,
            }
        }
        Err(Error::Unavailable(
            "this key's health is changing too fast to record the report; retry shortly".into(),
        ))
    }

    /// Clears a pool key's health (a key the pool does not have has none) and
    /// announces it; answers whether the pool has the key.
    async fn enable_pool_key(&self, msg: EnablePoolKey) -> Result<Written<bool>> {
        let pipe = redis::pipe()
            .atomic()
            .hexists(self.names.pool(&msg.pool), &msg.key_id)
            .hdel(self.names.pool_health(&msg.pool), &msg.key_id)
            .publish(
                self.names.invalidate(),
                self.announce(&Changed::Pool(msg.pool.clone())),
            )
            .to_owned();
        let replies = self
            .write_once("enable pool key", &pipe, msg.idem.as_ref(), 0)
            .await?;
        self.confirm("enable pool key").await?;
        Ok(replies.map(|r| reply(&r, 0) == 1))
    }

    /// Adds the picks counted since the last flush, in one pipeline.
    async fn count_picks(&self, msg: CountPicks) -> Result<()> {
        let day = clock::utc_day();
        let expiry = pool_counts_expiry();
        let mut pipe = redis::pipe();
        for (pool, key_id, n) in &msg.picks {
            let hash = self.names.pool_counts(&day, pool);
            pipe.hincr(&hash, format!("{key_id}:picks"), *n)
                .ignore()
                .expire_at(&hash, expiry)
                .ignore();
        }
        self.pipeline::<()>("count picks", Retry::Write, &pipe)
            .await
    }
}

// The writes above, as messages sent through `store::handle::Store`.

impl Handler<AddPoolKey> for RedisStore {
    type Result = ResponseFuture<Result<Written<(String, bool)>>>;

    fn handle(&mut self, msg: AddPoolKey, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.add_pool_key(msg).await })
    }
}

impl Handler<RemovePoolKey> for RedisStore {
    type Result = ResponseFuture<Result<Written<bool>>>;

    fn handle(&mut self, msg: RemovePoolKey, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.remove_pool_key(msg).await })
    }
}

impl Handler<ReportPoolKey> for RedisStore {
    type Result = ResponseFuture<Result<Written<Option<Health>>>>;

    fn handle(&mut self, msg: ReportPoolKey, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.report_pool_key(msg).await })
    }
}

impl Handler<EnablePoolKey> for RedisStore {
    type Result = ResponseFuture<Result<Written<bool>>>;

    fn handle(&mut self, msg: EnablePoolKey, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.enable_pool_key(msg).await })
    }
}

impl Handler<CountPicks> for RedisStore {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, msg: CountPicks, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.count_picks(msg).await })
    }
}
