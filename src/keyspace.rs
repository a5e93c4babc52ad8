//! The Redis keyspace as the tools see it: scanning the hashes under the prefix,
//! skipping stray keys of other types, and mapping a pool hash's name back to its
//! pool. Used by import-legacy, rotate-master-key and the fleet's key check.

use redis::Commands;

use crate::actors::redis::Names;
use crate::actors::store::PoolRef;

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
    let start = names.legacy_user("").len();
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
