"""The encoded-line cache never answers one request with another's key: values
equal in Python but not on the wire (True == 1 == 1.0) get lines of their own.
Checked against the daemon's own parsing of each value sent without the cache."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apikeyd
from apikeyd import _wire

KEY = "sk-user-SECRET-0123456789abcdef"


def _raw(path: str, req: dict) -> dict:
    """The daemon's answer to ``req`` sent as is (no client, no cache)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, "the daemon closed the connection"
            buf += chunk
        return json.loads(buf)
    finally:
        s.close()


def _outcome(path_or_client, value) -> tuple:
    if isinstance(path_or_client, apikeyd.Client):
        try:
            r = path_or_client.get_user_api_key(user_id=value, service="openai", fallback_to_pool=False)
        except apikeyd.Error as e:
            return ("error", e.code)
        return ("ok", r["key"])
    # The client's documented conversion: a non-negative int (not a bool) is sent as
    # its decimal string; everything else as is.
    sent = str(value) if type(value) is int and value >= 0 else value
    a = _raw(path_or_client, {"op": "get_user_api_key", "user_id": sent, "service": "openai",
                              "fallback_to_pool": False})
    return ("ok", a["result"]["key"]) if a["ok"] else ("error", a["error"]["code"])


def test_true_one_and_one_point_zero_are_not_confused(embedded_harness):
    d = embedded_harness.daemon()
    c = d.client()
    c.set_user_api_key(user_id="1", service="openai", key=KEY)
    for order in ([1, True, 1.0, "1"], [True, 1.0, 1, "1"], [1.0, "1", True, 1]):
        _wire._line_cache.clear()
        for v in order:
            assert _outcome(c, v) == _outcome(d.socket, v), v
    assert _outcome(c, 1) == ("ok", KEY)
    assert _outcome(c, True)[0] == "error" and _outcome(c, 1.0)[0] == "error"


VALUES = st.one_of(
    st.booleans(),
    st.integers(min_value=-2, max_value=3),
    st.sampled_from([0.0, 1.0, -1.0, 2.5, 18446744073709551616, 2**63]),
    st.sampled_from(["1", "0", "2", "True", "1.0", " 1", "a"]),
    st.none(),
)


@pytest.fixture(scope="module")
def shared_daemon():
    from conftest import Harness

    h = Harness("embedded")
    d = h.daemon()
    c = d.client()
    for uid in ("0", "1", "2", "True", "1.0", "a"):
        c.set_user_api_key(user_id=uid, service="openai", key=f"sk-key-of-user-{uid}-000000")
    yield d
    h.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(VALUES, min_size=1, max_size=12))
def test_cached_lines_answer_as_the_daemon_parses_each_value(shared_daemon, values):
    c = shared_daemon.client()
    try:
        for v in values:
            assert _outcome(c, v) == _outcome(shared_daemon.socket, v), v
    finally:
        c.close()
