//! The resolution order of SPEC §1: user key → channel pool → global pool → config
//! default. A store that fails is skipped and the answer marked degraded.

use std::sync::Arc;

use crate::actors::store::PoolRef;
use crate::app::App;
use crate::crypto::Secret;
use crate::error::Result;
use crate::services;

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
pub struct Resolved {
    pub key: Option<Arc<Secret>>,
    pub source: Option<Source>,
    /// A store was skipped because it failed.
    pub degraded: bool,
}

/// Folds a store failure into "not found here, degraded".
fn skip_failed(
    step: &str,
    q: &Query,
    r: Result<Option<Arc<Secret>>>,
    degraded: &mut bool,
) -> Option<Arc<Secret>> {
    match r {
        Ok(k) => k,
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
    let mut degraded = app.store.redis_connected() == Some(false);
    let found = |key: Arc<Secret>, source, degraded| Resolved {
        key: Some(key),
        source: Some(source),
        degraded,
    };

    let mut q = q;
    let user = app.user_key(&mut q.user_id, &mut q.service).await;
    if let Some(k) = skip_failed("user", &q, user, &mut degraded) {
        return Ok(found(k, Source::User, degraded));
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
            let picked = app.pool_key(pool).await;
            if let Some(k) = skip_failed("pool", &q, picked, &mut degraded) {
                return Ok(found(k, source, degraded));
            }
        }
    }

    if q.fallback_to_config {
        if let Some(k) = services::env_default(&app.config(), &q.service) {
            return Ok(found(Arc::new(k), Source::Config, degraded));
        }
    }

    Ok(Resolved {
        key: None,
        source: None,
        degraded,
    })
}
