"""A scripted stand-in for apikeyd, for the cases a real daemon cannot be made to
produce on demand: a connection lost at an exact point, or a crafted answer line."""

from __future__ import annotations

import json
import os
import select
import socket
import tempfile
import threading
from typing import Callable, List, Optional


class FakeDaemon:
    """Accepts connections one by one; ``script[i]`` decides what connection ``i``
    does (the last entry repeats):

    - ``"answer"``: answers every line with ``{"ok": true, "result": {"n": lines seen}}``
      until the client closes.
    - ``"answer_one_then_close"``: answers one line, then closes.
    - ``"read_then_close"``: reads one whole line (it counts as seen), closes unanswered.
    - ``"close_unread"``: waits until request bytes arrive, closes without reading them
      (the client sees ECONNRESET).
    - ``"full"``: sends the daemon's past-max_connections line and closes.
    - a callable ``f(line: dict) -> bytes``: answers every line with what it returns.
    """

    def __init__(self, script: List) -> None:
        self.dir = tempfile.mkdtemp(prefix="apikeyd-fake")
        self.path = os.path.join(self.dir, "fake.sock")
        self.script = script
        self.seen: List[dict] = []
        self.lock = threading.Lock()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(16)
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        i = 0
        while not self.stopped:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            how = self.script[min(i, len(self.script) - 1)]
            i += 1
            threading.Thread(target=self._handle, args=(conn, how), daemon=True).start()

    def _lines(self, conn: socket.socket):
        buf = b""
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                with self.lock:
                    self.seen.append(req)
                yield req
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk

    def _handle(self, conn: socket.socket, how) -> None:
        try:
            if how == "full":
                conn.sendall(b'{"id":null,"ok":false,"error":{"code":"unavailable","message":"too many connections"}}\n')
                conn.close()
                return
            if how == "close_unread":
                select.select([conn], [], [], 10)
                conn.close()
                return
            for req in self._lines(conn):
                if how == "read_then_close":
                    break
                if callable(how):
                    conn.sendall(how(req))
                else:
                    n = len(self.seen)
                    conn.sendall(json.dumps({"id": req.get("id"), "ok": True, "result": {"n": n}}).encode() + b"\n")
                if how == "answer_one_then_close":
                    break
        except OSError:
            pass
        finally:
            conn.close()

    def ops(self) -> List[str]:
        with self.lock:
            return [r["op"] for r in self.seen]

    def close(self) -> None:
        self.stopped = True
        self.srv.close()
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass
