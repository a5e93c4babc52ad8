"""Client tests of the daemon's later additions: pool key health (report_key_result,
enable_pool_key), integer ids on the wire, `service` in default_key_limit_error."""

from __future__ import annotations

import asyncio
import time

import pytest

import apikeyd
from apikeyd import manage_api_keys as m

POOL_KEY = "sk-pool-SECRET-9876543210fedcba"
USER_KEY = "sk-user-SECRET-0123456789abcdef"


def test_report_key_result_cools_and_disables_pool_keys(daemon):
    c = daemon.client()
    kid = c.add_pool_key(service="openai", key=POOL_KEY)["key_id"]
    r = c.get_pool_api_key(service="openai")
    assert r["key"] == POOL_KEY and r.get("key_id") == kid

    ok = c.report_key_result(service="openai", key_id=kid, outcome="ok")
    assert ok == {"recorded": True, "state": "active", "cooling_until": None}

    before = int(time.time())
    cool = c.report_key_result(service="openai", key_id=kid, outcome="rate_limited", retry_after_s=30)
    assert cool["recorded"] is True and cool["state"] == "cooling"
    assert before + 29 <= cool["cooling_until"] <= int(time.time()) + 31
    shorter = c.report_key_result(service="openai", key_id=kid, outcome="rate_limited", retry_after_s=1)
    assert shorter["cooling_until"] >= cool["cooling_until"]  # never shortened
    empty = c.get_pool_api_key(service="openai")
    assert empty["key"] is None

    off = c.report_key_result(service="openai", key_id=kid, outcome="unauthorized")
    assert off["state"] == "disabled"
    assert c.enable_pool_key(service="openai", key_id=kid) == {"enabled": True}

    unknown = c.report_key_result(service="openai", key_id="0000000000000000", outcome="ok")
    assert unknown["recorded"] is False and unknown["state"] is None
    with pytest.raises(apikeyd.BadRequest):
        c.report_key_result(service="openai", key_id=kid, outcome="meh")
    with pytest.raises(apikeyd.BadRequest):
        c.report_key_result(service="openai", key_id=kid, outcome="rate_limited", retry_after_s=-1)


def test_report_on_a_channel_pool_and_a_user_key_async(daemon):
    async def main():
        a = daemon.aclient()
        kid = (await a.add_pool_key(service="openai", key=POOL_KEY, channel_id=77))["key_id"]
        r = await a.report_key_result(service="openai", key_id=kid, channel_id=77, outcome="rate_limited")
        assert r["state"] == "cooling"
        assert (await a.enable_pool_key(service="openai", key_id=kid, channel_id=77))["enabled"] in (True, False)
        await a.set_user_api_key(user_id=5, service="openai", key=USER_KEY)
        r = await a.report_key_result(service="openai", user_id=5, outcome="unauthorized")
        assert r["recorded"] is True
        got = await a.get_user_api_key(user_id=5, service="openai", fallback_to_config=False)
        assert got["key"] != USER_KEY and "warning" in got
        await a.close()

    asyncio.run(main())


def test_drop_in_report_key_result(daemon):
    m.configure(daemon.socket)
    try:
        admin = daemon.client()
        kid = admin.add_pool_key(service="openai", key=POOL_KEY)["key_id"]
        r = asyncio.run(m.report_key_result("openai", "error", key_id=kid))
        assert r["recorded"] is True and r["state"] in ("active", "cooling")
    finally:
        m.configure(None)


def test_default_key_limit_error_names_the_service(daemon):
    msg = daemon.client().default_key_limit_error(tool_name="web", current=20, limit=20, service="openai")["message"]
    assert "set_user_api_key openai" in msg and "<service>" not in msg
    plain = daemon.client().default_key_limit_error(tool_name="web", current=20, limit=20)["message"]
    assert "<service>" not in plain


def test_daemon_accepts_integer_ids_on_the_wire(daemon):
    # The client sends strings; the daemon must also take JSON integers.
    r = daemon.client().call("get_user_api_key", user_id="1", service="openai")
    assert "key" in r
    import json
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket)
    s.sendall(json.dumps({"op": "get_user_api_key", "user_id": 123456789012345678, "service": "openai",
                          "channel_id": 7}).encode() + b"\n")
    assert json.loads(s.makefile().readline())["ok"] is True
    s.close()
