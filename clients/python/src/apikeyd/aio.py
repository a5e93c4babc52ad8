"""The asyncio client: calls from many tasks are pipelined on a small pool of
connections; responses are matched to requests in FIFO order by the protocol
callback through the sans-I/O apikeyd._conn.Connection (no reader task), so a
cancelled or timed-out call leaves its slot in the queue and its answer is simply
dropped when it arrives.

Resends (apikeyd._reconnect): every write carries an idempotency key, so a request
whose connection broke is sent again on a new one, reads and writes alike, after a
short backoff, until it is answered or its ``timeout`` runs out.

Event loops: a client belongs to the loop that first used it. Used from another
loop while that one is still open it raises WrongEventLoop; once its loop is
closed (``asyncio.run`` returned), the next loop that uses it takes it over with new
connections.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import select
import time
from typing import Any, Callable, Coroutine, Dict, List, Optional, Type, Union

from . import _reconnect
from ._conn import Connection
from ._discover import discover
from ._errors import DaemonUnreachable, Error, TooLarge, WrongEventLoop
from ._ops import Ops
from ._wire import DEFAULT_MAX_LINE_BYTES, READ_OPS, ProtocolDesync, Reply, desync_error, encode_request

__all__ = ["AsyncClient"]

_HUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def _retrieve(fut: "asyncio.Future[Any]") -> None:
    # Marks an exception as seen, so that a future nobody awaits any more (its caller
    # was cancelled) never logs "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class _Entry:
    __slots__ = ("op", "data", "rid", "fut", "is_read", "timer", "attempt", "maybe", "sent", "deadline", "timeout")

    def __init__(self, op: str, data: bytes, rid: int, fut: "asyncio.Future[Any]", is_read: bool,
                 deadline: float, timeout: float) -> None:
        self.op = op
        self.data = data
        self.rid = rid
        self.fut = fut
        self.is_read = is_read
        self.timer: Optional[asyncio.TimerHandle] = None
        self.attempt = 0
        self.maybe = False  # a write that may have been applied by an earlier attempt
        self.sent = False
        self.deadline = deadline  # loop.time()
        self.timeout = timeout

    def finish(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.fut.done():
            return
        if error is not None:
            self.fut.set_exception(error)
        else:
            self.fut.set_result(result)


def _drop_transport(transport: Optional[asyncio.BaseTransport]) -> None:
    """Closes a transport, also one whose loop is already closed."""
    if transport is None:
        return
    try:
        transport.abort()  # type: ignore[attr-defined]
    except RuntimeError:
        # Its loop is closed, so the transport cannot close itself: close its socket
        # here, and take it from the transport, which would otherwise warn of an
        # unclosed transport when collected.
        sock = getattr(transport, "_sock", None)
        if sock is not None:
            transport._sock = None  # type: ignore[attr-defined]
            sock.close()


class _Protocol(asyncio.Protocol):
    """One connection: writes lines, hands answers to their requests."""

    def __init__(self, client: "AsyncClient") -> None:
        self.client = client
        self.conn = Connection()
        self.transport: Optional[asyncio.Transport] = None
        self.closed = False
        self.poller: Optional["select.poll"] = None
        self.outbuf: List[bytes] = []
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.poller = select.poll()
            self.poller.register(sock.fileno(), _HUP)

    def peer_closed(self) -> bool:
        """The daemon closed this connection but the loop has not seen it yet."""
        if self.closed:
            return True
        if self.poller is None:
            return False
        for _fd, mask in self.poller.poll(0):
            if mask & _HUP:
                return True
        return False

    def send(self, entry: _Entry) -> None:
        if entry.fut.done():
            return  # timed out or cancelled while waiting for a connection: never sent
        if self.closed:
            # Closed between the connect and this write: nothing was sent.
            if self.conn.refusal is not None:
                entry.finish(error=type(self.conn.refusal)(self.conn.refusal.message, self.conn.refusal.code))
            else:
                self.client._resend(entry, reached=False)
            return
        self.conn.send(entry.rid, entry.data, entry)
        entry.sent = True
        # Lines written in one loop iteration go out in one send (the daemon then
        # answers them in one write too): far fewer syscalls under load.
        self.outbuf.append(entry.data)
        if len(self.outbuf) == 1:
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        out, self.outbuf = self.outbuf, []
        if out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.conn.receive_data(data)
        except ProtocolDesync:
            self._fail_all(desync_error())
            return
        for entry, reply in replies:
            if reply.not_applied:
                self.closed = True  # the daemon is stopping: new requests go to a new one
            self.client._answered(entry, reply)
            if reply.closing:
                if reply.value.code == "forbidden":
                    # The peer itself is refused: every request on it gets the answer.
                    self._fail_all(reply.value)
                    return
                self.closed = True
        if self.conn.refusal is not None:
            self.closed = True

    def _fail_all(self, err: Error) -> None:
        self.closed = True
        self.outbuf = []
        for entry in self.conn.take_pending():
            entry.finish(error=type(err)(err.message, err.code))  # one instance per task
        _drop_transport(self.transport)

    def eof_received(self) -> bool:
        self.closed = True
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        if self.conn.pending and isinstance(exc, OSError) and self.transport is not None:
            # A write failed before the loop read what the daemon had sent (a refused
            # peer gets one `forbidden` line, then the close): read it now, the socket
            # is still open during this callback.
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    leftover = os.read(sock.fileno(), 65536)
                except OSError:
                    leftover = b""
                if leftover:
                    self.data_received(leftover)
        entries = self.conn.take_pending()
        if not entries:
            return
        # Entries still in outbuf were never handed to the socket.
        unsent = len(self.outbuf)
        self.outbuf = []
        sent = len(entries) - unsent
        reset = isinstance(exc, (ConnectionResetError, BrokenPipeError))
        for i, entry in enumerate(entries):
            if not entry.fut.done():
                self.client._resend(entry, _reconnect.reached_daemon(i, sent, reset))


_Result = Coroutine[Any, Any, Dict[str, Any]]


def _async_ops(cls: "Type[AsyncClient]") -> "Type[AsyncClient]":
    """Gives ``cls`` each op method of Ops as an ``async def`` (same name, signature
    and docstring), so that ``inspect.iscoroutinefunction`` is true of them. The Ops
    method returns ``self.call(...)``, a coroutine here, which the new one awaits.
    Type checkers see the Ops method itself: it returns that coroutine."""

    def coroutine_method(name: str, shared: Callable[..., _Result]) -> Callable[..., _Result]:
        @functools.wraps(shared)
        async def method(self: AsyncClient, *args: Any, **kwargs: Any) -> Dict[str, Any]:
            return await shared(self, *args, **kwargs)

        method.__qualname__ = f"{cls.__qualname__}.{name}"
        method.__module__ = cls.__module__
        return method

    for name, shared in vars(Ops).items():
        if callable(shared) and not name.startswith("_") and name != "call":
            setattr(cls, name, coroutine_method(name, shared))
    return cls


@_async_ops
class AsyncClient(Ops[_Result]):
    """asyncio apikeyd client. Many tasks may call it at once: requests are
    pipelined over ``connections`` connections (opened on first use). The op
    methods (``get_user_api_key``, ...) are ``apikeyd._ops.Ops``'s, made coroutines.

    ``socket``, ``timeout``, ``connect_timeout`` and ``max_line_bytes`` are as for
    ``apikeyd.Client``. Bound to the event loop that first uses it (see the module
    docstring). ``aclose()`` (or ``close()``, or ``async with``) closes it.
    """

    def __init__(
        self,
        socket: "Optional[Union[str, os.PathLike[str]]]" = None,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        connections: int = 2,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        found = discover(socket)
        self.socket_path = found.path
        self._where = found.where()
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_line_bytes = int(max_line_bytes)
        self._slots: List[Optional[_Protocol]] = [None] * connections
        self._connecting: List[Optional["asyncio.Task[_Protocol]"]] = [None] * connections
        self._rr = itertools.cycle(range(connections))
        self._ids = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        #: Why the last connect attempt failed, while connecting is being retried.
        self._connect_error: Optional[BaseException] = None

    def __repr__(self) -> str:
        return f"AsyncClient(socket={self.socket_path!r}, timeout={self.timeout}, connections={len(self._slots)})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connections; calls still waiting get DaemonUnreachable (a later
        call opens new connections)."""
        self._drop(DaemonUnreachable("the client was closed before the daemon answered"))
        await asyncio.sleep(0)  # the transports close their sockets in the next turn

    #: ``close()`` is ``aclose()`` (as in earlier versions).
    close = aclose

    def _drop(self, err: Error) -> None:
        for i, proto in enumerate(self._slots):
            self._slots[i] = None
            if proto is not None:
                proto._fail_all(err)
        for i, task in enumerate(self._connecting):
            self._connecting[i] = None
            if task is not None and not task.done():
                task.cancel()

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            old = self._loop
            if old is not None and not old.is_closed():
                raise WrongEventLoop(
                    "this AsyncClient belongs to another event loop that is still open; "
                    "make one client per event loop (apikeyd.manage_api_keys does)"
                )
            # First use, or its loop was closed: take it over with new connections.
            self._abandon()
            self._loop = loop
        return loop

    def _abandon(self) -> None:
        """Forgets the connections, closing their sockets, without needing their
        loop (which may be closed): for a client whose loop is gone."""
        for i, proto in enumerate(self._slots):
            self._slots[i] = None
            if proto is not None:
                proto.closed = True
                _drop_transport(proto.transport)
        self._connecting = [None] * len(self._slots)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.connect_timeout
        waits = _reconnect.connect_waits(deadline)
        while True:
            try:
                left = max(deadline - time.monotonic(), 0.001)
                _t, proto = await asyncio.wait_for(
                    loop.create_unix_connection(lambda: _Protocol(self), self.socket_path), left
                )
                self._connect_error = None
                return proto
            except (FileNotFoundError, ConnectionRefusedError, asyncio.TimeoutError) as exc:
                self._connect_error = exc
                wait = next(waits, None)
                if wait is None:
                    raise _reconnect.unreachable(self.socket_path, exc, self._where) from None
                await asyncio.sleep(wait)
            except OSError as exc:
                raise _reconnect.cannot_connect(self.socket_path, exc) from None

    async def _open_slot(self, slot: int) -> _Protocol:
        try:
            proto = await self._open()
            self._slots[slot] = proto
            return proto
        finally:
            if self._connecting[slot] is asyncio.current_task():
                self._connecting[slot] = None

    def _live(self, slot: int, entry: _Entry) -> Optional[_Protocol]:
        proto = self._slots[slot]
        if proto is None:
            return None
        if proto.closed or (not entry.is_read and proto.peer_closed()):
            proto.closed = True
            self._slots[slot] = None
            return None
        return proto

    def _submit(self, entry: _Entry) -> None:
        """Writes ``entry`` on a live connection, or connects first in a task."""
        slot = next(self._rr)
        proto = self._live(slot, entry)
        if proto is not None:
            proto.send(entry)
            return
        task = self._connecting[slot]
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open_slot(slot))
            task.add_done_callback(_retrieve)
            self._connecting[slot] = task

        def connected(t: "asyncio.Task[_Protocol]") -> None:
            if t.cancelled():
                entry.finish(error=DaemonUnreachable("the client was closed before the request was sent"))
                return
            exc = t.exception()
            if exc is not None:
                err = exc if isinstance(exc, Error) else DaemonUnreachable(f"cannot connect: {exc!r}")
                if isinstance(err, Error):
                    err = type(err)(err.message, err.code)  # one instance per task
                entry.finish(error=_reconnect.with_maybe(err, entry.maybe))
                return
            t.result().send(entry)

        task.add_done_callback(connected)

    def _resend(self, entry: _Entry, reached: bool) -> None:
        """Sends ``entry`` again after a backoff, unless its tries or time are spent."""
        entry.maybe = entry.maybe or (not entry.is_read and reached)
        entry.attempt += 1
        loop = asyncio.get_running_loop()
        left = entry.deadline - loop.time()
        if entry.attempt > _reconnect.RETRIES or left <= 0:
            entry.finish(error=_reconnect.keeps_closing(entry.op, entry.maybe))
            return
        loop.call_later(min(_reconnect.backoff(entry.attempt), left), self._submit_again, entry)

    def _submit_again(self, entry: _Entry) -> None:
        if not entry.fut.done() and self._loop is asyncio.get_running_loop():
            self._submit(entry)

    def _answered(self, entry: _Entry, reply: Reply) -> None:
        if entry.fut.done():
            return  # timed out or cancelled: its answer is dropped
        if reply.ok:
            entry.finish(reply.value)
        elif reply.not_applied and entry.attempt < _reconnect.RETRIES:
            self._resend(entry, reached=False)  # a daemon shutting down did not run it
        else:
            entry.finish(error=reply.value)

    def _expire(self, entry: _Entry) -> None:
        if entry.fut.done():
            return
        if not entry.sent and self._connect_error is not None:
            # Still waiting for a daemon to accept: say so, as a connect that ran out would.
            err = _reconnect.unreachable(self.socket_path, self._connect_error, self._where)
            entry.fut.set_exception(_reconnect.with_maybe(err, entry.maybe))
            return
        maybe = entry.maybe or (not entry.is_read and entry.sent)
        entry.fut.set_exception(_reconnect.no_answer(entry.op, entry.timeout, maybe))

    async def call(self, op: str, *, timeout: Optional[float] = None, **params: Any) -> Dict[str, Any]:
        """Sends one request and returns its ``result``; raises an ``apikeyd.Error``
        subclass for an error answer. ``None`` parameters are left out. A write gets
        a fresh ``idempotency_key`` unless one is given. ``timeout``: this call's,
        instead of the client's."""
        loop = self._bind()
        t = self.timeout if timeout is None else float(timeout)
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
        fut = loop.create_future()
        deadline = loop.time() + t
        entry = _Entry(op, data, rid, fut, is_read, deadline, t)
        entry.timer = loop.call_at(deadline, self._expire, entry)
        fut.add_done_callback(_retrieve)
        self._submit(entry)
        try:
            return await fut  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            entry.timer.cancel()
            raise
