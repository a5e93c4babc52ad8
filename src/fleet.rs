//! A fleet of daemons sharing one Redis: the master-key check values every daemon
//! must match before it serves, and the heartbeats through which each daemon says
//! which key versions it holds. `rotate-master-key` reads them to re-seal only when
//! every live daemon can open the new version, and daemons seal with the highest
//! version every live daemon holds (docs/security.md, "Rotation in a fleet").

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Commands};

use crate::clock;
use crate::config::{Config, RedisConfig};
use crate::crypto::MasterKey;
use crate::envelope::{PoolValue, ENVELOPE};
use crate::keyspace::Names;

/// How often a daemon renews its heartbeat; it expires after `BEAT_TTL_S`.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
const BEAT_TTL_S: u64 = 5;

/// What to do about a master key the fleet refuses.
const COPY: &str = "copy the master key file from a host of the fleet and start again";

/// Checking a master key against the fleet's, or reading the fleet, failed. Holds
/// settings, paths, version numbers and Redis causes; never key material (the check
/// values are HMACs, and they are not kept here either).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The settings or files of `[redis]` are not usable, or no sentinel answered.
    #[error(transparent)]
    Connect(#[from] crate::actors::redis::ConnectError),
    /// The first connection failed in a way waiting may cure.
    #[error("cannot reach redis (redis.url): {0}")]
    Unconnected(#[source] redis::RedisError),
    /// A command failed because the connection did.
    #[error("cannot reach redis: {0}")]
    Unreachable(#[source] redis::RedisError),
    /// Redis answered with an error.
    #[error("redis: {0}")]
    Redis(#[source] redis::RedisError),
    #[error(
        "redis refused the credentials (redis.username, and the password from redis.password_file \
         or the systemd credential redis.password): {0}"
    )]
    Credentials(#[source] redis::RedisError),
    #[error(
        "the TLS connection to redis failed (redis.tls_ca_file, redis.tls_cert_file, redis.tls_key_file): {0}"
    )]
    Tls(#[source] redis::RedisError),
    /// No master key file, and Redis cannot say whether a fleet already has one.
    #[error(
        "the master key {} is missing and Redis cannot be checked for values sealed by a fleet's key ({source}); \
         copy the master key from a host of the fleet, or start again once Redis answers",
        file.display()
    )]
    CannotCheckForFleet {
        file: PathBuf,
        #[source]
        source: Box<FleetError>,
    },
    /// No master key file, but Redis holds values sealed with a fleet's key.
    #[error(
        "the master key {} is missing, but Redis (prefix {prefix}) already holds values sealed with a fleet's master key; \
         copy the key file from a host of the fleet to {} (mode 0600, owned by the service user) and start again",
        file.display(),
        file.display()
    )]
    FleetKeyExists { file: PathBuf, prefix: String },
    #[error("version {version} of this master key differs from the fleet's (Redis prefix {prefix}); {COPY}")]
    VersionDiffers { version: u32, prefix: String },
    #[error("none of this master key's versions {versions:?} is known to the fleet (Redis prefix {prefix}); {COPY}")]
    NoVersionKnown { versions: Vec<u32>, prefix: String },
    #[error("this master key holds only versions {retired:?}, which a rotation retired; {COPY}")]
    OnlyRetired { retired: Vec<u32> },
    #[error("the fleet uses key version {newer}, which this master key lacks (it holds {versions:?}); {COPY}")]
    LacksVersion { newer: u32, versions: Vec<u32> },
    /// No check values yet, and a value sealed in Redis does not open with this key.
    #[error("this master key does not open the values sealed in Redis (prefix {prefix}); {COPY}")]
    OpensNoValue { prefix: String },
    #[error("the check panicked")]
    CheckPanicked,
}

impl FleetError {
    /// Whether Redis could not be reached (waiting may cure it), as opposed to an
    /// answer that refuses the key or a setting that is wrong.
    pub fn is_unreachable(&self) -> bool {
        use crate::actors::redis::ConnectError as C;
        match self {
            FleetError::Unconnected(_) | FleetError::Unreachable(_) => true,
            // No sentinel could be asked (none answered in time, or each failed to
            // connect): an outage, like Redis down; one that answered without the
            // master is not.
            FleetError::Connect(C::NoSentinel(each)) => each.iter().all(|e| match e {
                C::SentinelTimedOut { .. } => true,
                C::Sentinel { source, .. } => {
                    source.is_io_error() || source.is_timeout() || source.is_connection_refusal()
                }
                _ => false,
            }),
            _ => false,
        }
    }
}

/// One live daemon, as its heartbeat describes it.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct Member {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub socket: String,
    /// The key versions it can open.
    pub versions: Vec<u32>,
    /// The version it seals new values with.
    pub sealing: u32,
    pub at: i64,
}

impl Member {
    /// "host h1, pid 12, socket /run/apikeyd/apikeyd.sock: holds [1, 2], seals with 2".
    pub fn describe(&self) -> String {
        // Escaped: anyone who can write Redis writes these fields.
        format!(
            "host {}, pid {}, socket {}: holds key versions {:?}, seals with {}",
            self.host.escape_debug(),
            self.pid,
            self.socket.escape_debug(),
            self.versions,
            self.sealing
        )
    }

    fn newest(&self) -> u32 {
        self.versions.iter().copied().max().unwrap_or(0)
    }
}

/// This machine's host name, for heartbeats and messages.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// A blocking connection that waits at most `wait` for Redis, for start-up checks
/// (which must not hold a start for long) and the command-line tools. The message
/// never repeats the URL (it may hold a password).
pub fn connect(redis: &RedisConfig, wait: Duration) -> Result<redis::Connection, FleetError> {
    let client = crate::actors::redis::client(redis)?;
    let con = client
        .get_connection_with_timeout(wait)
        .map_err(|e| refused(e).unwrap_or_else(FleetError::Unconnected))?;
    let _ = con.set_read_timeout(Some(wait));
    let _ = con.set_write_timeout(Some(wait));
    Ok(con)
}

/// A connection error that waiting will not cure — wrong credentials, a certificate
/// that does not verify — as an error for the operator (it names the settings,
/// never the password); the error itself back for anything that may be an outage.
fn refused(e: redis::RedisError) -> Result<FleetError, redis::RedisError> {
    let text = e.to_string();
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("NOPERM")
    {
        return Ok(FleetError::Credentials(e));
    }
    if text.contains("certificate") || text.contains("InvalidCertificate") {
        return Ok(FleetError::Tls(e));
    }
    Err(e)
}

/// How long the daemon's own checks wait for Redis.
pub const DAEMON_WAIT: Duration = Duration::from_secs(2);
/// How long the tools wait for Redis.
pub const TOOL_WAIT: Duration = Duration::from_secs(30);

/// A Redis error: connection trouble is [`FleetError::Unreachable`], so a caller can
/// tell "Redis is down" from an answer that refuses.
fn redis_failed(e: redis::RedisError) -> FleetError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        FleetError::Unreachable(e)
    } else {
        FleetError::Redis(e)
    }
}

fn names(config: &Config) -> Names {
    Names {
        prefix: config.redis.prefix.clone(),
    }
}

/// A value sealed by an apikeyd daemon, and where it lives.
enum SealedValue {
    /// In a pool hash: its pool, field (key_id) and value.
    Pool(crate::actors::store::PoolRef, String, Vec<u8>),
    /// In a user hash: user, field (service) and value.
    User(String, String, Vec<u8>),
}

impl SealedValue {
    /// Whether `key` opens it.
    fn opens_with(&self, key: &MasterKey, prefix: &str) -> bool {
        let opened = match self {
            SealedValue::Pool(pool, field, value) => {
                crate::envelope::open_value(key, prefix, pool, field, value)
            }
            SealedValue::User(user, service, value) => {
                crate::envelope::open_user_value(key, prefix, user, service, value)
            }
        };
        matches!(opened, PoolValue::Sealed(_))
    }
}

/// The first value in a pool or user hash that an apikeyd daemon sealed: proof that
/// a fleet's master key is already in use.
fn first_sealed_value(
    con: &mut redis::Connection,
    names: &Names,
) -> redis::RedisResult<Option<SealedValue>> {
    let sealed = |fields: Vec<(Vec<u8>, Vec<u8>)>| {
        fields
            .into_iter()
            .find(|(_, v)| v.starts_with(ENVELOPE.as_bytes()))
            .map(|(f, v)| (String::from_utf8_lossy(&f).into_owned(), v))
    };
    for (hash, pool) in crate::keyspace::pool_hashes(con, names)? {
        if let Some((f, v)) = sealed(con.hgetall(&hash)?) {
            return Ok(Some(SealedValue::Pool(pool, f, v)));
        }
    }
    for (hash, user) in crate::keyspace::user_hashes(con, names)? {
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
fn retired(stored: &HashMap<String, String>) -> Vec<u32> {
    stored
        .get("retired")
        .map(|r| r.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Compares `key` with the fleet's check values as read: refuses a key that differs
/// from the fleet's in any version both hold, that shares no version with it, that
/// lacks a newer version the fleet uses, or that holds only retired versions.
fn compare(
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

/// The heartbeats of the fleet's member ids (bytes: an id that is not UTF-8 must not
/// hide the others), with the values read for them. A member whose heartbeat expired
/// (`None`) is `Gone`; a value that is not a heartbeat (another type, not JSON, no
/// versions) is `Stray` with its escaped id.
fn parse_members(ids: &[Vec<u8>], values: Vec<Option<Vec<u8>>>) -> Vec<Beat> {
    ids.iter()
        .zip(values)
        .map(|(id, v)| match v {
            None => Beat::Gone(id.clone()),
            Some(v) => serde_json::from_slice::<Member>(&v)
                .ok()
                .filter(|m| !m.versions.is_empty())
                .map_or_else(
                    || Beat::Stray(String::from_utf8_lossy(id).escape_debug().to_string()),
                    Beat::Live,
                ),
        })
        .collect()
}

/// What one member id of the fleet set stands for now.
enum Beat {
    Live(Member),
    /// Its heartbeat expired: the daemon is gone (its id is removed from the set).
    Gone(Vec<u8>),
    Stray(String),
}

/// The heartbeat keys of `ids`.
fn member_keys(names: &Names, ids: &[Vec<u8>]) -> Vec<Vec<u8>> {
    ids.iter()
        .map(|id| {
            let mut k = names.fleet_member("").into_bytes();
            k.extend_from_slice(id);
            k
        })
        .collect()
}

/// Every live daemon's heartbeat, found through the fleet set (no keyspace scan).
/// Stray entries are skipped with a warning naming them; a Redis error is an error
/// (the caller must not take "no heartbeat read" for "no daemon behind").
pub fn members(config: &Config) -> Result<Vec<Member>, FleetError> {
    let mut con = connect(&config.redis, TOOL_WAIT)?;
    let names = names(config);
    let ids: Vec<Vec<u8>> = con.smembers(names.fleet()).map_err(redis_failed)?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // MGET answers nil for a key of another type instead of failing.
    let values: Vec<Option<Vec<u8>>> = con.mget(member_keys(&names, &ids)).map_err(redis_failed)?;
    let mut out = Vec::new();
    for beat in parse_members(&ids, values) {
        match beat {
            Beat::Live(m) => out.push(m),
            Beat::Gone(_) => {}
            Beat::Stray(id) => {
                eprintln!("warning: skipping fleet member {id}: not a daemon's heartbeat")
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Why the fleet is not ready for a rotation step.
pub enum NotReady {
    /// These daemons do not seal with the version yet.
    Behind(Vec<Member>),
    /// The heartbeats could not be read: nothing can be said, so nothing may change.
    Unreadable(FleetError),
}

/// Waits until every live daemon holds `version` and seals with it; otherwise
/// answers the daemons that are behind. Daemons that hold the version switch to it
/// within a beat or two, so they get up to `within`; a daemon that lacks the version
/// will not get it by waiting, so once its heartbeat has had time to renew
/// (`LACKING_WAIT`) the answer comes at once.
pub fn wait_until_sealing(config: &Config, version: u32, within: Duration) -> Result<(), NotReady> {
    const LACKING_WAIT: Duration = Duration::from_secs(3);
    let began = std::time::Instant::now();
    let deadline = began + within;
    loop {
        let behind: Vec<Member> = members(config)
            .map_err(NotReady::Unreadable)?
            .into_iter()
            .filter(|m| m.sealing != version)
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        let lacking = behind.iter().all(|m| !m.versions.contains(&version));
        if std::time::Instant::now() >= deadline || (lacking && began.elapsed() >= LACKING_WAIT) {
            return Err(NotReady::Behind(behind));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// For a tool that seals values into Redis (import-legacy): caps `key` at the
/// newest version every live daemon holds, as the daemons themselves do.
pub fn cap_to_fleet(config: &Config, key: &MasterKey) -> Result<(), FleetError> {
    let newest = key.versions().into_iter().max().unwrap_or(0);
    let cap = members(config)?
        .iter()
        .map(Member::newest)
        .fold(newest, u32::min);
    key.set_seal_cap(cap);
    Ok(())
}

/// What a daemon says of itself in its heartbeat.
pub struct Identity {
    pub id: String,
    pub host: String,
    pub socket: PathBuf,
}

impl Identity {
    /// This process on this host, with a random part so a reused pid is a new member.
    pub fn new(socket: PathBuf) -> Identity {
        let host = hostname();
        let id = format!(
            "{host}:{}:{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        Identity { id, host, socket }
    }
}

/// Runs forever in a daemon in Redis mode: renews this daemon's heartbeat every
/// `BEAT_EVERY`, and caps the sealing version at the newest version every live
/// daemon holds. Checks the key against the fleet's whenever its versions change
/// (and, when Redis was down at start, on the first beat that reaches it), and at
/// every beat that the daemon holds a version not retired; a key that fails stops
/// the process rather than seal with it.
pub async fn heartbeat(
    conn: crate::actors::redis::SharedConn,
    redis: RedisConfig,
    key: Arc<MasterKey>,
    me: Identity,
    verified: bool,
) {
    let names = Names {
        prefix: redis.prefix.clone(),
    };
    let mut checked = verified.then(|| key.versions());
    let mut unwritten = crate::logfmt::Repeated::default();
    loop {
        let mut verified = checked.as_ref() == Some(&key.versions());
        if !verified {
            let (config, ring) = (redis.clone(), key.clone());
            let names = names.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let mut con = connect(&config, DAEMON_WAIT)?;
                verify(&mut con, &names, &ring)
            })
            .await
            .unwrap_or(Err(FleetError::CheckPanicked));
            match outcome {
                Ok(()) => {
                    tracing::info!(versions = ?key.versions(), "the master key matches the fleet's");
                    checked = Some(key.versions());
                    verified = true;
                }
                Err(e) if e.is_unreachable() => {}
                Err(e) => stop(&e.to_string()),
            }
        }
        if verified {
            // A fresh clone each beat: the store replaces it after a failover.
            let mut now = conn.borrow().clone();
            match beat(&mut now, &names, &key, &me).await {
                Ok(None) => {
                    crate::logfmt::recovered(&mut unwritten, "fleet heartbeat written again")
                }
                Ok(Some(why)) => stop(&why),
                Err(e) => {
                    crate::logfmt::warn_repeated(&mut unwritten, &e, "fleet heartbeat not written")
                }
            }
        }
        tokio::time::sleep(BEAT_EVERY).await;
    }
}

/// Ends the process: it holds a key that must not seal anything more.
fn stop(why: &str) -> ! {
    tracing::error!("stopping: {why}");
    std::process::exit(1);
}

/// One heartbeat; answers why the daemon must stop, if it must.
async fn beat(
    conn: &mut ConnectionManager,
    names: &Names,
    key: &MasterKey,
    me: &Identity,
) -> redis::RedisResult<Option<String>> {
    let retired_now: Option<String> = conn.hget(names.keycheck(), "retired").await?;
    let gone: Vec<u32> = retired_now
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if key.versions().iter().all(|v| gone.contains(v)) {
        return Ok(Some(format!(
            "a rotation retired every version this master key holds ({:?}); \
             copy the master key file from a host of the fleet and start again",
            key.versions()
        )));
    }
    let ids: Vec<Vec<u8>> = conn.smembers(names.fleet()).await?;
    let beats = if ids.is_empty() {
        Vec::new()
    } else {
        let values: Vec<Option<Vec<u8>>> = conn.mget(member_keys(names, &ids)).await?;
        parse_members(&ids, values)
    };
    let mut others = Vec::new();
    let mut gone = Vec::new();
    for beat in beats {
        match beat {
            Beat::Live(m) if m.id != me.id => others.push(m),
            Beat::Gone(id) => gone.push(id),
            _ => {}
        }
    }
    if !gone.is_empty() {
        let _: () = conn.srem(names.fleet(), gone).await?;
    }
    let versions = key.versions();
    let mine = versions.iter().copied().max().unwrap_or(0);
    let cap = others.iter().map(Member::newest).fold(mine, u32::min);
    key.set_seal_cap(cap);
    let record = Member {
        id: me.id.clone(),
        host: me.host.clone(),
        pid: std::process::id(),
        socket: me.socket.display().to_string(),
        versions,
        sealing: key.sealing_version(),
        at: clock::now_s(),
    };
    let text = serde_json::to_string(&record).unwrap_or_default();
    redis::pipe()
        .set_ex(names.fleet_member(&me.id), text, BEAT_TTL_S)
        .ignore()
        .sadd(names.fleet(), &me.id)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_error() -> redis::RedisError {
        redis::RedisError::from((redis::ErrorKind::Io, "gone"))
    }

    #[test]
    fn refusals_keep_their_text() {
        let copy = "copy the master key file from a host of the fleet and start again";
        let p = || "p".to_string();
        let cases = [
            (
                FleetError::VersionDiffers {
                    version: 2,
                    prefix: p(),
                },
                format!("version 2 of this master key differs from the fleet's (Redis prefix p); {copy}"),
            ),
            (
                FleetError::NoVersionKnown {
                    versions: vec![1, 2],
                    prefix: p(),
                },
                format!("none of this master key's versions [1, 2] is known to the fleet (Redis prefix p); {copy}"),
            ),
            (
                FleetError::OnlyRetired { retired: vec![1] },
                format!("this master key holds only versions [1], which a rotation retired; {copy}"),
            ),
            (
                FleetError::LacksVersion {
                    newer: 3,
                    versions: vec![1, 2],
                },
                format!("the fleet uses key version 3, which this master key lacks (it holds [1, 2]); {copy}"),
            ),
            (
                FleetError::OpensNoValue { prefix: p() },
                "this master key does not open the values sealed in Redis (prefix p); \
                 copy the master key file from a host of the fleet and start again"
                    .into(),
            ),
            (
                FleetError::FleetKeyExists {
                    file: "/k".into(),
                    prefix: p(),
                },
                "the master key /k is missing, but Redis (prefix p) already holds values sealed with a fleet's master key; \
                 copy the key file from a host of the fleet to /k (mode 0600, owned by the service user) and start again"
                    .into(),
            ),
            (
                FleetError::CannotCheckForFleet {
                    file: "/k".into(),
                    source: Box::new(FleetError::Unconnected(redis_error())),
                },
                format!(
                    "the master key /k is missing and Redis cannot be checked for values sealed by a fleet's key \
                     (cannot reach redis (redis.url): {}); \
                     copy the master key from a host of the fleet, or start again once Redis answers",
                    redis_error()
                ),
            ),
            (
                FleetError::Credentials(redis_error()),
                format!(
                    "redis refused the credentials (redis.username, and the password from redis.password_file \
                     or the systemd credential redis.password): {}",
                    redis_error()
                ),
            ),
            (
                FleetError::Unreachable(redis_error()),
                format!("cannot reach redis: {}", redis_error()),
            ),
            (
                FleetError::Redis(redis_error()),
                format!("redis: {}", redis_error()),
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
        assert!(FleetError::Unconnected(redis_error()).is_unreachable());
        assert!(!FleetError::Redis(redis_error()).is_unreachable());
    }
}
