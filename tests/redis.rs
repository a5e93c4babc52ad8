//! Redis mode specifics (docs/operations.md, "Redis mode"): key names, nothing in
//! clear, values bound to their hash, counter expiry, two daemons on one Redis,
//! outages, legacy import.
//! The behavioural suite of every other test file also runs in Redis mode.

mod common;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::time::Duration;

use common::{contains, eventually, Client, Mode, RedisServer, TestDaemon, CANARY};
use redis::Commands;
use serde_json::{json, Value};

fn redis_daemon(extra: &str) -> TestDaemon {
    TestDaemon::start_with(Mode::Redis, extra, &[])
}

fn all_keys(con: &mut redis::Connection) -> BTreeSet<String> {
    con.scan::<String>().unwrap().map(|k| k.unwrap()).collect()
}

#[test]
fn key_names_follow_the_layout() {
    let d = redis_daemon("redis.prefix = \"acme\"\n");
    let mut c = d.client();
    c.ok(json!({"op": "add_pool_key", "service": "OpenAI", "key": "sk-layout-global-01"}));
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-layout-chan-0001", "channel_id": "c:1"}));
    c.ok(json!({"op": "consume_default_key_usage", "user_id": "u1", "tool_name": "web"}));
    let mut con = d.redis.as_ref().unwrap().conn();
    let expected: BTreeSet<String> = [
        "acme:global_api_pool:openai".to_string(),
        "acme:channel_api_pool:c:1:openai".to_string(),
        "acme:apikeyd:pool_info:global_api_pool:openai".to_string(),
        "acme:apikeyd:pool_info:channel_api_pool:c:1:openai".to_string(),
        format!("acme:apikeyd:usage:{}:u1", common::utc_day()),
        "acme:apikeyd:keycheck".to_string(),
    ]
    .into();
    // The fleet set, and one heartbeat per live daemon, named after its host, pid and
    // a random part.
    eventually(
        "the fleet heartbeat under the prefix",
        Duration::from_secs(10),
        || {
            all_keys(&mut con)
                .iter()
                .any(|k| k.starts_with("acme:apikeyd:fleet:"))
        },
    );
    let (beats, rest): (BTreeSet<String>, BTreeSet<String>) = all_keys(&mut con)
        .into_iter()
        .partition(|k| k.starts_with("acme:apikeyd:fleet:"));
    let mut expected = expected;
    expected.insert("acme:apikeyd:fleet".to_string());
    assert_eq!(rest, expected);
    assert_eq!(beats.len(), 1, "{beats:?}");
    // One field per key: field = key_id, value = an envelope.
    let pool: Vec<(String, String)> = con.hgetall("acme:global_api_pool:openai").unwrap();
    let listed = c.ok(json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(pool.len(), 1);
    assert_eq!(listed["keys"][0]["key_id"], pool[0].0.as_str());
    assert!(pool[0].1.starts_with("akd1:"));
    let count: u64 = con
        .hget(
            format!("acme:apikeyd:usage:{}:u1", common::utc_day()),
            "web",
        )
        .unwrap();
    assert_eq!(count, 1);
}

#[test]
fn no_key_in_clear_anywhere_in_redis() {
    let d = redis_daemon("");
    let mut c = d.client();
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": CANARY, "label": "canary"}));
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": CANARY, "channel_id": "c"}));
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": CANARY}));
    c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t"}));
    // Health marks and counters of the user key and a pool key hold no key either.
    c.ok(json!({"op": "report_key_result", "service": "openai", "user_id": "u", "outcome": "unauthorized"}));
    let key_id = c.ok(json!({"op": "list_pool_keys", "service": "openai", "channel_id": "c"}))
        ["keys"][0]["key_id"]
        .clone();
    let r = c.ok(json!({"op": "report_key_result", "service": "openai", "key_id": key_id, "channel_id": "c", "outcome": "rate_limited"}));
    assert_eq!(r["state"], "cooling", "{r}");
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": CANARY}));
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"],
        CANARY
    );
    let mut con = d.redis.as_ref().unwrap().conn();
    let keys = all_keys(&mut con);
    assert!(keys.len() >= 4);
    let windows: Vec<&[u8]> = CANARY.as_bytes().windows(8).collect();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query(&mut con).unwrap();
        let mut blobs: Vec<Vec<u8>> = vec![k.clone().into_bytes()];
        match kind.as_str() {
            "hash" => {
                let h: Vec<(Vec<u8>, Vec<u8>)> = con.hgetall(&k).unwrap();
                for (f, v) in h {
                    blobs.push(f);
                    blobs.push(v);
                }
            }
            "string" => blobs.push(con.get(&k).unwrap()),
            "set" => blobs.extend(con.smembers::<_, Vec<Vec<u8>>>(&k).unwrap()),
            other => panic!("unexpected {other} at {k}"),
        }
        for b in blobs {
            for w in &windows {
                assert!(!contains(&b, w), "{k} holds the canary in clear");
            }
        }
    }
    // Nor in the daemon's own data folder (user keys live in Redis by default; the
    // keystore holds the check value and the pool health of embedded mode).
    drop(c);
    for (path, bytes) in common::files_below(&d.path("data")) {
        for w in &windows {
            assert!(!contains(&bytes, w), "{} holds the canary", path.display());
        }
    }
}

#[test]
fn a_value_copied_to_another_hash_is_not_served() {
    let d = redis_daemon("");
    let mut c = d.client();
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-only-for-c1-0001", "channel_id": "c1"}));
    let mut con = d.redis.as_ref().unwrap().conn();
    let fields: Vec<(String, String)> =
        con.hgetall("stargazer:channel_api_pool:c1:openai").unwrap();
    let (field, value) = fields[0].clone();
    for hash in [
        "stargazer:channel_api_pool:c2:openai",
        "stargazer:channel_api_pool:c1:anthropic",
        "stargazer:global_api_pool:openai",
    ] {
        let _: () = con.hset(hash, &field, &value).unwrap();
    }
    let r =
        c.ok(json!({"op": "get_channel_pool_api_key", "channel_id": "c2", "service": "openai"}));
    assert_eq!(r["key"], Value::Null);
    let r =
        c.ok(json!({"op": "get_channel_pool_api_key", "channel_id": "c1", "service": "anthropic"}));
    assert_eq!(r["key"], Value::Null);
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "x", "service": "openai", "fallback_to_config": false}));
    assert_eq!(
        r["key"],
        Value::Null,
        "moved global value must not be served: {r}"
    );
    let r =
        c.ok(json!({"op": "get_channel_pool_api_key", "channel_id": "c1", "service": "openai"}));
    assert_eq!(r["key"], "sk-only-for-c1-0001");
    let log = d.logs();
    assert!(
        log.contains("integrity") && log.contains("stargazer:channel_api_pool:c2:openai"),
        "{log}"
    );
}

#[test]
fn tcp_urls_work_too() {
    let redis = RedisServer::start_tcp();
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    let d = TestDaemon::start_on(redis, "", &[]);
    let mut c = d.client();
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-over-tcp-000001"}));
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"],
        "sk-over-tcp-000001"
    );
    let r = c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t"}));
    assert_eq!(r["current_count"], 1);
    assert_eq!(
        c.ok(json!({"op": "stats"}))["store"]["redis_connected"],
        true
    );
}

#[test]
fn counters_expire_after_the_day() {
    let d = redis_daemon("");
    let mut c = d.client();
    c.ok(json!({"op": "increment_default_key_usage", "user_id": "a", "tool_name": "t"}));
    c.ok(json!({"op": "consume_default_key_usage", "user_id": "b", "tool_name": "t"}));
    let mut con = d.redis.as_ref().unwrap().conn();
    for user in ["a", "b"] {
        let ttl: i64 = con
            .ttl(format!(
                "stargazer:apikeyd:usage:{}:{user}",
                common::utc_day()
            ))
            .unwrap();
        assert!(ttl > 0 && ttl <= 86_400 + 3_600 + 5, "ttl {ttl} for {user}");
    }
}

#[test]
fn two_daemons_on_one_redis_share_pools_and_quotas() {
    let a = redis_daemon(common::LOCAL_USER_KEYS);
    // B caches pools for an hour: only the pub/sub announcement can refresh it.
    let b = TestDaemon::start_sharing(
        &a,
        &format!("{}[cache]\npool_ttl_s = 3600\n", common::LOCAL_USER_KEYS),
    );
    let (mut ca, mut cb) = (a.client(), b.client());
    let pick = |c: &mut Client| {
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"].clone()
    };
    assert_eq!(pick(&mut cb), Value::Null);
    let added =
        ca.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-shared-pool-0001"}));
    let seen = eventually(
        "B serves the pool key added through A",
        Duration::from_secs(5),
        || pick(&mut cb) == "sk-shared-pool-0001",
    );
    eprintln!("add through A seen by B after {seen:?}");
    let id = added["key_id"].as_str().unwrap();
    assert_eq!(
        cb.ok(json!({"op": "list_pool_keys", "service": "openai"}))["keys"][0]["key_id"],
        id,
        "key ids agree across daemons"
    );
    // Remove through B: A (default pool TTL) and B both stop serving it.
    assert_eq!(pick(&mut ca), "sk-shared-pool-0001");
    cb.ok(json!({"op": "remove_pool_key", "service": "openai", "key_id": id}));
    let seen = eventually(
        "A stops serving the pool key removed through B",
        Duration::from_secs(5),
        || pick(&mut ca) == Value::Null,
    );
    eprintln!("remove through B seen by A after {seen:?}");
    assert_eq!(pick(&mut cb), Value::Null);
    // Quotas are shared: 10 consumes alternating between daemons, limit 7.
    let mut allowed = 0;
    for i in 0..10 {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        let r = c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t", "daily_limit": 7}));
        allowed += r["allowed"].as_bool().unwrap() as u32;
    }
    assert_eq!(allowed, 7);
    // Per-user keys stay per daemon.
    ca.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-only-on-a-00001"}));
    let r = cb.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai", "fallback_to_config": false}));
    assert_eq!(r["key"], Value::Null);
}

#[test]
fn survives_a_redis_outage_and_recovers_by_itself() {
    // Per-user keys in the keystore: they resolve however long Redis is down.
    let a = TestDaemon::start_with(
        Mode::Redis,
        common::LOCAL_USER_KEYS,
        &[("OUTAGE_API_KEY", "sk-env-default-0001")],
    );
    let b = TestDaemon::start_sharing(
        &a,
        &format!("{}[cache]\npool_ttl_s = 3600\n", common::LOCAL_USER_KEYS),
    );
    let redis = a.redis.clone().unwrap();
    let mut c = a.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-user-own-key-01"}));
    redis.kill();
    let stats = |c: &mut Client| c.ok(json!({"op": "stats"}))["store"]["redis_connected"].clone();
    // A failed command or the health check notices within about a second.
    c.call(json!({"op": "get_pool_api_key", "service": "openai"}));
    eventually("redis_connected false", Duration::from_secs(5), || {
        stats(&mut c) == false
    });

    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    assert_eq!(
        (r["key"].clone(), r["source"].clone(), r["degraded"].clone()),
        (json!("sk-user-own-key-01"), json!("user"), json!(true))
    );
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "v", "service": "outage"}));
    assert_eq!(
        (r["key"].clone(), r["source"].clone(), r["degraded"].clone()),
        (json!("sk-env-default-0001"), json!("config"), json!(true))
    );
    let r = c.ok(json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t"}));
    assert_eq!(
        (r["allowed"].clone(), r["degraded"].clone()),
        (json!(false), json!(true))
    );
    let r = c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t"}));
    assert_eq!(
        (r["allowed"].clone(), r["degraded"].clone()),
        (json!(false), json!(true))
    );
    for req in [
        json!({"op": "increment_default_key_usage", "user_id": "u", "tool_name": "t"}),
        json!({"op": "add_pool_key", "service": "openai", "key": "sk-during-outage-01"}),
        json!({"op": "remove_pool_key", "service": "openai", "key_id": "abc"}),
        json!({"op": "list_pool_keys", "service": "openai"}),
    ] {
        assert_eq!(c.err(req).0, "unavailable");
    }
    // Writes to the keystore still work.
    c.ok(json!({"op": "set_user_api_key", "user_id": "w", "service": "openai", "key": "sk-written-in-outage"}));

    redis.restart();
    eventually("redis_connected true", Duration::from_secs(10), || {
        stats(&mut c) == true
    });
    // Pub/sub is back too: a change through A reaches B's hour-long pool cache.
    let mut cb = b.client();
    eventually("B reconnected to Redis", Duration::from_secs(10), || {
        cb.ok(json!({"op": "stats"}))["store"]["redis_connected"] == true
    });
    // The first command after the restart finds B's connection dead and retries once.
    assert_eq!(
        cb.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"],
        Value::Null
    );
    // The subscription may come back a moment after the command connection.
    eventually(
        "B's pool cache refreshed by pub/sub after the restart",
        Duration::from_secs(10),
        || {
            c.ok(json!({"op": "remove_pool_key", "service": "openai", "key_id": "nothing"}));
            c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-after-restart-01"}));
            cb.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"]
                == "sk-after-restart-01"
        },
    );
    let r = c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t"}));
    assert_eq!(
        r,
        json!({"allowed": true, "current_count": 1, "daily_limit": 20})
    );
}

#[test]
fn on_store_error_allow() {
    let d = redis_daemon("[quota]\non_store_error = \"allow\"\n");
    d.redis.as_ref().unwrap().kill();
    let mut c = d.client();
    let r = c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t"}));
    assert_eq!(
        (r["allowed"].clone(), r["degraded"].clone()),
        (json!(true), json!(true))
    );
}

#[test]
fn legacy_plaintext_pools_are_skipped_or_served_by_setting() {
    for (accept, served) in [(false, Value::Null), (true, json!("sk-legacy-clear-0001"))] {
        let d = redis_daemon(&format!("redis.accept_legacy_plaintext = {accept}\n"));
        let mut con = d.redis.as_ref().unwrap().conn();
        let _: () = con
            .hset(
                "stargazer:global_api_pool:openai",
                "0",
                "sk-legacy-clear-0001",
            )
            .unwrap();
        let mut c = d.client();
        for _ in 0..3 {
            assert_eq!(
                c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"],
                served
            );
            // Skip the pool cache so every round reads Redis again.
            c.ok(json!({"op": "remove_pool_key", "service": "openai", "key_id": "none"}));
        }
        let log = d.logs();
        let warnings = log.matches("stored in clear").count();
        assert_eq!(
            warnings, 1,
            "one warning per hash, accept = {accept}:\n{log}"
        );
        assert!(!log.contains("sk-legacy-clear"));
    }
}

#[test]
fn import_legacy_moves_keys_and_encrypts_pools() {
    let d = redis_daemon(common::LOCAL_USER_KEYS);
    let redis = d.redis.clone().unwrap();
    let mut con = redis.conn();
    // Data as the original module wrote it.
    let _: () = con
        .hset_multiple(
            "stargazer:user_api_keys:alice",
            &[
                ("openai", "sk-legacy-alice-0001"),
                ("Anthropic", "sk-ant-alice-0002"),
            ],
        )
        .unwrap();
    let _: () = con
        .hset(
            "stargazer:user_api_keys:bob",
            "bad service",
            "sk-legacy-bob-0003",
        )
        .unwrap();
    let _: () = con
        .hset(
            "stargazer:global_api_pool:openai",
            "k1",
            "sk-legacy-pool-0004",
        )
        .unwrap();
    let _: () = con
        .hset(
            "stargazer:channel_api_pool:c:9:openai",
            "k2",
            "sk-legacy-chan-0005",
        )
        .unwrap();
    let mut c = d.client();
    let get = |c: &mut Client| {
        c.ok(json!({"op": "get_user_api_key", "user_id": "alice", "service": "openai", "fallback_to_config": false}))
    };
    // Before: the daemon does not know alice, and caches that.
    assert_eq!(get(&mut c)["key"], Value::Null);
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"],
        Value::Null
    );

    let run = |extra: &[&str]| {
        let (status, text) = common::tool("import-legacy", &d.config_path, extra);
        // Bob's invalid entry is skipped by every run, which therefore exits 1.
        assert_eq!(status.code(), Some(1), "{text}");
        assert!(text.contains("1 skipped"), "{text}");
        assert!(
            !text.contains("sk-legacy") && !text.contains("sk-ant"),
            "output shows a key: {text}"
        );
        text
    };
    let dry = run(&["--dry-run"]);
    assert!(
        dry.contains("2 user keys moved")
            && dry.contains("2 pool values encrypted")
            && dry.contains("1 skipped"),
        "{dry}"
    );
    assert_eq!(
        con.hlen::<_, u64>("stargazer:user_api_keys:alice").unwrap(),
        2,
        "dry run changes nothing"
    );
    assert_eq!(get(&mut c)["key"], Value::Null);

    let done = run(&[]);
    assert!(done.contains("2 user keys moved"), "{done}");
    // The running daemon's cached "none" was dropped by the announcement.
    eventually("the legacy user key served", Duration::from_secs(5), || {
        get(&mut c)["key"] == "sk-legacy-alice-0001"
    });
    assert_eq!(get(&mut c)["source"], "user");
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "alice", "service": "anthropic"}));
    assert_eq!(r["key"], "sk-ant-alice-0002");
    assert!(
        !con.exists::<_, bool>("stargazer:user_api_keys:alice")
            .unwrap(),
        "moved fields are deleted"
    );
    assert_eq!(
        con.hlen::<_, u64>("stargazer:user_api_keys:bob").unwrap(),
        1,
        "invalid entries stay"
    );
    let pool: Vec<(String, String)> = con.hgetall("stargazer:global_api_pool:openai").unwrap();
    assert_eq!(pool.len(), 1);
    assert!(pool[0].1.starts_with("akd1:"));
    eventually("the legacy pool key served", Duration::from_secs(5), || {
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"] == "sk-legacy-pool-0004"
    });
    let r =
        c.ok(json!({"op": "get_channel_pool_api_key", "channel_id": "c:9", "service": "openai"}));
    assert_eq!(r["key"], "sk-legacy-chan-0005");

    let again = run(&[]);
    assert!(
        again.contains("0 user keys moved") && again.contains("0 pool values encrypted"),
        "{again}"
    );
}

#[test]
fn a_pool_field_that_is_not_utf8_hides_no_other_key() {
    let d = redis_daemon("[cache]\npool_ttl_s = 0\n");
    let mut c = d.client();
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-beside-a-bad-field"}));
    let mut con = d.redis.as_ref().unwrap().conn();
    let _: () = redis::cmd("HSET")
        .arg("stargazer:global_api_pool:openai")
        .arg(b"\xff\xfe".as_slice())
        .arg("junk")
        .query(&mut con)
        .unwrap();
    let r = c.ok(json!({"op": "get_pool_api_key", "service": "openai"}));
    assert_eq!(r["key"], "sk-beside-a-bad-field");
    let listed = c.ok(json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1, "{listed}");
    assert!(d.logs().contains("not UTF-8"));
}

/// Increments and consumes from many connections reach Redis in shared scripts (a
/// group commit, docs/performance.md). Each call still counts alone and atomically,
/// a connection's calls stay in order, and a counter that is not a hash (a stray or
/// hostile write) fails only its own calls, changing nothing else.
#[test]
fn quota_calls_share_scripts_and_are_answered_alone() {
    let d = redis_daemon("");
    let mut con = d.redis.as_ref().unwrap().conn();
    let broken = format!("stargazer:apikeyd:usage:{}:broken", common::utc_day());
    let _: () = con.set(&broken, "not a hash").unwrap();
    let (threads, rounds, limit) = (8, 15, 100u64);
    let socket = d.socket.clone();
    let answers: Vec<Vec<Value>> = (0..threads)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket);
                let mut lines = String::new();
                for _ in 0..rounds {
                    for req in [
                        json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t", "daily_limit": limit}),
                        json!({"op": "increment_default_key_usage", "user_id": "v", "tool_name": "t"}),
                        json!({"op": "consume_default_key_usage", "user_id": "broken", "tool_name": "t", "daily_limit": limit}),
                    ] {
                        lines.push_str(&req.to_string());
                        lines.push('\n');
                    }
                }
                c.send_raw(lines.as_bytes());
                (0..3 * rounds).map(|_| c.recv()).collect()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();

    let (mut allowed, mut increments) = (0, Vec::new());
    for answers in &answers {
        let mut last_u = 0;
        for round in answers.chunks(3) {
            let (u, v, b) = (
                &round[0]["result"],
                &round[1]["result"],
                &round[2]["result"],
            );
            assert_eq!(u["degraded"], Value::Null, "{u}");
            let count = u["current_count"].as_u64().unwrap();
            assert!(
                count >= last_u && count <= limit,
                "in order, never past the limit: {u}"
            );
            last_u = count;
            if u["allowed"] == true {
                allowed += 1;
            }
            increments.push(v["count"].as_u64().unwrap());
            assert_eq!(b["degraded"], true, "the broken counter fails alone: {b}");
            assert_eq!(b["allowed"], false, "{b}");
        }
    }
    assert_eq!(allowed, limit, "exactly the limit is allowed");
    increments.sort_unstable();
    let expected: Vec<u64> = (1..=(threads * rounds) as u64).collect();
    assert_eq!(increments, expected, "every increment counted once");
    let usage = |user: &str| format!("stargazer:apikeyd:usage:{}:{user}", common::utc_day());
    assert_eq!(con.hget::<_, _, u64>(usage("u"), "t").unwrap(), limit);
    assert_eq!(
        con.hget::<_, _, u64>(usage("v"), "t").unwrap(),
        (threads * rounds) as u64
    );
    assert_eq!(con.get::<_, String>(&broken).unwrap(), "not a hash");

    let store = d.client().ok(json!({"op": "stats"}))["store"].clone();
    let calls = store["quota_batched_calls"].as_u64().unwrap();
    let batches = store["quota_batches"].as_u64().unwrap();
    assert_eq!(calls, 3 * (threads * rounds) as u64, "{store}");
    assert!(batches < calls, "concurrent calls shared scripts: {store}");
    assert!(
        d.logs().contains("redis refused a quota count"),
        "the refusal is logged"
    );
}

/// Redis killed and restarted three times (persistent: the user's key survives)
/// while a user with a cached key asks for it, at least 1,000 times: every answer is
/// that key (flagged degraded while Redis cannot be asked) or, when it cannot be
/// known, no key with degraded and the outage message; never the operator's
/// default nor a pool key. Each round asks on until the daemon has resubscribed to
/// invalidations (which expires every cached user key) and serves the key fresh.
#[test]
fn a_redis_restart_never_serves_another_key_in_place_of_the_users() {
    let redis = RedisServer::start_persistent();
    let d = TestDaemon::start_on(
        redis.clone(),
        "[cache]\nuser_key_ttl_s = 1\n",
        &[("OPENAI_API_KEY", "sk-operator-default-0001")],
    );
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-users-own-key-0001"}));
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-pool-key-0000001"}));
    let (asked, own, unknown) = (Cell::new(0), Cell::new(0), Cell::new(0));
    // One answer, checked; whether it was the user's key, served fresh.
    let ask = |c: &mut Client| {
        let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
        asked.set(asked.get() + 1);
        match r["key"].as_str() {
            Some("sk-users-own-key-0001") => own.set(own.get() + 1),
            None => {
                assert_eq!(r["degraded"], true, "{r}");
                let message = r["message"].as_str().unwrap();
                assert!(message.contains("temporarily unavailable"), "{r}");
                unknown.set(unknown.get() + 1);
            }
            Some(_) => panic!(
                "answer {} served another key in place of the user's: {r}",
                asked.get()
            ),
        }
        r["key"].is_string() && r.get("degraded").is_none()
    };
    assert!(ask(&mut c));
    let connected =
        |c: &mut Client| c.ok(json!({"op": "stats"}))["store"]["redis_connected"] == true;
    let subscriptions =
        |d: &TestDaemon| d.logs().matches("subscribed to pool invalidations").count();
    for _ in 0..3 {
        redis.kill();
        eventually(
            "the daemon sees Redis down",
            Duration::from_secs(10),
            || {
                ask(&mut c);
                !connected(&mut c)
            },
        );
        let before = subscriptions(&d);
        redis.restart();
        eventually(
            "pub/sub subscribed again and answers served",
            Duration::from_secs(20),
            || ask(&mut c) && subscriptions(&d) > before && ask(&mut c),
        );
    }
    while asked.get() < 1000 {
        ask(&mut c);
    }
    assert!(own.get() > 0, "{own:?} own, {unknown:?} unknown");
}

/// During an outage a user whose key this daemon has not seen gets no key (degraded,
/// the outage message), not the default: the user may have a key. A user known to
/// have none still gets the pool.
#[test]
fn an_unknown_user_key_during_an_outage_is_no_key_not_the_default() {
    let d = TestDaemon::start_with(
        Mode::Redis,
        "",
        &[("OPENAI_API_KEY", "sk-operator-default-0001")],
    );
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "w", "service": "openai", "key": "sk-w-own-key-000001"}));
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-pool-key-0000001"}));
    let get = |c: &mut Client, user: &str| {
        c.ok(json!({"op": "get_user_api_key", "user_id": user, "service": "openai"}))
    };
    assert_eq!(get(&mut c, "nokey")["source"], "global_pool");
    d.redis.as_ref().unwrap().kill();
    eventually("redis_connected false", Duration::from_secs(10), || {
        c.ok(json!({"op": "stats"}))["store"]["redis_connected"] == false
    });
    let r = get(&mut c, "w");
    assert_eq!(
        (r["key"].clone(), r["source"].clone(), r["degraded"].clone()),
        (Value::Null, Value::Null, json!(true)),
        "{r}"
    );
    assert!(
        common::text(&r["message"]).contains("temporarily unavailable"),
        "{r}"
    );
    let r = get(&mut c, "nokey");
    assert_eq!(r["source"], "global_pool", "{r}");
    assert_eq!(r["degraded"], true, "{r}");
}
