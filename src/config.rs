//! Configuration: the TOML structs with their defaults, validation, and path resolution.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::access::{gid_of, uid_of, AccessIds};
use serde::{Deserialize, Serialize};

/// The whole configuration file (SPEC §6). Every key is optional.
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
    /// In this daemon's SQLite keystore (the behaviour before issue 11).
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

impl Config {
    /// Where the config is read from: `--config`, else `$APIKEYD_CONFIG`, else `./config.toml`.
    pub fn default_path() -> PathBuf {
        std::env::var_os("APIKEYD_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("config.toml"))
    }

    /// Reads and validates the file at `path`, resolving relative paths against its folder.
    ///
    /// When `must_exist` is false and the file is missing, the defaults are used,
    /// relative to the current folder.
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        let (config, mut problems) = Config::load_all(path, must_exist)?;
        match problems.is_empty() {
            true => Ok(config),
            false => Err(problems.swap_remove(0)),
        }
    }

    /// Like [`Config::load`], but a config whose values are wrong is still answered,
    /// with every problem found (each wrapped with the file's path), so that
    /// `check-config` can list them all and go on checking. `Err` only when the file
    /// cannot be read or is not a config at all (TOML, unknown setting, wrong type).
    pub fn load_all(
        path: &Path,
        must_exist: bool,
    ) -> Result<(Config, Vec<ConfigError>), ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let in_file = |e| ConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        let (mut config, problems) = Config::parse_all(&text).map_err(in_file)?;
        let problems = problems.into_iter().map(in_file).collect();
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = std::path::absolute(&base).unwrap_or(base);
        config.resolve_paths(&base);
        config.source = Some(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
        Ok((config, problems))
    }

    /// Parses and validates TOML text; paths stay as written.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let (config, mut problems) = Config::parse_all(text)?;
        match problems.is_empty() {
            true => Ok(config),
            false => Err(problems.swap_remove(0)),
        }
    }

    /// Parses TOML text and answers the config with every value problem found (the
    /// first is what [`Config::parse`] refuses with). `Err`: not a config at all.
    pub fn parse_all(text: &str) -> Result<(Config, Vec<ConfigError>), ConfigError> {
        let mut config: Config = toml::from_str(text)?;
        config.services = std::mem::take(&mut config.services)
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let mut problems = config.problems();
        if let Err(e) = config.access.resolve() {
            problems.push(e);
        }
        Ok((config, problems))
    }

    fn resolve_paths(&mut self, base: &Path) {
        if let Some(p) = self.log.audit_file.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
        for p in [
            &mut self.server.socket,
            &mut self.keystore.path,
            &mut self.keystore.master_key_file,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let r = &mut self.redis;
        for p in [
            &mut r.password_file,
            &mut r.tls_ca_file,
            &mut r.tls_cert_file,
            &mut r.tls_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Whether per-user keys live in Redis (`redis.url` set and `keystore.user_keys`
    /// not `"local"`).
    pub fn user_keys_in_redis(&self) -> bool {
        !self.redis.url.is_empty() && self.keystore.user_keys != Some(UserKeysIn::Local)
    }

    /// Fits `server.max_connections` under an open-file limit of `open_files` (with
    /// room for the daemon's own files); answers the old value when it had to lower it.
    pub fn fit_connections(&mut self, open_files: u64) -> Option<usize> {
        const OWN_FILES: u64 = 64;
        let room = usize::try_from(open_files.saturating_sub(OWN_FILES)).unwrap_or(usize::MAX);
        let wanted = self.server.max_connections;
        if wanted <= room {
            return None;
        }
        self.server.max_connections = room.max(1);
        Some(wanted)
    }

    /// How long a request may wait on any one store (`server.request_timeout_ms`).
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.server.request_timeout_ms.max(1))
    }

    /// The socket mode as a number.
    pub fn socket_mode(&self) -> u32 {
        parse_mode(&self.server.socket_mode).unwrap_or(0o660)
    }

    /// Every value problem of the config, in the order of the file's sections.
    fn problems(&self) -> Vec<ConfigError> {
        let mut found = Vec::new();
        let mut bad = |key, why: &str| found.push(ConfigError::invalid(key, why));
        match parse_mode(&self.server.socket_mode) {
            Some(m) if m & !0o777 == 0 => {}
            _ => bad(
                "server.socket_mode",
                &format!(
                    "{:?} is not an octal mode such as \"0660\"",
                    self.server.socket_mode
                ),
            ),
        }
        if self.server.max_line_bytes < 64 {
            bad("server.max_line_bytes", "must be at least 64");
        }
        if self.server.max_connections == 0 {
            bad("server.max_connections", "must be at least 1");
        }
        if self.server.max_connections_per_uid == 0 {
            bad("server.max_connections_per_uid", "must be at least 1");
        }
        if self.cache.max_entries == 0 {
            bad("cache.max_entries", "must be at least 1");
        }
        if self.pools.max_cooldown_s == 0 {
            bad("pools.max_cooldown_s", "must be at least 1");
        }
        if self.pools.error_threshold == 0 {
            bad("pools.error_threshold", "must be at least 1");
        }
        if self.quota.daily_limit > crate::protocol::MAX_COUNT {
            bad("quota.daily_limit", "must be at most 1000000000");
        }
        if self.redis.prefix.is_empty() || self.redis.prefix.contains(char::is_whitespace) {
            bad("redis.prefix", "must be non-empty and without whitespace");
        }
        if self.redis.url.is_empty() && self.keystore.user_keys == Some(UserKeysIn::Redis) {
            bad(
                "keystore.user_keys",
                "= \"redis\" needs redis.url (embedded mode keeps user keys in the keystore)",
            );
        }
        if redis_url_has_password(&self.redis.url) {
            bad(
                "redis.url",
                "holds a password: put it in the file named by redis.password_file \
                 (or the systemd credential redis.password) and remove it from the URL",
            );
        }
        if self.redis.tls_cert_file.is_some() != self.redis.tls_key_file.is_some() {
            bad("redis.tls_cert_file", "and redis.tls_key_file go together");
        }
        if !self.redis.sentinels.is_empty() && self.redis.master_name.is_empty() {
            bad(
                "redis.master_name",
                "must name the master the sentinels watch",
            );
        }
        if !self.metrics.listen.is_empty() {
            match self.metrics.listen.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(_) => {
                    bad(
                        "metrics.listen",
                        &format!(
                            "{:?} is not a loopback address; the metrics are not authenticated, so use 127.0.0.1:PORT or [::1]:PORT",
                            self.metrics.listen
                        ),
                    )
                }
                Err(_) => {
                    bad(
                        "metrics.listen",
                        &format!(
                            "{:?} is not an address such as \"127.0.0.1:9464\"",
                            self.metrics.listen
                        ),
                    )
                }
            }
        }
        if !valid_level(&self.log.level) {
            bad(
                "log.level",
                &format!(
                    "{:?} is not a level (trace, debug, info, warn, error, off) or a filter such as \"apikeyd=debug,warn\"",
                    self.log.level
                ),
            );
        }
        if self.server.idle_timeout_s == 0 {
            bad("server.idle_timeout_s", "must be at least 1 (seconds)");
        }
        if !(1..=MAX_IDEMPOTENCY_TTL_S).contains(&self.server.idempotency_ttl_s) {
            bad(
                "server.idempotency_ttl_s",
                "must be from 1 to 604800 (seconds; a week)",
            );
        }
        if self.server.idempotency_max_records == 0 {
            bad(
                "server.idempotency_max_records",
                "must be at least 1 (records)",
            );
        }
        found.extend(redis_url_problem(&self.redis.url));
        for name in self.services.keys() {
            if crate::protocol::check_service(name).is_err() {
                found.push(ConfigError::ServiceName { name: name.clone() });
            }
        }
        found
    }
}

/// The settings that differ between `old` and `new` but are only read at start, so
/// a reload cannot apply them. Everything else (`[services]`, `[access]`, `[quota]`,
/// `[cache]` but `lock_memory`, `server.max_line_bytes` and `server.idle_timeout_s`
/// for new connections, `redis.accept_legacy_plaintext`, `log.audit_quota`, the
/// master key) is applied by a reload.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! compare {
        ($($section:ident . $key:ident),* $(,)?) => {
            $(if old.$section.$key != new.$section.$key {
                changed.push(concat!(stringify!($section), ".", stringify!($key)));
            })*
        };
    }
    compare!(
        server.socket,
        server.socket_mode,
        server.max_connections,
        server.request_timeout_ms,
        keystore.path,
        keystore.user_keys,
        redis.url,
        redis.prefix,
        redis.timeout_ms,
        redis.username,
        redis.password_file,
        redis.tls_ca_file,
        redis.tls_cert_file,
        redis.tls_key_file,
        redis.sentinels,
        redis.master_name,
        redis.min_replicas_acked,
        cache.lock_memory,
        log.level,
        log.format,
        log.audit_file,
        metrics.listen,
    );
    changed
}

/// What is wrong with `redis.url`, phrased for the person who wrote it; `None` when
/// it is usable (or empty: embedded mode). Never repeats the URL, which may hold a
/// password.
pub fn redis_url_problem(url: &str) -> Option<ConfigError> {
    use redis::IntoConnectionInfo;
    const FORMS: &str =
        "redis://host:6379/0, rediss://host:6380/0 (TLS) or redis+unix:///run/redis/redis.sock";
    let bad = |why: String| Some(ConfigError::invalid("redis.url", &why));
    if url.is_empty() {
        return None;
    }
    let Some(scheme) = url.split_once("://").map(|(s, _)| s) else {
        return bad(format!("is not a URL; write it as {FORMS}"));
    };
    if ![
        "redis",
        "rediss",
        "redis+unix",
        "unix",
        "valkey",
        "valkeys",
        "valkey+unix",
    ]
    .contains(&scheme)
    {
        return bad(format!(
            "starts with {scheme:?}://, which is not a Redis scheme; write it as {FORMS}"
        ));
    }
    match url.into_connection_info() {
        Ok(_) => None,
        Err(e) => bad(format!(
            "cannot be used: {}; write it as {FORMS}",
            e.detail()
                .unwrap_or("the host, port, database number or path is malformed")
        )),
    }
}

/// Whether `level` is a level or a tracing filter whose every directive names a
/// level. tracing itself takes a bare word such as `verbose` as a target name, which
/// would silence every line, start-up errors included.
fn valid_level(level: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |l: &str| LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    !level.trim().is_empty()
        && tracing_subscriber::EnvFilter::try_new(level).is_ok()
        && level.split(',').all(|d| match d.rsplit_once('=') {
            Some((_, l)) => is_level(l),
            None => is_level(d),
        })
}

/// Whether a URL carries a password (`redis://user:secret@host`): the contract keeps
/// passwords out of config text.
fn redis_url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.split_once(':').is_some_and(|(_, p)| !p.is_empty()))
}

fn parse_mode(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_section() {
        let c = Config::parse("").unwrap();
        assert_eq!((c.pools.cooldown_s, c.pools.error_threshold), (60, 3));
        let shipped = Config::parse(include_str!("../config.toml")).unwrap();
        assert_eq!(shipped.pools.cooldown_s, 60);
        assert!(Config::parse("[pools]\nerror_threshold = 0").is_err());
        assert!(Config::parse("[pools]\nmax_cooldown_s = 0").is_err());
        assert_eq!(Config::parse("").unwrap().pools.max_cooldown_s, 3600);
        assert!(Config::parse("[pools]\ncooldown = 5").is_err());
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.socket, PathBuf::from("run/apikeyd.sock"));
        assert_eq!(c.socket_mode(), 0o660);
        assert_eq!(c.server.max_line_bytes, 65536);
        assert_eq!(c.quota.daily_limit, 20);
        assert_eq!(c.redis.prefix, "stargazer");
        assert!(c.redis.url.is_empty());
    }

    #[test]
    fn rejects_typos_and_bad_values() {
        assert!(Config::parse("[server]\nsokcet = \"x\"").is_err());
        assert!(Config::parse("[server]\nsocket_mode = \"rw\"").is_err());
        assert!(Config::parse("[quota]\non_store_error = \"maybe\"").is_err());
        assert!(Config::parse("[services.\"bad name\"]").is_err());
        assert!(Config::parse("[server]\nidle_timeout_s = 0").is_err());
        for bad in ["verbose", "", "apikeyd", "apikeyd=loud"] {
            let e = Config::parse(&format!("[log]\nlevel = {bad:?}")).unwrap_err();
            assert!(e.to_string().contains("log.level"), "{e}");
        }
        for good in ["debug", "WARN", "apikeyd=debug,warn", "off"] {
            assert!(
                Config::parse(&format!("[log]\nlevel = {good:?}")).is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn redis_urls_are_explained_without_echoing_them() {
        for good in [
            "",
            "redis://127.0.0.1:6379/0",
            "redis+unix:///run/redis.sock",
        ] {
            assert!(redis_url_problem(good).is_none(), "{good}");
        }
        for bad in [
            "localhost:6379",
            "http://h:1/0",
            "redis://:s3cret@h:notaport/0",
            "redis://h:6379/x",
        ] {
            let p = redis_url_problem(bad)
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(p.starts_with("redis.url"), "{p}");
            assert!(
                !p.contains("s3cret") && !p.contains("InvalidClientConfig"),
                "{p}"
            );
        }
    }

    #[test]
    fn connections_fit_the_open_file_limit() {
        let mut c = Config::parse("").unwrap();
        assert_eq!(c.fit_connections(1 << 20), None);
        assert_eq!(c.server.max_connections, 1024);
        assert_eq!(c.fit_connections(256), Some(1024));
        assert_eq!(c.server.max_connections, 192);
        assert_eq!(c.fit_connections(10), Some(192));
        assert_eq!(c.server.max_connections, 1);
    }

    #[test]
    fn restart_settings_are_named() {
        let old =
            Config::parse("[server]\nmax_connections = 10\n[quota]\ndaily_limit = 3").unwrap();
        let new = Config::parse(
            "[server]\nmax_connections = 11\n[quota]\ndaily_limit = 4\n[log]\nformat = \"json\"\n[redis]\naccept_legacy_plaintext = true",
        )
        .unwrap();
        assert_eq!(
            needs_restart(&old, &new),
            ["server.max_connections", "log.format"]
        );
        assert!(needs_restart(&old, &old).is_empty());
    }

    #[test]
    fn access_names_resolve_or_refuse() {
        let c =
            Config::parse("[access]\nallow_uids = [\"root\", 7]\nadmin_gids = [\"root\", \"12\"]")
                .unwrap();
        assert_eq!(c.access.ids.allow_uids, vec![0, 7]);
        assert_eq!(c.access.ids.admin_gids, vec![0, 12]);
        for bad in ["-1", "true", "\"\"", "4294967296"] {
            let e = Config::parse(&format!("[access]\nallow_uids = [{bad}]")).unwrap_err();
            assert!(e.to_string().contains("a uid or gid"), "{bad}: {e}");
        }
        let e = Config::parse("[access]\nallow_gids = [\"no-such-group-apikeyd\"]").unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("access.allow_gids") && e.contains("no-such-group-apikeyd"),
            "{e}"
        );
    }

    #[test]
    fn redis_options() {
        let c = Config::parse("redis.url = \"redis://127.0.0.1\"").unwrap();
        assert!(c.user_keys_in_redis());
        assert_eq!(c.redis.replicas_to_wait_for(), 0);
        let c = Config::parse("[redis]\nurl = \"redis://h\"\nsentinels = [\"h:26379\"]").unwrap();
        assert_eq!(c.redis.replicas_to_wait_for(), 1);
        let c = Config::parse("redis.url = \"redis://h\"\nkeystore.user_keys = \"local\"").unwrap();
        assert!(!c.user_keys_in_redis());
        assert!(!Config::parse("").unwrap().user_keys_in_redis());
        assert!(Config::parse("keystore.user_keys = \"redis\"").is_err());
        assert!(Config::parse("redis.url = \"redis://u:secret@h/0\"").is_err());
        assert!(Config::parse("redis.url = \"redis://u@h/0\"").is_ok());
        assert!(Config::parse("redis.url = \"rediss://h\"\nredis.tls_cert_file = \"c\"").is_err());
    }

    #[test]
    fn service_names_are_lower_cased() {
        let c = Config::parse("[services.OpenAI]\ndisplay_name = \"X\"").unwrap();
        assert!(c.services.contains_key("openai"));
    }

    #[test]
    fn errors_keep_their_text() {
        let text = |t: &str| Config::parse(t).err().map(|e| e.to_string());
        let cases = [
            ("server.max_line_bytes = 1", "server.max_line_bytes must be at least 64".to_string()),
            (
                "server.socket_mode = \"rw\"",
                "server.socket_mode \"rw\" is not an octal mode such as \"0660\"".into(),
            ),
            (
                "keystore.user_keys = \"redis\"",
                "keystore.user_keys = \"redis\" needs redis.url (embedded mode keeps user keys in the keystore)".into(),
            ),
            (
                "redis.url = \"redis://u:pw@h/0\"",
                "redis.url holds a password: put it in the file named by redis.password_file \
                 (or the systemd credential redis.password) and remove it from the URL"
                    .into(),
            ),
            (
                "redis.url = \"rediss://h\"\nredis.tls_cert_file = \"c\"",
                "redis.tls_cert_file and redis.tls_key_file go together".into(),
            ),
            (
                "metrics.listen = \"0.0.0.0:1\"",
                "metrics.listen \"0.0.0.0:1\" is not a loopback address; the metrics are not authenticated, so use 127.0.0.1:PORT or [::1]:PORT".into(),
            ),
            (
                "redis.url = \"localhost:6379\"",
                "redis.url is not a URL; write it as redis://host:6379/0, rediss://host:6380/0 (TLS) or redis+unix:///run/redis/redis.sock".into(),
            ),
            (
                "[services.\"bad name\"]",
                "[services.bad name]: a service name is 1-64 characters of A-Z a-z 0-9 _ . -".into(),
            ),
            (
                "access.allow_uids = [\"no-such-user-apikeyd\"]",
                "access.allow_uids: there is no user named \"no-such-user-apikeyd\" on this host".into(),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(text(input), Some(want), "{input}");
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "server.max_line_bytes = 1").unwrap();
        let e = Config::load(&path, true).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "config {}: server.max_line_bytes must be at least 64",
                path.display()
            )
        );
        let gone = dir.path().join("gone.toml");
        let e = Config::load(&gone, true).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "cannot read config {}: No such file or directory (os error 2)",
                gone.display()
            )
        );
    }
}
