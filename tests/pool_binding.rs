//! Pool values are bound to their key_id (docs/security.md, "What each mechanism
//! protects"): a store writer who moves a sealed value under another field or row
//! does not get it served.

mod common;

use common::{contains, Mode, TestDaemon};
use redis::Commands;
use serde_json::json;

const KEY_A: &str = "sk-removed-aaaa-5e1f0c7d";
const KEY_B: &str = "sk-current-bbbb-9a2b4c6d";

/// Not caching pools, so every pick reads what the store holds now.
const NO_POOL_CACHE: &str = "[cache]\npool_ttl_s = 0";

fn add(c: &mut common::Client, key: &str) -> String {
    let r = c.ok(json!({"op": "add_pool_key", "service": "openai", "key": key}));
    r["key_id"].as_str().unwrap().to_string()
}

fn pick(c: &mut common::Client) -> serde_json::Value {
    c.ok(json!({"op": "get_pool_api_key", "service": "openai"}))["key"].clone()
}

/// The daemon logged an integrity error and never the moved key.
fn assert_refused_quietly(d: &TestDaemon) {
    let logs = d.logs();
    assert!(
        logs.contains("integrity"),
        "no integrity error logged:\n{logs}"
    );
    assert!(
        !contains(logs.as_bytes(), KEY_A.as_bytes()),
        "the moved key reached the log"
    );
}

#[test]
fn redis_envelope_under_another_field_is_not_served() {
    let d = TestDaemon::start_with(Mode::Redis, NO_POOL_CACHE, &[]);
    let mut c = d.client();
    let id_a = add(&mut c, KEY_A);
    let mut r = d.redis.as_ref().unwrap().conn();
    let hash = "stargazer:global_api_pool:openai";
    let sealed_a: String = r.hget(hash, &id_a).unwrap();
    c.ok(json!({"op": "remove_pool_key", "service": "openai", "key_id": id_a}));
    let id_b = add(&mut c, KEY_B);
    assert_eq!(pick(&mut c), KEY_B);

    // Written back over another key's field: neither key is served from it.
    let _: () = r.hset(hash, &id_b, &sealed_a).unwrap();
    assert_eq!(pick(&mut c), json!(null));
    // Nor under a field of the attacker's choosing.
    let _: () = r.hdel(hash, &id_b).unwrap();
    let _: () = r.hset(hash, "0123456789abcdef", &sealed_a).unwrap();
    assert_eq!(pick(&mut c), json!(null));
    let listed = c.ok(json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(listed["keys"][0]["masked"], "(undecryptable)");
    // Under its own field it is the genuine value again.
    let _: () = r.hset(hash, &id_a, &sealed_a).unwrap();
    assert_eq!(pick(&mut c), KEY_A);
    assert_refused_quietly(&d);
}

#[test]
fn sqlite_row_under_another_key_id_is_not_served() {
    let d = TestDaemon::start_with(Mode::Embedded, NO_POOL_CACHE, &[]);
    let mut c = d.client();
    let id_a = add(&mut c, KEY_A);
    let id_b = add(&mut c, KEY_B);
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    let sealed_a: Vec<u8> = db
        .query_row(
            "SELECT sealed FROM pool_keys WHERE key_id = ?1",
            [&id_a],
            |r| r.get(0),
        )
        .unwrap();
    c.ok(json!({"op": "remove_pool_key", "service": "openai", "key_id": id_a}));

    // The removed key's ciphertext copied into the other key's row.
    db.execute(
        "UPDATE pool_keys SET sealed = ?1 WHERE key_id = ?2",
        rusqlite::params![sealed_a, id_b],
    )
    .unwrap();
    assert_eq!(pick(&mut c), json!(null));
    // A row renamed to another key_id.
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": KEY_A}));
    db.execute("DELETE FROM pool_keys WHERE key_id = ?1", [&id_b])
        .unwrap();
    db.execute(
        "UPDATE pool_keys SET key_id = '0123456789abcdef' WHERE key_id = ?1",
        [&id_a],
    )
    .unwrap();
    assert_eq!(pick(&mut c), json!(null));
    let listed = c.ok(json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(listed["keys"][0]["masked"], "(undecryptable)");
    assert_refused_quietly(&d);
}

/// Values sealed before the binding (an upgrade) still open, under their own key_id
/// only.
#[test]
fn values_sealed_before_the_binding_stay_readable() {
    for mode in [Mode::Redis, Mode::Embedded] {
        let d = TestDaemon::start_with(mode, NO_POOL_CACHE, &[]);
        let mut c = d.client();
        let id_b = add(&mut c, KEY_B);
        let master =
            apikeyd::keys::MasterKey::read_file(&d.path("data/master.key")).expect("master key");
        let id_a = master.key_id(&apikeyd::keys::Secret::new(KEY_A.into()));
        let namespace = if mode == Mode::Redis {
            "stargazer"
        } else {
            "sqlite"
        };
        let old = master.seal_unbound_pool_value(
            KEY_A.as_bytes(),
            apikeyd::keys::Place::Pool {
                namespace,
                channel: None,
                service: "openai",
                key_id: "",
            },
        );
        let put = |field: &str| match mode {
            Mode::Redis => {
                use base64::Engine;
                let value = format!(
                    "akd1:{}",
                    base64::engine::general_purpose::STANDARD.encode(&old)
                );
                let mut r = d.redis.as_ref().unwrap().conn();
                let _: () = r.del("stargazer:global_api_pool:openai").unwrap();
                let _: () = r
                    .hset("stargazer:global_api_pool:openai", field, value)
                    .unwrap();
            }
            Mode::Embedded => {
                let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
                db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
                db.execute("DELETE FROM pool_keys", []).unwrap();
                db.execute(
                    "INSERT INTO pool_keys (channel_id, service, key_id, sealed, label, added_at)
                     VALUES ('', 'openai', ?1, ?2, NULL, 0)",
                    rusqlite::params![field, old],
                )
                .unwrap();
            }
        };
        put(&id_a);
        assert_eq!(pick(&mut c), KEY_A, "{mode:?}");
        put(&id_b);
        assert_eq!(pick(&mut c), json!(null), "{mode:?}");
        assert_refused_quietly(&d);
    }
}
