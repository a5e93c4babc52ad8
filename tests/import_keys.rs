//! `apikeyd import-keys`: JSON lines through the running daemon's normal write path,
//! one line per entry not stored, a non-zero exit when any was refused or skipped.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{contains, files_below, Mode, TestDaemon, CANARY};
use serde_json::json;

fn import(d: &TestDaemon, file: Option<&std::path::Path>, stdin: &str) -> Output {
    let mut cmd = Command::new(common::bin());
    cmd.arg("import-keys")
        .arg("--socket")
        .arg(&d.socket)
        .env_remove("APIKEYD_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(f) = file {
        cmd.arg(f);
    }
    let mut child = cmd.spawn().expect("spawn import-keys");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn key_of(d: &TestDaemon, user: &str, service: &str) -> serde_json::Value {
    d.client().ok(
        json!({"op":"get_user_api_key","user_id":user,"service":service,
                          "fallback_to_pool":false,"fallback_to_config":false}),
    )
}

fn stores_good_entries_and_reports_each_bad_one(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let lines = [
        json!({"user_id":"ana","service":"openai","key":CANARY}).to_string(),
        json!({"user_id":123456789012345678u64,"service":"Anthropic","key":"sk-ant-second-key-0000"}).to_string(),
        format!("{{\"user_id\":\"bo\",\"service\":\"openai\",\"key\":\"{CANARY}\""),
        String::new(),
        json!({"user_id":"bo","service":"web search","key":CANARY}).to_string(),
        json!({"user_id":"cy","service":"openai"}).to_string(),
        json!({"user_id":"dee","service":"openai","key":format!("{CANARY}\u{7}")}).to_string(),
    ];
    let file = d.path("keys.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = import(&d, Some(&file), "");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("line 3: skipped: not JSON"), "{stdout}");
    assert!(stdout.contains("line 5: refused: bad_request"), "{stdout}");
    assert!(
        stdout.contains("line 6: skipped: key is missing"),
        "{stdout}"
    );
    assert!(stdout.contains("line 7: refused: bad_request"), "{stdout}");
    assert!(
        stdout.contains("2 stored, 2 refused, 2 skipped"),
        "{stdout}"
    );
    assert!(!contains(&out.stdout, CANARY.as_bytes()) && !contains(&out.stderr, CANARY.as_bytes()));

    let ana = key_of(&d, "ana", "openai");
    assert_eq!(
        (ana["key"].as_str(), ana["source"].as_str()),
        (Some(CANARY), Some("user"))
    );
    let snowflake = key_of(&d, "123456789012345678", "anthropic");
    assert_eq!(snowflake["key"], "sk-ant-second-key-0000");
    assert!(key_of(&d, "bo", "openai")["key"].is_null());
    // Sealed like any other stored key: never in clear on disk.
    for (path, bytes) in files_below(&d.path("data")) {
        assert!(!contains(&bytes, CANARY.as_bytes()), "{}", path.display());
    }
}

fn reads_stdin_and_exits_zero_when_all_are_stored(mode: Mode) {
    let d = TestDaemon::start_with(mode, "", &[]);
    let input = format!(
        "{}\n{}\n",
        json!({"user_id":"ana","service":"openai","key":"sk-from-stdin-00000001"}),
        json!({"user_id":"ana","service":"openai","key":"sk-from-stdin-00000001"}),
    );
    let out = import(&d, None, &input);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 stored, 0 refused, 0 skipped"));
    assert_eq!(key_of(&d, "ana", "openai")["key"], "sk-from-stdin-00000001");
}

in_every_mode!(
    stores_good_entries_and_reports_each_bad_one,
    reads_stdin_and_exits_zero_when_all_are_stored,
);

#[test]
fn no_daemon_and_no_file_exit_two() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::bin())
        .args(["import-keys", "--socket"])
        .arg(dir.path().join("none.sock"))
        .arg(dir.path().join("keys.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let d = TestDaemon::start();
    let out = Command::new(common::bin())
        .args(["import-keys", "--socket"])
        .arg(&d.socket)
        .arg(dir.path().join("missing.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}
