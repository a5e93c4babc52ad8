//! `ping` and `stats`.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::actors::cache::{CacheFigures, ReadCacheFigures};
use crate::actors::store::StoreMode;
use crate::app::App;
use crate::error::{Error, Result};
use crate::protocol::{body, Body};

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

/// `{"op":"reload"}` → `{"reloaded":true,"key_versions":[1,2]}`: re-reads the config
/// file and the master keyring, like SIGHUP, and answers once they are in service.
pub async fn reload(app: &App) -> Result<Body> {
    #[derive(Serialize)]
    struct Reloaded {
        reloaded: bool,
        key_versions: Vec<u32>,
    }
    let key_versions = app.reload().await.map_err(|e| {
        tracing::error!("reload failed, keeping the running config and keyring: {e}");
        Error::Internal(format!("reload failed: {e}"))
    })?;
    body(&Reloaded {
        reloaded: true,
        key_versions,
    })
}

/// `{"op":"stats"}` → `{"uptime_s":12,"connections":1,"requests_total":40,
/// "cache":{"hits":30,"misses":2,"entries":2},"store":{"mode":"embedded","redis_connected":null},
/// "process":{"dumpable":false,"locked_kb":0},"version":"0.1.0"}`
pub async fn stats(app: &App) -> Result<Body> {
    #[derive(Serialize)]
    struct StoreFigures {
        mode: StoreMode,
        redis_connected: Option<bool>,
    }
    #[derive(Serialize)]
    struct Process {
        dumpable: bool,
        locked_kb: u64,
    }
    #[derive(Serialize)]
    struct Stats {
        uptime_s: u64,
        connections: u64,
        requests_total: u64,
        cache: CacheFigures,
        store: StoreFigures,
        process: Process,
        version: &'static str,
    }
    let cache = app.cache.send(ReadCacheFigures).await?;
    body(&Stats {
        uptime_s: app.started.elapsed().as_secs(),
        connections: app.connections.load(Ordering::Relaxed),
        requests_total: app.requests_total.load(Ordering::Relaxed),
        cache,
        store: StoreFigures {
            mode: app.store.mode,
            // Not connected until Redis has answered once, though commands are tried.
            redis_connected: app.store.redis_connected().map(|up| {
                up && app
                    .redis
                    .as_ref()
                    .is_some_and(|r| r.answered.load(Ordering::Relaxed))
            }),
        },
        process: Process {
            dumpable: crate::hardening::dumpable() != 0,
            locked_kb: crate::hardening::locked_kb(),
        },
        version: env!("CARGO_PKG_VERSION"),
    })
}
