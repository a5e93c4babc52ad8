//! The one error type of the daemon and its mapping to wire codes; nothing else maps errors to codes.

use std::fmt;

/// Everything that can make a request fail, by the wire code it answers with.
///
/// Messages are written for the person reading the response. They never hold
/// key material: internal causes are logged where they happen, and only a
/// description safe for the wire travels here.
// Clone: one failed Redis batch answers every call in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A malformed line or parameter; the message names the parameter.
    #[error("{0}")]
    BadRequest(String),
    /// The `op` is not one this daemon knows; holds it only when it looks like an op
    /// name, so a value pasted into the wrong member is never echoed.
    #[error("unknown op {}; see docs/protocol.md for the list", .0.as_deref().map(|o| format!("`{o}`")).unwrap_or_else(|| "(not shown: not an op name)".into()))]
    UnknownOp(Option<String>),
    /// The peer may not use this op, or the daemon at all.
    #[error("{0}")]
    Forbidden(String),
    /// The line exceeded `server.max_line_bytes`.
    #[error("request line longer than {0} bytes; it was skipped")]
    TooLarge(usize),
    /// A backing store needed for this op cannot be reached right now.
    #[error("{0}")]
    Unavailable(String),
    /// The config file (or the master key file it names) is not usable; the
    /// message says what is wrong. Nothing was changed.
    #[error("{0}")]
    BadConfig(String),
    /// The daemon is shutting down and did not run this request (it was read, but
    /// not started): answered `unavailable` with `"applied": false`.
    #[error("the daemon is shutting down and did not run this request; nothing was applied (send it again once the daemon is back)")]
    ShuttingDown,
    /// The `idempotency_key` was already used (by this uid, within its TTL) for
    /// another op or other parameters; nothing was applied.
    #[error("this idempotency_key was already used for a different request; nothing was applied (use a fresh key for a new write)")]
    IdempotencyConflict,
    /// `server.idempotency_max_records` records are held: a write with a new
    /// `idempotency_key` is refused (answered `unavailable` with `"applied": false`).
    #[error("too many idempotency records are held (server.idempotency_max_records = {0}); nothing was applied: send it again once older records expire, or without idempotency_key")]
    IdempotencyFull(u64),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The stable code clients switch on (docs/protocol.md, "Error codes").
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::UnknownOp(_) => "unknown_op",
            Error::Forbidden(_) => "forbidden",
            Error::TooLarge(_) => "too_large",
            Error::Unavailable(_) | Error::ShuttingDown | Error::IdempotencyFull(_) => {
                "unavailable"
            }
            Error::BadConfig(_) => "bad_config",
            Error::IdempotencyConflict => "idempotency_conflict",
            Error::Internal(_) => "internal",
        }
    }

    /// `Some(false)` when the error proves the request applied nothing and the
    /// client may send it again as it is (shown as `"applied": false` in the error).
    pub fn applied(&self) -> Option<bool> {
        match self {
            Error::ShuttingDown | Error::IdempotencyFull(_) => Some(false),
            _ => None,
        }
    }

    /// Shorthand for a `bad_request` about one parameter.
    pub fn param(name: &str, problem: impl fmt::Display) -> Self {
        Error::BadRequest(format!("parameter `{name}` {problem}"))
    }
}

impl From<rusqlite::Error> for Error {
    /// SQLite failures that a retry may cure become `unavailable`; the rest `internal`.
    /// rusqlite errors carry SQL text and codes, never bound parameters.
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        tracing::error!(error = %e, "keystore error");
        match e.sqlite_error_code() {
            Some(C::DatabaseBusy | C::DatabaseLocked) => {
                Error::Unavailable("keystore is busy; retry shortly".into())
            }
            Some(C::ReadOnly) => Error::Unavailable("keystore is read-only".into()),
            // Only the write gate of a keystore still being checked refuses statements.
            Some(C::AuthorizationForStatementDenied) => Error::Unavailable(
                "keystore integrity check still running; writes resume when it passes".into(),
            ),
            Some(C::DiskFull) => Error::Unavailable("keystore disk is full".into()),
            Some(C::CannotOpen | C::SystemIoFailure) => {
                Error::Unavailable("keystore cannot be read or written".into())
            }
            _ => Error::Internal("keystore error (see the daemon log)".into()),
        }
    }
}

impl From<actix::MailboxError> for Error {
    fn from(e: actix::MailboxError) -> Self {
        tracing::error!(error = %e, "actor mailbox error");
        Error::Unavailable("daemon is shutting down or overloaded".into())
    }
}

/// Why Redis refused a command, read from the code of its error reply (inside a
/// transaction or script, from the command that failed). One place decides, for
/// each, the wire code and the words that name the cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedisRefusal {
    /// `OOM`: `maxmemory` is reached and the policy evicts nothing (`noeviction`).
    OutOfMemory,
    /// `READONLY`: the server is a replica.
    ReadOnly,
    /// `NOAUTH`/`WRONGPASS`: the connection is not authenticated.
    NoAuth,
    /// `NOPERM`: the ACL user may not run this command or touch this key.
    NoPerm,
    /// `LOADING`: the server is loading its data set after a restart.
    Loading,
    /// `MASTERDOWN`: a replica lost its master and serves no stale data.
    MasterDown,
    /// `BUSY`: a script or function is running past its time limit.
    Busy,
    /// `MISCONF`: writes are stopped because the last snapshot failed.
    SnapshotFailing,
    /// `TRYAGAIN`: a cluster is moving keys.
    TryAgain,
    /// `MOVED`/`ASK`/`CLUSTERDOWN`/`CROSSSLOT`: the server is a Redis Cluster node.
    Cluster,
    /// `WRONGTYPE` or a value that is not a count: data the daemon did not write.
    WrongType,
    /// Any other error reply.
    Other,
}

impl RedisRefusal {
    /// Every refusal, for tests and documentation.
    pub const ALL: [RedisRefusal; 12] = [
        RedisRefusal::OutOfMemory,
        RedisRefusal::ReadOnly,
        RedisRefusal::NoAuth,
        RedisRefusal::NoPerm,
        RedisRefusal::Loading,
        RedisRefusal::MasterDown,
        RedisRefusal::Busy,
        RedisRefusal::SnapshotFailing,
        RedisRefusal::TryAgain,
        RedisRefusal::Cluster,
        RedisRefusal::WrongType,
        RedisRefusal::Other,
    ];

    /// The refusal named by an error reply's code (`OOM`, `READONLY`, …).
    pub fn from_code(code: &str) -> RedisRefusal {
        match code {
            "OOM" => RedisRefusal::OutOfMemory,
            "READONLY" => RedisRefusal::ReadOnly,
            "NOAUTH" | "WRONGPASS" => RedisRefusal::NoAuth,
            "NOPERM" => RedisRefusal::NoPerm,
            "LOADING" => RedisRefusal::Loading,
            "MASTERDOWN" => RedisRefusal::MasterDown,
            "BUSY" => RedisRefusal::Busy,
            "MISCONF" => RedisRefusal::SnapshotFailing,
            "TRYAGAIN" => RedisRefusal::TryAgain,
            "MOVED" | "ASK" | "CLUSTERDOWN" | "CROSSSLOT" => RedisRefusal::Cluster,
            "WRONGTYPE" => RedisRefusal::WrongType,
            _ => RedisRefusal::Other,
        }
    }

    /// The refusal behind `e`; for an aborted transaction or a failed pipeline, that
    /// of the first command Redis refused.
    pub fn of(e: &redis::RedisError) -> RedisRefusal {
        let first = e.clone().into_server_errors().and_then(|errors| {
            errors
                .iter()
                .map(|(_, err)| RedisRefusal::from_code(err.code()))
                .find(|r| *r != RedisRefusal::Other)
        });
        first.unwrap_or_else(|| match e.kind() {
            redis::ErrorKind::AuthenticationFailed => RedisRefusal::NoAuth,
            _ => e
                .code()
                .map_or(RedisRefusal::Other, RedisRefusal::from_code),
        })
    }

    /// The `cause` label of `apikeyd_redis_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            RedisRefusal::OutOfMemory => "oom",
            RedisRefusal::ReadOnly => "readonly",
            RedisRefusal::NoAuth => "noauth",
            RedisRefusal::NoPerm => "noperm",
            RedisRefusal::Loading => "loading",
            RedisRefusal::MasterDown => "masterdown",
            RedisRefusal::Busy => "busy",
            RedisRefusal::SnapshotFailing => "misconf",
            RedisRefusal::TryAgain => "tryagain",
            RedisRefusal::Cluster => "cluster",
            RedisRefusal::WrongType => "wrongtype",
            RedisRefusal::Other => "other",
        }
    }

    /// The cause in words, with Redis's own code, for the log and the wire.
    pub fn cause(self) -> &'static str {
        match self {
            RedisRefusal::OutOfMemory => {
                "out of memory (OOM): maxmemory is reached and the eviction policy frees nothing"
            }
            RedisRefusal::ReadOnly => {
                "the server is a read-only replica (READONLY): redis.url or Sentinel must name the master"
            }
            RedisRefusal::NoAuth => {
                "authentication required or refused (NOAUTH): check the redis password and username"
            }
            RedisRefusal::NoPerm => {
                "the redis ACL user lacks a permission (NOPERM) for a command or key"
            }
            RedisRefusal::Loading => "the server is loading its data set (LOADING)",
            RedisRefusal::MasterDown => {
                "the replica lost its master (MASTERDOWN) and serves no stale data"
            }
            RedisRefusal::Busy => "a script is running past its time limit (BUSY)",
            RedisRefusal::SnapshotFailing => {
                "writes are stopped because redis cannot save its snapshot (MISCONF)"
            }
            RedisRefusal::TryAgain => "the cluster is moving keys (TRYAGAIN)",
            RedisRefusal::Cluster => {
                "the server is a Redis Cluster node (MOVED/ASK/CLUSTERDOWN); apikeyd needs a standalone or Sentinel-managed server"
            }
            RedisRefusal::WrongType => {
                "a key holds data of another type (WRONGTYPE): something else wrote it"
            }
            RedisRefusal::Other => "an error reply (see the daemon log)",
        }
    }

    /// The answer for a request whose command `what` Redis refused: `unavailable`
    /// while the server cannot serve (an operator or time cures it), `internal` for
    /// data the daemon cannot use.
    pub fn error(self, what: &str) -> Error {
        let text = format!("redis refused {what}: {}", self.cause());
        match self {
            RedisRefusal::WrongType | RedisRefusal::Other => Error::Internal(text),
            _ => Error::Unavailable(format!("{text}; retry later")),
        }
    }
}

/// Result with the daemon's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn every_variant_has_its_spec_code() {
        let cases = [
            (Error::BadRequest("x".into()), "bad_request"),
            (Error::BadConfig("x".into()), "bad_config"),
            (Error::UnknownOp(None), "unknown_op"),
            (Error::Forbidden("x".into()), "forbidden"),
            (Error::TooLarge(10), "too_large"),
            (Error::Unavailable("x".into()), "unavailable"),
            (Error::IdempotencyConflict, "idempotency_conflict"),
            (Error::ShuttingDown, "unavailable"),
            (Error::Internal("x".into()), "internal"),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code);
        }
        assert!(!Error::UnknownOp(None).to_string().contains("None"));
    }

    /// The error the redis client makes of a reply line.
    fn reply(line: &str) -> redis::RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .and_then(|v| v.extract_error())
            .expect_err("an error reply")
    }

    #[test]
    fn every_redis_refusal_has_its_code_and_cause() {
        use super::RedisRefusal as R;
        let cases = [
            ("OOM command not allowed when used memory > 'maxmemory'.", R::OutOfMemory, "unavailable", "(OOM)"),
            ("READONLY You can't write against a read only replica.", R::ReadOnly, "unavailable", "(READONLY)"),
            ("NOAUTH Authentication required.", R::NoAuth, "unavailable", "(NOAUTH)"),
            ("WRONGPASS invalid username-password pair", R::NoAuth, "unavailable", "(NOAUTH)"),
            ("NOPERM this user has no permissions to run the 'hset' command", R::NoPerm, "unavailable", "(NOPERM)"),
            ("LOADING Redis is loading the dataset in memory", R::Loading, "unavailable", "(LOADING)"),
            ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", R::MasterDown, "unavailable", "(MASTERDOWN)"),
            ("BUSY Redis is busy running a script.", R::Busy, "unavailable", "(BUSY)"),
            ("MISCONF Redis is configured to save RDB snapshots, but it's not able to persist on disk.", R::SnapshotFailing, "unavailable", "(MISCONF)"),
            ("TRYAGAIN Multiple keys request during rehashing of slot", R::TryAgain, "unavailable", "(TRYAGAIN)"),
            ("MOVED 3999 127.0.0.1:6381", R::Cluster, "unavailable", "MOVED"),
            ("ASK 3999 127.0.0.1:6381", R::Cluster, "unavailable", "ASK"),
            ("CLUSTERDOWN Hash slot not served", R::Cluster, "unavailable", "CLUSTERDOWN"),
            ("WRONGTYPE Operation against a key holding the wrong kind of value", R::WrongType, "internal", "(WRONGTYPE)"),
            ("ERR unknown command", R::Other, "internal", "daemon log"),
        ];
        for (line, refusal, code, named) in cases {
            let e = reply(line);
            assert_eq!(R::of(&e), refusal, "{line}");
            let wire = refusal.error("set user key");
            assert_eq!(wire.code(), code, "{line}");
            let text = wire.to_string();
            assert!(text.starts_with("redis refused set user key: "), "{text}");
            assert!(text.contains(named), "{line}: {text}");
        }
        for r in R::ALL {
            assert!(!r.cause().is_empty());
        }
        let auth = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "auth"));
        assert_eq!(R::of(&auth), R::NoAuth);
        let io = redis::RedisError::from((redis::ErrorKind::Io, "gone"));
        assert_eq!(R::of(&io), R::Other);
    }

    #[test]
    fn sqlite_busy_and_full_are_unavailable() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert_eq!(Error::from(busy).code(), "unavailable");
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert_eq!(Error::from(full).code(), "unavailable");
        assert_eq!(
            Error::from(rusqlite::Error::InvalidQuery).code(),
            "internal"
        );
    }
}
