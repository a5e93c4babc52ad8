//! `ping` and `stats`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::figures::CacheFigures;
use crate::model::figures::RedisStatus;
use crate::ops::app::App;
use crate::store::cache::ReadCacheFigures;
use crate::store::handle::StoreMode;
use crate::wire::protocol::{body, Body};

/// `{"op":"ping"}` → `{"pong":true,"version":"0.1.0"}`
pub fn ping() -> Result<Body> {
    #[derive(Serialize)]
    struct Pong {
        pong: bool,
        version: &'static str,
    }
    body(&Pong {
        pong: true,
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// `{"op":"reload"}` → `{"reloaded":true,"key_versions":[1,2],"warnings":[]}`:
/// re-reads the config file and the master keyring, like SIGHUP, and answers once
/// they are in service; `warnings` names each changed setting that needs a restart.
/// A config or key file that is not usable answers `bad_config` with the problem.
pub async fn reload(app: &App) -> Result<Body> {
    #[derive(Serialize)]
    struct Reloaded {
        reloaded: bool,
        key_versions: Vec<u32>,
        warnings: Vec<String>,
    }
    let done = app.reload().await.map_err(|e| {
        tracing::error!("reload failed, keeping the running config and keyring: {e}");
        Error::from(e)
    })?;
    body(&Reloaded {
        reloaded: true,
        key_versions: done.key_versions,
        warnings: done.warnings,
    })
}

/// `{"op":"metrics"}` → `{"text":"# HELP apikeyd_requests Answers by op …\n# EOF\n"}`: the
/// Prometheus text that `GET /metrics` serves.
pub async fn metrics(app: &App) -> Result<Body> {
    #[derive(Serialize)]
    struct Text {
        text: String,
    }
    body(&Text {
        text: app.metrics_text().await?,
    })
}

/// `{"op":"stats"}` → `{"uptime_s":12,"connections":1,"requests_total":40,
/// "requests":{"by_op":{"ping":38,"stats":2},"by_code":{"ok":40}},"quota_denials":0,
/// "cache":{"hits":30,"misses":2,"entries":2},
/// "store":{"mode":"embedded","redis_connected":null,"user_keys":"local"},
/// "idempotency":{"records":0,"max_records":1000000,"recorded":0,"replayed":0,"conflicts":0},
/// "process":{"dumpable":false,"locked_kb":0},"version":"0.1.0","pid":4242}`
///
/// `pid` lets `rotate-master-key` prove that the daemon on a socket is the one
/// holding the keystore lock.
pub async fn stats(app: &App) -> Result<Body> {
    #[derive(Serialize)]
    struct StoreFigures {
        mode: StoreMode,
        redis_connected: Option<bool>,
        /// Where per-user keys live: "local" (the keystore) or "redis".
        user_keys: &'static str,
        /// Sentinel: the master now, and the failovers followed since start.
        #[serde(skip_serializing_if = "Option::is_none")]
        redis_master: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        redis_failovers: Option<u64>,
        /// Redis mode: the quota scripts sent and the increments and consumes in
        /// them (several per script under load: docs/performance.md).
        #[serde(skip_serializing_if = "Option::is_none")]
        quota_batches: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        quota_batched_calls: Option<u64>,
        /// Redis mode: fleet heartbeats this daemon ignored because its master key
        /// does not authenticate them (each member id once).
        #[serde(skip_serializing_if = "Option::is_none")]
        unauthenticated_heartbeats: Option<u64>,
        /// Redis mode: this daemon's fleet heartbeats that could not be written.
        #[serde(skip_serializing_if = "Option::is_none")]
        heartbeat_failures: Option<u64>,
    }
    #[derive(Serialize)]
    struct Process {
        dumpable: bool,
        locked_kb: u64,
    }
    #[derive(Serialize)]
    struct Requests {
        by_op: std::collections::BTreeMap<&'static str, u64>,
        by_code: std::collections::BTreeMap<&'static str, u64>,
    }
    /// Writes sent with an `idempotency_key`, since start.
    #[derive(Serialize)]
    struct Idempotency {
        /// Records held: embedded mode, in the keystore file (recounted when expired
        /// ones are dropped, about once a minute); Redis mode, by the whole fleet
        /// (as last seen: by a write with a key, or the background look each second).
        records: u64,
        /// `server.idempotency_max_records`: past it new keys are refused.
        max_records: u64,
        recorded: u64,
        replayed: u64,
        conflicts: u64,
    }
    #[derive(Serialize)]
    struct Stats {
        uptime_s: u64,
        connections: u64,
        requests_total: u64,
        requests: Requests,
        quota_denials: u64,
        cache: CacheFigures,
        store: StoreFigures,
        idempotency: Idempotency,
        process: Process,
        version: &'static str,
        pid: u32,
    }
    let cache = app.cache.send(ReadCacheFigures).await?;
    body(&Stats {
        uptime_s: app.started.elapsed().as_secs(),
        connections: app.connections.load(Ordering::Relaxed),
        requests_total: app.requests_total.load(Ordering::Relaxed),
        requests: {
            let (by_op, by_code) = app.metrics.by_op_and_code();
            Requests { by_op, by_code }
        },
        quota_denials: app.metrics.quota_denials(),
        cache,
        store: {
            let status = app.store.redis_status();
            let count =
                |n: fn(&RedisStatus) -> &AtomicU64| status.map(|s| n(s).load(Ordering::Relaxed));
            let redis_master = status.and_then(RedisStatus::master);
            StoreFigures {
                mode: app.store.mode,
                // Not connected until Redis has answered once, though commands are tried.
                redis_connected: app.redis_up(),
                user_keys: if app.user_keys.in_redis {
                    "redis"
                } else {
                    "local"
                },
                redis_failovers: count(|s| &s.failovers).filter(|_| redis_master.is_some()),
                redis_master,
                quota_batches: count(|s| &s.quota_batches),
                quota_batched_calls: count(|s| &s.quota_calls),
                unauthenticated_heartbeats: count(|s| &s.unauthenticated_heartbeats),
                heartbeat_failures: count(|s| &s.heartbeat_failures),
            }
        },
        idempotency: {
            let f = &crate::model::idempotency::FIGURES;
            Idempotency {
                records: f.records.load(Ordering::Relaxed),
                max_records: app.config().server.idempotency_max_records,
                recorded: f.recorded.load(Ordering::Relaxed),
                replayed: f.replayed.load(Ordering::Relaxed),
                conflicts: f.conflicts.load(Ordering::Relaxed),
            }
        },
        process: Process {
            dumpable: crate::process::hardening::dumpable() != 0,
            locked_kb: crate::process::hardening::locked_kb(),
        },
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
    })
}
