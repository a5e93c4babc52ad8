//! Pool key health: clients report how a key they were handed fared
//! (`report_key_result`); admins put a disabled key back (`enable_pool_key`).

use serde::Serialize;

use super::pools::PoolKey;
use super::{Params, Reply};
use crate::error::{Error, Result};
use crate::model::clock;
use crate::model::idempotency::Idem;
use crate::model::pool::{HealthRules, KeyState, Outcome, PoolRef};
use crate::ops::app::App;
use crate::process::access::{Peer, Role};
use crate::store::cache::{ForgetPool, ForgetUserKey};
use crate::store::messages::ReportUserKey;
use crate::store::messages::{EnablePoolKey, ReportPoolKey};
use crate::wire::protocol::{body, Request};

/// `report_key_result`'s parameters.
pub(super) struct Report {
    service: String,
    outcome: Outcome,
    retry_after_s: Option<u64>,
    key: Reported,
}

/// Which key a report is about.
enum Reported {
    /// The user's own key for the service.
    User(String),
    /// A pool key, looked up in the channel's pool first when a channel is given.
    Pool {
        key_id: String,
        channel: Option<String>,
    },
}

impl Params for Report {
    fn parse(req: &mut Request) -> Result<Self> {
        let service = req.service()?;
        let by_user = req.has_user_id();
        if by_user && req.has_key_id() {
            return Err(Error::BadRequest(
                "give either `key_id` (a pool key) or `user_id` (that user's own key), not both"
                    .into(),
            ));
        }
        if !by_user && !req.has_key_id() {
            return Err(Error::param(
                "key_id",
                "is missing (or give `user_id` to report on that user's own key)",
            ));
        }
        let outcome = Outcome::parse(&req.outcome()?).ok_or_else(|| {
            Error::param(
                "outcome",
                "must be one of \"ok\", \"rate_limited\", \"unauthorized\", \"error\"",
            )
        })?;
        let retry_after_s = req.retry_after_s()?;
        let key = if by_user {
            Reported::User(req.user_id()?)
        } else {
            Reported::Pool {
                key_id: req.key_id()?,
                channel: req.channel_id()?,
            }
        };
        Ok(Report {
            service,
            outcome,
            retry_after_s,
            key,
        })
    }
}

#[derive(Serialize)]
struct Recorded {
    recorded: bool,
    state: Option<KeyState>,
    cooling_until: Option<i64>,
}

const UNKNOWN: Recorded = Recorded {
    recorded: false,
    state: None,
    cooling_until: None,
};

/// `{"op":"report_key_result","service":"openai","key_id":"3f2a9c0e12ab45cd","outcome":"rate_limited","retry_after_s":30}` →
/// `{"recorded":true,"state":"cooling","cooling_until":1764331230}`
///
/// `{"op":"report_key_result","service":"openai","user_id":"u1","outcome":"unauthorized"}` →
/// `{"recorded":true,"state":"disabled","cooling_until":null}`
///
/// With `channel_id`, the key is looked up in that channel's pool, then in the global
/// pool (a channel lookup may have fallen through to it). An unknown key (or a user
/// without a key for the service) answers `{"recorded":false,"state":null,…}`.
///
/// Bounded, so that one client cannot take keys out of service for long: a
/// `retry_after_s` above `pools.max_cooldown_s` counts as that maximum, and
/// `unauthorized` on a user's key is only taken from the uid that stored it (or an
/// admin), else `forbidden`. Reports are counted per client uid (metrics).
pub async fn report_key_result(
    app: &App,
    report: Report,
    idem: Option<Idem>,
    peer: &Peer,
) -> Result<Reply> {
    let Report {
        service,
        outcome,
        retry_after_s,
        key,
    } = report;
    app.metrics.key_reported(peer.uid);
    let (key_id, channel) = match key {
        Reported::User(user_id) => {
            let reporter = (peer.role != Role::Admin).then_some(peer.uid);
            return report_user_key(app, user_id, service, outcome, idem, reporter).await;
        }
        Reported::Pool { key_id, channel } => (key_id, channel),
    };
    let config = app.config();
    let rules = HealthRules {
        cooldown_s: config.pools.cooldown_s,
        error_threshold: config.pools.error_threshold,
    };
    let retry_after_s = retry_after_s.map(|s| s.min(config.pools.max_cooldown_s));
    drop(config);
    for channel in channel.map(Some).into_iter().chain([None]) {
        let pool = PoolRef {
            channel,
            service: service.clone(),
        };
        // Each try looks for the record first: a report applied to the global pool
        // is replayed by the channel's try already.
        let reported = app
            .store
            .report_pool_key(ReportPoolKey {
                pool: pool.clone(),
                key_id: key_id.clone(),
                outcome,
                retry_after_s,
                rules,
                idem: idem.clone(),
            })
            .await?;
        let Some(health) = reported.value else {
            continue;
        };
        let now = clock::now_s();
        let state = health.state(now);
        if outcome != Outcome::Ok {
            tracing::info!(op = "report_key_result", channel_id = ?pool.channel, service = %pool.service,
                key_id = %key_id, outcome = outcome.counter(), state = ?state, "pool key reported");
        }
        if state != KeyState::Active {
            // Other daemons hear of it through Redis; this one drops its copy now.
            app.cache.send(ForgetPool { pool }).await?;
        }
        let answer = body(&Recorded {
            recorded: true,
            state: Some(state),
            cooling_until: health.cooling_until(now),
        })?;
        return Ok(Reply {
            body: answer,
            replayed: reported.replayed,
        });
    }
    body(&UNKNOWN).map(Reply::from)
}

/// A report on a user's own key: only `unauthorized` changes anything (the key is
/// skipped until the user stores a new one).
async fn report_user_key(
    app: &App,
    user_id: String,
    service: String,
    outcome: Outcome,
    idem: Option<Idem>,
    reporter: Option<u32>,
) -> Result<Reply> {
    let unauthorized = outcome == Outcome::Unauthorized;
    let written = app
        .user_keys
        .report(ReportUserKey {
            user_id: user_id.clone(),
            service: service.clone(),
            unauthorized,
            idem,
            reporter,
        })
        .await?;
    let Some(rejected) = written.value else {
        return body(&UNKNOWN).map(Reply::from);
    };
    if unauthorized {
        tracing::info!(op = "report_key_result", user_id = %user_id, service = %service,
            "user key reported unauthorized; skipped until the user stores a new one");
        app.cache.send(ForgetUserKey { user_id, service }).await?;
    }
    let answer = body(&Recorded {
        recorded: true,
        state: Some(if rejected {
            KeyState::Disabled
        } else {
            KeyState::Active
        }),
        cooling_until: None,
    })?;
    Ok(Reply::of(&written, answer))
}

/// `{"op":"enable_pool_key","service":"openai","key_id":"3f2a9c0e12ab45cd","channel_id":"c1"}` →
/// `{"enabled":true}`: the key is active again (no longer disabled or cooling). `false`
/// when that pool has no such key. Admins only.
pub async fn enable_pool_key(app: &App, p: PoolKey, idem: Option<Idem>) -> Result<Reply> {
    let PoolKey { pool, key_id } = p;
    let written = app
        .store
        .enable_pool_key(EnablePoolKey {
            pool: pool.clone(),
            key_id: key_id.clone(),
            idem,
        })
        .await?;
    let enabled = written.value;
    tracing::info!(op = "enable_pool_key", channel_id = ?pool.channel, service = %pool.service,
        key_id = %key_id, enabled, "pool key enabled");
    app.cache.send(ForgetPool { pool }).await?;
    let answer = body(&serde_json::json!({ "enabled": enabled }))?;
    Ok(Reply::of(&written, answer))
}
