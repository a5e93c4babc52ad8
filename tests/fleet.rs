//! A fleet on one Redis (docs/security.md, "Rotation in a fleet"): no daemon starts
//! with a key other than the fleet's, and rotating the master key through one daemon
//! never strands another.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use common::{eventually, Mode, TestDaemon};
use redis::Commands;
use serde_json::{json, Value};

/// No caching, so every read opens what is stored right now.
const NO_CACHE: &str = "[cache]\nuser_key_ttl_s = 0\npool_ttl_s = 0\n";

fn rotate(config: &Path, extra: &[&str]) -> (bool, String) {
    let (status, text) = common::tool("rotate-master-key", config, extra);
    (status.success(), text)
}

/// The operator's steps once A has added a key version: A's key file copied to B,
/// which adds it too; then A re-seals everything and retires version 1.
fn add_on_b_then_retire_on_a(a: &TestDaemon, b: &TestDaemon) {
    std::fs::copy(a.path("data/master.key"), b.path("data/master.key")).unwrap();
    let (ok, text) = rotate(&b.config_path, &["--add-only"]);
    assert!(ok, "{text}");
    let (ok, text) = rotate(&a.config_path, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("retired key versions [1]"), "{text}");
}

fn pool_key(c: &mut common::Client, service: &str) -> Value {
    c.ok(json!({"op": "get_pool_api_key", "service": service}))["key"].clone()
}

/// The key version of every sealed pool value in Redis.
fn pool_versions(con: &mut redis::Connection) -> Vec<u32> {
    let hashes: Vec<String> = con
        .scan_match::<_, String>("stargazer:global_api_pool:*")
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut versions = Vec::new();
    for h in hashes {
        let values: Vec<String> = con.hvals(&h).unwrap();
        for v in values {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(v.strip_prefix("akd1:").unwrap())
                .unwrap();
            versions.push(u32::from_be_bytes(raw[1..5].try_into().unwrap()));
        }
    }
    versions.sort_unstable();
    versions.dedup();
    versions
}

/// Members of the fleet set whose heartbeat has not expired.
fn live_daemons(con: &mut redis::Connection) -> usize {
    let ids: Vec<String> = con.smembers("stargazer:apikeyd:fleet").unwrap_or_default();
    ids.iter()
        .filter(|id| {
            con.exists::<_, bool>(format!("stargazer:apikeyd:fleet:{id}"))
                .unwrap_or(false)
        })
        .count()
}

#[test]
fn a_daemon_without_the_fleets_key_is_refused() {
    let a = TestDaemon::start_with(Mode::Redis, "", &[]);
    a.client()
        .ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-sealed-by-fleet-01"}));

    // The key file is missing: no new key is made, the operator is told to copy it.
    let mut fresh = TestDaemon::prepare(Mode::Redis, a.redis.clone(), None, "", &[]);
    let (status, log) = fresh.expect_refusal();
    assert!(!status.success());
    assert!(
        log.contains("copy the key file from a host of the fleet"),
        "{log}"
    );
    assert!(
        !fresh.path("data/master.key").exists(),
        "no key was created"
    );

    // Another key altogether.
    let other_key = apikeyd::keys::MasterKey::generate_base64();
    let mut other = TestDaemon::prepare(
        Mode::Redis,
        a.redis.clone(),
        Some(other_key.as_bytes().to_vec()),
        "",
        &[],
    );
    let (status, log) = other.expect_refusal();
    assert!(!status.success());
    assert!(log.contains("differs from the fleet's"), "{log}");
    assert!(!log.contains("listening"), "{log}");

    // A fleet from before check values: the sealed values themselves decide.
    let mut con = a.redis.as_ref().unwrap().conn();
    let _: () = con.del("stargazer:apikeyd:keycheck").unwrap();
    let (status, log) = other.expect_refusal();
    assert!(!status.success());
    assert!(
        log.contains("does not open the values sealed in Redis"),
        "{log}"
    );
    // Redis cannot be asked: no key is made either.
    let down = common::RedisServer::start();
    down.kill();
    let mut blind = TestDaemon::prepare(Mode::Redis, Some(down), None, "", &[]);
    let (status, log) = blind.expect_refusal();
    assert!(!status.success());
    assert!(log.contains("Redis cannot be checked"), "{log}");
    assert!(!blind.path("data/master.key").exists());
    // The fleet's own daemons still start and serve.
    let mut b = TestDaemon::start_sharing(&a, "");
    assert_eq!(
        pool_key(&mut b.client(), "openai"),
        json!("sk-sealed-by-fleet-01")
    );
    b.restart();
}

#[test]
fn rotation_through_one_daemon_never_strands_another() {
    let a = TestDaemon::start_with(Mode::Redis, NO_CACHE, &[]);
    let b = TestDaemon::start_sharing(&a, NO_CACHE);
    let (mut ca, mut cb) = (a.client(), b.client());
    ca.ok(json!({"op": "add_pool_key", "service": "p1", "key": "sk-pool-one-0000001"}));
    let mut con = a.redis.as_ref().unwrap().conn();
    eventually(
        "two live daemons in the fleet",
        Duration::from_secs(10),
        || live_daemons(&mut con) == 2,
    );

    // Stray members of the fleet set hide nobody: one whose key is a hash, one whose
    // id is not UTF-8 and whose value is not a heartbeat.
    let _: () = redis::cmd("SADD")
        .arg("stargazer:apikeyd:fleet")
        .arg("stray")
        .arg(b"\xff\xfe".as_slice())
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("stargazer:apikeyd:fleet:stray")
        .arg("a")
        .arg("b")
        .query(&mut con)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(b"stargazer:apikeyd:fleet:\xff\xfe".as_slice())
        .arg("x")
        .query(&mut con)
        .unwrap();
    let v1_only = std::fs::read(a.path("data/master.key")).unwrap();

    // B never got the new version: rotate through A adds it, then stops before
    // re-sealing, naming B and what to do.
    let (ok, text) = rotate(&a.config_path, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("pid {}", b.pid())), "{text}");
    assert!(text.contains("--add-only"), "{text}");
    // The member whose key is a hash reads as expired (MGET gives nil) and is dropped
    // from the set; the other is named.
    assert!(text.contains("skipping fleet member"), "{text}");
    assert_eq!(pool_versions(&mut con), vec![1], "nothing re-sealed");
    // A daemon started now with the old key alone is refused: the fleet uses v2.
    let mut late = TestDaemon::prepare(Mode::Redis, a.redis.clone(), Some(v1_only), "", &[]);
    let (status, log) = late.expect_refusal();
    assert!(!status.success());
    assert!(log.contains("which this master key lacks"), "{log}");
    // import-legacy through A seals with the version B holds too.
    let _: () = redis::cmd("HSET")
        .arg("stargazer:global_api_pool:legacy")
        .arg("plain")
        .arg("sk-legacy-in-clear-0001")
        .query(&mut con)
        .unwrap();
    let (status, text) = common::tool("import-legacy", &a.config_path, &[]);
    assert!(status.success(), "{text}");
    assert_eq!(
        pool_key(&mut cb, "legacy"),
        json!("sk-legacy-in-clear-0001")
    );
    // Meanwhile both serve every key, whoever added it.
    ca.ok(json!({"op": "add_pool_key", "service": "p2", "key": "sk-pool-two-by-a-02"}));
    cb.ok(json!({"op": "add_pool_key", "service": "p3", "key": "sk-pool-three-by-b3"}));
    for c in [&mut ca, &mut cb] {
        assert_eq!(pool_key(c, "p1"), json!("sk-pool-one-0000001"));
        assert_eq!(pool_key(c, "p2"), json!("sk-pool-two-by-a-02"));
        assert_eq!(pool_key(c, "p3"), json!("sk-pool-three-by-b3"));
    }
    assert_eq!(
        pool_versions(&mut con),
        vec![1],
        "A seals with the version B holds"
    );

    // The operator follows the advice: copy A's key file to B, reload B there.
    add_on_b_then_retire_on_a(&a, &b);
    assert_eq!(pool_versions(&mut con), vec![2]);
    ca.ok(json!({"op": "add_pool_key", "service": "p4", "key": "sk-pool-four-by-a-4"}));
    cb.ok(json!({"op": "add_pool_key", "service": "p5", "key": "sk-pool-five-by-b-5"}));
    for c in [&mut ca, &mut cb] {
        for (service, key) in [
            ("p1", "sk-pool-one-0000001"),
            ("p2", "sk-pool-two-by-a-02"),
            ("p3", "sk-pool-three-by-b3"),
            ("p4", "sk-pool-four-by-a-4"),
            ("p5", "sk-pool-five-by-b-5"),
        ] {
            assert_eq!(pool_key(c, service), json!(key), "{service}");
        }
    }
    // A daemon started with the retired key alone is refused.
    let retired = std::fs::read(a.path("data/master.key.retired-v1")).unwrap();
    let only_v1: String = String::from_utf8(retired)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("v2:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut stale = TestDaemon::prepare(
        Mode::Redis,
        a.redis.clone(),
        Some(only_v1.into_bytes()),
        "",
        &[],
    );
    let (status, log) = stale.expect_refusal();
    assert!(!status.success());
    assert!(log.contains("retired"), "{log}");
}

#[test]
fn a_daemon_that_slept_through_a_rotation_stops_instead_of_sealing_with_a_retired_key() {
    let a = TestDaemon::start_with(Mode::Redis, NO_CACHE, &[]);
    let mut b = TestDaemon::start_sharing(&a, NO_CACHE);
    let mut con = a.redis.as_ref().unwrap().conn();
    eventually(
        "two live daemons in the fleet",
        Duration::from_secs(10),
        || live_daemons(&mut con) == 2,
    );
    // B is paused past its heartbeat's expiry; the fleet takes it for gone.
    b.signal(libc::SIGSTOP);
    eventually(
        "the paused daemon gone from the fleet",
        Duration::from_secs(20),
        || live_daemons(&mut con) == 1,
    );
    let (ok, text) = rotate(&a.config_path, &[]);
    assert!(ok, "{text}");
    b.signal(libc::SIGCONT);
    // Its next beat finds every version it holds retired: it stops.
    let status = b.wait_exit();
    assert!(!status.success());
    assert!(b.logs().contains("retired every version"), "{}", b.logs());
}

/// The version a stored `akd1:` value was sealed with.
fn sealed_version_of(value: &[u8]) -> u32 {
    let text = std::str::from_utf8(value).unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.strip_prefix("akd1:").unwrap())
        .unwrap();
    u32::from_be_bytes(raw[1..5].try_into().unwrap())
}

/// The heartbeat record of the daemon with `pid`, as JSON.
fn record_of(con: &mut redis::Connection, pid: i32) -> Option<Value> {
    let ids: Vec<String> = con.smembers("stargazer:apikeyd:fleet").unwrap_or_default();
    ids.iter().find_map(|id| {
        let text: Option<String> = con.get(format!("stargazer:apikeyd:fleet:{id}")).ok()?;
        let v: Value = serde_json::from_str(&text?).ok()?;
        (v["pid"] == json!(pid)).then_some(v)
    })
}

/// Waits until the daemon with `pid` has written two more heartbeats (so it has
/// read the fleet at least once since now).
fn two_beats(con: &mut redis::Connection, pid: i32) {
    let at = |con: &mut redis::Connection| {
        record_of(con, pid)
            .and_then(|r| r["at"].as_i64())
            .unwrap_or(0)
    };
    let start = at(con);
    eventually(
        "two more heartbeats of the daemon",
        Duration::from_secs(20),
        || at(con) >= start + 2,
    );
}

/// Plants a heartbeat record for member `id`, as a Redis writer can.
fn plant_heartbeat(con: &mut redis::Connection, id: &str, record: &Value) {
    let _: () = con.sadd("stargazer:apikeyd:fleet", id).unwrap();
    let _: () = con
        .set_ex(
            format!("stargazer:apikeyd:fleet:{id}"),
            record.to_string(),
            3600,
        )
        .unwrap();
}

/// A fleet that rotated from v1 to v2 through A, while B (another host) still holds
/// both versions in its key file.
fn rotated_fleet() -> (TestDaemon, TestDaemon) {
    let a = TestDaemon::start_with(Mode::Redis, NO_CACHE, &[]);
    let b = TestDaemon::start_sharing(&a, NO_CACHE);
    let mut con = a.redis.as_ref().unwrap().conn();
    eventually(
        "two live daemons in the fleet",
        Duration::from_secs(10),
        || live_daemons(&mut con) == 2,
    );
    let (ok, text) = rotate(&a.config_path, &["--add-only"]);
    assert!(ok, "{text}");
    add_on_b_then_retire_on_a(&a, &b);
    (a, b)
}

/// Keyring text holding only the retired version 1 (what a leak of the retired
/// backup's v1 line gives).
fn retired_v1_only(a: &TestDaemon) -> apikeyd::keys::MasterKey {
    let whole = std::fs::read_to_string(a.path("data/master.key.retired-v1")).unwrap();
    let only: String = whole
        .lines()
        .filter(|l| !l.starts_with("v2:"))
        .map(|l| format!("{l}\n"))
        .collect();
    apikeyd::keys::MasterKey::from_text(&only).unwrap()
}

#[test]
fn a_fake_heartbeat_never_makes_a_daemon_seal_with_a_retired_version() {
    let (a, b) = rotated_fleet();
    let mut con = a.redis.as_ref().unwrap().conn();
    let b_key = apikeyd::keys::MasterKey::read_file(&b.path("data/master.key")).unwrap();
    assert_eq!(
        b_key.versions(),
        vec![1, 2],
        "B still holds the retired version"
    );

    // A Redis writer plants a member that claims to hold only the retired version.
    let fake = json!({"id": "fake:1:0", "host": "h", "pid": 1, "socket": "/s",
        "versions": [1], "sealing": 1, "at": apikeyd::model::clock::now_s()});
    plant_heartbeat(&mut con, "fake:1:0", &fake);
    two_beats(&mut con, b.pid());
    let mut cb = b.client();
    cb.ok(json!({"op": "add_pool_key", "service": "after", "key": "sk-pool-after-rotation-1"}));
    cb.ok(
        json!({"op": "set_user_api_key", "user_id": "victim", "service": "openai",
        "key": "sk-user-after-rotation-1"}),
    );
    let pool: Vec<Vec<u8>> = con.hvals("stargazer:global_api_pool:after").unwrap();
    let user: Vec<u8> = con
        .hget("stargazer:user_api_keys:victim", "openai")
        .unwrap();
    assert_eq!(sealed_version_of(&pool[0]), 2, "pool key sealed with v2");
    assert_eq!(sealed_version_of(&user), 2, "user key sealed with v2");
    // The retired version alone opens neither.
    let leaked = retired_v1_only(&a);
    assert!(matches!(
        apikeyd::store::envelope::open_user_value(&leaked, "stargazer", "victim", "openai", &user),
        apikeyd::store::envelope::StoredValue::Broken
    ));
    assert!(matches!(
        apikeyd::store::envelope::open_user_value(&b_key, "stargazer", "victim", "openai", &user),
        apikeyd::store::envelope::StoredValue::Sealed(_)
    ));
    // Logged once as a security event, and counted.
    let logs = b.logs();
    assert_eq!(
        logs.matches("ignoring a fleet heartbeat").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("fake:1:0"), "{logs}");
    let stats = cb.ok(json!({"op": "stats"}));
    assert_eq!(
        stats["store"]["unauthenticated_heartbeats"],
        json!(1),
        "{stats}"
    );
    let metrics = cb.ok(json!({"op": "metrics"}));
    assert!(
        metrics
            .to_string()
            .contains("apikeyd_fleet_unauthenticated_heartbeats_total 1"),
        "{metrics}"
    );

    // Even a record that authenticates (its writer holds the current key) cannot
    // lower the sealing version to a retired one.
    let mut signed = apikeyd::fleet::Member {
        id: "signed:1:0".into(),
        host: "h".into(),
        pid: 1,
        socket: "/s".into(),
        versions: vec![1],
        sealing: 1,
        at: apikeyd::model::clock::now_s(),
        tags: Default::default(),
    };
    signed.sign(&b_key, &Default::default());
    plant_heartbeat(
        &mut con,
        "signed:1:0",
        &serde_json::to_value(&signed).unwrap(),
    );
    two_beats(&mut con, b.pid());
    cb.ok(
        json!({"op": "set_user_api_key", "user_id": "victim", "service": "github",
        "key": "sk-user-after-rotation-2"}),
    );
    let user: Vec<u8> = con
        .hget("stargazer:user_api_keys:victim", "github")
        .unwrap();
    assert_eq!(sealed_version_of(&user), 2, "never a retired version");
}

/// What B acknowledged: (is a user key, service, key).
type Acked = Vec<(bool, String, String)>;

#[test]
fn hiding_a_daemons_heartbeat_during_a_rotation_loses_no_write_it_acknowledged() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let a = TestDaemon::start_with(Mode::Redis, NO_CACHE, &[]);
    let mut b = TestDaemon::start_sharing(&a, NO_CACHE);
    let redis = a.redis.clone().unwrap();
    let mut con = redis.conn();
    eventually(
        "two live daemons in the fleet",
        Duration::from_secs(10),
        || live_daemons(&mut con) == 2,
    );
    let b_id = record_of(&mut con, b.pid()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    // A Redis writer hides B's heartbeat every 2 ms.
    let hider = {
        let (stop, mut con, id) = (stop.clone(), redis.conn(), b_id.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _: redis::RedisResult<()> = redis::pipe()
                    .srem("stargazer:apikeyd:fleet", &id)
                    .del(format!("stargazer:apikeyd:fleet:{id}"))
                    .query(&mut con);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Meanwhile B takes writes, user keys and pool keys, until it stops.
    let writer = {
        let (stop, socket) = (stop.clone(), b.socket.clone());
        std::thread::spawn(move || {
            let mut acked = Acked::new();
            let timeouts = apikeyd::wire::client::Timeouts::TOOL;
            let Ok(mut c) = apikeyd::wire::client::Connection::connect(&socket, timeouts) else {
                return acked;
            };
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (user, service, key) =
                    (i % 2 == 0, format!("s{i}"), format!("sk-by-b-{i:012}"));
                let line = if user {
                    json!({"op": "set_user_api_key", "user_id": "w", "service": service, "key": key})
                } else {
                    json!({"op": "add_pool_key", "service": service, "key": key})
                };
                match c.request(&line.to_string()) {
                    Ok(v) if v["ok"] == true => acked.push((user, service, key)),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            acked
        })
    };
    eventually(
        "one live daemon in the fleet",
        Duration::from_secs(10),
        || live_daemons(&mut con) == 1,
    );
    let (ok, text) = rotate(&a.config_path, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("retired key versions [1]"), "{text}");
    // B holds only the retired version: it stops at its next beat.
    let status = b.wait_exit();
    assert!(!status.success());
    stop.store(true, Ordering::Relaxed);
    hider.join().unwrap();
    let acked = writer.join().unwrap();
    assert!(acked.len() > 10, "B took writes: {}", acked.len());
    // Every write B acknowledged is readable after the rotation.
    let mut ca = a.client();
    let mut lost = Vec::new();
    for (user, service, key) in &acked {
        let r = if *user {
            ca.call(
                json!({"op": "get_user_api_key", "user_id": "w", "service": service,
                "fallback_to_pool": false, "fallback_to_config": false}),
            )
        } else {
            ca.call(json!({"op": "get_pool_api_key", "service": service}))
        };
        if r["result"]["key"] != json!(key) {
            lost.push(service.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {lost:?}",
        lost.len(),
        acked.len()
    );
}

#[test]
fn offline_rotation_right_after_a_stop_is_not_refused_for_the_stopped_daemon() {
    let mut a = TestDaemon::start_with(Mode::Redis, NO_CACHE, &[]);
    a.client()
        .ok(json!({"op": "add_pool_key", "service": "p1", "key": "sk-pool-one-0000001"}));
    let mut con = a.redis.as_ref().unwrap().conn();
    eventually(
        "one live daemon in the fleet",
        Duration::from_secs(10),
        || live_daemons(&mut con) == 1,
    );
    // A clean stop removes the daemon's heartbeat.
    assert!(a.stop().success());
    assert_eq!(
        live_daemons(&mut con),
        0,
        "the heartbeat went with the daemon"
    );
    let (ok, text) = rotate(&a.config_path, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("retired key versions [1]"), "{text}");

    // Killed, it leaves a heartbeat behind; its pid no longer runs on this host, so
    // rotation takes it for gone, and says so.
    a.spawn();
    a.wait_ready();
    eventually(
        "one live daemon in the fleet",
        Duration::from_secs(10),
        || live_daemons(&mut con) == 1,
    );
    let pid = a.pid();
    a.kill9();
    assert_eq!(
        live_daemons(&mut con),
        1,
        "a killed daemon's heartbeat lingers"
    );
    let (ok, text) = rotate(&a.config_path, &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "treating the daemon with pid {pid} on this host as gone"
        )),
        "{text}"
    );
    assert!(text.contains("retired key versions [2]"), "{text}");
}
