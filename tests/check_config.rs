//! `check-config` runs `serve`'s own preflight: for each config below, the check's
//! verdict (exit 0: serve starts; 1 or 2: serve refuses) is what `serve` then does
//! on the same config (started: it answers a ping; refused: it exits non-zero).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Client, Mode, RedisServer, TestDaemon};
use serde_json::json;

/// What `check-config` said: its exit code and stderr.
struct Checked {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `cmd` (the binary, or setpriv in front of it) with the test's environment cleared
/// of apikeyd variables.
fn clean(mut cmd: Command) -> Command {
    cmd.env_remove("APIKEYD_CONFIG")
        .env_remove("APIKEYD_SOCKET")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    cmd
}

/// Runs `check-config --config <config> <extra>` through `cmd`.
fn check(mut cmd: Command, config: &Path, extra: &[&str]) -> Checked {
    let out = common::output_retrying_busy(
        cmd.arg("check-config")
            .arg("--config")
            .arg(config)
            .args(extra),
    );
    Checked {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `serve --config <config>` through `cmd` until it answers a ping on
/// `socket` (started: true, then stopped) or exits (refused: false, with its
/// exit code non-zero and its stderr).
fn serve(mut cmd: Command, config: &Path, socket: &Path) -> (bool, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("spawn serve");
    let (mut exited, mut answered) = (None, false);
    common::eventually("serve started or refused", Duration::from_secs(20), || {
        exited = child.try_wait().unwrap();
        answered = exited.is_none()
            && Client::try_connect(socket)
                .is_ok_and(|mut c| c.call(json!({"op": "ping"}))["ok"] == true);
        exited.is_some() || answered
    });
    if let Some(status) = exited {
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(!status.success(), "serve stopped by itself: {text}");
        return (false, text);
    }
    // SAFETY: kill with a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "serve did not stop cleanly");
    (true, std::fs::read_to_string(log.path()).unwrap())
}

fn as_root() -> Command {
    clean(Command::new(common::bin()))
}

/// Asserts that `check-config` and `serve`, both run through `how`, agree on the
/// config of `d`; answers what the check printed.
fn agree(d: &TestDaemon, how: &dyn Fn() -> Command) -> (Checked, bool) {
    let checked = check(how(), &d.config_path, &[]);
    let (started, log) = serve(how(), &d.config_path, &d.socket);
    assert_eq!(
        checked.code == 0,
        started,
        "check-config (exit {}) and serve (started: {started}) disagree\ncheck:\n{}\nserve:\n{log}",
        checked.code,
        checked.stderr
    );
    (checked, started)
}

/// Redis does not answer, but a key file is there: serve starts (and checks the key
/// against the fleet's once Redis answers); the check says so as a warning.
#[test]
fn redis_down_with_a_key_file_starts() {
    let port = common::free_port();
    let key = apikeyd::keys::MasterKey::generate_base64();
    let d = TestDaemon::prepare(
        Mode::Embedded,
        None,
        Some(key.as_bytes().to_vec()),
        &format!("[redis]\nurl = \"redis://127.0.0.1:{port}/0\"\n"),
        &[],
    );
    let (checked, started) = agree(&d, &as_root);
    assert!(started);
    assert!(
        checked.stderr.contains("warning:") && checked.stderr.contains("does not answer"),
        "{}",
        checked.stderr
    );
    // The effective config says where user keys live (Redis, by default).
    assert!(
        checked.stdout.contains("user_keys = \"redis\""),
        "{}",
        checked.stdout
    );
    std::fs::write(&d.config_path, "").unwrap();
    let checked = check(as_root(), &d.config_path, &[]);
    assert!(
        checked.stdout.contains("user_keys = \"local\""),
        "{}",
        checked.stdout
    );
}

/// The documented Sentinel config: a placeholder URL, the master found through the
/// sentinels.
#[test]
fn sentinel_with_a_placeholder_url_starts() {
    let master = common::start_server(
        tempfile::tempdir().unwrap(),
        &["--port".into(), "{port}".into()],
    );
    let sentinel = common::start_sentinel(master.port);
    let d = TestDaemon::prepare(
        Mode::Embedded,
        None,
        None,
        &format!(
            "[redis]\nurl = \"redis://placeholder/0\"\nsentinels = [\"127.0.0.1:{}\"]\nmaster_name = \"mymaster\"\nmin_replicas_acked = 0\n",
            sentinel.port
        ),
        &[],
    );
    let (checked, started) = agree(&d, &as_root);
    assert!(started, "{}", checked.stderr);
}

/// rediss:// with the CA in tls_ca_file: the check connects as serve does.
#[test]
fn rediss_with_a_ca_file_starts() {
    let certs = tempfile::tempdir().unwrap();
    common::make_certificates(certs.path());
    let p = |f: &str| certs.path().join(f).display().to_string();
    let server = common::start_tls_server(certs.path());
    let d = TestDaemon::prepare(
        Mode::Embedded,
        None,
        None,
        &format!(
            "[redis]\nurl = \"rediss://127.0.0.1:{}/0\"\ntls_ca_file = \"{}\"\n",
            server.port,
            p("ca.crt")
        ),
        &[],
    );
    let (checked, started) = agree(&d, &as_root);
    assert!(started, "{}", checked.stderr);
}

/// No master key, while Redis holds the fleet's check values: serve may not make a
/// new key (it would open nothing of the fleet's), and the check says so.
#[test]
fn a_missing_key_while_redis_holds_the_fleets_is_refused() {
    let redis = RedisServer::start();
    let _first = TestDaemon::start_on(redis.clone(), "", &[]);
    let d = TestDaemon::prepare(Mode::Redis, Some(redis.clone()), None, "", &[]);
    let (checked, started) = agree(&d, &as_root);
    assert!(!started);
    assert_eq!(checked.code, 1, "{}", checked.stderr);
    assert!(
        checked
            .stderr
            .contains("already holds values sealed with a fleet's master key"),
        "{}",
        checked.stderr
    );
    assert!(!d.path("data/master.key").exists(), "no key was made");
}

/// Two problems of different stages: both listed (the check goes on after the first).
#[test]
fn a_bad_log_level_does_not_hide_a_world_readable_key() {
    let key = apikeyd::keys::MasterKey::generate_base64();
    let d = TestDaemon::prepare(Mode::Embedded, None, Some(key.as_bytes().to_vec()), "", &[]);
    std::fs::write(&d.config_path, "log.level = \"verbose\"\n").unwrap();
    let key_file = d.path("data/master.key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (checked, started) = agree(&d, &as_root);
    assert!(!started);
    assert_eq!(
        checked.code, 2,
        "a config error, as serve: {}",
        checked.stderr
    );
    assert!(
        checked.stderr.contains("log.level")
            && checked.stderr.contains("readable by group or others"),
        "{}",
        checked.stderr
    );
    assert!(
        checked.stderr.contains("2 problem(s)"),
        "{}",
        checked.stderr
    );
}

/// A copy of the binary that other users may run, in its own folder.
fn binary_for_others() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("apikeyd");
    std::fs::copy(common::bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, bin)
}

/// As root everything is writable; `--as-user nobody` sees the data folder as
/// nobody does, and serve run as nobody agrees.
#[test]
fn as_user_sees_a_folder_the_service_user_cannot_write() {
    common::need_root();
    let (_bin_dir, bin) = binary_for_others();
    let d = TestDaemon::prepare(Mode::Embedded, None, None, "", &[]);
    // nobody may read the config and reach the folders, but not write them.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    for sub in ["data", "run"] {
        std::fs::create_dir(d.path(sub)).unwrap();
        std::fs::set_permissions(d.path(sub), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let checked = check(as_root(), &d.config_path, &["--as-user", "nobody"]);
    assert_eq!(checked.code, 1, "{}", checked.stderr);
    assert!(
        checked.stderr.contains("user nobody") && checked.stderr.contains("data"),
        "{}",
        checked.stderr
    );
    let nobody = || as_nobody(&bin);
    let (_, started) = agree(&d, &nobody);
    assert!(!started);

    // As root (no --as-user), the same config starts, and serve as root agrees.
    let (checked, started) = agree(&d, &as_root);
    assert!(started, "{}", checked.stderr);
}

/// `bin` run as nobody (setpriv), with no supplementary groups.
fn as_nobody(bin: &Path) -> Command {
    let mut cmd = clean(common::as_nobody(&[]));
    cmd.arg(bin);
    cmd
}

/// A master key only root may read: run as the service user without
/// CREDENTIALS_DIRECTORY both refuse; with the key passed as a systemd credential
/// both start (and `--as-user` run as root honours CREDENTIALS_DIRECTORY too).
#[test]
fn a_root_only_key_needs_the_credentials_directory() {
    common::need_root();
    let (_bin_dir, bin) = binary_for_others();
    let d = TestDaemon::prepare(
        Mode::Embedded,
        None,
        None,
        "keystore.master_key_file = \"keys/master.key\"\n",
        &[],
    );
    let chown =
        |p: &Path| std::os::unix::fs::chown(p, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    for sub in ["data", "run"] {
        std::fs::create_dir(d.path(sub)).unwrap();
        std::fs::set_permissions(d.path(sub), std::fs::Permissions::from_mode(0o700)).unwrap();
        chown(&d.path(sub));
    }
    std::fs::create_dir(d.path("keys")).unwrap();
    std::fs::set_permissions(d.path("keys"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = apikeyd::keys::MasterKey::generate_base64();
    std::fs::write(d.path("keys/master.key"), key.as_bytes()).unwrap();
    std::fs::set_permissions(
        d.path("keys/master.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let nobody = || as_nobody(&bin);
    let (checked, started) = agree(&d, &nobody);
    assert!(!started);
    assert!(checked.stderr.contains("master key"), "{}", checked.stderr);

    // The same key, passed by systemd (LoadCredential=) into a folder nobody reads.
    let creds = tempfile::tempdir().unwrap();
    std::fs::set_permissions(creds.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cred = creds.path().join("master.key");
    std::fs::write(&cred, key.as_bytes()).unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o400)).unwrap();
    chown(&cred);
    let with_creds = || {
        let mut c = nobody();
        c.env("CREDENTIALS_DIRECTORY", creds.path());
        c
    };
    let (checked, started) = agree(&d, &with_creds);
    assert!(started, "{}", checked.stderr);
    let mut root = as_root();
    root.env("CREDENTIALS_DIRECTORY", creds.path());
    let checked = check(root, &d.config_path, &["--as-user", "nobody"]);
    assert_eq!(checked.code, 0, "{}", checked.stderr);
}

/// A Redis password file others may read is refused like a master key others may
/// read: serve refuses, the check says why; at 0600 both start.
#[test]
fn a_password_file_others_may_read_is_refused() {
    const PASSWORD: &str = "pw-CANARY-9c2e4f1a";
    let server = common::start_server(
        tempfile::tempdir().unwrap(),
        &[
            "--port".into(),
            "{port}".into(),
            "--requirepass".into(),
            PASSWORD.into(),
        ],
    );
    let d = TestDaemon::prepare(
        Mode::Embedded,
        None,
        None,
        &format!(
            "[redis]\nurl = \"redis://127.0.0.1:{}/0\"\npassword_file = \"redis.password\"\n",
            server.port
        ),
        &[],
    );
    let file = d.path("redis.password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (checked, started) = agree(&d, &as_root);
    assert!(!started);
    assert!(
        checked.stderr.contains("redis.password_file") && checked.stderr.contains("644"),
        "{}",
        checked.stderr
    );
    assert!(!checked.stderr.contains(PASSWORD), "{}", checked.stderr);
    assert!(!d.path("data").exists(), "a refused start creates nothing");

    // Owned by another user (not root, not the service user): refused too.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&file, Some(common::NOBODY), None).unwrap();
    let (checked, started) = agree(&d, &as_root);
    assert!(!started);
    assert!(
        checked.stderr.contains("owned by uid"),
        "{}",
        checked.stderr
    );

    std::os::unix::fs::chown(&file, Some(0), None).unwrap();
    let (checked, started) = agree(&d, &as_root);
    assert!(started, "{}", checked.stderr);
}

/// No sentinel answers, but a key file is there: as with Redis down, serve starts
/// (and finds the master once a sentinel answers); the check warns.
#[test]
fn sentinels_down_with_a_key_file_start() {
    let key = apikeyd::keys::MasterKey::generate_base64();
    let d = TestDaemon::prepare(
        Mode::Embedded,
        None,
        Some(key.as_bytes().to_vec()),
        &format!(
            "[redis]\nurl = \"redis://placeholder/0\"\nsentinels = [\"127.0.0.1:{}\"]\nmaster_name = \"mymaster\"\n",
            common::free_port()
        ),
        &[],
    );
    let (checked, started) = agree(&d, &as_root);
    assert!(started);
    assert!(
        checked.stderr.contains("warning:") && checked.stderr.contains("sentinel"),
        "{}",
        checked.stderr
    );
}

/// The check reads Redis and writes nothing there (serve records its key check
/// values when it starts; the check must not), and creates no file.
#[test]
fn the_check_changes_nothing_in_redis_or_on_disk() {
    let redis = RedisServer::start();
    let key = apikeyd::keys::MasterKey::generate_base64();
    let d = TestDaemon::prepare(
        Mode::Redis,
        Some(redis.clone()),
        Some(key.as_bytes().to_vec()),
        "",
        &[],
    );
    let before = common::files_below(d.dir.path());
    let checked = check(as_root(), &d.config_path, &[]);
    assert_eq!(checked.code, 0, "{}", checked.stderr);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.conn())
        .unwrap();
    assert!(keys.is_empty(), "the check wrote {keys:?}");
    assert_eq!(common::files_below(d.dir.path()), before);
    // serve on the same config records them.
    let (started, _) = serve(as_root(), &d.config_path, &d.socket);
    assert!(started);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.conn())
        .unwrap();
    assert!(keys.iter().any(|k| k.contains("keycheck")), "{keys:?}");
}
