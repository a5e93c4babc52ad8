//! Daily default-key quotas: check, increment, and the atomic consume.

use serde::Serialize;

use super::{is_false, Params, Reply};
use crate::error::{Error, Result};
use crate::model::idempotency::Idem;
use crate::ops::app::App;
use crate::process::config::OnStoreError;
use crate::store::messages::{ConsumeUsage, IncrementUsage, ReadUsage};
use crate::wire::protocol::{body, Body, Request};

#[derive(Serialize)]
struct Verdict {
    allowed: bool,
    current_count: u64,
    daily_limit: u64,
    #[serde(skip_serializing_if = "is_false")]
    degraded: bool,
}

/// The parameters of a check or consume.
pub(super) struct Usage {
    user_id: String,
    tool_name: String,
    /// `None`: the configured `quota.daily_limit`.
    daily_limit: Option<u64>,
}

impl Params for Usage {
    fn parse(req: &mut Request) -> Result<Self> {
        Ok(Usage {
            user_id: req.user_id()?,
            tool_name: req.tool_name()?,
            daily_limit: req.daily_limit()?,
        })
    }
}

impl Usage {
    fn limit(&self, app: &App) -> u64 {
        self.daily_limit
            .unwrap_or_else(|| app.config().quota.daily_limit)
    }
}

/// The parameters of an increment.
pub(super) struct Counter {
    user_id: String,
    tool_name: String,
}

impl Params for Counter {
    fn parse(req: &mut Request) -> Result<Self> {
        Ok(Counter {
            user_id: req.user_id()?,
            tool_name: req.tool_name()?,
        })
    }
}

/// The answer when the quota store failed: `quota.on_store_error` decides.
fn degraded(app: &App, e: Error, daily_limit: u64) -> Result<Body> {
    tracing::warn!(code = e.code(), error = %e, "quota store failed; answering per quota.on_store_error");
    let allowed = app.config().quota.on_store_error == OnStoreError::Allow;
    if !allowed {
        app.metrics.quota_denied();
    }
    body(&Verdict {
        allowed,
        current_count: 0,
        daily_limit,
        degraded: true,
    })
}

/// `{"op":"check_default_key_limit","user_id":"u1","tool_name":"web_search"}` →
/// `{"allowed":true,"current_count":3,"daily_limit":20}`
pub async fn check_default_key_limit(app: &App, p: Usage) -> Result<Body> {
    let daily_limit = p.limit(app);
    let Usage {
        user_id, tool_name, ..
    } = p;
    match app.store.read_usage(ReadUsage { user_id, tool_name }).await {
        Ok(current_count) => {
            let allowed = current_count < daily_limit;
            if !allowed {
                app.metrics.quota_denied();
            }
            body(&Verdict {
                allowed,
                current_count,
                daily_limit,
                degraded: false,
            })
        }
        Err(e) => degraded(app, e, daily_limit),
    }
}

/// `{"op":"increment_default_key_usage","user_id":"u1","tool_name":"web_search"}` → `{"count":4}`
pub async fn increment_default_key_usage(
    app: &App,
    p: Counter,
    idem: Option<Idem>,
) -> Result<Reply> {
    let Counter { user_id, tool_name } = p;
    let count = app
        .store
        .increment_usage(IncrementUsage {
            user_id,
            tool_name,
            idem,
        })
        .await?;
    Ok(Reply::of(
        &count,
        body(&serde_json::json!({ "count": count.value }))?,
    ))
}

/// `{"op":"consume_default_key_usage","user_id":"u1","tool_name":"web_search","daily_limit":5}` →
/// `{"allowed":true,"current_count":4,"daily_limit":5}` (the count after the call)
pub async fn consume_default_key_usage(app: &App, p: Usage, idem: Option<Idem>) -> Result<Reply> {
    let limit = p.limit(app);
    let Usage {
        user_id, tool_name, ..
    } = p;
    match app
        .store
        .consume_usage(ConsumeUsage {
            user_id,
            tool_name,
            limit,
            idem,
        })
        .await
    {
        Ok(written) => {
            let (allowed, current_count) = written.value;
            if !allowed {
                app.metrics.quota_denied();
            }
            let verdict = body(&Verdict {
                allowed,
                current_count,
                daily_limit: limit,
                degraded: false,
            })?;
            Ok(Reply::of(&written, verdict))
        }
        // Not store failures: the key was used for another request, or the records
        // are full (the client must know that this write was refused, not counted).
        Err(e @ (Error::IdempotencyConflict | Error::IdempotencyFull(_))) => Err(e),
        // Nothing was applied (nor recorded): a retry with the same key counts.
        Err(e) => degraded(app, e, limit).map(Reply::from),
    }
}
