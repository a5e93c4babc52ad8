//! Metrics: requests per op and code, request durations, quota denials, and the
//! Prometheus text built from them and from the cache and connection figures. Served
//! by the op `metrics` (`apikeyd metrics`) and, with `metrics.listen`, by
//! `GET /metrics` on a loopback HTTP port.
//!
//! The hot path only bumps atomics; the prometheus-client registry is filled from
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
use tokio::sync::mpsc;

use crate::actors::cache::CacheFigures;
use crate::error::{Error, Result};
use crate::op::Op;

/// The `op` label of unknown ops and of lines that were not a request.
pub const OTHER_OP: &str = "other";

/// Every wire code, and `ok`.
pub const CODES: [&str; 7] = [
    "ok",
    "bad_request",
    "unknown_op",
    "forbidden",
    "too_large",
    "unavailable",
    "internal",
];

/// The `op` label of row `i` of the counters: an op of [`Op::ALL`], else `other`
/// (an unbounded label would let any client grow the daemon's memory).
fn op_name(i: usize) -> &'static str {
    Op::ALL.get(i).map_or(OTHER_OP, |op| op.name())
}

type OpCode = [(&'static str, &'static str); 2];

/// The daemon's counters and the registry they are exported through.
pub struct Metrics {
    /// Answers per (op index, code index).
    counts: Vec<[AtomicU64; CODES.len()]>,
    quota_denials: AtomicU64,
    duration: Histogram,
    registry: Registry,
    requests: Family<OpCode, Counter>,
    denials: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_entries: Gauge,
    connections: Gauge,
    redis_up: Option<Gauge>,
    unauthenticated_heartbeats: Counter,
    key_reports: Family<[(&'static str, String); 1], Counter>,
}

impl Metrics {
    /// Empty counters; `redis` adds `apikeyd_redis_up`.
    pub fn new(redis: bool) -> Metrics {
        let mut registry = Registry::with_prefix("apikeyd");
        let requests = Family::<OpCode, Counter>::default();
        registry.register(
            "requests",
            "Answers by op and result code (ok or the error code)",
            requests.clone(),
        );
        // 50 µs to about 3.3 s: cache hits are tens of µs, store calls ms, deadlines s.
        let duration = Histogram::new(exponential_buckets(0.00005, 4.0, 9));
        registry.register(
            "request_duration_seconds",
            "Time from reading a request to its answer being ready",
            duration.clone(),
        );
        let denials = Counter::default();
        registry.register(
            "quota_denials",
            "check_default_key_limit and consume_default_key_usage answers with allowed: false",
            denials.clone(),
        );
        let (cache_hits, cache_misses) = (Counter::default(), Counter::default());
        registry.register("cache_hits", "Key cache hits", cache_hits.clone());
        registry.register("cache_misses", "Key cache misses", cache_misses.clone());
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Cached user keys and pools",
            cache_entries.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let redis_up = redis.then(|| {
            let g = Gauge::default();
            registry.register(
                "redis_up",
                "1 when Redis has answered and is not known to be down",
                g.clone(),
            );
            g
        });
        let unauthenticated_heartbeats = Counter::default();
        if redis {
            registry.register(
                "fleet_unauthenticated_heartbeats",
                "Fleet heartbeats ignored because the master key does not authenticate them",
                unauthenticated_heartbeats.clone(),
            );
        }
        let key_reports = Family::<[(&'static str, String); 1], Counter>::default();
        registry.register(
            "key_reports",
            "report_key_result requests by client uid",
            key_reports.clone(),
        );
        Metrics {
            unauthenticated_heartbeats,
            key_reports,
            counts: (0..=Op::ALL.len()).map(|_| Default::default()).collect(),
            quota_denials: AtomicU64::new(0),
            duration,
            registry,
            requests,
            denials,
            cache_hits,
            cache_misses,
            cache_entries,
            connections,
            redis_up,
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
pub struct Gauges {
    pub cache: CacheFigures,
    pub connections: u64,
    /// Redis mode: whether Redis is up.
    pub redis_up: Option<bool>,
    /// Redis mode: fleet heartbeats ignored as unauthenticated.
    pub unauthenticated_heartbeats: Option<u64>,
}

impl Metrics {
    /// The Prometheus text (OpenMetrics 1.0, which Prometheus and node_exporter's
    /// textfile collector read) of these counters and `now`.
    pub fn render(&self, now: &Gauges) -> Result<String> {
        for (i, row) in self.counts.iter().enumerate() {
            for (j, n) in row.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let labels = [("op", op_name(i)), ("code", CODES[j])];
                    self.requests
                        .get_or_create(&labels)
                        .inner()
                        .store(n, Ordering::Relaxed);
                }
            }
        }
        self.denials
            .inner()
            .store(self.quota_denials(), Ordering::Relaxed);
        self.cache_hits
            .inner()
            .store(now.cache.hits, Ordering::Relaxed);
        self.cache_misses
            .inner()
            .store(now.cache.misses, Ordering::Relaxed);
        self.cache_entries
            .set(i64::try_from(now.cache.entries).unwrap_or(i64::MAX));
        self.connections
            .set(i64::try_from(now.connections).unwrap_or(i64::MAX));
        if let Some(g) = &self.redis_up {
            g.set(i64::from(now.redis_up == Some(true)));
        }
        if let Some(n) = now.unauthenticated_heartbeats {
            self.unauthenticated_heartbeats
                .inner()
                .store(n, Ordering::Relaxed);
        }
        let mut text = String::with_capacity(4096);
        encode(&mut text, &self.registry)
            .map_err(|_| Error::Internal("cannot encode the metrics".into()))?;
        Ok(text)
    }
}

/// A bound `metrics.listen` port, waiting for `run` to serve it.
pub struct Listener {
    server: tiny_http::Server,
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
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
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
    let server =
        tiny_http::Server::http(addr).map_err(|source| BindError::Listen { addr, source })?;
    let addr = server.server_addr().to_ip().unwrap_or(addr);
    Ok(Some(Listener { server, addr }))
}

/// What the HTTP thread asks the daemon's thread: render, and send the text here.
pub type RenderRequest = std::sync::mpsc::SyncSender<Result<String>>;

/// How long the HTTP thread waits for the daemon's thread to render.
const RENDER_LIMIT: Duration = Duration::from_secs(5);

impl Listener {
    /// The address actually bound (port 0 becomes the chosen port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` on a thread of its own until the process ends (or the
    /// daemon's side is gone); everything else is 404, other methods 405.
    pub fn spawn(self, ask: mpsc::UnboundedSender<RenderRequest>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("apikeyd-metrics".into())
            .spawn(move || {
                for request in self.server.incoming_requests() {
                    let path = request.url().split('?').next().unwrap_or("");
                    let response = if path != "/metrics" {
                        tiny_http::Response::from_string("not found; try /metrics\n")
                            .with_status_code(404)
                    } else if *request.method() != tiny_http::Method::Get {
                        tiny_http::Response::from_string("only GET\n").with_status_code(405)
                    } else {
                        let (tx, rx) = std::sync::mpsc::sync_channel(1);
                        let text = ask
                            .send(tx)
                            .ok()
                            .and_then(|()| rx.recv_timeout(RENDER_LIMIT).ok())
                            .and_then(|r| r.ok());
                        match text {
                            Some(text) => {
                                let response = tiny_http::Response::from_string(text);
                                match tiny_http::Header::from_bytes(
                                    &b"Content-Type"[..],
                                    &b"application/openmetrics-text; version=1.0.0; charset=utf-8"
                                        [..],
                                ) {
                                    Ok(h) => response.with_header(h),
                                    Err(()) => response,
                                }
                            }
                            None => tiny_http::Response::from_string("metrics unavailable\n")
                                .with_status_code(503),
                        }
                    };
                    let _ = request.respond(response);
                }
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_and_codes_are_bounded() {
        let m = Metrics::new(false);
        m.record(Some(Op::Ping), "ok", Some(Duration::from_micros(10)));
        m.record(Some(Op::Ping), "ok", None);
        m.record(None, "unknown_op", None);
        m.record(Some(Op::GetUserApiKey), "weird", None);
        let (by_op, by_code) = m.by_op_and_code();
        assert_eq!(by_op["ping"], 2);
        assert_eq!(by_op[OTHER_OP], 1);
        assert_eq!(by_op["get_user_api_key"], 1);
        assert_eq!(by_code["ok"], 2);
        assert_eq!(by_code["internal"], 1);
    }

    #[test]
    fn bind_errors_keep_their_text() {
        let e = bind(Some("nowhere")).err().unwrap().to_string();
        assert_eq!(
            e,
            "metrics.listen \"nowhere\": invalid socket address syntax"
        );
    }
}
