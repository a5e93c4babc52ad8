"""The blocking client: a small pool of Unix-socket connections, safe to share
between threads (each call borrows a connection, so threads never interleave lines
on one socket).

Resends (apikeyd._reconnect, docs/python.md): every write carries an idempotency
key, so a call whose connection broke (idle timeout, restart, crash) is sent again
on a new connection, reads and writes alike, until it gets an answer or its
``timeout`` runs out; the daemon applies a write at most once.
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
from ._conn import Connection
from ._discover import discover
from ._errors import Error, TooLarge
from ._ops import Id, Ops
from ._wire import DEFAULT_MAX_LINE_BYTES, READ_OPS, ProtocolDesync, Reply, desync_error, encode_request

__all__ = ["Client", "Id"]

_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class _Broken(Exception):
    """The connection broke before the answer came. ``reached``: the request may
    have reached the daemon."""

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
    return struct.pack("ll", sec, max(int((seconds - sec) * 1e6), 1 if sec == 0 else 0))


class _Sock:
    """One socket and its sans-I/O Connection; used by one thread at a time."""

    __slots__ = ("sock", "conn", "used", "tv", "__weakref__")

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.conn = Connection()
        self.used = False
        self.tv = -1.0
        self.set_timeout(timeout)

    def set_timeout(self, timeout: float) -> None:
        # Kernel-side timeouts (no poll() before every recv as settimeout would do);
        # set again only when a call asks for another timeout.
        if timeout != self.tv:
            tv = _timeval(max(timeout, 0.001))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            self.tv = timeout

    def peer_closed(self) -> bool:
        """True when the daemon has closed this (idle) connection: EOF is waiting."""
        try:
            return self.sock.recv(1, _PEEK_FLAGS) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def roundtrip(self, data: bytes, rid: int, deadline: float) -> Reply:
        sock, conn = self.sock, self.conn
        self.used = True
        conn.send(rid, data, None)
        try:
            sent = sock.send(data)
        except OSError:
            # Nothing was sent. A refused peer's `forbidden` line may be waiting.
            left = self._leftover()
            if left is not None:
                return left
            raise _Broken(reached=False) from None
        if sent < len(data):
            try:
                sock.sendall(data[sent:])
            except OSError:
                raise _Broken(reached=True) from None
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    continue  # a slow multi-chunk line: the per-recv timeout restarted
                raise _TimedOut from None
            except ConnectionResetError:
                # One line in flight, so it was the last written; an answer begun
                # shows the daemon read it all the same.
                raise _Broken(_reconnect.reached_daemon(0, 1, reset=not conn.answer_begun)) from None
            except OSError:
                raise _Broken(reached=True) from None
            if not chunk:
                raise _Broken(reached=True)
            for _tag, reply in conn.receive_data(chunk):
                return reply
            if conn.refusal is not None:
                return Reply(None, False, conn.refusal, False, True, False)

    def _leftover(self) -> Optional[Reply]:
        """An answer line already waiting on a connection the daemon closed (it
        refused this peer), or None."""
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except OSError:
            return None
        try:
            for _tag, reply in self.conn.receive_data(data):
                return reply
        except ProtocolDesync:
            return None
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

    ``socket``: the daemon's socket (default: found as the command line does, see
    docs/python.md). ``timeout``: seconds a call may take, resends included (each
    call may pass its own ``timeout=``). ``connect_timeout``: seconds to wait for
    the daemon to accept a connection (covers a daemon restart). ``max_idle``:
    connections kept open for reuse. ``max_line_bytes``: the daemon's
    ``server.max_line_bytes``; a longer request is refused before it is sent.
    """

    def __init__(
        self,
        socket: "Optional[Union[str, os.PathLike[str]]]" = None,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        max_idle: int = 8,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        found = discover(socket)
        self.socket_path = found.path
        self._where = found.where()
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_line_bytes = int(max_line_bytes)
        self._max_idle = max_idle
        self._idle: List[_Sock] = []
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

    def _acquire(self, deadline: float, timeout: float) -> _Sock:
        try:
            s = self._idle.pop()
        except IndexError:
            connect_by = min(time.monotonic() + self.connect_timeout, deadline)
            s = _Sock(connect_unix(self.socket_path, connect_by, self._where), timeout)
        s.set_timeout(timeout)
        return s

    def _release(self, s: _Sock) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            s.close()
        else:
            self._idle.append(s)

    def call(self, op: str, *, timeout: Optional[float] = None, **params: Any) -> Dict[str, Any]:
        """Sends one request and returns its ``result``; raises an ``apikeyd.Error``
        subclass for an error answer. ``None`` parameters are left out. A write gets
        a fresh ``idempotency_key`` unless one is given. ``timeout``: this call's,
        instead of the client's."""
        t = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + t
        is_read = op in READ_OPS
        if not is_read and params.get("idempotency_key") is None:
            params["idempotency_key"] = _reconnect.new_idempotency_key()
        rid = next(self._ids)
        data = encode_request(op, rid, params)
        if len(data) - 1 > self.max_line_bytes:
            raise TooLarge(
                f"`{op}`: the request is {len(data) - 1} bytes, over the daemon's limit of "
                f"{self.max_line_bytes} (server.max_line_bytes); it was not sent"
            )
        maybe = False
        attempt = 0
        while True:
            try:
                s = self._acquire(deadline, t)
            except Error as e:
                raise _reconnect.with_maybe(e, maybe) from None
            if not is_read and s.used and s.peer_closed():
                s.close()  # closed while idle: nothing was sent on it
                continue
            fresh = not s.used
            try:
                reply = s.roundtrip(data, rid, deadline)
            except _Broken as broken:
                s.close()
                maybe = maybe or (not is_read and broken.reached)
                if not fresh:
                    continue  # a pooled connection a restart killed: try the next one
                attempt += 1
                if attempt > _reconnect.RETRIES or time.monotonic() >= deadline:
                    raise _reconnect.keeps_closing(op, maybe) from None
                time.sleep(max(0.0, min(_reconnect.backoff(attempt), deadline - time.monotonic())))
                continue
            except _TimedOut:
                s.close()  # its answer may still come: the connection is out of step
                raise _reconnect.no_answer(op, t, maybe or not is_read) from None
            except ProtocolDesync:
                s.close()
                raise desync_error() from None
            except BaseException:
                s.close()  # e.g. KeyboardInterrupt mid-call: the connection is out of step
                raise
            if reply.closing or reply.not_applied:
                s.close()
            else:
                self._release(s)
            if reply.ok:
                return reply.value  # type: ignore[no-any-return]
            if reply.not_applied and attempt < _reconnect.RETRIES and time.monotonic() < deadline:
                attempt += 1  # a daemon shutting down did not run it: the next one will
                time.sleep(max(0.0, min(_reconnect.backoff(attempt), deadline - time.monotonic())))
                continue
            raise reply.value
