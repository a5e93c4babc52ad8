//! What someone who can write Redis cannot do with values in clear: once
//! `import-legacy` has recorded its cut-over, a value in clear is a possible
//! injection — never served, recorded as a security event, and never sealed by
//! `import-legacy` unless the operator names it in an `--accept-clear` file.

mod common;

use common::{Mode, TestDaemon, LOCAL_USER_KEYS};
use redis::Commands;
use serde_json::{json, Value};

/// No caching, so every read sees what is stored right now.
const NO_CACHE: &str = "[cache]\nuser_key_ttl_s = 0\npool_ttl_s = 0\n";

/// Runs import-legacy; answers (exit success, stdout + stderr).
fn import(d: &TestDaemon, extra: &[&str]) -> (bool, String) {
    let (status, text) = common::tool("import-legacy", &d.config_path, extra);
    (status.success(), text)
}

fn user_key(c: &mut common::Client, user: &str, service: &str) -> Value {
    c.ok(
        json!({"op": "get_user_api_key", "user_id": user, "service": service,
        "fallback_to_pool": false, "fallback_to_config": false}),
    )["key"]
        .clone()
}

/// The attacker's values: never printed, served or sealed.
const EVIL: [&str; 3] = [
    "sk-attacker-user-0001",
    "evil.example",
    "sk-attacker-pool-0001",
];

fn clear_values_after_the_cut_over_are_tampering(extra: &str) {
    let d = TestDaemon::start_with(Mode::Redis, &format!("{extra}{NO_CACHE}"), &[]);
    let mut con = d.redis.as_ref().unwrap().conn();
    let mut c = d.client();
    // Before the cut-over: a legacy value in clear, imported as usual.
    let _: () = con
        .hset(
            "stargazer:user_api_keys:alice",
            "openai",
            "sk-legacy-alice-0001",
        )
        .unwrap();
    let (ok, text) = import(&d, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("recorded the cut-over"), "{text}");
    assert_eq!(
        user_key(&mut c, "alice", "openai"),
        json!("sk-legacy-alice-0001")
    );
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-pool-legit-0000001"}));

    // After it: a Redis writer plants values in clear in a victim's hash and a pool.
    let gitea = json!({"token": "tok-attacker", "base_url": "https://evil.example"}).to_string();
    let _: () = con
        .hset_multiple(
            "stargazer:user_api_keys:victim",
            &[("openai", EVIL[0]), ("gitea", gitea.as_str())],
        )
        .unwrap();
    let _: () = con
        .hset("stargazer:global_api_pool:openai", "planted", EVIL[2])
        .unwrap();

    // The daemon serves none of them, and records a possible injection.
    let served = |c: &mut common::Client| {
        let mut all = vec![
            user_key(c, "victim", "openai"),
            c.ok(json!({"op": "get_gitea_credentials", "user_id": "victim"})),
        ];
        for _ in 0..20 {
            all.push(c.ok(json!({"op": "get_pool_api_key", "service": "openai"})));
        }
        json!(all).to_string()
    };
    let answers = served(&mut c);
    for evil in EVIL {
        assert!(!answers.contains(evil), "served {evil}: {answers}");
    }
    let logs = d.logs();
    assert!(logs.contains("clear_value_after_cut_over"), "{logs}");
    assert!(logs.contains("possible injection"), "{logs}");
    assert!(!logs.contains("run apikeyd import-legacy"), "{logs}");

    // import-legacy refuses them, listing each by fingerprint, never by value.
    let (ok, dry) = import(&d, &["--dry-run"]);
    assert!(!ok, "{dry}");
    let lines: Vec<&str> = dry
        .lines()
        .filter_map(|l| l.strip_prefix("accept-clear: "))
        .collect();
    assert_eq!(lines.len(), 3, "{dry}");
    assert!(
        lines.iter().any(|l| l.starts_with("user victim openai ")),
        "{dry}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("user victim gitea ")),
        "{dry}"
    );
    let pool_line = lines
        .iter()
        .find(|l| l.starts_with("pool stargazer:global_api_pool:openai planted "))
        .unwrap_or_else(|| panic!("{dry}"))
        .to_string();
    let (ok, text) = import(&d, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("3 refused"), "{text}");
    for out in [&dry, &text] {
        for evil in EVIL {
            assert!(!out.contains(evil), "printed {evil}: {out}");
        }
    }
    let still: String = con
        .hget("stargazer:user_api_keys:victim", "openai")
        .unwrap();
    assert_eq!(still, EVIL[0], "left as it is, not sealed");
    let answers = served(&mut c);
    for evil in EVIL {
        assert!(!answers.contains(evil), "served {evil}: {answers}");
    }

    // The one entry the operator reviewed and named is imported; the others are not.
    let accept = d.path("accept-clear.txt");
    std::fs::write(&accept, format!("# reviewed\naccept-clear: {pool_line}\n")).unwrap();
    let (ok, text) = import(&d, &["--accept-clear", accept.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("2 refused") && text.contains("1 pool values encrypted"),
        "{text}"
    );
    let pool: Vec<String> = con.hvals("stargazer:global_api_pool:openai").unwrap();
    assert!(pool.iter().all(|v| v.starts_with("akd1:")), "{pool:?}");
    assert_eq!(user_key(&mut c, "victim", "openai"), Value::Null);
}

#[test]
fn clear_values_after_the_cut_over_are_tampering_with_user_keys_in_redis() {
    clear_values_after_the_cut_over_are_tampering("");
}

#[test]
fn clear_values_after_the_cut_over_are_tampering_with_user_keys_local() {
    clear_values_after_the_cut_over_are_tampering(LOCAL_USER_KEYS);
}
