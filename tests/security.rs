//! Access by peer credentials (docs/operations.md, "Access"), socket and folder
//! modes, and the canary: a key that must never appear in logs, error messages or the
//! data folder in clear.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{contains, files_below, open_up, Mode, TestDaemon, CANARY, NOBODY};
use serde_json::{json, Value};

/// Runs `apikeyd call` as uid/gid `NOBODY` without groups, one connection for all
/// `requests`.
fn call_as_nobody(
    bin: &std::path::Path,
    socket: &std::path::Path,
    requests: &[Value],
) -> Vec<Value> {
    common::call_as(bin, socket, &[], requests)
}

fn strangers_get_one_forbidden_line(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let bin = open_up(&d);
    let out = call_as_nobody(
        &bin,
        &d.socket,
        &[json!({"op": "ping"}), json!({"op": "ping"})],
    );
    assert_eq!(
        out.len(),
        1,
        "one line, then the connection is closed: {out:?}"
    );
    assert_eq!(out[0]["error"]["code"], "forbidden");
    assert!(out[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&NOBODY.to_string()));
}

fn allowed_uids_use_everything_but_pool_management(mode: Mode) {
    let d = TestDaemon::start_with(mode, &format!("[access]\nallow_uids = [{NOBODY}]\n"), &[]);
    d.client()
        .ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-pool-for-all-0001"}));
    let bin = open_up(&d);
    let out = call_as_nobody(
        &bin,
        &d.socket,
        &[
            json!({"op": "ping", "id": 1}),
            json!({"op": "add_pool_key", "service": "openai", "key": "sk-nobody-tries-0001", "id": 2}),
            json!({"op": "remove_pool_key", "service": "openai", "key_id": "abc", "id": 3}),
            json!({"op": "list_pool_keys", "service": "openai", "id": 4}),
            json!({"op": "get_pool_api_key", "service": "openai", "id": 5}),
            json!({"op": "set_user_api_key", "user_id": "n", "service": "openai", "key": "sk-nobody-own-0001", "id": 6}),
            json!({"op": "get_user_api_key", "user_id": "n", "service": "openai", "id": 7}),
        ],
    );
    assert_eq!(out.len(), 7, "{out:?}");
    assert_eq!(out[0]["ok"], true);
    for r in &out[1..4] {
        assert_eq!(r["error"]["code"], "forbidden", "{r}");
    }
    assert_eq!(out[4]["result"]["key"], "sk-pool-for-all-0001");
    assert_eq!(out[5]["result"]["stored"], true);
    assert_eq!(out[6]["result"]["key"], "sk-nobody-own-0001");
    // Nothing was added by the refused request.
    let list = d
        .client()
        .ok(json!({"op": "list_pool_keys", "service": "openai"}));
    assert_eq!(list["keys"].as_array().unwrap().len(), 1);
}

fn admin_uids_and_gids_manage_pools(mode: Mode) {
    for access in [
        format!("admin_uids = [{NOBODY}]"),
        format!("admin_gids = [{NOBODY}]"),
    ] {
        let d = TestDaemon::start_with(mode, &format!("[access]\n{access}\n"), &[]);
        let bin = open_up(&d);
        let out = call_as_nobody(
            &bin,
            &d.socket,
            &[json!({"op": "add_pool_key", "service": "openai", "key": "sk-admin-nobody-01"})],
        );
        assert_eq!(out[0]["result"]["added"], true, "{access}: {out:?}");
    }
}

fn sighup_applies_access_to_new_connections(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let bin = open_up(&d);
    assert_eq!(
        call_as_nobody(&bin, &d.socket, &[json!({"op": "ping"})])[0]["error"]["code"],
        "forbidden"
    );
    d.write_config(&format!("[access]\nallow_gids = [{NOBODY}]\n"));
    d.signal(libc::SIGHUP);
    common::eventually(
        "the access change applied",
        std::time::Duration::from_secs(10),
        || call_as_nobody(&bin, &d.socket, &[json!({"op": "ping"})])[0]["ok"] == true,
    );
}

fn socket_and_folder_modes(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777,
        0o660
    );
    assert_eq!(
        std::fs::metadata(d.path("run"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750
    );
    drop(d);
    let d = TestDaemon::start_with(mode, "[server]\nsocket_mode = \"0600\"\n", &[]);
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// Every 8-byte window of the canary except the masked form's own characters.
fn canary_windows() -> Vec<&'static [u8]> {
    CANARY.as_bytes().windows(8).collect()
}

fn canary_never_leaks(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "log.audit_file = \"audit.jsonl\"\n", &[]);
    let mut c = d.client();
    let gitea = json!({"token": CANARY, "base_url": "https://g.example"}).to_string();
    let mut messages = Vec::new();
    for req in [
        json!({"op": "set_user_api_key", "user_id": "canary", "service": "openai", "key": CANARY}),
        json!({"op": "set_user_api_key", "user_id": "canary", "service": "gitea", "key": gitea}),
        json!({"op": "add_pool_key", "service": "openai", "key": CANARY, "label": "canary"}),
        json!({"op": "add_pool_key", "service": "openai", "key": CANARY, "channel_id": "c"}),
        json!({"op": "get_user_api_key", "user_id": "canary", "service": "openai"}),
        json!({"op": "get_gitea_credentials", "user_id": "canary"}),
        json!({"op": "get_pool_api_key", "service": "openai"}),
        json!({"op": "list_user_api_keys", "user_id": "canary"}),
        json!({"op": "list_pool_keys", "service": "openai"}),
        // Malformed requests carrying the canary: their errors must not echo it.
        json!({"op": "set_user_api_key", "user_id": "canary", "service": "bad service", "key": CANARY}),
        json!({"op": "set_user_api_key", "user_id": "canary", "service": "openai", "key": format!("{CANARY}\u{1}")}),
        json!({"op": "set_user_api_key", "user_id": "canary", "service": "openai", "key": [CANARY]}),
        json!({"op": CANARY}),
        json!({"op": "add_pool_key", "service": "openai", "key": CANARY, "label": 5}),
    ] {
        let r = c.call(req);
        if r["ok"] == false {
            messages.push(r["error"]["message"].as_str().unwrap().to_string());
        } else {
            // Only the three ops that return keys may hold it.
            let text = r.to_string();
            let returns_key = text.contains("\"key\":\"") || text.contains("\"token\":\"");
            assert!(returns_key || !text.contains(CANARY), "{text}");
        }
    }
    let mut raw = d.client();
    raw.send_raw(format!("{{\"op\":\"set_user_api_key\",\"key\":\"{CANARY}\n").as_bytes());
    messages.push(raw.recv()["error"]["message"].as_str().unwrap().to_string());
    assert!(messages.len() >= 6);
    for m in &messages {
        for w in canary_windows() {
            assert!(
                !contains(m.as_bytes(), w),
                "error message leaks the canary: {m}"
            );
        }
    }
    drop((c, raw));
    assert!(d.stop().success());
    let log = d.logs();
    assert!(log.contains("DEBUG"), "the test runs at debug level");
    for w in canary_windows() {
        assert!(
            !contains(log.as_bytes(), w),
            "log leaks the canary ({}):\n{log}",
            String::from_utf8_lossy(w)
        );
    }
    let audit = std::fs::read_to_string(d.path("audit.jsonl")).unwrap();
    assert!(audit.lines().count() >= 4, "writes were audited: {audit}");
    for w in canary_windows() {
        assert!(
            !contains(audit.as_bytes(), w),
            "audit file leaks the canary:\n{audit}"
        );
    }
    let files = files_below(&d.path("data"));
    assert!(files.iter().any(|(p, _)| p.ends_with("keystore.sqlite3")));
    for (path, bytes) in files {
        for w in canary_windows() {
            assert!(
                !contains(&bytes, w),
                "{} holds the canary in clear",
                path.display()
            );
        }
    }
}

fn the_process_is_not_dumpable(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let stats = d.client().ok(json!({"op": "stats"}));
    assert_eq!(stats["process"]["dumpable"], false);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], &["0", "0"], "{core}");
}

fn lock_memory_locks_it(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[cache]\nlock_memory = true\n", &[]);
    let stats = d.client().ok(json!({"op": "stats"}));
    assert!(
        stats["process"]["locked_kb"].as_u64().unwrap() > 0,
        "{stats}\n{}",
        d.logs()
    );
    let plain = TestDaemon::start_with(mode, "", &[]);
    assert_eq!(
        plain.client().ok(json!({"op": "stats"}))["process"]["locked_kb"],
        0
    );
}

fn refuses_a_world_writable_socket_folder(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    assert!(d.stop().success());
    std::fs::set_permissions(d.path("run"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (status, log) = d.expect_refusal();
    assert!(!status.success());
    assert!(log.contains("writable by everyone"), "{log}");
}

fn audit_lines_for_writes_and_admin_ops(mode: Mode) {
    let d = TestDaemon::start_with(
        mode,
        &format!("log.audit_file = \"audit/audit.jsonl\"\n[access]\nallow_uids = [{NOBODY}]\n"),
        &[],
    );
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "OpenAI", "key": "sk-audited-000001"}));
    let added = c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-audited-pool-01", "channel_id": "c1"}));
    c.ok(json!({"op": "list_pool_keys", "service": "openai", "channel_id": "c1"}));
    c.ok(json!({"op": "consume_default_key_usage", "user_id": "ana", "tool_name": "web"}));
    c.ok(json!({"op": "delete_user_api_key", "user_id": "ana", "service": "openai"}));
    c.err(json!({"op": "set_user_api_key", "user_id": "ana", "service": "bad service", "key": "sk-x"}));
    // Reads are not audited.
    c.ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai"}));
    let bin = open_up(&d);
    call_as_nobody(
        &bin,
        &d.socket,
        &[json!({"op": "remove_pool_key", "service": "openai", "key_id": "abc"})],
    );
    let path = d.path("audit/audit.jsonl");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let lines: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ops: Vec<&str> = lines.iter().map(|l| l["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        [
            "set_user_api_key",
            "add_pool_key",
            "list_pool_keys",
            "delete_user_api_key",
            "set_user_api_key",
            "remove_pool_key"
        ]
    );
    assert_eq!(lines[0]["user_id"], "ana");
    assert_eq!(lines[0]["service"], "openai");
    assert_eq!(lines[0]["outcome"], "ok");
    assert_eq!(lines[0]["uid"], 0);
    assert!(lines[0]["pid"].as_i64().unwrap() > 0);
    assert!(lines[0]["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["key_id"], added["key_id"]);
    assert_eq!(lines[1]["channel_id"], "c1");
    // Quota counting is audited only with log.audit_quota (tests/observability.rs).
    assert_eq!(lines[4]["outcome"], "bad_request");
    assert_eq!(lines[5]["outcome"], "forbidden");
    assert_eq!(lines[5]["uid"], NOBODY);
    let log = d.logs();
    assert_eq!(
        log.matches("apikeyd::audit").count(),
        6,
        "audit lines in the log too"
    );
}

fn tampered_or_moved_rows_are_never_served(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, common::LOCAL_USER_KEYS, &[]);
    let mut c = d.client();
    for (user, key) in [
        ("alice", "sk-alice-0000000001"),
        ("bob", "sk-bob-00000000002"),
        ("carol", "sk-carol-0000000003"),
    ] {
        c.ok(json!({"op": "set_user_api_key", "user_id": user, "service": "openai", "key": key}));
    }
    c.ok(json!({"op": "set_user_api_key", "user_id": "alice", "service": "anthropic", "key": "sk-alice-anthropic-01"}));
    drop(c);
    assert!(d.stop().success());
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    // Relocation: alice's ciphertext copied into bob's row, and into another service.
    db.execute_batch(
        "UPDATE user_keys SET sealed = (SELECT sealed FROM user_keys WHERE user_id = 'alice' AND service = 'openai')
           WHERE user_id = 'bob';
         UPDATE user_keys SET sealed = (SELECT sealed FROM user_keys WHERE user_id = 'alice' AND service = 'openai')
           WHERE user_id = 'alice' AND service = 'anthropic';",
    )
    .unwrap();
    // Tampering: one flipped bit in carol's ciphertext, and a truncated one for dave.
    let mut sealed: Vec<u8> = db
        .query_row(
            "SELECT sealed FROM user_keys WHERE user_id = 'carol'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    db.execute(
        "UPDATE user_keys SET sealed = ?1 WHERE user_id = 'carol'",
        [&sealed],
    )
    .unwrap();
    db.execute(
        "INSERT INTO user_keys VALUES ('dave', 'openai', x'0100000001', 0)",
        [],
    )
    .unwrap();
    drop(db);
    d.spawn();
    d.wait_ready();
    let mut c = d.client();
    let get = |c: &mut common::Client, user: &str, service: &str| {
        c.ok(json!({"op": "get_user_api_key", "user_id": user, "service": service, "fallback_to_pool": false, "fallback_to_config": false}))["key"].clone()
    };
    assert_eq!(get(&mut c, "alice", "openai"), "sk-alice-0000000001");
    for (user, service) in [
        ("bob", "openai"),
        ("alice", "anthropic"),
        ("carol", "openai"),
        ("dave", "openai"),
    ] {
        assert_eq!(
            get(&mut c, user, service),
            Value::Null,
            "{user}/{service} must not be served"
        );
    }
    // Listing leaves them out; the daemon keeps serving.
    assert_eq!(
        c.ok(json!({"op": "list_user_api_keys", "user_id": "bob"}))["keys"],
        json!([])
    );
    c.ok(json!({"op": "ping"}));
    let log = d.logs();
    for user in ["bob", "carol", "dave"] {
        assert!(
            log.lines()
                .any(|l| l.contains("integrity") && l.contains(&format!("user_id={user}"))),
            "no integrity error for {user}:\n{log}"
        );
    }
    if mode == Mode::Embedded {
        // An embedded pool row moved to another channel is not served either.
        c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-pool-c1-00000001", "channel_id": "c1"}));
        assert!(d.stop().success());
        let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
        db.execute("INSERT INTO pool_keys SELECT 'c2', service, key_id, sealed, label, added_at FROM pool_keys WHERE channel_id = 'c1'", []).unwrap();
        drop(db);
        d.spawn();
        d.wait_ready();
        let r = d
            .client()
            .ok(json!({"op": "get_channel_pool_api_key", "channel_id": "c2", "service": "openai"}));
        assert_eq!(r["key"], Value::Null);
    }
}

in_every_mode!(
    tampered_or_moved_rows_are_never_served,
    audit_lines_for_writes_and_admin_ops,
    the_process_is_not_dumpable,
    lock_memory_locks_it,
    refuses_a_world_writable_socket_folder,
    strangers_get_one_forbidden_line,
    allowed_uids_use_everything_but_pool_management,
    admin_uids_and_gids_manage_pools,
    sighup_applies_access_to_new_connections,
    socket_and_folder_modes,
    canary_never_leaks,
);
