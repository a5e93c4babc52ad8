//! What the operator sees: reload warnings and what reload applies, the audit file
//! (reopened on SIGHUP, quota counting optional, refused connections), text logs that
//! cannot be forged, and `stats` before Redis has answered.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Mode, TestDaemon};
use redis::Commands;
use serde_json::{json, Value};

/// Sends SIGHUP and waits until the daemon logged one more finished reload.
fn reload(d: &TestDaemon) {
    let done = |log: &str| {
        log.matches("config and keyring reloaded").count() + log.matches("reload failed").count()
    };
    let before = done(&d.logs());
    d.signal(libc::SIGHUP);
    common::eventually("the reload", Duration::from_secs(10), || {
        done(&d.logs()) > before
    });
}

#[test]
fn reload_names_settings_that_need_a_restart_and_applies_legacy_plaintext() {
    let mut d = TestDaemon::start_with(Mode::Redis, "cache.pool_ttl_s = 0\n", &[]);
    let redis = d.redis.clone().unwrap();
    let mut conn = redis.conn();
    let _: () = redis::cmd("HSET")
        .arg("stargazer:global_api_pool:openai")
        .arg("legacy-field")
        .arg("sk-legacy-in-clear-01")
        .query(&mut conn)
        .unwrap();
    let mut c = d.client();
    let pick = json!({"op": "get_pool_api_key", "service": "openai"});
    assert_eq!(
        c.ok(pick.clone())["key"],
        Value::Null,
        "clear values refused by default"
    );

    d.write_config(
        "cache.pool_ttl_s = 0\nredis.accept_legacy_plaintext = true\nlog.format = \"json\"\n[server]\nmax_connections = 7\n",
    );
    reload(&d);
    assert!(!d.logs().contains("reload failed"), "{}", d.logs());
    assert_eq!(
        c.ok(pick.clone())["key"],
        "sk-legacy-in-clear-01",
        "applied by the reload"
    );
    let log = d.logs();
    for setting in ["server.max_connections", "log.format"] {
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains(setting)
                && l.contains("needs a restart")),
            "no warning naming {setting}:\n{log}"
        );
    }
    assert!(
        !log.contains("redis.accept_legacy_plaintext changed"),
        "{log}"
    );

    d.write_config("cache.pool_ttl_s = 0\nlog.format = \"json\"\n[server]\nmax_connections = 7\n");
    reload(&d);
    assert_eq!(c.ok(pick)["key"], Value::Null, "switched off again");
    assert!(d.stop().success());
}

fn audit_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_audit_file_is_reopened_on_sighup() {
    let d = TestDaemon::start_with(Mode::Embedded, "log.audit_file = \"audit.jsonl\"\n", &[]);
    let path = d.path("audit.jsonl");
    let mut c = d.client();
    let set = |c: &mut common::Client, user: &str| {
        c.ok(json!({"op": "set_user_api_key", "user_id": user, "service": "openai", "key": "sk-audit-rotate-01"}))
    };
    set(&mut c, "before");
    // What logrotate does: move the file away, then signal.
    let rotated = d.path("audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    reload(&d);
    set(&mut c, "after");
    let old = audit_lines(&rotated);
    let new = audit_lines(&path);
    assert_eq!(old.len(), 1, "{old:?}");
    assert_eq!(old[0]["user_id"], "before");
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0]["user_id"], "after");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn quota_counting_is_audited_only_when_asked() {
    let d = TestDaemon::start_with(Mode::Embedded, "log.audit_file = \"audit.jsonl\"\n", &[]);
    let path = d.path("audit.jsonl");
    let mut c = d.client();
    let consume = json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "web"});
    c.ok(consume.clone());
    c.ok(json!({"op": "increment_default_key_usage", "user_id": "u", "tool_name": "web"}));
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-audit-quota-001"}));
    let ops: Vec<Value> = audit_lines(&path).iter().map(|l| l["op"].clone()).collect();
    assert_eq!(ops, [json!("set_user_api_key")]);

    d.write_config("log.audit_file = \"audit.jsonl\"\nlog.audit_quota = true\n");
    reload(&d);
    c.ok(consume);
    let lines = audit_lines(&path);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["op"], "consume_default_key_usage");
    assert_eq!(lines[1]["tool_name"], "web");
}

#[test]
fn refused_connections_are_in_the_audit_file() {
    common::need_root();
    let d = TestDaemon::start_with(Mode::Embedded, "log.audit_file = \"audit.jsonl\"\n", &[]);
    let bin = common::open_up(&d);
    let out = common::output_as(&bin, &d.socket, &[], &[json!({"op": "ping"})]);
    assert_eq!(out.status.code(), Some(1));
    let path = d.path("audit.jsonl");
    common::eventually("the refusal's audit line", Duration::from_secs(10), || {
        !audit_lines(&path).is_empty()
    });
    let lines = audit_lines(&path);
    assert_eq!(lines[0]["op"], "connect");
    assert_eq!(lines[0]["outcome"], "forbidden");
    assert_eq!(lines[0]["uid"], 65534);
    assert!(d.logs().contains("connection refused"));
}

#[test]
fn text_logs_escape_values_from_redis_and_clients() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let redis = d.redis.clone().unwrap();
    let forged = "2026-01-01T00:00:00.000000Z ERROR apikeyd: forged line";
    let _: () = redis::cmd("HSET")
        .arg("stargazer:global_api_pool:openai")
        .arg(format!("evil\n{forged}"))
        .arg("akd1:not-an-envelope")
        .query(&mut redis.conn())
        .unwrap();
    let mut c = d.client();
    c.ok(json!({"op": "get_pool_api_key", "service": "openai"}));
    // A huge id is cut in the per-request debug line.
    let long_id = "x".repeat(1000);
    c.ok(json!({"op": "ping", "id": long_id}));
    let log = d.logs();
    assert!(
        log.contains("evil\\n2026-01-01"),
        "the field is logged, escaped:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a forged line made it into the log:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("op=ping") && l.contains("bytes)"))
        .unwrap_or_else(|| panic!("no debug line for the long id:\n{log}"));
    assert!(
        line.contains(&format!("\"{}…(1002 bytes)", "x".repeat(63))),
        "{line}"
    );
    assert!(!line.contains(&"x".repeat(64)), "{line}");
}

#[test]
fn stats_says_not_connected_until_redis_has_answered() {
    // A "Redis" that accepts connections (the kernel's backlog) and never answers: the
    // daemon's first commands are in flight, not failed, so only "has it answered"
    // can tell.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    // With a master key already there: a first start without one is refused while
    // Redis cannot be asked whether a fleet's key exists (tests/fleet.rs).
    let d = TestDaemon::start_with_key(&format!(
        "[redis]\nurl = \"redis://127.0.0.1:{port}/0\"\ntimeout_ms = 60000\n"
    ));
    let r = d.client().ok(json!({"op": "stats"}));
    assert_eq!(r["store"]["mode"], "redis");
    assert_eq!(r["store"]["redis_connected"], false, "{r}");
    drop(silent);

    // With a real Redis it turns true once Redis has answered.
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    common::eventually("redis_connected", Duration::from_secs(10), || {
        d.client().ok(json!({"op": "stats"}))["store"]["redis_connected"] == true
    });
}

/// Running out of descriptors pauses the Unix socket's accept loop, says so once,
/// and never stops it: once the connections close, new ones are served.
#[test]
fn running_out_of_descriptors_never_stops_the_accept_loop() {
    let d = TestDaemon::start();
    common::limit_descriptors(d.pid(), 64);
    let held: Vec<std::os::unix::net::UnixStream> = (0..150)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&d.socket).ok())
        .collect();
    assert!(held.len() >= 100, "only {} connections opened", held.len());
    let said = "cannot accept connections (out of file descriptors?)";
    common::eventually(
        "the accept failure in the log",
        Duration::from_secs(10),
        || d.logs().contains(said),
    );
    drop(held);
    common::eventually(
        "a ping answered after the descriptors are freed",
        Duration::from_secs(30),
        || {
            common::Client::try_connect(&d.socket)
                .map(|mut c| c.call(json!({"op": "ping"}))["ok"] == true)
                .unwrap_or(false)
        },
    );
    // Said once accepts have succeeded for a few seconds: keep connecting.
    common::eventually(
        "accepting connections again, logged",
        Duration::from_secs(30),
        || {
            d.client().ok(json!({"op": "ping"}));
            d.logs().contains("accepting connections again after")
        },
    );
    let logs = d.logs();
    assert_eq!(logs.matches(said).count(), 1, "{logs}");
}

/// A Redis outage of a few seconds: the heartbeat that fails every second and the
/// connection that is retried every second are each said once, and their recovery
/// once with the count.
#[test]
fn a_redis_outage_is_said_once_then_its_recovery_with_a_count() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let redis = d.redis.clone().unwrap();
    common::eventually("the first heartbeat", Duration::from_secs(10), || {
        redis
            .conn()
            .keys::<_, Vec<String>>("*apikeyd:fleet:*")
            .is_ok_and(|k| !k.is_empty())
    });
    redis.kill();
    common::eventually("the heartbeat failure", Duration::from_secs(10), || {
        d.logs().contains("fleet heartbeat not written")
    });
    // The outage lasts until the daemon has failed three beats (it counts them).
    let mut c = d.client();
    common::eventually("three failed heartbeats", Duration::from_secs(15), || {
        c.ok(json!({"op": "stats"}))["store"]["heartbeat_failures"]
            .as_u64()
            .is_some_and(|n| n >= 3)
    });
    redis.restart();
    common::eventually("the heartbeat recovery", Duration::from_secs(10), || {
        d.logs().contains("fleet heartbeat written again after")
    });
    let logs = d.logs();
    assert_eq!(
        logs.matches("fleet heartbeat not written").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("redis connection is down").count(),
        1,
        "{logs}"
    );
    let recovery = logs
        .lines()
        .find(|l| l.contains("fleet heartbeat written again after"))
        .unwrap();
    let times: u64 = recovery
        .split("after ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count in {recovery}"));
    assert!(times >= 2, "{recovery}");
    assert!(
        logs.contains("redis connection is up again after"),
        "{logs}"
    );
}

/// The JSON log writes a client's pid as a number.
#[test]
fn the_json_log_writes_pid_as_a_number() {
    let d = TestDaemon::start_with(Mode::Embedded, "log.format = \"json\"\n", &[]);
    d.client().ok(json!({"op": "ping"}));
    common::eventually("a connection line", Duration::from_secs(10), || {
        d.logs().contains("connection opened")
    });
    let logs = d.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("connection opened"))
        .unwrap();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let fields = if v["fields"].is_object() {
        &v["fields"]
    } else {
        &v
    };
    assert!(fields["pid"].is_u64(), "{line}");
}

/// 2,000 refused connections from one denied uid add a handful of audit lines
/// (the first in full, then counts), not 2,000; the count is written at the latest
/// when the daemon stops.
#[test]
fn refused_connections_are_audited_in_summary() {
    common::need_root();
    let mut d = TestDaemon::start_with(Mode::Embedded, "log.audit_file = \"audit.jsonl\"\n", &[]);
    common::open_up(&d);
    // One process (perl-base, always there) connecting 2,000 times as nobody.
    let script = "use Socket; for (1..2000) { socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die $!; \
        connect($s, pack_sockaddr_un($ARGV[0])) or die \"connect: $!\"; sysread($s, my $b, 4096); close($s) }";
    let out = common::output_retrying_busy(
        common::as_nobody(&[])
            .args(["/usr/bin/perl", "-e", script])
            .arg(&d.socket),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.stop().success());
    let lines = audit_lines(&d.path("audit.jsonl"));
    let refusals: Vec<&Value> = lines.iter().filter(|l| l["op"] == "connect").collect();
    assert!(
        (2..=5).contains(&refusals.len()),
        "{} audit lines: {refusals:?}",
        refusals.len()
    );
    assert_eq!(refusals[0]["uid"], 65534);
    assert_eq!(refusals[0]["outcome"], "forbidden");
    let counted: u64 = refusals[1..]
        .iter()
        .map(|l| l["repeats"].as_u64().expect("a count"))
        .sum();
    assert_eq!(counted, 1999, "{refusals:?}");
    let logs = d.logs();
    assert!(
        logs.matches("connection refused: peer not allowed").count() <= 5,
        "{}",
        logs.matches("connection refused").count()
    );
}
