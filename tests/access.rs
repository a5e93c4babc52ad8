//! Access by supplementary groups and by user and group names (docs/operations.md,
//! "Access"): real clients switched to another uid and groups with `setpriv`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{call_as, open_up, Mode, TestDaemon, NOBODY};
use serde_json::json;

/// A group nobody is in, given to the client only as a supplementary group.
const CLIENTS: u32 = 4242;

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
    common::eventually(
        "the reload to admin_gids = [\"nogroup\"] applied",
        Duration::from_secs(10),
        || {
            let out = call_as(
                &bin,
                &d.socket,
                &[],
                &[json!({"op": "list_pool_keys", "service": "openai"})],
            );
            out[0]["ok"] == true
        },
    );

    // An unknown name refuses the reload, naming it; the running access stays.
    d.write_config("[access]\nadmin_gids = [\"no-such-group-apikeyd\"]\n");
    d.signal(libc::SIGHUP);
    common::eventually(
        "the reload failure, logged",
        Duration::from_secs(10),
        || d.logs().contains("reload failed"),
    );
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

/// A client process running as nobody that keeps its connection open: `apikeyd call`
/// reading requests from a pipe we hold.
struct HeldClient {
    child: std::process::Child,
}

impl HeldClient {
    /// Connects as nobody and waits until the daemon has answered a ping, so the
    /// connection is known to be counted.
    fn open(bin: &Path, socket: &Path) -> HeldClient {
        use std::io::{BufRead, Write};
        let mut child = common::as_nobody(&[])
            .arg(bin)
            .arg("call")
            .arg("--socket")
            .arg(socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("setpriv (util-linux) is needed: apt-get install util-linux");
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"{\"op\":\"ping\"}\n").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("\"ok\":true"),
            "held client not served: {line}"
        );
        HeldClient { child }
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

#[test]
fn one_uid_cannot_take_every_slot() {
    let d = TestDaemon::start_with(
        Mode::Embedded,
        &format!("[access]\nallow_uids = [{NOBODY}]\n[server]\nmax_connections_per_uid = 2\n"),
        &[],
    );
    let bin = open_up(&d);
    let held = [
        HeldClient::open(&bin, &d.socket),
        HeldClient::open(&bin, &d.socket),
    ];
    let out = call_as(&bin, &d.socket, &[], &[json!({"op": "ping"})]);
    assert_eq!(out[0]["error"]["code"], "unavailable", "{out:?}");
    let said = common::text(&out[0]["error"]["message"]);
    assert!(said.contains("max_connections_per_uid"), "{out:?}");
    // Root is not counted per uid and still gets in.
    d.client().ok(json!({"op": "ping"}));
    // A slot freed is a slot back.
    drop(held);
    common::eventually("a released slot", Duration::from_secs(10), || {
        call_as(&bin, &d.socket, &[], &[json!({"op": "ping"})])[0]["ok"] == true
    });
}

#[test]
fn the_last_slots_are_kept_for_admins() {
    // max 8, a quarter (2) kept for admins: users get 6.
    let d = TestDaemon::start_with(
        Mode::Embedded,
        &format!("[access]\nallow_uids = [{NOBODY}]\n[server]\nmax_connections = 8\nadmin_reserved_connections = 2\n"),
        &[],
    );
    let bin = open_up(&d);
    let _held: Vec<HeldClient> = (0..6).map(|_| HeldClient::open(&bin, &d.socket)).collect();
    let out = call_as(&bin, &d.socket, &[], &[json!({"op": "ping"})]);
    assert_eq!(out[0]["error"]["code"], "unavailable", "{out:?}");
    let said = common::text(&out[0]["error"]["message"]);
    assert!(said.contains("kept for admins"), "{out:?}");
    // An admin (root here) still gets in.
    let mut admin = d.client();
    admin.ok(json!({"op": "stats"}));
}

#[test]
fn max_connections_is_clamped_to_the_open_file_limit() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[server]\nmax_connections = 100000\n",
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(common::bin());
    cmd.args(["serve", "--config", "config.toml"])
        .current_dir(dir.path())
        .env_remove("APIKEYD_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 128,
                rlim_max: 512,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let socket = dir.path().join("run/apikeyd.sock");
    let mut answered = json!(null);
    common::eventually("the daemon listening", Duration::from_secs(20), || {
        common::Client::try_connect(&socket)
            .map(|mut c| answered = c.call(json!({"op": "ping"})))
            .is_ok()
    });
    // SAFETY: kill with a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert_eq!(answered["ok"], true);
    let text = std::fs::read_to_string(&log).unwrap();
    // The soft limit was raised to the hard one (512), and 100000 clamped under it.
    assert!(
        text.contains("server.max_connections = 100000 does not fit under the open-file limit (512); using 448"),
        "{text}"
    );
}
