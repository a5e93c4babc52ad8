//! Online master-key rotation: no request fails while it runs, and a rotation killed
//! at any point can be rerun without any key becoming undecryptable.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Client, Mode, TestDaemon};
use serde_json::json;

/// No caching, so every read decrypts what is stored right now.
const NO_CACHE: &str = "[cache]\nuser_key_ttl_s = 0\npool_ttl_s = 0\n";

fn user_key(i: usize) -> String {
    format!("sk-rotate-user-{i:05}-abcdef")
}

fn seed(d: &TestDaemon, users: usize) {
    let mut c = d.client();
    let mut batch = String::new();
    for i in 0..users {
        let req = json!({"op": "set_user_api_key", "user_id": format!("u{i}"), "service": "openai", "key": user_key(i)});
        batch.push_str(&req.to_string());
        batch.push('\n');
    }
    let writer = c.send_in_background(batch);
    for _ in 0..users {
        assert_eq!(c.recv()["ok"], true);
    }
    writer.join().unwrap().unwrap();
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-rotate-global-pool"}));
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-rotate-chan-pool-1", "channel_id": "c"}));
}

fn rotate_cmd(d: &TestDaemon) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.args(["rotate-master-key", "--config"])
        .arg(&d.config_path);
    cmd
}

/// Every stored key opens, and every stored value is sealed with `version`.
fn check_everything(d: &TestDaemon, users: usize, version: u32) {
    let mut c = d.client();
    for i in (0..users).step_by(7) {
        let r = c.ok(json!({"op": "get_user_api_key", "user_id": format!("u{i}"), "service": "openai", "fallback_to_pool": false}));
        assert_eq!(r["key"], user_key(i), "user {i}");
    }
    assert_eq!(
        c.ok(json!({"op": "get_channel_pool_api_key", "channel_id": "c", "service": "openai"}))
            ["key"],
        "sk-rotate-chan-pool-1"
    );
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"],
        "sk-rotate-global-pool"
    );
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    let versions: Vec<Vec<u8>> = db
        .prepare("SELECT DISTINCT substr(sealed, 2, 4) FROM user_keys UNION SELECT substr(value, 2, 4) FROM meta")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(versions, vec![version.to_be_bytes().to_vec()]);
    if let Some(r) = &d.redis {
        use base64::Engine;
        use redis::Commands;
        let mut con = r.conn();
        let pool: Vec<(String, String)> = con.hgetall("stargazer:global_api_pool:openai").unwrap();
        for (_, v) in pool {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(v.strip_prefix("akd1:").unwrap())
                .unwrap();
            assert_eq!(raw[1..5], version.to_be_bytes());
        }
        // User keys sealed in Redis (keystore.user_keys = "redis") are re-sealed too.
        let hashes: Vec<String> = con
            .scan_match::<_, String>("stargazer:user_api_keys:*")
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut seen = 0;
        for h in hashes {
            let fields: Vec<(String, String)> = con.hgetall(&h).unwrap();
            for (_, v) in fields {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(v.strip_prefix("akd1:").unwrap())
                    .unwrap();
                assert_eq!(raw[1..5], version.to_be_bytes(), "{h}");
                seen += 1;
            }
        }
        assert!(seen > 0, "the test stores user keys in redis");
    }
    let text = std::fs::read_to_string(d.path("data/master.key")).unwrap();
    assert_eq!(
        text.lines().filter(|l| l.starts_with('v')).count(),
        1,
        "old versions retired"
    );
}

/// How many threads [`hammer`] runs.
const HAMMERS: usize = 4;

/// Readers and a writer hammer the daemon until `stop`, each counting its answers in
/// `answered[t]`; answers the failures seen.
fn hammer(
    d: &TestDaemon,
    users: usize,
    stop: Arc<AtomicBool>,
    answered: Arc<[AtomicU64; HAMMERS]>,
) -> Vec<std::thread::JoinHandle<u64>> {
    let written = Arc::new(AtomicU64::new(0));
    (0..HAMMERS)
        .map(|t| {
            let socket = d.socket.clone();
            let stop = stop.clone();
            let written = written.clone();
            let answered = answered.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket);
                let mut failures = 0;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i = (i * 31 + 17) % users;
                    let r = if t == 3 {
                        let n = written.fetch_add(1, Ordering::Relaxed);
                        c.call(json!({"op": "set_user_api_key", "user_id": format!("w{n}"), "service": "openai", "key": format!("sk-written-{n:06}")}))
                    } else {
                        c.call(json!({"op": "get_user_api_key", "user_id": format!("u{i}"), "service": "openai", "channel_id": "c", "fallback_to_pool": t == 2}))
                    };
                    answered[t].fetch_add(1, Ordering::Relaxed);
                    let good = r["ok"] == true
                        && (t == 3 || r["result"]["key"] == user_key(i))
                        && r["result"].get("degraded").is_none();
                    if !good {
                        eprintln!("failed during rotation: {r}");
                        failures += 1;
                    }
                }
                failures
            })
        })
        .collect()
}

fn rotation_under_load_fails_no_request(mode: Mode) {
    let d = TestDaemon::start_with(mode, NO_CACHE, &[]);
    let users = 600;
    seed(&d, users);
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<[AtomicU64; HAMMERS]> = Arc::default();
    let workers = hammer(&d, users, stop.clone(), answered.clone());
    // Every thread has answers before the rotation starts and more after it ends,
    // so the load spans the whole rotation.
    let every_thread_answers_again = || {
        let at: Vec<u64> = answered.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        common::eventually(
            "answers on every load thread",
            Duration::from_secs(20),
            || {
                answered
                    .iter()
                    .zip(&at)
                    .all(|(a, before)| a.load(Ordering::Relaxed) >= before + 10)
            },
        );
    };
    every_thread_answers_again();
    let out = rotate_cmd(&d).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("retired key versions [1]"), "{text}");
    every_thread_answers_again();
    stop.store(true, Ordering::Relaxed);
    let failures: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(failures, 0, "requests failed during the rotation");
    check_everything(&d, users, 2);
    // Keys written during the rotation are readable too, also after a restart.
    let mut d = d;
    d.restart();
    let r = d.client().ok(json!({"op": "get_user_api_key", "user_id": "w0", "service": "openai", "fallback_to_pool": false}));
    assert_eq!(r["key"], "sk-written-000000");
    check_everything(&d, users, 2);
}

fn rotation_killed_anywhere_can_be_rerun(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, NO_CACHE, &[]);
    let users = 1500;
    seed(&d, users);
    let mut version = 1;
    // Kill the rotation at a different stage each time, the first once it has
    // handed the new version to the daemon; the stage is the line it just printed.
    for stage in [
        "the daemon now uses",
        "pass 1:",
        "pass 2:",
        "kept the whole keyring",
    ] {
        let mut child = rotate_cmd(&d)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let reached = lines.by_ref().any(|line| line.unwrap().contains(stage));
        assert!(reached, "the rotation never printed {stage:?}");
        let _ = child.kill();
        let _ = child.wait();
        // The daemon serves every key meanwhile, and after a restart on the half-done state.
        check_some(&d, users);
        d.restart();
        check_some(&d, users);
        // Rerunning finishes the job.
        let out = rotate_cmd(&d).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let now: u32 = text
            .lines()
            .find_map(|l| l.split("now holds only version ").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        assert!(now > version, "{text}");
        version = now;
        check_everything(&d, users, version);
    }
}

fn check_some(d: &TestDaemon, users: usize) {
    let mut c = d.client();
    for i in (0..users).step_by(97) {
        let r = c.ok(json!({"op": "get_user_api_key", "user_id": format!("u{i}"), "service": "openai", "fallback_to_pool": false}));
        assert_eq!(r["key"], user_key(i));
    }
    assert_eq!(
        c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"],
        "sk-rotate-global-pool"
    );
}

fn add_only_stops_before_resealing(mode: Mode) {
    let d = TestDaemon::start_with(mode, NO_CACHE, &[]);
    seed(&d, 10);
    let out = rotate_cmd(&d).arg("--add-only").output().unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(d.path("data/master.key")).unwrap();
    assert_eq!(text.lines().filter(|l| l.starts_with('v')).count(), 2);
    let r = d.client().ok(json!({"op": "set_user_api_key", "user_id": "x", "service": "openai", "key": "sk-sealed-by-v2-000"}));
    assert_eq!(r["stored"], true);
    let out = rotate_cmd(&d).output().unwrap();
    assert!(out.status.success());
    check_everything(&d, 10, 2);
}

in_every_mode!(
    rotation_under_load_fails_no_request,
    rotation_killed_anywhere_can_be_rerun,
    add_only_stops_before_resealing,
);
