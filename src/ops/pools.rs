//! Pools: pick from the global or a channel pool; add, remove and list pool keys (admin).

use serde::Serialize;

use super::messages::cooling_message;
use super::{Params, Reply};
use crate::error::Result;
use crate::keys::Secret;
use crate::model::idempotency::Idem;
use crate::model::pool::{PoolKeyInfo, PoolRef};
use crate::ops::app::App;
use crate::store::cache::{ForgetPool, Pick};
use crate::store::messages::{AddPoolKey, RemovePoolKey};
use crate::wire::protocol::{body, Body, Request, Subject};

/// A pool named by `service` and an optional `channel_id` (`list_pool_keys`).
impl Params for PoolRef {
    fn parse(req: &mut Request) -> Result<Self> {
        let service = req.service()?;
        let channel = req.channel_id()?;
        Ok(PoolRef { channel, service })
    }
}

/// The global pool of `service` (`get_pool_api_key`).
pub(super) struct GlobalPool(PoolRef);

impl Params for GlobalPool {
    fn parse(req: &mut Request) -> Result<Self> {
        Ok(GlobalPool(PoolRef {
            channel: None,
            service: req.service()?,
        }))
    }
}

/// A channel's pool, `channel_id` required (`get_channel_pool_api_key`).
pub(super) struct ChannelPool(PoolRef);

impl Params for ChannelPool {
    fn parse(req: &mut Request) -> Result<Self> {
        let channel = req.required_channel_id()?;
        let service = req.service()?;
        Ok(ChannelPool(PoolRef {
            channel: Some(channel),
            service,
        }))
    }
}

/// One key of a pool (`remove_pool_key`, `enable_pool_key`).
pub(super) struct PoolKey {
    pub pool: PoolRef,
    pub key_id: String,
}

impl Params for PoolKey {
    fn parse(req: &mut Request) -> Result<Self> {
        let service = req.service()?;
        let key_id = req.key_id()?;
        let channel = req.channel_id()?;
        Ok(PoolKey {
            pool: PoolRef { channel, service },
            key_id,
        })
    }
}

/// `add_pool_key`'s parameters.
pub(super) struct NewPoolKey {
    pool: PoolRef,
    key: Secret,
    label: Option<String>,
}

impl Params for NewPoolKey {
    fn parse(req: &mut Request) -> Result<Self> {
        let service = req.service()?;
        let key = req.key()?;
        let channel = req.channel_id()?;
        let label = req.label()?;
        Ok(NewPoolKey {
            pool: PoolRef { channel, service },
            key,
            label,
        })
    }
}

#[derive(Serialize)]
struct Picked<'a> {
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

async fn pick(app: &App, pool: PoolRef) -> Result<Body> {
    let none = Picked {
        key: None,
        key_id: None,
        retry_after_s: None,
        message: None,
    };
    match app.cache_reader.pool_key(&pool).await? {
        Pick::Key { key, key_id } => body(&Picked {
            key: Some(key.expose()),
            key_id: Some(&key_id),
            ..none
        }),
        Pick::Empty => body(&none),
        Pick::Cooling { retry_after_s } => body(&Picked {
            retry_after_s: Some(retry_after_s),
            message: Some(cooling_message(&app.config(), &pool.service, retry_after_s)),
            ..none
        }),
    }
}

/// `{"op":"get_pool_api_key","service":"openai"}` → `{"key":"sk-…","key_id":"3f2a9c0e12ab45cd"}`,
/// `{"key":null}`, or while every key is cooling down
/// `{"key":null,"retry_after_s":42,"message":"Every pool key for OpenAI …"}`
pub async fn get_pool_api_key(app: &App, GlobalPool(pool): GlobalPool) -> Result<Body> {
    pick(app, pool).await
}

/// `{"op":"get_channel_pool_api_key","channel_id":"c1","service":"openai"}` →
/// `{"key":"sk-…","key_id":"3f2a9c0e12ab45cd"}` (or null; as `get_pool_api_key`)
pub async fn get_channel_pool_api_key(app: &App, ChannelPool(pool): ChannelPool) -> Result<Body> {
    pick(app, pool).await
}

/// `{"op":"add_pool_key","service":"openai","key":"sk-…","channel_id":"c1","label":"donated by ana"}` →
/// `{"key_id":"3f2a9c0e12ab45cd","added":true}`
/// The key_id it gets is noted in `subject` for the audit line.
pub async fn add_pool_key(
    app: &App,
    p: NewPoolKey,
    idem: Option<Idem>,
    subject: &mut Subject,
) -> Result<Reply> {
    let NewPoolKey { pool, key, label } = p;
    let written = app
        .store
        .add_pool_key(AddPoolKey {
            pool: pool.clone(),
            key,
            label,
            idem,
        })
        .await?;
    let (key_id, added) = &written.value;
    subject.key_id = Some(key_id.clone());
    tracing::info!(op = "add_pool_key", channel_id = ?pool.channel, service = %pool.service,
        key_id = %key_id, added, replayed = written.replayed, "pool key added");
    app.cache.send(ForgetPool { pool }).await?;
    let answer = body(&serde_json::json!({ "key_id": key_id, "added": added }))?;
    Ok(Reply::of(&written, answer))
}

/// `{"op":"remove_pool_key","service":"openai","key_id":"3f2a9c0e12ab45cd"}` → `{"removed":true}`
pub async fn remove_pool_key(app: &App, p: PoolKey, idem: Option<Idem>) -> Result<Reply> {
    let PoolKey { pool, key_id } = p;
    let written = app
        .store
        .remove_pool_key(RemovePoolKey {
            pool: pool.clone(),
            key_id: key_id.clone(),
            idem,
        })
        .await?;
    let removed = written.value;
    tracing::info!(op = "remove_pool_key", channel_id = ?pool.channel, service = %pool.service,
        key_id = %key_id, removed, replayed = written.replayed, "pool key removed");
    app.cache.send(ForgetPool { pool }).await?;
    let answer = body(&serde_json::json!({ "removed": removed }))?;
    Ok(Reply::of(&written, answer))
}

/// `{"op":"list_pool_keys","service":"openai"}` →
/// `{"keys":[{"key_id":"3f2a9c0e12ab45cd","masked":"sk-a…1234","label":null,"added_at":"2026-11-28T12:00:00Z",
/// "state":"active","cooling_until":null,"picks":12,"ok":10,"rate_limited":1,"unauthorized":0,"errors":0}]}`
pub async fn list_pool_keys(app: &App, pool: PoolRef) -> Result<Body> {
    #[derive(Serialize)]
    struct Answer {
        keys: Vec<PoolKeyInfo>,
    }
    let keys = app.store.list_pool_keys(pool).await?;
    body(&Answer { keys })
}
