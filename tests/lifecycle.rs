//! Key lifecycle safety (docs/security.md, "What each mechanism protects"): the
//! keystore lock, rotation that keeps what it must, a socket path that never deletes
//! a file, stray Redis keys, and secrets of rejected requests wiped from the daemon's
//! memory.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::{Mode, TestDaemon};
use serde_json::json;

fn run(args: &[&str], config: &Path) -> (Output, String) {
    let out = Command::new(common::bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run apikeyd");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out, text)
}

/// A config for another process on `d`'s keystore and master key, with its own socket.
fn config_beside(d: &TestDaemon, name: &str, socket: &str) -> std::path::PathBuf {
    let path = d.path(name);
    let mut text = std::fs::read_to_string(&d.config_path).unwrap();
    text.insert_str(
        0,
        &format!(
            "server.socket = {:?}\nkeystore.path = {:?}\nkeystore.master_key_file = {:?}\n",
            d.path(socket),
            d.path("data/keystore.sqlite3"),
            d.path("data/master.key")
        ),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Every sealed row of the keystore, to prove nothing was rewritten.
fn sealed_rows(d: &TestDaemon) -> Vec<Vec<u8>> {
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    let mut stmt = db
        .prepare("SELECT sealed FROM user_keys UNION ALL SELECT value FROM meta ORDER BY 1")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

#[test]
fn rotate_against_another_socket_changes_nothing() {
    let mut d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-before-rotate"}));
    let key_before = std::fs::read(d.path("data/master.key")).unwrap();
    let rows_before = sealed_rows(&d);
    let wrong = config_beside(&d, "wrong.toml", "run/other.sock");

    let (out, text) = run(&["rotate-master-key"], &wrong);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("pid {}", d.pid())), "{text}");
    assert!(
        text.contains("other.sock"),
        "names the socket it tried: {text}"
    );
    assert!(
        text.contains(&d.socket.display().to_string()),
        "names the holder's socket: {text}"
    );
    assert!(text.contains("nothing changed"), "{text}");
    assert_eq!(
        std::fs::read(d.path("data/master.key")).unwrap(),
        key_before
    );
    assert_eq!(sealed_rows(&d), rows_before);

    // The live daemon goes on, and what it stores survives a restart.
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "bo", "service": "openai", "key": "sk-bo-after-refusal"}));
    d.restart();
    let mut c = d.client();
    for (user, key) in [
        ("ana", "sk-ana-before-rotate"),
        ("bo", "sk-bo-after-refusal"),
    ] {
        let r = c.ok(json!({"op": "get_user_api_key", "user_id": user, "service": "openai", "fallback_to_pool": false}));
        assert_eq!(r["key"], key);
    }
}

#[test]
fn import_legacy_against_another_socket_changes_nothing() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let mut con = d.redis.as_ref().unwrap().conn();
    let _: () = redis::cmd("HSET")
        .arg("stargazer:user_api_keys:ana")
        .arg("openai")
        .arg("sk-legacy-ana-000001")
        .query(&mut con)
        .unwrap();
    let wrong = config_beside(&d, "wrong.toml", "run/other.sock");
    let (out, text) = run(&["import-legacy"], &wrong);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("pid {}", d.pid())), "{text}");
    let left: Option<String> = redis::cmd("HGET")
        .arg("stargazer:user_api_keys:ana")
        .arg("openai")
        .query(&mut con)
        .unwrap();
    assert_eq!(left.as_deref(), Some("sk-legacy-ana-000001"));
}

#[test]
fn rotate_with_no_daemon_runs_alone_and_the_daemon_then_serves() {
    let mut d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-offline-rot"}));
    assert!(d.stop().success());
    let (out, text) = run(&["rotate-master-key"], &d.config_path);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no daemon runs on this keystore"), "{text}");
    assert!(text.contains("retired key versions [1]"), "{text}");
    d.spawn();
    d.wait_ready();
    let r = d.client().ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai", "fallback_to_pool": false}));
    assert_eq!(r["key"], "sk-ana-offline-rot");
}

#[test]
fn a_second_daemon_on_the_same_keystore_is_refused() {
    let d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-one-daemon"}));
    let extra = format!(
        "keystore.path = {:?}\nkeystore.master_key_file = {:?}\n",
        d.path("data/keystore.sqlite3"),
        d.path("data/master.key")
    );
    let mut second = TestDaemon::prepare(Mode::Embedded, None, None, &extra, &[]);
    let (status, log) = second.expect_refusal();
    assert!(!status.success());
    assert!(log.contains(&format!("pid {}", d.pid())), "{log}");
    assert!(log.contains("in use by apikeyd serve"), "{log}");
    assert!(!log.contains("listening"), "refused before binding: {log}");
    assert!(!second.socket.exists());
    // Another spelling of the same file (a symlink), even with the lock's note
    // deleted: the lock is on the keystore file itself.
    std::os::unix::fs::symlink(d.path("data/keystore.sqlite3"), d.path("ks-link.sqlite3")).unwrap();
    std::fs::remove_file(d.path("data/keystore.sqlite3.lock")).unwrap();
    let extra = format!(
        "keystore.path = {:?}\nkeystore.master_key_file = {:?}\n",
        d.path("ks-link.sqlite3"),
        d.path("data/master.key")
    );
    let mut third = TestDaemon::prepare(Mode::Embedded, None, None, &extra, &[]);
    let (status, log) = third.expect_refusal();
    assert!(!status.success(), "{log}");
    assert!(log.contains("in use by"), "{log}");
    let (out, text) = run(
        &["rotate-master-key"],
        &config_beside(&d, "link.toml", "run/other.sock"),
    );
    assert!(!out.status.success(), "{text}");
    // The first goes on serving.
    let r = d.client().ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai", "fallback_to_pool": false}));
    assert_eq!(r["key"], "sk-ana-one-daemon");
}

#[test]
fn a_tool_on_a_copy_of_the_keystore_next_to_a_live_daemon_changes_nothing() {
    let d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-not-a-copy"}));
    let key_before = std::fs::read(d.path("data/master.key")).unwrap();
    // The live socket and key file, but a backup copy as the keystore.
    rusqlite::Connection::open(d.path("data/keystore.sqlite3"))
        .unwrap()
        .execute("VACUUM INTO ?1", [d.path("copy.sqlite3").to_str().unwrap()])
        .unwrap();
    let config = d.path("copy.toml");
    std::fs::write(
        &config,
        format!(
            "server.socket = {:?}\nkeystore.path = {:?}\nkeystore.master_key_file = {:?}\n",
            d.socket,
            d.path("copy.sqlite3"),
            d.path("data/master.key")
        ),
    )
    .unwrap();
    let (out, text) = run(&["rotate-master-key"], &config);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("does not hold the keystore"), "{text}");
    assert_eq!(
        std::fs::read(d.path("data/master.key")).unwrap(),
        key_before
    );
}

#[test]
fn a_deleted_keystore_check_value_does_not_let_another_key_in() {
    let mut d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-check-gone"}));
    assert!(d.stop().success());
    rusqlite::Connection::open(d.path("data/keystore.sqlite3"))
        .unwrap()
        .execute("DELETE FROM meta WHERE name = 'keycheck'", [])
        .unwrap();
    let real = std::fs::read(d.path("data/master.key")).unwrap();
    std::fs::write(
        d.path("data/master.key"),
        apikeyd::keys::MasterKey::generate_base64().as_bytes(),
    )
    .unwrap();
    let (status, log) = d.expect_refusal();
    assert!(!status.success());
    assert!(log.contains("does not decrypt this keystore"), "{log}");
    // The right key still opens it (nothing was rewritten by the refused start).
    std::fs::write(d.path("data/master.key"), real).unwrap();
    d.spawn();
    d.wait_ready();
    let r = d.client().ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai", "fallback_to_pool": false}));
    assert_eq!(r["key"], "sk-ana-check-gone");
}

#[test]
fn the_lock_note_is_never_written_through_a_symlink() {
    let mut d = TestDaemon::start();
    assert!(d.stop().success());
    std::fs::write(d.path("victim.txt"), "important\n").unwrap();
    std::fs::remove_file(d.path("data/keystore.sqlite3.lock")).unwrap();
    std::os::unix::fs::symlink(d.path("victim.txt"), d.path("data/keystore.sqlite3.lock")).unwrap();
    let (out, text) = run(&["rotate-master-key"], &d.config_path);
    assert!(!out.status.success(), "{text}");
    let (status, _) = d.expect_refusal();
    assert!(!status.success());
    assert_eq!(
        std::fs::read_to_string(d.path("victim.txt")).unwrap(),
        "important\n"
    );
}

#[test]
fn rotation_writes_through_a_symlinked_key_file() {
    let mut d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-linked-key"}));
    assert!(d.stop().success());
    std::fs::create_dir(d.path("secret")).unwrap();
    std::fs::rename(d.path("data/master.key"), d.path("secret/real.key")).unwrap();
    std::os::unix::fs::symlink(d.path("secret/real.key"), d.path("data/master.key")).unwrap();
    let (out, text) = run(&["rotate-master-key"], &d.config_path);
    assert!(out.status.success(), "{text}");
    let link = std::fs::symlink_metadata(d.path("data/master.key")).unwrap();
    assert!(link.file_type().is_symlink(), "the link stays a link");
    let real = std::fs::read_to_string(d.path("secret/real.key")).unwrap();
    assert!(real.contains("v2:") && !real.contains("v1:"), "{real}");
    d.spawn();
    d.wait_ready();
    let r = d.client().ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai", "fallback_to_pool": false}));
    assert_eq!(r["key"], "sk-ana-linked-key");
}

#[test]
fn the_socket_path_never_deletes_a_file() {
    let mut d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-keep-my-key"}));
    assert!(d.stop().success());
    let key = std::fs::read(d.path("data/master.key")).unwrap();
    std::fs::write(d.path("notes.txt"), "operator notes\n").unwrap();
    for (socket, says) in [
        ("data/master.key", "keystore.master_key_file"),
        ("data/keystore.sqlite3", "keystore.path"),
        ("data/keystore.sqlite3.lock", "lock"),
        ("data/master.key.tmp", "temporary file"),
        ("./data/../data/keystore.sqlite3", "keystore.path"),
        ("notes.txt", "is not a socket"),
        ("data", "is not a socket"),
    ] {
        d.write_config(&format!("server.socket = {socket:?}\n"));
        let (status, log) = d.expect_refusal();
        assert!(!status.success(), "{socket}");
        assert!(log.contains(says), "{socket}: {log}");
        assert_eq!(std::fs::read(d.path("data/master.key")).unwrap(), key);
    }
    assert_eq!(
        std::fs::read_to_string(d.path("notes.txt")).unwrap(),
        "operator notes\n"
    );
    d.write_config("");
    d.spawn();
    d.wait_ready();
    let r = d.client().ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai", "fallback_to_pool": false}));
    assert_eq!(r["key"], "sk-ana-keep-my-key");
}

fn require_root(what: &str) {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{what} needs root (it changes file owners); run the suite as root, as .ci/run does in CI"
    );
}

#[test]
fn rotation_keeps_owner_mode_and_a_backup_of_the_retired_version() {
    require_root("rotation_keeps_owner_mode_and_a_backup_of_the_retired_version");
    let d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-backup-test"}));
    let key_file = d.path("data/master.key");
    // The service user (here: nobody) owns the key; the operator rotates as root.
    std::os::unix::fs::chown(&key_file, Some(65534), Some(65534)).unwrap();
    // A backup of the keystore taken before the rotation.
    let before = d.path("keystore-before.sqlite3");
    rusqlite::Connection::open(d.path("data/keystore.sqlite3"))
        .unwrap()
        .execute("VACUUM INTO ?1", [before.to_str().unwrap()])
        .unwrap();

    let (out, text) = run(&["rotate-master-key"], &d.config_path);
    assert!(out.status.success(), "{text}");
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let backup = d.path("data/master.key.retired-v1");
    assert!(
        text.contains(&backup.display().to_string()),
        "prints the backup: {text}"
    );
    let meta = std::fs::metadata(&backup).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // The old backup opens with the kept versions, not with the rotated key alone.
    use apikeyd::keys::MasterKey;
    use apikeyd::store::keystore::opens_keycheck;
    let old = rusqlite::Connection::open(&before).unwrap();
    assert!(opens_keycheck(&old, &MasterKey::read_file(&backup).unwrap()).unwrap());
    assert!(!opens_keycheck(&old, &MasterKey::read_file(&key_file).unwrap()).unwrap());
    // The daemon still serves (it reads the key as root here).
    let r = d.client().ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai", "fallback_to_pool": false}));
    assert_eq!(r["key"], "sk-ana-backup-test");
}

#[test]
fn stray_redis_keys_never_block_rotate_or_import() {
    let d = TestDaemon::start_with(Mode::Redis, "", &[]);
    let mut c = d.client();
    c.ok(json!({"op": "add_pool_key", "service": "openai", "key": "sk-pool-before-stray"}));
    let mut con = d.redis.as_ref().unwrap().conn();
    let cmd = |args: &[&[u8]]| {
        let mut cmd = redis::cmd(std::str::from_utf8(args[0]).unwrap());
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd
    };
    cmd(&[b"SET", b"stargazer:global_api_pool:x", b"y"])
        .query::<()>(&mut con)
        .unwrap();
    cmd(&[b"SET", b"stargazer:user_api_keys:stray", b"y"])
        .query::<()>(&mut con)
        .unwrap();
    // A binary field in a pool hash, and legacy entries that break one rule each.
    cmd(&[
        b"HSET",
        b"stargazer:global_api_pool:bin",
        b"\xff\xfe",
        b"\x00\x01",
    ])
    .query::<()>(&mut con)
    .unwrap();
    cmd(&[
        b"HSET",
        b"stargazer:user_api_keys:ana",
        b"bad service!",
        b"sk-legacy-ana-00001",
    ])
    .query::<()>(&mut con)
    .unwrap();
    cmd(&[
        b"HSET",
        b"stargazer:user_api_keys:ana",
        b"openai",
        b"\x01\x02",
    ])
    .query::<()>(&mut con)
    .unwrap();
    cmd(&[
        b"HSET",
        b"stargazer:user_api_keys:bad user",
        b"openai",
        b"sk-legacy-bad-user-1",
    ])
    .query::<()>(&mut con)
    .unwrap();
    cmd(&[
        b"HSET",
        b"stargazer:global_api_pool:anthropic",
        b"primary",
        b"sk-ant-legacy-pool-001",
    ])
    .query::<()>(&mut con)
    .unwrap();

    let (out, text) = run(&["rotate-master-key"], &d.config_path);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("stargazer:global_api_pool:x"), "{text}");

    let (out, text) = run(&["import-legacy"], &d.config_path);
    assert_eq!(out.status.code(), Some(1), "entries were skipped: {text}");
    assert!(text.contains("were skipped or refused"), "{text}");
    assert!(text.contains("stargazer:user_api_keys:stray"), "{text}");
    assert!(
        text.contains("field bad service!: the service name"),
        "{text}"
    );
    assert!(text.contains("field openai: the key"), "{text}");
    assert!(
        text.contains("bad user field openai: the user id"),
        "{text}"
    );
    let listed = c.ok(json!({"op": "list_pool_keys", "service": "anthropic"}));
    assert_eq!(listed["keys"][0]["label"], "primary", "{listed}");
    let r = c.ok(json!({"op": "get_pool_api_key", "service": "openai"}));
    assert_eq!(r["key"], "sk-pool-before-stray");
}

/// Whether `needle` is anywhere in the writable memory of process `pid`. Only pages
/// that are present are read (the allocator reserves far more than it touches).
fn in_memory(pid: i32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let open = |what: &str| {
        std::fs::File::open(format!("/proc/{pid}/{what}")).expect(
            "reading another process's memory needs root (CAP_SYS_PTRACE); run the suite as root",
        )
    };
    let (mem, pagemap) = (open("mem"), open("pagemap"));
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let pages = ((end - start) / PAGE) as usize;
        let mut entries = vec![0u8; pages * 8];
        if pagemap
            .read_exact_at(&mut entries, start / PAGE * 8)
            .is_err()
        {
            continue;
        }
        let present: Vec<bool> = entries
            .chunks_exact(8)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap()) >> 63 == 1)
            .collect();
        // Runs of present pages, read whole so a needle across pages is found.
        let mut i = 0;
        while i < pages {
            if !present[i] {
                i += 1;
                continue;
            }
            let first = i;
            while i < pages && present[i] {
                i += 1;
            }
            let mut buf = vec![0u8; (i - first) * PAGE as usize];
            if mem
                .read_exact_at(&mut buf, start + first as u64 * PAGE)
                .is_ok()
                && memchr::memmem::find(&buf, needle).is_some()
            {
                return true;
            }
        }
    }
    false
}

/// The memory scan itself finds a key that is meant to stay in memory.
#[test]
fn the_memory_scan_finds_a_cached_key() {
    require_root("the_memory_scan_finds_a_cached_key");
    let d = TestDaemon::start();
    let key = "sk-KEPT-in-the-cache-3c2b1a09";
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": key}));
    c.ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai"}));
    assert!(in_memory(d.pid(), key.as_bytes()));
}

#[test]
fn secrets_of_rejected_requests_are_wiped() {
    require_root("secrets_of_rejected_requests_are_wiped");
    let d = TestDaemon::start();
    let canaries = [
        "sk-WIPED-bad-user-9f8e7d6c5b4a",
        "sk-WIPED-bad-service-1a2b3c4d",
        "sk-WIPED-cut-off-line-5e6f7a8b",
    ];
    let malformed = [
        "sk-WIPED-unterminated-00000001",
        "sk-WIPED-trailing-data-0000002",
        "sk-WIPED-trailing-comma-000003",
        "sk-WIPED-missing-colon-0000004",
    ];
    let mut c = d.client();
    let (code, _) = c.err(json!({"op": "set_user_api_key", "user_id": "has space", "service": "openai", "key": canaries[0]}));
    assert_eq!(code, "bad_request");
    let (code, _) =
        c.err(json!({"op": "add_pool_key", "service": "bad service", "key": canaries[1]}));
    assert_eq!(code, "bad_request");
    // Lines that are not JSON objects at all, each holding a key.
    for (i, tail) in ["", "} x", ",}", " \"x\"}"].iter().enumerate() {
        let line = format!(
            "{{\"op\":\"set_user_api_key\",\"user_id\":\"u2\",\"service\":\"openai\",\"key\":\"{}\"{tail}\n",
            malformed[i]
        );
        let mut one = d.client();
        one.send_raw(line.as_bytes());
        one.writer_shutdown();
        let answers = one.recv_until_closed();
        assert_eq!(answers[0]["error"]["code"], "bad_request");
        // Scanned at once, before any other request could overwrite what the
        // parser left on the stack.
        assert!(
            !in_memory(d.pid(), malformed[i].as_bytes()),
            "{} is still in the daemon's memory",
            malformed[i]
        );
    }
    // A line the client never finished.
    c.send_raw(format!("{{\"op\":\"set_user_api_key\",\"key\":\"{}\"", canaries[2]).as_bytes());
    c.writer_shutdown();
    // Answered at EOF like any last line: refused, without echoing the key.
    let answers = c.recv_until_closed();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["ok"], false, "{answers:?}");
    assert!(!answers[0].to_string().contains(canaries[2]));
    drop(c);
    // The connection is gone once stats counts only the one asking.
    let mut probe = d.client();
    common::eventually(
        "only the probe connection left",
        std::time::Duration::from_secs(10),
        || probe.ok(json!({"op": "stats"}))["connections"] == 1,
    );
    for canary in canaries.iter().chain(&malformed) {
        assert!(
            !in_memory(d.pid(), canary.as_bytes()),
            "{canary} is still in the daemon's memory"
        );
    }
}

/// The key file is locked with the keystore: a tool (or a daemon) whose config
/// names a copy of the keystore but the live daemon's key file is refused, naming
/// the daemon, and changes nothing.
#[test]
fn the_live_key_file_is_refused_with_a_copy_of_the_keystore() {
    let d = TestDaemon::start();
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-key-file-lock"}));
    let key_before = std::fs::read(d.path("data/master.key")).unwrap();
    rusqlite::Connection::open(d.path("data/keystore.sqlite3"))
        .unwrap()
        .execute("VACUUM INTO ?1", [d.path("copy.sqlite3").to_str().unwrap()])
        .unwrap();
    let copy_before = std::fs::read(d.path("copy.sqlite3")).unwrap();
    // Nothing answers on this socket: the tool would run alone on the copy.
    let config = d.path("copy.toml");
    std::fs::write(
        &config,
        format!(
            "server.socket = {:?}\nkeystore.path = {:?}\nkeystore.master_key_file = {:?}\n",
            d.path("other/apikeyd.sock"),
            d.path("copy.sqlite3"),
            d.path("data/master.key")
        ),
    )
    .unwrap();
    let (out, text) = run(&["rotate-master-key"], &config);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("master key file") && text.contains(&format!("pid {}", d.pid())),
        "names the daemon: {text}"
    );
    assert_eq!(
        std::fs::read(d.path("data/master.key")).unwrap(),
        key_before
    );
    assert!(!d.path("data/master.key.retired-v1").exists());
    assert_eq!(std::fs::read(d.path("copy.sqlite3")).unwrap(), copy_before);

    // A daemon on that config is refused the same way, before it creates anything.
    let (out, text) = run(&["serve"], &config);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("pid {}", d.pid())), "{text}");
    assert!(!d.path("other").exists(), "{text}");
    let r = d.client().ok(json!({"op": "get_user_api_key", "user_id": "ana", "service": "openai", "fallback_to_pool": false}));
    assert_eq!(r["key"], "sk-ana-key-file-lock");
}

/// A second start after the keystore was renamed under a live daemon touches
/// nothing of the live daemon's: refused, its journal intact, its lock note as it
/// wrote it; writes it acknowledges afterwards survive kill -9, renaming the
/// keystore back and a restart. A start that finds the journal without its
/// database (the daemon gone) refuses without touching it.
#[test]
fn a_refused_start_never_touches_a_live_daemons_journal() {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "ana", "service": "openai", "key": "sk-ana-before-move"}));
    let ks = d.path("data/keystore.sqlite3");
    let wal = d.path("data/keystore.sqlite3-wal");
    let note = d.path("data/keystore.sqlite3.lock");
    assert!(wal.exists());
    let wal_inode = std::fs::metadata(&wal).unwrap().ino();
    let note_before = std::fs::read(&note).unwrap();
    std::fs::rename(&ks, d.path("data/keystore.moved.sqlite3")).unwrap();

    let (out, text) = run(&["serve"], &d.config_path);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("pid {}", d.pid())),
        "names the live daemon: {text}"
    );
    assert_eq!(std::fs::metadata(&wal).unwrap().ino(), wal_inode, "{text}");
    assert_eq!(std::fs::read(&note).unwrap(), note_before);
    assert!(!ks.exists(), "no new keystore at the old path");

    c.ok(json!({"op": "set_user_api_key", "user_id": "bob", "service": "openai", "key": "sk-bob-after-move"}));
    d.kill9();
    // The daemon is gone; its journal is still there, without its database.
    let (out, text) = run(&["serve"], &d.config_path);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("exists but the keystore"), "{text}");
    assert_eq!(std::fs::metadata(&wal).unwrap().ino(), wal_inode);
    assert!(!ks.exists());

    std::fs::rename(d.path("data/keystore.moved.sqlite3"), &ks).unwrap();
    d.spawn();
    d.wait_ready();
    let mut c = d.client();
    for (user, key) in [("ana", "sk-ana-before-move"), ("bob", "sk-bob-after-move")] {
        let r = c.ok(json!({"op": "get_user_api_key", "user_id": user, "service": "openai", "fallback_to_pool": false}));
        assert_eq!(r["key"], key);
    }
}
