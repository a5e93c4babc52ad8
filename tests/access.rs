//! Access by supplementary groups and by names (issue 14 items 1 and 2): real clients
//! switched to another uid and groups with `setpriv`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Mode, TestDaemon};
use serde_json::{json, Value};

const NOBODY: u32 = 65534;
/// A group nobody is in, given to the client only as a supplementary group.
const CLIENTS: u32 = 4242;

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: it switches clients to other uids with setpriv"
    );
}

/// Makes the socket reachable for other uids and copies the client binary where
/// they can run it.
fn open_up(d: &TestDaemon) -> PathBuf {
    for p in [d.dir.path().to_path_buf(), d.path("run")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let bin = d.path("apikeyd-client");
    std::fs::copy(common::bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Runs `apikeyd call` as uid/gid nobody with exactly the supplementary `groups`.
fn call_as(bin: &Path, socket: &Path, groups: &[u32], requests: &[Value]) -> Vec<Value> {
    need_root();
    let mut cmd = Command::new("setpriv");
    cmd.args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}")]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    let out = cmd
        .arg(bin)
        .arg("call")
        .arg("--socket")
        .arg(socket)
        .args(requests.iter().map(|r| r.to_string()))
        .output()
        .expect("setpriv (util-linux) is needed: apt-get install util-linux");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn supplementary_groups_count_for_allow_and_admin() {
    let d = TestDaemon::start_with(
        Mode::Embedded,
        &format!(
            "[access]\nallow_gids = [{CLIENTS}]\nadmin_gids = [{}]\n",
            CLIENTS + 1
        ),
        &[],
    );
    let bin = open_up(&d);
    let ping = json!({"op": "ping"});
    let add = json!({"op": "add_pool_key", "service": "openai", "key": "sk-supplementary-0001"});
    // Without the group: refused.
    let out = call_as(&bin, &d.socket, &[], std::slice::from_ref(&ping));
    assert_eq!(out[0]["error"]["code"], "forbidden", "{out:?}");
    // With it only as a supplementary group (as `usermod -aG` gives it): a user.
    let out = call_as(&bin, &d.socket, &[7, CLIENTS], &[ping.clone(), add.clone()]);
    assert_eq!(out[0]["ok"], true, "{out:?}");
    assert_eq!(out[1]["error"]["code"], "forbidden", "{out:?}");
    // The admin group as a supplementary group: an admin.
    let out = call_as(&bin, &d.socket, &[CLIENTS + 1], &[add]);
    assert_eq!(out[0]["result"]["added"], true, "{out:?}");
}

#[test]
fn names_are_resolved_at_start_and_on_reload() {
    // nobody/nogroup exist on every Debian-like host.
    let d = TestDaemon::start_with(Mode::Embedded, "[access]\nallow_uids = [\"nobody\"]\n", &[]);
    let bin = open_up(&d);
    let out = call_as(
        &bin,
        &d.socket,
        &[],
        &[
            json!({"op": "ping"}),
            json!({"op": "list_pool_keys", "service": "openai"}),
        ],
    );
    assert_eq!(out[0]["ok"], true, "{out:?}");
    assert_eq!(
        out[1]["error"]["code"], "forbidden",
        "a user, not an admin: {out:?}"
    );

    // A reload to a group name makes nobody an admin through its primary group.
    d.write_config("[access]\nadmin_gids = [\"nogroup\"]\n");
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = call_as(
            &bin,
            &d.socket,
            &[],
            &[json!({"op": "list_pool_keys", "service": "openai"})],
        );
        if out[0]["ok"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reload to admin_gids = [\"nogroup\"] not applied: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // An unknown name refuses the reload, naming it; the running access stays.
    d.write_config("[access]\nadmin_gids = [\"no-such-group-apikeyd\"]\n");
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.logs().contains("reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload failure logged:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.logs();
    assert!(
        log.contains("no-such-group-apikeyd") && log.contains("access.admin_gids"),
        "{log}"
    );
    let out = call_as(
        &bin,
        &d.socket,
        &[],
        &[json!({"op": "list_pool_keys", "service": "openai"})],
    );
    assert_eq!(out[0]["ok"], true, "the running access stays: {out:?}");
}

#[test]
fn an_unknown_name_refuses_the_start() {
    let mut d = TestDaemon::start();
    assert!(d.stop().success());
    d.write_config("[access]\nallow_uids = [\"no-such-user-apikeyd\"]\n");
    let before = d.logs().len();
    let (status, log) = d.expect_refusal();
    let log = &log[before..];
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("no-such-user-apikeyd") && log.contains("access.allow_uids"),
        "{log}"
    );
    assert!(!log.contains("listening"), "{log}");
}
