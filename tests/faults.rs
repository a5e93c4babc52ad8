//! Limits under load and faults: clients that never read, deadlines, a busy, full or
//! read-only keystore, a panicking handler, a corrupt keystore at start or found by
//! the integrity check that runs in the background after an unclean stop.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Mode, TestDaemon};
use serde_json::{json, Value};

fn a_writer_that_never_reads_cannot_grow_memory(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let before = common::rss_kb(d.pid());
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let line =
        json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}).to_string() + "\n";
    let chunk = line.repeat(1000);
    let mut sent = 0usize;
    // Write until the daemon stops taking more (backpressure), up to 256 MiB.
    while sent < 256 << 20 {
        match (&s).write(chunk.as_bytes()) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let after = common::rss_kb(d.pid());
    eprintln!(
        "sent {} KiB before backpressure; RSS {before} kB -> {after} kB",
        sent / 1024
    );
    assert!(
        sent < 256 << 20,
        "the daemon kept reading from a client that never reads"
    );
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} kB to {after} kB"
    );
    // Everyone else is unaffected.
    assert_eq!(d.client().ok(json!({"op": "ping"}))["pong"], true);
}

fn a_client_that_stops_reading_is_dropped_after_the_idle_timeout(mode: Mode) {
    let d = TestDaemon::start_with(mode, "[server]\nidle_timeout_s = 1\n", &[]);
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let chunk = (json!({"op": "ping"}).to_string() + "\n").repeat(10_000);
    while (&s).write(chunk.as_bytes()).is_ok() {}
    // Its session gives up writing and closes; only our stats connection remains.
    let mut c = d.client();
    common::eventually("the stuck client dropped", Duration::from_secs(10), || {
        c.ok(json!({"op": "stats"}))["connections"] == 1
    });
}

/// Holds an exclusive lock on the keystore until dropped.
fn lock_keystore(d: &TestDaemon) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(d.path("data/keystore.sqlite3")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    db
}

fn a_request_never_waits_past_its_deadline(mode: Mode) {
    let d = TestDaemon::start_with(
        mode,
        &format!(
            "{}[server]\nrequest_timeout_ms = 300\n",
            common::LOCAL_USER_KEYS
        ),
        &[],
    );
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-before-the-lock-1"}));
    // Read once, so the read below is a cached one (the write cleared the entry and
    // a miss under a loaded machine may outlast the 300 ms deadline).
    assert_eq!(
        c.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}))["key"],
        "sk-before-the-lock-1"
    );
    let lock = lock_keystore(&d);
    // The lock is held until after the answer: the answer can only come from the
    // request deadline (SQLite's own busy wait would say "busy", not this).
    let (code, message) = c.err(json!({"op": "set_user_api_key", "user_id": "v", "service": "openai", "key": "sk-during-the-lock"}));
    assert_eq!(code, "unavailable");
    assert!(message.contains("request_timeout_ms"), "{message}");
    // Other connections and cached reads go on.
    let mut other = d.client();
    assert_eq!(other.ok(json!({"op": "ping"}))["pong"], true);
    assert_eq!(
        other.ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}))["key"],
        "sk-before-the-lock-1"
    );
    drop(lock);
    c.ok(json!({"op": "set_user_api_key", "user_id": "w", "service": "openai", "key": "sk-after-the-lock-1"}));
}

fn a_busy_keystore_answers_unavailable(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let mut c = d.client();
    let lock = lock_keystore(&d);
    // SQLite waits out its busy timeout (5 s), then reports busy.
    let (code, message) =
        c.err(json!({"op": "delete_user_api_key", "user_id": "u", "service": "openai"}));
    assert_eq!(code, "unavailable");
    assert!(message.contains("busy"), "{message}");
    drop(lock);
    c.ok(json!({"op": "delete_user_api_key", "user_id": "u", "service": "openai"}));
}

/// A private tmpfs of `kb` KiB at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kb: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kb}k,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("mount(8) is needed");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, opt: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A daemon whose keystore lives on a 4 MiB tmpfs.
fn daemon_on_small_disk(mode: Mode) -> (TestDaemon, Tmpfs) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    assert!(d.stop().success());
    let fs = Tmpfs::mount(&d.path("small"), 4096);
    // User keys in the keystore, whatever the mode: it is the keystore's disk that fills.
    d.write_config("[keystore]\npath = \"small/keystore.sqlite3\"\nuser_keys = \"local\"\n");
    d.spawn();
    d.wait_ready();
    (d, fs)
}

fn a_full_disk_answers_unavailable_and_loses_nothing(mode: Mode) {
    let (d, _fs) = daemon_on_small_disk(mode);
    let mut c = d.client();
    c.ok(json!({"op": "set_user_api_key", "user_id": "kept", "service": "openai", "key": "sk-stored-before-full"}));
    // Fill the disk.
    let filler = d.path("small/filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    let big = "k".repeat(4000);
    let mut refused = 0;
    for i in 0..50 {
        let r = c.call(json!({"op": "set_user_api_key", "user_id": format!("f{i}"), "service": "openai", "key": big}));
        if r["ok"] == false {
            assert_eq!(r["error"]["code"], "unavailable", "{r}");
            refused += 1;
        }
    }
    assert!(refused > 0, "writes on a full disk must be refused");
    assert_eq!(
        c.ok(json!({"op": "get_user_api_key", "user_id": "kept", "service": "openai"}))["key"],
        "sk-stored-before-full"
    );
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    c.ok(json!({"op": "set_user_api_key", "user_id": "after", "service": "openai", "key": "sk-after-space-freed"}));
    // Whatever was acknowledged is there; the file is sound.
    let mut d = d;
    d.restart();
    let mut c = d.client();
    assert_eq!(
        c.ok(json!({"op": "get_user_api_key", "user_id": "kept", "service": "openai"}))["key"],
        "sk-stored-before-full"
    );
    assert_eq!(
        c.ok(json!({"op": "get_user_api_key", "user_id": "after", "service": "openai"}))["key"],
        "sk-after-space-freed"
    );
    let db = rusqlite::Connection::open(d.path("small/keystore.sqlite3")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// Linux will not remount a filesystem read-only while the daemon holds files open
/// for writing, so a read-only keystore is shown at start: a clear refusal, and the
/// data intact once the filesystem is writable again. (SQLITE_READONLY at run time
/// maps to `unavailable`; see the unit tests of `error.rs`.)
fn a_read_only_keystore_is_refused_clearly(mode: Mode) {
    let (mut d, fs) = daemon_on_small_disk(mode);
    d.client().ok(json!({"op": "set_user_api_key", "user_id": "kept", "service": "openai", "key": "sk-stored-before-ro"}));
    assert!(d.stop().success());
    fs.remount("ro");
    let (status, log) = d.expect_refusal();
    assert!(!status.success());
    assert!(
        log.contains("keystore") && log.contains("refusing to start"),
        "{log}"
    );
    fs.remount("rw");
    d.spawn();
    d.wait_ready();
    let r = d
        .client()
        .ok(json!({"op": "get_user_api_key", "user_id": "kept", "service": "openai"}));
    assert_eq!(r["key"], "sk-stored-before-ro");
}

fn a_panicking_handler_answers_internal(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[("APIKEYD_TEST_HOOKS", "1")]);
    let mut c = d.client();
    c.send_raw(b"{\"op\":\"ping\",\"id\":1}\n{\"op\":\"debug_panic\",\"id\":2}\n{\"op\":\"ping\",\"id\":3}\n");
    let replies: Vec<Value> = (0..3).map(|_| c.recv()).collect();
    assert_eq!(replies[0]["ok"], true);
    assert_eq!(replies[1]["id"], 2);
    assert_eq!(replies[1]["error"]["code"], "internal");
    assert_eq!(replies[2]["ok"], true, "the same connection goes on");
    assert_eq!(d.client().ok(json!({"op": "ping"}))["pong"], true);
}

fn a_corrupt_keystore_is_refused_at_start(mode: Mode) {
    let mut d = TestDaemon::start_with(mode, "", &[]);
    store_keys(&d, 200, |i| (format!("u{i}"), format!("sk-corrupt-{i:05}")));
    let (path, mut bytes) = stopped_keystore(&mut d);
    assert!(bytes.len() > 8192);
    // Scribble over the second page (a b-tree page), leaving the header intact.
    for b in &mut bytes[4096..4096 + 512] {
        *b = 0xA5;
    }
    std::fs::write(&path, bytes).unwrap();
    let (status, log) = d.expect_refusal();
    assert!(!status.success());
    assert!(
        log.contains("restore it from a backup") || log.contains("malformed"),
        "{log}"
    );
}

/// A daemon whose deferred integrity check waits until the returned file exists
/// (a test hook), so that a test sees it serving before the check has run. User
/// keys live in the keystore in both modes.
fn hooked_check(mode: Mode) -> (TestDaemon, tempfile::TempDir) {
    let gate = tempfile::tempdir().unwrap();
    let file = gate.path().join("run-the-check");
    let d = TestDaemon::start_with(
        mode,
        common::LOCAL_USER_KEYS,
        &[
            ("APIKEYD_TEST_HOOKS", "1"),
            ("APIKEYD_TEST_KEYSTORE_CHECK_GATE", file.to_str().unwrap()),
        ],
    );
    (d, gate)
}

fn set_key(user: &str, key: &str) -> Value {
    json!({"op": "set_user_api_key", "user_id": user, "service": "openai", "key": key})
}

/// Stores `n` user keys through one connection: user id and key `name(i)`.
fn store_keys(d: &TestDaemon, n: usize, name: impl Fn(usize) -> (String, String)) {
    let mut c = d.client();
    for i in 0..n {
        let (user, key) = name(i);
        c.ok(set_key(&user, &key));
    }
}

/// Stops the daemon; answers its keystore file's path and bytes, with everything
/// moved from the WAL into the main file first.
fn stopped_keystore(d: &mut TestDaemon) -> (std::path::PathBuf, Vec<u8>) {
    assert!(d.stop().success());
    let path = d.path("data/keystore.sqlite3");
    let db = rusqlite::Connection::open(&path).unwrap();
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(db);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn get_key(user: &str) -> Value {
    json!({"op": "get_user_api_key", "user_id": user, "service": "openai", "fallback_to_config": false})
}

/// After a crash the full check runs in the background: reads are served at once,
/// writes are refused (`unavailable`, nothing applied) until it passes, then accepted.
fn after_a_crash_writes_wait_for_the_background_check(mode: Mode) {
    let (mut d, gate) = hooked_check(mode);
    store_keys(&d, 50, |i| {
        (format!("u{i}"), format!("sk-before-crash-{i:04}"))
    });
    d.kill9();
    d.spawn();
    d.wait_ready();
    let mut c = d.client();
    assert_eq!(c.ok(get_key("u7"))["key"], "sk-before-crash-0007");
    let refused = c.call(set_key("u7", "sk-during-the-check"));
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("integrity check"),
        "{refused}"
    );
    assert_eq!(c.ok(get_key("u7"))["key"], "sk-before-crash-0007");
    std::fs::write(gate.path().join("run-the-check"), "").unwrap();
    common::eventually(
        "a write after the deferred integrity check",
        Duration::from_secs(20),
        || c.call(set_key("u7", "sk-after-the-check"))["ok"] == true,
    );
    assert!(d.logs().contains("keystore integrity check passed"));
    d.restart();
    assert_eq!(
        d.client().ok(get_key("u7"))["key"],
        "sk-after-the-check",
        "the write accepted after the check is durable"
    );
}

/// A keystore damaged while the daemon was stopped, where opening it does not look:
/// the daemon serves reads until the background check finds the damage, then stops
/// with the refusal, having accepted no write and without marking the file clean; the
/// next start is refused.
fn a_corrupt_keystore_found_by_the_background_check_stops_the_daemon(mode: Mode) {
    let (mut d, gate) = hooked_check(mode);
    store_keys(&d, 2000, |i| {
        (
            format!("user-{i:05}"),
            format!("sk-corrupt-{i:06}-0123456789abcdef"),
        )
    });
    let (path, mut bytes) = stopped_keystore(&mut d);
    let pages = bytes.len() / 4096;
    assert!(pages > 20, "{pages} pages");
    // Scribble over the last page (a leaf far from the tables' first pages, which is
    // all that opening reads).
    let last = (pages - 1) * 4096;
    for b in &mut bytes[last + 8..last + 4096] {
        *b = 0xA5;
    }
    std::fs::write(&path, bytes).unwrap();
    d.spawn();
    d.wait_ready();
    let mut c = d.client();
    assert_eq!(
        c.call(set_key("user-00001", "sk-onto-a-corrupt-file"))["error"]["code"],
        "unavailable"
    );
    std::fs::write(gate.path().join("run-the-check"), "").unwrap();
    let status = d.wait_exit();
    assert!(!status.success());
    let log = d.logs();
    assert!(log.contains("restore it from a backup"), "{log}");
    assert!(
        !d.path("data/keystore.sqlite3.clean").exists(),
        "a keystore that failed its check is not marked clean"
    );
    let (status, log) = d.expect_refusal();
    assert!(!status.success());
    assert!(
        log.contains("restore it from a backup") || log.contains("malformed"),
        "{log}"
    );
}

in_every_mode!(
    a_writer_that_never_reads_cannot_grow_memory,
    a_client_that_stops_reading_is_dropped_after_the_idle_timeout,
    a_request_never_waits_past_its_deadline,
    a_full_disk_answers_unavailable_and_loses_nothing,
    a_read_only_keystore_is_refused_clearly,
    a_panicking_handler_answers_internal,
    a_corrupt_keystore_is_refused_at_start,
    after_a_crash_writes_wait_for_the_background_check,
    a_corrupt_keystore_found_by_the_background_check_stops_the_daemon,
);

/// Embedded only: one mode is enough to show SQLite's busy timeout (it takes 5 s).
#[test]
fn busy_keystore() {
    a_busy_keystore_answers_unavailable(Mode::Embedded);
}
