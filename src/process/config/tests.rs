//! Unit tests of the config: defaults, the shipped config.toml, every validation rule.

use super::*;

#[test]
fn pools_section() {
    let c = Config::parse("").unwrap();
    assert_eq!((c.pools.cooldown_s, c.pools.error_threshold), (60, 3));
    let shipped = Config::parse(include_str!("../../../config.toml")).unwrap();
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
    for (key, bad) in [
        ("idempotency_ttl_s", 0),
        ("idempotency_ttl_s", 604_801),
        ("idempotency_max_records", 0),
    ] {
        let e = Config::parse(&format!("[server]\n{key} = {bad}")).unwrap_err();
        assert!(e.to_string().contains(&format!("server.{key}")), "{e}");
    }
    assert_eq!(
        Config::parse("").unwrap().server.idempotency_max_records,
        1_000_000
    );
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
    let old = Config::parse("[server]\nmax_connections = 10\n[quota]\ndaily_limit = 3").unwrap();
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
    let c = Config::parse("[access]\nallow_uids = [\"root\", 7]\nadmin_gids = [\"root\", \"12\"]")
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
