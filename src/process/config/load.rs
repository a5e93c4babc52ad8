//! Reading the config file: parsing, every problem found at once, paths resolved
//! against the file's folder, the derived settings, and what a reload cannot change.

use super::*;

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

    pub(super) fn resolve_paths(&mut self, base: &Path) {
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
    pub(super) fn problems(&self) -> Vec<ConfigError> {
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
        if self.quota.daily_limit > crate::wire::protocol::MAX_COUNT {
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
            if crate::wire::protocol::check_service(name).is_err() {
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
