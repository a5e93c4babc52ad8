//! The wire protocol (docs/protocol.md, "Framing" and "Error codes"): framing, ids,
//! ordering, pipelining, error codes, limits and malformed input.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Client, Mode, TestDaemon};
use serde_json::{json, Value};

fn ping_answers_with_version(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let r = d.client().ok(json!({"op": "ping"}));
    assert_eq!(r["pong"], true);
    assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
}

fn ids_are_echoed_verbatim(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    for id in [
        json!(7),
        json!("abc"),
        json!({"a": [1, 2]}),
        json!(null),
        json!(1.5),
        json!(true),
    ] {
        let r = c.call(json!({"op": "ping", "id": id}));
        assert_eq!(r["id"], id);
    }
    // Absent id: null. Errors echo it too.
    assert_eq!(c.call(json!({"op": "ping"}))["id"], Value::Null);
    assert!(c
        .call(json!({"op": "ping"}))
        .as_object()
        .unwrap()
        .contains_key("id"));
    let r = c.call(json!({"op": "nope", "id": "x1"}));
    assert_eq!(r["id"], "x1");
    assert_eq!(r["error"]["code"], "unknown_op");
    // Numbers come back digit for digit, whatever their size or precision.
    for id in [
        "1.50",
        "123456789012345678901234567890",
        "-1.035394776935701e+229",
        "0.1",
    ] {
        c.send_raw(format!("{{\"op\":\"ping\",\"id\":{id}}}\n").as_bytes());
        let mut raw = String::new();
        std::io::BufRead::read_line(c.reader(), &mut raw).unwrap();
        assert!(raw.starts_with(&format!("{{\"id\":{id},")), "{raw}");
    }
    // Unknown members are ignored.
    assert_eq!(
        c.call(json!({"op": "ping", "whatever": {"x": 1}}))["ok"],
        true
    );
}

fn malformed_lines_get_one_error_each_and_connection_survives(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let bad: &[&[u8]] = &[
        b"not json",
        b"[1,2,3]",
        b"\"just a string\"",
        b"42",
        b"{\"op\":",
        b"\xff\xfe\xfd",
        b"{\"op\": \"ping\", \"x\": \"\xc3\x28\"}",
        b"{}",
        b"{\"op\": 5}",
        b"{\"op\": null}",
        b"{\"op\": [\"ping\"]}",
        b"{\"id\": 9}",
    ];
    for line in bad {
        c.send_raw(line);
        c.send_raw(b"\n");
        let r = c.recv();
        assert_eq!(r["ok"], false, "{:?}", String::from_utf8_lossy(line));
        assert_eq!(r["error"]["code"], "bad_request", "{r}");
        assert!(!r["error"]["message"].as_str().unwrap().is_empty());
    }
    let r = c.call(json!({"id": 9}));
    assert_eq!(r["id"], 9, "id of an op-less request is still echoed");
    assert!(r["error"]["message"].as_str().unwrap().contains("op"));
    assert_eq!(c.ok(json!({"op": "ping"}))["pong"], true);
}

fn blank_lines_get_no_response(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    c.send_raw(b"\n   \n\t\r\n{\"op\":\"ping\",\"id\":1}\n\n\r\n{\"op\":\"ping\",\"id\":2}\r\n");
    assert_eq!(c.recv()["id"], 1);
    assert_eq!(c.recv()["id"], 2);
}

fn unknown_op(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let (code, msg) = d.client().err(json!({"op": "drop_all_keys"}));
    assert_eq!(code, "unknown_op");
    assert!(msg.contains("drop_all_keys"));
    // The test hook that panics in a handler is no op without its switch
    // (`TestDaemon` starts the daemon without APIKEYD_TEST_HOOKS unless asked).
    let (code, _) = d.client().err(json!({"op": "debug_panic"}));
    assert_eq!(code, "unknown_op");
}

fn too_large_answers_and_the_connection_goes_on(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[server]\nmax_line_bytes = 1024", &[]);
    let mut c = d.client();
    assert_eq!(c.ok(json!({"op": "ping"}))["pong"], true);
    // Just under the cap is fine.
    let pad = "x".repeat(1024 - 40);
    let r = c.call(json!({"op": "ping", "pad": pad}));
    assert_eq!(r["ok"], true, "{r}");
    // Over the cap: too_large at once, without waiting for the newline.
    c.send_raw(&vec![b'a'; 5000]);
    let r = c.recv();
    assert_eq!(r["error"]["code"], "too_large");
    assert_eq!(r["id"], Value::Null);
    // The rest of that line is skipped; the next line is served.
    c.send_raw(&vec![b'b'; 3000]);
    c.send_raw(b"\n{\"op\":\"ping\",\"id\":2}\n");
    let r = c.recv();
    assert_eq!(r["id"], 2, "{r}");
    assert_eq!(r["result"]["pong"], true);
}

/// A 70 KB request between two pings, all pipelined on one connection (the default
/// 64 KiB cap): ping, too_large, ping, in order.
fn oversized_line_between_two_pings(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let huge = json!({"op": "set_user_api_key", "id": "big", "user_id": "u", "service": "openai",
        "key": "k".repeat(70 * 1024)});
    let batch = format!(
        "{}\n{huge}\n{}\n",
        json!({"op": "ping", "id": 1}),
        json!({"op": "ping", "id": 3})
    );
    let writer = c.send_in_background(batch);
    let first = c.recv();
    let second = c.recv();
    let third = c.recv();
    writer.join().unwrap().unwrap();
    assert_eq!(
        (first["id"].clone(), first["ok"].clone()),
        (json!(1), json!(true))
    );
    assert_eq!(second["error"]["code"], "too_large", "{second}");
    assert_eq!(
        (third["id"].clone(), third["ok"].clone()),
        (json!(3), json!(true))
    );
    // Nothing of the skipped line was applied.
    let r = c.ok(
        json!({"op": "get_user_api_key", "user_id": "u", "service": "openai",
        "fallback_to_pool": false, "fallback_to_config": false}),
    );
    assert_eq!(r["key"], Value::Null);
}

/// The daemon's resident memory in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// 10 MB without a newline: the daemon skips it as it arrives instead of keeping it.
fn endless_line_does_not_grow_memory(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    c.ok(json!({"op": "ping"}));
    let before = rss_kib(d.pid());
    let chunk = vec![b'z'; 64 * 1024];
    for _ in 0..160 {
        c.send_raw(&chunk);
    }
    // Every byte but what the socket buffers hold has been read by the daemon now.
    let after = rss_kib(d.pid());
    assert!(
        after < before + 4 * 1024,
        "RSS grew from {before} KiB to {after} KiB while skipping a 10 MB line"
    );
    assert_eq!(c.recv()["error"]["code"], "too_large");
    c.send_raw(b"\n{\"op\":\"ping\",\"id\":9}\n");
    assert_eq!(c.recv()["id"], 9);
}

fn pipelined_thousands_answer_in_order(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "p", "service": "openai", "key": "sk-pipelined-0000"}));
    let mut batch = Vec::new();
    let n = 3000;
    for i in 0..n {
        let req = match i % 4 {
            0 => json!({"op": "ping", "id": i}),
            1 => json!({"op": "get_user_api_key", "user_id": "p", "service": "openai", "id": i}),
            2 => json!({"op": "missing_api_key_error", "service": "openai", "id": i}),
            _ => json!({"op": "bogus", "id": i}),
        };
        serde_json::to_writer(&mut batch, &req).unwrap();
        batch.push(b'\n');
    }
    // One write for all of them, from another thread, while this one reads.
    let mut w = c.try_clone_writer();
    let writer = std::thread::spawn(move || w.write_all(&batch).unwrap());
    for i in 0..n {
        let r = c.recv();
        assert_eq!(r["id"], i, "response {i} out of order: {r}");
        match i % 4 {
            1 => assert_eq!(r["result"]["key"], "sk-pipelined-0000"),
            3 => assert_eq!(r["error"]["code"], "unknown_op"),
            _ => assert_eq!(r["ok"], true),
        }
    }
    writer.join().unwrap();
}

fn pipelined_writes_are_read_back_in_order(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let mut batch = String::new();
    for i in 0..50 {
        let key = format!("sk-version-{i:04}-abcdef");
        batch.push_str(
            &json!({"op": "set_user_api_key", "user_id": "rw", "service": "openai", "key": key})
                .to_string(),
        );
        batch.push('\n');
        batch.push_str(
            &json!({"op": "get_user_api_key", "user_id": "rw", "service": "openai", "fallback_to_pool": false, "fallback_to_config": false, "id": i})
                .to_string(),
        );
        batch.push('\n');
    }
    let writer = c.send_in_background(batch);
    for i in 0..50 {
        assert_eq!(c.recv()["result"]["stored"], true);
        let r = c.recv();
        assert_eq!(r["id"], i);
        assert_eq!(
            r["result"]["key"],
            format!("sk-version-{i:04}-abcdef"),
            "read did not see the write before it"
        );
    }
    writer.join().unwrap().unwrap();
}

fn fifty_concurrent_connections(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..60)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket);
                let user = format!("user{t}");
                let key = format!("sk-conc-{t:04}-xxxxxxxx");
                c.ok(json!({"op": "set_user_api_key", "user_id": user, "service": "openai", "key": key}));
                for i in 0..50 {
                    let r = c.call(json!({"op": "get_user_api_key", "user_id": user, "service": "openai", "id": i}));
                    assert_eq!(r["id"], i);
                    assert_eq!(r["result"]["key"], key);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread failed");
    }
    let stats = d.client().ok(json!({"op": "stats"}));
    assert!(stats["requests_total"].as_u64().unwrap() >= 60 * 51);
}

fn garbage_flood_changes_nothing(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[server]\nmax_line_bytes = 4096", &[]);
    let mut admin = d.client();
    admin.ok(json!({"op": "set_user_api_key", "user_id": "keep", "service": "openai", "key": "sk-keep-me-123456"}));
    admin.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-pool-keep-123456"}));
    // Deterministic pseudo-random bytes, with newlines sprinkled in, from several clients.
    let socket = d.socket.clone();
    let floods: Vec<_> = (0..4u64)
        .map(|seed| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut buf = Vec::with_capacity(200_000);
                for _ in 0..200_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = (x & 0xff) as u8;
                    buf.push(if b.is_multiple_of(37) { b'\n' } else { b });
                }
                let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let reader = s.try_clone().unwrap();
                let drain = std::thread::spawn(move || {
                    let mut n = 0;
                    for line in std::io::BufRead::lines(std::io::BufReader::new(reader)) {
                        let Ok(line) = line else { break };
                        let v: Value = serde_json::from_str(&line).expect("every response is JSON");
                        assert_eq!(v["ok"], false);
                        n += 1;
                    }
                    n
                });
                let _ = s.write_all(&buf);
                let _ = s.shutdown(std::net::Shutdown::Write);
                drain.join().unwrap()
            })
        })
        .collect();
    for f in floods {
        assert!(f.join().expect("flood thread") > 0);
    }
    let mut c = d.client();
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "keep", "service": "openai"}));
    assert_eq!(r["key"], "sk-keep-me-123456");
    let r = c.ok(json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(r["keys"].as_array().unwrap().len(), 1);
    let r = c.ok(json!({"op": "list_user_api_keys", "user_id": "keep"}));
    assert_eq!(r["keys"].as_array().unwrap().len(), 1);
}

fn partial_last_line_is_answered_at_eof(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    c.send_raw(b"{\"op\":\"ping\",\"id\":\"tail\"}");
    c.writer_shutdown();
    assert_eq!(c.recv()["id"], "tail");
    assert!(c.try_recv().is_none());
}

/// The idle timeout on tokio's paused clock. The daemon runs in-process (`start`
/// and `run`, as `serve` wires them) on this test's runtime, its clock paused: a
/// `sleep` here moves the clock the session's idle timer reads, at once and
/// exactly, so the test neither waits a real second nor races the timer.
/// Embedded mode only: the timeout lives in the session, which is the same in both
/// modes, and a real Redis answers on its own clock, which a paused clock would not
/// wait for.
#[test]
fn idle_connections_are_closed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let idle = Duration::from_secs(1);
    let mut config =
        apikeyd::process::config::Config::parse("[server]\nidle_timeout_s = 1\n").unwrap();
    config.keystore.path = dir.path().join("data/keystore.sqlite3");
    config.keystore.master_key_file = dir.path().join("data/master.key");
    config.server.socket = dir.path().join("run/apikeyd.sock");
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime")
    });
    system.block_on(async move {
        let socket = config.server.socket.clone();
        let listener = apikeyd::front::server::bind(&socket, config.socket_mode()).unwrap();
        let opened = apikeyd::open_keystore(&config, None).unwrap();
        let started = apikeyd::start(config, opened).unwrap();
        let (control, rx) = tokio::sync::mpsc::unbounded_channel();
        let daemon = actix_rt::spawn(apikeyd::run(started, listener, rx, None));

        // A connection in use stays open past the idle timeout: each request resets it.
        let mut busy = LineClient::connect(&socket).await;
        for _ in 0..5 {
            busy.ping().await;
            tokio::time::sleep(idle * 6 / 10).await;
        }
        busy.ping().await;
        // One left alone is closed when its idle time is up, not before.
        let mut alone = LineClient::connect(&socket).await;
        alone.ping().await;
        let began = tokio::time::Instant::now();
        assert_eq!(alone.read_line().await, "", "closed: EOF");
        let waited = began.elapsed();
        assert!(
            waited >= idle && waited <= idle + Duration::from_millis(5),
            "closed after {waited:?} of a {idle:?} idle timeout"
        );

        control.send(apikeyd::Control::Shutdown).ok();
        daemon.await.unwrap().unwrap();
    });
}

/// A JSON-lines client on the test's own runtime (the paused-clock test).
struct LineClient {
    reader: tokio::io::BufReader<tokio::net::UnixStream>,
}

impl LineClient {
    async fn connect(socket: &std::path::Path) -> LineClient {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        LineClient {
            reader: tokio::io::BufReader::new(stream),
        }
    }

    async fn ping(&mut self) {
        use tokio::io::AsyncWriteExt;
        let line = json!({"op": "ping"}).to_string() + "\n";
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .unwrap();
        let answer: Value = serde_json::from_str(&self.read_line().await).unwrap();
        assert_eq!(answer["result"]["pong"], true, "{answer}");
    }

    /// The next line, or "" at EOF.
    async fn read_line(&mut self) -> String {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        self.reader.read_line(&mut line).await.unwrap();
        line
    }
}

fn max_connections_refuses_the_extra_client(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[server]\nmax_connections = 3", &[]);
    // The readiness check's connection frees its slot once the daemon sees its EOF;
    // the client that waits for that is the first of the three held.
    let mut first = d.client();
    common::eventually(
        "only this client connected",
        Duration::from_secs(10),
        || first.ok(json!({"op": "stats"}))["connections"] == 1,
    );
    let mut held: Vec<Client> = vec![first, d.client(), d.client()];
    for c in &mut held {
        c.ok(json!({"op": "ping"}));
    }
    let mut extra = d.client();
    let r = extra.recv();
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "unavailable");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_connections"));
    assert!(extra.try_recv().is_none());
    for c in &mut held {
        c.ok(json!({"op": "ping"}));
    }
    // A slot frees when a client leaves: a new client gets in once the daemon has
    // seen the EOF (until then it is refused like the extra one).
    drop(held.pop());
    common::eventually(
        "a freed slot taken by a new client",
        Duration::from_secs(10),
        || d.client().call(json!({"op": "ping"}))["ok"] == true,
    );
}

/// SIGTERM while a client pipelines writes: every answer is either ok (applied) or
/// `unavailable` with `applied: false`, and after a restart the stored count is the
/// number of ok answers: no answer was ambiguous, nothing unanswered was applied.
fn shutdown_answers_are_never_ambiguous(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let n = 3000;
    let batch: String = (0..n)
        .map(|i| {
            format!(
                "{}\n",
                json!({"op": "consume_default_key_usage", "id": i, "user_id": "stop",
                    "tool_name": "t", "daily_limit": 1_000_000})
            )
        })
        .collect();
    let writer = c.send_in_background(batch);
    for i in 0..50 {
        assert_eq!(c.recv()["id"], i);
    }
    d.signal(libc::SIGTERM);
    let mut ok = 50u64;
    let mut refused = 0u64;
    for r in c.recv_until_closed() {
        if r["ok"] == true {
            ok += 1;
            assert_eq!(r["result"]["current_count"], ok, "{r}");
        } else {
            assert_eq!(r["error"]["code"], "unavailable", "{r}");
            assert_eq!(r["error"]["applied"], false, "{r}");
            assert!(r["id"].is_u64(), "a refused line keeps its id: {r}");
            refused += 1;
        }
    }
    // The daemon stops reading at shutdown: the rest of the batch may not go out.
    let _ = writer.join().unwrap();
    assert!(d.wait_exit().success());
    d.spawn();
    d.wait_ready();
    let r = d
        .client()
        .ok(json!({"op": "check_default_key_limit", "user_id": "stop",
        "tool_name": "t", "daily_limit": 1_000_000}));
    assert_eq!(
        r["current_count"].as_u64().unwrap(),
        ok,
        "{refused} refused"
    );
}

in_every_mode!(
    shutdown_answers_are_never_ambiguous,
    ping_answers_with_version,
    ids_are_echoed_verbatim,
    malformed_lines_get_one_error_each_and_connection_survives,
    blank_lines_get_no_response,
    unknown_op,
    too_large_answers_and_the_connection_goes_on,
    oversized_line_between_two_pings,
    endless_line_does_not_grow_memory,
    pipelined_thousands_answer_in_order,
    pipelined_writes_are_read_back_in_order,
    fifty_concurrent_connections,
    garbage_flood_changes_nothing,
    partial_last_line_is_answered_at_eof,
    max_connections_refuses_the_extra_client,
);
