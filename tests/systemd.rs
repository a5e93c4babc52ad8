//! systemd integration: the units verify, and a test that plays systemd — it passes a
//! listening socket as fd 3 with LISTEN_FDS/LISTEN_PID, listens on NOTIFY_SOCKET, and
//! checks READY=1, WATCHDOG=1, RELOADING=1 and STOPPING=1.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Client;
use serde_json::json;

#[test]
fn units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // verify checks that ExecStart exists: point it at the binary under test.
    let service = std::fs::read_to_string(root.join("systemd/apikeyd.service"))
        .unwrap()
        .replace("/usr/local/bin/apikeyd", common::bin());
    std::fs::write(dir.path().join("apikeyd.service"), service).unwrap();
    std::fs::copy(
        root.join("systemd/apikeyd.socket"),
        dir.path().join("apikeyd.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("apikeyd.service"))
        .arg(dir.path().join("apikeyd.socket"))
        .output()
        .expect("systemd-analyze is needed: apt-get install systemd (bash .ci/run does)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "systemd-analyze warns:\n{stderr}");
    let service = std::fs::read_to_string(root.join("systemd/apikeyd.service")).unwrap();
    for directive in [
        "Type=notify",
        "WatchdogSec=",
        "LoadCredential=master.key:",
        "ProtectSystem=strict",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=\n",
        "UMask=0077",
        "SystemCallFilter=@system-service",
        "EnvironmentFile=-/etc/apikeyd/env",
        "LimitNOFILE=",
        "Documentation=file:/usr/local/share/doc/apikeyd/operations.md",
    ] {
        assert!(
            service.contains(directive),
            "apikeyd.service lacks {directive:?}"
        );
    }
}

/// Reads notification datagrams (each `recv` waits up to the socket's read timeout)
/// until one contains `want`; keeps everything read in `log`.
fn wait_for(notify: &UnixDatagram, want: &str, log: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    common::eventually(want, Duration::from_secs(20), || {
        let Ok(n) = notify.recv(&mut buf) else {
            return false;
        };
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        let found = msg.lines().any(|l| l == want);
        log.push(msg);
        found
    });
}

#[test]
fn plays_systemd_socket_activation_and_notify() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = dir.path().join("config.toml");
    // server.socket points elsewhere: the daemon must use the passed socket instead.
    std::fs::write(
        &config,
        "log.level = \"debug\"\n[server]\nsocket = \"run/unused.sock\"\n",
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();

    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    // `exec` keeps the shell's pid, so $$ is the daemon's pid, as LISTEN_PID must be.
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" serve --config \"$1\""])
        .arg(common::bin())
        .arg(&config)
        .env("LISTEN_FDS", "1")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd != 3 && libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let flags = libc::fcntl(3, libc::F_GETFD);
            libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut seen = Vec::new();
    wait_for(&notify, "READY=1", &mut seen);

    // The daemon answers through the socket systemd passed, and did not bind its own.
    let mut c = Client::connect(&socket);
    assert_eq!(c.ok(json!({"op": "ping"}))["pong"], true);
    assert!(!dir.path().join("run/unused.sock").exists());
    wait_for(&notify, "WATCHDOG=1", &mut seen);
    wait_for(&notify, "WATCHDOG=1", &mut seen);

    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    wait_for(&notify, "RELOADING=1", &mut seen);
    let reloading = seen.last().unwrap().clone();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    wait_for(&notify, "READY=1", &mut seen);
    assert_eq!(
        c.ok(json!({"op": "ping"}))["pong"],
        true,
        "the connection survived the reload"
    );

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_for(&notify, "STOPPING=1", &mut seen);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        socket.exists(),
        "the socket file belongs to systemd and stays"
    );
}
