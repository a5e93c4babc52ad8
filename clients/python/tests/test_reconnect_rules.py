"""The reconnect decisions both clients share (apikeyd._reconnect), without a socket."""

from __future__ import annotations

import time

import pytest

from apikeyd import DaemonUnreachable
from apikeyd._reconnect import (
    RETRIES,
    connect_waits,
    gave_up,
    keeps_closing,
    lost_write,
    may_resend,
    no_answer,
    peek_before_sending,
    reached_daemon,
    unreachable,
)


def test_a_read_is_always_resent_a_write_only_when_it_never_reached_the_daemon():
    assert may_resend(is_read=True, reached=True)
    assert may_resend(is_read=True, reached=False)
    assert may_resend(is_read=False, reached=False)
    assert not may_resend(is_read=False, reached=True)
    assert peek_before_sending(is_read=False) and not peek_before_sending(is_read=True)


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


def test_a_call_gives_up_after_its_retries():
    assert not gave_up(RETRIES)
    assert gave_up(RETRIES + 1)


def test_connect_waits_double_up_to_100_ms_and_end_at_the_deadline():
    waits = connect_waits(time.monotonic() + 60)
    assert [round(next(waits), 3) for _ in range(7)] == [0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.1]
    assert list(connect_waits(time.monotonic() - 1)) == []
    # without sleeping in between, the waits shrink to what is left, then end
    assert all(0 < w <= 0.002 for w in connect_waits(time.monotonic() + 0.002))


def test_the_messages_name_the_op_and_the_socket_only():
    errors = [
        lost_write("set_user_api_key"),
        keeps_closing("set_user_api_key"),
        no_answer("set_user_api_key", 2.5),
        unreachable("/run/x.sock", FileNotFoundError(2, "No such file or directory")),
    ]
    assert all(isinstance(e, DaemonUnreachable) for e in errors)
    assert "may or may not have been applied" in str(errors[0])
    assert "2.5 s" in str(errors[2])
    assert "/run/x.sock (No such file or directory)" in str(errors[3])
