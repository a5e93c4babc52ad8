//! `Op`: every op of the daemon in one place — its wire name, whether it writes,
//! whether it is for admins only, and whether it leaves an audit line. Dispatch,
//! authorisation, per-connection ordering, auditing and metrics all read it from
//! here, so a new op is one line of the table below plus its handler.

use std::str::FromStr;

/// Declares `Op` from one table: variant, wire name, writes, admin only.
macro_rules! ops {
    ($($variant:ident = $name:literal, write: $write:literal, admin: $admin:literal;)*) => {
        /// One op of the wire protocol (docs/protocol.md, "Ops", apikeyd's additions included).
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub enum Op {
            $(#[doc = concat!("`", $name, "`")] $variant,)*
        }

        impl Op {
            /// Every op, in a fixed order (metrics label them by it).
            pub const ALL: &'static [Op] = &[$(Op::$variant,)*];

            /// The op's name on the wire.
            pub fn name(self) -> &'static str {
                match self { $(Op::$variant => $name,)* }
            }

            /// Whether it changes stored state. A connection's requests after a write
            /// wait for it, and a write waits for the requests before it, so pipelined
            /// clients read their own writes.
            pub fn writes(self) -> bool {
                match self { $(Op::$variant => $write,)* }
            }

            /// Whether only admins may run it (docs/protocol.md, "Who may call what":
            /// pool management, `reload` and `enable_pool_key`).
            pub fn admin_only(self) -> bool {
                match self { $(Op::$variant => $admin,)* }
            }
        }

        impl FromStr for Op {
            type Err = UnknownOp;

            fn from_str(s: &str) -> Result<Op, UnknownOp> {
                match s {
                    $($name => Ok(Op::$variant),)*
                    _ => Err(UnknownOp),
                }
            }
        }
    };
}

ops! {
    Ping = "ping", write: false, admin: false;
    Stats = "stats", write: false, admin: false;
    Metrics = "metrics", write: false, admin: false;
    Reload = "reload", write: false, admin: true;
    GetUserApiKey = "get_user_api_key", write: false, admin: false;
    GetGiteaCredentials = "get_gitea_credentials", write: false, admin: false;
    GetPoolApiKey = "get_pool_api_key", write: false, admin: false;
    GetChannelPoolApiKey = "get_channel_pool_api_key", write: false, admin: false;
    SetUserApiKey = "set_user_api_key", write: true, admin: false;
    DeleteUserApiKey = "delete_user_api_key", write: true, admin: false;
    ListUserApiKeys = "list_user_api_keys", write: false, admin: false;
    AddPoolKey = "add_pool_key", write: true, admin: true;
    RemovePoolKey = "remove_pool_key", write: true, admin: true;
    ListPoolKeys = "list_pool_keys", write: false, admin: true;
    ReportKeyResult = "report_key_result", write: true, admin: false;
    EnablePoolKey = "enable_pool_key", write: true, admin: true;
    CheckDefaultKeyLimit = "check_default_key_limit", write: false, admin: false;
    IncrementDefaultKeyUsage = "increment_default_key_usage", write: true, admin: false;
    ConsumeDefaultKeyUsage = "consume_default_key_usage", write: true, admin: false;
    MissingApiKeyError = "missing_api_key_error", write: false, admin: false;
    DefaultKeyLimitError = "default_key_limit_error", write: false, admin: false;
    DebugPanic = "debug_panic", write: false, admin: false;
}

/// A name that is not an op of this daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownOp;

impl Op {
    /// Parses a wire name. `debug_panic` (a test hook that panics inside a handler)
    /// exists only in debug builds run with `APIKEYD_TEST_HOOKS` set.
    pub fn parse(name: &str) -> Result<Op, UnknownOp> {
        match name.parse()? {
            Op::DebugPanic if !Op::test_hooks() => Err(UnknownOp),
            op => Ok(op),
        }
    }

    fn test_hooks() -> bool {
        cfg!(debug_assertions) && std::env::var_os("APIKEYD_TEST_HOOKS").is_some()
    }

    /// Whether it leaves an audit line: every write and every admin op, except quota
    /// counting unless `quota` (`log.audit_quota`) says so — a busy bot counts on
    /// every tool call, and that would flood the journal. `quota` is asked only for
    /// those two ops, so reads never touch the config.
    pub fn audited(self, quota: impl FnOnce() -> bool) -> bool {
        let counting = matches!(
            self,
            Op::IncrementDefaultKeyUsage | Op::ConsumeDefaultKeyUsage
        );
        (self.writes() && (!counting || quota())) || self.admin_only()
    }

    /// Its place in [`Op::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Whether `name` has the shape of an op name (safe to echo and log).
pub fn looks_like_op(name: &str) -> bool {
    (1..=40).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_round_trips_and_has_an_op_shaped_name() {
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(op.index(), i);
            assert!(looks_like_op(op.name()), "{op:?}");
            assert_eq!(op.name().parse::<Op>(), Ok(*op));
        }
        assert_eq!("GET_USER_API_KEY".parse::<Op>(), Err(UnknownOp));
    }

    #[test]
    fn admin_ops_are_pool_management_reload_and_enable() {
        let admin: Vec<&str> = Op::ALL
            .iter()
            .filter(|o| o.admin_only())
            .map(|o| o.name())
            .collect();
        assert_eq!(
            admin,
            [
                "reload",
                "add_pool_key",
                "remove_pool_key",
                "list_pool_keys",
                "enable_pool_key"
            ]
        );
    }

    #[test]
    fn quota_counting_is_audited_only_when_asked() {
        assert!(!Op::ConsumeDefaultKeyUsage.audited(|| false));
        assert!(Op::ConsumeDefaultKeyUsage.audited(|| true));
        assert!(Op::SetUserApiKey.audited(|| panic!("not asked for other writes")));
        assert!(
            Op::ListPoolKeys.audited(|| false),
            "admin reads are audited"
        );
        assert!(!Op::GetUserApiKey.audited(|| true));
    }
}
