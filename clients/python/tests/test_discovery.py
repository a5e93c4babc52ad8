"""Finding the daemon as the command line does, and the errors when it is not there."""

from __future__ import annotations

import os
import pytest

import apikeyd
from apikeyd._discover import DEFAULT_SOCKET, discover
from test_errors import _as_nobody


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("APIKEYD_SOCKET", raising=False)
    monkeypatch.delenv("APIKEYD_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_order_of_places(clean_env, monkeypatch):
    tmp = clean_env
    assert discover().path == DEFAULT_SOCKET
    (tmp / "config.toml").write_text('log.level = "info"\n')  # the daemon's default socket
    assert discover().path == str(tmp / "run" / "apikeyd.sock")
    (tmp / "config.toml").write_text('[server]\nsocket = "s/d.sock"\n')
    assert discover().path == str(tmp / "s" / "d.sock")
    other = tmp / "etc"
    other.mkdir()
    (other / "c.toml").write_text('[server]\nsocket = "/abs/x.sock"\n')
    monkeypatch.setenv("APIKEYD_CONFIG", str(other / "c.toml"))
    assert discover().path == "/abs/x.sock"
    (other / "c.toml").write_text('server.socket = "rel.sock"\n')
    assert discover().path == str(other / "rel.sock")
    monkeypatch.setenv("APIKEYD_SOCKET", "/env.sock")
    assert discover().path == "/env.sock"
    assert discover("/arg.sock").path == "/arg.sock"


def test_the_readme_daemon_is_found_from_its_folder(embedded_harness, monkeypatch):
    # The README starts `apikeyd serve` in the checkout with ./config.toml.
    d = embedded_harness.daemon()
    monkeypatch.delenv("APIKEYD_SOCKET", raising=False)
    monkeypatch.delenv("APIKEYD_CONFIG", raising=False)
    monkeypatch.chdir(d.dir)
    assert apikeyd.Client().ping()["pong"] is True


def test_a_missing_socket_names_every_place(clean_env):
    c = apikeyd.Client(connect_timeout=0.05)
    with pytest.raises(apikeyd.DaemonUnreachable) as e:
        c.ping()
    text = str(e.value)
    for part in ["$APIKEYD_SOCKET", "$APIKEYD_CONFIG", "config.toml", DEFAULT_SOCKET]:
        assert part in text
    assert isinstance(e.value, ConnectionError) and not e.value.maybe_applied


def test_permission_denied_names_the_group(daemon):
    os.chmod(daemon.socket, 0o660)
    gid = os.stat(daemon.socket).st_gid
    r = _as_nobody(daemon.socket, """
        c = apikeyd.Client(c.socket_path, connect_timeout=0.2)
        try:
            c.ping()
        except apikeyd.PermissionDenied as e:
            assert isinstance(e, apikeyd.DaemonUnreachable) and isinstance(e, ConnectionError)
            print(e)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "must be in the group" in r.stdout and str(gid) in r.stdout, r.stdout


def test_async_calls_with_the_daemon_stopped_say_unreachable_not_timeout(clean_env):
    import asyncio

    async def main():
        async with apikeyd.AsyncClient(timeout=0.3, connect_timeout=0.3) as a:
            with pytest.raises(apikeyd.DaemonUnreachable) as e:
                await a.ping()
            assert DEFAULT_SOCKET in str(e.value) and "$APIKEYD_SOCKET" in str(e.value)
            with pytest.raises(apikeyd.DaemonUnreachable) as e:
                await a.consume_default_key_usage(user_id="u", tool_name="t", timeout=0.1)
            assert not e.value.maybe_applied

    asyncio.run(main())
