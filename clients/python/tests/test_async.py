"""AsyncClient: every op, 2,000 concurrent calls, cancellation and timeouts."""

from __future__ import annotations

import asyncio

import pytest

import apikeyd

KEY = "sk-user-SECRET-0123456789abcdef"
POOL_KEY = "sk-pool-SECRET-9876543210fedcba"


def run(coro):
    return asyncio.run(coro)


def test_every_op(daemon):
    async def main():
        async with daemon.aclient() as c:
            assert (await c.ping())["pong"] is True
            assert await c.set_user_api_key(user_id=1234, service="openai", key=KEY) == {"stored": True}
            assert (await c.get_user_api_key(user_id="1234", service="openai"))["key"] == KEY
            assert (await c.list_user_api_keys(user_id=1234))["keys"][0]["service"] == "openai"
            add = await c.add_pool_key(service="openai", key=POOL_KEY, channel_id=77)
            assert (await c.get_channel_pool_api_key(channel_id=77, service="openai"))["key"] == POOL_KEY
            assert (await c.list_pool_keys(service="openai", channel_id="77"))["keys"][0]["key_id"] == add["key_id"]
            assert (await c.remove_pool_key(service="openai", key_id=add["key_id"], channel_id=77))["removed"]
            await c.add_pool_key(service="openai", key=POOL_KEY)
            assert (await c.get_pool_api_key(service="openai"))["key"] == POOL_KEY
            await c.set_user_api_key(user_id="g", service="gitea", key="gitea-token-abcdef0123")
            assert (await c.get_gitea_credentials(user_id="g"))["token"] == "gitea-token-abcdef0123"
            assert (await c.increment_default_key_usage(user_id="u", tool_name="t")) == {"count": 1}
            assert (await c.consume_default_key_usage(user_id="u", tool_name="t", daily_limit=5))["current_count"] == 2
            assert (await c.check_default_key_limit(user_id="u", tool_name="t"))["current_count"] == 2
            assert "openai" in (await c.missing_api_key_error(service="openai"))["message"]
            assert "t" in (await c.default_key_limit_error(tool_name="t", current=1, limit=1))["message"]
            assert (await c.delete_user_api_key(user_id=1234, service="openai"))["deleted"] is True
            assert (await c.reload())["reloaded"] is True
            assert (await c.stats())["store"]["mode"] == daemon.mode
            assert (await c.call("ping"))["pong"] is True
            with pytest.raises(apikeyd.UnknownOp):
                await c.call("no_such_op")
            with pytest.raises(apikeyd.BadRequest):
                await c.get_pool_api_key(service="")
            assert KEY not in repr(c)

    run(main())


def test_two_thousand_concurrent_calls(daemon):
    async def main():
        c = daemon.aclient(timeout=60)  # 500 durable writes queued at once: slow on a loaded machine
        await c.set_user_api_key(user_id="ana", service="openai", key=KEY)
        reads = [c.get_user_api_key(user_id="ana", service="openai") for _ in range(1500)]
        writes = [c.increment_default_key_usage(user_id="many", tool_name="t") for _ in range(500)]
        results = await asyncio.gather(*reads, *writes)
        assert all(r["key"] == KEY for r in results[:1500])
        assert sorted(r["count"] for r in results[1500:]) == list(range(1, 501))
        await c.close()

    run(main())


def test_cancelled_calls_do_not_desynchronise_others(daemon):
    async def main():
        c = daemon.aclient(connections=1)
        await c.set_user_api_key(user_id="ana", service="openai", key=KEY)
        await c.set_user_api_key(user_id="bo", service="openai", key=POOL_KEY)
        tasks = []
        for i in range(400):
            user = "ana" if i % 2 == 0 else "bo"
            tasks.append((user, asyncio.ensure_future(c.get_user_api_key(user_id=user, service="openai"))))
        await asyncio.sleep(0)  # let them write their lines
        for i, (_, t) in enumerate(tasks):
            if i % 3 == 0:
                t.cancel()
        for user, t in tasks:
            try:
                r = await t
            except asyncio.CancelledError:
                continue
            assert r["key"] == (KEY if user == "ana" else POOL_KEY)
        # the connection is still in step afterwards
        for _ in range(20):
            assert (await c.get_user_api_key(user_id="bo", service="openai"))["key"] == POOL_KEY
        await c.close()

    run(main())


def test_timeout_raises_timeout_and_later_calls_work(daemon, tmp_path):
    # A socket that accepts and never answers stands for a hung daemon.
    import socket as s

    path = str(tmp_path / "hung.sock")
    srv = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    srv.bind(path)
    srv.listen()

    async def main():
        c = apikeyd.AsyncClient(path, timeout=0.2)
        with pytest.raises(apikeyd.Timeout, match="no answer") as e:
            await c.ping()
        assert isinstance(e.value, TimeoutError) and not e.value.maybe_applied
        with pytest.raises(apikeyd.Timeout, match="0.05 s"):
            await c.ping(timeout=0.05)  # a call's own timeout
        with pytest.raises(apikeyd.Timeout) as e:
            await c.increment_default_key_usage(user_id="u", tool_name="t")
        assert e.value.maybe_applied  # sent, never answered: its fate is unknown
        await c.aclose()
        ok = daemon.aclient(timeout=5)
        assert (await ok.ping())["pong"] is True
        await ok.close()

    run(main())
    srv.close()


def test_unreachable_socket(tmp_path):
    async def main():
        c = apikeyd.AsyncClient(str(tmp_path / "none.sock"), connect_timeout=0.2)
        with pytest.raises(apikeyd.DaemonUnreachable, match="none.sock"):
            await c.ping()

    run(main())
    with pytest.raises(apikeyd.DaemonUnreachable, match="none.sock"):
        apikeyd.Client(str(tmp_path / "none.sock"), connect_timeout=0.2).ping()


def test_close_fails_waiting_calls(tmp_path):
    import socket as s

    path = str(tmp_path / "hung.sock")
    srv = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    srv.bind(path)
    srv.listen()

    async def main():
        c = apikeyd.AsyncClient(path, timeout=30)
        waiting = asyncio.ensure_future(c.ping())
        while not any(p is not None and p.conn.pending for p in c._slots):
            await asyncio.sleep(0.005)
        await c.close()
        with pytest.raises(apikeyd.DaemonUnreachable, match="closed"):
            await waiting

    run(main())
    srv.close()
