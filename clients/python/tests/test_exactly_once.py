"""Exactly-once writes through restarts and crashes: 50 asyncio clients consume
with idempotency keys while the daemon is SIGTERM-restarted 3 times and SIGKILLed
3 times. Every call ends in success (no ambiguous outcome reaches the bot), the
final count equals the number of distinct keys acknowledged, and no key was
counted twice. Needs a daemon with idempotency keys (it fails, never skips, without)."""

from __future__ import annotations

import asyncio
import signal
import time

import apikeyd
from conftest import require_idempotency

CLIENTS = 50
LIMIT = 10**9


def test_fifty_clients_through_three_restarts_and_three_crashes(harness):
    d = harness.daemon()
    require_idempotency(d)
    acked: dict = {}  # idempotency key -> current_count answered
    errors: list = []
    done = {"restarts": False}

    async def worker(i: int) -> None:
        async with apikeyd.AsyncClient(d.socket, connections=1, timeout=120, connect_timeout=60) as c:
            n = 0
            while not done["restarts"] or n < 20:
                key = f"w{i}-{n}"
                n += 1
                try:
                    r = await c.consume_default_key_usage(user_id="storm", tool_name="t", daily_limit=LIMIT,
                                                          idempotency_key=key)
                except apikeyd.Error as e:
                    errors.append((key, type(e).__name__, e.maybe_applied, str(e)))
                    continue
                assert r["allowed"] is True
                acked[key] = r["current_count"]

    def storm() -> None:
        def after_more_acks(k: int) -> None:
            # Polls the workers' progress (no sleeping to synchronise): generous, for
            # a loaded machine; says where it stood when it gives up.
            want = len(acked) + k
            deadline = time.monotonic() + 180
            while len(acked) < want:
                assert time.monotonic() < deadline, (
                    f"the clients made no progress: {len(acked)} acknowledged, want {want}; "
                    f"{len(errors)} errors {errors[:3]}; daemon log:\n{d.logs()}")
                time.sleep(0.01)

        for sig in (signal.SIGTERM, signal.SIGKILL) * 3:
            after_more_acks(200)
            d.stop(sig)
            d.start()
        after_more_acks(200)
        done["restarts"] = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        workers = [asyncio.ensure_future(worker(i)) for i in range(CLIENTS)]
        await loop.run_in_executor(None, storm)
        await asyncio.gather(*workers)
        async with apikeyd.AsyncClient(d.socket) as c:
            final = (await c.check_default_key_limit(user_id="storm", tool_name="t", daily_limit=LIMIT))
        assert errors == [], errors[:5]
        assert final["current_count"] == len(acked)
        counts = sorted(acked.values())
        assert counts == list(range(1, len(acked) + 1)), "a count was handed out twice or skipped"

    asyncio.run(main())
    assert len(acked) >= 7 * 200
