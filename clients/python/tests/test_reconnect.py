"""Reconnects after an idle close and a restart; reads resent, writes never twice."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import apikeyd
from conftest import require_idempotency, wait_until
from fake_daemon import FakeDaemon

KEY = "sk-user-SECRET-0123456789abcdef"


def _idle_conn_closed(c: apikeyd.Client) -> bool:
    return bool(c._idle) and all(conn.peer_closed() for conn in c._idle)


def test_blocking_client_survives_idle_timeout(embedded_harness):
    d = embedded_harness.daemon(idle_timeout_s=1)
    c = d.client()
    c.set_user_api_key(user_id="ana", service="openai", key=KEY)
    for n in range(1, 3):
        wait_until(lambda: _idle_conn_closed(c), "the daemon did not close the idle connection", 10)
        assert c.get_user_api_key(user_id="ana", service="openai")["key"] == KEY  # a read
        wait_until(lambda: _idle_conn_closed(c), "the daemon did not close the idle connection", 10)
        assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"count": n}  # a write
    assert c.check_default_key_limit(user_id="u", tool_name="t")["current_count"] == 2


def test_async_client_survives_idle_timeout(embedded_harness):
    d = embedded_harness.daemon(idle_timeout_s=1)

    async def closed(a: apikeyd.AsyncClient) -> None:
        deadline = time.monotonic() + 10
        while not all(p is None or p.closed for p in a._slots):
            assert time.monotonic() < deadline, "the daemon did not close the idle connections"
            await asyncio.sleep(0.02)

    async def main():
        a = d.aclient()
        await a.set_user_api_key(user_id="ana", service="openai", key=KEY)
        await a.ping()
        for n in range(1, 3):
            await closed(a)
            assert (await a.get_user_api_key(user_id="ana", service="openai"))["key"] == KEY
            await closed(a)
            assert await a.increment_default_key_usage(user_id="u", tool_name="t") == {"count": n}
        assert (await a.check_default_key_limit(user_id="u", tool_name="t"))["current_count"] == 2
        await a.close()

    asyncio.run(main())


def test_clients_survive_a_daemon_restart(daemon):
    c = daemon.client()
    c.set_user_api_key(user_id="ana", service="openai", key=KEY)
    assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"count": 1}

    async def before(a):
        assert (await a.ping())["pong"]

    loop = asyncio.new_event_loop()
    a = daemon.aclient()
    loop.run_until_complete(before(a))

    daemon.restart()
    assert c.get_user_api_key(user_id="ana", service="openai")["key"] == KEY
    assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"count": 2}

    async def after(a):
        assert (await a.get_user_api_key(user_id="ana", service="openai"))["key"] == KEY
        assert await a.increment_default_key_usage(user_id="u", tool_name="t") == {"count": 3}
        await a.close()

    loop.run_until_complete(after(a))
    loop.close()


def test_a_pool_of_dead_connections_after_a_restart(daemon):
    c = daemon.client()
    conns = [c._acquire(time.monotonic() + 5, 5.0) for _ in range(8)]  # as if 8 threads had used it at once
    for conn in conns:
        conn.used = True
        c._release(conn)
    assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"count": 1}
    daemon.restart()
    assert c.ping()["pong"] is True  # every pooled connection is dead: more than 3 tries
    for conn in list(c._idle):
        conn.used = True
    daemon.restart()
    assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"count": 2}


def test_calls_made_while_the_daemon_is_down_wait_for_it(daemon):
    c = daemon.client(connect_timeout=20)
    assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"count": 1}
    daemon.stop()
    starter = threading.Thread(target=daemon.start)
    starter.start()
    try:
        assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"count": 2}
    finally:
        starter.join()
    assert c.check_default_key_limit(user_id="u", tool_name="t")["current_count"] == 2


def test_write_lost_after_it_was_read_is_resent_with_its_idempotency_key():
    fake = FakeDaemon(["read_then_close", "answer"])
    try:
        c = apikeyd.Client(fake.path)
        assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"n": 2}
        assert fake.ops() == ["increment_default_key_usage"] * 2
        keys = [r["idempotency_key"] for r in fake.seen]
        assert keys[0] == keys[1] and len(keys[0]) == 32
        # the next write gets a key of its own; a caller's own key is sent as given
        c.increment_default_key_usage(user_id="u", tool_name="t")
        c.increment_default_key_usage(user_id="u", tool_name="t", idempotency_key="mine-1")
        assert fake.seen[2]["idempotency_key"] not in keys and fake.seen[3]["idempotency_key"] == "mine-1"
    finally:
        fake.close()


def test_a_write_that_keeps_failing_says_it_may_have_been_applied_and_never_shows_the_key():
    fake = FakeDaemon(["read_then_close"])
    try:
        with pytest.raises(apikeyd.DaemonUnreachable) as e:
            apikeyd.Client(fake.path).set_user_api_key(user_id="u", service="openai", key=KEY)
        assert e.value.maybe_applied and "may have been applied" in str(e.value)
        assert KEY not in str(e.value) and KEY not in repr(e.value)
        assert e.value.__cause__ is None and KEY not in repr(e.value.__context__)
        assert len(fake.ops()) == 1 + apikeyd._reconnect.RETRIES
    finally:
        fake.close()


def test_daemon_full_answer_is_unavailable():
    # Past server.max_connections the daemon sends one `unavailable` line (id null)
    # and closes, before reading anything.
    fake = FakeDaemon(["full"])
    try:
        with pytest.raises(apikeyd.Unavailable, match="too many"):
            apikeyd.Client(fake.path).ping()

        async def main():
            with pytest.raises(apikeyd.Unavailable, match="too many"):
                await apikeyd.AsyncClient(fake.path).ping()

        asyncio.run(main())
    finally:
        fake.close()


def test_read_lost_after_it_was_read_is_resent():
    fake = FakeDaemon(["read_then_close", "answer"])
    try:
        assert apikeyd.Client(fake.path).ping() == {"n": 2}
        assert fake.ops() == ["ping", "ping"]
    finally:
        fake.close()


def test_write_the_daemon_closed_on_unread_is_resent_once():
    # ECONNRESET: the daemon closed with our line unread, so it never saw it.
    fake = FakeDaemon(["close_unread", "answer"])
    try:
        assert apikeyd.Client(fake.path).increment_default_key_usage(user_id="u", tool_name="t") == {"n": 1}
        assert fake.ops() == ["increment_default_key_usage"]
    finally:
        fake.close()


def test_write_after_an_idle_close_goes_on_a_new_connection():
    fake = FakeDaemon(["answer_one_then_close", "answer"])
    try:
        c = apikeyd.Client(fake.path)
        assert c.ping() == {"n": 1}
        wait_until(lambda: _idle_conn_closed(c), "the fake did not close", 10)
        assert c.increment_default_key_usage(user_id="u", tool_name="t") == {"n": 2}
        assert fake.ops() == ["ping", "increment_default_key_usage"]
    finally:
        fake.close()


def test_async_rules_match_the_blocking_ones():
    async def one(path, call):
        a = apikeyd.AsyncClient(path, connections=1)
        try:
            return await call(a)
        finally:
            await a.aclose()

    fake = FakeDaemon(["read_then_close", "answer"])
    try:
        r = asyncio.run(one(fake.path, lambda a: a.increment_default_key_usage(user_id="u", tool_name="t")))
        assert r == {"n": 2} and fake.ops() == ["increment_default_key_usage"] * 2
        assert fake.seen[0]["idempotency_key"] == fake.seen[1]["idempotency_key"]
    finally:
        fake.close()

    fake = FakeDaemon(["read_then_close"])
    try:
        with pytest.raises(apikeyd.DaemonUnreachable) as e:
            asyncio.run(one(fake.path, lambda a: a.increment_default_key_usage(user_id="u", tool_name="t")))
        assert e.value.maybe_applied
    finally:
        fake.close()

    fake = FakeDaemon(["read_then_close", "answer"])
    try:
        assert asyncio.run(one(fake.path, lambda a: a.ping())) == {"n": 2}
    finally:
        fake.close()

    fake = FakeDaemon(["close_unread", "answer"])
    try:
        r = asyncio.run(one(fake.path, lambda a: a.increment_default_key_usage(user_id="u", tool_name="t")))
        assert r == {"n": 1} and fake.ops() == ["increment_default_key_usage"]
    finally:
        fake.close()


def test_a_shutdown_answer_that_applied_nothing_is_resent():
    # A daemon shutting down answers what it read but will not run with
    # `unavailable` and "applied": false; the client sends it again.
    def first(line):
        return (b'{"id":%d,"ok":false,"error":{"code":"unavailable","message":"shutting down","applied":false}}\n'
                % line["id"])

    fake = FakeDaemon([first, "answer"])
    try:
        assert apikeyd.Client(fake.path).consume_default_key_usage(user_id="u", tool_name="t") == {"n": 2}
    finally:
        fake.close()
    fake = FakeDaemon([first, "answer"])
    try:
        async def main():
            a = apikeyd.AsyncClient(fake.path, connections=1)
            try:
                return await a.consume_default_key_usage(user_id="u", tool_name="t")
            finally:
                await a.aclose()

        assert asyncio.run(main()) == {"n": 2}
        assert fake.seen[0]["idempotency_key"] == fake.seen[1]["idempotency_key"]
    finally:
        fake.close()


def test_writes_in_flight_during_a_restart_are_applied_once(daemon):
    """Increments in flight while the daemon restarts (SIGTERM). With idempotency
    keys the client resends what the old daemon did not answer, so every call
    succeeds, and the final count proves none was applied twice."""
    require_idempotency(daemon)

    async def main():
        a = daemon.aclient(connect_timeout=20, timeout=30)
        await a.ping()
        loop = asyncio.get_running_loop()
        calls = [a.increment_default_key_usage(user_id="u", tool_name="t") for _ in range(2000)]
        restart = loop.run_in_executor(None, daemon.restart)
        results = await asyncio.gather(*calls, return_exceptions=True)
        await restart
        errors = [r for r in results if not isinstance(r, dict)]
        assert errors == []
        count = (await a.check_default_key_limit(user_id="u", tool_name="t", daily_limit=10**6))["current_count"]
        assert count == 2000
        counts = [r["count"] for r in results]
        assert sorted(counts) == list(range(1, 2001))
        await a.aclose()

    asyncio.run(main())
