//! The resolution order (docs/protocol.md, "get_user_api_key"): user key → channel
//! pool → global pool → config default. A pool store that fails is skipped and the
//! answer marked degraded. The user's own key is never skipped: when it cannot be
//! known (its store failed and no copy of it is cached), the answer is no key,
//! degraded — a pool or default key must not stand in for a key the user may have.

use std::sync::Arc;

use crate::error::Result;
use crate::keys::Secret;
use crate::model::pool::PoolRef;
use crate::ops::app::App;
use crate::ops::services;
use crate::store::cache::{Pick, UserKey};

/// What to resolve.
pub struct Query {
    pub user_id: String,
    pub service: String,
    pub channel_id: Option<String>,
    pub fallback_to_pool: bool,
    pub fallback_to_config: bool,
}

/// Where a resolved key came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    User,
    ChannelPool,
    GlobalPool,
    Config,
}

/// The outcome of a resolution.
#[derive(Default)]
pub struct Resolved {
    pub key: Option<Arc<Secret>>,
    pub source: Option<Source>,
    /// The key's id when it came from a pool (for `report_key_result`).
    pub key_id: Option<Arc<str>>,
    /// A store was skipped because it failed.
    pub degraded: bool,
    /// No key, but a pool key is only cooling down: whole seconds until the first is back.
    pub retry_after_s: Option<u64>,
    /// The user's own key was skipped: it was reported unauthorized.
    pub user_key_rejected: bool,
}

/// Folds a store failure into "not found here, degraded".
fn skip_failed<T>(step: &str, q: &Query, r: Result<T>, degraded: &mut bool) -> Option<T> {
    match r {
        Ok(k) => Some(k),
        Err(e) => {
            let code = e.code();
            tracing::warn!(step, code, user_id = %q.user_id, service = %q.service,
                error = %e, "store failed during resolution; skipping it");
            *degraded = true;
            None
        }
    }
}

/// Runs the resolution order for `q`.
pub async fn resolve(app: &App, q: Query) -> Result<Resolved> {
    // A store known to be down marks every answer, even one it took no part in.
    let mut out = Resolved {
        degraded: app.store.redis_connected() == Some(false),
        ..Resolved::default()
    };
    let found = |mut out: Resolved, key: Arc<Secret>, source, key_id| {
        out.key = Some(key);
        out.source = Some(source);
        out.key_id = key_id;
        out.retry_after_s = None;
        Ok(out)
    };

    let mut q = q;
    let user = app
        .cache_reader
        .user_key(&mut q.user_id, &mut q.service)
        .await;
    match skip_failed("user", &q, user, &mut out.degraded) {
        // Whether the user has a key is unknown (the cache's copy, even expired, is
        // served when there is one): nothing else is handed out in its place, or a
        // user would be served the operator's key and its bill.
        None => return Ok(out),
        Some(UserKey {
            key: Some(k),
            stale,
            ..
        }) => {
            out.degraded |= stale;
            return found(out, k, Source::User, None);
        }
        Some(UserKey {
            rejected, stale, ..
        }) => {
            out.user_key_rejected = rejected;
            out.degraded |= stale;
        }
    }

    if q.fallback_to_pool {
        let scopes = [
            (q.channel_id.clone(), Source::ChannelPool),
            (None, Source::GlobalPool),
        ];
        for (channel, source) in scopes {
            if source == Source::ChannelPool && channel.is_none() {
                continue;
            }
            let pool = PoolRef {
                channel,
                service: q.service.clone(),
            };
            let picked = app.cache_reader.pool_key(&pool).await;
            // A pool whose keys are all cooling or disabled counts as empty; the
            // earliest return is kept in case nothing else is found.
            match skip_failed("pool", &q, picked, &mut out.degraded) {
                Some(Pick::Key { key, key_id }) => return found(out, key, source, Some(key_id)),
                Some(Pick::Cooling { retry_after_s }) => {
                    out.retry_after_s = Some(
                        out.retry_after_s
                            .map_or(retry_after_s, |r| r.min(retry_after_s)),
                    );
                }
                Some(Pick::Empty) | None => {}
            }
        }
    }

    if q.fallback_to_config {
        if let Some(k) = services::env_default(&app.config(), &q.service) {
            return found(out, Arc::new(k), Source::Config, None);
        }
    }

    Ok(out)
}
