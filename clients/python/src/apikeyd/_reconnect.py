"""When a request is sent again, and the errors when it is not (sans I/O).

Both clients follow these rules; each detects the facts they take with its own I/O.

- Every write carries an ``idempotency_key`` (a fresh uuid4 unless the caller gave
  one), so the daemon applies it at most once however often it is sent: a repeat
  answers the first answer with ``"replayed": true``.
- So a request whose connection broke (idle close, restart, SIGKILL) is sent again,
  read or write alike, on a new connection, after a short backoff, up to RETRIES
  times and within the call's ``timeout``. An ``unavailable`` answer that says
  ``"applied": false`` (a daemon shutting down) is sent again the same way.
- While the socket is missing or refuses (a daemon restarting), connecting is
  retried, 5 ms doubling to 100 ms apart, until ``connect_timeout`` has passed.
- When the call ends without an answer, its error says whether it may have been
  applied (``maybe_applied``): only a write that may have reached the daemon.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Iterator

from ._errors import DaemonUnreachable, Error, PermissionDenied, Timeout

__all__ = [
    "RETRIES",
    "backoff",
    "connect_waits",
    "new_idempotency_key",
    "reached_daemon",
    "unreachable",
    "cannot_connect",
    "keeps_closing",
    "no_answer",
]

#: Resends per call after the first attempt, each on a new connection.
RETRIES = 8


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def backoff(attempt: int) -> float:
    """The pause before resend number ``attempt`` (1-based): 10 ms doubling to 250 ms."""
    return min(0.01 * float(2 ** (attempt - 1)), 0.25)


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


def _mark(err: Error, maybe_applied: bool) -> Error:
    err.maybe_applied = maybe_applied
    return err


def keeps_closing(op: str, maybe_applied: bool) -> Error:
    note = "; it may have been applied" if maybe_applied else "; it was not applied"
    return _mark(DaemonUnreachable(f"`{op}`: the daemon kept closing the connection{note}"), maybe_applied)


def no_answer(op: str, timeout: float, maybe_applied: bool) -> Error:
    note = "; it may have been applied" if maybe_applied else ""
    return _mark(Timeout(f"`{op}`: no answer from apikeyd within {timeout:g} s{note}"), maybe_applied)


def with_maybe(err: Error, maybe_applied: bool) -> Error:
    """``err`` (a failure to reconnect) for a call whose earlier attempt may have applied."""
    if maybe_applied:
        err.maybe_applied = True
        err.message += "; an earlier attempt may have been applied"
    return err
