//! Idempotency keys on writes: a repeat within the TTL gets the first answer with
//! `"replayed": true` and applies nothing; the same key with other parameters is
//! `idempotency_conflict`; records are per uid, expire, and (in Redis mode) are
//! shared by the daemons of one Redis.

mod common;

use std::time::Duration;

use common::{call_as, contains, files_below, open_up, Client, Mode, TestDaemon, CANARY};
use serde_json::{json, Value};

/// Today's count of `tool` for `user`, read without counting.
fn count(c: &mut Client, user: &str, tool: &str) -> u64 {
    c.ok(json!({"op": "check_default_key_limit", "user_id": user, "tool_name": tool}))
        ["current_count"]
        .as_u64()
        .unwrap()
}

fn consume(key: &str) -> Value {
    json!({"op": "consume_default_key_usage", "user_id": "u1", "tool_name": "search",
        "daily_limit": 10, "idempotency_key": key})
}

/// `req` sent twice: the first applies, the second (another id) answers the same
/// result marked replayed.
fn twice(c: &mut Client, req: Value) -> Value {
    let mut first = req.clone();
    first["id"] = json!("first");
    let mut second = req;
    second["id"] = json!("second");
    let a = c.call(first);
    assert_eq!(a["ok"], true, "{a}");
    assert!(
        a.get("replayed").is_none(),
        "a first run is not replayed: {a}"
    );
    let b = c.call(second);
    assert_eq!(b["ok"], true, "{b}");
    assert_eq!(b["replayed"], true, "{b}");
    assert_eq!(b["id"], "second");
    assert_eq!(a["result"], b["result"]);
    a["result"].clone()
}

fn replay_answers_the_first_answer_and_applies_nothing(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let r = twice(&mut c, consume("k-consume"));
    assert_eq!(r["current_count"], 1);
    assert_eq!(count(&mut c, "u1", "search"), 1);
    // Without a key every call counts, as before.
    c.ok(json!({"op": "consume_default_key_usage", "user_id": "u1", "tool_name": "search"}));
    assert_eq!(count(&mut c, "u1", "search"), 2);

    let r = twice(
        &mut c,
        json!({"op": "increment_default_key_usage", "user_id": "u1", "tool_name": "search",
        "idempotency_key": "k-incr"}),
    );
    assert_eq!(r["count"], 3);
    assert_eq!(count(&mut c, "u1", "search"), 3);

    twice(
        &mut c,
        json!({"op": "set_user_api_key", "user_id": "u2", "service": "openai",
        "key": "sk-idem-first-0001", "idempotency_key": "k-set"}),
    );
    // The replay did not store anything again: a key set in between stays.
    c.ok(json!({"op": "set_user_api_key", "user_id": "u2", "service": "openai", "key": "sk-idem-second-0002"}));
    let again = c.call(
        json!({"op": "set_user_api_key", "user_id": "u2", "service": "openai",
        "key": "sk-idem-first-0001", "idempotency_key": "k-set"}),
    );
    assert_eq!(again["replayed"], true, "{again}");
    let got = c.ok(json!({"op": "get_user_api_key", "user_id": "u2", "service": "openai"}));
    assert_eq!(got["key"], "sk-idem-second-0002");

    let r = twice(
        &mut c,
        json!({"op": "delete_user_api_key", "user_id": "u2", "service": "openai",
        "idempotency_key": "k-del"}),
    );
    assert_eq!(r["deleted"], true, "the replay says what the first run did");

    let r = twice(
        &mut c,
        json!({"op": "add_pool_key", "service": "openai", "key": "sk-idem-pool-0003",
        "idempotency_key": "k-add"}),
    );
    assert_eq!(r["added"], true);
    let key_id = r["key_id"].as_str().unwrap().to_string();
    let r = twice(
        &mut c,
        json!({"op": "report_key_result", "service": "openai", "key_id": key_id,
        "outcome": "rate_limited", "retry_after_s": 60, "idempotency_key": "k-report"}),
    );
    assert_eq!(r["state"], "cooling");
    let listed = c.ok(json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(
        listed["keys"][0]["rate_limited"], 1,
        "counted once: {listed}"
    );
    let r = twice(
        &mut c,
        json!({"op": "enable_pool_key", "service": "openai", "key_id": key_id,
        "idempotency_key": "k-enable"}),
    );
    assert_eq!(r["enabled"], true);
    let r = twice(
        &mut c,
        json!({"op": "remove_pool_key", "service": "openai", "key_id": key_id,
        "idempotency_key": "k-remove"}),
    );
    assert_eq!(r["removed"], true);

    let stats = c.ok(json!({"op": "stats"}));
    let figures = &stats["idempotency"];
    assert_eq!(figures["replayed"], 9, "{stats}");
    assert!(figures["recorded"].as_u64().unwrap() >= 8, "{stats}");
    let metrics = c.ok(json!({"op": "metrics"}))["text"].to_string();
    assert!(
        metrics.contains("apikeyd_idempotency_replayed_total 9"),
        "{metrics}"
    );
    // Reads ignore the member.
    c.ok(json!({"op": "ping", "idempotency_key": "k-consume"}));
}

fn same_key_other_parameters_is_a_conflict(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    c.ok(consume("k1"));
    let mut other = consume("k1");
    other["tool_name"] = json!("other_tool");
    let (code, message) = c.err(other);
    assert_eq!(code, "idempotency_conflict");
    assert!(message.contains("nothing was applied"), "{message}");
    assert_eq!(count(&mut c, "u1", "other_tool"), 0);
    // Another op with the same key conflicts too.
    let (code, _) = c.err(json!({"op": "increment_default_key_usage", "user_id": "u1",
        "tool_name": "search", "idempotency_key": "k1"}));
    assert_eq!(code, "idempotency_conflict");
    assert_eq!(count(&mut c, "u1", "search"), 1);
    let stats = c.ok(json!({"op": "stats"}));
    assert_eq!(stats["idempotency"]["conflicts"], 2, "{stats}");
    assert_eq!(
        stats["requests"]["by_code"]["idempotency_conflict"], 2,
        "{stats}"
    );
}

fn records_expire_after_the_ttl(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[server]\nidempotency_ttl_s = 1", &[]);
    let mut c = d.client();
    c.ok(consume("k-ttl"));
    assert_eq!(c.call(consume("k-ttl"))["replayed"], true);
    assert_eq!(count(&mut c, "u1", "search"), 1);
    // Once the record has expired the same key is a new write.
    common::eventually(
        "the idempotency record expired",
        Duration::from_secs(10),
        || {
            let r = c.call(consume("k-ttl"));
            r["ok"] == true && r.get("replayed").is_none()
        },
    );
    assert_eq!(count(&mut c, "u1", "search"), 2);
}

fn bad_keys_are_refused_and_apply_nothing(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    for bad in [
        json!(""),
        json!("a b"),
        json!("tab\there"),
        json!("x".repeat(129)),
        json!(5),
        json!(["k"]),
    ] {
        let mut req = consume("unused");
        req["idempotency_key"] = bad.clone();
        let (code, message) = c.err(req);
        assert_eq!(code, "bad_request", "{bad}");
        assert!(message.contains("idempotency_key"), "{bad}: {message}");
    }
    assert_eq!(count(&mut c, "u1", "search"), 0);
    // 128 bytes and null (absent) are fine.
    c.ok(consume(&"x".repeat(128)));
    let mut req = consume("unused");
    req["idempotency_key"] = Value::Null;
    c.ok(req);
    assert_eq!(count(&mut c, "u1", "search"), 2);
}

/// Requests with one key sent at once on several connections: applied once.
fn concurrent_repeats_apply_once(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut clients: Vec<Client> = (0..4).map(|_| d.client()).collect();
    let batch: String = (0..25)
        .map(|_| format!("{}\n", consume("k-race")))
        .collect();
    let writers: Vec<_> = clients
        .iter()
        .map(|c| c.send_in_background(batch.clone()))
        .collect();
    let mut replayed = 0;
    for c in &mut clients {
        for _ in 0..25 {
            let r = c.recv();
            assert_eq!(r["ok"], true, "{r}");
            assert_eq!(r["result"]["current_count"], 1, "{r}");
            if r["replayed"] == true {
                replayed += 1;
            }
        }
    }
    for w in writers {
        w.join().unwrap().unwrap();
    }
    assert_eq!(replayed, 99);
    assert_eq!(count(&mut clients[0], "u1", "search"), 1);
}

/// A record never holds a key: neither the keystore file (and its WAL) nor Redis
/// has the key in clear after writes that carried it with an idempotency key; in
/// Redis the record expires with the TTL.
fn records_hold_no_key(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    twice(
        &mut c,
        json!({"op": "set_user_api_key", "user_id": "canary", "service": "openai",
        "key": CANARY, "idempotency_key": "k-canary"}),
    );
    twice(
        &mut c,
        json!({"op": "add_pool_key", "service": "openai", "key": CANARY,
        "idempotency_key": "k-canary-pool"}),
    );
    for (path, bytes) in files_below(d.dir.path()) {
        assert!(
            !contains(&bytes, CANARY.as_bytes()),
            "{} holds the key",
            path.display()
        );
    }
    if let Some(redis) = &d.redis {
        let mut con = redis.conn();
        let names: Vec<String> = redis::cmd("KEYS")
            .arg("stargazer:apikeyd:idempotency:*")
            .query(&mut con)
            .unwrap();
        assert_eq!(names.len(), 2, "{names:?}");
        for name in names {
            let value: Vec<u8> = redis::cmd("GET").arg(&name).query(&mut con).unwrap();
            assert!(!contains(&value, CANARY.as_bytes()), "{name} holds the key");
            let ttl: i64 = redis::cmd("TTL").arg(&name).query(&mut con).unwrap();
            assert!((1..=600).contains(&ttl), "{name}: TTL {ttl}");
        }
    }
}

in_every_mode!(
    records_hold_no_key,
    replay_answers_the_first_answer_and_applies_nothing,
    same_key_other_parameters_is_a_conflict,
    records_expire_after_the_ttl,
    bad_keys_are_refused_and_apply_nothing,
    concurrent_repeats_apply_once,
    records_are_counted_and_capped,
    expired_records_make_room,
);

/// Keys are per uid: nobody using root's key is a new write, not root's replay.
fn each_uid_has_its_own_keys(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[access]\nallow_uids = [\"nobody\"]\n", &[]);
    let bin = open_up(&d);
    let mut c = d.client();
    c.ok(consume("shared-key"));
    let out = call_as(&bin, &d.socket, &[], &[consume("shared-key")]);
    assert_eq!(out[0]["ok"], true, "{}", out[0]);
    assert!(out[0].get("replayed").is_none(), "{}", out[0]);
    assert_eq!(out[0]["result"]["current_count"], 2);
    // And each uid's repeat is its own replay.
    let out = call_as(&bin, &d.socket, &[], &[consume("shared-key")]);
    assert_eq!(out[0]["replayed"], true, "{}", out[0]);
    assert_eq!(c.call(consume("shared-key"))["replayed"], true);
    assert_eq!(count(&mut c, "u1", "search"), 2);
}

mod per_uid {
    #[test]
    fn on_sqlite() {
        super::each_uid_has_its_own_keys(super::Mode::Embedded)
    }
    #[test]
    fn on_redis() {
        super::each_uid_has_its_own_keys(super::Mode::Redis)
    }
}

/// A retry sent to another daemon of the fleet (same Redis) is replayed there.
#[test]
fn a_retry_on_another_daemon_is_replayed() {
    let a = TestDaemon::start_with(Mode::Redis, "", &[]);
    let b = TestDaemon::start_sharing(&a, "");
    let first = a.client().ok(consume("k-fleet"));
    let retry = b.client().call(consume("k-fleet"));
    assert_eq!(retry["replayed"], true, "{retry}");
    assert_eq!(retry["result"], first);
    let add = json!({"op": "add_pool_key", "service": "openai", "key": "sk-fleet-pool-0004",
        "idempotency_key": "k-fleet-add"});
    let first = a.client().ok(add.clone());
    let retry = b.client().call(add);
    assert_eq!(retry["replayed"], true, "{retry}");
    assert_eq!(retry["result"], first);
    assert_eq!(count(&mut b.client(), "u1", "search"), 1);
}

/// `req` refused because the records are full: `unavailable`, not applied.
fn refused_full(c: &mut Client, req: Value) {
    let r = c.call(req);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    assert_eq!(r["error"]["applied"], false, "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("server.idempotency_max_records = 3"),
        "{message}"
    );
}

/// The records held are shown in `stats` and metrics, and bounded by
/// `server.idempotency_max_records`: past it a write with a new key is refused and
/// applies nothing, while repeats of recorded keys are still answered.
fn records_are_counted_and_capped(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[server]\nidempotency_max_records = 3", &[]);
    let mut c = d.client();
    let stats = c.ok(json!({"op": "stats"}));
    assert_eq!(stats["idempotency"]["records"], 0, "{stats}");
    assert_eq!(stats["idempotency"]["max_records"], 3, "{stats}");
    c.ok(consume("k0"));
    c.ok(consume("k1"));
    c.ok(
        json!({"op": "add_pool_key", "service": "openai", "key": "sk-capped-pool-0005",
        "idempotency_key": "k2"}),
    );
    let stats = c.ok(json!({"op": "stats"}));
    assert_eq!(stats["idempotency"]["records"], 3, "{stats}");
    let metrics = c.ok(json!({"op": "metrics"}))["text"].to_string();
    assert!(
        metrics.contains("apikeyd_idempotency_records 3"),
        "{metrics}"
    );

    refused_full(&mut c, consume("k3"));
    refused_full(
        &mut c,
        json!({"op": "increment_default_key_usage", "user_id": "u1", "tool_name": "search",
            "idempotency_key": "k4"}),
    );
    refused_full(
        &mut c,
        json!({"op": "set_user_api_key", "user_id": "u3", "service": "openai",
            "key": "sk-capped-user-0006", "idempotency_key": "k5"}),
    );
    assert_eq!(
        count(&mut c, "u1", "search"),
        2,
        "refused writes count nothing"
    );
    let got = c.ok(json!({"op": "get_user_api_key", "user_id": "u3", "service": "openai"}));
    assert_ne!(got["key"], "sk-capped-user-0006", "{got}");
    // Repeats are answered, and writes without a key go on as usual.
    assert_eq!(c.call(consume("k0"))["replayed"], true);
    c.ok(json!({"op": "consume_default_key_usage", "user_id": "u1", "tool_name": "search"}));
    assert_eq!(count(&mut c, "u1", "search"), 3);
    let stats = c.ok(json!({"op": "stats"}));
    assert_eq!(stats["idempotency"]["records"], 3, "{stats}");

    if mode == Mode::Redis {
        // The bound is the fleet's: another daemon on the same Redis sees the
        // records (by its own look, within a second or so) and the cap.
        let other = TestDaemon::start_sharing(&d, "[server]\nidempotency_max_records = 3");
        let mut o = other.client();
        refused_full(&mut o, consume("k6"));
        common::eventually(
            "the other daemon counts 3 records",
            Duration::from_secs(10),
            || o.ok(json!({"op": "stats"}))["idempotency"]["records"] == 3,
        );
    }
}

/// Expired records free their room: with a 1 s TTL and room for two records, a
/// third key is refused, then accepted once the first two have expired.
fn expired_records_make_room(mode: Mode) {
    let d = TestDaemon::start_with(
        mode,
        "[server]\nidempotency_ttl_s = 1\nidempotency_max_records = 2",
        &[],
    );
    let mut c = d.client();
    c.ok(consume("k0"));
    c.ok(consume("k1"));
    let r = c.call(consume("k2"));
    assert_eq!(r["error"]["applied"], false, "{r}");
    common::eventually("the first records expire", Duration::from_secs(10), || {
        c.call(consume("k2"))["ok"] == true
    });
    assert_eq!(count(&mut c, "u1", "search"), 3, "each write counted once");
    assert_eq!(c.call(consume("k2"))["replayed"], true);
}

/// Redis mode: a quota record answers the first verdict and count, a denial
/// included, and records written by earlier versions (the verdict and the count
/// after the call) are still replayed.
#[test]
fn quota_records_replay_denials_and_earlier_records() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let mut c = d.client();
    let at_limit = |key: &str| {
        json!({"op": "consume_default_key_usage", "user_id": "u9", "tool_name": "search",
            "daily_limit": 1, "idempotency_key": key})
    };
    assert_eq!(twice(&mut c, at_limit("k-allowed"))["allowed"], true);
    let denied = twice(&mut c, at_limit("k-denied"));
    assert_eq!(
        (denied["allowed"].clone(), denied["current_count"].clone()),
        (json!(false), json!(1))
    );
    assert_eq!(count(&mut c, "u9", "search"), 1);

    // A record as an earlier version wrote it: same fingerprint, "verdict count".
    let redis = d.redis.as_ref().unwrap();
    let mut con = redis.conn();
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("stargazer:apikeyd:idempotency:*:k-allowed")
        .query(&mut con)
        .unwrap();
    let name = &names[0];
    let value: String = redis::cmd("GET").arg(name).query(&mut con).unwrap();
    let (print, _) = value.split_once('\n').unwrap();
    let _: () = redis::cmd("SET")
        .arg(name)
        .arg(format!("{print}\n1 7"))
        .arg("EX")
        .arg(60)
        .query(&mut con)
        .unwrap();
    let r = c.call(at_limit("k-allowed"));
    assert_eq!(r["replayed"], true, "{r}");
    assert_eq!(
        (
            r["result"]["allowed"].clone(),
            r["result"]["current_count"].clone()
        ),
        (json!(true), json!(7))
    );
    assert_eq!(count(&mut c, "u9", "search"), 1);
}
