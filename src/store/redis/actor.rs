//! `RedisStore`, the actor that owns the Redis connection for pools, quota counters
//! and (in Redis mode) per-user keys: its start and health check. Each message it
//! answers has its `Handler` beside the code that answers it, on the shared state
//! (`Inner`) on the actor's thread: per-user keys in `user_keys`, pool reads in
//! `pool_reads`, quota counters in `quota`, pool writes in `store::redis` itself.

use super::*;

/// Owns the Redis connection for pools, quotas and (with `keystore.user_keys =
/// "redis"`) per-user keys.
pub struct RedisStore {
    pub(super) inner: Rc<Inner>,
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
        audit: Arc<crate::process::audit::Audit>,
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
