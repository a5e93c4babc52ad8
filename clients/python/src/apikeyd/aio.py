"""The asyncio client: calls from many tasks are pipelined on a small pool of
connections; responses are matched to requests in FIFO order by the protocol
callback (no reader task), so a cancelled or timed-out call leaves its slot in the
queue and its answer is simply dropped when it arrives.

Reconnect rules (apikeyd._reconnect): a read lost with its connection is sent again
on a new one; a write is sent again only when it provably never reached the daemon
(here: the connection was already seen closed before the write, the write was never
handed to the socket, or the connection was reset with that write as the last line
written, which on a Unix socket means the daemon never read its final newline);
otherwise the caller gets DaemonUnreachable.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import select
import time
from collections import deque
from typing import Any, Callable, Coroutine, Deque, Dict, List, Optional, Type, Union

from . import _reconnect
from ._discover import discover
from ._errors import DaemonUnreachable, Error
from ._ops import Ops
from ._wire import READ_OPS, ProtocolDesync, decode_response, desync_error, encode_request

__all__ = ["AsyncClient"]

_HUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


class _Entry:
    __slots__ = ("op", "data", "rid", "fut", "is_read", "timer", "tries")

    def __init__(self, op: str, data: bytes, rid: int, fut: "asyncio.Future[Any]", is_read: bool) -> None:
        self.op = op
        self.data = data
        self.rid = rid
        self.fut = fut
        self.is_read = is_read
        self.timer: Optional[asyncio.TimerHandle] = None
        self.tries = 0


class _Protocol(asyncio.Protocol):
    """One connection: writes lines, matches answer lines to the FIFO of requests."""

    def __init__(self, client: "AsyncClient") -> None:
        self.client = client
        self.pending: Deque[_Entry] = deque()
        self.buf = b""
        self.transport: Optional[asyncio.Transport] = None
        self.closed = False
        self.poller: Optional["select.poll"] = None
        self.refusal: Optional[Error] = None
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
            if self.refusal is not None:
                if entry.timer is not None:
                    entry.timer.cancel()
                entry.fut.set_exception(self.refusal)
            else:
                self.client._resend(entry)
            return
        self.pending.append(entry)
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
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        pending = self.pending
        for line in lines:
            if not line or line.isspace():
                continue
            if not pending:
                # Before any request: the daemon refusing this peer (`forbidden`, id
                # null, then it closes). Later writes on this connection get it.
                try:
                    ok, value, closing = decode_response(line, -1)
                except ProtocolDesync:
                    ok, closing = True, False
                if not ok and closing:
                    self.refusal = value
                    self.closed = True
                    continue
                self._fail_all(desync_error())
                return
            entry = pending.popleft()
            if entry.timer is not None:
                entry.timer.cancel()
            fut = entry.fut
            try:
                ok, value, closing = decode_response(line, entry.rid)
            except ProtocolDesync:
                if not fut.done():
                    fut.set_exception(desync_error())
                self._fail_all(desync_error())
                return
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            if closing:
                if value.code == "forbidden":
                    # The peer itself is refused: every request on it gets the answer.
                    self._fail_all(value)
                    return
                self.closed = True

    def _fail_all(self, err: Error) -> None:
        self.closed = True
        self.outbuf = []
        pending, self.pending = self.pending, deque()
        for entry in pending:
            if entry.timer is not None:
                entry.timer.cancel()
            if not entry.fut.done():
                entry.fut.set_exception(type(err)(err.message, err.code))  # one instance per task
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        self.closed = True
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        if self.pending and isinstance(exc, OSError) and self.transport is not None:
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
        pending, self.pending = self.pending, deque()
        if not pending:
            return
        # Entries still in outbuf were never handed to the socket.
        unsent = len(self.outbuf)
        self.outbuf = []
        sent = len(pending) - unsent
        reset = isinstance(exc, (ConnectionResetError, BrokenPipeError))
        for i, entry in enumerate(pending):
            if entry.fut.done():
                continue
            if _reconnect.may_resend(entry.is_read, _reconnect.reached_daemon(i, sent, reset)):
                self.client._resend(entry)
            else:
                if entry.timer is not None:
                    entry.timer.cancel()
                entry.fut.set_exception(_reconnect.lost_write(entry.op))


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

    ``socket``, ``timeout`` and ``connect_timeout`` are as for ``apikeyd.Client``.
    Bound to the event loop that first uses it.
    """

    def __init__(
        self,
        socket: "Optional[Union[str, os.PathLike[str]]]" = None,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        connections: int = 2,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        found = discover(socket)
        self.socket_path = found.path
        self._where = found.where()
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self._slots: List[Optional[_Protocol]] = [None] * connections
        self._connecting: List[Optional["asyncio.Task[_Protocol]"]] = [None] * connections
        self._rr = itertools.cycle(range(connections))
        self._ids = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def __repr__(self) -> str:
        return f"AsyncClient(socket={self.socket_path!r}, timeout={self.timeout}, connections={len(self._slots)})"

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connections; calls still waiting get DaemonUnreachable (a later
        call opens new connections)."""
        for i, proto in enumerate(self._slots):
            self._slots[i] = None
            if proto is not None:
                proto._fail_all(DaemonUnreachable("the client was closed before the daemon answered"))

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
                return proto
            except (FileNotFoundError, ConnectionRefusedError, asyncio.TimeoutError) as exc:
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
            self._connecting[slot] = None

    async def _connection(self, slot: int) -> _Protocol:
        """The live connection of ``slot``, opened once for every waiter. The opening
        runs in its own task, so a cancelled caller does not fail the others."""
        task = self._connecting[slot]
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open_slot(slot))
            self._connecting[slot] = task
        return await asyncio.shield(task)

    async def _submit(self, entry: _Entry) -> None:
        """Writes ``entry`` on a live connection (connecting if needed)."""
        slot = next(self._rr)
        proto = self._slots[slot]
        if proto is None or proto.closed or (_reconnect.peek_before_sending(entry.is_read) and proto.peer_closed()):
            if proto is not None:
                proto.closed = True
                self._slots[slot] = None
            proto = await self._connection(slot)
        proto.send(entry)

    def _resend(self, entry: _Entry) -> None:
        entry.tries += 1
        if _reconnect.gave_up(entry.tries):
            if entry.timer is not None:
                entry.timer.cancel()
            entry.fut.set_exception(_reconnect.keeps_closing(entry.op))
            return

        async def again() -> None:
            try:
                await self._submit(entry)
            except Error as exc:
                if not entry.fut.done():
                    entry.fut.set_exception(exc)

        asyncio.get_running_loop().create_task(again())

    def _expire(self, entry: _Entry) -> None:
        if not entry.fut.done():
            entry.fut.set_exception(_reconnect.no_answer(entry.op, self.timeout))

    async def call(self, op: str, **params: Any) -> Dict[str, Any]:
        """Sends one request and returns its ``result``; raises an ``apikeyd.Error``
        subclass for an error answer. ``None`` parameters are left out."""
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        entry = _Entry(op, encode_request(op, rid, params), rid, loop.create_future(), op in READ_OPS)
        entry.timer = loop.call_at(loop.time() + self.timeout, self._expire, entry)
        try:
            await self._submit(entry)
        except BaseException:
            entry.timer.cancel()
            raise
        return await entry.fut  # type: ignore[no-any-return]
