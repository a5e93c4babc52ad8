//! Pool key health (docs/protocol.md, "report_key_result"): key_id in answers,
//! `report_key_result`, cooldowns that only extend, the error threshold, disable and
//! `enable_pool_key`, picks that skip cooling and disabled keys, `retry_after_s`, the
//! user-key warning, counters, and the state shared by daemons on one Redis.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, Mode, TestDaemon};
use serde_json::{json, Value};

const A: &str = "sk-health-aaaa-10293847";
const B: &str = "sk-health-bbbb-56473829";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn add(c: &mut Client, key: &str, channel: Option<&str>) -> String {
    let r =
        c.ok(json!({"op": "add_pool_key", "service": "openai", "key": key, "channel_id": channel}));
    r["key_id"].as_str().unwrap().to_string()
}

fn report(c: &mut Client, key_id: &str, outcome: &str, retry: Option<i64>) -> Value {
    c.ok(
        json!({"op": "report_key_result", "service": "openai", "key_id": key_id,
        "outcome": outcome, "retry_after_s": retry}),
    )
}

/// The keys `n` global picks hand out.
fn picked(c: &mut Client, n: usize) -> HashSet<String> {
    (0..n)
        .map(|_| {
            let r = c.ok(json!({"op": "get_pool_api_key", "service": "openai"}));
            r["key"].as_str().unwrap_or("null").to_string()
        })
        .collect()
}

fn list(c: &mut Client, channel: Option<&str>) -> Vec<Value> {
    c.ok(json!({"op": "list_pool_keys", "service": "openai", "channel_id": channel}))["keys"]
        .as_array()
        .unwrap()
        .clone()
}

fn entry<'a>(keys: &'a [Value], key_id: &str) -> &'a Value {
    keys.iter().find(|k| k["key_id"] == key_id).expect("listed")
}

fn key_id_in_answers(mode: Mode) {
    let d = TestDaemon::start_with(
        mode,
        "[services.gitea]\nbase_url = \"https://gitea.example.com\"",
        &[],
    );
    let mut c = d.client();
    let global = add(&mut c, A, None);
    let chan = add(&mut c, B, Some("c1"));
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"})),
        json!({"key": A, "key_id": global})
    );
    assert_eq!(
        c.ok(json!({"op": "get_channel_pool_api_key", "service": "openai", "channel_id": "c1"})),
        json!({"key": B, "key_id": chan})
    );
    let r = c.ok(
        json!({"op": "get_user_api_key", "user_id": "u", "service": "openai", "channel_id": "c1"}),
    );
    assert_eq!(
        r,
        json!({"key": B, "source": "channel_pool", "key_id": chan})
    );
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    assert_eq!(
        r,
        json!({"key": A, "source": "global_pool", "key_id": global})
    );
    // A user's own key has no key_id.
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-own-key-12345678"}));
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    assert_eq!(r, json!({"key": "sk-own-key-12345678", "source": "user"}));
    // Gitea tokens from a pool too.
    let tok =
        c.ok(json!({"op": "add_pool_key", "service": "gitea", "key": "gitea-token-0123456789"}));
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "u"}));
    assert_eq!(r["source"], "global_pool");
    assert_eq!(r["key_id"], tok["key_id"]);
}

fn rate_limited_cools_and_never_shortens(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[pools]\ncooldown_s = 500", &[]);
    let mut c = d.client();
    let a = add(&mut c, A, None);
    add(&mut c, B, None);
    assert_eq!(picked(&mut c, 60).len(), 2);

    let before = now();
    let r = report(&mut c, &a, "rate_limited", Some(100));
    let first = r["cooling_until"].as_i64().unwrap();
    assert_eq!(r["recorded"], true);
    assert_eq!(r["state"], "cooling");
    assert!((before + 100..=now() + 100).contains(&first), "{r}");
    // Only B is handed out while A cools down.
    assert_eq!(picked(&mut c, 60), HashSet::from([B.to_string()]));

    // A shorter Retry-After never shortens the cooldown …
    let r = report(&mut c, &a, "rate_limited", Some(5));
    assert_eq!(r["cooling_until"], first);
    let r = report(&mut c, &a, "rate_limited", Some(0));
    assert_eq!(r["cooling_until"], first);
    // … a longer one extends it, and the default is [pools] cooldown_s.
    let r = report(&mut c, &a, "rate_limited", None);
    let extended = r["cooling_until"].as_i64().unwrap();
    assert!(extended >= before + 500, "{r}");
    let r = report(&mut c, &a, "ok", None);
    assert_eq!(
        r,
        json!({"recorded": true, "state": "cooling", "cooling_until": extended})
    );

    let keys = list(&mut c, None);
    let e = entry(&keys, &a);
    assert_eq!(e["state"], "cooling");
    assert_eq!(e["cooling_until"], extended);
    assert_eq!(e["rate_limited"], 4);
    assert_eq!(e["ok"], 1);
    // An admin can end the cooldown.
    assert_eq!(
        c.ok(json!({"op": "enable_pool_key", "service": "openai", "key_id": a})),
        json!({"enabled": true})
    );
    assert_eq!(entry(&list(&mut c, None), &a)["state"], "active");
    assert_eq!(picked(&mut c, 60).len(), 2);
}

fn errors_cool_down_at_the_threshold(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[pools]\nerror_threshold = 3", &[]);
    let mut c = d.client();
    let a = add(&mut c, A, None);
    add(&mut c, B, None);
    assert_eq!(report(&mut c, &a, "error", None)["state"], "active");
    assert_eq!(report(&mut c, &a, "error", None)["state"], "active");
    assert_eq!(picked(&mut c, 60).len(), 2);
    let r = report(&mut c, &a, "error", None);
    assert_eq!(r["state"], "cooling", "{r}");
    assert!(r["cooling_until"].as_i64().unwrap() > now());
    assert_eq!(picked(&mut c, 60), HashSet::from([B.to_string()]));
    assert_eq!(entry(&list(&mut c, None), &a)["errors"], 3);
}

fn unauthorized_disables_until_enabled(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let a = add(&mut c, A, None);
    let r = report(&mut c, &a, "unauthorized", None);
    assert_eq!(
        r,
        json!({"recorded": true, "state": "disabled", "cooling_until": null})
    );
    // A disabled key never comes back by itself: no retry_after_s, the usual message.
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    assert_eq!(r["key"], Value::Null);
    assert!(r.get("retry_after_s").is_none(), "{r}");
    assert!(r["message"].as_str().unwrap().contains("set_user_api_key"));
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"})),
        json!({"key": null})
    );
    // Reports on a disabled key keep it disabled.
    assert_eq!(report(&mut c, &a, "ok", None)["state"], "disabled");
    assert_eq!(entry(&list(&mut c, None), &a)["state"], "disabled");
    assert_eq!(entry(&list(&mut c, None), &a)["unauthorized"], 1);

    // Enabling: the wrong pool or an unknown id changes nothing.
    for (key_id, channel) in [(a.as_str(), Some("c1")), ("0123456789abcdef", None)] {
        assert_eq!(
            c.ok(json!({"op": "enable_pool_key", "service": "openai", "key_id": key_id, "channel_id": channel})),
            json!({"enabled": false})
        );
    }
    assert_eq!(
        c.ok(json!({"op": "enable_pool_key", "service": "openai", "key_id": a})),
        json!({"enabled": true})
    );
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"})),
        json!({"key": A, "key_id": a})
    );
    // Removing and adding a key again starts it healthy.
    report(&mut c, &a, "unauthorized", None);
    c.ok(json!({"op": "remove_pool_key", "service": "openai", "key_id": a}));
    add(&mut c, A, None);
    assert_eq!(entry(&list(&mut c, None), &a)["state"], "active");
}

fn all_cooling_falls_through_then_retry_after(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[("ANTHROPIC_API_KEY", "sk-env-default-0001")]);
    let mut c = d.client();
    let in_channel = add(&mut c, A, Some("c1"));
    let global = add(&mut c, B, None);
    let r = c.ok(
        json!({"op": "report_key_result", "service": "openai", "key_id": in_channel,
        "channel_id": "c1", "outcome": "rate_limited", "retry_after_s": 100}),
    );
    assert_eq!(r["state"], "cooling");
    // The channel pool counts as empty: on to the global pool.
    let ask =
        json!({"op": "get_user_api_key", "user_id": "u", "service": "openai", "channel_id": "c1"});
    let r = c.ok(ask.clone());
    assert_eq!(
        r,
        json!({"key": B, "source": "global_pool", "key_id": global})
    );
    // A report with the channel finds a key of the global pool too.
    let r = c.ok(
        json!({"op": "report_key_result", "service": "openai", "key_id": global,
        "channel_id": "c1", "outcome": "rate_limited", "retry_after_s": 300}),
    );
    assert_eq!(r["state"], "cooling");

    // Nothing left: when to retry (the first key back), not how to get a key.
    let r = c.ok(ask);
    assert_eq!(r["key"], Value::Null);
    assert_eq!(r["source"], Value::Null);
    let retry = r["retry_after_s"].as_u64().unwrap();
    assert!((1..=100).contains(&retry), "{r}");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("retry") && message.contains(&retry.to_string()),
        "{message}"
    );
    assert!(!message.contains("set_user_api_key"), "{message}");
    let r = c.ok(json!({"op": "get_pool_api_key", "service": "openai"}));
    assert_eq!(r["key"], Value::Null);
    assert!(
        (1..=300).contains(&r["retry_after_s"].as_u64().unwrap()),
        "{r}"
    );
    let r =
        c.ok(json!({"op": "get_channel_pool_api_key", "service": "openai", "channel_id": "c1"}));
    assert!(
        (1..=100).contains(&r["retry_after_s"].as_u64().unwrap()),
        "{r}"
    );

    // The config default still counts as a key.
    let cooled = add_service(&mut c, "anthropic", A);
    c.ok(
        json!({"op": "report_key_result", "service": "anthropic", "key_id": cooled,
        "outcome": "rate_limited"}),
    );
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "anthropic"}));
    assert_eq!(r, json!({"key": "sk-env-default-0001", "source": "config"}));
}

fn add_service(c: &mut Client, service: &str, key: &str) -> String {
    let r = c.ok(json!({"op": "add_pool_key", "service": service, "key": key}));
    r["key_id"].as_str().unwrap().to_string()
}

fn rejected_user_key_warns_until_replaced(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let ask = json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"});
    let user_report = |outcome: &str| json!({"op": "report_key_result", "service": "openai", "user_id": "u", "outcome": outcome});
    // No key yet: nothing to record.
    assert_eq!(
        c.ok(user_report("unauthorized")),
        json!({"recorded": false, "state": null, "cooling_until": null})
    );
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-users-own-0001"}));
    assert_eq!(c.ok(ask.clone())["key"], "sk-users-own-0001");
    assert_eq!(c.ok(user_report("ok"))["state"], "active");
    assert_eq!(
        c.ok(user_report("unauthorized")),
        json!({"recorded": true, "state": "disabled", "cooling_until": null})
    );

    // Skipped, with a warning, and the usual message when nothing else is there.
    let r = c.ok(ask.clone());
    assert_eq!(r["key"], Value::Null);
    let warning = r["warning"].as_str().expect("a warning");
    assert!(
        warning.contains("rejected") && warning.contains("set_user_api_key openai"),
        "{warning}"
    );
    assert!(r["message"].as_str().unwrap().contains("set_user_api_key"));
    // Falls back to the pool, still warning.
    let pooled = add(&mut c, A, None);
    let r = c.ok(ask.clone());
    assert_eq!(r["key"], A);
    assert_eq!(r["source"], "global_pool");
    assert_eq!(r["key_id"], pooled.as_str());
    assert!(r["warning"].is_string());
    // Another user's answer carries no warning.
    let other = c.ok(json!({"op": "get_user_api_key", "user_id": "v", "service": "openai"}));
    assert!(other.get("warning").is_none(), "{other}");

    // A new key clears the mark.
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-users-new-0002"}));
    assert_eq!(
        c.ok(ask),
        json!({"key": "sk-users-new-0002", "source": "user"})
    );
}

fn picks_and_reports_are_counted(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let a = add(&mut c, A, None);
    let fresh = entry(&list(&mut c, None), &a).clone();
    for counter in ["picks", "ok", "rate_limited", "unauthorized", "errors"] {
        assert_eq!(fresh[counter], 0, "{fresh}");
    }
    assert_eq!(fresh["state"], "active");
    assert_eq!(fresh["cooling_until"], Value::Null);
    for _ in 0..25 {
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"}));
    }
    for _ in 0..5 {
        c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    }
    report(&mut c, &a, "ok", None);
    report(&mut c, &a, "ok", None);
    report(&mut c, &a, "error", None);
    // Picks reach the store in batches: poll.
    common::eventually("30 picks counted", Duration::from_secs(10), || {
        entry(&list(&mut c, None), &a)["picks"] == 30
    });
    let e = entry(&list(&mut c, None), &a).clone();
    assert_eq!(e["ok"], 2);
    assert_eq!(e["errors"], 1);
    assert_eq!(e["rate_limited"], 0);
}

fn bad_input(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let a = add(&mut c, A, None);
    let base = |extra: Value| {
        let mut r =
            json!({"op": "report_key_result", "service": "openai", "key_id": a, "outcome": "ok"});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    for (extra, param) in [
        (json!({"outcome": "exploded"}), "outcome"),
        (json!({"outcome": 3}), "outcome"),
        (json!({"outcome": null}), "outcome"),
        (json!({"retry_after_s": -1}), "retry_after_s"),
        (json!({"retry_after_s": 1.5}), "retry_after_s"),
        (json!({"retry_after_s": "30"}), "retry_after_s"),
        (json!({"key_id": null}), "key_id"),
        (json!({"user_id": "u"}), "user_id"),
        (json!({"service": "a b"}), "service"),
    ] {
        let (code, message) = c.err(base(extra.clone()));
        assert_eq!(code, "bad_request", "{extra}");
        assert!(message.contains(param), "{extra}: {message}");
    }
    let unknown = json!({"recorded": false, "state": null, "cooling_until": null});
    // A key_id of another service, another channel, or none at all is unknown.
    let other = add_service(&mut c, "anthropic", B);
    assert_eq!(
        c.ok(base(json!({"key_id": other, "outcome": "unauthorized"}))),
        unknown
    );
    assert_eq!(c.ok(base(json!({"key_id": "0123456789abcdef"}))), unknown);
    let in_channel = add(&mut c, B, Some("c1"));
    assert_eq!(
        c.ok(base(
            json!({"key_id": in_channel, "outcome": "unauthorized"})
        )),
        unknown
    );
    // Nothing was changed by any of it.
    assert_eq!(entry(&list(&mut c, None), &a)["state"], "active");
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "anthropic"}))["key"],
        B
    );
    let (code, _) = c.err(json!({"op": "enable_pool_key", "service": "openai"}));
    assert_eq!(code, "bad_request");
}

const NOBODY: u32 = 65534;

/// `enable_pool_key` is pool management: admins only; reporting is for every client.
fn enable_is_for_admins(mode: Mode) {
    let d = TestDaemon::start_with(mode, &format!("[access]\nallow_uids = [{NOBODY}]\n"), &[]);
    let a = add(&mut d.client(), A, None);
    let bin = common::open_up(&d);
    let requests = [
        json!({"op": "report_key_result", "service": "openai", "key_id": a, "outcome": "unauthorized"}),
        json!({"op": "enable_pool_key", "service": "openai", "key_id": a}),
    ];
    let out = common::call_as(&bin, &d.socket, &[], &requests);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0]["result"]["state"], "disabled", "{out:?}");
    assert_eq!(out[1]["error"]["code"], "forbidden", "{out:?}");
    assert_eq!(entry(&list(&mut d.client(), None), &a)["state"], "disabled");
}

/// One allowed client cannot take keys out of service for long: `retry_after_s` is
/// capped by `pools.max_cooldown_s`, another uid's user key cannot be reported
/// `unauthorized`, and reports are counted per uid.
fn reports_are_bounded(mode: Mode) {
    let d = TestDaemon::start_with(
        mode,
        &format!("[access]\nallow_uids = [{NOBODY}]\n[pools]\nmax_cooldown_s = 600\n"),
        &[],
    );
    let mut c = d.client();
    let a = add(&mut c, A, None);
    // Root (an admin here) stores victim's key; nobody stores its own.
    c.ok(json!({"op": "set_user_api_key", "user_id": "victim", "service": "openai", "key": "sk-victims-own-0001"}));
    let bin = common::open_up(&d);
    let user_report = |user: &str| json!({"op": "report_key_result", "service": "openai", "user_id": user, "outcome": "unauthorized"});
    let out = common::call_as(
        &bin,
        &d.socket,
        &[],
        &[
            json!({"op": "report_key_result", "service": "openai", "key_id": a,
                "outcome": "rate_limited", "retry_after_s": 1_000_000_000u64}),
            user_report("victim"),
            json!({"op": "set_user_api_key", "user_id": "mine", "service": "openai", "key": "sk-nobodys-own-0001"}),
            user_report("mine"),
        ],
    );
    assert_eq!(out.len(), 4, "{out:?}");
    let until = out[0]["result"]["cooling_until"].as_i64().unwrap();
    assert!(until <= now() + 600, "capped at max_cooldown_s: {out:?}");
    assert_eq!(out[1]["error"]["code"], "forbidden", "{out:?}");
    assert_eq!(
        out[3]["result"]["state"], "disabled",
        "its own key: {out:?}"
    );
    // The victim is still served; an admin may report it.
    let ask = json!({"op": "get_user_api_key", "user_id": "victim", "service": "openai"});
    assert_eq!(c.ok(ask.clone())["key"], "sk-victims-own-0001");
    assert_eq!(c.ok(user_report("victim"))["state"], "disabled");
    // Counted per uid.
    let metrics = c.ok(json!({"op": "metrics"})).to_string();
    assert!(
        metrics.contains(&format!(
            "apikeyd_key_reports_total{{uid=\\\"{NOBODY}\\\"}} 3"
        )),
        "{metrics}"
    );
}

in_every_mode!(
    reports_are_bounded,
    key_id_in_answers,
    rate_limited_cools_and_never_shortens,
    errors_cool_down_at_the_threshold,
    unauthorized_disables_until_enabled,
    all_cooling_falls_through_then_retry_after,
    rejected_user_key_warns_until_replaced,
    picks_and_reports_are_counted,
    bad_input,
    enable_is_for_admins,
);

/// A report on one daemon changes picks on another on the same Redis (pub/sub drops
/// its cached pool), and so does enabling.
#[test]
fn two_daemons_share_health() {
    let d1 = TestDaemon::start_with(Mode::Redis, "", &[]);
    let d2 = TestDaemon::start_sharing(&d1, "");
    let (mut c1, mut c2) = (d1.client(), d2.client());
    let a = add(&mut c1, A, None);
    add(&mut c1, B, None);
    // d2 caches the pool (cache.pool_ttl_s = 5 by default).
    common::eventually("d2 hands out both keys", Duration::from_secs(10), || {
        picked(&mut c2, 40).len() == 2
    });

    report(&mut c1, &a, "rate_limited", Some(600));
    common::eventually("d2 skips the cooling key", Duration::from_secs(10), || {
        picked(&mut c2, 40) == HashSet::from([B.to_string()])
    });
    let listed = list(&mut c2, None);
    assert_eq!(entry(&listed, &a)["state"], "cooling");

    c2.ok(json!({"op": "enable_pool_key", "service": "openai", "key_id": a}));
    common::eventually("d1 hands out A again", Duration::from_secs(10), || {
        picked(&mut c1, 40).len() == 2
    });
    report(&mut c2, &a, "unauthorized", None);
    common::eventually("d1 skips the disabled key", Duration::from_secs(10), || {
        picked(&mut c1, 40) == HashSet::from([B.to_string()])
    });
    // Picks on both daemons reach the shared counters.
    common::eventually("picks are counted", Duration::from_secs(10), || {
        entry(&list(&mut c2, None), &a)["picks"].as_u64().unwrap() > 0
    });
}

/// Counters live in a per-day hash that expires on its own after a few days.
#[test]
fn redis_counters_expire() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let mut c = d.client();
    let a = add(&mut c, A, None);
    report(&mut c, &a, "ok", None);
    c.ok(json!({"op": "get_pool_api_key", "service": "openai"}));
    let mut r = d.redis.as_ref().unwrap().conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("stargazer:apikeyd:pool_counts:*")
        .query(&mut r)
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].ends_with(":global_api_pool:openai"), "{keys:?}");
    let ttl: i64 = redis::cmd("TTL").arg(&keys[0]).query(&mut r).unwrap();
    assert!((2 * 86_400..=3 * 86_400).contains(&ttl), "ttl {ttl}");
    // The flushed picks keep the expiry.
    common::eventually("the pick is counted", Duration::from_secs(10), || {
        entry(&list(&mut c, None), &a)["picks"] == 1
    });
    let ttl: i64 = redis::cmd("TTL").arg(&keys[0]).query(&mut r).unwrap();
    assert!(ttl > 0, "ttl {ttl}");
}

/// Embedded mode drops counters older than a few days.
#[test]
fn sqlite_counters_expire() {
    let mut d = TestDaemon::start_with(Mode::Embedded, "", &[]);
    let a = add(&mut d.client(), A, None);
    report(&mut d.client(), &a, "ok", None);
    assert!(d.stop().success());
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    db.execute(
        "INSERT INTO pool_counts (day, channel_id, service, key_id, counter, count)
         VALUES ('2000-01-01', '', 'openai', ?1, 'ok', 7)",
        [&a],
    )
    .unwrap();
    drop(db);
    d.spawn();
    d.wait_ready();
    let mut c = d.client();
    assert_eq!(entry(&list(&mut c, None), &a)["ok"], 1);
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    let old: i64 = db
        .query_row(
            "SELECT count(*) FROM pool_counts WHERE day = '2000-01-01'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old, 0);
}
