"""Fixtures: the real apikeyd binary in a temp folder, in embedded and Redis mode,
with a private redis-server per test (never the machine's shared one)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import apikeyd

REPO = Path(__file__).resolve().parents[3]
START_DEADLINE_S = 20.0


def apikeyd_bin() -> str:
    """$APIKEYD_BIN, else target/debug/apikeyd, else target/release/apikeyd."""
    env = os.environ.get("APIKEYD_BIN")
    if env:
        if not os.access(env, os.X_OK):
            pytest.fail(f"APIKEYD_BIN={env} is not an executable file")
        return env
    for kind in ("debug", "release"):
        p = REPO / "target" / kind / "apikeyd"
        if os.access(p, os.X_OK):
            return str(p)
    pytest.fail(
        f"no apikeyd binary: set APIKEYD_BIN, or build one with `cargo build` "
        f"(looked for {REPO}/target/debug/apikeyd and {REPO}/target/release/apikeyd)"
    )


def wait_until(pred, what: str, deadline_s: float = START_DEADLINE_S, on_fail=lambda: "") -> None:
    """Polls ``pred`` until it is true; fails with ``what`` after the deadline."""
    deadline = time.monotonic() + deadline_s
    delay = 0.002
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {deadline_s:g} s{on_fail()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class RedisServer:
    """A private redis-server on a Unix socket in its own temp dir, no persistence."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail(
                "redis-server is not installed; the Redis-mode tests need it: "
                "apt-get install redis-server (bash .ci/run installs it)"
            )
        self.exe = exe
        self.dir = tempfile.mkdtemp(prefix="apikeyd-py-redis")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis+unix://{self.socket}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}")
            return _accepts(self.socket, b"PING\r\n", b"+PONG")

        wait_until(up, "redis-server did not answer PING")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _accepts(path: str, probe: bytes, expect: bytes) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        s.sendall(probe)
        return s.recv(4096).startswith(expect)
    except OSError:
        return False
    finally:
        s.close()


class Daemon:
    """The real apikeyd in a temp folder; config paths relative to that folder."""

    def __init__(self, mode: str, redis: Optional[RedisServer] = None, *, idle_timeout_s: int = 300,
                 extra: str = "", env: Optional[Dict[str, str]] = None) -> None:
        self.mode = mode
        self.redis = redis
        self.bin = apikeyd_bin()
        self.dir = tempfile.mkdtemp(prefix="apikeyd-py")
        os.chmod(self.dir, 0o755)  # a setpriv'd client must reach the socket
        self.socket = os.path.join(self.dir, "apikeyd.sock")
        self.config = os.path.join(self.dir, "config.toml")
        self.log = os.path.join(self.dir, "daemon.log")
        self.idle_timeout_s = idle_timeout_s
        self.extra = extra
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.write_config()
        self.start()

    def config_text(self) -> str:
        top = 'log.level = "debug"\n'
        if self.redis is not None:
            top += f'redis.url = "{self.redis.url}"\n'
        return top + f"""
[server]
socket = "apikeyd.sock"
socket_mode = "0666"
idle_timeout_s = {self.idle_timeout_s}

[keystore]
path = "data/keystore.sqlite3"
master_key_file = "data/master.key"

[services.gitea]
base_url = "https://gitea.example.test"

{self.extra}
"""

    def write_config(self, text: Optional[str] = None) -> None:
        with open(self.config, "w") as f:
            f.write(self.config_text() if text is None else text)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APIKEYD_")}
        env.pop("CREDENTIALS_DIRECTORY", None)
        env.update(self.env)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.bin, "serve", "--config", self.config],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=self.dir,
            )

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"apikeyd exited with {self.proc.returncode} before it was ready; log:\n{self.logs()}")
            return _accepts(self.socket, b'{"op":"ping"}\n', b'{"id":null,"ok":true')

        wait_until(ready, "apikeyd did not answer ping", on_fail=lambda: f"; log:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def logs(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def client(self, **kw) -> apikeyd.Client:
        return apikeyd.Client(self.socket, **kw)

    def aclient(self, **kw) -> apikeyd.AsyncClient:
        return apikeyd.AsyncClient(self.socket, **kw)

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class Harness:
    """Starts daemons (and their Redis) for one test and cleans everything up."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.things: List = []

    def redis(self) -> RedisServer:
        r = RedisServer()
        self.things.append(r)
        return r

    def daemon(self, **kw) -> Daemon:
        redis = self.redis() if self.mode == "redis" else None
        d = Daemon(self.mode, redis, **kw)
        self.things.append(d)
        return d

    def close(self) -> None:
        for t in reversed(self.things):
            t.close()


@pytest.fixture(params=["embedded", "redis"])
def harness(request):
    h = Harness(request.param)
    yield h
    h.close()


@pytest.fixture
def daemon(harness) -> Daemon:
    """A daemon in each storage mode, with defaults."""
    return harness.daemon(env={"DEFAULTSVC_API_KEY": "sk-operator-default-000111"})


@pytest.fixture
def redis_harness():
    h = Harness("redis")
    yield h
    h.close()


@pytest.fixture
def embedded_harness():
    h = Harness("embedded")
    yield h
    h.close()


def require_idempotency(daemon: "Daemon") -> None:
    """Fails (never skips) unless the daemon deduplicates writes by idempotency key:
    the tests that call it prove exactly-once writes across restarts."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(daemon.socket)
        line = b'{"op":"consume_default_key_usage","user_id":"idem-probe","tool_name":"probe","idempotency_key":"probe-1"}\n'
        s.sendall(line + line)
        buf = b""
        while buf.count(b"\n") < 2:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    answers = [json.loads(x) for x in buf.split(b"\n") if x.strip()]
    if len(answers) != 2 or answers[1].get("replayed") is not True:
        pytest.fail(f"{daemon.bin} does not replay idempotency keys (answers: {answers}); "
                    "this test needs a daemon with idempotency keys")
