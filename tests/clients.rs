//! What clients are told (issue 14 items 11–13): integer ids, answers during a Redis
//! outage, and the quota message with the service filled in.

mod common;

use std::time::{Duration, Instant};

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
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = c.ok(ask.clone());
        if r["degraded"] == true {
            break r;
        }
        assert!(Instant::now() < deadline, "never degraded: {r}");
        std::thread::sleep(Duration::from_millis(20));
    };
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
        r["message"]
            .as_str()
            .unwrap()
            .contains("temporarily unavailable"),
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
