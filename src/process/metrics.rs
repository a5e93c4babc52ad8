//! Metrics: requests per op and code, request durations, quota denials, and the
//! Prometheus text built from them and from the cache, connection and Redis figures. Served
//! by the op `metrics` (`apikeyd metrics`) and, with `metrics.listen`, by
//! `GET /metrics` on a loopback HTTP port served (hyper) on the daemon's runtime.
//!
//! The hot path only bumps atomics; a prometheus-client registry is built from
//! them when someone asks, on the thread that serves connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::future::Future;

use crate::error::{Error, Result};
use crate::model::figures::CacheFigures;
use crate::model::figures::RedisStatus;
use crate::model::pool::PoolKeyCount;
use crate::process::logfmt::{Repeated, Say};
use crate::wire::catalog::Op;

/// The `op` label of unknown ops and of lines that were not a request.
pub const OTHER_OP: &str = "other";

/// Every wire code, and `ok`.
pub const CODES: [&str; 9] = [
    "ok",
    "bad_request",
    "unknown_op",
    "forbidden",
    "too_large",
    "unavailable",
    "bad_config",
    "idempotency_conflict",
    // Last: the code of anything not listed.
    "internal",
];

/// The `op` label of row `i` of the counters: an op of [`Op::ALL`], else `other`
/// (an unbounded label would let any client grow the daemon's memory).
fn op_name(i: usize) -> &'static str {
    Op::ALL.get(i).map_or(OTHER_OP, |op| op.name())
}

type OpCode = [(&'static str, &'static str); 2];

/// The daemon's counters; the exposition is built from them when someone asks.
pub struct Metrics {
    /// Answers per (op index, code index).
    counts: Vec<[AtomicU64; CODES.len()]>,
    quota_denials: AtomicU64,
    duration: Histogram,
    /// Redis mode: `apikeyd_redis_up` and the Redis families are exported.
    redis: bool,
    /// `report_key_result` requests by client uid.
    key_reports: Family<[(&'static str, String); 1], Counter>,
}

impl Metrics {
    /// Empty counters; `redis` adds the Redis families (`apikeyd_redis_up`, …).
    pub fn new(redis: bool) -> Metrics {
        Metrics {
            counts: (0..=Op::ALL.len()).map(|_| Default::default()).collect(),
            quota_denials: AtomicU64::new(0),
            // 50 µs to about 3.3 s: cache hits are tens of µs, store calls ms, deadlines s.
            duration: Histogram::new(exponential_buckets(0.00005, 4.0, 9)),
            redis,
            key_reports: Family::default(),
        }
    }

    /// Counts one answer of `op` (`None`: an unknown op or a line that was not a
    /// request) with `code`.
    pub fn record(&self, op: Option<Op>, code: &str, took: Option<Duration>) {
        let code = CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(CODES.len() - 1);
        let row = op.map_or(Op::ALL.len(), Op::index);
        if let Some(row) = self.counts.get(row) {
            row[code].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(t) = took {
            self.duration.observe(t.as_secs_f64());
        }
    }

    /// Counts a `report_key_result` from client `uid` (uids are bounded by `[access]`).
    pub fn key_reported(&self, uid: u32) {
        self.key_reports
            .get_or_create(&[("uid", uid.to_string())])
            .inc();
    }

    /// Counts a quota answer with `allowed: false`.
    pub fn quota_denied(&self) {
        self.quota_denials.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers so far per op and per code, leaving out zeros (for `stats`).
    pub fn by_op_and_code(&self) -> (BTreeMap<&'static str, u64>, BTreeMap<&'static str, u64>) {
        let (mut by_op, mut by_code) = (BTreeMap::new(), BTreeMap::new());
        for (i, row) in self.counts.iter().enumerate() {
            for (j, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    *by_op.entry(op_name(i)).or_insert(0) += n;
                    *by_code.entry(CODES[j]).or_insert(0) += n;
                }
            }
        }
        (by_op, by_code)
    }

    /// Quota denials so far.
    pub fn quota_denials(&self) -> u64 {
        self.quota_denials.load(Ordering::Relaxed)
    }
}

/// What the exposition needs besides the counters kept here: figures the daemon's
/// other parts own, read at the moment of the scrape.
pub struct Gauges<'a> {
    pub cache: CacheFigures,
    pub connections: u64,
    /// Redis mode: whether Redis is up.
    pub redis_up: Option<bool>,
    /// Redis mode: the connection's figures (failovers, master, sentinels, refusals).
    pub redis: Option<&'a RedisStatus>,
    /// Keys per pool and state; `None` when the store could not say now.
    pub pools: Option<Vec<PoolKeyCount>>,
    /// Redis mode: fleet heartbeats ignored as unauthenticated.
    pub unauthenticated_heartbeats: Option<u64>,
}

fn counter(n: u64) -> Counter {
    let c: Counter = Counter::default();
    c.inner().store(n, Ordering::Relaxed);
    c
}

fn gauge(n: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(n).unwrap_or(i64::MAX));
    g
}

type Labels = Vec<(&'static str, String)>;

impl Metrics {
    /// The Prometheus text exposition format (version 0.0.4, which Prometheus,
    /// promtool and node_exporter's textfile collector read) of these counters and
    /// `now`: every family with its `# HELP` and `# TYPE`.
    pub fn render(&self, now: &Gauges) -> Result<String> {
        let mut registry = Registry::with_prefix("apikeyd");
        let requests = Family::<OpCode, Counter>::default();
        for (i, row) in self.counts.iter().enumerate() {
            for (j, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let labels = [("op", op_name(i)), ("code", CODES[j])];
                    requests
                        .get_or_create(&labels)
                        .inner()
                        .store(n, Ordering::Relaxed);
                }
            }
        }
        registry.register(
            "requests",
            "Answers by op and result code (ok or the error code)",
            requests,
        );
        registry.register(
            "request_duration_seconds",
            "Time from reading a request to its answer being ready",
            self.duration.clone(),
        );
        registry.register(
            "quota_denials",
            "check_default_key_limit and consume_default_key_usage answers with allowed: false",
            counter(self.quota_denials()),
        );
        registry.register("cache_hits", "Key cache hits", counter(now.cache.hits));
        registry.register(
            "cache_misses",
            "Key cache misses",
            counter(now.cache.misses),
        );
        registry.register(
            "cache_entries",
            "Cached user keys and pools",
            gauge(now.cache.entries as u64),
        );
        registry.register(
            "connections",
            "Open client connections",
            gauge(now.connections),
        );
        let figures = &crate::model::idempotency::FIGURES;
        registry.register(
            "idempotency_recorded",
            "Writes with an idempotency_key applied and recorded by this daemon",
            counter(figures.recorded.load(Ordering::Relaxed)),
        );
        registry.register(
            "idempotency_replayed",
            "Repeated writes answered from their record (nothing applied)",
            counter(figures.replayed.load(Ordering::Relaxed)),
        );
        registry.register(
            "idempotency_conflicts",
            "Repeated keys refused with idempotency_conflict (nothing applied)",
            counter(figures.conflicts.load(Ordering::Relaxed)),
        );
        registry.register(
            "idempotency_records",
            "Idempotency records held (in Redis mode the fleet's, as last seen)",
            gauge(figures.records.load(Ordering::Relaxed)),
        );
        if self.redis {
            registry.register(
                "redis_up",
                "1 when Redis has answered and is not known to be down",
                gauge(u64::from(now.redis_up == Some(true))),
            );
        }
        registry.register(
            "key_reports",
            "report_key_result requests by client uid",
            self.key_reports.clone(),
        );
        if let Some(n) = now.unauthenticated_heartbeats {
            registry.register(
                "fleet_unauthenticated_heartbeats",
                "Fleet heartbeats ignored because the master key does not authenticate them",
                counter(n),
            );
        }
        if let Some(status) = now.redis {
            register_redis(&mut registry, status);
        }
        if let Some(pools) = &now.pools {
            register_pools(&mut registry, pools);
        }
        let mut text = String::with_capacity(4096);
        encode(&mut text, &registry)
            .map_err(|_| Error::Internal("cannot encode the metrics".into()))?;
        Ok(text_format(&text))
    }
}

/// The Redis families: failovers, the master Sentinel names, sentinels that
/// answer, and the commands Redis refused by cause.
fn register_redis(registry: &mut Registry, status: &RedisStatus) {
    registry.register(
        "redis_failovers",
        "Redis master changes followed since start (Sentinel failovers)",
        counter(status.failovers.load(Ordering::Relaxed)),
    );
    registry.register(
        "fleet_heartbeat_failures",
        "This daemon's fleet heartbeats that could not be written (Redis unreachable)",
        counter(status.heartbeat_failures.load(Ordering::Relaxed)),
    );
    let refusals = Family::<Labels, Counter>::default();
    for (refusal, n) in status.refusals() {
        refusals
            .get_or_create(&vec![("cause", refusal.label().to_string())])
            .inner()
            .store(n, Ordering::Relaxed);
    }
    registry.register(
        "redis_refusals",
        "Commands Redis answered with an error, by cause (oom, readonly, noauth, ...)",
        refusals,
    );
    let sentinels = status.sentinels.load(Ordering::Relaxed);
    if sentinels == 0 {
        return;
    }
    let master = Family::<Labels, Gauge>::default();
    if let Some(addr) = status.master() {
        master.get_or_create(&vec![("addr", addr)]).set(1);
    }
    registry.register(
        "redis_master_info",
        "1 for the Redis master Sentinel names now (label addr, host:port)",
        master,
    );
    registry.register(
        "sentinels_reachable",
        "Sentinels that answered the last health check (of redis.sentinels)",
        gauge(status.sentinels_reachable.load(Ordering::Relaxed)),
    );
    registry.register(
        "sentinels",
        "Sentinels listed in redis.sentinels",
        gauge(sentinels),
    );
}

/// `apikeyd_pool_keys{service,scope,state}`: keys per service, in the global pool
/// (`scope="global"`) or summed over the channel pools (`scope="channel"`; channel
/// ids are not labels, so their number cannot grow the exposition), per state.
fn register_pools(registry: &mut Registry, pools: &[PoolKeyCount]) {
    let mut sums: BTreeMap<(&str, &'static str), [u64; 3]> = BTreeMap::new();
    for p in pools {
        let scope = if p.pool.channel.is_some() {
            "channel"
        } else {
            "global"
        };
        let sum = sums.entry((p.pool.service.as_str(), scope)).or_default();
        sum[0] += p.active;
        sum[1] += p.cooling;
        sum[2] += p.disabled;
    }
    let family = Family::<Labels, Gauge>::default();
    for ((service, scope), counts) in sums {
        for (state, n) in ["active", "cooling", "disabled"].into_iter().zip(counts) {
            let labels = vec![
                ("service", service.to_string()),
                ("scope", scope.to_string()),
                ("state", state.to_string()),
            ];
            family
                .get_or_create(&labels)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    registry.register(
        "pool_keys",
        "Pool keys per service, scope (global, or summed over channels) and state (active, cooling, disabled)",
        family,
    );
}

/// prometheus-client writes OpenMetrics, where a counter's `# HELP`/`# TYPE` name
/// the family without `_total` and the text ends with `# EOF`. The 0.0.4 text
/// format names them as the samples are named and has no `# EOF`; everything else
/// (samples, histograms, escaping) is the same.
fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A bound `metrics.listen` port, waiting for `run` to serve it.
pub struct Listener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

/// `metrics.listen` cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("metrics.listen {listen:?}: {source}")]
    Address {
        listen: String,
        source: std::net::AddrParseError,
    },
    /// The port is taken, or not this process's to bind.
    #[error("cannot listen on metrics.listen {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `metrics.listen` when it is set (before the socket, so a taken port refuses
/// the start).
pub fn bind(listen: Option<&str>) -> std::result::Result<Option<Listener>, BindError> {
    let Some(listen) = listen.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let addr: SocketAddr = listen.parse().map_err(|source| BindError::Address {
        listen: listen.to_string(),
        source,
    })?;
    let listener = listen_on(addr).map_err(|source| BindError::Listen { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    Ok(Some(Listener { listener, addr }))
}

/// Connections that may wait for an accept: room for a burst of connections
/// (someone holding many open) without turning the scraper's away.
const BACKLOG: i32 = 1024;

/// A nonblocking listener on `addr` with [`BACKLOG`].
fn listen_on(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Connections served at once; more wait in the kernel's backlog. A scraper needs
/// one; the cap keeps a local user holding connections open from taking the
/// daemon's descriptors.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last, request and answer together.
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(15);

type Body = http_body_util::Full<bytes::Bytes>;

fn answer(status: u16, content_type: &str, text: String) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(Body::new(bytes::Bytes::from(text)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// The answer to one request: `GET /metrics` is the text `render` makes; any other
/// path is 404, another method on /metrics 405.
async fn respond<F, Fut>(
    request: hyper::Request<hyper::body::Incoming>,
    render: &F,
) -> hyper::Response<Body>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<String>>,
{
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.uri().path() != "/metrics" {
        return answer(404, TEXT, "not found; try /metrics\n".into());
    }
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return answer(405, TEXT, "only GET\n".into());
    }
    match render().await {
        Ok(text) => answer(200, "text/plain; version=0.0.4; charset=utf-8", text),
        Err(e) => {
            tracing::warn!(error = %e, "cannot render the metrics");
            answer(503, TEXT, "metrics unavailable\n".into())
        }
    }
}

impl Listener {
    /// The address actually bound (port 0 becomes the chosen port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` with HTTP/1 on the daemon's own runtime (a task of
    /// the current thread, so `render` may hold the daemon's state) until the
    /// runtime stops: at most [`MAX_CONNECTIONS`] at once, each given
    /// [`HEADER_TIMEOUT`] for its request head and [`CONNECTION_LIMIT`] in all.
    /// Running out of descriptors pauses accepting briefly; it never ends it.
    pub fn serve<F, Fut>(self, render: F) -> std::io::Result<()>
    where
        F: Fn() -> Fut + 'static,
        Fut: Future<Output = Result<String>> + 'static,
    {
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        let render = std::rc::Rc::new(render);
        tokio::task::spawn_local(async move {
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
            let mut failing = Repeated::default();
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let stream = match listener.accept().await {
                    Ok((stream, _)) => {
                        if let Some((n, _)) =
                            failing.end_when_quiet(std::time::Instant::now(), HEADER_TIMEOUT)
                        {
                            tracing::info!(
                                failures = n,
                                "metrics.listen accepts connections again after {n} failed accepts"
                            );
                        }
                        stream
                    }
                    Err(e) => {
                        match failing.hit(std::time::Instant::now()) {
                            Say::First => {
                                tracing::warn!(error = %e, "metrics.listen cannot accept a connection (out of descriptors?); pausing briefly")
                            }
                            Say::Again { times, total } => {
                                tracing::warn!(error = %e, times, total, "metrics.listen still cannot accept connections")
                            }
                            Say::Nothing => {}
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let render = render.clone();
                tokio::task::spawn_local(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let render = render.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(respond(request, &*render).await)
                        }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    match tokio::time::timeout(CONNECTION_LIMIT, connection).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "metrics connection ended with an error")
                        }
                        Err(_) => tracing::debug!("metrics connection closed: it took too long"),
                    }
                    drop(slot);
                });
            }
        });
        Ok(())
    }
}

/// How long an accept loop pauses after a failed accept (out of descriptors).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests;
