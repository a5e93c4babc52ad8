//! Daily quota counters in Redis, sent in batches: the increments and consumes that
//! arrive in one turn of the event loop go to Redis as one script, sent at the end
//! of that turn (a lone call waits for nothing but its own turn). Under load Redis
//! runs one script per batch instead of one per call, and the daemon sends one
//! command instead of many; batches do not wait for each other. Each call in a
//! batch is applied in order inside one atomic script, so a consume is as atomic as
//! when it ran alone. A call with an idempotency key is checked against its record
//! and recorded inside the same script, so a repeat is never counted twice, even
//! when it reaches another daemon of the fleet.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use actix::prelude::*;
use redis::AsyncCommands;
use tokio::sync::oneshot;

use super::{Inner, RedisStore, Retry};
use crate::error::{Error, Result};
use crate::model::clock;
use crate::model::idempotency::{self, Counters, Idem, Written};
use crate::store::messages::{ConsumeUsage, IncrementUsage, ReadUsage};

/// Check-and-increment in one script: Redis runs it atomically. What one consume
/// does; public so the benchmark can run the very same script against redis-server
/// directly (the batch script below applies it to each call of a batch).
pub const CONSUME_SCRIPT: &str = r"
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if n < tonumber(ARGV[3]) then
  n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
  return {1, n}
end
return {0, n}
";

/// One increment or consume (`limit` '' for an increment), as the batch scripts
/// apply it: answers the verdict (1 allowed and counted, 0 denied) and the count.
/// `refusal(err)`: the message of a call's error when it is the server's own refusal
/// (any code but ERR and WRONGTYPE), which ends the batch; nil when it fails the call
/// alone.
const APPLY_LUA: &str = r"
local function refusal(err)
  local message = type(err) == 'table' and err.err or tostring(err)
  local code = string.match(message, '^(%u+) ')
  if code and code ~= 'ERR' and code ~= 'WRONGTYPE' then return message end
  return nil
end
local function apply(key, tool, limit, expiry)
  if limit ~= '' then
    local n = tonumber(redis.call('HGET', key, tool) or '0')
    if n == nil then error('not a count') end
    if n >= tonumber(limit) then return 0, n end
  end
  local n = redis.call('HINCRBY', key, tool, 1)
  redis.call('EXPIREAT', key, expiry)
  return 1, n
end
";

/// A batch of increments and consumes without idempotency records (most batches),
/// without the words and the Lua that records need. Call i has its counter hash in
/// KEYS[i] and two words from ARGV[2i]: its tool and its limit; ARGV[1] is the
/// expiry of today's hashes. Answers as [`BATCH_BODY`] does (the last number 0).
const PLAIN_BODY: &str = r"
local out = {}
for i = 1, #KEYS do
  local ok, verdict, n = pcall(apply, KEYS[i], ARGV[2 * i], ARGV[2 * i + 1], ARGV[1])
  if ok then
    out[2 * i - 1], out[2 * i] = verdict, n
  else
    local message = refusal(verdict)
    if message then return redis.error_reply(message) end
    out[2 * i - 1], out[2 * i] = 2, 0
  end
end
out[#out + 1] = 0
return out
";

/// A batch of increments and consumes, in order. Call i has its counter hash in
/// KEYS[i]; ARGV[1] is the expiry of today's hashes, ARGV[2] the TTL of idempotency
/// records; ARGV[3..5] the record counters (current, previous, when the current
/// may go; '' when no call of the batch has a record: see
/// `idempotency::REDIS_COUNT_LUA`), ARGV[6] the most records held and ARGV[7] how
/// many calls have a record; call i has four words from ARGV[4i+4]: its tool, its
/// limit ('' for an increment, which has none), its idempotency record ('' for none;
/// named here rather than in KEYS, as a call may have none: the daemon never runs on
/// a cluster) and its fingerprint. Answers {verdict_1, count_1, verdict_2, count_2,
/// …, records}: verdict 1 allowed (counted), 0 denied, 2 refused by Redis (a counter
/// hash that is not a hash, say), 3 the record belongs to another request, 4 and 5
/// the recorded verdict (0 and 1) of an earlier call with the same key, with its
/// count, 6 refused because the records are full (nothing applied); `records` is the
/// records counted after the batch (0 without counters). A refused call fails alone:
/// the others of its batch are applied and answered as usual.
///
/// A call with a record costs one record command: its verdict is known before
/// anything is written (the count is read, and the script runs alone), so
/// `SET … NX GET` writes the record and reports an earlier one in one step; the count
/// is written after, only when the record was new. The count read must be digits, so
/// the increment after it cannot fail (a record is never left without its write). A
/// record holds the fingerprint, a newline, the verdict, `+` and the count before
/// the call, as Redis gave it: no number is turned into text, which costs Redis more
/// than the commands around it. (Records of earlier versions hold the verdict, a
/// space and the count after the call; they are read too.) The counters cost two
/// commands per batch, not per call.
/// A refusal of the server's own (OOM, READONLY, NOPERM, MISCONF, …: any code but
/// ERR and WRONGTYPE) refuses every write alike, so it ends the script as its error
/// reply, which names the cause.
const BATCH_BODY: &str = r"
local counter, held, added, cap = nil, 0, 0, 0
if ARGV[3] ~= '' then
  counter, held = records_open(ARGV[3], ARGV[4], ARGV[5], ARGV[7])
  cap = tonumber(ARGV[6])
end
local function once(key, tool, limit, expiry, record, print, ttl)
  if record == '' then return apply(key, tool, limit, expiry) end
  local head = print .. '\n'
  local before = redis.call('HGET', key, tool) or '0'
  if #before > 15 or not string.find(before, '^%d+$') then error('not a count') end
  local verdict = '1'
  if limit ~= '' and tonumber(before) >= tonumber(limit) then verdict = '0' end
  local rec
  if held >= cap then
    rec = redis.call('GET', record)
    if not rec then return 6, 0 end
  else
    rec = redis.call('SET', record, head .. verdict .. '+' .. before, 'NX', 'GET', 'EX', ttl)
  end
  if rec then
    if string.sub(rec, 1, #head) ~= head then return 3, 0 end
    local answer = string.sub(rec, #head + 1)
    local v, m = string.match(answer, '^(%d)%+(%d+)$')
    if v then return 4 + tonumber(v), tonumber(m) + tonumber(v) end
    v, m = string.match(answer, '^(%d+) (%d+)$')
    return 4 + tonumber(v), tonumber(m)
  end
  held, added = held + 1, added + 1
  if verdict == '0' then return 0, tonumber(before) end
  local n = redis.call('HINCRBY', key, tool, '1')
  redis.call('EXPIREAT', key, expiry)
  return 1, n
end
local out = {}
for i = 1, #KEYS do
  local a = 4 * i + 4
  local ok, verdict, n = pcall(once, KEYS[i], ARGV[a], ARGV[a + 1], ARGV[1],
    ARGV[a + 2], ARGV[a + 3], ARGV[2])
  if ok then
    out[2 * i - 1], out[2 * i] = verdict, n
  else
    local message = refusal(verdict)
    if message then
      if counter then records_close(counter, added) end
      return redis.error_reply(message)
    end
    out[2 * i - 1], out[2 * i] = 2, 0
  end
end
if counter then records_close(counter, added) end
out[#out + 1] = held
return out
";

/// At most this many calls go in one script, so that one script never holds Redis
/// for long (Redis runs nothing else while a script runs).
const MAX_BATCH: usize = 128;

/// Seconds since the epoch when today's counters may go: an hour after the day ends.
fn usage_expiry() -> i64 {
    clock::now_s() + clock::seconds_to_midnight() + 3600
}

/// One increment or consume waiting for its batch.
struct Call {
    hash: String,
    tool: String,
    /// `None` for an increment.
    limit: Option<u64>,
    /// The call's idempotency record: its name, and the key (fingerprint, TTL).
    record: Option<(String, Idem)>,
    reply: oneshot::Sender<Result<Written<(bool, u64)>>>,
}

/// The calls of this turn, waiting for the batch that sends them.
pub(super) struct Batcher {
    /// Batches without records ([`PLAIN_BODY`]).
    plain: redis::Script,
    /// Batches with records ([`BATCH_BODY`]).
    script: redis::Script,
    queue: RefCell<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Whether a task to send `waiting` is spawned (it runs after the tasks that
    /// are ready in this turn, so it takes all their calls).
    scheduled: bool,
    waiting: Vec<Call>,
}

impl Batcher {
    pub(super) fn new() -> Self {
        Batcher {
            plain: redis::Script::new(&format!("{APPLY_LUA}{PLAIN_BODY}")),
            script: redis::Script::new(&format!(
                "{}{APPLY_LUA}{BATCH_BODY}",
                idempotency::REDIS_COUNT_LUA
            )),
            queue: RefCell::default(),
        }
    }
}

// The messages this file answers, each sent through `store::handle::Store`.

impl Handler<ReadUsage> for RedisStore {
    type Result = ResponseFuture<Result<u64>>;

    fn handle(&mut self, msg: ReadUsage, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.read_usage(msg).await })
    }
}

impl Handler<IncrementUsage> for RedisStore {
    type Result = ResponseFuture<Result<Written<u64>>>;

    fn handle(&mut self, msg: IncrementUsage, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.increment_usage(msg).await })
    }
}

impl Handler<ConsumeUsage> for RedisStore {
    type Result = ResponseFuture<Result<Written<(bool, u64)>>>;

    fn handle(&mut self, msg: ConsumeUsage, _: &mut Self::Context) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.consume_usage(msg).await })
    }
}

impl Inner {
    pub(super) async fn read_usage(&self, msg: ReadUsage) -> Result<u64> {
        let hash = self.names.usage(&clock::utc_day(), &msg.user_id);
        let n: Option<u64> = self
            .bounded("HGET", Retry::Read, |mut c| {
                let (hash, tool) = (hash.clone(), msg.tool_name.clone());
                async move { c.hget(hash, tool).await }
            })
            .await?;
        Ok(n.unwrap_or(0))
    }

    pub(super) async fn increment_usage(
        self: Rc<Self>,
        msg: IncrementUsage,
    ) -> Result<Written<u64>> {
        let written = self
            .count(&msg.user_id, msg.tool_name, None, msg.idem)
            .await?;
        Ok(written.map(|(_, n)| n))
    }

    pub(super) async fn consume_usage(
        self: Rc<Self>,
        msg: ConsumeUsage,
    ) -> Result<Written<(bool, u64)>> {
        self.count(&msg.user_id, msg.tool_name, Some(msg.limit), msg.idem)
            .await
    }

    /// Queues one call on today's counters of `user_id` and waits for its batch.
    async fn count(
        self: Rc<Self>,
        user_id: &str,
        tool: String,
        limit: Option<u64>,
        idem: Option<Idem>,
    ) -> Result<Written<(bool, u64)>> {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            hash: self.names.usage(&clock::utc_day(), user_id),
            tool,
            limit,
            record: idem.map(|i| (self.names.idempotency(i.uid, &i.key), i)),
            reply,
        };
        let schedule = {
            let mut queue = self.quota.queue.borrow_mut();
            queue.waiting.push(call);
            !std::mem::replace(&mut queue.scheduled, true)
        };
        if schedule {
            actix::spawn(self.clone().send_waiting());
        }
        answer.await.unwrap_or_else(|_| {
            Err(Error::Internal(
                "the quota batch was dropped before it answered".into(),
            ))
        })
    }

    /// Sends the calls waiting now, at most [`MAX_BATCH`] per script (the scripts
    /// at once), and answers each.
    async fn send_waiting(self: Rc<Self>) {
        let mut waiting = {
            let mut queue = self.quota.queue.borrow_mut();
            queue.scheduled = false;
            std::mem::take(&mut queue.waiting)
        };
        let mut batches = Vec::with_capacity(waiting.len().div_ceil(MAX_BATCH));
        while waiting.len() > MAX_BATCH {
            let rest = waiting.split_off(MAX_BATCH);
            batches.push(std::mem::replace(&mut waiting, rest));
        }
        batches.push(waiting);
        futures_util::future::join_all(batches.into_iter().map(|batch| self.answer(batch))).await;
    }

    /// Runs one batch and answers each of its calls.
    async fn answer(&self, batch: Vec<Call>) {
        self.status.quota_batches.fetch_add(1, Ordering::Relaxed);
        self.status
            .quota_calls
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        match self.run_batch(&batch).await {
            Ok(counts) => {
                for (call, pair) in batch.into_iter().zip(counts.chunks_exact(2)) {
                    let answer = match (pair[0], &call.record) {
                        (0 | 1, record) => {
                            if record.is_some() {
                                idempotency::FIGURES
                                    .recorded
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Written::fresh((pair[0] == 1, pair[1])))
                        }
                        (4 | 5, _) => {
                            idempotency::FIGURES
                                .replayed
                                .fetch_add(1, Ordering::Relaxed);
                            Ok(Written {
                                value: (pair[0] == 5, pair[1]),
                                replayed: true,
                            })
                        }
                        (3, Some((_, idem))) => Err(idempotency::conflict(idem)),
                        (6, Some((_, idem))) => Err(idempotency::full(idem.max_records)),
                        _ => {
                            tracing::error!(hash = %call.hash, "redis refused a quota count: the counter is not a hash of counts (WRONGTYPE or not a number); something else wrote it");
                            Err(Error::Internal(
                                "redis refused the quota count (see the daemon log)".into(),
                            ))
                        }
                    };
                    let _ = call.reply.send(answer);
                }
            }
            Err(e) => {
                for call in batch {
                    let _ = call.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Runs one batch; answers two numbers per call.
    async fn run_batch(&self, batch: &[Call]) -> Result<Vec<u64>> {
        let recorded = batch.iter().filter(|c| c.record.is_some()).count();
        if recorded == 0 {
            let mut invocation = self.quota.plain.prepare_invoke();
            invocation.arg(usage_expiry());
            for call in batch {
                invocation.key(&call.hash).arg(&call.tool);
                match call.limit {
                    Some(limit) => invocation.arg(limit),
                    None => invocation.arg(""),
                };
            }
            return self.invoke_batch(batch, &invocation).await;
        }
        let mut invocation = self.quota.script.prepare_invoke();
        // One TTL for the batch: the longest asked (they differ only across a reload).
        let ttl = batch
            .iter()
            .filter_map(|c| c.record.as_ref().map(|(_, i)| i.ttl_s))
            .max()
            .unwrap_or(1)
            .max(1);
        let most = batch
            .iter()
            .filter_map(|c| c.record.as_ref().map(|(_, i)| i.max_records))
            .max()
            .unwrap_or(1);
        invocation.arg(usage_expiry()).arg(ttl);
        self.records_ttl.set(ttl);
        let counters = Counters::at(&self.names.idempotency_count(ttl), ttl, clock::now_s());
        invocation
            .arg(counters.current)
            .arg(counters.previous)
            .arg(counters.expire_at)
            .arg(most)
            .arg(recorded);
        for call in batch {
            invocation.key(&call.hash).arg(&call.tool);
            match call.limit {
                Some(limit) => invocation.arg(limit),
                None => invocation.arg(""),
            };
            match &call.record {
                Some((name, idem)) => invocation.arg(name).arg(&idem.fingerprint),
                None => invocation.arg("").arg(""),
            };
        }
        let counts = self.invoke_batch(batch, &invocation).await?;
        idempotency::FIGURES
            .records
            .store(counts[2 * batch.len()], Ordering::Relaxed);
        Ok(counts)
    }

    /// Sends one batch's script; answers two numbers per call and one more.
    async fn invoke_batch(
        &self,
        batch: &[Call],
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<Vec<u64>> {
        let counts: Vec<u64> = self
            .bounded("quota batch", Retry::Write, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        if counts.len() != 2 * batch.len() + 1 {
            tracing::error!(
                calls = batch.len(),
                answers = counts.len(),
                "the quota script answered the wrong number of counts"
            );
            return Err(Error::Internal(
                "redis answered a quota batch wrongly (see the daemon log)".into(),
            ));
        }
        Ok(counts)
    }
}
