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
    #[error("request line longer than {0} bytes; closing the connection")]
    TooLarge(usize),
    /// A backing store needed for this op cannot be reached right now.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The stable code clients switch on (SPEC §2).
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::UnknownOp(_) => "unknown_op",
            Error::Forbidden(_) => "forbidden",
            Error::TooLarge(_) => "too_large",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
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

/// Result with the daemon's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn every_variant_has_its_spec_code() {
        let cases = [
            (Error::BadRequest("x".into()), "bad_request"),
            (Error::UnknownOp(None), "unknown_op"),
            (Error::Forbidden("x".into()), "forbidden"),
            (Error::TooLarge(10), "too_large"),
            (Error::Unavailable("x".into()), "unavailable"),
            (Error::Internal("x".into()), "internal"),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code);
        }
        assert!(!Error::UnknownOp(None).to_string().contains("None"));
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
