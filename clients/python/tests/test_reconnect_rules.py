"""The resend decisions both clients share (apikeyd._reconnect), without a socket."""

from __future__ import annotations

import time

import pytest

import apikeyd
from apikeyd._reconnect import (
    RETRIES,
    backoff,
    connect_waits,
    keeps_closing,
    new_idempotency_key,
    no_answer,
    reached_daemon,
    unreachable,
    with_maybe,
)


@pytest.mark.parametrize(
    "index, written, reset, reached",
    [
        (0, 0, False, False),  # never handed to the socket
        (2, 2, True, False),   # not written either
        (0, 1, True, False),   # the last line written, and the daemon closed with bytes unread
        (0, 1, False, True),   # plain EOF: the daemon may have read and applied it
        (0, 2, True, True),    # not the last line written: the daemon read it whole
        (1, 2, True, False),
        (1, 2, False, True),
    ],
)
def test_which_lines_in_flight_may_have_reached_the_daemon(index, written, reset, reached):
    assert reached_daemon(index, written, reset) is reached


def test_backoff_doubles_to_a_quarter_second_and_retries_are_bounded():
    assert [backoff(n) for n in range(1, 8)] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25]
    assert 1 <= RETRIES <= 10
    assert sum(backoff(n) for n in range(1, RETRIES + 1)) < 5.0  # within the default timeout


def test_idempotency_keys_are_fresh_and_valid_on_the_wire():
    keys = {new_idempotency_key() for _ in range(1000)}
    assert len(keys) == 1000
    assert all(1 <= len(k) <= 128 and k.isalnum() for k in keys)


def test_connect_waits_double_up_to_100_ms_and_end_at_the_deadline():
    waits = connect_waits(time.monotonic() + 60)
    assert [round(next(waits), 3) for _ in range(7)] == [0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1]
    assert list(connect_waits(time.monotonic() - 1)) == []
    assert all(0 < w <= 0.002 for w in connect_waits(time.monotonic() + 0.002))


def test_the_error_classes_and_messages():
    lost = keeps_closing("set_user_api_key", True)
    safe = keeps_closing("ping", False)
    slow = no_answer("set_user_api_key", 2.5, True)
    gone = unreachable("/run/x.sock", FileNotFoundError(2, "No such file or directory"), "a; b")
    assert isinstance(lost, apikeyd.DaemonUnreachable) and isinstance(lost, ConnectionError)
    assert lost.maybe_applied and "may have been applied" in str(lost)
    assert not safe.maybe_applied and "not applied" in str(safe)
    assert isinstance(slow, apikeyd.Timeout) and isinstance(slow, TimeoutError) and "2.5 s" in str(slow)
    assert "/run/x.sock (No such file or directory)" in str(gone) and "looked at: a; b" in str(gone)
    assert not gone.maybe_applied and with_maybe(gone, True).maybe_applied
    assert not issubclass(apikeyd.Timeout, apikeyd.DaemonUnreachable)
    assert issubclass(apikeyd.PermissionDenied, apikeyd.DaemonUnreachable)
    assert issubclass(apikeyd.WrongEventLoop, apikeyd.Error)
