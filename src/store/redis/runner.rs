//! Running one command on Redis: the deadline, the retry decided by whether the
//! command may run twice (`Retry`), the refusals and outages said once in the log,
//! the health check that follows a Sentinel failover, and `WAIT` for replicas.

use super::*;

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
fn may_retry(e: &redis::RedisError, kind: Retry) -> bool {
    match kind {
        Retry::Read => is_connection_error(e) && !e.is_timeout(),
        Retry::Write => e.is_connection_refusal(),
    }
}

/// Whether a command may be sent again after an error that leaves open whether it
/// ran ([`may_retry`]): a read may, a write only when it never reached Redis.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Retry {
    Read,
    Write,
}

impl Inner {
    /// Runs one Redis command (or pipeline) made by `attempt` within
    /// `redis.timeout_ms`, sending it a second time when [`may_retry`] allows. While
    /// the connection is known to be down, fails at once; the health check revives it.
    pub(super) async fn bounded<T, F, Fut>(&self, what: &str, kind: Retry, attempt: F) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.connected.load(Ordering::Relaxed) {
            return Err(Error::Unavailable(
                "redis is unreachable; retry shortly".into(),
            ));
        }
        self.bounded_even_if_down(what, kind, attempt).await
    }

    /// Runs `pipe` (built once, sent at most twice) with [`Inner::bounded`] and
    /// decodes its replies.
    pub(super) async fn pipeline<T: redis::FromRedisValue>(
        &self,
        what: &str,
        kind: Retry,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        self.bounded(
            what,
            kind,
            |mut c| async move { pipe.query_async(&mut c).await },
        )
        .await
    }

    /// [`Inner::bounded`] without failing at once while the connection is known to
    /// be down: for the health check that revives it, and `WAIT` after a write.
    pub(super) async fn bounded_even_if_down<T, F, Fut>(
        &self,
        what: &str,
        kind: Retry,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let limit = self.timeout;
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
    pub(super) fn refused(
        &self,
        what: &str,
        kind: Retry,
        refusal: RedisRefusal,
        e: &redis::RedisError,
    ) {
        self.status.count_refusal(refusal);
        let command = match kind {
            Retry::Read => "a read",
            Retry::Write => "a write",
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
    pub(super) fn refusals_end(&self, kind: Retry) {
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
    pub(super) fn mark_up(&self) {
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
    pub(super) fn mark_down(&self, what: &str, why: &str) {
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

    pub(super) fn warn_once(&self, hash: &str, message: &'static str) {
        if self.warned.borrow_mut().insert(hash.to_string()) {
            tracing::warn!(hash, "{message}");
        }
    }

    pub(super) async fn ping(&self) {
        if self.target.uses_sentinels() {
            self.follow_master().await;
        }
        let _ = self
            .bounded_even_if_down("PING", Retry::Read, |mut c| async move {
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
            .bounded("MGET idempotency record counters", Retry::Read, |mut c| {
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
    pub(super) async fn follow_master(&self) {
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
    pub(super) async fn confirm(&self, what: &str) -> Result<()> {
        if self.replicas == 0 {
            return Ok(());
        }
        // Redis answers WAIT when its own timeout runs out; that must come well
        // before the connection's response timeout (`redis.timeout_ms`), or a missing
        // replica would look like a dead master.
        let wait_ms = (self.timeout.as_millis() as u64 / 2).max(1);
        let replicas = self.replicas;
        let acked: u32 = self
            .bounded_even_if_down(what, Retry::Read, |mut c| async move {
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
}
