//! A fleet of daemons sharing one Redis: the master-key check values every daemon
//! must match before it serves, and the heartbeats through which each daemon says
//! which key versions it holds. `rotate-master-key` reads them to re-seal only when
//! every live daemon can open the new version, and daemons seal with the highest
//! version every live daemon holds (docs/security.md, "Rotation in a fleet").
//! Here: reaching Redis from the start-up checks and the tools, and the errors;
//! `keycheck` is the start-time key check, `members` the heartbeats.

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
use crate::store::envelope::{StoredValue, ENVELOPE};
use crate::store::keyspace::Names;

mod keycheck;
mod members;

pub use keycheck::*;
pub use members::*;

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
