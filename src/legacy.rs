//! `apikeyd import-legacy`: moves the original module's per-user keys from Redis into
//! the encrypted keystore, and encrypts pool values it left in clear. Idempotent and
//! safe to interrupt: a Redis field is deleted only after its row is committed.

use std::time::Duration;

use redis::Commands;
use rusqlite::OptionalExtension;

use crate::actors::keystore::{self, store_user_key};
use crate::actors::redis::{envelope, open_value, Changed, Names, PoolValue};
use crate::actors::store::PoolRef;
use crate::clock;
use crate::config::Config;
use crate::crypto::Secret;
use crate::protocol::{check_ident, check_key, check_service};

/// What an import did (or, with `--dry-run`, would do).
#[derive(Default, Debug)]
pub struct Report {
    pub user_keys_moved: usize,
    pub user_keys_already_stored: usize,
    pub pool_values_encrypted: usize,
    pub skipped: usize,
}

fn all_keys(con: &mut redis::Connection, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut keys = con
        .scan_match::<_, String>(pattern)?
        .collect::<redis::RedisResult<Vec<String>>>()?;
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// Every pool hash under the prefix (global and channel), with the pool it stands for.
pub fn pool_hashes(
    con: &mut redis::Connection,
    names: &Names,
) -> redis::RedisResult<Vec<(String, PoolRef)>> {
    let mut hashes = all_keys(con, &format!("{}:global_api_pool:*", names.prefix))?;
    hashes.extend(all_keys(
        con,
        &format!("{}:channel_api_pool:*", names.prefix),
    )?);
    Ok(hashes
        .into_iter()
        .filter_map(|h| pool_of(names, &h).map(|p| (h, p)))
        .collect())
}

/// The pool a hash name stands for, or `None` for a name of another shape.
fn pool_of(names: &Names, hash: &str) -> Option<PoolRef> {
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

/// Runs the import, printing one line per action (never a key).
pub fn import(config: &Config, dry_run: bool) -> Result<Report, String> {
    if config.redis.url.is_empty() {
        return Err("import-legacy needs redis.url in the config".into());
    }
    let opened = keystore::open(config, 1).map_err(|e| e.0)?;
    let db = opened
        .connections
        .into_iter()
        .next()
        .ok_or("no keystore connection")?;
    let master = opened.key;
    let client = crate::actors::redis::client(&config.redis)?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(|e| format!("cannot connect to redis: {e}"))?;
    let _ = con.set_read_timeout(Some(Duration::from_secs(30)));
    let names = Names {
        prefix: config.redis.prefix.clone(),
    };
    let fail = |e: redis::RedisError| format!("redis: {e}");
    let verb = if dry_run { "would move" } else { "moved" };
    let mut report = Report::default();

    for hash in all_keys(&mut con, &format!("{}:user_api_keys:*", names.prefix)).map_err(fail)? {
        let user_id = &hash[names.legacy_user("").len()..];
        let fields: Vec<(String, Vec<u8>)> = con.hgetall(&hash).map_err(fail)?;
        for (field, value) in fields {
            let service = field.to_ascii_lowercase();
            let key = String::from_utf8(value).ok().map(Secret::new);
            let valid =
                check_ident("user_id", user_id, 128).is_ok() && check_service(&service).is_ok();
            let Some(key) = key.filter(|_| valid).and_then(|k| check_key(k).ok()) else {
                println!("skipped {hash} field {field}: user id, service or key does not meet the parameter rules");
                report.skipped += 1;
                continue;
            };
            let present: Option<i64> = db
                .query_row(
                    "SELECT 1 FROM user_keys WHERE user_id = ?1 AND service = ?2",
                    [user_id, service.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| format!("keystore: {e}"))?;
            if present.is_some() {
                println!("user {user_id} service {service}: the keystore already has a key; it is kept and the legacy field dropped");
                report.user_keys_already_stored += 1;
            } else {
                println!("{verb} user {user_id} service {service} into the keystore");
                report.user_keys_moved += 1;
            }
            if dry_run {
                continue;
            }
            if present.is_none() {
                store_user_key(&db, &master, user_id, &service, &key)
                    .map_err(|e| format!("keystore: {e}"))?;
            }
            // Only now, with the row committed, may the clear copy go.
            let changed = Changed::UserKey {
                user_id: user_id.to_string(),
                service: service.clone(),
            };
            redis::pipe()
                .hdel(&hash, &field)
                .publish(
                    names.invalidate(),
                    serde_json::to_string(&changed).unwrap_or_default(),
                )
                .query::<()>(&mut con)
                .map_err(fail)?;
        }
    }

    for (hash, pool) in pool_hashes(&mut con, &names).map_err(fail)? {
        let fields: Vec<(String, Vec<u8>)> = con.hgetall(&hash).map_err(fail)?;
        for (field, value) in fields {
            let PoolValue::Legacy(key) = open_value(&master, &names.prefix, &pool, &field, &value)
            else {
                continue;
            };
            let Ok(key) = check_key(key) else {
                println!("skipped {hash} field {field}: the value does not meet the key rules");
                report.skipped += 1;
                continue;
            };
            report.pool_values_encrypted += 1;
            if dry_run {
                println!("would encrypt {hash} field {field}");
                continue;
            }
            let key_id = master.key_id(&key);
            let info =
                serde_json::json!({"label": "imported", "added_at": clock::now_s()}).to_string();
            let mut pipe = redis::pipe();
            pipe.atomic()
                .hset(
                    &hash,
                    &key_id,
                    envelope(&master, &names.prefix, &pool, &key),
                )
                .hset_nx(names.pool_info(&pool), &key_id, info);
            if field != key_id {
                pipe.hdel(&hash, &field);
            }
            pipe.publish(
                names.invalidate(),
                serde_json::to_string(&Changed::Pool(pool.clone())).unwrap_or_default(),
            );
            pipe.query::<()>(&mut con).map_err(fail)?;
            println!("encrypted {hash} field {field} as key_id {key_id}");
        }
    }
    Ok(report)
}
