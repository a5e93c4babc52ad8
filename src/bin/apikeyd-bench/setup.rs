//! What a run needs in place before it starts: bench keys stored straight into the
//! keystore and into redis-server, and the pools of the `pool` and `pool-cooling`
//! presets added through the daemon with the library's client.

use std::path::Path;

use apikeyd::process::config::Config;
use apikeyd::wire::client::{Connection, Timeouts};

/// The user key stored for `bench-{n}`. Made up: a bench never holds a real key.
fn bench_key(n: usize) -> String {
    format!("sk-bench-{n:08}-0123456789abcdef")
}

/// Stores `keys` user keys (`bench-{n}` / openai) straight into the keystore in one
/// transaction: setting up 500,000 keys through the socket would take one fsync each.
pub fn populate_keystore(config: &Config, keys: usize) -> Result<(), String> {
    use apikeyd::store::keystore;
    let opened = keystore::open(config, 1).map_err(|e| e.to_string())?;
    let mut db = opened
        .connections
        .into_iter()
        .next()
        .ok_or("the keystore opened no connection")?;
    let tx = db.transaction().map_err(|e| e.to_string())?;
    for n in 0..keys {
        let key = apikeyd::keys::Secret::new(bench_key(n));
        keystore::store_user_key(&tx, &opened.key, &format!("bench-{n}"), "openai", &key)
            .map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())
}

/// Fills `bench:{n}` hashes on the redis-server at `socket` for the HGET comparison.
pub fn populate_redis(socket: &Path, keys: usize) -> Result<(), String> {
    let client = redis::Client::open(format!("redis+unix://{}", socket.display()))
        .map_err(|e| e.to_string())?;
    let mut con = client.get_connection().map_err(|e| e.to_string())?;
    for chunk in (0..keys).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &n in chunk {
            pipe.cmd("HSET")
                .arg(format!("bench:{n}"))
                .arg("openai")
                .arg(bench_key(n))
                .ignore();
        }
        pipe.query::<()>(&mut con).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Pipelines `lines` on one connection to the daemon and answers the responses.
fn exchange(socket: &Path, lines: Vec<String>) -> Result<Vec<serde_json::Value>, String> {
    Connection::connect(socket, Timeouts::TOOL)
        .and_then(|c| c.exchange(lines))
        .map_err(|e| format!("cannot talk to the daemon at {}: {e}", socket.display()))
}

/// `add_pool_key` lines for `count` made-up keys in pool `service`.
fn pool_adds(service: &str, tag: &str, count: u32) -> Vec<String> {
    (0..count)
        .map(|i| {
            format!(
                r#"{{"op":"add_pool_key","service":"{service}","key":"sk-bench-{tag}-{i:04}-abcdef"}}"#
            )
        })
        .collect()
}

/// Sets up the `pool` preset: four keys in pool `benchpool`.
pub fn pool(socket: &Path) -> Result<(), String> {
    let answers = exchange(socket, pool_adds("benchpool", "pool", 4))?;
    if answers.iter().all(|r| r["ok"] == true) {
        Ok(())
    } else {
        Err("cannot add the bench pool keys (is the socket's user an admin?)".into())
    }
}

/// Sets up the `pool-cooling` preset: four keys in pool `benchcool`, two of them
/// reported rate-limited for a day, so every pick skips cooling keys.
pub fn cooling_pool(socket: &Path) -> Result<(), String> {
    let reports: Vec<String> = exchange(socket, pool_adds("benchcool", "cool", 4))?
        .iter()
        .take(2)
        .map(|r| {
            format!(
                r#"{{"op":"report_key_result","service":"benchcool","key_id":{},"outcome":"rate_limited","retry_after_s":86400}}"#,
                r["result"]["key_id"]
            )
        })
        .collect();
    let answers = exchange(socket, reports)?;
    if answers.iter().all(|r| r["result"]["state"] == "cooling") {
        Ok(())
    } else {
        Err("cannot cool down the bench pool keys".into())
    }
}
