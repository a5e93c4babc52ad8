//! What clients are told: integer ids, answers during a Redis
//! outage, and the quota message with the service filled in.

mod common;

use std::time::Duration;

use common::{Mode, TestDaemon};
use serde_json::json;

#[test]
fn integer_ids_are_their_decimal_strings() {
    let d = TestDaemon::start();
    let mut c = d.client();
    let snowflake: u64 = 123_456_789_012_345_678;
    c.ok(json!({"op": "set_user_api_key", "user_id": snowflake, "service": "openai", "key": "sk-snowflake-user-01"}));
    let r = c.ok(
        json!({"op": "get_user_api_key", "user_id": snowflake.to_string(), "service": "openai"}),
    );
    assert_eq!(r["key"], "sk-snowflake-user-01");
    let r = c.ok(json!({"op": "list_user_api_keys", "user_id": snowflake}));
    assert_eq!(r["keys"][0]["service"], "openai");

    let channel: u64 = 987_654_321_098_765_432;
    c.ok(json!({"op": "add_pool_key", "service": "openai", "channel_id": channel, "key": "sk-snowflake-chan-01"}));
    let r = c.ok(json!({"op": "get_channel_pool_api_key", "service": "openai", "channel_id": channel.to_string()}));
    assert_eq!(r["key"], "sk-snowflake-chan-01");
    let r = c.ok(
        json!({"op": "get_user_api_key", "user_id": 5, "service": "openai", "channel_id": channel}),
    );
    assert_eq!(r["source"], "channel_pool");
    let r = c.ok(json!({"op": "consume_default_key_usage", "user_id": 0, "tool_name": "t"}));
    assert_eq!(r["current_count"], 1);

    for bad in [json!(-1), json!(1.5), json!(true)] {
        let (code, message) =
            c.err(json!({"op": "get_user_api_key", "user_id": bad, "service": "openai"}));
        assert_eq!(code, "bad_request");
        assert!(message.contains("user_id"), "{message}");
    }
}

#[test]
fn during_a_redis_outage_nobody_is_told_to_get_a_key() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let mut c = d.client();
    let ask = json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"});
    let r = c.ok(ask.clone());
    assert!(r["message"].as_str().unwrap().contains("Get one at"), "{r}");
    d.redis.as_ref().unwrap().kill();
    let mut r = serde_json::Value::Null;
    common::eventually("a degraded answer", Duration::from_secs(10), || {
        r = c.ok(ask.clone());
        r["degraded"] == true
    });
    assert_eq!(r["key"], serde_json::Value::Null);
    let m = r["message"].as_str().unwrap();
    assert!(
        m.contains("temporarily unavailable") && m.contains("retry"),
        "{m}"
    );
    assert!(
        !m.contains("Get one at") && !m.contains("No API key"),
        "{m}"
    );
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "u"}));
    assert!(
        common::text(&r["message"]).contains("temporarily unavailable"),
        "{r}"
    );
}

#[test]
fn the_quota_message_fills_in_the_service() {
    let d = TestDaemon::start();
    let mut c = d.client();
    let m = c.ok(json!({"op": "default_key_limit_error", "tool_name": "web_search", "current": 20, "limit": 20, "service": "SerpAPI"}))["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(m.contains("set_user_api_key serpapi <your-key>"), "{m}");
    assert!(m.contains("00:00 UTC") && m.contains("20"), "{m}");
    let m = c.ok(json!({"op": "default_key_limit_error", "tool_name": "web_search", "current": 3, "limit": 20}))["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(m.contains("set_user_api_key"), "{m}");
    assert!(!m.contains("<service>"), "{m}");
    let (code, message) = c.err(json!({"op": "default_key_limit_error", "tool_name": "t", "current": 1, "limit": 2, "service": "bad service"}));
    assert_eq!(code, "bad_request");
    assert!(message.contains("service"));
}

/// A peer on a Unix socket in a temp folder that does `serve` with each
/// connection it accepts: the stand-in for a daemon that is stuck or dying.
fn peer(serve: impl Fn(std::os::unix::net::UnixStream) + Send + 'static) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            serve(stream);
        }
    });
    dir
}

/// `apikeyd call ARGS... && echo healthy` through bash, as a health probe is written.
fn probe(dir: &tempfile::TempDir, args: &str) -> (Option<i32>, String, String) {
    let sock = dir.path().join("s.sock");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "\"$0\" call --socket \"$1\" {args} && echo healthy; exit ${{PIPESTATUS[0]}}"
        ))
        .arg(common::bin())
        .arg(&sock)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn call_is_unhealthy_when_the_daemon_closes_without_answering() {
    // Accepts and closes at once.
    let dir = peer(drop);
    let (code, out, err) = probe(&dir, r#"'{"op":"ping"}'"#);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(!out.contains("healthy"), "{out}");
    assert!(err.contains("closed the connection"), "{err}");

    // Reads the request, then closes.
    let dir = peer(|s| {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = std::io::BufReader::new(s).read_line(&mut line);
    });
    let (code, out, err) = probe(&dir, r#"'{"op":"ping"}'"#);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(!out.contains("healthy"), "{out}");

    // Answers the first of two requests, then closes: the second got no answer.
    let dir = peer(|s| {
        use std::io::{BufRead, Write};
        let mut w = s.try_clone().unwrap();
        let mut line = String::new();
        let _ = std::io::BufReader::new(s).read_line(&mut line);
        let _ = w.write_all(b"{\"id\":null,\"ok\":true,\"result\":{\"pong\":true}}\n");
    });
    let (code, out, err) = probe(&dir, r#"'{"op":"ping"}' '{"op":"ping"}'"#);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.contains("pong") && !out.contains("healthy"), "{out}");
    assert!(err.contains("closed the connection"), "{err}");
}

#[test]
fn call_is_unhealthy_when_the_daemon_does_not_answer_in_time() {
    // Reads the request and holds the connection open without answering.
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    let dir = peer(move |s| keep.lock().unwrap().push(s));
    let (code, out, err) = probe(&dir, r#"--timeout 0.5 '{"op":"ping"}'"#);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(!out.contains("healthy"), "{out}");
    assert!(err.contains("no answer within 0.5 s"), "{err}");
    drop(held);
}

#[test]
fn call_is_healthy_only_when_every_request_is_answered_ok() {
    let d = TestDaemon::start();
    let run = |args: &[&str]| {
        std::process::Command::new(common::bin())
            .arg("call")
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[r#"{"op":"ping"}"#, r#"{"op":"ping"}"#]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let out = run(&[r#"{"op":"ping"}"#, r#"{"op":"nope"}"#]);
    assert_eq!(out.status.code(), Some(1));
    // Requests from stdin: the same rules; blank lines are no requests (the daemon
    // answers nothing to them).
    let mut child = std::process::Command::new(common::bin())
        .arg("call")
        .arg("--socket")
        .arg(&d.socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"{\"op\":\"ping\"}\n\n   \n{\"op\":\"ping\",\"id\":2}\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}
