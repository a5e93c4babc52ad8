//! What Redis refuses reaches the client as a code and a message that name the
//! cause, and the log says it once (then counts): out of memory (OOM), a replica
//! (READONLY), a lost master (MASTERDOWN), a password set behind the daemon's back
//! (NOAUTH), a script running too long (BUSY). Each is produced on a private
//! redis-server; the mapping of the kinds no single server can produce (LOADING,
//! TRYAGAIN, MOVED/ASK) is pinned by the unit tests of `apikeyd::error`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Client, Mode, RedisServer, TestDaemon};
use serde_json::{json, Value};

fn redis_daemon() -> TestDaemon {
    TestDaemon::start_with(Mode::Redis, "", &[])
}

fn redis_of(d: &TestDaemon) -> Arc<RedisServer> {
    d.redis.clone().expect("a redis daemon")
}

fn config_set(r: &RedisServer, name: &str, value: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query(&mut r.conn())
        .unwrap();
}

fn set_key(c: &mut Client, user: &str) -> Value {
    c.call(json!({"op": "set_user_api_key", "user_id": user, "service": "openai", "key": "sk-redis-errors-0001"}))
}

/// Asks `request` until its answer's message names `cause`; answers the error.
fn refused_until(c: &mut Client, request: Value, cause: &str) -> Value {
    let mut last = Value::Null;
    let mut shown = 0;
    eventually(
        "the Redis error in the answer",
        Duration::from_secs(20),
        || {
            last = c.call(request.clone());
            let found = last["ok"] == false
                && last["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains(cause);
            if !found && shown < 3 {
                // Shown with a failure: what came instead.
                eprintln!("waiting for {cause}, got {last}");
                shown += 1;
            }
            found
        },
    );
    last
}

/// How many lines of the log contain `needle`.
fn lines_with(d: &TestDaemon, needle: &str) -> usize {
    d.logs().lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn out_of_memory_is_unavailable_and_said_once() {
    let d = redis_daemon();
    let r = redis_of(&d);
    let mut c = d.client();
    assert_eq!(set_key(&mut c, "before")["ok"], true);
    config_set(&r, "maxmemory-policy", "noeviction");
    config_set(&r, "maxmemory", "1");
    for i in 0..20 {
        let answer = set_key(&mut c, &format!("u{i}"));
        assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("out of memory (OOM)"), "{message}");
    }
    let pool =
        c.call(json!({"op": "add_pool_key", "service": "openai", "key": "sk-redis-errors-pool1"}));
    assert_eq!(pool["error"]["code"], "unavailable", "{pool}");
    // The quota script's writes too: never "is that key a hash?".
    // The quota script's writes too (quota answers degrade rather than fail).
    let quota = c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t"}));
    assert_eq!(quota["degraded"], true, "{quota}");
    let logs = d.logs();
    assert!(!logs.contains("is that key a hash"), "{logs}");
    assert_eq!(
        lines_with(&d, "redis refused a write: out of memory (OOM)"),
        1,
        "{logs}"
    );
    let metrics = c.ok(json!({"op": "metrics"}))["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        metrics.contains("apikeyd_redis_refusals_total{cause=\"oom\"} "),
        "{metrics}"
    );
    config_set(&r, "maxmemory", "0");
    assert_eq!(set_key(&mut c, "after")["ok"], true);
    eventually(
        "Redis accepting commands again, logged",
        Duration::from_secs(10),
        || lines_with(&d, "redis accepts commands again after") >= 1,
    );
    let logs = d.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("accepts commands again") && l.contains("(OOM)")),
        "{logs}"
    );
}

#[test]
fn a_replica_is_read_only_and_said_so() {
    let master = RedisServer::start_tcp();
    let d = redis_daemon();
    let r = redis_of(&d);
    let mut c = d.client();
    let port = master
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/0")
        .to_string();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(&port)
        .query(&mut r.conn())
        .unwrap();
    let answer = refused_until(
        &mut c,
        json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-redis-errors-0001"}),
        "(READONLY)",
    );
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("read-only replica"),
        "{answer}"
    );
    assert_eq!(
        lines_with(
            &d,
            "redis refused a write: the server is a read-only replica"
        ),
        1,
        "{}",
        d.logs()
    );
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut r.conn())
        .unwrap();
    assert_eq!(set_key(&mut c, "u")["ok"], true);
}

#[test]
fn a_replica_without_its_master_is_masterdown() {
    let d = redis_daemon();
    let r = redis_of(&d);
    let mut c = d.client();
    // A port nothing listens on: the replica never reaches its master.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    config_set(&r, "replica-serve-stale-data", "no");
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(port)
        .query(&mut r.conn())
        .unwrap();
    // A read of a user never asked before, so that no cache answers it.
    let mut n = 0;
    let mut answer = Value::Null;
    eventually(
        "the answers after Redis recovered",
        Duration::from_secs(20),
        || {
            n += 1;
            answer = c.call(json!({"op": "list_user_api_keys", "user_id": format!("m{n}")}));
            if n < 4 {
                eprintln!("waiting for MASTERDOWN, got {answer}");
            }
            answer["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("(MASTERDOWN)")
        },
    );
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    let write = set_key(&mut c, "w");
    assert_eq!(write["error"]["code"], "unavailable", "{write}");
    // The write runs as a script behind the retired-version guard, whose first read
    // this replica refuses as MASTERDOWN; a plain write would be READONLY. Either
    // names the cause.
    let said = write["error"]["message"].as_str().unwrap();
    assert!(
        said.contains("(READONLY)") || said.contains("(MASTERDOWN)"),
        "{write}"
    );
    assert_eq!(
        lines_with(
            &d,
            "redis refused a read: the replica lost its master (MASTERDOWN)"
        ),
        1,
        "{}",
        d.logs()
    );
}

#[test]
fn a_password_set_behind_the_daemon_is_noauth() {
    let d = redis_daemon();
    let r = redis_of(&d);
    let mut c = d.client();
    assert_eq!(set_key(&mut c, "before")["ok"], true);
    config_set(&r, "requirepass", "s3cret-pass");
    // Existing connections stay authenticated: drop them so the daemon reconnects.
    // (Redis closes an unauthenticated connection that sends a transaction, so a
    // write may meet a dropped connection instead; a read meets NOAUTH.)
    let mut admin = r.conn();
    let _: () = redis::cmd("AUTH")
        .arg("s3cret-pass")
        .query(&mut admin)
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut admin)
        .unwrap();
    let answer = refused_until(
        &mut c,
        json!({"op": "list_user_api_keys", "user_id": "u"}),
        "(NOAUTH)",
    );
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    let logs = d.logs();
    assert!(logs.contains("(NOAUTH)"), "{logs}");
    assert!(!logs.contains("s3cret-pass"), "{logs}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("")
        .query(&mut admin)
        .unwrap();
    eventually(
        "a write accepted after Redis recovered",
        Duration::from_secs(10),
        || set_key(&mut c, "after")["ok"] == true,
    );
}

#[test]
fn a_script_running_too_long_is_busy() {
    let d = redis_daemon();
    let r = redis_of(&d);
    let mut c = d.client();
    config_set(&r, "busy-reply-threshold", "20");
    let mut looping = r.conn();
    let script = std::thread::spawn(move || {
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query::<()>(&mut looping)
    });
    let answer = refused_until(
        &mut c,
        json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-redis-errors-0001"}),
        "(BUSY)",
    );
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    let _: () = redis::cmd("SCRIPT")
        .arg("KILL")
        .query(&mut r.conn())
        .unwrap();
    assert!(script.join().unwrap().is_err(), "the killed script fails");
    eventually(
        "a write accepted after Redis recovered",
        Duration::from_secs(10),
        || set_key(&mut c, "after")["ok"] == true,
    );
}
