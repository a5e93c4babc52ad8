//! Per-user keys, the parameter rules, and the resolution order through all four
//! sources with both fallback switches (docs/protocol.md, "Parameter rules" and
//! "get_user_api_key").

mod common;

use common::{Mode, TestDaemon};
use serde_json::{json, Value};

fn set_get_delete_list(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    assert_eq!(
        c.ok(json!({"op": "set_user_api_key", "user_id": "u1", "service": "OpenAI", "key": "  sk-abcdefgh12345678  "})),
        json!({"stored": true})
    );
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u1", "service": "openai"}));
    assert_eq!(r, json!({"key": "sk-abcdefgh12345678", "source": "user"}));
    // Replacing updates the value.
    c.ok(json!({"op": "set_user_api_key", "user_id": "u1", "service": "openai", "key": "sk-second-key-9999"}));
    c.ok(
        json!({"op": "set_user_api_key", "user_id": "u1", "service": "anthropic", "key": "short"}),
    );
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u1", "service": "OPENAI"}));
    assert_eq!(r["key"], "sk-second-key-9999");
    let list = c.ok(json!({"op": "list_user_api_keys", "user_id": "u1"}));
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["service"], "anthropic");
    assert_eq!(keys[0]["masked"], "****");
    assert_eq!(keys[1]["service"], "openai");
    assert_eq!(keys[1]["masked"], "sk-s…9999");
    assert!(keys[1]["updated_at"].as_str().unwrap().ends_with('Z'));
    // The list never holds a key in clear.
    assert!(!list.to_string().contains("sk-second-key-9999"));
    // Other users see nothing.
    let other = c.ok(json!({"op": "list_user_api_keys", "user_id": "u2"}));
    assert_eq!(other, json!({"keys": []}));
    assert_eq!(
        c.ok(json!({"op": "delete_user_api_key", "user_id": "u1", "service": "openai"})),
        json!({"deleted": true})
    );
    assert_eq!(
        c.ok(json!({"op": "delete_user_api_key", "user_id": "u1", "service": "openai"})),
        json!({"deleted": false})
    );
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u1", "service": "openai", "fallback_to_config": false}));
    assert_eq!(r["key"], Value::Null);
    assert_eq!(r["source"], Value::Null);
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("OpenAI") && msg.contains("set_user_api_key") && msg.contains("openai"),
        "{msg}"
    );
    assert!(msg.contains("https://platform.openai.com/api-keys"));
}

/// (request, parameter the message must name)
fn bad_params() -> Vec<(Value, &'static str)> {
    let long = "a".repeat(129);
    vec![
        (
            json!({"op": "get_user_api_key", "service": "openai"}),
            "user_id",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": "open ai"}),
            "service",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": "a/b"}),
            "service",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": ""}),
            "service",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": "x".repeat(65)}),
            "service",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": "ö"}),
            "service",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": 5}),
            "service",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "", "service": "openai"}),
            "user_id",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": long, "service": "openai"}),
            "user_id",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "a b", "service": "openai"}),
            "user_id",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "a\u{1}", "service": "openai"}),
            "user_id",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": -12, "service": "openai"}),
            "user_id",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": "openai", "channel_id": "c c"}),
            "channel_id",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": "openai", "channel_id": 3.5}),
            "channel_id",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": "openai", "fallback_to_pool": "yes"}),
            "fallback_to_pool",
        ),
        (
            json!({"op": "get_user_api_key", "user_id": "u", "service": "openai", "fallback_to_config": 1}),
            "fallback_to_config",
        ),
        (
            json!({"op": "set_user_api_key", "user_id": "u", "service": "openai"}),
            "key",
        ),
        (
            json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "   "}),
            "key",
        ),
        (
            json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-\u{7}bell"}),
            "key",
        ),
        (
            json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "k".repeat(4097)}),
            "key",
        ),
        (
            json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": 123}),
            "key",
        ),
        (
            json!({"op": "delete_user_api_key", "user_id": "u"}),
            "service",
        ),
        (json!({"op": "list_user_api_keys"}), "user_id"),
        (json!({"op": "get_gitea_credentials"}), "user_id"),
        (
            json!({"op": "get_channel_pool_api_key", "service": "openai"}),
            "channel_id",
        ),
        (json!({"op": "get_pool_api_key"}), "service"),
        (json!({"op": "add_pool_key", "service": "openai"}), "key"),
        (
            json!({"op": "add_pool_key", "service": "openai", "key": "sk-x", "label": 5}),
            "label",
        ),
        (
            json!({"op": "remove_pool_key", "service": "openai"}),
            "key_id",
        ),
        (
            json!({"op": "check_default_key_limit", "user_id": "u"}),
            "tool_name",
        ),
        (
            json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t", "daily_limit": -1}),
            "daily_limit",
        ),
        (
            json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t", "daily_limit": 1000000001u64}),
            "daily_limit",
        ),
        (
            json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t", "daily_limit": 2.5}),
            "daily_limit",
        ),
        (
            json!({"op": "consume_default_key_usage", "user_id": "u", "tool_name": "t", "daily_limit": "3"}),
            "daily_limit",
        ),
        (
            json!({"op": "increment_default_key_usage", "tool_name": "t"}),
            "user_id",
        ),
        (json!({"op": "missing_api_key_error"}), "service"),
        (
            json!({"op": "default_key_limit_error", "tool_name": "t", "current": 1}),
            "limit",
        ),
        (
            json!({"op": "default_key_limit_error", "tool_name": "t", "current": -1, "limit": 2}),
            "current",
        ),
    ]
}

fn parameter_rules(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    for (req, param) in bad_params() {
        let (code, msg) = c.err(req.clone());
        assert_eq!(code, "bad_request", "{req}");
        assert!(
            msg.contains(param),
            "message for {req} should name {param}: {msg}"
        );
    }
    // Boundaries that are valid.
    let ok_user = "u".repeat(128);
    let ok_key = "k".repeat(4096);
    c.ok(
        json!({"op": "set_user_api_key", "user_id": ok_user, "service": "a.b-c_D9", "key": ok_key}),
    );
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": ok_user, "service": "A.B-C_d9"}));
    assert_eq!(r["key"], ok_key);
    c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "x".repeat(64), "channel_id": null}));
    c.ok(json!({"op": "check_default_key_limit", "user_id": "u", "tool_name": "t", "daily_limit": 1000000000}));
    // A key wrapped in whitespace is trimmed; inner spaces are kept.
    c.ok(json!({"op": "set_user_api_key", "user_id": "sp", "service": "openai", "key": "\t key with space \n"}));
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "sp", "service": "openai"}));
    assert_eq!(r["key"], "key with space");
    // Nothing invalid was stored.
    let r = c.ok(json!({"op": "list_user_api_keys", "user_id": "u"}));
    assert_eq!(r["keys"], json!([]));
}

const SVC_ENV: &str = "RESOLVETEST_API_KEY";

fn resolution_order_through_all_sources(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[(SVC_ENV, "sk-from-env-000000")]);
    let mut c = d.client();
    let get = |c: &mut common::Client, extra: Value| {
        let mut req = json!({"op": "get_user_api_key", "user_id": "alice", "service": "resolvetest", "channel_id": "chan1"});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let r = c.ok(req);
        (r["key"].clone(), r["source"].clone())
    };
    // Only config.
    assert_eq!(
        get(&mut c, json!({})),
        (json!("sk-from-env-000000"), json!("config"))
    );
    assert_eq!(
        get(&mut c, json!({"fallback_to_config": false})).1,
        Value::Null
    );
    // Global pool beats config.
    c.ok(json!({"op": "add_pool_key", "service": "resolvetest", "key": "sk-global-pool-1111"}));
    assert_eq!(
        get(&mut c, json!({})),
        (json!("sk-global-pool-1111"), json!("global_pool"))
    );
    assert_eq!(
        get(&mut c, json!({"fallback_to_pool": false})).1,
        json!("config")
    );
    // Channel pool beats global, only for that channel.
    c.ok(json!({"op": "add_pool_key", "service": "resolvetest", "key": "sk-channel-pool-2222", "channel_id": "chan1"}));
    assert_eq!(
        get(&mut c, json!({})),
        (json!("sk-channel-pool-2222"), json!("channel_pool"))
    );
    assert_eq!(
        get(&mut c, json!({"channel_id": "chan2"})).1,
        json!("global_pool")
    );
    assert_eq!(
        get(&mut c, json!({"channel_id": null})).1,
        json!("global_pool")
    );
    // The user's own key beats everything, whatever the switches say.
    c.ok(json!({"op": "set_user_api_key", "user_id": "alice", "service": "resolvetest", "key": "sk-alice-own-3333"}));
    assert_eq!(
        get(&mut c, json!({})),
        (json!("sk-alice-own-3333"), json!("user"))
    );
    assert_eq!(
        get(
            &mut c,
            json!({"fallback_to_pool": false, "fallback_to_config": false})
        ),
        (json!("sk-alice-own-3333"), json!("user"))
    );
    // The user's key follows them to every channel.
    assert_eq!(
        get(&mut c, json!({"channel_id": "elsewhere"})).1,
        json!("user")
    );
    // Pools off, config off: nothing, with the message.
    c.ok(json!({"op": "delete_user_api_key", "user_id": "alice", "service": "resolvetest"}));
    let r = c.ok(
        json!({"op": "get_user_api_key", "user_id": "alice", "service": "resolvetest",
        "fallback_to_pool": false, "fallback_to_config": false}),
    );
    assert_eq!(r["key"], Value::Null);
    assert!(r["message"].as_str().unwrap().contains("resolvetest"));
    // Unknown services get a generic message naming them.
    let m = c.ok(json!({"op": "missing_api_key_error", "service": "NoSuchThing"}))["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        m.contains("nosuchthing") && m.contains("set_user_api_key"),
        "{m}"
    );
}

fn empty_env_counts_as_unset_and_env_name_is_configurable(mode: Mode) {
    let d = TestDaemon::start_with(
        mode,
        "[services.envtest]\nenv = \"MY_CUSTOM_VAR\"\n",
        &[
            ("ENVTEST_API_KEY", "sk-should-not-be-used"),
            ("MY_CUSTOM_VAR", "sk-custom-var-4444"),
            ("EMPTYTEST_API_KEY", ""),
        ],
    );
    let mut c = d.client();
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "envtest"}));
    assert_eq!(r["key"], "sk-custom-var-4444");
    let r = c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "emptytest"}));
    assert_eq!(r["key"], Value::Null);
}

fn gitea_credentials(mode: Mode) {
    let d = TestDaemon::start_with(
        mode,
        "[services.gitea]\nbase_url = \"https://git.example.org\"\n",
        &[("GITEA_API_KEY", "")],
    );
    let mut c = d.client();
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "g"}));
    assert_eq!(r["token"], Value::Null);
    assert_eq!(r["base_url"], Value::Null);
    assert!(r["message"].as_str().unwrap().contains("gitea"));
    c.ok(json!({"op": "set_user_api_key", "user_id": "g", "service": "gitea", "key": "plain-token-123456"}));
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "g"}));
    assert_eq!(
        r,
        json!({"token": "plain-token-123456", "base_url": "https://git.example.org", "source": "user"})
    );
    let stored =
        json!({"token": "json-token-7890", "base_url": "https://mine.example.net"}).to_string();
    c.ok(json!({"op": "set_user_api_key", "user_id": "g", "service": "gitea", "key": stored}));
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "g"}));
    assert_eq!(r["token"], "json-token-7890");
    assert_eq!(r["base_url"], "https://mine.example.net");
    // JSON without base_url falls back to the config's.
    let stored = json!({"token": "json-token-only"}).to_string();
    c.ok(json!({"op": "set_user_api_key", "user_id": "g", "service": "gitea", "key": stored}));
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "g"}));
    assert_eq!(r["base_url"], "https://git.example.org");
    // Pools count too (channel first).
    c.ok(json!({"op": "add_pool_key", "service": "gitea", "key": "pool-gitea-token", "channel_id": "ch"}));
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "nobody", "channel_id": "ch"}));
    assert_eq!(
        (r["token"].clone(), r["source"].clone()),
        (json!("pool-gitea-token"), json!("channel_pool"))
    );
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "nobody", "channel_id": "ch", "fallback_to_pool": false}));
    assert_eq!(r["token"], Value::Null);
}

fn gitea_without_base_url_is_all_null(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[("GITEA_API_KEY", "")]);
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "g", "service": "gitea", "key": "plain-token-123456"}));
    let r = c.ok(json!({"op": "get_gitea_credentials", "user_id": "g"}));
    assert_eq!(r["token"], Value::Null);
    assert_eq!(r["base_url"], Value::Null);
    assert_eq!(r["source"], Value::Null);
    assert!(r["message"].as_str().unwrap().contains("base_url"));
    assert!(!r.to_string().contains("plain-token"));
}

fn cached_lookups_skip_the_store_and_expire(mode: Mode) {
    // A TTL long enough that 100 lookups fit in it on a busy machine.
    let d = TestDaemon::start_with(mode, "[cache]\nuser_key_ttl_s = 5\n", &[]);
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "hot", "service": "openai", "key": "sk-hot-key-000001"}));
    let get = json!({"op": "get_user_api_key", "user_id": "hot", "service": "openai"});
    // In Redis mode the daemon's own invalidation of the write may arrive after the
    // first lookup cached the key and drop it once: wait until lookups stay hits.
    common::eventually(
        "lookups that stay cache hits",
        std::time::Duration::from_secs(10),
        || {
            c.ok(get.clone());
            let misses = c.ok(json!({"op": "stats"}))["cache"]["misses"].clone();
            for _ in 0..10 {
                c.ok(get.clone());
            }
            c.ok(json!({"op": "stats"}))["cache"]["misses"] == misses
        },
    );
    let before = c.ok(json!({"op": "stats"}))["cache"].clone();
    for _ in 0..100 {
        assert_eq!(c.ok(get.clone())["key"], "sk-hot-key-000001");
    }
    let after = c.ok(json!({"op": "stats"}))["cache"].clone();
    assert_eq!(
        after["misses"], before["misses"],
        "cached lookups must not reach the keystore"
    );
    assert_eq!(
        after["hits"].as_u64().unwrap(),
        before["hits"].as_u64().unwrap() + 100
    );
    // After the TTL a lookup goes to the keystore again (exactly one miss), then hits.
    let misses = |c: &mut common::Client| {
        c.ok(json!({"op": "stats"}))["cache"]["misses"]
            .as_u64()
            .unwrap()
    };
    common::eventually(
        "a cache miss after the TTL",
        std::time::Duration::from_secs(20),
        || {
            c.ok(get.clone());
            misses(&mut c) > after["misses"].as_u64().unwrap()
        },
    );
    assert_eq!(misses(&mut c), after["misses"].as_u64().unwrap() + 1);
    c.ok(get);
    assert_eq!(misses(&mut c), after["misses"].as_u64().unwrap() + 1);
}

in_every_mode!(
    cached_lookups_skip_the_store_and_expire,
    set_get_delete_list,
    parameter_rules,
    resolution_order_through_all_sources,
    empty_env_counts_as_unset_and_env_name_is_configurable,
    gitea_credentials,
    gitea_without_base_url_is_all_null,
);
