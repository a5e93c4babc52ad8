//! The operator's path (docs/operations.md, "Running it"): start-up errors that are
//! never silent, refusals before the socket is bound, `check-config`, `call` exit
//! codes and socket choice, default keys from systemd credentials, help, completions
//! and the man page.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Mode, RedisServer, TestDaemon};
use serde_json::json;

/// Runs the built binary with `args` in `dir`, without the caller's apikeyd variables.
fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(common::bin())
        .args(args)
        .current_dir(dir)
        .env_remove("APIKEYD_CONFIG")
        .env_remove("APIKEYD_SOCKET")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .expect("run apikeyd")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A free loopback TCP port nobody listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn a_bad_log_level_is_an_error_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[log]\nlevel = \"verbose\"\n",
    )
    .unwrap();
    let out = run(dir.path(), &["serve", "--config", "config.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("log.level") && err.contains("verbose"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists(), "nothing bound");
}

#[test]
fn a_refusal_reaches_stderr_even_with_logging_off() {
    let dir = tempfile::tempdir().unwrap();
    // The keystore path is a folder: the start is refused after logging is set up.
    std::fs::create_dir_all(dir.path().join("data/keystore.sqlite3")).unwrap();
    std::fs::write(dir.path().join("config.toml"), "[log]\nlevel = \"off\"\n").unwrap();
    let out = run(dir.path(), &["serve", "--config", "config.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("refusing to start") && err.contains("keystore"),
        "{err}"
    );
}

#[test]
fn refusals_come_before_the_socket_is_bound() {
    // A Redis URL that is no URL: phrased for people, no error kind, exit 2.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[redis]\nurl = \"localhost:6379\"\n",
    )
    .unwrap();
    let out = run(dir.path(), &["serve", "--config", "config.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("redis.url") && err.contains("redis://"),
        "{err}"
    );
    assert!(!err.contains("InvalidClientConfig"), "{err}");
    assert!(!dir.path().join("run/apikeyd.sock").exists());

    // An audit file that cannot be opened: refused, never "listening", no socket.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("not-a-folder"), "").unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[log]\naudit_file = \"not-a-folder/audit.jsonl\"\n",
    )
    .unwrap();
    let out = run(dir.path(), &["serve", "--config", "config.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("log.audit_file"), "{err}");
    assert!(!err.contains("listening"), "{err}");
    assert!(!dir.path().join("run/apikeyd.sock").exists());
}

#[test]
fn a_refused_redis_connection_is_not_called_a_timeout() {
    let port = closed_port();
    // A key is there already: without one, a start is refused while Redis cannot be
    // asked whether a fleet's key exists (tests/fleet.rs).
    let d = TestDaemon::start_with_key(&format!("[redis]\nurl = \"redis://127.0.0.1:{port}/0\"\n"));
    common::eventually(
        "the connection down, logged",
        std::time::Duration::from_secs(10),
        || d.logs().contains("redis connection is down"),
    );
    let log = d.logs();
    let line = log
        .lines()
        .find(|l| l.contains("redis connection is down"))
        .unwrap();
    assert!(line.contains("refused"), "{line}");
    assert!(!line.contains("timed out"), "{line}");
}

fn write_config(dir: &Path, text: &str) {
    std::fs::write(dir.join("config.toml"), text).unwrap();
}

#[test]
fn check_config_passes_a_good_config_without_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "[access]\nallow_gids = [\"nogroup\", 5]\n");
    let out = run(dir.path(), &["check-config", "--config", "config.toml"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("[server]") && stdout.contains("allow_gids"),
        "{stdout}"
    );
    assert!(stderr.contains("would start"), "{stderr}");
    for p in ["run", "data"] {
        assert!(!dir.path().join(p).exists(), "check-config created {p}");
    }

    // Against a keystore and key that serve created: still fine.
    let d = TestDaemon::start();
    d.client()
        .ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-check-0000001"}));
    let out = run(d.dir.path(), &["check-config", "--config", "config.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("listening"),
        "notes the running daemon"
    );
}

#[test]
fn check_config_lists_every_problem() {
    let redis = RedisServer::start();
    let mut d = TestDaemon::start_with(Mode::Embedded, "", &[]);
    d.client()
        .ok(json!({"op": "set_user_api_key", "user_id": "u", "service": "openai", "key": "sk-check-0000002"}));
    assert!(d.stop().success());
    // A password in the URL is refused (it belongs in redis.password_file), and
    // never shown.
    let port = closed_port();
    write_config(
        d.dir.path(),
        &format!("[redis]\nurl = \"redis://:hunter2pw@127.0.0.1:{port}/0\"\n"),
    );
    let out = run(d.dir.path(), &["check-config", "--config", "config.toml"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    // A config error: 2, as serve exits.
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("holds a password"), "{stderr}");
    assert!(
        !stdout.contains("hunter2pw") && !stderr.contains("hunter2pw"),
        "{stdout}{stderr}"
    );
    // A key file others may read and Redis down: both listed, Redis as a warning
    // (with a key file there, serve starts while Redis is down).
    let key = d.path("data/master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    write_config(
        d.dir.path(),
        &format!("[redis]\nurl = \"redis://127.0.0.1:{port}/0\"\n"),
    );
    let out = run(d.dir.path(), &["check-config", "--config", "config.toml"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("readable by group or others"), "{stderr}");
    assert!(
        stderr.contains("warning: Redis") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(stderr.contains("1 problem(s)"), "{stderr}");
    assert!(!d.socket.exists(), "nothing bound");

    // A key that does not open the keystore.
    std::fs::remove_file(&key).unwrap();
    assert!(run(d.dir.path(), &["keygen", "--out", "data/master.key"])
        .status
        .success());
    write_config(
        d.dir.path(),
        &format!("[redis]\nurl = \"{}\"\n", redis.url()),
    );
    let out = run(d.dir.path(), &["check-config", "--config", "config.toml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does not decrypt this keystore"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 problem(s)"),
        "Redis is reachable: {stderr}"
    );

    // TOML that does not parse.
    write_config(d.dir.path(), "[server\n");
    let out = run(d.dir.path(), &["check-config", "--config", "config.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("problem:"));
}

#[test]
fn call_exit_codes_and_socket_choice() {
    let d = TestDaemon::start_with(Mode::Embedded, "[server]\nmax_line_bytes = 100\n", &[]);
    let sock = d.socket.to_str().unwrap().to_string();
    // A broken config does not matter when the socket is given.
    write_config(d.dir.path(), "this is not toml");
    let out = run(
        d.dir.path(),
        &["call", "--socket", &sock, r#"{"op":"ping"}"#],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = Command::new(common::bin())
        .args(["call", r#"{"op":"ping"}"#])
        .current_dir(d.dir.path())
        .env("APIKEYD_SOCKET", &sock)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "$APIKEYD_SOCKET: {}",
        text(&out.stderr)
    );
    // Any error answer: 1, including too_large.
    let out = run(
        d.dir.path(),
        &["call", "--socket", &sock, r#"{"op":"nope"}"#],
    );
    assert_eq!(out.status.code(), Some(1));
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(200));
    let out = run(
        d.dir.path(),
        &["call", "--socket", &sock, &big, r#"{"op":"ping"}"#],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("too_large"));
    // Unreachable: 2.
    let out = run(
        d.dir.path(),
        &[
            "call",
            "--socket",
            "/nonexistent/apikeyd.sock",
            r#"{"op":"ping"}"#,
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is `apikeyd serve` running"));
    // The help says so.
    let help = text(&run(d.dir.path(), &["call", "--help"]).stdout);
    assert!(
        help.contains("Exit codes") && help.contains("APIKEYD_SOCKET"),
        "{help}"
    );
}

#[test]
fn call_without_access_to_the_socket_says_so() {
    common::need_root();
    let d = TestDaemon::start();
    // The folder lets nobody in, the socket (0660 root) does not.
    let bin = common::client_for_others(&d);
    let out = common::output_as(&bin, &d.socket, &[], &[json!({"op": "ping"})]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("lacks access"), "{err}");
    assert!(!err.contains("is `apikeyd serve` running"), "{err}");
}

#[test]
fn a_default_key_can_come_from_a_systemd_credential() {
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(
        creds.path().join("OPENAI_API_KEY"),
        "sk-from-credential-01\n",
    )
    .unwrap();
    let d = TestDaemon::start_with(
        Mode::Embedded,
        "",
        &[("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())],
    );
    let r = d
        .client()
        .ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    assert_eq!(r["key"], "sk-from-credential-01");
    assert_eq!(r["source"], "config");
    // The environment variable wins when set.
    let d = TestDaemon::start_with(
        Mode::Embedded,
        "",
        &[
            ("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap()),
            ("OPENAI_API_KEY", "sk-from-environment-1"),
        ],
    );
    let r = d
        .client()
        .ok(json!({"op": "get_user_api_key", "user_id": "u", "service": "openai"}));
    assert_eq!(r["key"], "sk-from-environment-1");
}

#[test]
fn help_completions_and_man_page() {
    let dir = tempfile::tempdir().unwrap();
    // The load generator is a binary of its own, not a subcommand of the daemon.
    let out = Command::new(env!("CARGO_BIN_EXE_apikeyd-bench"))
        .arg("--help")
        .output()
        .expect("run apikeyd-bench");
    let bench = text(&out.stdout);
    assert!(bench.contains("`{N}` becomes a key index"), "{bench}");
    assert_eq!(run(dir.path(), &["bench", "--help"]).status.code(), Some(2));
    for shell in ["bash", "zsh", "fish"] {
        let out = run(dir.path(), &["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        assert!(
            script.contains("check-config") && script.contains("rotate-master-key"),
            "{shell}: {script}"
        );
    }
    let out = run(dir.path(), &["man"]);
    assert!(out.status.success());
    let man = text(&out.stdout);
    assert!(
        man.contains(".TH apikeyd 1") && man.contains("check\\-config"),
        "{man}"
    );
    let out = run(dir.path(), &["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// Prepares a folder for a case and answers the config text.
type Setup<'a> = dyn Fn(&Path) -> String + 'a;

/// Each refusal at the socket stage: exit 1, one line on stderr (no panic, with or
/// without RUST_BACKTRACE), and nothing created (no master key, no keystore).
#[test]
fn socket_refusals_come_before_anything_is_created() {
    let live = TestDaemon::start();
    let cases: [(&str, &Setup<'_>); 3] = [
        ("exists and is not a socket", &|dir: &Path| {
            std::fs::create_dir(dir.join("run")).unwrap();
            std::fs::write(dir.join("run/apikeyd.sock"), "a file").unwrap();
            String::new()
        }),
        ("writable by everyone", &|dir: &Path| {
            std::fs::create_dir(dir.join("run")).unwrap();
            std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o777))
                .unwrap();
            String::new()
        }),
        ("another daemon is listening", &|_: &Path| {
            format!("server.socket = {:?}\n", live.socket)
        }),
    ];
    for (why, setup) in cases {
        for backtrace in [None, Some("1")] {
            let dir = tempfile::tempdir().unwrap();
            write_config(dir.path(), &setup(dir.path()));
            let mut cmd = Command::new(common::bin());
            cmd.args(["serve", "--config", "config.toml"])
                .current_dir(dir.path())
                .env_remove("APIKEYD_CONFIG")
                .env_remove("CREDENTIALS_DIRECTORY")
                .env_remove("RUST_BACKTRACE")
                .stdin(Stdio::null());
            if let Some(b) = backtrace {
                cmd.env("RUST_BACKTRACE", b);
            }
            let out = cmd.output().unwrap();
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{why}: {err}");
            assert_eq!(err.lines().count(), 1, "{why}: one line: {err}");
            assert!(
                err.contains("refusing to start") && err.contains(why),
                "{why}: {err}"
            );
            assert!(!err.contains("panicked"), "{why}: {err}");
            assert!(!dir.path().join("data").exists(), "{why}: created data/");
        }
    }
    assert_eq!(
        live.client().ok(json!({"op": "ping"}))["pong"],
        true,
        "the live daemon still serves"
    );
}

/// `reload` names every restart-only setting changed since the start, at every
/// reload until a restart; a config that cannot be used answers `bad_config` with
/// the problem (and SIGHUP logs the same), and nothing changes.
#[test]
fn reload_answers_its_warnings_and_bad_config() {
    let mut d = TestDaemon::start();
    let mut c = d.client();
    let reload = json!({"op": "reload"});
    let r = c.ok(reload.clone());
    assert_eq!(r["warnings"], json!([]), "{r}");

    d.write_config("[server]\nmax_connections = 7\n");
    for _ in 0..2 {
        let r = c.ok(reload.clone());
        let warnings = r["warnings"].as_array().expect("warnings").clone();
        assert_eq!(warnings.len(), 1, "{r}");
        assert!(
            warnings[0]
                .as_str()
                .unwrap()
                .contains("server.max_connections")
                && warnings[0].as_str().unwrap().contains("needs a restart"),
            "{r}"
        );
    }
    d.write_config("");
    assert_eq!(c.ok(reload.clone())["warnings"], json!([]));

    let bad_level = "[log]\nlevel = \"verbose\"\n";
    std::fs::write(&d.config_path, bad_level).unwrap();
    let (code, message) = c.err(reload.clone());
    assert_eq!(code, "bad_config");
    assert!(
        message.contains("log.level") && message.contains("verbose"),
        "{message}"
    );
    std::fs::write(&d.config_path, "[server\n").unwrap();
    let (code, _) = c.err(reload.clone());
    assert_eq!(code, "bad_config");

    // SIGHUP: the same problem in the log, and the daemon serves on.
    std::fs::write(&d.config_path, bad_level).unwrap();
    d.signal(libc::SIGHUP);
    common::eventually(
        "the reload failure naming log.level, logged",
        std::time::Duration::from_secs(10),
        || {
            d.logs()
                .lines()
                .any(|l| l.contains("reload failed") && l.contains("log.level"))
        },
    );
    assert_eq!(c.ok(json!({"op": "ping"}))["pong"], true);
    assert!(d.stop().success());
}
