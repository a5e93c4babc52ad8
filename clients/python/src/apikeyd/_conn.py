"""One connection's protocol state without I/O (in the manner of h11): bytes in,
answers out. Both clients hold one ``Connection`` per socket; the line buffering
and the matching of answers to requests live here and nowhere else.

``send(rid, data, tag)`` records a request about to be written (``tag`` is the
caller's handle on it) and returns the bytes to write; ``receive_data(data)`` takes
bytes read from the socket and returns ``(tag, Reply)`` for each answer they
complete, in order. The daemon answers a connection's requests in the order they
were sent, so the oldest pending request owns the next answer; its ``id`` is
checked against the request's.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, List, Optional, Tuple

from ._errors import Error
from ._wire import ProtocolDesync, Reply, decode_line

__all__ = ["Connection"]


class Connection:
    __slots__ = ("_buf", "pending", "refusal")

    def __init__(self) -> None:
        self._buf = b""
        #: (request id, tag) of the requests written and not yet answered, oldest first.
        self.pending: Deque[Tuple[int, Any]] = deque()
        #: The daemon's refusal of this peer (``forbidden``/``unavailable`` with ``id``
        #: null before any request), after which it closes the connection.
        self.refusal: Optional[Error] = None

    def send(self, rid: int, data: bytes, tag: Any) -> bytes:
        self.pending.append((rid, tag))
        return data

    def receive_data(self, data: bytes) -> List[Tuple[Any, Reply]]:
        """The answers ``data`` completes. Raises ProtocolDesync when a line is not
        an answer to the request it should answer (the connection must be dropped)."""
        if self._buf:
            data = self._buf + data
        lines = data.split(b"\n")
        self._buf = lines.pop()
        out: List[Tuple[Any, Reply]] = []
        pending = self.pending
        for line in lines:
            if not line or line.isspace():
                continue
            reply = decode_line(line)
            if not pending:
                if not reply.ok and reply.closing:
                    self.refusal = reply.value
                    continue
                raise ProtocolDesync("an answer came that no request asked for")
            rid, tag = pending.popleft()
            if reply.rid is not None and reply.rid != rid:
                raise ProtocolDesync("a response came back for another request")
            if reply.ok and reply.rid is None:
                raise ProtocolDesync("a success answer without the request's id")
            out.append((tag, reply))
        return out

    @property
    def answer_begun(self) -> bool:
        """Part of an answer line has come (so the daemon read the request it answers)."""
        return bool(self._buf)

    def take_pending(self) -> List[Any]:
        """The tags of the requests still unanswered, oldest first; forgets them."""
        tags = [tag for _rid, tag in self.pending]
        self.pending.clear()
        return tags
