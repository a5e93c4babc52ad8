"""The drop-in's results say what the daemon said (Key, LimitCheck), its clients
close with their event loops, and misuse raises apikeyd errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle

import pytest

import apikeyd
from apikeyd import manage_api_keys as m
from conftest import wait_until

KEY = "sk-user-SECRET-0123456789abcdef"
POOL_KEY = "sk-pool-SECRET-9876543210fedcba"
DEFAULT_KEY = "sk-operator-default-000111"


@pytest.fixture
def configured(harness):
    d = harness.daemon(env={"DEFAULTSVC_API_KEY": DEFAULT_KEY}, extra="[quota]\ndaily_limit = 3\n")
    m.configure(d.socket)
    yield d
    m.configure(None)


def test_keys_carry_source_key_id_and_flags(configured):
    async def main():
        assert await m.set_user_api_key(1, "openai", KEY)
        own = await m.get_user_api_key(1, "openai")
        assert own == KEY and isinstance(own, str) and isinstance(own, apikeyd.Key)
        assert (own.source, own.key_id, own.degraded, own.warning) == ("user", None, False, None)
        assert KEY not in repr(own)
        assert own.startswith("sk-") and f"{own}" == KEY and pickle.loads(pickle.dumps(own)).source == "user"

        default = await m.get_user_api_key(2, "defaultsvc")
        assert default == DEFAULT_KEY and default.source == "config"

        admin = configured.aclient()
        added = await admin.add_pool_key(service="openai", key=POOL_KEY)
        await admin.aclose()
        pooled = await m.get_user_api_key(2, "openai")
        assert pooled == POOL_KEY and pooled.source == "global_pool" and pooled.key_id == added["key_id"]
        got = await m.get_pool_api_key("openai")
        assert got == POOL_KEY and got.key_id == added["key_id"]
        r = await m.report_key_result("openai", "ok", key_id=pooled.key_id)
        assert r["recorded"] is True

    asyncio.run(main())


def test_the_daemons_daily_limit_applies_and_limits_are_named_tuples(configured):
    async def main():
        c = await m.check_default_key_limit(5, "web", None)
        assert c == (True, 0, 3) and c.daily_limit == 3 and c.degraded is False
        allowed, count, limit = await m.consume_default_key_usage(5, "web")
        assert (allowed, count, limit) == (True, 1, 3)
        c = await m.check_default_key_limit(5, "web", None, 1)  # the caller's limit wins
        assert c == (False, 1, 1) and isinstance(c, tuple) and c._fields == ("allowed", "current_count", "daily_limit")

    asyncio.run(main())


def test_a_limit_read_while_redis_is_down_is_degraded(redis_harness):
    d = redis_harness.daemon()
    m.configure(d.socket)
    try:
        async def main():
            assert (await m.check_default_key_limit(5, "web", None)).degraded is False
            d.redis.kill()
            c = await m.check_default_key_limit(5, "web", None)
            assert c.degraded is True

        asyncio.run(main())
    finally:
        m.configure(None)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_per_loop_clients_close_with_their_loop(configured):
    asyncio.run(m.get_pool_api_key("openai"))  # warm up: imports, lazily opened files
    m.configure(configured.socket)  # drops the warm-up's client
    gc.collect()
    fds = _fds()
    gc.disable()  # closing must not wait for the garbage collector
    try:
        for _ in range(300):
            assert asyncio.run(m.get_pool_api_key("openai")) is None
        assert _fds() <= fds  # the last loop's client too: closed when its loop shut down
    finally:
        gc.enable()
    with configured.client() as c:
        # the daemon sees the closes as it reads them: poll until it has (this one counts)
        wait_until(lambda: c.stats()["connections"] <= 1, "the daemon still counts the loops' connections", 10)


def test_a_client_on_another_live_loop_raises_and_takes_over_a_closed_one(configured):
    a = configured.aclient()

    async def ping():
        return (await a.ping())["pong"]

    first = asyncio.new_event_loop()
    assert first.run_until_complete(ping())
    second = asyncio.new_event_loop()
    with pytest.raises(apikeyd.WrongEventLoop, match="another event loop"):
        second.run_until_complete(ping())
    first.close()
    assert second.run_until_complete(ping())  # the first loop is gone: taken over
    second.run_until_complete(a.aclose())
    second.close()
    async def ping_and_close():
        try:
            return await ping()
        finally:
            await a.aclose()

    assert asyncio.run(ping_and_close())  # and again after asyncio.run's loop


def test_no_never_retrieved_noise_with_the_daemon_down(tmp_path, caplog):
    m.configure(str(tmp_path / "none.sock"), connect_timeout=0.05)
    try:
        async def main():
            for _ in range(20):
                with pytest.raises(apikeyd.DaemonUnreachable):
                    await m.get_user_api_key(1, "openai")
                with pytest.raises(apikeyd.DaemonUnreachable):
                    await asyncio.gather(*(m.consume_default_key_usage(1, "t") for _ in range(5)))
                task = asyncio.ensure_future(m.get_pool_api_key("openai"))
                await asyncio.sleep(0)
                task.cancel()

        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            asyncio.run(main())
            gc.collect()
        assert "never retrieved" not in caplog.text
    finally:
        m.configure(None)


def test_per_call_timeout_and_aclose(tmp_path):
    import socket as s

    path = str(tmp_path / "hung.sock")
    srv = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    try:
        c = apikeyd.Client(path, timeout=30)
        with pytest.raises(apikeyd.Timeout, match="0.1 s"):
            c.ping(timeout=0.1)

        async def main():
            async with apikeyd.AsyncClient(path, timeout=30) as a:
                with pytest.raises(apikeyd.Timeout, match="0.1 s"):
                    await a.get_pool_api_key(service="openai", timeout=0.1)
            assert apikeyd.AsyncClient.close is apikeyd.AsyncClient.aclose

        asyncio.run(main())
    finally:
        srv.close()
