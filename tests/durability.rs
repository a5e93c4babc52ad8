//! What survives: restarts, kill -9 right after acknowledged writes, the master key
//! rules (docs/operations.md, "The master key"), and quota days.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Mode, TestDaemon};
use serde_json::json;

fn restart_keeps_everything(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-restart-000001"}));
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-restart-pool-01", "channel_id": "c"}));
    c.ok(json!({"op": "increment_default_key_usage", "user_id": "u", "tool_name": "t"}));
    drop(c);
    d.restart();
    let mut c = d.client();
    assert_eq!(
        c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}))["key"],
        "sk-restart-000001"
    );
    assert_eq!(
        c.ok(json!({"op": "get_channel_pool_api_key", "channel_id": "c", "service": "openai"}))
            ["key"],
        "sk-restart-pool-01"
    );
    assert_eq!(
        c.ok(json!({"op": "increment_default_key_usage", "user_id": "u", "tool_name": "t"}))
            ["count"],
        2
    );
}

fn kill9_after_acknowledged_writes_loses_nothing(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    // 300 writes pipelined in one go; every acknowledgement is read before the kill.
    let mut batch = String::new();
    for i in 0..300 {
        let req = match i % 3 {
            0 => {
                json!({"op": "set_user_api_key", "user_id": format!("u{i}"), "service": "openai", "key": format!("sk-durable-{i:05}-x")})
            }
            1 => {
                json!({"op": "add_pool_key", "service": "openai", "key": format!("sk-durable-pool-{i:05}")})
            }
            _ => {
                json!({"op": "increment_default_key_usage", "user_id": "counter", "tool_name": "t"})
            }
        };
        batch.push_str(&req.to_string());
        batch.push('\n');
    }
    let writer = c.send_in_background(batch);
    for i in 0..300 {
        let r = c.recv();
        assert_eq!(r["ok"], true, "write {i}: {r}");
    }
    writer.join().unwrap().unwrap();
    d.kill9();
    d.spawn();
    d.wait_ready();
    let mut c = d.client();
    for i in (0..300).step_by(3) {
        let r = c.ok(json!({"op": "get_user_api_key", "user_id": format!("u{i}"), "service": "openai", "fallback_to_pool": false}));
        assert_eq!(
            r["key"],
            format!("sk-durable-{i:05}-x"),
            "user key {i} lost"
        );
    }
    let pool = c.ok(json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(
        pool["keys"].as_array().unwrap().len(),
        100,
        "pool keys lost"
    );
    let r = c.ok(json!({"op": "check_default_key_limit", "user_id": "counter", "tool_name": "t", "daily_limit": 1000}));
    assert_eq!(r["current_count"], 100, "increments lost");
}

fn first_start_creates_a_private_master_key(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let key = d.path("data/master.key");
    let meta = std::fs::metadata(&key).expect("master key created");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&key).unwrap();
    assert_eq!(text.trim().len(), 44, "base64 of 32 bytes");
    assert!(
        d.logs().contains(&key.display().to_string()),
        "the log says where the key is"
    );
    let dir = std::fs::metadata(d.path("data")).unwrap();
    assert_eq!(
        dir.permissions().mode() & 0o077,
        0,
        "data folder is private"
    );
    let db = std::fs::metadata(d.path("data/keystore.sqlite3")).unwrap();
    assert_eq!(
        db.permissions().mode() & 0o077,
        0,
        "keystore file is private"
    );
}

fn refuses_missing_key_when_keys_exist(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-needs-the-key-1"}));
    assert!(d.stop().success());
    std::fs::rename(d.path("data/master.key"), d.path("master.key.bak")).unwrap();
    let (status, log) = d.expect_refusal();
    assert!(!status.success());
    assert!(
        log.contains("missing") && log.contains("master.key"),
        "{log}"
    );
    assert!(
        !d.path("data/master.key").exists(),
        "no new key may replace a lost one"
    );
    // Restoring the key brings everything back.
    std::fs::rename(d.path("master.key.bak"), d.path("data/master.key")).unwrap();
    d.spawn();
    d.wait_ready();
    assert_eq!(
        d.client()
            .ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}))["key"],
        "sk-needs-the-key-1"
    );
}

fn refuses_a_key_file_others_can_read(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    assert!(d.stop().success());
    let key = d.path("data/master.key");
    for mode in [0o640, 0o604, 0o644] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let (status, log) = d.expect_refusal();
        assert!(!status.success());
        assert!(log.contains("readable by group or others"), "{log}");
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    d.spawn();
    d.wait_ready();
}

fn refuses_a_key_that_does_not_decrypt(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, common::LOCAL_USER_KEYS, &[]);
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-sealed-with-old"}));
    assert!(d.stop().success());
    let key = d.path("data/master.key");
    std::fs::remove_file(&key).unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (status, log) = d.expect_refusal();
    assert!(!status.success());
    assert!(log.contains("does not decrypt"), "{log}");
    // keygen never overwrites.
    let out = std::process::Command::new(common::bin())
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn reads_the_key_from_systemd_credentials(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-credential-0001"}));
    assert!(d.stop().success());
    let creds = d.path("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::rename(d.path("data/master.key"), creds.join("master.key")).unwrap();
    d.set_env("CREDENTIALS_DIRECTORY", creds.to_str().unwrap());
    d.spawn();
    d.wait_ready();
    let r = d
        .client()
        .ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    assert_eq!(r["key"], "sk-credential-0001");
    assert!(
        !d.path("data/master.key").exists(),
        "no key file is created beside a credential"
    );
}

fn counts_start_at_zero_on_a_new_day(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    d.client()
        .ok(json!({"op": "increment_default_key_usage", "user_id": "u", "tool_name": "t"}));
    assert!(d.stop().success());
    // Move the counter to an old day, as a daemon running back then would have left it.
    match &d.redis {
        None => {
            let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
            db.execute("UPDATE quota SET day = '2000-01-01'", [])
                .unwrap();
        }
        Some(r) => {
            let today = format!("stargazer:apikeyd:usage:{}:u", common::utc_day());
            let _: () = redis::cmd("RENAME")
                .arg(&today)
                .arg("stargazer:apikeyd:usage:2000-01-01:u")
                .query(&mut r.conn())
                .unwrap();
        }
    }
    d.spawn();
    d.wait_ready();
    let r = d
        .client()
        .ok(json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t"}));
    assert_eq!(r["current_count"], 0);
    assert_eq!(
        d.client().ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t", "daily_limit": 1})),
        json!({"allowed": true, "current_count": 1, "daily_limit": 1})
    );
    assert!(d.stop().success());
    if d.redis.is_none() {
        let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
        let old: i64 = db
            .query_row(
                "SELECT count(*) FROM quota WHERE day = '2000-01-01'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0, "old days are purged");
    }
}

fn full_check_only_when_the_last_stop_was_not_clean(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, common::LOCAL_USER_KEYS, &[]);
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-clean-stop-0001"}));
    let skipped = |d: &TestDaemon| d.logs().matches("skipping the full check").count();
    assert_eq!(skipped(&d), 0, "a keystore never closed cleanly is checked");
    d.restart();
    assert_eq!(
        skipped(&d),
        1,
        "after a clean stop the full check is skipped"
    );
    d.kill9();
    d.spawn();
    d.wait_ready();
    assert_eq!(skipped(&d), 1, "after kill -9 the full check runs");
    assert_eq!(
        d.client()
            .ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}))["key"],
        "sk-clean-stop-0001"
    );
    // Any change to the file while stopped means a full check too.
    assert!(d.stop().success());
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    db.execute("UPDATE user_keys SET updated_at = updated_at + 1", [])
        .unwrap();
    drop(db);
    d.spawn();
    d.wait_ready();
    assert_eq!(skipped(&d), 1);
}

in_every_mode!(
    full_check_only_when_the_last_stop_was_not_clean,
    restart_keeps_everything,
    kill9_after_acknowledged_writes_loses_nothing,
    first_start_creates_a_private_master_key,
    refuses_missing_key_when_keys_exist,
    refuses_a_key_file_others_can_read,
    refuses_a_key_that_does_not_decrypt,
    reads_the_key_from_systemd_credentials,
    counts_start_at_zero_on_a_new_day,
);
