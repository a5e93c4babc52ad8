//! The test harness: `TestDaemon` runs the real `apikeyd` binary on a socket in a
//! temp dir; `Client` speaks JSON lines to it.
#![allow(dead_code)]

use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apikeyd::wire::client::{Connection, Timeouts};
use serde_json::{json, Value};

/// Where pools and quotas live for a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything in the daemon's SQLite file.
    Embedded,
    /// Pools and quotas in a private redis-server.
    Redis,
}

/// Runs each listed test body (a `fn(Mode)`) once per storage mode.
#[macro_export]
macro_rules! in_every_mode {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[test] fn $name() { super::$name($crate::common::Mode::Embedded) } )*
        }
        mod on_redis {
            $( #[test] fn $name() { super::$name($crate::common::Mode::Redis) } )*
        }
    };
}

/// A private redis-server on a Unix socket in its own temp dir, persistence off,
/// killed when dropped. Never the machine's shared instance.
pub struct RedisServer {
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Mutex<Option<Child>>,
    /// Append-only file with fsync on every write, for tests that restart Redis and
    /// expect acknowledged writes to survive.
    persistent: bool,
    /// Also listen on this loopback TCP port (for redis:// URLs).
    tcp_port: Option<u16>,
}

impl RedisServer {
    pub fn start() -> Arc<RedisServer> {
        Self::start_inner(false, None)
    }

    /// A server that persists every write (`appendfsync always`).
    pub fn start_persistent() -> Arc<RedisServer> {
        Self::start_inner(true, None)
    }

    /// A server that also listens on a free loopback TCP port; `url()` is then redis://.
    pub fn start_tcp() -> Arc<RedisServer> {
        Self::start_inner(false, Some(free_port()))
    }

    fn start_inner(persistent: bool, tcp_port: Option<u16>) -> Arc<RedisServer> {
        let dir = tempfile::Builder::new()
            .prefix("apikeyd-redis")
            .tempdir()
            .expect("temp dir");
        let r = RedisServer {
            socket: dir.path().join("redis.sock"),
            dir,
            child: Mutex::new(None),
            persistent,
            tcp_port,
        };
        r.spawn();
        Arc::new(r)
    }

    fn spawn(&self) {
        let aof: &[&str] = if self.persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let port = self.tcp_port.unwrap_or(0).to_string();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port, "--unixsocket"])
            .arg(&self.socket)
            .args(["--unixsocketperm", "700", "--save", ""])
            .args(aof)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); install it: apt-get install redis-server (bash .ci/run does)")
            });
        *self.child.lock().unwrap() = Some(child);
        eventually(
            "redis-server answers on its socket",
            Duration::from_secs(10),
            || UnixStream::connect(&self.socket).is_ok(),
        );
    }

    pub fn url(&self) -> String {
        match self.tcp_port {
            Some(port) => format!("redis://127.0.0.1:{port}/0"),
            None => format!("redis+unix://{}", self.socket.display()),
        }
    }

    /// A plain client connection for inspecting and editing what is stored.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .expect("connect to the test redis")
    }

    /// Kills the server (SIGKILL); with persistence off, its data is gone.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Starts the server again on the same socket (empty).
    pub fn restart(&self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One daemon process with its own folder, config, keystore and socket.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
    pub mode: Mode,
    /// Redis mode: the server this daemon uses (possibly shared with another daemon).
    pub redis: Option<Arc<RedisServer>>,
}

/// Config that keeps per-user keys in the daemon's SQLite keystore in Redis mode
/// (`keystore.user_keys = "local"`), for tests about the keystore itself. Put it
/// first in `extra` (a dotted key, before any table).
pub const LOCAL_USER_KEYS: &str = "keystore.user_keys = \"local\"\n";

/// The canary key that must never show up in logs or files.
pub const CANARY: &str = "sk-CANARY-7f3a9c1e5b2d8f4a6c0e";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_apikeyd")
}

impl TestDaemon {
    /// A daemon in embedded mode with the default config.
    pub fn start() -> Self {
        Self::start_with(Mode::Embedded, "", &[])
    }

    /// A daemon in `mode`, with `extra` appended to its config.toml and `env` set.
    /// `extra` starts at the top level: dotted keys such as `redis.prefix = "x"` may
    /// come first, then tables.
    pub fn start_with(mode: Mode, extra: &str, env: &[(&str, &str)]) -> Self {
        let redis = (mode == Mode::Redis).then(RedisServer::start);
        Self::prepare(mode, redis, None, extra, env).started()
    }

    /// A second daemon on the same Redis as `other`, with its own folder and keystore
    /// but `other`'s master key (daemons sharing a Redis share the key:
    /// docs/operations.md, "The master key in Redis mode").
    pub fn start_sharing(other: &TestDaemon, extra: &str) -> Self {
        let key = std::fs::read(other.path("data/master.key")).expect("master key");
        Self::prepare(Mode::Redis, other.redis.clone(), Some(key), extra, &[]).started()
    }

    /// An embedded-mode daemon whose data folder already holds a fresh master key, so
    /// that a start with a `redis.url` that cannot be asked is not refused for want
    /// of a key (tests/fleet.rs).
    pub fn start_with_key(extra: &str) -> Self {
        let key = apikeyd::keys::MasterKey::generate_base64();
        Self::prepare(
            Mode::Embedded,
            None,
            Some(key.as_bytes().to_vec()),
            extra,
            &[],
        )
        .started()
    }

    /// A daemon in Redis mode on `redis` (a server the test keeps, to stop or
    /// restart it), with `extra` appended to its config.toml and `env` set.
    pub fn start_on(redis: Arc<RedisServer>, extra: &str, env: &[(&str, &str)]) -> Self {
        Self::prepare(Mode::Redis, Some(redis), None, extra, env).started()
    }

    /// Starts a daemon made by [`TestDaemon::prepare`] and waits until it answers.
    pub fn started(mut self) -> Self {
        self.spawn();
        self.wait_ready();
        self
    }

    /// A daemon on `redis` whose data folder starts with `master_key` (when given),
    /// not yet started: for tests that expect a refusal, and (then `started`) for
    /// the other ways to start.
    pub fn prepare(
        mode: Mode,
        redis: Option<Arc<RedisServer>>,
        master_key: Option<Vec<u8>>,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("apikeyd-test")
            .tempdir()
            .expect("temp dir");
        let config_path = dir.path().join("config.toml");
        let log_path = dir.path().join("daemon.log");
        let d = TestDaemon {
            socket: dir.path().join("run/apikeyd.sock"),
            dir,
            config_path,
            log_path,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mode,
            redis,
        };
        if let Some(key) = master_key {
            std::fs::create_dir_all(d.path("data")).unwrap();
            std::fs::set_permissions(d.path("data"), std::fs::Permissions::from_mode(0o700))
                .unwrap();
            let f = d.path("data/master.key");
            std::fs::write(&f, key).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        d.write_config(extra);
        d
    }

    /// Writes config.toml: debug logging (so leak tests see everything), the Redis
    /// URL in Redis mode, then `extra`.
    pub fn write_config(&self, extra: &str) {
        let redis = match &self.redis {
            Some(r) => format!("redis.url = \"{}\"\n", r.url()),
            None => String::new(),
        };
        let text = format!("log.level = \"debug\"\n{redis}{extra}\n");
        std::fs::write(&self.config_path, text).expect("write config");
    }

    /// Starts the process (without waiting for it to be ready).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("APIKEYD_CONFIG")
            // The test hooks are on only where a test asks for them (`env`).
            .env_remove("APIKEYD_TEST_HOOKS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn apikeyd"));
    }

    /// Waits until the socket answers a ping; panics with the log if the process exits.
    pub fn wait_ready(&mut self) {
        eventually("apikeyd answers a ping", Duration::from_secs(20), || {
            if let Some(status) = self.try_wait() {
                panic!(
                    "apikeyd exited with {status} before it was ready; log:\n{}",
                    self.logs()
                );
            }
            Client::try_connect(&self.socket)
                .is_ok_and(|mut c| c.call(json!({"op": "ping"}))["ok"] == true)
        });
    }

    /// The exit status once the process has exited (it stays running otherwise).
    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("wait"))
    }

    /// Starts the process and expects it to refuse: returns its exit status and log.
    pub fn expect_refusal(&mut self) -> (ExitStatus, String) {
        self.spawn();
        let mut status = None;
        eventually("apikeyd refuses to start", Duration::from_secs(20), || {
            status = self.try_wait();
            status.is_some()
        });
        self.child = None;
        (status.expect("exited"), self.logs())
    }

    /// Sets an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we own.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }

    /// Waits for the process to exit (it is killed on drop if it does not).
    pub fn wait_exit(&mut self) -> ExitStatus {
        assert!(self.child.is_some(), "not running");
        let mut status = None;
        eventually("apikeyd exits", Duration::from_secs(20), || {
            status = self.try_wait();
            status.is_some()
        });
        self.child = None;
        status.expect("exited")
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }

    /// Starts the process again on the same folder and waits for it.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            assert!(self.stop().success());
        }
        self.spawn();
        self.wait_ready();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failing test shows what the daemon said, whichever check failed.
        if std::thread::panicking() {
            let log = self.logs();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL).collect();
            eprintln!("--- the daemon's log, last {} lines ---", tail.len());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// How much of a daemon's log a failing test prints.
const LOG_TAIL: usize = 60;

/// A JSON-lines connection: `apikeyd::wire::client::Connection` (the daemon's own client,
/// so framing is not written twice), with the assertions tests want.
pub struct Client {
    conn: Connection,
}

impl Client {
    pub fn try_connect(socket: &Path) -> std::io::Result<Client> {
        // A test that hangs should fail; a large write must wait for the daemon's
        // backpressure as long as it takes.
        let timeouts = Timeouts {
            connect: Duration::from_secs(30),
            read: Some(Duration::from_secs(30)),
            write: None,
        };
        Ok(Client {
            conn: Connection::connect(socket, timeouts)?,
        })
    }

    pub fn connect(socket: &Path) -> Client {
        Self::try_connect(socket).expect("connect to apikeyd")
    }

    /// The buffered reader, for reading raw response lines.
    pub fn reader(&mut self) -> &mut BufReader<UnixStream> {
        self.conn.reader()
    }

    /// Writes `batch` from another thread, so reading the answers meanwhile cannot
    /// deadlock against the daemon's backpressure (it stops reading a connection
    /// whose answers are not read). Join the handle after reading.
    pub fn send_in_background(
        &self,
        batch: impl Into<Vec<u8>>,
    ) -> std::thread::JoinHandle<std::io::Result<()>> {
        let mut w = self.try_clone_writer();
        let batch = batch.into();
        std::thread::spawn(move || w.write_all(&batch))
    }

    /// A second handle on the socket for writing from another thread.
    pub fn try_clone_writer(&self) -> UnixStream {
        self.conn.try_clone_writer().expect("clone socket")
    }

    /// Half-closes: the daemon sees EOF after what was sent.
    pub fn writer_shutdown(&mut self) {
        self.conn.shutdown_write().expect("shutdown");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.conn.send_raw(bytes).expect("write");
    }

    pub fn send(&mut self, req: &Value) {
        self.conn.send(&req.to_string()).expect("write");
    }

    /// The next response line, parsed; panics on EOF.
    pub fn recv(&mut self) -> Value {
        self.try_recv().expect("a response line, got EOF")
    }

    /// The next response line, or `None` on EOF.
    pub fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = self.conn.read_line_into(&mut line).expect("read");
        if n == 0 {
            return None;
        }
        assert!(
            line.ends_with('\n'),
            "response not newline-terminated: {line:?}"
        );
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}")))
    }

    /// Every response line until the daemon closes the connection. A close with
    /// requests still unread by the daemon arrives as ECONNRESET after the last
    /// response; that counts as closed too.
    pub fn recv_until_closed(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            match self.conn.read_line_into(&mut line) {
                Ok(0) => return out,
                Ok(_) => out.push(serde_json::from_str(&line).expect("a JSON response")),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Whether the daemon closed the connection (EOF on read).
    pub fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.conn.reader().read(&mut buf), Ok(0) | Err(_))
    }

    pub fn call(&mut self, req: Value) -> Value {
        self.send(&req);
        self.recv()
    }

    /// Calls and asserts success; returns `result`.
    pub fn ok(&mut self, req: Value) -> Value {
        let r = self.call(req.clone());
        assert_eq!(r["ok"], true, "request {req} failed: {r}");
        r["result"].clone()
    }

    /// Calls and asserts failure; returns (code, message).
    pub fn err(&mut self, req: Value) -> (String, String) {
        let r = self.call(req.clone());
        assert_eq!(r["ok"], false, "request {req} should fail: {r}");
        (
            r["error"]["code"].as_str().expect("code").to_string(),
            r["error"]["message"].as_str().expect("message").to_string(),
        )
    }
}

/// Every file below `dir`, read whole, with its path.
pub fn files_below(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out
}

/// Polls `f` until it is true, for at most `limit`, and answers how long it took;
/// past `limit` the test fails saying `what` was awaited. Every test that waits for
/// something the daemon does waits here: none sleeps a guessed time.
pub fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let began = Instant::now();
    while !f() {
        assert!(began.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(POLL);
    }
    began.elapsed()
}

/// How often [`eventually`] asks again.
const POLL: Duration = Duration::from_millis(5);

/// The string at `v` ("" when it is not one), for `contains` checks on answers.
pub fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs `cmd` and waits for it, running it again (a few times) when exec failed with
/// "Text file busy": a binary just copied for another user can still be open for
/// writing in a child that another test thread forked meanwhile (ETXTBSY).
pub fn output_retrying_busy(cmd: &mut Command) -> std::process::Output {
    let mut out = None;
    eventually(
        "the command runs (not ETXTBSY)",
        Duration::from_secs(10),
        || {
            let o = cmd.output().expect("run the command");
            let busy = String::from_utf8_lossy(&o.stderr).contains("Text file busy");
            out = Some(o);
            !busy
        },
    );
    out.expect("ran")
}

/// Runs `apikeyd <command> --config <config> <extra>…` (a tool beside the daemon)
/// to its end; answers its exit status and its stdout followed by its stderr.
pub fn tool(command: &str, config: &Path, extra: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(bin())
        .args([command, "--config"])
        .arg(config)
        .args(extra)
        .output()
        .expect("run apikeyd");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status, text)
}

/// The uid and gid clients are switched to (`nobody`/`nogroup`).
pub const NOBODY: u32 = 65534;

/// Asserts the suite runs as root, which switching clients to other uids needs.
pub fn need_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: it switches clients to other uids with setpriv"
    );
}

/// Lets other uids into the daemon's folders (not its socket) and copies the client
/// binary where they can run it.
pub fn client_for_others(d: &TestDaemon) -> PathBuf {
    for p in [d.dir.path().to_path_buf(), d.path("run")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let client = d.path("apikeyd-client");
    std::fs::copy(bin(), &client).unwrap();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
    client
}

/// Makes the socket reachable for other uids and copies the client binary where
/// they can run it.
pub fn open_up(d: &TestDaemon) -> PathBuf {
    let client = client_for_others(d);
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    client
}

/// `setpriv` set to run what follows as uid/gid nobody with exactly the
/// supplementary `groups` (none: cleared).
pub fn as_nobody(groups: &[u32]) -> Command {
    need_root();
    assert!(
        Command::new("setpriv").arg("--version").output().is_ok(),
        "setpriv (util-linux) is needed: apt-get install util-linux"
    );
    let mut cmd = Command::new("setpriv");
    cmd.args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}")]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd
}

/// Runs `apikeyd call` as nobody with `groups` (see [`as_nobody`]) and answers its
/// exit status and output.
pub fn output_as(
    bin: &Path,
    socket: &Path,
    groups: &[u32],
    requests: &[Value],
) -> std::process::Output {
    output_retrying_busy(
        as_nobody(groups)
            .arg(bin)
            .arg("call")
            .arg("--socket")
            .arg(socket)
            .args(requests.iter().map(|r| r.to_string())),
    )
}

/// Runs `apikeyd call` as uid/gid nobody with exactly the supplementary `groups`,
/// and answers the response lines.
pub fn call_as(bin: &Path, socket: &Path, groups: &[u32], requests: &[Value]) -> Vec<Value> {
    let out = output_as(bin, socket, groups, requests);
    if out.stdout.is_empty() {
        // Shown with the failing assertion: why the client printed nothing.
        eprintln!(
            "client as nobody printed nothing ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A redis-server on a loopback TCP port started with `args` (`{port}` stands for
/// the port), killed when dropped: for TLS, ACL and Sentinel set-ups.
pub struct Server {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback TCP port nothing listens on at the moment.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

pub fn start_server(dir: tempfile::TempDir, args: &[String]) -> Server {
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .args(args.iter().map(|a| a.replace("{port}", &port.to_string())))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot run redis-server ({e}); install it: apt-get install redis-server (bash .ci/run does)")
    });
    eventually(
        "redis-server answers on its port",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    Server {
        child,
        port,
        _dir: dir,
    }
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run openssl ({e}); install it: apt-get install openssl (bash .ci/run does)"
            )
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A redis-server speaking only TLS on a loopback port, with the certificates that
/// [`make_certificates`] wrote in `certs` (clients need not present one).
pub fn start_tls_server(certs: &Path) -> Server {
    let p = |f: &str| certs.join(f).display().to_string();
    start_server(
        tempfile::tempdir().expect("temp dir"),
        &[
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            "{port}".into(),
            "--tls-cert-file".into(),
            p("server.crt"),
            "--tls-key-file".into(),
            p("server.key"),
            "--tls-ca-cert-file".into(),
            p("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
        ],
    )
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`.
pub fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=apikeyd test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
}

/// A sentinel on a free loopback port watching the master at `master_port` as
/// `mymaster`; ready once it names that master.
pub fn start_sentinel(master_port: u16) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("sentinel.conf");
    let port = free_port();
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {master_port} 1\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let child = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}); install it: apt-get install redis-server (bash .ci/run does)")
        });
    let server = Server {
        child,
        port,
        _dir: dir,
    };
    eventually(
        "the sentinel names its master",
        Duration::from_secs(10),
        || {
            redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| {
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg("mymaster")
                        .query::<(String, String)>(&mut c)
                })
                .is_ok_and(|(_, p)| p == master_port.to_string())
        },
    );
    server
}

/// Lowers the open-file limit (RLIMIT_NOFILE, soft and hard) of process `pid` to
/// `n`, with `prlimit` (util-linux).
pub fn limit_descriptors(pid: i32, n: u64) {
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:{n}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run prlimit ({e}); install util-linux"));
    assert!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The resident memory of process `pid`, in kB (VmRSS).
pub fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the process's status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in the status")
}

/// Today as the daemon counts quotas, `YYYY-MM-DD` in UTC.
pub fn utc_day() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_string()
}
