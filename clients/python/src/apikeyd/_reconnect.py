"""When a request may be sent again, and the errors when it may not (sans I/O).

Both clients follow these rules; each detects the facts they take with its own I/O
(apikeyd.client: a peek, errno of send/recv; apikeyd.aio: poll, connection_lost).

- A *read* whose connection broke is sent again on a new connection.
- A *write* (an op of WRITE_OPS, or one this package does not know) is sent again
  only when it provably never reached the daemon; otherwise the caller gets
  DaemonUnreachable and nothing is sent twice.
- After RETRIES resends the call gives up (the blocking client counts only those on
  fresh connections, so that a pool of connections a restart killed does not use
  them up).
- While the socket is missing or refuses (a daemon restarting), connecting is
  retried, 5 ms doubling to 100 ms apart, until ``connect_timeout`` has passed.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Iterator

from ._errors import DaemonUnreachable, PermissionDenied

__all__ = [
    "RETRIES",
    "connect_waits",
    "peek_before_sending",
    "reached_daemon",
    "may_resend",
    "gave_up",
    "unreachable",
    "cannot_connect",
    "lost_write",
    "keeps_closing",
    "no_answer",
]

#: Resends per call; each new connection waits for the daemon up to connect_timeout.
RETRIES = 3


def connect_waits(deadline: float) -> Iterator[float]:
    """The pauses between connect attempts: 5 ms doubling to 100 ms, the last cut
    to end at ``deadline`` (a time.monotonic() value); none once it has passed."""
    delay = 0.005
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield min(delay, left)
        delay = min(delay * 2, 0.1)


def peek_before_sending(is_read: bool) -> bool:
    """A write goes out only on a connection just seen open (not already closed by
    the daemon, e.g. at its idle timeout); a read, which may be resent, skips the look."""
    return not is_read


def reached_daemon(index: int, written: int, reset: bool) -> bool:
    """Whether the ``index``-th of the lines in flight on a connection that broke may
    have reached the daemon. ``written``: how many of them were handed to the socket
    (the rest never left the client). ``reset``: the connection ended with
    ECONNRESET/EPIPE, which on a Unix socket means the daemon closed with bytes
    unread; those are a suffix of what was written, so the last line written was
    never read whole (its final newline at least), and the daemon never parsed it."""
    if index >= written:
        return False
    return not (reset and index == written - 1)


def may_resend(is_read: bool, reached: bool) -> bool:
    """A request whose connection broke before its answer may be sent again: a read
    always, a write only when it never reached the daemon."""
    return is_read or not reached


def gave_up(tries: int) -> bool:
    """``tries`` resends are more than a call makes."""
    return tries > RETRIES


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return type(exc).__name__


# The client's own messages name the op, the socket path and errno texts, never a
# parameter (which may be a key).


def unreachable(path: str, exc: BaseException, where: str = "") -> DaemonUnreachable:
    """No daemon accepted a connection before ``connect_timeout``. ``where``: the
    places the socket was looked for (apikeyd._discover)."""
    looked = f" (looked at: {where})" if where else ""
    return DaemonUnreachable(
        f"no apikeyd answers on {path} ({_reason(exc)}){looked}; is `apikeyd serve` running? "
        "Pass socket=, or set $APIKEYD_SOCKET or $APIKEYD_CONFIG"
    )


def _group_of(path: str) -> str:
    try:
        gid = os.stat(path).st_gid
    except OSError:
        return "the socket's group"
    try:
        import grp

        return f"the group `{grp.getgrgid(gid).gr_name}` (gid {gid})"
    except (KeyError, ImportError):
        return f"the group with gid {gid}"


def cannot_connect(path: str, exc: BaseException) -> DaemonUnreachable:
    """Connecting failed in a way that waiting does not mend (e.g. no permission)."""
    if isinstance(exc, PermissionError):
        return PermissionDenied(
            f"cannot connect to apikeyd on {path}: {_reason(exc)}; this user lacks access to the "
            f"socket: it must be in {_group_of(path)} (see docs/operations.md, \"Access\")"
        )
    return DaemonUnreachable(f"cannot connect to apikeyd on {path}: {_reason(exc)}")


def lost_write(op: str) -> DaemonUnreachable:
    return DaemonUnreachable(
        f"`{op}`: the connection to apikeyd broke after the request was sent; "
        "it may or may not have been applied, so it was not sent again"
    )


def keeps_closing(op: str) -> DaemonUnreachable:
    return DaemonUnreachable(f"`{op}`: the daemon keeps closing the connection")


def no_answer(op: str, timeout: float) -> DaemonUnreachable:
    return DaemonUnreachable(f"`{op}`: no answer from apikeyd within {timeout:g} s")
