//! Signals (docs/operations.md, "Signals"): SIGTERM/SIGINT drain and exit 0; SIGHUP
//! reloads without dropping connections.

mod common;

use common::{Client, Mode, TestDaemon};
use serde_json::{json, Value};

fn sigterm_answers_in_flight_removes_socket_exits_zero(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let n = 2000;
    let mut batch = String::new();
    for i in 0..n {
        batch.push_str(&json!({"op": "increment_default_key_usage", "user_id": "drain", "tool_name": "t", "id": i}).to_string());
        batch.push('\n');
    }
    let writer = c.send_in_background(batch);
    assert_eq!(c.recv()["id"], 0, "processing has started");
    d.signal(libc::SIGTERM);
    // Whatever was read before the signal is answered, in order: run and counted,
    // or (read but not started) refused with applied: false, after which nothing runs.
    let mut answered = 1u64;
    let mut refused = 0;
    for (i, r) in c.recv_until_closed().into_iter().enumerate() {
        assert_eq!(r["id"], i as u64 + 1, "{r}");
        if r["ok"] == true {
            assert_eq!(refused, 0, "nothing runs after a refusal: {r}");
            assert_eq!(r["result"]["count"], answered + 1);
            answered += 1;
        } else {
            assert_eq!(r["error"]["applied"], false, "{r}");
            refused += 1;
        }
    }
    // The daemon stopped reading at shutdown, so the rest of the batch may not go out.
    let _ = writer.join().unwrap();
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status}");
    assert!(!d.socket.exists(), "socket file removed");
    // Every answered increment is stored, and nothing that was not answered: what
    // the daemon read it answered.
    d.spawn();
    d.wait_ready();
    let r = d.client().ok(json!({"op": "check_default_key_limit", "user_id": "drain", "tool_name": "t", "daily_limit": 100000}));
    assert_eq!(r["current_count"].as_u64().unwrap(), answered);
}

fn sigint_stops_too(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    d.signal(libc::SIGINT);
    assert!(d.wait_exit().success());
    assert!(!d.socket.exists());
}

fn sighup_reloads_without_dropping_connections(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[services.acme]\ndisplay_name = \"Acme One\"\n", &[]);
    let mut c = d.client();
    let msg = |c: &mut Client| {
        c.ok(json!({"op": "missing_api_key_error", "service": "acme"}))["message"].clone()
    };
    assert!(msg(&mut c).as_str().unwrap().contains("Acme One"));
    assert_eq!(
        c.ok(json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t"}))
            ["daily_limit"],
        20
    );

    d.write_config("[services.acme]\ndisplay_name = \"Acme Two\"\n[quota]\ndaily_limit = 7\n[cache]\nmax_entries = 10\n");
    d.signal(libc::SIGHUP);
    common::eventually(
        "the reload applied",
        std::time::Duration::from_secs(10),
        || msg(&mut c).as_str().unwrap().contains("Acme Two"),
    );
    // The same connection goes on working, with the new settings.
    assert_eq!(
        c.ok(json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t"}))
            ["daily_limit"],
        7
    );
    // The cache obeys the new bound.
    for i in 0..30 {
        c.ok(json!({"op": "get_user_api_key", "user_id": format!("u{i}"), "service": "openai"}));
    }
    let entries = c.ok(json!({"op": "stats"}))["cache"]["entries"]
        .as_u64()
        .unwrap();
    assert!(
        entries <= 10,
        "cache holds {entries} entries past max_entries = 10"
    );

    // A broken config is refused and the running one kept.
    d.write_config("[quota]\ndaily_limit = \"lots\"\n");
    d.signal(libc::SIGHUP);
    common::eventually(
        "the reload failure, logged",
        std::time::Duration::from_secs(10),
        || d.logs().contains("reload failed"),
    );
    assert_eq!(
        c.ok(json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t"}))
            ["daily_limit"],
        7
    );
    assert_eq!(c.call(json!({"op": "ping"}))["ok"], Value::Bool(true));
}

fn second_daemon_on_a_live_socket_refuses(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    let first_pid = d.pid();
    // Start a second process on the same config while the first runs.
    let out = std::process::Command::new(common::bin())
        .args(["serve", "--config"])
        .arg(&d.config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The keystore lock refuses it first, naming the daemon that runs.
    assert!(err.contains("in use by apikeyd serve"), "{err}");
    assert!(err.contains(&format!("pid {first_pid}")), "{err}");
    assert_eq!(d.pid(), first_pid);
    d.client().ok(json!({"op": "ping"}));
    // A stale socket file left by kill -9 is replaced.
    d.kill9();
    assert!(d.socket.exists());
    d.spawn();
    d.wait_ready();
}

in_every_mode!(
    sigterm_answers_in_flight_removes_socket_exits_zero,
    sigint_stops_too,
    sighup_reloads_without_dropping_connections,
    second_daemon_on_a_live_socket_refuses,
);
