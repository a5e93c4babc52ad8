//! A fleet of daemons sharing one Redis: the master-key check values every daemon
//! must match before it serves, and the heartbeats through which each daemon says
//! which key versions it holds. `rotate-master-key` reads them to re-seal only when
//! every live daemon can open the new version, and daemons seal with the highest
//! version every live daemon holds (docs/security.md, "Rotation in a fleet").

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Commands};

use crate::keys::MasterKey;
use crate::model::clock;
use crate::process::config::{Config, RedisConfig};
use crate::store::envelope::{PoolValue, ENVELOPE};
use crate::store::keyspace::Names;

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
    Connect(#[from] crate::store::redis::ConnectError),
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
        use crate::store::redis::ConnectError as C;
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
    /// Per key version it holds that is not retired, the record's tag under the
    /// heartbeat key derived from that version (`MasterKey::heartbeat_tag`), so that
    /// a Redis writer without the master key cannot fake or alter a heartbeat.
    #[serde(default)]
    pub tags: BTreeMap<u32, String>,
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

    /// What the tags authenticate: every field but the tags, in an unambiguous form.
    fn signed_text(&self) -> Vec<u8> {
        serde_json::to_vec(&(
            "apikeyd heartbeat",
            &self.id,
            &self.host,
            self.pid,
            &self.socket,
            &self.versions,
            self.sealing,
            self.at,
        ))
        .unwrap_or_default()
    }

    /// Tags the record under every version of `key` that is not `retired`.
    pub fn sign(&mut self, key: &MasterKey, retired: &BTreeSet<u32>) {
        let text = self.signed_text();
        self.tags = key
            .versions()
            .into_iter()
            .filter(|v| !retired.contains(v))
            .filter_map(|v| Some((v, key.heartbeat_tag(v, &text)?)))
            .collect();
    }

    /// Whether the record is a fleet daemon's own, listed under `id`: one of its tags
    /// verifies under a version of `key` that is not `retired` (a retired version
    /// may have leaked, so it authenticates nothing).
    fn authentic(&self, id: &[u8], key: &MasterKey, retired: &BTreeSet<u32>) -> bool {
        if self.id.as_bytes() != id {
            return false;
        }
        let text = self.signed_text();
        self.tags
            .iter()
            .any(|(v, tag)| !retired.contains(v) && key.heartbeat_tag_matches(*v, &text, tag))
    }
}

/// The version a daemon holding `mine` seals with, given the newest versions that
/// the other (authenticated) live daemons hold: the newest version every one of them
/// holds, but never a retired one, whatever the heartbeats say. `None` when every
/// version of `mine` is retired (the daemon must not seal at all).
pub fn sealing_choice(
    mine: &[u32],
    others_newest: impl IntoIterator<Item = u32>,
    retired: &BTreeSet<u32>,
) -> Option<u32> {
    let usable: Vec<u32> = mine
        .iter()
        .copied()
        .filter(|v| !retired.contains(v))
        .collect();
    let newest = usable.iter().copied().max()?;
    let cap = others_newest.into_iter().fold(newest, u32::min);
    Some(
        usable
            .iter()
            .copied()
            .filter(|v| *v <= cap)
            .max()
            .unwrap_or(newest),
    )
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
    let client = crate::store::redis::client(redis)?;
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

/// The retired versions as `{prefix}:apikeyd:keycheck`'s `retired` field lists them.
fn parse_retired(text: Option<&str>) -> BTreeSet<u32> {
    text.unwrap_or("")
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// The fleet set's members, as read from Redis and judged with the reader's key.
#[derive(Default)]
struct Beats {
    /// Authenticated heartbeats.
    live: Vec<Member>,
    /// Ids whose heartbeat expired: the daemon is gone (the id is removed from the set).
    gone: Vec<Vec<u8>>,
    /// Escaped ids whose value is not a heartbeat (another type, not JSON, no versions).
    stray: Vec<String>,
    /// Ids (raw) whose heartbeat no tag authenticates: written by someone without
    /// the fleet's key (or by a daemon whose every version is retired).
    forged: Vec<Vec<u8>>,
}

/// Sorts the heartbeats of the fleet's member ids (bytes: an id that is not UTF-8
/// must not hide the others), with the values read for them.
fn sort_beats(
    ids: &[Vec<u8>],
    values: Vec<Option<Vec<u8>>>,
    key: &MasterKey,
    retired: &BTreeSet<u32>,
) -> Beats {
    let mut out = Beats::default();
    for (id, v) in ids.iter().zip(values) {
        let Some(v) = v else {
            out.gone.push(id.clone());
            continue;
        };
        match serde_json::from_slice::<Member>(&v)
            .ok()
            .filter(|m| !m.versions.is_empty())
        {
            None => out
                .stray
                .push(String::from_utf8_lossy(id).escape_debug().to_string()),
            Some(m) if m.authentic(id, key, retired) => out.live.push(m),
            Some(_) => out.forged.push(id.clone()),
        }
    }
    out
}

/// An id for a message (anyone who can write Redis writes it).
fn escaped(id: &[u8]) -> String {
    String::from_utf8_lossy(id).escape_debug().to_string()
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

/// Whether process `pid` runs on this host (a pid that is not ours to signal runs).
fn pid_runs(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Every live daemon's heartbeat that `key` authenticates, found through the fleet
/// set (no keyspace scan). Stray and unauthenticated entries are skipped with a
/// warning naming them, and so is a daemon on this host whose pid no longer runs
/// (stopped or killed: its heartbeat merely has not expired yet); a Redis error is
/// an error (the caller must not take "no heartbeat read" for "no daemon behind").
pub fn members(config: &Config, key: &MasterKey) -> Result<Vec<Member>, FleetError> {
    let mut con = connect(&config.redis, TOOL_WAIT)?;
    let names = names(config);
    let ids: Vec<Vec<u8>> = con.smembers(names.fleet()).map_err(redis_failed)?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let retired: Option<String> = con
        .hget(names.keycheck(), "retired")
        .map_err(redis_failed)?;
    let retired = parse_retired(retired.as_deref());
    // MGET answers nil for a key of another type instead of failing.
    let values: Vec<Option<Vec<u8>>> = con.mget(member_keys(&names, &ids)).map_err(redis_failed)?;
    let beats = sort_beats(&ids, values, key, &retired);
    for id in beats.stray {
        eprintln!("warning: skipping fleet member {id}: not a daemon's heartbeat");
    }
    for id in &beats.forged {
        eprintln!(
            "warning: skipping fleet member {}: its heartbeat is not authenticated by this master key \
             (written by someone without the fleet's key, or by a daemon holding only retired versions)",
            escaped(id)
        );
    }
    let here = hostname();
    let mut out: Vec<Member> = beats
        .live
        .into_iter()
        .filter(|m| {
            let dead = m.host == here && !pid_runs(m.pid);
            if dead {
                println!(
                    "treating the daemon with pid {} on this host as gone: that process is not running \
                     (its heartbeat had not expired yet)",
                    m.pid
                );
            }
            !dead
        })
        .collect();
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
/// (`LACKING_WAIT`) the answer comes at once. Heartbeats are judged with `key`.
pub fn wait_until_sealing(
    config: &Config,
    key: &MasterKey,
    version: u32,
    within: Duration,
) -> Result<(), NotReady> {
    const LACKING_WAIT: Duration = Duration::from_secs(3);
    let began = std::time::Instant::now();
    let deadline = began + within;
    loop {
        let behind: Vec<Member> = members(config, key)
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
/// newest version every live daemon holds, as the daemons themselves do (never a
/// retired version).
pub fn cap_to_fleet(config: &Config, key: &MasterKey) -> Result<(), FleetError> {
    let mut con = connect(&config.redis, TOOL_WAIT)?;
    let retired: Option<String> = con
        .hget(names(config).keycheck(), "retired")
        .map_err(redis_failed)?;
    let retired = parse_retired(retired.as_deref());
    let others: Vec<u32> = members(config, key)?.iter().map(Member::newest).collect();
    match sealing_choice(&key.versions(), others, &retired) {
        Some(v) => key.set_seal_cap(v),
        None => {
            return Err(FleetError::OnlyRetired {
                retired: retired.into_iter().collect(),
            })
        }
    }
    Ok(())
}

/// What a daemon says of itself in its heartbeat.
pub struct Identity {
    pub id: String,
    pub host: String,
    pub socket: PathBuf,
    /// Set on a clean stop: no heartbeat is written any more (see [`leave`]).
    pub leaving: Arc<AtomicBool>,
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
        Identity {
            id,
            host,
            socket,
            leaving: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What the heartbeat remembers from beat to beat.
struct Watch {
    /// Every version seen retired since start: a version once retired stays retired
    /// here even if a Redis writer removes it from the list.
    retired: BTreeSet<u32>,
    /// Unauthenticated member ids already logged (each is logged and counted once).
    forged: HashSet<Vec<u8>>,
    /// Counts the unauthenticated heartbeats for `stats` and metrics.
    status: Arc<crate::model::figures::RedisStatus>,
}

/// Runs forever in a daemon in Redis mode: renews this daemon's heartbeat every
/// `BEAT_EVERY`, and caps the sealing version at the newest version every live
/// daemon holds, never a retired one. Only heartbeats authenticated under a version
/// of this key that is not retired count; others are logged and counted once.
/// Checks the key against the fleet's whenever its versions change (and, when Redis
/// was down at start, on the first beat that reaches it), and at every beat that
/// the daemon holds a version not retired; a key that fails stops the process
/// rather than seal with it.
pub async fn heartbeat(
    conn: crate::store::redis::SharedConn,
    redis: RedisConfig,
    key: Arc<MasterKey>,
    me: Identity,
    verified: bool,
    status: Arc<crate::model::figures::RedisStatus>,
) {
    let names = Names {
        prefix: redis.prefix.clone(),
    };
    let mut checked = verified.then(|| key.versions());
    let mut unwritten = crate::process::logfmt::Repeated::default();
    let mut watch = Watch {
        retired: BTreeSet::new(),
        forged: HashSet::new(),
        status,
    };
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
                // A running daemon that lacks a version another host just added is
                // the usual state mid-rotation (the fleet seals with what every
                // daemon holds); only a start is refused for it. Reloaded right
                // as a rotation adds a version, it must not stop.
                Err(e @ FleetError::LacksVersion { .. }) => {
                    tracing::warn!(
                        "{e}; serving on: the fleet seals with versions this daemon holds"
                    );
                    checked = Some(key.versions());
                    verified = true;
                }
                Err(e) => stop(&e.to_string()),
            }
        }
        if verified {
            // A fresh clone each beat: the store replaces it after a failover.
            let mut now = conn.borrow().clone();
            match beat(&mut now, &names, &key, &me, &mut watch).await {
                Ok(None) => crate::process::logfmt::recovered(
                    &mut unwritten,
                    "fleet heartbeat written again",
                ),
                Ok(Some(why)) => stop(&why),
                Err(e) => crate::process::logfmt::warn_repeated(
                    &mut unwritten,
                    &e,
                    "fleet heartbeat not written",
                ),
            }
        }
        tokio::time::sleep(BEAT_EVERY).await;
    }
}

/// On a clean stop: removes this daemon's heartbeat, so that a rotation run right
/// after does not wait for it to expire. Best effort (bounded by `DAEMON_WAIT`).
/// `leaving` (the identity's flag) stops the heartbeat from writing it again.
pub fn leave(redis: &RedisConfig, me_id: &str, leaving: &AtomicBool) {
    leaving.store(true, Ordering::SeqCst);
    let names = Names {
        prefix: redis.prefix.clone(),
    };
    let left = connect(redis, DAEMON_WAIT).and_then(|mut con| {
        redis::pipe()
            .del(names.fleet_member(me_id))
            .ignore()
            .srem(names.fleet(), me_id)
            .ignore()
            .query::<()>(&mut con)
            .map_err(redis_failed)
    });
    match left {
        Ok(()) => tracing::info!("removed this daemon's fleet heartbeat"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot remove this daemon's fleet heartbeat; it expires within {BEAT_TTL_S} s")
        }
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
    watch: &mut Watch,
) -> redis::RedisResult<Option<String>> {
    let retired_now: Option<String> = conn.hget(names.keycheck(), "retired").await?;
    watch.retired.extend(parse_retired(retired_now.as_deref()));
    let versions = key.versions();
    let ids: Vec<Vec<u8>> = conn.smembers(names.fleet()).await?;
    let beats = if ids.is_empty() {
        Beats::default()
    } else {
        let values: Vec<Option<Vec<u8>>> = conn.mget(member_keys(names, &ids)).await?;
        sort_beats(&ids, values, key, &watch.retired)
    };
    for id in &beats.forged {
        if watch.forged.insert(id.clone()) {
            watch
                .status
                .unauthenticated_heartbeats
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(member = %escaped(id),
                "security: ignoring a fleet heartbeat that this master key does not authenticate \
                 (written to redis by someone without the fleet's key?)");
        }
    }
    if !beats.gone.is_empty() {
        let _: () = conn.srem(names.fleet(), beats.gone).await?;
    }
    let others = beats
        .live
        .iter()
        .filter(|m| m.id != me.id)
        .map(Member::newest);
    let Some(sealing) = sealing_choice(&versions, others, &watch.retired) else {
        return Ok(Some(format!(
            "a rotation retired every version this master key holds ({versions:?}); \
             copy the master key file from a host of the fleet and start again"
        )));
    };
    key.set_seal_cap(sealing);
    if me.leaving.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let mut record = Member {
        id: me.id.clone(),
        host: me.host.clone(),
        pid: std::process::id(),
        socket: me.socket.display().to_string(),
        versions,
        sealing: key.sealing_version(),
        at: clock::now_s(),
        tags: BTreeMap::new(),
    };
    record.sign(key, &watch.retired);
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

    #[test]
    fn never_seals_with_a_retired_version() {
        let none = BTreeSet::new();
        let one: BTreeSet<u32> = [1].into();
        assert_eq!(sealing_choice(&[1, 2], [1], &none), Some(1));
        assert_eq!(sealing_choice(&[1, 2], [1], &one), Some(2));
        assert_eq!(sealing_choice(&[1, 2], [3], &none), Some(2));
        assert_eq!(sealing_choice(&[1, 2], [], &none), Some(2));
        assert_eq!(sealing_choice(&[1], [], &one), None);
    }

    #[test]
    fn heartbeats_authenticate_only_under_a_version_not_retired() {
        let v1 = MasterKey::from_text(&MasterKey::generate_base64()).unwrap();
        let both = v1.with_new_version();
        let none = BTreeSet::new();
        let mut m = Member {
            id: "h:1:0".into(),
            host: "h".into(),
            pid: 1,
            socket: "/s".into(),
            versions: vec![1, 2],
            sealing: 2,
            at: 5,
            tags: BTreeMap::new(),
        };
        m.sign(&both, &none);
        assert!(m.authentic(b"h:1:0", &both, &none));
        // A daemon holding only the older version still recognises it...
        assert!(m.authentic(b"h:1:0", &v1, &none));
        // ...until that version is retired: a retired key authenticates nothing.
        assert!(!m.authentic(b"h:1:0", &v1, &[1].into()));
        // Listed under another id, or altered: not authentic.
        assert!(!m.authentic(b"h:2:0", &both, &none));
        let mut altered = m.clone();
        altered.versions = vec![1];
        assert!(!altered.authentic(b"h:1:0", &both, &none));
        // No tags at all (a Redis writer's record).
        let mut bare = m.clone();
        bare.tags.clear();
        assert!(!bare.authentic(b"h:1:0", &both, &none));
        // Another fleet's key.
        let other = MasterKey::from_text(&MasterKey::generate_base64()).unwrap();
        assert!(!m.authentic(b"h:1:0", &other, &none));
    }

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
