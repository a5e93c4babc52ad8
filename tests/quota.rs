//! Daily default-key quotas: check, increment, atomic consume, and the messages.

mod common;

use common::{Client, Mode, TestDaemon};
use redis::Commands;
use serde_json::json;

fn counts_per_user_and_tool(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let check = |c: &mut Client, user: &str, tool: &str| {
        c.ok(json!({"op": "check_default_key_limit", "user_id": user, "tool_name": tool}))
    };
    assert_eq!(
        check(&mut c, "u1", "search"),
        json!({"allowed": true, "current_count": 0, "daily_limit": 20})
    );
    for i in 1..=3 {
        let r = c.ok(
            json!({"op": "increment_default_key_usage", "user_id": "u1", "tool_name": "search"}),
        );
        assert_eq!(r, json!({"count": i}));
    }
    assert_eq!(check(&mut c, "u1", "search")["current_count"], 3);
    assert_eq!(check(&mut c, "u1", "image")["current_count"], 0);
    assert_eq!(check(&mut c, "u2", "search")["current_count"], 0);
    let r = c.ok(json!({"op": "check_default_key_limit", "user_id": "u1", "tool_name": "search", "daily_limit": 3}));
    assert_eq!(
        r,
        json!({"allowed": false, "current_count": 3, "daily_limit": 3})
    );
    let r = c.ok(json!({"op": "check_default_key_limit", "user_id": "u1", "tool_name": "search", "daily_limit": 4}));
    assert_eq!(r["allowed"], true);
}

fn consume_stops_at_the_limit(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let consume = |c: &mut Client, limit: u64| {
        c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t", "daily_limit": limit}))
    };
    assert_eq!(
        consume(&mut c, 2),
        json!({"allowed": true, "current_count": 1, "daily_limit": 2})
    );
    assert_eq!(
        consume(&mut c, 2),
        json!({"allowed": true, "current_count": 2, "daily_limit": 2})
    );
    assert_eq!(
        consume(&mut c, 2),
        json!({"allowed": false, "current_count": 2, "daily_limit": 2})
    );
    assert_eq!(
        consume(&mut c, 2)["current_count"],
        2,
        "denied calls do not count"
    );
    assert_eq!(
        consume(&mut c, 3),
        json!({"allowed": true, "current_count": 3, "daily_limit": 3})
    );
    assert_eq!(
        consume(&mut c, 0),
        json!({"allowed": false, "current_count": 3, "daily_limit": 0})
    );
    // The default limit comes from quota.daily_limit.
    let r = c.ok(json!({"op": "consume_default_key_usage", "user_id": "v", "tool_name": "t"}));
    assert_eq!(r["daily_limit"], 20);
}

fn configured_default_limit(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[quota]\ndaily_limit = 2", &[]);
    let mut c = d.client();
    for expect in [true, true, false] {
        let r = c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t"}));
        assert_eq!(r["allowed"], expect);
        assert_eq!(r["daily_limit"], 2);
    }
}

fn atomic_consume_under_eight_concurrent_clients(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let limit = 37u64;
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket);
                let mut allowed = 0u64;
                let mut batch = String::new();
                for _ in 0..25 {
                    batch.push_str(
                        &json!({"op": "consume_default_key_usage", "user_id": "race", "tool_name": "t", "daily_limit": limit})
                            .to_string(),
                    );
                    batch.push('\n');
                }
                c.send_raw(batch.as_bytes());
                for _ in 0..25 {
                    let r = c.recv();
                    assert_eq!(r["ok"], true, "{r}");
                    if r["result"]["allowed"] == true {
                        allowed += 1;
                        assert!(r["result"]["current_count"].as_u64().unwrap() <= limit);
                    }
                }
                allowed
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(
        total, limit,
        "exactly the limit is allowed across 8 clients"
    );
    let r = d.client().ok(json!({"op": "check_default_key_limit", "user_id": "race", "tool_name": "t", "daily_limit": limit}));
    assert_eq!(r["current_count"], limit);
}

fn messages(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[services.acme]\ndisplay_name = \"Acme Search\"\nsignup_url = \"https://acme.example/keys\"\n", &[]);
    let mut c = d.client();
    let m = c.ok(json!({"op": "default_key_limit_error", "tool_name": "web_search", "current": 20, "limit": 20}))["message"]
        .as_str()
        .unwrap()
        .to_string();
    for needle in ["web_search", "20", "00:00 UTC", "set_user_api_key"] {
        assert!(m.contains(needle), "missing {needle:?} in {m}");
    }
    let m = c
        .ok(json!({"op": "default_key_limit_error", "tool_name": "img", "current": 7, "limit": 5}))
        ["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(m.contains('7') && m.contains('5'));
    let m = c.ok(json!({"op": "missing_api_key_error", "service": "ACME"}))["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        m.contains("Acme Search")
            && m.contains("https://acme.example/keys")
            && m.contains("set_user_api_key acme"),
        "{m}"
    );
    for (svc, name) in [
        ("anthropic", "Anthropic"),
        ("brave", "Brave"),
        ("wolframalpha", "Wolfram"),
        ("huggingface", "Hugging Face"),
    ] {
        let m = c.ok(json!({"op": "missing_api_key_error", "service": svc}))["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            m.contains(name) && m.contains("https://") && m.contains(svc),
            "{m}"
        );
    }
}

/// Stray data in Redis: a user's daily counter that is not a hash of counts (another
/// writer's string, or a field that is not a number) answers that user's quota calls
/// as a store failure (`degraded`, denied per the default `quota.on_store_error`),
/// names no value, changes nothing, and leaves the other users of the same script
/// batch counted as usual; with and without idempotency keys.
#[test]
fn a_stray_counter_refuses_its_user_alone() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let mut con = d.redis.as_ref().unwrap().conn();
    let usage = |user: &str| format!("stargazer:apikeyd:usage:{}:{user}", common::utc_day());
    let _: () = con.set(usage("stray"), "sk-not-a-count-0001").unwrap();
    let _: () = con.hset(usage("nan"), "t", "sk-not-a-count-0002").unwrap();
    let mut c = d.client();
    for (n, idem) in [(1, None), (2, Some("k"))] {
        let mut batch = String::new();
        for user in ["stray", "ok", "nan"] {
            let mut line =
                json!({"op": "consume_default_key_usage", "user_id": user, "tool_name": "t"});
            if let Some(k) = idem {
                line["idempotency_key"] = json!(format!("{k}-{user}"));
            }
            batch.push_str(&line.to_string());
            batch.push('\n');
        }
        let writer = c.send_in_background(batch);
        let answers: Vec<_> = (0..3).map(|_| c.recv()).collect();
        writer.join().unwrap().unwrap();
        for (answer, user) in answers.iter().zip(["stray", "ok", "nan"]) {
            if user == "ok" {
                assert_eq!(answer["result"]["allowed"], true, "{answer}");
                assert_eq!(answer["result"]["current_count"], n, "{answer}");
            } else {
                assert_eq!(
                    answer["result"],
                    json!({"allowed": false, "current_count": 0, "daily_limit": 20, "degraded": true}),
                    "{user}: {answer}"
                );
            }
        }
    }
    let stray: String = con.get(usage("stray")).unwrap();
    assert_eq!(stray, "sk-not-a-count-0001");
    let nan: String = con.hget(usage("nan"), "t").unwrap();
    assert_eq!(nan, "sk-not-a-count-0002");
    let logs = d.logs();
    // Each is refused as the call's own stray counter, not as a refusal of the server's.
    for user in ["stray", "nan"] {
        let said = |l: &&str| {
            l.contains("the counter is not a hash of counts") && l.contains(&usage(user))
        };
        assert!(logs.lines().any(|l| said(&l)), "{user}: {logs}");
    }
    assert!(!logs.contains("sk-not-a-count"), "{logs}");
}

in_every_mode!(
    counts_per_user_and_tool,
    consume_stops_at_the_limit,
    configured_default_limit,
    atomic_consume_under_eight_concurrent_clients,
    messages,
);
