//! The Redis store: pools, quota counters and (with `keystore.user_keys = "redis"`)
//! sealed per-user keys in Redis, shared by every daemon on it. `RedisStore` owns the
//! one `ConnectionManager` (cloned into each command; replaced when Sentinel names a
//! new master) and serves the same messages as the embedded store and the keystore.
//! The key layout is `crate::keyspace`, the value format `crate::envelope`; reaching
//! Redis is `connection`, the pub/sub listener `listen`.

pub mod connection;
mod listen;
mod quota;

pub use connection::*;
pub use listen::listen;
pub use quota::CONSUME_SCRIPT;

pub use crate::envelope::*;
pub use crate::keyspace::{Changed, Names};

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

use super::keystore::{
    DeleteUserKey, ListUserKeys, LoadUserKey, LoadedUserKey, ReportUserKey, StoreUserKey,
    UserKeyInfo,
};
use super::store::*;
use crate::clock;
use crate::config::RedisConfig;
use crate::crypto::MasterKey;
use crate::error::{Error, RedisRefusal, Result};
use crate::idempotency::{self, Idem, Written};
use crate::logfmt::{Repeated, Say};

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
    refusals: RefCell<std::collections::HashMap<(Kind, RedisRefusal), Repeated>>,
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
    audit: Arc<crate::audit::Audit>,
}

/// A Redis error in words for the log and `check-config`: a refused connection is
/// said to be refused, not timed out, and no error kind names leak through.
pub fn describe_error(e: &redis::RedisError) -> String {
    if e.is_connection_refusal() {
        "connection refused (is redis-server running at redis.url?)".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed {
        "authentication failed (check the password in redis.url)".into()
    } else {
        match RedisRefusal::of(e) {
            RedisRefusal::Other => e.to_string(),
            refusal => format!("redis refused: {}", refusal.cause()),
        }
    }
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Whether a command may be sent again after `e`, decided by the error's kind.
/// Reads always may (a connection error other than a timeout). A write may only
/// when the error proves it never reached Redis: the connection was refused (or its
/// socket file is missing). A dropped connection does not prove that (the reset may
/// come after Redis ran the write), so such a write is answered `unavailable` and
/// the client decides.
fn may_retry(e: &redis::RedisError, kind: Kind) -> bool {
    match kind {
        Kind::Read => is_connection_error(e) && !e.is_timeout(),
        Kind::Write => e.is_connection_refusal(),
    }
}

/// Whether running a command twice is harmless.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Read,
    Write,
}

impl Inner {
    /// Runs one Redis command (or pipeline) made by `attempt` within
    /// `redis.timeout_ms`, sending it a second time when [`may_retry`] allows. While
    /// the connection is known to be down, fails at once; the health check revives it.
    async fn bounded<T, F, Fut>(&self, what: &str, kind: Kind, attempt: F) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.connected.load(Ordering::Relaxed) {
            return Err(Error::Unavailable(
                "redis is unreachable; retry shortly".into(),
            ));
        }
        self.bounded_always(what, kind, attempt).await
    }

    async fn bounded_always<T, F, Fut>(&self, what: &str, kind: Kind, attempt: F) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.bounded_for(self.timeout, what, kind, attempt).await
    }

    async fn bounded_for<T, F, Fut>(
        &self,
        limit: Duration,
        what: &str,
        kind: Kind,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        let mut tries = 0;
        let outcome = loop {
            tries += 1;
            let conn = self.conn.borrow().clone();
            match tokio::time::timeout_at(deadline, attempt(conn)).await {
                Ok(Err(e)) if tries == 1 && may_retry(&e, kind) => {
                    tracing::debug!(what, error = %e, "redis command failed on a stale connection; retrying once");
                }
                other => break other,
            }
        };
        match outcome {
            Ok(Ok(v)) => {
                self.answered.store(true, Ordering::Relaxed);
                self.mark_up();
                self.refusals_end(kind);
                Ok(v)
            }
            Ok(Err(e)) if is_connection_error(&e) => {
                self.mark_down(what, &describe_error(&e));
                Err(Error::Unavailable(
                    "redis is unreachable; retry shortly".into(),
                ))
            }
            Ok(Err(e)) if e.code() == Some(RETIRED_CODE) => {
                tracing::error!(
                    what,
                    "a write sealed with a key version the fleet retired was refused; \
                    this daemon switches version or stops at its next fleet heartbeat"
                );
                Err(Error::Unavailable(
                    "this daemon sealed the key with a master key version the fleet retired; \
                     nothing was stored; retry shortly"
                        .into(),
                ))
            }
            Ok(Err(e)) => {
                // Redis answered, so it is reachable; what it refused is said once
                // per cause and then summed up (it may refuse every request).
                self.answered.store(true, Ordering::Relaxed);
                self.mark_up();
                let refusal = RedisRefusal::of(&e);
                self.refused(what, kind, refusal, &e);
                Err(refusal.error(what))
            }
            Err(_) => {
                self.mark_down(what, "timed out");
                Err(Error::Unavailable(format!(
                    "redis did not answer within {} ms; retry shortly",
                    limit.as_millis()
                )))
            }
        }
    }

    /// Logs a refusal: the first of its cause at once, then a count at most once a
    /// minute (server-side errors carry no request data).
    fn refused(&self, what: &str, kind: Kind, refusal: RedisRefusal, e: &redis::RedisError) {
        self.status.count_refusal(refusal);
        let command = match kind {
            Kind::Read => "a read",
            Kind::Write => "a write",
        };
        let said = self
            .refusals
            .borrow_mut()
            .entry((kind, refusal))
            .or_default()
            .hit(std::time::Instant::now());
        match said {
            Say::First => tracing::error!(what, error = %e,
                "redis refused {command}: {}", refusal.cause()),
            Say::Again { times, total } => tracing::error!(
                what,
                times,
                total,
                "redis still refuses: {}; {times} more refusals in the last minute",
                refusal.cause()
            ),
            Say::Nothing => {}
        }
    }

    /// Redis ran a command of `kind`: the refusals of such commands have ended (a
    /// read that succeeds says nothing of writes refused for lack of memory).
    fn refusals_end(&self, kind: Kind) {
        let mut refusals = self.refusals.borrow_mut();
        if refusals.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        for ((k, refusal), streak) in refusals.iter_mut() {
            if *k != kind {
                continue;
            }
            if let Some((total, lasted)) = streak.end(now) {
                tracing::info!(
                    refusals = total,
                    seconds = lasted.as_secs(),
                    "redis accepts commands again after {total} refusals: {}",
                    refusal.cause()
                );
            }
        }
        refusals.retain(|_, streak| streak.holds());
    }

    /// Redis answered: the connection is up (said when it was down, with how many
    /// attempts failed meanwhile).
    fn mark_up(&self) {
        let was_up = self.connected.swap(true, Ordering::Relaxed);
        let ended = self.down.borrow_mut().end(std::time::Instant::now());
        match ended {
            Some((failed, lasted)) => tracing::info!(
                failed,
                seconds = lasted.as_secs(),
                "redis connection is up again after {failed} failed attempts"
            ),
            None if !was_up => tracing::info!("redis connection is up"),
            None => {}
        }
    }

    /// A command could not reach Redis: said when the connection goes down, then
    /// counted (the health check tries every second) and summed up once a minute.
    fn mark_down(&self, what: &str, why: &str) {
        self.connected.store(false, Ordering::Relaxed);
        let said = self.down.borrow_mut().hit(std::time::Instant::now());
        match said {
            Say::First => tracing::warn!(what, why, "redis connection is down"),
            Say::Again { times, total } => tracing::warn!(
                what,
                why,
                times,
                total,
                "redis connection is still down; {times} failed attempts in the last minute"
            ),
            Say::Nothing => {}
        }
    }

    fn warn_once(&self, hash: &str, message: &'static str) {
        if self.warned.borrow_mut().insert(hash.to_string()) {
            tracing::warn!(hash, "{message}");
        }
    }

    /// Whether `import-legacy` recorded its cut-over (read from Redis until seen once).
    async fn after_cut_over(&self) -> bool {
        if self.cut_over.load(Ordering::Relaxed) {
            return true;
        }
        let key = self.names.legacy_cutover();
        let seen: bool = self
            .bounded("read the legacy cut-over", Kind::Read, |mut c| {
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

    async fn load_pool(&self, pool: PoolRef) -> Result<Vec<PoolEntry>> {
        let hash = self.names.pool(&pool);
        let pipe = redis::pipe()
            .hgetall(&hash)
            .hgetall(self.names.pool_health(&pool))
            .to_owned();
        let (fields, health): (HashFields, std::collections::HashMap<String, String>) =
            self.pipeline("load pool", Kind::Read, &pipe).await?;
        let mut keys = Vec::with_capacity(fields.len());
        for (field, value) in text_fields(&hash, fields) {
            let entry = |key| PoolEntry {
                health: parse_health(health.get(&field).map(String::as_str)),
                key_id: field.clone(),
                key,
            };
            match open_value(&self.master, &self.names.prefix, &pool, &field, &value) {
                PoolValue::Sealed(k) => keys.push(entry(k)),
                PoolValue::Legacy(k) => {
                    if self
                        .clear_value(&hash, "pool value", &[("hash", &hash), ("field", &field)])
                        .await
                    {
                        keys.push(entry(k));
                    }
                }
                PoolValue::Broken => tracing::error!(hash = %hash, field = %field,
                    "integrity: a pool value does not decrypt with this master key; skipping it"),
            }
        }
        Ok(keys)
    }

    fn announce(&self, changed: &Changed) -> String {
        serde_json::to_string(changed).unwrap_or_default()
    }

    /// Runs `pipe` (built once, sent at most twice) and decodes its replies.
    async fn pipeline<T: redis::FromRedisValue>(
        &self,
        what: &str,
        kind: Kind,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        self.bounded(
            what,
            kind,
            |mut c| async move { pipe.query_async(&mut c).await },
        )
        .await
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
                .pipeline(what, Kind::Write, pipe)
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
            .bounded(what, Kind::Write, |mut c| {
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
            .bounded("read idempotency record", Kind::Read, |mut c| {
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

    async fn list_pool_keys(&self, pool: PoolRef) -> Result<Vec<PoolKeyInfo>> {
        let hash = self.names.pool(&pool);
        let pipe = redis::pipe()
            .hgetall(&hash)
            .hgetall(self.names.pool_info(&pool))
            .hgetall(self.names.pool_health(&pool))
            .hgetall(self.names.pool_counts(&clock::utc_day(), &pool))
            .to_owned();
        type Listed = (
            HashFields,
            Vec<(String, String)>,
            std::collections::HashMap<String, String>,
            Vec<(String, u64)>,
        );
        let (fields, infos, health, counts): Listed =
            self.pipeline("list pool keys", Kind::Read, &pipe).await?;
        let mut today: std::collections::HashMap<String, Counters> = Default::default();
        for (field, n) in counts {
            if let Some((key_id, counter)) = field.rsplit_once(':') {
                today.entry(key_id.to_string()).or_default().set(counter, n);
            }
        }
        let now = clock::now_s();
        let infos: std::collections::HashMap<String, Info> = infos
            .into_iter()
            .map(|(k, v)| (k, serde_json::from_str(&v).unwrap_or_default()))
            .collect();
        let mut out: Vec<PoolKeyInfo> = text_fields(&hash, fields)
            .into_iter()
            .map(|(key_id, value)| {
                let masked = match open_value(&self.master, &self.names.prefix, &pool, &key_id, &value) {
                    PoolValue::Sealed(k) => k.masked(),
                    PoolValue::Legacy(k) => format!("{} (stored in clear)", k.masked()),
                    PoolValue::Broken => {
                        tracing::error!(hash = %hash, field = %key_id, "integrity: a pool value does not decrypt");
                        "(undecryptable)".into()
                    }
                };
                let info = infos.get(&key_id);
                let h = parse_health(health.get(&key_id).map(String::as_str));
                PoolKeyInfo {
                    state: h.state(now),
                    cooling_until: h.cooling_until(now),
                    today: today.get(&key_id).copied().unwrap_or_default(),
                    masked,
                    label: info.and_then(|i| i.label.clone()),
                    added_at: info.and_then(|i| i.added_at).map(clock::rfc3339),
                    key_id,
                }
            })
            .collect();
        out.sort_by(|a, b| a.added_at.cmp(&b.added_at).then(a.key_id.cmp(&b.key_id)));
        Ok(out)
    }

    /// Every pool hash under the prefix (SCAN), then each pool's key ids and health
    /// in one pipeline; only the counts leave.
    async fn count_pool_keys(&self, _: CountPoolKeys) -> Result<Vec<PoolKeyCount>> {
        let patterns = [
            format!("{}:global_api_pool:*", self.names.prefix),
            format!("{}:channel_api_pool:*", self.names.prefix),
        ];
        let mut hashes: Vec<String> = Vec::new();
        for pattern in &patterns {
            let found: Vec<String> = self
                .bounded("scan pools", Kind::Read, |mut c| async move {
                    let mut found = Vec::new();
                    let mut iter = c.scan_match::<_, String>(pattern).await?;
                    while let Some(name) = iter.next_item().await {
                        found.push(name?);
                    }
                    Ok(found)
                })
                .await?;
            hashes.extend(found);
        }
        hashes.sort();
        hashes.dedup();
        let pools: Vec<PoolRef> = hashes
            .iter()
            .filter_map(|h| crate::keyspace::pool_of(&self.names, h))
            .collect();
        if pools.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for pool in &pools {
            pipe.hkeys(self.names.pool(pool))
                .hgetall(self.names.pool_health(pool));
        }
        let replies: Vec<redis::Value> =
            self.pipeline("count pool keys", Kind::Read, &pipe).await?;
        let now = clock::now_s();
        let mut out = Vec::with_capacity(pools.len());
        for (pool, pair) in pools.into_iter().zip(replies.chunks_exact(2)) {
            // A key of another type under the pattern answers an error: not a pool.
            let (Ok(ids), Ok(health)) = (
                redis::from_redis_value_ref::<Vec<String>>(&pair[0]),
                redis::from_redis_value_ref::<std::collections::HashMap<String, String>>(&pair[1]),
            ) else {
                continue;
            };
            let mut count = PoolKeyCount::new(pool);
            for id in &ids {
                count.add(parse_health(health.get(id).map(String::as_str)).state(now));
            }
            out.push(count);
        }
        Ok(out)
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
                .bounded("HGET", Kind::Read, |mut c| {
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
                .bounded("report key result", Kind::Write, |mut c| {
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
        self.pipeline::<()>("count picks", Kind::Write, &pipe).await
    }

    async fn ping(&self) {
        if self.target.uses_sentinels() {
            self.follow_master().await;
        }
        let _ = self
            .bounded_always("PING", Kind::Read, |mut c| async move {
                redis::cmd("PING").query_async::<String>(&mut c).await
            })
            .await;
        self.look_at_records().await;
    }

    /// Reads the fleet's idempotency record counters (see
    /// `idempotency::REDIS_COUNT_LUA`) into `stats`.
    async fn look_at_records(&self) {
        let ttl = self.records_ttl.get();
        if ttl == 0 || !self.connected.load(Ordering::Relaxed) {
            return;
        }
        let c = idempotency::Counters::at(&self.names.idempotency_count(ttl), ttl, clock::now_s());
        let names = [c.current, c.previous];
        let counts: Result<Vec<Option<u64>>> = self
            .bounded("MGET idempotency record counters", Kind::Read, |mut c| {
                let names = &names;
                async move { c.mget(names).await }
            })
            .await;
        if let Ok(counts) = counts {
            let held = counts.into_iter().flatten().sum();
            idempotency::FIGURES.records.store(held, Ordering::Relaxed);
        }
    }

    /// With Sentinel: asks the sentinels which server is the master and, when it is
    /// not the one this store talks to, moves the connection there (logged, and
    /// counted in `stats`). A failover thus heals within a health-check period of
    /// the sentinels' promotion.
    async fn follow_master(&self) {
        let (master, reachable) = self.target.ask_every_sentinel().await;
        self.status
            .sentinels_reachable
            .store(reachable as u64, Ordering::Relaxed);
        let (host, port) = match master {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "cannot ask the sentinels for the master now");
                return;
            }
        };
        let address = format!("{host}:{port}");
        let current = self.status.master();
        if current.as_deref() == Some(address.as_str()) {
            return;
        }
        let manager = self
            .target
            .client_at(&host, port)
            .and_then(|c| manager(c, self.timeout));
        match manager {
            Ok(m) => {
                *self.conn.borrow_mut() = m;
                self.status.set_master(&address);
                if let Some(old) = current {
                    let n = self.status.failovers.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(from = %old, to = %address, failovers = n,
                        "redis master changed (Sentinel failover); now talking to the new master");
                } else {
                    tracing::info!(master = %address, "redis master (from Sentinel)");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up a connection to the new redis master")
            }
        }
    }

    /// After a key write: when `redis.min_replicas_acked` asks for it, waits until that
    /// many replicas confirm the writes of this connection (`WAIT`), so a failover
    /// cannot lose an acknowledged key. Fewer confirmations answer `unavailable`.
    async fn confirm(&self, what: &str) -> Result<()> {
        if self.replicas == 0 {
            return Ok(());
        }
        // Redis answers WAIT when its own timeout runs out; that must come well
        // before the connection's response timeout (`redis.timeout_ms`), or a missing
        // replica would look like a dead master.
        let wait_ms = (self.timeout.as_millis() as u64 / 2).max(1);
        let replicas = self.replicas;
        let acked: u32 = self
            .bounded_for(self.timeout, what, Kind::Read, |mut c| async move {
                redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(wait_ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if acked < replicas {
            tracing::warn!(
                what,
                acked,
                wanted = replicas,
                "a key write was not confirmed by enough replicas"
            );
            return Err(Error::Unavailable(format!(
                "the write reached the redis master but only {acked} of {replicas} replicas confirmed it \
                 (redis.min_replicas_acked); retry shortly"
            )));
        }
        Ok(())
    }

    async fn load_user_key(&self, msg: LoadUserKey) -> Result<LoadedUserKey> {
        let hash = self.names.legacy_user(&msg.user_id);
        let pipe = redis::pipe()
            .hget(&hash, &msg.service)
            .hexists(self.names.user_rejected(&msg.user_id), &msg.service)
            .to_owned();
        let (value, rejected): (Option<Vec<u8>>, bool) =
            self.pipeline("load user key", Kind::Read, &pipe).await?;
        let absent = |rejected| LoadedUserKey {
            key: None,
            rejected,
        };
        let Some(value) = value else {
            return Ok(absent(false));
        };
        if rejected {
            return Ok(absent(true));
        }
        let opened = open_user_value(
            &self.master,
            &self.names.prefix,
            &msg.user_id,
            &msg.service,
            &value,
        );
        let key = match opened {
            PoolValue::Sealed(k) => Some(k),
            PoolValue::Legacy(k) => {
                let place = [
                    ("user_id", msg.user_id.as_str()),
                    ("service", msg.service.as_str()),
                ];
                self.clear_value(&hash, "user key", &place)
                    .await
                    .then_some(k)
            }
            PoolValue::Broken => {
                tracing::error!(user_id = %msg.user_id, service = %msg.service,
                    "integrity: a user key in redis does not decrypt with this master key; treating it as absent");
                None
            }
        };
        Ok(LoadedUserKey {
            key,
            rejected: false,
        })
    }

    fn user_changed(&self, user_id: &str, service: &str) -> String {
        self.announce(&Changed::UserKey {
            user_id: user_id.to_string(),
            service: service.to_string(),
        })
    }

    async fn store_user_key(&self, msg: StoreUserKey) -> Result<Written<()>> {
        let value = user_envelope(
            &self.master,
            &self.names.prefix,
            &msg.user_id,
            &msg.service,
            &msg.key,
        );
        let version = envelope_version(value.as_bytes());
        let pipe = redis::pipe()
            .atomic()
            .hset(self.names.legacy_user(&msg.user_id), &msg.service, value)
            .hset(
                self.names.user_info(&msg.user_id),
                &msg.service,
                clock::now_s(),
            )
            // A new key is not the one the provider rejected.
            .hdel(self.names.user_rejected(&msg.user_id), &msg.service)
            // Only the storing uid (or an admin) may report it unauthorized.
            .hset(self.names.user_owner(&msg.user_id), &msg.service, msg.owner)
            .publish(
                self.names.invalidate(),
                self.user_changed(&msg.user_id, &msg.service),
            )
            .to_owned();
        let replies = self
            .write_once("set user key", &pipe, msg.idem.as_ref(), version)
            .await?;
        self.confirm("set user key").await?;
        Ok(replies.map(|_| ()))
    }

    async fn delete_user_key(&self, msg: DeleteUserKey) -> Result<Written<bool>> {
        let pipe = redis::pipe()
            .atomic()
            .hdel(self.names.legacy_user(&msg.user_id), &msg.service)
            .hdel(self.names.user_info(&msg.user_id), &msg.service)
            .hdel(self.names.user_rejected(&msg.user_id), &msg.service)
            .hdel(self.names.user_owner(&msg.user_id), &msg.service)
            .publish(
                self.names.invalidate(),
                self.user_changed(&msg.user_id, &msg.service),
            )
            .to_owned();
        let replies = self
            .write_once("delete user key", &pipe, msg.idem.as_ref(), 0)
            .await?;
        self.confirm("delete user key").await?;
        Ok(replies.map(|r| reply(&r, 0) > 0))
    }

    async fn list_user_keys(&self, msg: ListUserKeys) -> Result<Vec<UserKeyInfo>> {
        let pipe = redis::pipe()
            .hgetall(self.names.legacy_user(&msg.user_id))
            .hgetall(self.names.user_info(&msg.user_id))
            .to_owned();
        let (fields, times): (HashFields, std::collections::HashMap<String, i64>) =
            self.pipeline("list user keys", Kind::Read, &pipe).await?;
        let hash = self.names.legacy_user(&msg.user_id);
        let mut out = Vec::with_capacity(fields.len());
        for (service, value) in text_fields(&hash, fields) {
            let masked = match open_user_value(
                &self.master,
                &self.names.prefix,
                &msg.user_id,
                &service,
                &value,
            ) {
                PoolValue::Sealed(k) => k.masked(),
                PoolValue::Legacy(k) => format!("{} (stored in clear)", k.masked()),
                PoolValue::Broken => {
                    tracing::error!(user_id = %msg.user_id, service = %service,
                        "integrity: a user key in redis does not decrypt; leaving it out of the list");
                    continue;
                }
            };
            out.push(UserKeyInfo {
                updated_at: clock::rfc3339(times.get(&service).copied().unwrap_or(0)),
                masked,
                service,
            });
        }
        out.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(out)
    }

    /// A report on a user's own key. Reads first, then writes only to mark the key
    /// rejected; with an idempotency key the record is looked at before the read
    /// and written with the mark.
    async fn report_user_key(&self, msg: ReportUserKey) -> Result<Written<Option<bool>>> {
        if let Some(idem) = &msg.idem {
            if let Some(replayed) = self.recorded::<Vec<i64>>(idem).await? {
                // Only a report that marked the key is recorded.
                return Ok(replayed.map(|_| Some(true)));
            }
        }
        let pipe = redis::pipe()
            .hexists(self.names.legacy_user(&msg.user_id), &msg.service)
            .hexists(self.names.user_rejected(&msg.user_id), &msg.service)
            .hget(self.names.user_owner(&msg.user_id), &msg.service)
            .to_owned();
        let (present, rejected, owner): (bool, bool, Option<u32>) = self
            .pipeline("read user key mark", Kind::Read, &pipe)
            .await?;
        if !present {
            return Ok(Written::fresh(None));
        }
        if rejected || !msg.unauthorized {
            // Nothing to write, so nothing to record.
            return Ok(Written::fresh(Some(rejected)));
        }
        if let Some(reporter) = msg.reporter.filter(|r| owner != Some(*r)) {
            return Err(super::keystore::not_the_owner(reporter));
        }
        let pipe = redis::pipe()
            .atomic()
            .hset(
                self.names.user_rejected(&msg.user_id),
                &msg.service,
                clock::now_s(),
            )
            .publish(
                self.names.invalidate(),
                self.user_changed(&msg.user_id, &msg.service),
            )
            .to_owned();
        let replies = self
            .write_once("mark user key rejected", &pipe, msg.idem.as_ref(), 0)
            .await?;
        self.confirm("mark user key rejected").await?;
        Ok(replies.map(|_| Some(true)))
    }
}

/// Owns the Redis connection for pools and quotas.
pub struct RedisStore {
    inner: Rc<Inner>,
}

/// Builds the client for `[redis]` (URL, password, TLS; the master Sentinel names,
/// asked now); a malformed URL or an unreadable file refuses the start.
pub fn client(config: &RedisConfig) -> std::result::Result<redis::Client, ConnectError> {
    Target::new(config)?.client()
}

impl RedisStore {
    /// The store's connection, for the fleet heartbeat (it follows a failover too).
    pub fn connection(&self) -> SharedConn {
        self.inner.conn.clone()
    }

    /// What `stats` shows of the connection.
    pub fn status(&self) -> Arc<RedisStatus> {
        self.inner.status.clone()
    }

    /// A store on `target` (nothing is connected until the first command). With
    /// Sentinel, the master is asked of the sentinels by the first health check.
    pub fn new(
        target: Target,
        config: &RedisConfig,
        master: Arc<MasterKey>,
        connected: Arc<AtomicBool>,
        audit: Arc<crate::audit::Audit>,
    ) -> std::result::Result<Self, ConnectError> {
        let timeout = Duration::from_millis(config.timeout_ms.max(1));
        let status = Arc::new(RedisStatus::default());
        status
            .sentinels
            .store(config.sentinels.len() as u64, Ordering::Relaxed);
        // With Sentinel, the master named now; if no sentinel answers, the URL's own
        // address stands in until the health check finds one.
        let first = if target.uses_sentinels() {
            match target.ask_sentinels_blocking() {
                Ok((host, port)) => {
                    status.set_master(&format!("{host}:{port}"));
                    tracing::info!(master = %format!("{host}:{port}"), "redis master (from Sentinel)");
                    target.client_at(&host, port)?
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask the sentinels for the master yet");
                    target.build(target.info.clone())?
                }
            }
        } else {
            target.build(target.info.clone())?
        };
        let conn = Rc::new(RefCell::new(manager(first, timeout)?));
        Ok(RedisStore {
            inner: Rc::new(Inner {
                conn,
                target,
                status,
                replicas: config.replicas_to_wait_for(),
                master,
                names: Names {
                    prefix: config.prefix.clone(),
                },
                timeout,
                accept_legacy: Arc::new(AtomicBool::new(config.accept_legacy_plaintext)),
                connected,
                answered: Arc::new(AtomicBool::new(false)),
                warned: RefCell::new(HashSet::new()),
                refusals: RefCell::default(),
                down: RefCell::default(),
                quota: quota::Batcher::new(),
                cut_over: AtomicBool::new(false),
                audit,
                report: redis::Script::new(&format!(
                    "{}{REPORT_BODY}",
                    idempotency::REDIS_COUNT_LUA
                )),
                write: redis::Script::new(&format!(
                    "{}{RETIRED_GUARD}{WRITE_BODY}",
                    idempotency::REDIS_COUNT_LUA
                )),
                records_ttl: std::cell::Cell::new(0),
            }),
        })
    }
}

impl RedisStore {
    /// The switch for `redis.accept_legacy_plaintext`, for reloads to flip.
    pub fn accept_legacy_switch(&self) -> Arc<AtomicBool> {
        self.inner.accept_legacy.clone()
    }

    /// Set once Redis has answered a command since start.
    pub fn answered_flag(&self) -> Arc<AtomicBool> {
        self.inner.answered.clone()
    }

    /// Has the health check read the fleet's idempotency record counters of TTL
    /// `ttl_s` (`server.idempotency_ttl_s`) for `stats`, until a write with a key
    /// names another TTL.
    pub fn count_records_of_ttl(&self, ttl_s: u64) {
        self.inner.records_ttl.set(ttl_s.max(1));
    }
}

impl Actor for RedisStore {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let check = |store: &mut Self, ctx: &mut Context<Self>| {
            let inner = store.inner.clone();
            ctx.spawn(async move { inner.ping().await }.into_actor(store));
        };
        check(self, ctx);
        ctx.run_interval(HEALTH_EVERY, check);
    }
}

macro_rules! forward {
    ($msg:ty, $out:ty, $method:ident) => {
        impl Handler<$msg> for RedisStore {
            type Result = ResponseFuture<Result<$out>>;

            fn handle(&mut self, msg: $msg, _: &mut Self::Context) -> Self::Result {
                let inner = self.inner.clone();
                Box::pin(async move { inner.$method(msg).await })
            }
        }
    };
}

forward!(AddPoolKey, Written<(String, bool)>, add_pool_key);
forward!(ReportPoolKey, Written<Option<Health>>, report_pool_key);
forward!(CountPoolKeys, Vec<PoolKeyCount>, count_pool_keys);
forward!(EnablePoolKey, Written<bool>, enable_pool_key);
forward!(CountPicks, (), count_picks);
forward!(RemovePoolKey, Written<bool>, remove_pool_key);
forward!(ReadUsage, u64, read_usage);
forward!(IncrementUsage, Written<u64>, increment_usage);
forward!(ConsumeUsage, Written<(bool, u64)>, consume_usage);
forward!(LoadUserKey, LoadedUserKey, load_user_key);
forward!(StoreUserKey, Written<()>, store_user_key);
forward!(DeleteUserKey, Written<bool>, delete_user_key);
forward!(ListUserKeys, Vec<UserKeyInfo>, list_user_keys);
forward!(ReportUserKey, Written<Option<bool>>, report_user_key);

impl Handler<LoadPool> for RedisStore {
    type Result = ResponseFuture<Result<Vec<PoolEntry>>>;

    fn handle(&mut self, msg: LoadPool, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.load_pool(msg.pool).await })
    }
}

impl Handler<ListPoolKeys> for RedisStore {
    type Result = ResponseFuture<Result<Vec<PoolKeyInfo>>>;

    fn handle(&mut self, msg: ListPoolKeys, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.list_pool_keys(msg.pool).await })
    }
}
