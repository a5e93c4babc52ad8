"""``python clients/python/bench/bench.py``: apikeyd's Python clients against redis-py's HGET.

Measures, in one run and on one machine: the blocking Client (1 thread) and the
AsyncClient (``--tasks`` tasks) asking for a cached user key and a cached pool key,
and redis-py's sync and asyncio ``HGET`` of one field on a private redis-server
(over its Unix socket). Prints calls/s and the apikeyd/redis-py ratio.

By default it starts its own daemon ($APIKEYD_BIN, else ``apikeyd`` on PATH, else
target/release or target/debug of this repo) and its own redis-server; ``--socket``
and ``--redis`` use running ones instead. redis-py is a bench-only dependency:
``pip install redis``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from apikeyd import AsyncClient, Client

USER_KEY = "sk-bench-user-0123456789abcdef"
POOL_KEY = "sk-bench-pool-fedcba9876543210"
LIMIT = 10**9  # consume is always allowed: the bench measures the counting


def _find_bin(explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    if os.environ.get("APIKEYD_BIN"):
        return os.environ["APIKEYD_BIN"]
    on_path = shutil.which("apikeyd")
    if on_path:
        return on_path
    here = Path.cwd()
    for kind in ("release", "debug"):
        p = here / "target" / kind / "apikeyd"
        if p.exists():
            return str(p)
    sys.exit("bench: no apikeyd binary; pass --apikeyd-bin, set APIKEYD_BIN, or give --socket")


def _wait(pred: Callable[[], bool], what: str, proc: "subprocess.Popen[bytes]") -> None:
    deadline = time.monotonic() + 20
    while not pred():
        if proc.poll() is not None:
            sys.exit(f"bench: {what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"bench: {what} not ready in 20 s")
        time.sleep(0.01)


def _answers(path: str, probe: bytes, expect: bytes) -> bool:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    try:
        s.connect(path)
        s.sendall(probe)
        return s.recv(4096).startswith(expect)
    except OSError:
        return False
    finally:
        s.close()


class Services:
    """The daemon and redis-server under test (started here unless given)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.procs: "List[subprocess.Popen[bytes]]" = []
        self.tmp = tempfile.mkdtemp(prefix="apikeyd-pybench")
        if args.redis:
            self.redis = args.redis
        else:
            exe = shutil.which("redis-server")
            if exe is None:
                sys.exit("bench: redis-server is not installed (apt-get install redis-server), or pass --redis")
            self.redis = os.path.join(self.tmp, "redis.sock")
            p = subprocess.Popen(
                [exe, "--port", "0", "--unixsocket", self.redis, "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--dir", self.tmp],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            self.procs.append(p)
            _wait(lambda: _answers(self.redis, b"PING\r\n", b"+PONG"), "redis-server", p)
        if args.socket:
            self.socket = args.socket
        else:
            self.socket = os.path.join(self.tmp, "apikeyd.sock")
            cfg = os.path.join(self.tmp, "config.toml")
            with open(cfg, "w") as f:
                f.write('log.level = "warn"\n[server]\nsocket = "apikeyd.sock"\n'
                        '[keystore]\npath = "data/keystore.sqlite3"\nmaster_key_file = "data/master.key"\n')
            log = open(os.path.join(self.tmp, "daemon.log"), "wb")
            env = {k: v for k, v in os.environ.items() if not k.startswith("APIKEYD_")}
            p = subprocess.Popen([_find_bin(args.apikeyd_bin), "serve", "--config", cfg],
                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
            self.procs.append(p)
            _wait(lambda: _answers(self.socket, b'{"op":"ping"}\n', b'{"id":null,"ok":true'), "apikeyd", p)

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _sync_rate(fn: Callable[[], object], seconds: float) -> float:
    for _ in range(200):
        fn()
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= end:
            return n / (now - start)


def _async_rate(make: Callable[[], Callable[[], "asyncio.Future[object]"]], tasks: int, seconds: float) -> float:
    async def main() -> float:
        fn = make()
        await asyncio.gather(*[fn() for _ in range(tasks)])  # warm up, open connections
        stop = False
        count = [0]

        async def worker() -> None:
            n = 0
            while not stop:
                await fn()
                n += 1
            count[0] += n

        start = time.perf_counter()
        workers = [asyncio.ensure_future(worker()) for _ in range(tasks)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*workers)
        return count[0] / (time.perf_counter() - start)

    return asyncio.run(main())


def run(args: argparse.Namespace) -> List[Tuple[str, float, float, float, float]]:
    try:
        import redis
        import redis.asyncio as aredis
    except ImportError:
        sys.exit("bench: redis-py is needed for the baseline: pip install redis (bench only)")
    svc = Services(args)
    try:
        admin = Client(svc.socket)
        admin.set_user_api_key(user_id="bench-user", service="openai", key=USER_KEY)
        admin.add_pool_key(service="benchpool", key=POOL_KEY)
        assert admin.get_user_api_key(user_id="bench-user", service="openai")["key"] == USER_KEY
        assert admin.get_pool_api_key(service="benchpool")["key"] == POOL_KEY
        admin.close()
        r = redis.Redis(unix_socket_path=svc.redis)
        r.hset("bench:user_api_keys:bench-user", "openai", USER_KEY)

        secs, tasks = args.seconds, args.tasks
        c = Client(svc.socket)

        def make_redis() -> Callable[[], Any]:
            ar = aredis.Redis(unix_socket_path=svc.redis, max_connections=tasks)  # one per task
            return lambda: ar.hget("bench:user_api_keys:bench-user", "openai")

        def make_user() -> Callable[[], Any]:
            a = AsyncClient(svc.socket, connections=args.connections)
            return lambda: a.get_user_api_key(user_id="bench-user", service="openai")

        def make_pool() -> Callable[[], Any]:
            a = AsyncClient(svc.socket, connections=args.connections)
            return lambda: a.get_pool_api_key(service="benchpool")

        def make_redis_incr() -> Callable[[], Any]:
            ar = aredis.Redis(unix_socket_path=svc.redis, max_connections=tasks)
            return lambda: ar.incr("bench:quota:async")

        def make_consume() -> Callable[[], Any]:
            a = AsyncClient(svc.socket, connections=args.connections)
            return lambda: a.consume_default_key_usage(user_id="bench-async", tool_name="t", daily_limit=LIMIT)

        # (name, measure, index of the baseline row). Every round measures every case,
        # so a change in the machine's load hits all of them alike; medians are shown.
        cases: List[Tuple[str, Callable[[], float], int]] = [
            ("redis-py sync HGET, 1 thread",
             lambda: _sync_rate(lambda: r.hget("bench:user_api_keys:bench-user", "openai"), secs), 0),
            ("Client, cached user key, 1 thread",
             lambda: _sync_rate(lambda: c.get_user_api_key(user_id="bench-user", service="openai"), secs), 0),
            ("Client, cached pool key, 1 thread",
             lambda: _sync_rate(lambda: c.get_pool_api_key(service="benchpool"), secs), 0),
            ("redis-py sync INCR, 1 thread", lambda: _sync_rate(lambda: r.incr("bench:quota:sync"), secs), 3),
            ("Client, consume (check+increment), 1 thread",
             lambda: _sync_rate(lambda: c.consume_default_key_usage(user_id="bench-sync", tool_name="t",
                                                                    daily_limit=LIMIT), secs), 3),
            (f"redis-py asyncio HGET, {tasks} tasks", lambda: _async_rate(make_redis, tasks, secs), 5),
            (f"AsyncClient, cached user key, {tasks} tasks", lambda: _async_rate(make_user, tasks, secs), 5),
            (f"AsyncClient, cached pool key, {tasks} tasks", lambda: _async_rate(make_pool, tasks, secs), 5),
            (f"redis-py asyncio INCR, {tasks} tasks", lambda: _async_rate(make_redis_incr, tasks, secs), 8),
            (f"AsyncClient, consume, {tasks} tasks", lambda: _async_rate(make_consume, tasks, secs), 8),
        ]
        samples: List[List[float]] = [[] for _ in cases]
        for _ in range(args.rounds):
            for i, (_name, measure, _base) in enumerate(cases):
                samples[i].append(measure())
        c.close()
        medians = [statistics.median(s) for s in samples]
        rows = [(name, min(samples[i]), medians[i], max(samples[i]), medians[i] / medians[base])
                for i, (name, _m, base) in enumerate(cases)]
        return rows
    finally:
        svc.close()


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", help="a running daemon's socket (default: start one)")
    ap.add_argument("--redis", help="a running redis-server's Unix socket (default: start one)")
    ap.add_argument("--apikeyd-bin", help="daemon binary to start (default: $APIKEYD_BIN, PATH, target/)")
    ap.add_argument("--seconds", type=float, default=1.0, help="measuring time per case and round (default 1)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all cases; min/median/max are shown, ratios of medians (default 3)")
    ap.add_argument("--tasks", type=int, default=64, help="asyncio tasks (default 64)")
    ap.add_argument("--connections", type=int, default=2, help="AsyncClient connections (default 2)")
    args = ap.parse_args(argv)
    rows = run(args)
    import importlib.util

    parser = "hiredis" if importlib.util.find_spec("hiredis") else "pure-Python parser"
    import redis

    print(f"python {sys.version.split()[0]}, redis-py {redis.__version__} ({parser}), "
          f"{args.rounds} rounds of {args.seconds:g} s per case, AsyncClient connections={args.connections}")
    print(f"| case | min calls/s | median | max | median vs redis-py |")
    print("|---|---:|---:|---:|---:|")
    for name, lo, med, hi, ratio in rows:
        print(f"| {name} | {lo:,.0f} | {med:,.0f} | {hi:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
