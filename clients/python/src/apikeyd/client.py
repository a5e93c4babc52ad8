"""The blocking client: a small pool of Unix-socket connections, safe to share
between threads (each call borrows a connection, so threads never interleave lines
on one socket).

Reconnect rules (apikeyd._reconnect, docs/python.md): a connection the daemon closed
(idle timeout, restart) is replaced; a *read* is sent again on the new connection; a
*write* only when it provably never reached the daemon. Here that is known when the
connect failed, a non-blocking peek showed the idle socket already at EOF before we
wrote, the send failed with nothing sent (EPIPE/ECONNRESET: the peer had closed), or
the read failed with ECONNRESET before any answer (on a Unix socket that means the
daemon closed with our line's last byte unread, so it never parsed it). Any other
loss after the line went out raises DaemonUnreachable and nothing is sent twice.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Union

from . import _reconnect
from ._discover import discover
from ._ops import Id, Ops
from ._wire import READ_OPS, ProtocolDesync, decode_response, desync_error, encode_request

__all__ = ["Client", "Id"]

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class _Broken(Exception):
    """The connection broke before the answer came. ``reached``: the request may
    have reached the daemon (False: it provably did not, so even a write may be
    sent again)."""

    def __init__(self, reached: bool) -> None:
        super().__init__()
        self.reached = reached


class _TimedOut(Exception):
    pass


def connect_unix(path: str, deadline: float, where: str = "") -> socket.socket:
    """Connects, retrying while the socket is missing or refuses (a daemon
    restarting) until ``deadline``; raises DaemonUnreachable after that."""
    waits = _reconnect.connect_waits(deadline)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(path)
            sock.settimeout(None)
            return sock
        except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as exc:
            sock.close()
            wait = next(waits, None)
            if wait is None:
                raise _reconnect.unreachable(path, exc, where) from None
            time.sleep(wait)
        except OSError as exc:
            sock.close()
            raise _reconnect.cannot_connect(path, exc) from None


def _timeval(seconds: float) -> bytes:
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))


class _Conn:
    """One connection; used by one thread at a time."""

    __slots__ = ("sock", "buf", "used", "__weakref__")

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        # Kernel-side timeouts (no poll() before every recv as settimeout would do).
        tv = _timeval(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.sock = sock
        self.buf = b""
        self.used = False

    def peer_closed(self) -> bool:
        """True when the daemon has closed this (idle) connection: EOF is waiting."""
        try:
            return self.sock.recv(1, _PEEK_FLAGS) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def roundtrip(self, data: bytes, rid: int, deadline: float) -> "tuple[bool, Any, bool]":
        sock = self.sock
        self.used = True
        try:
            sent = sock.send(data)
        except OSError:
            # Nothing was sent. A refused peer's `forbidden` line may be waiting.
            left = self._leftover(rid)
            if left is not None:
                return left
            raise _Broken(reached=False) from None
        if sent < len(data):
            try:
                sock.sendall(data[sent:])
            except OSError:
                raise _Broken(reached=True) from None
        buf = self.buf
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                line = buf[:nl]
                self.buf = buf[nl + 1 :]
                if not line.strip():
                    buf = self.buf
                    continue
                return decode_response(line, rid)
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    continue  # a slow multi-chunk line: the per-recv timeout restarted
                raise _TimedOut from None
            except ConnectionResetError:
                # One line in flight, so it was the last written; an answer begun
                # shows the daemon read it all the same.
                raise _Broken(_reconnect.reached_daemon(0, written=1, reset=not buf)) from None
            except OSError:
                raise _Broken(reached=True) from None
            if not chunk:
                raise _Broken(reached=True)
            buf += chunk

    def _leftover(self, rid: int) -> "Optional[tuple[bool, Any, bool]]":
        """An answer line already waiting on a connection the daemon closed (it
        refused this peer): decoded, or None."""
        try:
            data = self.buf + self.sock.recv(65536, socket.MSG_DONTWAIT)
        except OSError:
            data = self.buf
        line = data.split(b"\n", 1)[0]
        if not line.strip() or b"\n" not in data:
            return None
        try:
            return decode_response(line, rid)
        except ProtocolDesync:
            return None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork() -> None:
    # A child must not share its parent's sockets (lines would interleave).
    for c in list(_clients):
        c._idle = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class Client(Ops[Dict[str, Any]]):
    """Blocking apikeyd client, safe to share between threads. The op methods
    (``get_user_api_key``, ...) are ``apikeyd._ops.Ops``'s; this class does the I/O.

    ``socket``: the daemon's socket (default ``$APIKEYD_SOCKET``, else
    /run/apikeyd/apikeyd.sock). ``timeout``: seconds to wait for each answer.
    ``connect_timeout``: seconds to wait for the daemon to accept a connection
    (covers a daemon restart). ``max_idle``: connections kept open for reuse.
    """

    def __init__(
        self,
        socket: "Optional[Union[str, os.PathLike[str]]]" = None,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        max_idle: int = 8,
    ) -> None:
        found = discover(socket)
        self.socket_path = found.path
        self._where = found.where()
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self._max_idle = max_idle
        self._idle: List[_Conn] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        _clients.add(self)

    def __repr__(self) -> str:
        return f"Client(socket={self.socket_path!r}, timeout={self.timeout})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the idle connections (calls still running finish first)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def _acquire(self) -> _Conn:
        try:
            return self._idle.pop()
        except IndexError:
            pass
        sock = connect_unix(self.socket_path, time.monotonic() + self.connect_timeout, self._where)
        return _Conn(sock, self.timeout)

    def _release(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn.close()
        else:
            self._idle.append(conn)

    def call(self, op: str, **params: Any) -> Dict[str, Any]:
        """Sends one request and returns its ``result``; raises an ``apikeyd.Error``
        subclass for an error answer. ``None`` parameters are left out."""
        rid = next(self._ids)
        data = encode_request(op, rid, params)
        is_read = op in READ_OPS
        deadline = time.monotonic() + self.timeout
        tries = 0
        while True:
            conn = self._acquire()
            if _reconnect.peek_before_sending(is_read) and conn.used and conn.peer_closed():
                conn.close()  # closed while idle: nothing was sent on it
                continue
            # Only failures on fresh connections count towards giving up: after a
            # restart every pooled connection is dead, and each costs one attempt.
            fresh = not conn.used
            try:
                ok, value, closing = conn.roundtrip(data, rid, deadline)
            except _Broken as broken:
                conn.close()
                if not _reconnect.may_resend(is_read, broken.reached):
                    raise _reconnect.lost_write(op) from None
                tries += fresh
                if _reconnect.gave_up(tries):
                    raise _reconnect.keeps_closing(op) from None
                continue
            except _TimedOut:
                conn.close()  # its answer may still come: the connection is out of step
                raise _reconnect.no_answer(op, self.timeout) from None
            except ProtocolDesync:
                conn.close()
                raise desync_error() from None
            except BaseException:
                conn.close()  # e.g. KeyboardInterrupt mid-call: the connection is out of step
                raise
            if closing:
                conn.close()
            else:
                self._release(conn)
            if ok:
                return value  # type: ignore[no-any-return]
            raise value
