//! Configuration: the TOML structs with their defaults (here); reading, validating,
//! resolving paths and comparing for a reload (`load`).

mod load;

pub use load::{needs_restart, redis_url_problem};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::process::access::{gid_of, uid_of, AccessIds};
use serde::{Deserialize, Serialize};

/// The whole configuration file (docs/operations.md, "Configuration reference").
/// Every key is optional.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub keystore: KeystoreConfig,
    pub redis: RedisConfig,
    pub cache: CacheConfig,
    pub quota: QuotaConfig,
    pub pools: PoolsConfig,
    pub access: AccessConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// Per-service overrides and additions to the built-in table, keyed by lower-cased name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// The file this config was read from, for reloads.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Longest `server.idempotency_ttl_s`: a week.
pub const MAX_IDEMPOTENCY_TTL_S: u64 = 7 * 86_400;

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// Octal mode of the socket file, as a string such as `"0660"`.
    pub socket_mode: String,
    pub max_line_bytes: usize,
    pub max_connections: usize,
    /// Connections one uid may hold at once (root and the daemon's own uid excepted).
    pub max_connections_per_uid: usize,
    /// Slots of `max_connections` that only admins may take.
    pub admin_reserved_connections: usize,
    pub idle_timeout_s: u64,
    /// Deadline of one request, waiting included; past it the answer is `unavailable`.
    pub request_timeout_ms: u64,
    /// How long a write's idempotency record is kept: a repeat within it is replayed.
    pub idempotency_ttl_s: u64,
    /// Most idempotency records held at once; past it a write with a new key is
    /// refused (`unavailable`, not applied) until older records expire.
    pub idempotency_max_records: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: "run/apikeyd.sock".into(),
            socket_mode: "0660".into(),
            max_line_bytes: 65536,
            max_connections: 1024,
            max_connections_per_uid: 256,
            admin_reserved_connections: 8,
            idle_timeout_s: 300,
            request_timeout_ms: 10_000,
            idempotency_ttl_s: 600,
            idempotency_max_records: 1_000_000,
        }
    }
}

/// `[keystore]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeystoreConfig {
    pub path: PathBuf,
    pub master_key_file: PathBuf,
    /// Where per-user keys live in Redis mode; `None` means the default (`redis`).
    pub user_keys: Option<UserKeysIn>,
}

impl Default for KeystoreConfig {
    fn default() -> Self {
        KeystoreConfig {
            path: "data/keystore.sqlite3".into(),
            master_key_file: "data/master.key".into(),
            user_keys: None,
        }
    }
}

/// `keystore.user_keys`: where per-user keys live when `redis.url` is set.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UserKeysIn {
    /// Sealed in `{prefix}:user_api_keys:{user_id}`, shared by every daemon on the Redis.
    Redis,
    /// In this daemon's SQLite keystore (the behaviour of versions that kept no user
    /// keys in Redis).
    Local,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Empty: embedded mode.
    pub url: String,
    pub prefix: String,
    pub timeout_ms: u64,
    pub accept_legacy_plaintext: bool,
    /// ACL user name; the password is read from `password_file` (or the systemd
    /// credential `redis.password`), never from this file.
    pub username: Option<String>,
    /// A file holding only the Redis password (mode 0600 or stricter is advised).
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate(s) a `rediss://` server's certificate must chain to;
    /// absent: the system's trust store.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that ask for one.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Redis Sentinel addresses (`host:port`); when set, the master is asked of them
    /// and `url` only supplies the scheme, database and user (its host is ignored).
    pub sentinels: Vec<String>,
    /// The master's name as the sentinels know it.
    pub master_name: String,
    /// Replicas that must confirm a key write (`WAIT`) before it is acknowledged;
    /// default 1 with sentinels, else 0.
    pub min_replicas_acked: Option<u32>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            prefix: "stargazer".into(),
            timeout_ms: 250,
            accept_legacy_plaintext: false,
            username: None,
            password_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            sentinels: Vec::new(),
            master_name: "mymaster".into(),
            min_replicas_acked: None,
        }
    }
}

impl RedisConfig {
    /// Replicas a key write waits for (`redis.min_replicas_acked` or its default).
    pub fn replicas_to_wait_for(&self) -> u32 {
        self.min_replicas_acked
            .unwrap_or(if self.sentinels.is_empty() { 0 } else { 1 })
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub user_key_ttl_s: u64,
    pub max_entries: usize,
    pub pool_ttl_s: u64,
    /// Lock the process's memory (mlockall) so cached keys never reach swap.
    pub lock_memory: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            user_key_ttl_s: 300,
            max_entries: 100_000,
            pool_ttl_s: 5,
            lock_memory: false,
        }
    }
}

/// What check/consume answer when the quota store cannot be reached.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    #[default]
    Deny,
    Allow,
}

/// `[quota]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    pub daily_limit: u64,
    pub on_store_error: OnStoreError,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            daily_limit: 20,
            on_store_error: OnStoreError::Deny,
        }
    }
}

/// `[pools]`: pool key health (`report_key_result`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolsConfig {
    /// Cooldown of a rate-limited key reported without `retry_after_s`, and of a key
    /// that reached `error_threshold`.
    pub cooldown_s: u64,
    /// `error` reports within a minute that cool a key down.
    pub error_threshold: u32,
    /// The longest cooldown a report's `retry_after_s` can ask for; longer counts
    /// as this (so one client cannot take a pool key out of service for years).
    pub max_cooldown_s: u64,
}

impl Default for PoolsConfig {
    fn default() -> Self {
        PoolsConfig {
            cooldown_s: 60,
            error_threshold: 3,
            max_cooldown_s: 3600,
        }
    }
}

/// `[access]`: each list takes numbers and names (`allow_gids = ["apikeyd", 1001]`).
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    pub allow_uids: Vec<Principal>,
    pub allow_gids: Vec<Principal>,
    pub admin_uids: Vec<Principal>,
    pub admin_gids: Vec<Principal>,
    /// The lists above as numbers, resolved when the config is read (start, reload).
    #[serde(skip)]
    pub ids: AccessIds,
}

/// A user or group in `[access]`: its number, or its name on this host.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Principal {
    /// A uid or gid.
    Id(u32),
    /// A user or group name on this host (a string of digits counts as a number).
    Name(String),
}

impl<'de> Deserialize<'de> for Principal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Principal;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a uid or gid (0-4294967295) or a user or group name")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Principal, E> {
                u32::try_from(v)
                    .map(Principal::Id)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Principal, E> {
                u32::try_from(v)
                    .map(Principal::Id)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Principal, E> {
                if v.is_empty() {
                    return Err(E::invalid_value(serde::de::Unexpected::Str(v), &self));
                }
                Ok(Principal::Name(v.to_owned()))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl AccessConfig {
    /// Resolves every name; an unknown one is an error naming it and its list.
    fn resolve(&mut self) -> Result<(), ConfigError> {
        let users = |key: &'static str, list: &[Principal]| resolve_list(key, list, "user", uid_of);
        let groups =
            |key: &'static str, list: &[Principal]| resolve_list(key, list, "group", gid_of);
        self.ids = AccessIds {
            allow_uids: users("access.allow_uids", &self.allow_uids)?,
            allow_gids: groups("access.allow_gids", &self.allow_gids)?,
            admin_uids: users("access.admin_uids", &self.admin_uids)?,
            admin_gids: groups("access.admin_gids", &self.admin_gids)?,
        };
        Ok(())
    }
}

fn resolve_list(
    key: &'static str,
    list: &[Principal],
    kind: &'static str,
    lookup: fn(&str) -> Option<u32>,
) -> Result<Vec<u32>, ConfigError> {
    list.iter()
        .map(|p| match p {
            Principal::Id(n) => Ok(*n),
            Principal::Name(name) => match name.parse::<u32>() {
                Ok(n) => Ok(n),
                Err(_) => lookup(name).ok_or_else(|| ConfigError::UnknownPrincipal {
                    key,
                    kind,
                    name: name.clone(),
                }),
            },
        })
        .collect()
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, or `apikeyd=debug,warn`.
    pub level: String,
    pub format: LogFormat,
    /// Audit lines are also appended here (JSON lines, mode 0600) when set.
    pub audit_file: Option<PathBuf>,
    /// Audit every quota count (`increment_…`, `consume_…`) too; off by default.
    pub audit_quota: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            audit_file: None,
            audit_quota: false,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Loopback address for `GET /metrics` (`"127.0.0.1:9464"`); empty: off.
    pub listen: String,
}

/// `[services.<name>]`: all members optional; absent ones fall back to the built-in table.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    pub display_name: Option<String>,
    pub signup_url: Option<String>,
    /// Environment variable holding the operator's default key.
    pub env: Option<String>,
    /// Base URL (used by `gitea`).
    pub base_url: Option<String>,
}

/// A configuration problem, reported before anything starts. Names settings and
/// paths; never repeats `redis.url`, which may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file at `path` was read but its text is not a valid config.
    #[error("config {}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    /// Not TOML, an unknown setting, or a value of the wrong type.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A setting holds a value it may not: `key` names it, `why` says what is wrong.
    #[error("{key} {why}")]
    Invalid { key: &'static str, why: String },
    /// A `[services.<name>]` table whose name is not a service name.
    #[error("[services.{name}]: a service name is 1-64 characters of A-Z a-z 0-9 _ . -")]
    ServiceName { name: String },
    /// An `[access]` list names a user or group this host does not know.
    #[error("{key}: there is no {kind} named {name:?} on this host")]
    UnknownPrincipal {
        key: &'static str,
        kind: &'static str,
        name: String,
    },
}

impl ConfigError {
    fn invalid(key: &'static str, why: &str) -> Self {
        ConfigError::Invalid {
            key,
            why: why.to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
