//! A real Sentinel set-up on loopback (a master, a replica, three sentinels): the
//! master is killed with SIGKILL, Sentinel promotes the replica, and the daemon
//! serves again without a restart, with nothing acknowledged lost. The time to
//! answer again and the quota increments lost are printed (measured, not asserted).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, Client, Mode, TestDaemon};
use redis::Commands;
use serde_json::json;

struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn redis_server(args: &[String]) -> Proc {
    let child = Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}); install it: apt-get install redis-server (bash .ci/run does)")
        });
    Proc { child: Some(child) }
}

fn conn(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}

fn master_of(sentinel: u16) -> Option<u16> {
    let mut c = conn(sentinel)?;
    let (_, port): (String, String) = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("mymaster")
        .query(&mut c)
        .ok()?;
    port.parse().ok()
}

/// How many entries a `SENTINEL <what> mymaster` list has, as one sentinel sees it.
fn known(sentinel: u16, what: &str) -> usize {
    conn(sentinel)
        .and_then(|mut c| {
            redis::cmd("SENTINEL")
                .arg(what)
                .arg("mymaster")
                .query::<Vec<redis::Value>>(&mut c)
                .ok()
        })
        .map_or(0, |v| v.len())
}

#[test]
fn a_sentinel_failover_is_followed_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (master_port, replica_port) = (common::free_port(), common::free_port());
    let sentinel_ports = [
        common::free_port(),
        common::free_port(),
        common::free_port(),
    ];
    let data = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d.display().to_string()
    };
    let base = |port: u16, d: String| -> Vec<String> {
        vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            d,
        ]
    };
    let mut master = redis_server(&base(master_port, data("master")));
    let mut replica_args = base(replica_port, data("replica"));
    replica_args.extend([
        "--replicaof".into(),
        "127.0.0.1".into(),
        master_port.to_string(),
    ]);
    let _replica = redis_server(&replica_args);
    let mut sentinels = Vec::new();
    for port in sentinel_ports {
        let file = dir.path().join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &file,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds mymaster 500\n\
                 sentinel failover-timeout mymaster 3000\n\
                 sentinel parallel-syncs mymaster 1\n",
                data(&format!("s{port}"))
            ),
        )
        .unwrap();
        sentinels.push(redis_server(&[
            file.display().to_string(),
            "--sentinel".into(),
        ]));
    }
    // Ready: the replica is in sync, and every sentinel knows the replica and the
    // two other sentinels (a failover needs their votes).
    eventually(
        "the replica in sync and known to the sentinels",
        Duration::from_secs(30),
        || {
            let synced = conn(master_port).is_some_and(|mut c| {
                redis::cmd("INFO")
                    .arg("replication")
                    .query::<String>(&mut c)
                    .is_ok_and(|i| i.contains("connected_slaves:1") && i.contains("state=online"))
            });
            synced
                && sentinel_ports
                    .iter()
                    .all(|&s| known(s, "replicas") == 1 && known(s, "sentinels") == 2)
        },
    );

    let list = sentinel_ports
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let d = TestDaemon::start_with(
        Mode::Embedded,
        &format!(
            "[redis]\nurl = \"redis://127.0.0.1:{master_port}/0\"\nsentinels = [{list}]\nmaster_name = \"mymaster\"\ntimeout_ms = 500\n"
        ),
        &[],
    );
    let mut c = d.client();
    let s = c.ok(json!({"op": "stats"}));
    assert_eq!(
        s["store"]["redis_master"],
        format!("127.0.0.1:{master_port}"),
        "{s}"
    );

    // Acknowledged before the kill: user keys and pool keys (each confirmed by the
    // replica through WAIT), and quota increments (not WAITed).
    const KEYS: usize = 50;
    for i in 0..KEYS {
        c.ok(
            json!({"op": "set_user_api_key", "user_id": format!("s{i}"), "service": "openai",
            "key": format!("sk-sentinel-{i:04}-abcdef")}),
        );
    }
    let pool =
        c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-sentinel-pool-0001"}));
    assert_eq!(pool["added"], true);
    const INCREMENTS: u64 = 2000;
    let mut counted = 0;
    for _ in 0..INCREMENTS {
        counted = c
            .ok(json!({"op": "increment_default_key_usage", "user_id": "q", "tool_name": "t"}))
            ["count"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(counted, INCREMENTS);

    // Increments keep coming on another connection while the master dies: the
    // acknowledged ones are counted, to measure what a failover loses.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked_during = {
        let (stop, socket) = (stop.clone(), d.socket.clone());
        std::thread::spawn(move || {
            let mut q = Client::connect(&socket);
            let mut acked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = q.call(
                    json!({"op": "increment_default_key_usage", "user_id": "q", "tool_name": "t"}),
                );
                if r["ok"] == true {
                    acked += 1;
                }
            }
            acked
        })
    };
    eventually(
        "the quota counter on the master",
        Duration::from_secs(10),
        || {
            conn(master_port).is_some_and(|mut m| {
                m.scan_match::<_, String>("stargazer:apikeyd:usage:*:q")
                    .ok()
                    .and_then(|mut i| i.next())
                    .and_then(|k| k.ok())
                    .and_then(|k| m.hget::<_, _, u64>(k, "t").ok())
                    .is_some_and(|n| n > INCREMENTS + 200)
            })
        },
    );
    master.kill9();
    // Serving again: a quota increment goes through (only a master takes a write).
    // Key writes wait for a replica (min_replicas_acked = 1), and the only replica
    // is now the master: they answer `unavailable` until a replica is back.
    let back = eventually(
        "a write through the new master",
        Duration::from_secs(30),
        || {
            let r = c.call(
                json!({"op": "increment_default_key_usage", "user_id": "after", "tool_name": "t"}),
            );
            r["ok"] == true
        },
    );
    let (code, message) = c.err(
        json!({"op": "set_user_api_key", "user_id": "after", "service": "openai",
        "key": "sk-sentinel-after-0001"}),
    );
    assert_eq!(code, "unavailable", "{message}");
    assert!(message.contains("replicas"), "{message}");
    let promoted = master_of(sentinel_ports[0]).unwrap();
    assert_eq!(promoted, replica_port, "sentinel promoted the replica");
    // Nothing acknowledged is lost: every key resolves through the daemon (its cache
    // was dropped on resubscription) and is in the new master.
    let mut fresh = Client::connect(&d.socket);
    for i in 0..KEYS {
        let g = fresh.ok(
            json!({"op": "get_user_api_key", "user_id": format!("s{i}"), "service": "openai",
            "fallback_to_pool": false, "fallback_to_config": false}),
        );
        assert_eq!(g["key"], format!("sk-sentinel-{i:04}-abcdef"), "{g}");
    }
    let mut new_master = conn(replica_port).unwrap();
    let stored: u64 = new_master.hlen("stargazer:global_api_pool:openai").unwrap();
    assert_eq!(stored, 1, "the acknowledged pool key survived");
    let day = new_master
        .scan_match::<_, String>("stargazer:apikeyd:usage:*:q")
        .unwrap()
        .next()
        .expect("the counters were replicated")
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = INCREMENTS + acked_during.join().unwrap();
    let kept: u64 = new_master.hget(&day, "t").unwrap();
    let s = fresh.ok(json!({"op": "stats"}));
    assert_eq!(
        s["store"]["redis_master"],
        format!("127.0.0.1:{replica_port}"),
        "{s}"
    );
    assert!(s["store"]["redis_failovers"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        d.logs().contains("Sentinel failover"),
        "the log says what happened"
    );
    eprintln!(
        "sentinel failover: the daemon took a write again {back:?} after SIGKILL of the master \
         (sentinel down-after-milliseconds 500); quota increments acknowledged {acked} \
         (a second client incrementing throughout), counted by the new master {kept}, lost {}",
        acked as i64 - kept as i64
    );
}
