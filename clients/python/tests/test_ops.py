"""The op methods are written once (apikeyd._ops.Ops) and serve both clients."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import apikeyd
from apikeyd._ops import Ops
from apikeyd._wire import READ_OPS, WRITE_OPS
from fake_daemon import FakeDaemon

OPS = sorted(READ_OPS | WRITE_OPS)


@pytest.mark.parametrize("name", OPS)
def test_both_clients_have_the_op_with_one_signature_and_docstring(name):
    shared = getattr(Ops, name)
    sync, coro = getattr(apikeyd.Client, name), getattr(apikeyd.AsyncClient, name)
    assert not inspect.iscoroutinefunction(sync)
    assert inspect.iscoroutinefunction(coro)
    assert inspect.signature(sync) == inspect.signature(coro) == inspect.signature(shared)
    assert sync.__doc__ == coro.__doc__ == shared.__doc__ and shared.__doc__
    assert coro.__name__ == name and coro.__qualname__ == f"AsyncClient.{name}"
    params = inspect.signature(shared).parameters
    assert all(p.kind is p.KEYWORD_ONLY for n, p in params.items() if n != "self")


def test_both_clients_send_the_same_lines_for_every_op():
    def args(name):
        sig = inspect.signature(getattr(Ops, name))
        return {n: (7 if "id" in n else "v") for n, p in sig.parameters.items()
                if n != "self" and p.default is p.empty}

    fake = FakeDaemon(["answer"])
    try:
        c = apikeyd.Client(fake.path)
        for name in OPS:
            getattr(c, name)(**args(name))

        async def main():
            a = apikeyd.AsyncClient(fake.path, connections=1)
            for name in OPS:
                await getattr(a, name)(**args(name))
            await a.close()

        asyncio.run(main())
        assert all(("idempotency_key" in r) is (r["op"] in WRITE_OPS) for r in fake.seen)
        seen = [{k: v for k, v in r.items() if k not in ("id", "idempotency_key")} for r in fake.seen]
        assert [r["op"] for r in seen] == OPS + OPS
        assert seen[: len(OPS)] == seen[len(OPS):]
    finally:
        fake.close()


def _daemon_ops():
    """(name, writes) of every op in the daemon's table (src/wire/catalog.rs), test hook aside."""
    import re

    from conftest import REPO

    text = (REPO / "src" / "wire" / "catalog.rs").read_text()
    table = text[text.index("ops! {"):]
    table = table[: table.index("}")]
    rows = re.findall(r'(\w+) = "(\w+)", write: (true|false), admin: (true|false);', table)
    assert len(rows) > 15
    return {name: write == "true" for _v, name, write, _a in rows if name != "debug_panic"}


def test_the_op_table_is_the_daemons():
    ops = _daemon_ops()
    assert READ_OPS == {n for n, w in ops.items() if not w}
    assert WRITE_OPS == {n for n, w in ops.items() if w}


def test_the_bench_is_not_in_the_installed_package():
    import importlib.util

    assert importlib.util.find_spec("apikeyd.bench") is None
