//! Per-user keys in Redis (`keystore.user_keys = "redis"`, the default with a
//! redis.url): shared by every daemon, invalidated across daemons, served from the
//! cache during an outage; `import-legacy` seals clear values in place; and
//! `migrate-user-keys` both ways, killed once and rerun.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, Client, Mode, RedisServer, TestDaemon};
use redis::Commands;
use serde_json::{json, Value};

fn get(c: &mut Client, user: &str, service: &str) -> Value {
    c.ok(
        json!({"op": "get_user_api_key", "user_id": user, "service": service,
        "fallback_to_pool": false, "fallback_to_config": false}),
    )
}

/// Whether both daemons answer `key` (a string, or null for none) as alice's.
fn both_get(x: &mut Client, y: &mut Client, key: &Value) -> bool {
    get(x, "alice", "openai")["key"] == *key && get(y, "alice", "openai")["key"] == *key
}

/// How long the other daemons may take to follow a change.
const WAIT: Duration = Duration::from_secs(5);

fn set(c: &mut Client, user: &str, service: &str, key: &str) {
    c.ok(json!({"op": "set_user_api_key", "user_id": user, "service": service, "key": key}));
}

/// Long cache TTLs: only the pub/sub announcement can refresh another daemon's copy.
const LONG_TTL: &str = "[cache]\nuser_key_ttl_s = 3600\n";

#[test]
fn three_daemons_share_user_keys_and_drop_changed_ones() {
    let a = TestDaemon::start_with(Mode::Redis, LONG_TTL, &[]);
    let b = TestDaemon::start_sharing(&a, LONG_TTL);
    let c = TestDaemon::start_sharing(&a, LONG_TTL);
    let (mut ca, mut cb, mut cc) = (a.client(), b.client(), c.client());
    for cl in [&mut ca, &mut cb, &mut cc] {
        let s = cl.ok(json!({"op": "stats"}));
        assert_eq!(s["store"]["user_keys"], "redis", "{s}");
    }
    // Every daemon caches "alice has no key".
    for cl in [&mut ca, &mut cb, &mut cc] {
        assert_eq!(get(cl, "alice", "openai")["key"], Value::Null);
    }
    // Stored through A: B and C drop their cached "none" on the announcement.
    let alice = json!("sk-shared-alice-0001");
    set(&mut ca, "alice", "openai", "sk-shared-alice-0001");
    let stored = eventually("the stored key served by B and C", WAIT, || {
        both_get(&mut cb, &mut cc, &alice)
    });
    // Replaced through B, deleted through C: the others follow.
    let alice = json!("sk-shared-alice-0002");
    set(&mut cb, "alice", "openai", "sk-shared-alice-0002");
    let replaced = eventually("the replaced key served by A and C", WAIT, || {
        both_get(&mut ca, &mut cc, &alice)
    });
    let deleted =
        cc.ok(json!({"op": "delete_user_api_key", "user_id": "alice", "service": "openai"}));
    assert_eq!(deleted["deleted"], true);
    let dropped = eventually("the deleted key gone from A and B", WAIT, || {
        both_get(&mut ca, &mut cb, &Value::Null)
    });
    eprintln!(
        "invalidation delay (acknowledgement to the other daemons answering the new value): \
         store seen by both in {stored:?}; replace in {replaced:?}; delete in {dropped:?}"
    );
    // Listed the same everywhere, and never in clear in Redis.
    set(&mut ca, "bob", "anthropic", "sk-shared-bob-000003");
    eventually("bob's key listed through C", Duration::from_secs(5), || {
        cc.ok(json!({"op": "list_user_api_keys", "user_id": "bob"}))["keys"][0]["service"]
            == "anthropic"
    });
    let mut con = a.redis.as_ref().unwrap().conn();
    let raw: Vec<u8> = con
        .hget("stargazer:user_api_keys:bob", "anthropic")
        .unwrap();
    assert!(raw.starts_with(b"akd1:"), "sealed in redis");
    assert!(!common::contains(&raw, b"sk-shared-bob"));
    // A report of `unauthorized` through one daemon is seen by the others.
    let r = cb.ok(json!({"op": "report_key_result", "service": "anthropic", "user_id": "bob", "outcome": "unauthorized"}));
    assert_eq!(r["state"], "disabled");
    eventually(
        "the disabled key withheld by A with a warning",
        Duration::from_secs(5),
        || {
            let g = get(&mut ca, "bob", "anthropic");
            g["key"].is_null() && g["warning"].is_string()
        },
    );
}

#[test]
fn an_outage_serves_cached_user_keys_degraded_and_loses_nothing() {
    let redis = RedisServer::start_persistent();
    let a = TestDaemon::start_on(redis.clone(), "[cache]\nuser_key_ttl_s = 1\n", &[]);
    let mut c = a.client();
    set(&mut c, "carol", "openai", "sk-outage-carol-0001");
    let cached = get(&mut c, "carol", "openai");
    assert_eq!(cached["key"], "sk-outage-carol-0001");
    assert!(cached.get("degraded").is_none(), "{cached}");
    let misses = |c: &mut Client| {
        c.ok(json!({"op": "stats"}))["cache"]["misses"]
            .as_u64()
            .unwrap()
    };
    // The set's own announcement may reach the cache after that first read and drop
    // the entry it made: wait until a read is served from the cache.
    eventually(
        "carol's key served from the cache",
        Duration::from_secs(10),
        || {
            let before = misses(&mut c);
            get(&mut c, "carol", "openai");
            misses(&mut c) == before
        },
    );
    redis.kill();
    // Past the TTL (a miss is counted when the entry has expired) the key is still
    // served, flagged degraded.
    let before = misses(&mut c);
    eventually(
        "carol's key served degraded from the cache",
        Duration::from_secs(10),
        || {
            let g = get(&mut c, "carol", "openai");
            assert_eq!(g["key"], "sk-outage-carol-0001", "{g}");
            misses(&mut c) > before && g["degraded"] == true
        },
    );
    // Writes answer `unavailable`; nothing is half-stored.
    let (code, _) = c.err(json!({"op": "set_user_api_key", "user_id": "dave", "service": "openai", "key": "sk-outage-dave-00001"}));
    assert_eq!(code, "unavailable");
    // Redis comes back with what it acknowledged.
    // Persistent (appendfsync always): the restarted server has every acknowledged write.
    redis.restart();
    eventually(
        "carol's key served from Redis again",
        Duration::from_secs(10),
        || {
            let g = get(&mut c, "carol", "openai");
            g["key"] == "sk-outage-carol-0001" && g.get("degraded").is_none()
        },
    );
    set(&mut c, "dave", "openai", "sk-outage-dave-00001");
    assert_eq!(get(&mut c, "dave", "openai")["key"], "sk-outage-dave-00001");
}

#[test]
fn import_legacy_seals_user_keys_in_place() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let mut con = d.redis.as_ref().unwrap().conn();
    let _: () = con
        .hset_multiple(
            "stargazer:user_api_keys:erin",
            &[
                ("openai", "sk-legacy-erin-00001"),
                ("Anthropic", "sk-legacy-erin-00002"),
            ],
        )
        .unwrap();
    let mut c = d.client();
    // In clear: not served (redis.accept_legacy_plaintext is off).
    assert_eq!(get(&mut c, "erin", "openai")["key"], Value::Null);
    let out = Command::new(common::bin())
        .args(["import-legacy", "--config"])
        .arg(&d.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("sk-legacy"), "{text}");
    assert!(text.contains("2 user keys moved"), "{text}");
    let fields: Vec<(String, Vec<u8>)> = con.hgetall("stargazer:user_api_keys:erin").unwrap();
    assert_eq!(
        fields.len(),
        2,
        "{:?}",
        fields.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for (field, v) in &fields {
        assert!(v.starts_with(b"akd1:"), "{field} is sealed");
        assert_eq!(field, &field.to_ascii_lowercase());
    }
    eventually("the legacy user key served", Duration::from_secs(5), || {
        get(&mut c, "erin", "openai")["key"] == "sk-legacy-erin-00001"
    });
    assert_eq!(
        get(&mut c, "erin", "anthropic")["key"],
        "sk-legacy-erin-00002"
    );
}

const USERS: usize = 1000;
const SERVICES: usize = 10;

fn key_of(u: usize, s: usize) -> String {
    format!("sk-migrate-{u:05}-{s:02}-abcdef")
}

/// Asks for every key over one pipelined connection; answers how many resolve to
/// the key they were stored with.
fn resolve_all(d: &TestDaemon) -> usize {
    let mut c = d.client();
    let mut writer = c.try_clone_writer();
    let sender = std::thread::spawn(move || {
        let mut batch = Vec::new();
        for u in 0..USERS {
            for s in 0..SERVICES {
                batch.extend_from_slice(
                    format!(
                        "{{\"op\":\"get_user_api_key\",\"user_id\":\"m{u}\",\"service\":\"svc{s}\",\"fallback_to_pool\":false,\"fallback_to_config\":false}}\n"
                    )
                    .as_bytes(),
                );
            }
        }
        writer.write_all(&batch).unwrap();
    });
    let mut ok = 0;
    for u in 0..USERS {
        for s in 0..SERVICES {
            if c.recv()["result"]["key"] == key_of(u, s).as_str() {
                ok += 1;
            }
        }
    }
    sender.join().unwrap();
    ok
}

/// Runs `migrate-user-keys --to <to>`, SIGKILLs it once `killed_when` says so (if
/// given), and answers its output.
fn migrate(d: &TestDaemon, to: &str, killed_when: Option<&dyn Fn() -> bool>) -> (bool, String) {
    let mut child = Command::new(common::bin())
        .args(["migrate-user-keys", "--to", to, "--config"])
        .arg(&d.config_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(when) = killed_when {
        eventually(
            "the point to kill the tool at, or its exit",
            Duration::from_secs(60),
            || when() || child.try_wait().unwrap().is_some(),
        );
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("sk-migrate"), "output shows a key: {text}");
    (out.status.success(), text)
}

fn keystore_rows(d: &TestDaemon) -> i64 {
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    db.query_row("SELECT count(*) FROM user_keys", [], |r| r.get(0))
        .unwrap()
}

fn redis_keys(con: &mut redis::Connection) -> usize {
    let hashes: Vec<String> = con
        .scan_match::<_, String>("stargazer:user_api_keys:*")
        .unwrap()
        .map(|k| k.unwrap())
        .collect();
    hashes
        .iter()
        .map(|h| con.hlen::<_, usize>(h).unwrap())
        .sum()
}

#[test]
fn migrate_user_keys_both_ways_killed_once_and_rerun() {
    // A daemon that kept its keys locally; its keystore is filled directly (10,000
    // keys through the socket would spend the test on fsyncs).
    let mut d = TestDaemon::start_with(Mode::Redis, common::LOCAL_USER_KEYS, &[]);
    assert!(d.stop().success());
    {
        let master = apikeyd::keys::MasterKey::read_file(&d.path("data/master.key")).unwrap();
        let mut db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
        let tx = db.transaction().unwrap();
        for u in 0..USERS {
            for s in 0..SERVICES {
                let key = apikeyd::keys::Secret::new(key_of(u, s));
                apikeyd::store::keystore::store_user_key(
                    &tx,
                    &master,
                    &format!("m{u}"),
                    &format!("svc{s}"),
                    &key,
                )
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let total = USERS * SERVICES;
    let mut con = d.redis.as_ref().unwrap().conn();

    // To Redis: killed once some keys were moved, then rerun.
    let moved_some = || {
        let mut con = d.redis.as_ref().unwrap().conn();
        redis_keys(&mut con) > 0
    };
    let (_, first) = migrate(&d, "redis", Some(&moved_some));
    eprintln!(
        "to redis, first run killed {}: {} keys left in the keystore",
        if first.contains("done:") {
            "too late (it had finished)"
        } else {
            "mid-way"
        },
        keystore_rows(&d)
    );
    let (ok, text) = migrate(&d, "redis", None);
    assert!(ok, "{first}\n{text}");
    assert!(text.contains("0 unreadable"), "{text}");
    assert_eq!(keystore_rows(&d), 0, "{text}");
    assert_eq!(redis_keys(&mut con), total);
    let (ok, again) = migrate(&d, "redis", None);
    assert!(
        ok && again.contains("done: 0 user keys moved, 0 already there"),
        "idempotent: {again}"
    );
    d.write_config("");
    d.spawn();
    d.wait_ready();
    assert_eq!(resolve_all(&d), total, "every key resolves from redis");
    assert!(d.stop().success());

    // Back to the keystore, killed once, rerun.
    let moved_some = || keystore_rows(&d) > 0;
    let (_, first) = migrate(&d, "local", Some(&moved_some));
    eprintln!(
        "to local, first run killed {}: {} keys left in redis",
        if first.contains("done:") {
            "too late (it had finished)"
        } else {
            "mid-way"
        },
        redis_keys(&mut con)
    );
    let (ok, text) = migrate(&d, "local", None);
    assert!(ok, "{first}\n{text}");
    assert_eq!(redis_keys(&mut con), 0, "{text}");
    assert_eq!(keystore_rows(&d), total as i64);
    d.write_config(common::LOCAL_USER_KEYS);
    d.spawn();
    d.wait_ready();
    assert_eq!(
        resolve_all(&d),
        total,
        "every key resolves from the keystore"
    );
}

#[test]
fn a_new_master_key_is_refused_when_redis_holds_sealed_user_keys() {
    let a = TestDaemon::start_with(Mode::Redis, "", &[]);
    set(&mut a.client(), "fay", "openai", "sk-fleet-fay-000001");
    // Only the sealed user value can prove a fleet's key is in use: no pools, and
    // the check values removed.
    let mut con = a.redis.as_ref().unwrap().conn();
    let _: () = con.del("stargazer:apikeyd:keycheck").unwrap();
    let mut fresh = TestDaemon::prepare(Mode::Redis, a.redis.clone(), None, "", &[]);
    let (status, log) = fresh.expect_refusal();
    assert!(!status.success());
    assert!(log.contains("already holds values sealed"), "{log}");
    // A daemon with another key is refused too (the value does not open with it).
    let other = apikeyd::keys::MasterKey::generate_base64();
    let mut wrong = TestDaemon::prepare(
        Mode::Redis,
        a.redis.clone(),
        Some(other.as_bytes().to_vec()),
        "",
        &[],
    );
    let (status, log) = wrong.expect_refusal();
    assert!(!status.success());
    assert!(
        log.contains("does not open the values sealed in Redis"),
        "{log}"
    );
}

#[test]
fn rerunning_migrate_user_keys_never_deletes_a_newer_key() {
    let mut d = TestDaemon::start_with(Mode::Redis, common::LOCAL_USER_KEYS, &[]);
    let mut c = d.client();
    set(&mut c, "ana", "openai", "sk-migrate-older-0001");
    let stored_at = apikeyd::model::clock::now_s();
    // Migrated to Redis while the daemon still keeps keys locally.
    let (ok, text) = migrate(&d, "redis", None);
    assert!(ok, "{text}");
    assert!(text.contains("1 user keys moved"), "{text}");
    // The user sets a newer key (in the keystore: the daemon is still local).
    eventually("the next second", Duration::from_secs(5), || {
        apikeyd::model::clock::now_s() > stored_at
    });
    set(&mut c, "ana", "openai", "sk-migrate-newer-0002");
    // The rerun lists the conflict, exits non-zero, and copies the newer key.
    let (ok, text) = migrate(&d, "redis", None);
    assert!(!ok, "{text}");
    assert!(text.contains("conflict: user ana service openai"), "{text}");
    assert!(text.contains("1 conflicts"), "{text}");
    // Switched to keys in Redis: the user is served the newer key.
    d.write_config("[cache]\nuser_key_ttl_s = 0\n");
    d.restart();
    assert_eq!(
        get(&mut d.client(), "ana", "openai")["key"],
        "sk-migrate-newer-0002"
    );

    // The other way: a keystore row newer than Redis's key is never deleted.
    let mut con = d.redis.as_ref().unwrap().conn();
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    let master = apikeyd::keys::MasterKey::read_file(&d.path("data/master.key")).unwrap();
    apikeyd::store::keystore::store_user_key(
        &db,
        &master,
        "ana",
        "openai",
        &apikeyd::keys::Secret::new("sk-migrate-local-0003".into()),
    )
    .unwrap();
    let _: () = con
        .hset("stargazer:apikeyd:user_info:ana", "openai", 1)
        .unwrap();
    let (ok, text) = migrate(&d, "local", None);
    assert!(!ok, "{text}");
    assert!(text.contains("conflict: user ana service openai"), "{text}");
    let rows: i64 = db
        .query_row(
            "SELECT count(*) FROM user_keys WHERE user_id = 'ana'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1, "the newer keystore row stays");
    let kept: Option<String> = con.hget("stargazer:user_api_keys:ana", "openai").unwrap();
    assert!(kept.is_some(), "the older redis copy is not deleted either");
}
