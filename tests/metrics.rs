//! Metrics (docs/operations.md, "Monitoring"): counters in `stats`, the Prometheus
//! text over a real HTTP GET of /metrics on loopback, and `apikeyd metrics` over the
//! socket.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{Mode, TestDaemon};
use serde_json::json;

/// The address the daemon logged for `metrics.listen` (port 0 picks a free one).
fn metrics_addr(d: &TestDaemon) -> String {
    let said = "serving GET /metrics";
    common::eventually(
        "the metrics listener, logged",
        Duration::from_secs(10),
        || d.logs().contains(said),
    );
    let log = d.logs();
    let line = log.lines().find(|l| l.contains(said)).expect("the line");
    let at = line.find("addr=").expect("addr in the line") + 5;
    line[at..].split_whitespace().next().unwrap().to_string()
}

/// A plain HTTP/1.0 GET; (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics.listen");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Runs `promtool check metrics` on `text`; panics with its complaints. promtool
/// comes with the Debian package `prometheus` (.ci/run installs it).
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): install prometheus (promtool): apt-get install prometheus"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "promtool check metrics: {}{}\non:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A local user holding many half-sent requests (and the descriptors they take)
/// neither stops the metrics port for good nor the Unix socket's accept.
#[test]
fn half_sent_requests_do_not_stop_the_metrics_port() {
    let d = TestDaemon::start_with(Mode::Embedded, "[metrics]\nlisten = \"127.0.0.1:0\"\n", &[]);
    let addr = metrics_addr(&d);
    // Fewer descriptors than half-sent requests: a thread or descriptor per
    // connection would run out.
    common::limit_descriptors(d.pid(), 256);
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    let held: Vec<TcpStream> = (0..300)
        .filter_map(|_| {
            let mut s = TcpStream::connect_timeout(&sock, Duration::from_millis(300)).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(s)
        })
        .collect();
    assert!(held.len() >= 100, "only {} connections opened", held.len());
    // Meanwhile the Unix socket accepts and answers.
    d.client().ok(json!({"op": "ping"}));
    drop(held);
    common::eventually("GET /metrics answered", Duration::from_secs(60), || {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
    });
    d.client().ok(json!({"op": "ping"}));
    assert!(!d.logs().contains("panicked"), "{}", d.logs());
}

#[test]
fn example_alert_rules_pass_promtool() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install prometheus (promtool): apt-get install prometheus")
        });
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(rules).unwrap();
    for alert in [
        "ApikeydDown",
        "ApikeydRedisDown",
        "ApikeydNoActivePoolKey",
        "ApikeydErrorRate",
    ] {
        assert!(text.contains(&format!("alert: {alert}\n")), "{alert}");
    }
}

/// Sends a known mix of requests; returns the connection, still open.
fn exercise(d: &TestDaemon) -> common::Client {
    let mut c = d.client();
    c.ok(json!({"op": "ping"}));
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-metrics-000001"}));
    c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    c.err(json!({"op": "no_such_op"}));
    c.err(json!({"op": "get_user_api_key", "service": "openai"}));
    c.ok(json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t", "daily_limit": 0}));
    c
}

fn prometheus_over_http(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[metrics]\nlisten = \"127.0.0.1:0\"\n", &[]);
    let addr = metrics_addr(&d);
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let _open = exercise(&d);
    let mut admin = d.client();
    let cooled = admin
        .ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-metrics-pool-0001"}))
        ["key_id"]
        .clone();
    admin.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-metrics-pool-0002"}));
    admin.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-metrics-pool-0003", "channel_id": "c1"}));
    admin.ok(
        json!({"op": "report_key_result", "service": "openai", "key_id": cooled,
        "outcome": "rate_limited", "retry_after_s": 600}),
    );
    drop(admin);
    // Earlier connections (the readiness ping) may still be closing: poll for one.
    let (mut status, mut text) = (String::new(), String::new());
    common::eventually("apikeyd_connections 1", Duration::from_secs(10), || {
        (status, text) = get(&addr, "/metrics");
        text.contains("apikeyd_connections 1\n")
    });
    assert!(status.contains("200"), "{status}");
    for want in [
        r#"apikeyd_requests_total{op="ping",code="ok"} "#,
        r#"apikeyd_requests_total{op="get_user_api_key",code="ok"} 2"#,
        r#"apikeyd_requests_total{op="get_user_api_key",code="bad_request"} 1"#,
        r#"apikeyd_requests_total{op="other",code="unknown_op"} 1"#,
        "apikeyd_request_duration_seconds_bucket{le=",
        "apikeyd_request_duration_seconds_count",
        "apikeyd_quota_denials_total 1",
        "apikeyd_cache_hits_total",
        "apikeyd_cache_misses_total",
        "apikeyd_connections 1",
        r#"apikeyd_pool_keys{service="openai",scope="global",state="active"} 1"#,
        r#"apikeyd_pool_keys{service="openai",scope="global",state="cooling"} 1"#,
        r#"apikeyd_pool_keys{service="openai",scope="global",state="disabled"} 0"#,
        r#"apikeyd_pool_keys{service="openai",scope="channel",state="active"} 1"#,
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert_eq!(
        text.contains("apikeyd_redis_up 1"),
        mode == Mode::Redis,
        "{text}"
    );
    assert!(!text.contains("sk-metrics"), "no key in metrics");
    assert!(
        !text.contains(cooled.as_str().unwrap()),
        "no key id in metrics"
    );
    if mode == Mode::Redis {
        for want in [
            "# TYPE apikeyd_redis_failovers_total counter",
            "apikeyd_redis_failovers_total 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
    promtool_check(&text);
    every_family_is_documented(&text);
    let (status, _) = get(&addr, "/other");
    assert!(status.contains("404"), "{status}");

    // The same text over the socket, for node_exporter's textfile collector.
    let out = Command::new(common::bin())
        .args(["metrics", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(r#"apikeyd_requests_total{op="get_user_api_key",code="ok"} 2"#),
        "{text}"
    );
    promtool_check(&text);
}

/// The metric names of docs/operations.md's Prometheus table (its rows' first cell,
/// labels left out).
fn documented_families() -> Vec<String> {
    let guide = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .unwrap();
    guide
        .lines()
        .filter(|l| l.starts_with("| `apikeyd_"))
        .flat_map(|l| {
            let cell = l.split(" | ").next().unwrap_or_default();
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|name| name.split('{').next().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every family in `text` (its `# TYPE` line) has its row in the operations guide.
fn every_family_is_documented(text: &str) {
    let documented = documented_families();
    assert!(documented.len() >= 20, "{documented:?}");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            assert!(
                documented.iter().any(|d| d == name),
                "docs/operations.md, \"Prometheus\", lacks {name}"
            );
        }
    }
}

fn stats_counts_per_op_and_code(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    drop(exercise(&d));
    let s = d.client().ok(json!({"op": "stats"}));
    assert_eq!(s["requests"]["by_op"]["get_user_api_key"], 3, "{s}");
    assert_eq!(s["requests"]["by_op"]["other"], 1, "{s}");
    assert_eq!(s["requests"]["by_code"]["unknown_op"], 1, "{s}");
    assert_eq!(s["requests"]["by_code"]["bad_request"], 1, "{s}");
    assert_eq!(s["quota_denials"], 1, "{s}");
}

in_every_mode!(prometheus_over_http, stats_counts_per_op_and_code);

#[test]
fn metrics_listen_is_loopback_only() {
    let mut d = TestDaemon::start();
    assert!(d.stop().success());
    d.write_config("[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    let before = d.logs().len();
    let (status, log) = d.expect_refusal();
    assert_eq!(status.code(), Some(2));
    assert!(
        log[before..].contains("metrics.listen") && log[before..].contains("loopback"),
        "{log}"
    );
}
