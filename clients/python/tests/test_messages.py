"""The drop-in's two message functions: no I/O, never an exception, the daemon's texts."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import tempfile
import time

import pytest

from apikeyd import _services
from apikeyd import manage_api_keys as m
from conftest import REPO, wait_until


def test_built_in_table_is_the_daemons():
    text = (REPO / "src" / "ops" / "services.rs").read_text()
    table = text[text.index("const BUILT_IN"): text.index("];")]
    rows = re.findall(r'\(\s*"([^"]*)",\s*"([^"]*)",\s*"([^"]*)",?\s*\)', table)
    assert len(rows) > 10
    assert {n: (d, u) for n, d, u in rows} == _services.BUILT_IN


@pytest.fixture
def configured(daemon):
    m.configure(daemon.socket)
    yield daemon
    m.configure(None)


def test_local_texts_are_the_daemons_own(configured):
    c = configured.client()
    for service in [*_services.BUILT_IN, "acme", "My.Svc-1", "OpenAI"]:
        want = c.missing_api_key_error(service=service)["message"]
        assert _services.missing_key_text(_services.service_name(service)) == want
    for tool, cur, lim, svc in [("web_search", 20, 20, None), ("x", 0, 1000000000, "serpapi"), ("t", 3, 2, "OpenAI")]:
        want = c.default_key_limit_error(tool_name=tool, current=cur, limit=lim, service=svc)["message"]
        assert _services.limit_text(tool, cur, lim, svc) == want
    assert m.default_key_limit_error("web_search", 20, 20) == c.default_key_limit_error(
        tool_name="web_search", current=20, limit=20)["message"]


def test_the_operators_services_are_learnt_in_the_background(harness):
    d = harness.daemon(extra='[services.acme]\ndisplay_name = "Acme Cloud"\nsignup_url = "https://acme.test/keys"\n')
    m.configure(d.socket)
    try:
        first = m.missing_api_key_error("acme")
        assert first == _services.missing_key_text("acme")  # built-in answer, no waiting
        want = d.client().missing_api_key_error(service="acme")["message"]
        assert "Acme Cloud" in want
        wait_until(lambda: m.missing_api_key_error("acme") == want, "the daemon's text was not learnt", 10)
    finally:
        m.configure(None)


WEIRD = ["web search", "", "x" * 500, None, 42, -1, 3.5, b"bytes", object(), "\n\x00", "é"]


def test_never_raise_and_never_wait_with_the_daemon_hung():
    # A socket that accepts connections (in the kernel's backlog) but never answers:
    # the old functions waited 5 s per call on it.
    tmp = tempfile.mkdtemp(prefix="apikeyd-hung")
    path = os.path.join(tmp, "hung.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)

    class Bad:
        def __str__(self):
            raise RuntimeError("no text")

        __format__ = None  # type: ignore[assignment]

    m.configure(path)
    try:
        async def bot():
            start = time.monotonic()
            for _ in range(20):
                for v in [*WEIRD, Bad()]:
                    assert isinstance(m.missing_api_key_error(v), str)
                    assert isinstance(m.default_key_limit_error(v, v, v), str)
                    assert isinstance(m.default_key_limit_error("web search", -5, -1), str)
                assert "OpenAI" in m.missing_api_key_error("openai")
            return time.monotonic() - start

        spent = asyncio.run(bot())
        # 20 * 26 calls; one blocking call on this socket took 5 s before.
        assert spent < 2.0, spent
        assert m.missing_api_key_error("web search") == _services.GENERIC_MISSING
    finally:
        m.configure(None)
        srv.close()
