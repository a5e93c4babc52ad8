//! `apikeyd migrate-user-keys --to redis|local`: moves every per-user key between
//! this daemon's SQLite keystore and Redis (`{prefix}:user_api_keys:{user_id}`).
//! Idempotent and safe to kill at any point: a source copy is removed only after
//! its target copy was read back and opens to exactly what was copied, and only if
//! it still holds what was read (a newer write wins). Where both sides hold
//! different keys, the newer by write time wins: an older target is replaced, an
//! older source is kept; either way the conflict is listed and the run exits 1.

use redis::Commands;
use rusqlite::{params, Connection, OptionalExtension};

use crate::keys::{MasterKey, Place, Secret};
use crate::process::config::Config;
use crate::store::envelope::{open_user_value, user_envelope, StoredValue};
use crate::store::keyspace::{Changed, Names};
use crate::store::keystore::{self, store_user_key};

/// Why a migration stopped; rerunning carries on. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migrate-user-keys needs redis.url in the config")]
    NoRedis,
    #[error(transparent)]
    Access(#[from] crate::process::lock::ToolAccessError),
    #[error(transparent)]
    Open(#[from] keystore::KeystoreError),
    #[error("no keystore connection")]
    NoConnection,
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("keystore: {0}")]
    Keystore(#[from] rusqlite::Error),
    /// Storing a user key failed (the keystore's own error, as the wire would say it).
    #[error("keystore: {0}")]
    Store(#[from] crate::error::Error),
    #[error(
        "only {acked} of {wanted} replicas confirmed the batch (redis.min_replicas_acked); nothing was removed from the source; rerun"
    )]
    Replicas { acked: u32, wanted: u32 },
}

/// Rows moved per batch (one SQLite transaction, a few Redis pipelines).
const BATCH: usize = 500;

/// Where the keys go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Destination {
    /// Sealed in `{prefix}:user_api_keys:{user_id}`.
    Redis,
    /// The SQLite keystore of this daemon.
    Local,
}

/// What a run did.
#[derive(Default, Debug)]
pub struct Report {
    /// Copied to the target, verified, and removed from the source.
    pub moved: usize,
    /// The target already held a key (from an interrupted run, or newer): the
    /// source copy was removed.
    pub already_in_target: usize,
    /// Values in clear in Redis (the original module's): left for `import-legacy`.
    pub left_in_clear: usize,
    /// Values that open with no key version: left as they are.
    pub unreadable: usize,
    /// Keys both sides held, different (each listed): the newer one by write time
    /// was kept or copied over the older; an older source stays where it is.
    pub conflicts: usize,
}

/// Lists one conflict: both sides hold a key for (user, service), and they differ.
fn conflict(report: &mut Report, user_id: &str, service: &str, what: &str) {
    report.conflicts += 1;
    println!(
        "conflict: user {} service {}: {what}",
        user_id.escape_debug(),
        service.escape_debug()
    );
}

/// Writes a sealed user key into Redis only while its field still holds what was
/// read (ARGV[4], '' for none), after [`crate::store::envelope::RETIRED_GUARD`]: KEYS[2]
/// the user hash, KEYS[3] its info, KEYS[4] its rejected marks, KEYS[5] its owners;
/// ARGV[2] service, ARGV[3] the value, ARGV[5] its write time, ARGV[6] '1' when
/// rejected, ARGV[7] channel, ARGV[8] message. Answers 1 when written.
const COPY_SCRIPT: &str = r"
if (redis.call('HGET', KEYS[2], ARGV[2]) or '') ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[5])
if ARGV[6] == '1' then redis.call('HSET', KEYS[4], ARGV[2], ARGV[5]) else redis.call('HDEL', KEYS[4], ARGV[2]) end
redis.call('HDEL', KEYS[5], ARGV[2])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return 1
";

/// Runs (or resumes) a migration, printing progress and counts (never a key).
pub fn migrate(config: &Config, to: Destination) -> Result<Report, MigrateError> {
    if config.redis.url.is_empty() {
        return Err(MigrateError::NoRedis);
    }
    let (_held, mut db, master) = super::open_keystore(
        config,
        "migrate-user-keys",
        false,
        &|| Ok(()),
        MigrateError::NoConnection,
    )?;
    let mut con = crate::fleet::connect(&config.redis, crate::fleet::TOOL_WAIT)?;
    let names = Names {
        prefix: config.redis.prefix.clone(),
    };
    // Values sealed here must open on every daemon of the fleet.
    crate::fleet::verify(&mut con, &names, &master)?;
    let replicas = config.redis.replicas_to_wait_for();
    let ctx = Ctx {
        master: &master,
        names: &names,
        replicas,
        wait_ms: config.redis.timeout_ms.max(1000),
    };
    match to {
        Destination::Redis => to_redis(&ctx, &mut db, &mut con),
        Destination::Local => to_local(&ctx, &mut db, &mut con),
    }
}

struct Ctx<'a> {
    master: &'a MasterKey,
    names: &'a Names,
    replicas: u32,
    wait_ms: u64,
}

/// The user key stored in the keystore for (user, service), opened; `None` when
/// there is none or it does not open. Read in the import transaction and again,
/// committed, before the Redis copy may go.
fn stored_key(
    db: &Connection,
    master: &MasterKey,
    user_id: &str,
    service: &str,
) -> Result<Option<Secret>, MigrateError> {
    let sealed: Option<Vec<u8>> = db
        .prepare_cached("SELECT sealed FROM user_keys WHERE user_id = ?1 AND service = ?2")
        .and_then(|mut s| {
            s.query_row(params![user_id, service], |r| r.get(0))
                .optional()
        })?;
    Ok(sealed.and_then(|s| master.open(&s, Place::User { user_id, service }).ok()))
}

fn announce(user_id: &str, service: &str) -> String {
    serde_json::to_string(&Changed::UserKey {
        user_id: user_id.to_string(),
        service: service.to_string(),
    })
    .unwrap_or_default()
}

impl Ctx<'_> {
    /// Whether `value` (from the user hash) opens to exactly `plain`.
    fn opens_to(&self, user_id: &str, service: &str, value: &[u8], plain: &Secret) -> bool {
        matches!(
            open_user_value(self.master, &self.names.prefix, user_id, service, value),
            StoredValue::Sealed(k) if k.expose() == plain.expose()
        )
    }

    /// With replicas asked for, waits until they hold what this connection wrote.
    fn wait_for_replicas(&self, con: &mut redis::Connection) -> Result<(), MigrateError> {
        if self.replicas == 0 {
            return Ok(());
        }
        let acked: u32 = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(self.wait_ms)
            .query(con)?;
        if acked < self.replicas {
            return Err(MigrateError::Replicas {
                acked,
                wanted: self.replicas,
            });
        }
        Ok(())
    }
}

/// One keystore row on its way to Redis.
struct Row {
    user_id: String,
    service: String,
    sealed: Vec<u8>,
    updated_at: i64,
    rejected: bool,
    plain: Secret,
}

fn to_redis(
    ctx: &Ctx<'_>,
    db: &mut Connection,
    con: &mut redis::Connection,
) -> Result<Report, MigrateError> {
    let mut report = Report::default();
    let mut after = (String::new(), String::new());
    loop {
        let raw: Vec<(String, String, Vec<u8>, i64, bool)> = {
            let mut stmt = db.prepare_cached(
                "SELECT k.user_id, k.service, k.sealed, k.updated_at,
                       EXISTS (SELECT 1 FROM user_key_rejected r
                               WHERE r.user_id = k.user_id AND r.service = k.service)
                     FROM user_keys k WHERE (k.user_id, k.service) > (?1, ?2)
                     ORDER BY k.user_id, k.service LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![after.0, after.1, BATCH as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(last) = raw.last() else { break };
        after = (last.0.clone(), last.1.clone());
        let mut rows = Vec::with_capacity(raw.len());
        for (user_id, service, sealed, updated_at, rejected) in raw {
            let place = Place::User {
                user_id: &user_id,
                service: &service,
            };
            let Ok(plain) = ctx.master.open(&sealed, place) else {
                eprintln!("integrity: the keystore row of user {user_id} service {service} does not open; left as it is");
                report.unreadable += 1;
                continue;
            };
            rows.push(Row {
                user_id,
                service,
                sealed,
                updated_at,
                rejected,
                plain,
            });
        }
        // What Redis holds now for each row, and when it was written.
        let mut read = redis::pipe();
        for r in &rows {
            read.hget(ctx.names.user_keys(&r.user_id), &r.service)
                .hget(ctx.names.user_info(&r.user_id), &r.service);
        }
        let before: Vec<(Option<Vec<u8>>, Option<i64>)> = {
            let flat: Vec<redis::Value> = read.query(con)?;
            flat.chunks(2)
                .map(|p| {
                    let value = redis::from_redis_value(p[0].clone()).ok().flatten();
                    let at = redis::from_redis_value(p[1].clone()).ok().flatten();
                    (value, at)
                })
                .collect()
        };
        let copy = redis::Script::new(&format!(
            "{}{COPY_SCRIPT}",
            crate::store::envelope::RETIRED_GUARD
        ));
        let mut written = 0;
        let mut already = Vec::with_capacity(rows.len());
        for (r, (held, held_at)) in rows.iter().zip(&before) {
            let there = held.as_deref().and_then(|v| {
                match open_user_value(ctx.master, &ctx.names.prefix, &r.user_id, &r.service, v) {
                    StoredValue::Sealed(k) => Some(k),
                    _ => None,
                }
            });
            match there {
                Some(k) if k.expose() == r.plain.expose() => {
                    already.push(true);
                    continue;
                }
                Some(_) if held_at.unwrap_or(0) >= r.updated_at => {
                    conflict(&mut report, &r.user_id, &r.service,
                        "redis holds a different key stored at the same time or later; it is kept, and so is the keystore's");
                    already.push(false);
                    continue;
                }
                Some(_) => conflict(
                    &mut report,
                    &r.user_id,
                    &r.service,
                    "redis held an older, different key; the keystore's newer key replaces it",
                ),
                None => {}
            }
            already.push(false);
            let value = user_envelope(
                ctx.master,
                &ctx.names.prefix,
                &r.user_id,
                &r.service,
                &r.plain,
            );
            let mut call = copy.prepare_invoke();
            call.key(ctx.names.keycheck())
                .key(ctx.names.user_keys(&r.user_id))
                .key(ctx.names.user_info(&r.user_id))
                .key(ctx.names.user_rejected(&r.user_id))
                .key(ctx.names.user_owner(&r.user_id))
                .arg(crate::store::envelope::envelope_version(value.as_bytes()))
                .arg(&r.service)
                .arg(&value)
                .arg(held.as_deref().unwrap_or(b""))
                .arg(r.updated_at)
                .arg(if r.rejected { "1" } else { "" })
                .arg(ctx.names.invalidate())
                .arg(announce(&r.user_id, &r.service));
            let landed: i64 = call.invoke(con)?;
            if landed == 0 {
                eprintln!("user {} service {}: the redis field changed meanwhile; the keystore copy stays (rerun)", r.user_id, r.service);
            }
            written += 1;
        }
        if written > 0 {
            ctx.wait_for_replicas(con)?;
        }
        // Read back: a source row goes only once its target copy opens to exactly
        // what was copied.
        let mut check = redis::pipe();
        for r in &rows {
            check.hget(ctx.names.user_keys(&r.user_id), &r.service);
        }
        let now: Vec<Option<Vec<u8>>> = check.query(con)?;
        let tx = db.transaction()?;
        for ((r, was_there), target) in rows.iter().zip(already).zip(&now) {
            let Some(target) = target else {
                eprintln!("user {} service {}: the key vanished from redis before it was verified (deleted meanwhile?); the keystore copy stays", r.user_id, r.service);
                continue;
            };
            if !ctx.opens_to(&r.user_id, &r.service, target, &r.plain) {
                continue;
            }
            // Only if the row still holds what was copied: a newer write wins.
            tx.prepare_cached(
                "DELETE FROM user_keys WHERE user_id = ?1 AND service = ?2 AND sealed = ?3",
            )
            .and_then(|mut s| s.execute(params![r.user_id, r.service, r.sealed]))?;
            tx.prepare_cached("DELETE FROM user_key_rejected WHERE user_id = ?1 AND service = ?2")
                .and_then(|mut s| s.execute(params![r.user_id, r.service]))?;
            if was_there {
                report.already_in_target += 1;
            } else {
                report.moved += 1;
            }
        }
        tx.commit()?;
        println!(
            "moved {} user keys to redis so far ({} were there already)",
            report.moved, report.already_in_target
        );
    }
    Ok(report)
}

/// Deletes `field` of `hash` only while it still holds `value`, with its info and
/// mark, and announces it: a key stored meanwhile is never removed.
const TAKE_SCRIPT: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

fn to_local(
    ctx: &Ctx<'_>,
    db: &mut Connection,
    con: &mut redis::Connection,
) -> Result<Report, MigrateError> {
    let mut report = Report::default();
    let take = redis::Script::new(TAKE_SCRIPT);
    for (hash, user_id) in crate::store::keyspace::user_hashes(con, ctx.names)? {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = con.hgetall(&hash)?;
        let rejected: Vec<String> = con.hkeys(ctx.names.user_rejected(&user_id))?;
        let written_at: std::collections::HashMap<String, i64> =
            con.hgetall(ctx.names.user_info(&user_id))?;
        let mut moving = Vec::new();
        for (field, value) in fields {
            let service = String::from_utf8_lossy(&field).into_owned();
            match open_user_value(ctx.master, &ctx.names.prefix, &user_id, &service, &value) {
                StoredValue::Sealed(plain) => moving.push((field, service, value, plain)),
                StoredValue::Legacy(_) => report.left_in_clear += 1,
                StoredValue::Broken => {
                    eprintln!(
                        "integrity: {} field {} does not open; left as it is",
                        hash.escape_debug(),
                        service.escape_debug()
                    );
                    report.unreadable += 1;
                }
            }
        }
        for chunk in moving.chunks(BATCH) {
            let tx = db.transaction()?;
            let mut outcome = Vec::with_capacity(chunk.len());
            for (_, service, _, plain) in chunk {
                let local_at: Option<i64> = tx
                    .prepare_cached(
                        "SELECT updated_at FROM user_keys WHERE user_id = ?1 AND service = ?2",
                    )?
                    .query_row(params![user_id, service], |r| r.get(0))
                    .optional()?;
                let there = stored_key(&tx, ctx.master, &user_id, service)?;
                let redis_at = written_at.get(service).copied().unwrap_or(0);
                let same = there.as_ref().is_some_and(|k| k.expose() == plain.expose());
                let replace = match (&there, same) {
                    (None, _) => local_at.is_none(),
                    (Some(_), true) => false,
                    (Some(_), false) if redis_at > local_at.unwrap_or(0) => {
                        conflict(&mut report, &user_id, service,
                            "the keystore held an older, different key; redis's newer key replaces it");
                        true
                    }
                    (Some(_), false) => {
                        conflict(&mut report, &user_id, service,
                            "the keystore holds a different key stored at the same time or later; it is kept, and so is redis's");
                        false
                    }
                };
                if local_at.is_some() && there.is_none() {
                    eprintln!("user {user_id} service {service}: the keystore row does not open; both copies stay");
                }
                let there = same;
                if replace {
                    store_user_key(&tx, ctx.master, &user_id, service, plain)?;
                    if rejected.contains(service) {
                        tx.prepare_cached(
                            "INSERT OR IGNORE INTO user_key_rejected (user_id, service, reported_at)
                             VALUES (?1, ?2, ?3)",
                        )
                        .and_then(|mut s| s.execute(params![user_id, service, crate::model::clock::now_s()]))
                        ?;
                    }
                }
                outcome.push(there);
            }
            tx.commit()?;
            for ((field, service, value, plain), there) in chunk.iter().zip(outcome) {
                // Read back from the committed keystore before the Redis copy goes:
                // it must open to exactly what Redis holds (a conflict kept both).
                let verified = stored_key(db, ctx.master, &user_id, service)?
                    .is_some_and(|k| k.expose() == plain.expose());
                if !verified {
                    continue;
                }
                let _: i64 = take
                    .key(&hash)
                    .key(ctx.names.user_info(&user_id))
                    .key(ctx.names.user_rejected(&user_id))
                    .arg(field)
                    .arg(value)
                    .arg(ctx.names.invalidate())
                    .arg(announce(&user_id, service))
                    .invoke(con)?;
                if there {
                    report.already_in_target += 1;
                } else {
                    report.moved += 1;
                }
            }
        }
    }
    println!(
        "moved {} user keys to the keystore ({} were there already)",
        report.moved, report.already_in_target
    );
    Ok(report)
}
