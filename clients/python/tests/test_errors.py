"""Every error class: provoked on the real daemon where it honestly can be, and the
wire-to-exception mapping of crafted answers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

import apikeyd
from fake_daemon import FakeDaemon

KEY = "sk-user-SECRET-0123456789abcdef"


def test_bad_request_and_unknown_op(daemon):
    c = daemon.client()
    with pytest.raises(apikeyd.BadRequest) as e:
        c.get_user_api_key(user_id="has space", service="openai")
    assert e.value.code == "bad_request" and "user_id" in e.value.message
    with pytest.raises(apikeyd.BadRequest):
        c.check_default_key_limit(user_id="u", tool_name="t", daily_limit=-1)
    with pytest.raises(apikeyd.UnknownOp) as e:
        c.call("frobnicate")
    assert e.value.code == "unknown_op"
    assert c.ping()["pong"] is True  # the connection survived both


def test_too_large_closes_and_the_client_carries_on(daemon):
    c = daemon.client()
    with pytest.raises(apikeyd.TooLarge) as e:
        c.set_user_api_key(user_id="u", service="openai", key="k" * 70000)
    assert e.value.code == "too_large" and "kkkk" not in str(e.value)
    assert c.ping()["pong"] is True

    async def main():
        a = daemon.aclient(connections=1)
        with pytest.raises(apikeyd.TooLarge):
            await a.call("ping", pad="x" * 70000)
        assert (await a.ping())["pong"] is True
        await a.close()

    asyncio.run(main())


def test_unavailable_when_redis_is_killed(redis_harness):
    d = redis_harness.daemon()
    c = d.client()
    assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"count": 1}
    d.redis.kill()
    with pytest.raises(apikeyd.Unavailable) as e:
        c.increment_default_key_usage(user_id="u", tool_name="t")
    assert e.value.code == "unavailable"
    r = c.check_default_key_limit(user_id="u", tool_name="t")
    assert r.get("degraded") is True and r["allowed"] is False

    async def main():
        a = d.aclient()
        with pytest.raises(apikeyd.Unavailable):
            await a.increment_default_key_usage(user_id="u", tool_name="t")
        await a.close()

    asyncio.run(main())


def test_bad_config_when_reload_reads_a_broken_config(embedded_harness):
    d = embedded_harness.daemon()
    c = d.client()
    good = d.config_text()
    d.write_config("this is [ not toml\n")
    with pytest.raises(apikeyd.BadConfig) as e:
        c.reload()
    assert e.value.code == "bad_config"
    d.write_config(good)
    assert c.reload()["reloaded"] is True


def _python_for_nobody() -> str:
    """A python3 that uid 65534 can run (a venv under /root may not be reachable)."""
    cands = [os.path.realpath(sys.executable), "/usr/bin/python3", shutil.which("python3") or ""]
    for exe in cands:
        if exe and subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", exe, "-c", "pass"],
            capture_output=True,
        ).returncode == 0:
            return exe
    pytest.fail("no python3 that uid 65534 can run; install python3 system-wide (apt-get install python3)")


def _as_nobody(socket_path: str, body: str) -> subprocess.CompletedProcess:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv is missing; install util-linux (apt-get install util-linux)")
    pkg = os.path.dirname(apikeyd.__file__)
    tmp = tempfile.mkdtemp(prefix="apikeyd-py-nobody")
    try:
        os.chmod(tmp, 0o755)
        shutil.copytree(pkg, os.path.join(tmp, "apikeyd"), ignore=shutil.ignore_patterns("__pycache__"))
        for root, dirs, files in os.walk(tmp):
            for n in dirs:
                os.chmod(os.path.join(root, n), 0o755)
            for n in files:
                os.chmod(os.path.join(root, n), 0o644)
        script = "import apikeyd, json\nc = apikeyd.Client(%r)\n" % socket_path + textwrap.dedent(body)
        return subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", _python_for_nobody(), "-c", script],
            capture_output=True, text=True, timeout=60,
            env={"PYTHONPATH": tmp, "PYTHONDONTWRITEBYTECODE": "1", "PATH": os.environ.get("PATH", "")},
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_forbidden_for_a_refused_peer_and_for_a_non_admin_op(embedded_harness):
    refused = embedded_harness.daemon()
    p = _as_nobody(refused.socket, """
        import asyncio
        out = []
        try:
            c.ping()
        except apikeyd.Forbidden as e:
            out.append(e.code)

        async def main():
            a = apikeyd.AsyncClient(c.socket_path)
            try:
                await a.ping()
            except apikeyd.Forbidden as e:
                out.append(e.code)

        asyncio.run(main())
        print(json.dumps(out))
    """)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == ["forbidden", "forbidden"]

    allowed = embedded_harness.daemon(extra="[access]\nallow_uids = [65534]\n")
    p = _as_nobody(allowed.socket, """
        out = [c.ping()["pong"]]
        try:
            c.add_pool_key(service="openai", key="sk-nobody-0123456789")
        except apikeyd.Forbidden as e:
            out.append(e.code)
        out.append(c.ping()["pong"])  # a per-op refusal leaves the connection open
        print(json.dumps(out))
    """)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [True, "forbidden", True]


@pytest.mark.parametrize(
    "code,cls",
    [("bad_request", apikeyd.BadRequest), ("unknown_op", apikeyd.UnknownOp), ("forbidden", apikeyd.Forbidden),
     ("too_large", apikeyd.TooLarge), ("unavailable", apikeyd.Unavailable), ("bad_config", apikeyd.BadConfig),
     ("internal", apikeyd.Internal)],
)
def test_each_wire_code_maps_to_its_class(code, cls):
    def answer(req):
        return json.dumps({"id": req["id"], "ok": False, "error": {"code": code, "message": "m"}}).encode() + b"\n"

    fake = FakeDaemon([answer])
    try:
        with pytest.raises(cls) as e:
            apikeyd.Client(fake.path).ping()
        assert (e.value.code, e.value.message) == (code, "m")
        assert isinstance(e.value, apikeyd.Error)

        async def main():
            with pytest.raises(cls):
                await apikeyd.AsyncClient(fake.path).ping()

        asyncio.run(main())
    finally:
        fake.close()


def test_unknown_code_and_a_mismatched_id():
    def answer(req):
        if req["op"] == "ping":
            return b'{"id":' + json.dumps(req["id"]).encode() + b',"ok":false,"error":{"code":"new_code","message":"m"}}\n'
        return b'{"id":"someone else","ok":true,"result":{}}\n'

    fake = FakeDaemon([answer])
    try:
        c = apikeyd.Client(fake.path)
        with pytest.raises(apikeyd.Error) as e:
            c.ping()
        assert type(e.value) is apikeyd.Error and e.value.code == "new_code"
        with pytest.raises(apikeyd.Internal, match="lost track"):
            c.stats()
    finally:
        fake.close()


def test_error_pickles_and_never_shows_parameters():
    e = apikeyd.Unavailable("store down")
    import pickle

    back = pickle.loads(pickle.dumps(e))
    assert (type(back), back.code, back.message) == (apikeyd.Unavailable, "unavailable", "store down")
    assert str(e) == "unavailable: store down"
