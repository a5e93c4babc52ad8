//! The start-time key check: the fleet's check values (HMACs of the master key's
//! versions) that every daemon and tool must match before it serves or writes, the
//! refusal of a new master key where a fleet already has one, and retired versions.

use super::*;

/// A value sealed by an apikeyd daemon, and where it lives.
pub(super) enum SealedValue {
    /// In a pool hash: its pool, field (key_id) and value.
    Pool(crate::model::pool::PoolRef, String, Vec<u8>),
    /// In a user hash: user, field (service) and value.
    User(String, String, Vec<u8>),
}

impl SealedValue {
    /// Whether `key` opens it.
    fn opens_with(&self, key: &MasterKey, prefix: &str) -> bool {
        let opened = match self {
            SealedValue::Pool(pool, field, value) => {
                crate::store::envelope::open_value(key, prefix, pool, field, value)
            }
            SealedValue::User(user, service, value) => {
                crate::store::envelope::open_user_value(key, prefix, user, service, value)
            }
        };
        matches!(opened, StoredValue::Sealed(_))
    }
}

/// The first value in a pool or user hash that an apikeyd daemon sealed: proof that
/// a fleet's master key is already in use.
pub(super) fn first_sealed_value(
    con: &mut redis::Connection,
    names: &Names,
) -> redis::RedisResult<Option<SealedValue>> {
    let sealed = |fields: Vec<(Vec<u8>, Vec<u8>)>| {
        fields
            .into_iter()
            .find(|(_, v)| v.starts_with(ENVELOPE.as_bytes()))
            .map(|(f, v)| (String::from_utf8_lossy(&f).into_owned(), v))
    };
    for (hash, pool) in crate::store::keyspace::pool_hashes(con, names)? {
        if let Some((f, v)) = sealed(con.hgetall(&hash)?) {
            return Ok(Some(SealedValue::Pool(pool, f, v)));
        }
    }
    for (hash, user) in crate::store::keyspace::user_hashes(con, names)? {
        if let Some((f, v)) = sealed(con.hgetall(&hash)?) {
            return Ok(Some(SealedValue::User(user, f, v)));
        }
    }
    Ok(None)
}

/// Before a new master key is made: in Redis mode, refuses when Redis already holds
/// a fleet's check values or sealed values (a new key would open none of them), or
/// when Redis cannot be asked. Embedded mode has no fleet.
pub fn may_create_key(config: &Config) -> Result<(), FleetError> {
    if config.redis.url.is_empty() {
        return Ok(());
    }
    let file = &config.keystore.master_key_file;
    let mut con =
        connect(&config.redis, DAEMON_WAIT).map_err(|e| FleetError::CannotCheckForFleet {
            file: file.clone(),
            source: Box::new(e),
        })?;
    refuse_new_key(&mut con, &names(config), file)
}

/// Refuses a new master key (for `file`) when Redis holds a fleet's check values or
/// a sealed value. Reads only; `may_create_key` and the start-up preflight share it.
pub fn refuse_new_key(
    con: &mut redis::Connection,
    names: &Names,
    file: &std::path::Path,
) -> Result<(), FleetError> {
    let checked: bool = con.exists(names.keycheck()).map_err(redis_failed)?;
    if checked
        || first_sealed_value(con, names)
            .map_err(redis_failed)?
            .is_some()
    {
        return Err(FleetError::FleetKeyExists {
            file: file.to_path_buf(),
            prefix: names.prefix.clone(),
        });
    }
    Ok(())
}

/// The versions `rotate-master-key` retired for the whole fleet.
pub(super) fn retired(stored: &HashMap<String, String>) -> Vec<u32> {
    stored
        .get("retired")
        .map(|r| r.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Compares `key` with the fleet's check values as read: refuses a key that differs
/// from the fleet's in any version both hold, that shares no version with it, that
/// lacks a newer version the fleet uses, or that holds only retired versions.
pub(super) fn compare(
    stored: &HashMap<String, String>,
    key: &MasterKey,
    prefix: &str,
) -> Result<(), FleetError> {
    let mine = key.check_values();
    let gone = retired(stored);
    for (v, check) in &mine {
        if stored.get(&format!("v{v}")).is_some_and(|s| s != check) {
            return Err(FleetError::VersionDiffers {
                version: *v,
                prefix: prefix.to_string(),
            });
        }
    }
    let fleet: Vec<u32> = stored
        .keys()
        .filter_map(|f| f.strip_prefix('v')?.parse().ok())
        .collect();
    if !fleet.is_empty() && !mine.iter().any(|(v, _)| fleet.contains(v)) {
        return Err(FleetError::NoVersionKnown {
            versions: key.versions(),
            prefix: prefix.to_string(),
        });
    }
    if key.versions().iter().all(|v| gone.contains(v)) {
        return Err(FleetError::OnlyRetired { retired: gone });
    }
    let newest = key.versions().into_iter().max().unwrap_or(0);
    if let Some(newer) = fleet
        .iter()
        .filter(|v| **v > newest && !gone.contains(v))
        .max()
    {
        return Err(FleetError::LacksVersion {
            newer: *newer,
            versions: key.versions(),
        });
    }
    Ok(())
}

/// Checks `key` against the fleet's check values (see `compare`) and records the
/// versions new to the fleet. The check runs again on what Redis holds after
/// recording, so of two daemons that create a fleet's first key at the same moment,
/// the one whose value did not land is refused. With no check values yet (a fleet
/// from before them), a sealed pool value must open.
pub fn verify(
    con: &mut redis::Connection,
    names: &Names,
    key: &MasterKey,
) -> Result<(), FleetError> {
    check(con, names, key)?;
    for (v, check) in key.check_values() {
        let _: bool = con
            .hset_nx(names.keycheck(), format!("v{v}"), check)
            .map_err(redis_failed)?;
    }
    let stored: HashMap<String, String> = con.hgetall(names.keycheck()).map_err(redis_failed)?;
    compare(&stored, key, &names.prefix)
}

/// The read-only half of [`verify`]: compares `key` with what Redis holds now and
/// records nothing (the start-up preflight and `check-config`).
pub fn check(
    con: &mut redis::Connection,
    names: &Names,
    key: &MasterKey,
) -> Result<(), FleetError> {
    let stored: HashMap<String, String> = con.hgetall(names.keycheck()).map_err(redis_failed)?;
    if !stored.keys().any(|f| f.starts_with('v')) {
        if let Some(value) = first_sealed_value(con, names).map_err(redis_failed)? {
            if !value.opens_with(key, &names.prefix) {
                return Err(FleetError::OpensNoValue {
                    prefix: names.prefix.clone(),
                });
            }
        }
    }
    compare(&stored, key, &names.prefix)
}

/// For the tools: connects and runs [`verify`].
pub fn verify_config(config: &Config, key: &MasterKey) -> Result<(), FleetError> {
    let mut con = connect(&config.redis, TOOL_WAIT)?;
    verify(&mut con, &names(config), key)
}

/// At start in Redis mode: verifies the key when Redis answers. Answers whether it
/// was verified; `false` when Redis is unreachable (the heartbeat verifies later).
pub fn verify_at_start(config: &Config, key: &MasterKey) -> Result<bool, FleetError> {
    let checked = connect(&config.redis, DAEMON_WAIT)
        .and_then(|mut con| verify(&mut con, &names(config), key));
    match checked {
        Ok(()) => Ok(true),
        Err(e) if e.is_unreachable() => {
            tracing::warn!("cannot check the master key against the fleet's now ({e}); checking once Redis answers");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Records versions as retired for the whole fleet: a daemon holding only those
/// is refused from then on (and a running one stops at its next heartbeat).
pub fn mark_retired(config: &Config, versions: &[u32]) -> Result<(), FleetError> {
    let mut con = connect(&config.redis, TOOL_WAIT)?;
    let names = names(config);
    let stored: HashMap<String, String> = con.hgetall(names.keycheck()).map_err(redis_failed)?;
    let mut all = retired(&stored);
    all.extend_from_slice(versions);
    all.sort_unstable();
    all.dedup();
    let text: Vec<String> = all.iter().map(u32::to_string).collect();
    let _: () = con
        .hset(names.keycheck(), "retired", text.join(","))
        .map_err(redis_failed)?;
    Ok(())
}

/// The retired versions as `{prefix}:apikeyd:keycheck`'s `retired` field lists them.
pub(super) fn parse_retired(text: Option<&str>) -> BTreeSet<u32> {
    text.unwrap_or("")
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}
