//! The Redis key layout: every key name under `redis.prefix` (`Names`), the pub/sub
//! message that announces changes, and the inverse for the tools — scanning the
//! hashes under the prefix, skipping stray keys of other types, and mapping a pool
//! hash's name back to its pool.

use redis::Commands;

use crate::model::pool::PoolRef;

/// Key names under `redis.prefix` (docs/operations.md lists them).
#[derive(Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    /// `{prefix}:global_api_pool:{service}` or `{prefix}:channel_api_pool:{channel}:{service}`.
    pub fn pool(&self, pool: &PoolRef) -> String {
        match &pool.channel {
            None => format!("{}:global_api_pool:{}", self.prefix, pool.service),
            Some(c) => format!("{}:channel_api_pool:{c}:{}", self.prefix, pool.service),
        }
    }

    /// Labels and times of pool keys: `{prefix}:apikeyd:pool_info:{pool hash without prefix}`.
    pub fn pool_info(&self, pool: &PoolRef) -> String {
        let hash = self.pool(pool);
        format!(
            "{}:apikeyd:pool_info:{}",
            self.prefix,
            &hash[self.prefix.len() + 1..]
        )
    }

    /// Health of pool keys, field = key_id, value = JSON of `Health`:
    /// `{prefix}:apikeyd:pool_health:{pool hash without prefix}`.
    pub fn pool_health(&self, pool: &PoolRef) -> String {
        let hash = self.pool(pool);
        format!(
            "{}:apikeyd:pool_health:{}",
            self.prefix,
            &hash[self.prefix.len() + 1..]
        )
    }

    /// A day's counters of a pool's keys, field = `{key_id}:{counter}`:
    /// `{prefix}:apikeyd:pool_counts:{day}:{pool hash without prefix}`; expires after
    /// `COUNTER_DAYS`.
    pub fn pool_counts(&self, day: &str, pool: &PoolRef) -> String {
        let hash = self.pool(pool);
        format!(
            "{}:apikeyd:pool_counts:{day}:{}",
            self.prefix,
            &hash[self.prefix.len() + 1..]
        )
    }

    /// Today's counters of one user, field = tool: `{prefix}:apikeyd:usage:{day}:{user_id}`.
    pub fn usage(&self, day: &str, user_id: &str) -> String {
        format!("{}:apikeyd:usage:{day}:{user_id}", self.prefix)
    }

    /// The per-user key hash: `{prefix}:user_api_keys:{user_id}`, field = service.
    /// The original module wrote keys here in clear; with `keystore.user_keys =
    /// "redis"` the daemon's sealed user keys live here.
    pub fn user_keys(&self, user_id: &str) -> String {
        format!("{}:user_api_keys:{user_id}", self.prefix)
    }

    /// When each of a user's keys was stored, field = service, value = unix seconds:
    /// `{prefix}:apikeyd:user_info:{user_id}`.
    pub fn user_info(&self, user_id: &str) -> String {
        format!("{}:apikeyd:user_info:{user_id}", self.prefix)
    }

    /// The client uid that stored each of a user's keys, field = service:
    /// `{prefix}:apikeyd:user_owner:{user_id}`.
    pub fn user_owner(&self, user_id: &str) -> String {
        format!("{}:apikeyd:user_owner:{user_id}", self.prefix)
    }

    /// A user's keys reported unauthorized, field = service, value = unix seconds:
    /// `{prefix}:apikeyd:user_rejected:{user_id}`.
    pub fn user_rejected(&self, user_id: &str) -> String {
        format!("{}:apikeyd:user_rejected:{user_id}", self.prefix)
    }

    /// The fleet's master-key check values, field `v{N}` per version, and `retired`:
    /// `{prefix}:apikeyd:keycheck`.
    pub fn keycheck(&self) -> String {
        format!("{}:apikeyd:keycheck", self.prefix)
    }

    /// The set of fleet members' ids, so heartbeats are found without a SCAN of the
    /// whole keyspace: `{prefix}:apikeyd:fleet`.
    pub fn fleet(&self) -> String {
        format!("{}:apikeyd:fleet", self.prefix)
    }

    /// One live daemon's heartbeat (expires): `{prefix}:apikeyd:fleet:{member}`.
    pub fn fleet_member(&self, member: &str) -> String {
        format!("{}:apikeyd:fleet:{member}", self.prefix)
    }

    /// The record of one write sent with an idempotency key (a string that expires):
    /// `{prefix}:apikeyd:idempotency:{uid}:{key}`.
    pub fn idempotency(&self, uid: u32, key: &str) -> String {
        format!("{}:apikeyd:idempotency:{uid}:{key}", self.prefix)
    }

    /// The start of the names of the counters of idempotency records written with TTL
    /// `ttl_s`, one per window of `ttl_s` seconds (the daemons' clocks), each named by the
    /// window's number after this start: `{prefix}:apikeyd:idempotency-count:{ttl_s}:`.
    pub fn idempotency_count(&self, ttl_s: u64) -> String {
        format!("{}:apikeyd:idempotency-count:{ttl_s}:", self.prefix)
    }

    /// When `import-legacy` first sealed the values left in clear (unix seconds):
    /// `{prefix}:apikeyd:legacy_cutover`. From then on a value in clear is tampering.
    pub fn legacy_cutover(&self) -> String {
        format!("{}:apikeyd:legacy_cutover", self.prefix)
    }

    /// The pub/sub channel announcing changes: `{prefix}:apikeyd:invalidate`.
    pub fn invalidate(&self) -> String {
        format!("{}:apikeyd:invalidate", self.prefix)
    }
}

/// What a pub/sub message on the invalidation channel says changed.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Changed {
    Pool(PoolRef),
    UserKey { user_id: String, service: String },
}

/// Every hash whose name matches `pattern`. A key of another type under the
/// pattern (a stray `SET`) is skipped with a warning naming it, so it never stops
/// a tool half-way.
pub fn all_hashes(con: &mut redis::Connection, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let raw = con
        .scan_match::<_, Vec<u8>>(pattern)?
        .collect::<redis::RedisResult<Vec<Vec<u8>>>>()?;
    let mut keys = Vec::with_capacity(raw.len());
    for k in raw {
        match String::from_utf8(k) {
            Ok(k) => keys.push(k),
            Err(e) => eprintln!(
                "warning: skipping {} (its name is not UTF-8): it is not an apikeyd value",
                String::from_utf8_lossy(e.as_bytes()).escape_debug()
            ),
        }
    }
    keys.sort();
    keys.dedup();
    let mut hashes = Vec::with_capacity(keys.len());
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query(con)?;
        match kind.as_str() {
            "hash" => hashes.push(k),
            // Gone since the scan: nothing to do.
            "none" => {}
            other => eprintln!(
                "warning: skipping {} (a {other}, not a hash): it is not an apikeyd value; remove it if nothing else uses it",
                k.escape_debug()
            ),
        }
    }
    Ok(hashes)
}

/// Every per-user hash under the prefix (`{prefix}:user_api_keys:{user_id}`), with
/// its user id.
pub fn user_hashes(
    con: &mut redis::Connection,
    names: &Names,
) -> redis::RedisResult<Vec<(String, String)>> {
    let start = names.user_keys("").len();
    Ok(
        all_hashes(con, &format!("{}:user_api_keys:*", names.prefix))?
            .into_iter()
            .map(|h| {
                let user = h[start..].to_string();
                (h, user)
            })
            .collect(),
    )
}

/// Every pool hash under the prefix (global and channel), with the pool it stands for.
pub fn pool_hashes(
    con: &mut redis::Connection,
    names: &Names,
) -> redis::RedisResult<Vec<(String, PoolRef)>> {
    let mut hashes = all_hashes(con, &format!("{}:global_api_pool:*", names.prefix))?;
    hashes.extend(all_hashes(
        con,
        &format!("{}:channel_api_pool:*", names.prefix),
    )?);
    Ok(hashes
        .into_iter()
        .filter_map(|h| pool_of(names, &h).map(|p| (h, p)))
        .collect())
}

/// The pool a hash name stands for, or `None` for a name of another shape.
pub fn pool_of(names: &Names, hash: &str) -> Option<PoolRef> {
    let rest = hash.strip_prefix(&names.prefix)?.strip_prefix(':')?;
    if let Some(service) = rest.strip_prefix("global_api_pool:") {
        return Some(PoolRef {
            channel: None,
            service: service.to_string(),
        });
    }
    // A service has no ':', so the last one separates it from the channel id.
    let (channel, service) = rest.strip_prefix("channel_api_pool:")?.rsplit_once(':')?;
    Some(PoolRef {
        channel: Some(channel.to_string()),
        service: service.to_string(),
    })
}
