"""``bash clients/python/bench/run.sh``: apikeyd's Python clients side by side with
redis-py and with a stand-in for the original module, in one run.

For three operations (a user key, a pool key, check + increment of a daily counter)
at 1 and ``--callers`` (64) concurrent callers, it measures in every round:

- redis-py, sync (threads) and asyncio (tasks): ``HGET`` of one hash field for the
  reads, ``INCR`` + ``EXPIRE`` in one pipeline for the counter (the baselines);
- the blocking ``apikeyd.Client`` (threads), the ``apikeyd.AsyncClient`` (tasks) and
  the drop-in ``apikeyd.manage_api_keys`` functions (tasks);
- ``original_standin``: a STAND-IN for the original ``tools.manage_api_keys`` module
  run in-process, reconstructed from the original's described behaviour (SQLite +
  Fernet for a user key, one Redis round trip for a pool pick, GET then INCR+EXPIRE);
  not the original's code (see original_standin.py).

Each case runs ``--seconds`` in each of ``--rounds`` rounds (every case in every
round, so a change in the machine's load hits all alike); it prints a markdown table
of min/median/max calls/s and the ratios of medians, with the command, date, load
average, versions and the daemon's mode.

It starts its own daemon ($APIKEYD_BIN, else ``apikeyd`` on PATH, else target/release
or target/debug of this repo) and its own redis-server, or uses running ones
(``--socket``/``--redis``). redis-py and cryptography are bench-only dependencies;
run.sh installs them into a virtualenv of the bench's own.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apikeyd  # noqa: E402
import original_standin  # noqa: E402
from apikeyd import AsyncClient, Client  # noqa: E402
from apikeyd import manage_api_keys as dropin  # noqa: E402

USER_KEY = "sk-bench-user-0123456789abcdef"
POOL_KEYS = ["sk-bench-pool-0-fedcba9876543210", "sk-bench-pool-1-fedcba9876543210",
             "sk-bench-pool-2-fedcba9876543210"]
USER, SERVICE, POOL, TOOL = "bench-user", "openai", "benchpool", "web_search"
LIMIT = 10**9  # every check+increment is allowed: the bench measures the counting
DAEMON_PREFIX = "bench"  # the daemon's Redis prefix; the stand-in uses the original's
BASELINE_HASH = "baseline:user_api_keys:bench-user"


def _find_bin(explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    if os.environ.get("APIKEYD_BIN"):
        return os.environ["APIKEYD_BIN"]
    on_path = shutil.which("apikeyd")
    if on_path:
        return on_path
    for kind in ("release", "debug"):
        p = Path.cwd() / "target" / kind / "apikeyd"
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
        self.daemon_bin = "(given by --socket)"
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
            redis_url = f"redis+unix://{self.redis}" if args.mode == "redis" else ""
            with open(cfg, "w") as f:
                f.write('log.level = "warn"\n[server]\nsocket = "apikeyd.sock"\n'
                        '[keystore]\npath = "data/keystore.sqlite3"\nmaster_key_file = "data/master.key"\n'
                        f'[redis]\nurl = "{redis_url}"\nprefix = "{DAEMON_PREFIX}"\n')
            log = open(os.path.join(self.tmp, "daemon.log"), "wb")
            env = {k: v for k, v in os.environ.items() if not k.startswith("APIKEYD_")}
            self.daemon_bin = _find_bin(args.apikeyd_bin)
            rel = os.path.relpath(self.daemon_bin)
            if not rel.startswith(".."):
                self.daemon_bin = rel
            p = subprocess.Popen([self.daemon_bin, "serve", "--config", cfg],
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


# --- measuring ------------------------------------------------------------------

def _sync_rate(fn: Callable[[], object], threads: int, seconds: float) -> float:
    """Calls/s of ``fn`` called in a loop by ``threads`` threads for ``seconds``."""
    if threads == 1:
        for _ in range(200):
            fn()
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            for _ in range(10):
                fn()
            n += 10
            now = time.perf_counter()
            if now >= end:
                return n / (now - start)
    stop = [False]
    counts = [0] * threads
    ready = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        for _ in range(3):  # warm up: each thread's connection is open before the clock starts
            fn()
        ready.wait()
        n = 0
        while not stop[0]:
            fn()
            n += 1
        counts[i] = n

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    ready.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop[0] = True
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


Make = Callable[[], Awaitable[Tuple[Callable[[], Awaitable[object]], Callable[[], Awaitable[None]]]]]


def _async_rate(make: Make, tasks: int, seconds: float) -> float:
    """Calls/s of ``fn`` awaited in a loop by ``tasks`` tasks of one fresh event loop;
    ``make`` (run in that loop) returns ``fn`` and the coroutine that closes its client."""

    async def main() -> float:
        fn, aclose = await make()
        try:
            for _ in range(3):  # warm up, open connections
                await asyncio.gather(*[fn() for _ in range(tasks)])
            count = [0]

            async def worker() -> None:
                # Each task watches the clock itself: a call that never suspends (the
                # stand-in's SQLite read) would starve a timer in the loop.
                n = 0
                while time.perf_counter() < end:
                    await fn()
                    n += 1
                count[0] += n

            start = time.perf_counter()
            end = start + seconds
            await asyncio.gather(*[worker() for _ in range(tasks)])
            return count[0] / (time.perf_counter() - start)
        finally:
            await aclose()

    return asyncio.run(main())


async def _nothing() -> None:
    return None


@dataclass
class Case:
    op: str  # "user key", "pool key", "check+increment"
    callers: int
    who: str  # what is measured, as printed
    measure: Callable[[], float]
    baseline: bool = False  # a redis-py row: what "vs redis-py" divides by
    sync: bool = False  # threads (else asyncio tasks)
    standin: bool = False


def build_cases(svc: Services, args: argparse.Namespace) -> List[Case]:
    import redis
    import redis.asyncio as aredis

    secs = args.seconds
    r = redis.Redis(unix_socket_path=svc.redis)  # thread-safe: one pooled connection per thread
    sock = svc.socket

    def sync_case(op: str, n: int, who: str, call: Callable[[Client], object]) -> Case:
        def measure() -> float:
            # max_idle: each thread keeps its connection between calls, as redis-py's pool does
            c = Client(sock, max_idle=max(n, 8))
            try:
                return _sync_rate(lambda: call(c), n, secs)
            finally:
                c.close()

        return Case(op, n, who, measure, sync=True)

    def redis_sync_case(op: str, n: int, who: str, call: Callable[[], object]) -> Case:
        return Case(op, n, who, lambda: _sync_rate(call, n, secs), baseline=True, sync=True)

    def async_case(op: str, n: int, who: str, make: Make, baseline: bool = False, standin: bool = False) -> Case:
        return Case(op, n, who, lambda: _async_rate(make, n, secs), baseline=baseline, standin=standin)

    def incr_expire_sync() -> object:
        p = r.pipeline(transaction=False)
        p.incr("baseline:quota:sync")
        p.expire("baseline:quota:sync", 86400)
        return p.execute()

    async def make_redis_hget() -> Tuple[Any, Any]:
        ar = aredis.Redis(unix_socket_path=svc.redis)  # its pool: one connection per task
        return (lambda: ar.hget(BASELINE_HASH, SERVICE)), ar.aclose

    async def make_redis_incr() -> Tuple[Any, Any]:
        ar = aredis.Redis(unix_socket_path=svc.redis)

        async def incr() -> object:
            p = ar.pipeline(transaction=False)
            p.incr("baseline:quota:async")
            p.expire("baseline:quota:async", 86400)
            return await p.execute()

        return incr, ar.aclose

    def make_async(call: Callable[[AsyncClient], Awaitable[object]]) -> Make:
        async def make() -> Tuple[Any, Any]:
            a = AsyncClient(sock, connections=args.connections)
            return (lambda: call(a)), a.aclose

        return make

    def make_dropin(call: Callable[[], Awaitable[object]]) -> Make:
        async def make() -> Tuple[Any, Any]:
            return call, _nothing  # the module closes its per-loop client with the loop

        return make

    def make_standin(call: Callable[[Any], Awaitable[object]]) -> Make:
        async def make() -> Tuple[Any, Any]:
            ar = aredis.Redis(unix_socket_path=svc.redis)  # the bot's redis_client
            return (lambda: call(ar)), ar.aclose

        return make

    async def dropin_check_incr() -> None:
        allowed, _count, _limit = await dropin.check_default_key_limit(USER, TOOL, None, daily_limit=LIMIT)
        if allowed:
            await dropin.increment_default_key_usage(USER, TOOL, None)

    async def standin_check_incr(ar: Any) -> None:
        allowed, _count, _limit = await original_standin.check_default_key_limit(USER, TOOL, ar, daily_limit=LIMIT)
        if allowed:
            await original_standin.increment_default_key_usage(USER, TOOL, ar)

    cases: List[Case] = []
    for n in (1, args.callers):
        cases += [
            redis_sync_case("user key", n, "redis-py sync `HGET`", lambda: r.hget(BASELINE_HASH, SERVICE)),
            async_case("user key", n, "redis-py asyncio `HGET`", make_redis_hget, baseline=True),
            sync_case("user key", n, "`Client.get_user_api_key`",
                      lambda c: c.get_user_api_key(user_id=USER, service=SERVICE)),
            async_case("user key", n, "`AsyncClient.get_user_api_key`",
                       make_async(lambda a: a.get_user_api_key(user_id=USER, service=SERVICE))),
            async_case("user key", n, "drop-in `get_user_api_key`",
                       make_dropin(lambda: dropin.get_user_api_key(USER, SERVICE))),
            async_case("user key", n, "original stand-in `get_user_api_key`",
                       make_standin(lambda ar: original_standin.get_user_api_key(USER, SERVICE, redis_client=ar)),
                       standin=True),
            sync_case("pool key", n, "`Client.get_pool_api_key`", lambda c: c.get_pool_api_key(service=POOL)),
            async_case("pool key", n, "`AsyncClient.get_pool_api_key`",
                       make_async(lambda a: a.get_pool_api_key(service=POOL))),
            async_case("pool key", n, "drop-in `get_pool_api_key`",
                       make_dropin(lambda: dropin.get_pool_api_key(POOL))),
            async_case("pool key", n, "original stand-in `get_pool_api_key`",
                       make_standin(lambda ar: original_standin.get_pool_api_key(POOL, redis_client=ar)),
                       standin=True),
            redis_sync_case("check+increment", n, "redis-py sync `INCR`+`EXPIRE` (one pipeline)", incr_expire_sync),
            async_case("check+increment", n, "redis-py asyncio `INCR`+`EXPIRE` (one pipeline)", make_redis_incr,
                       baseline=True),
            sync_case("check+increment", n, "`Client.consume_default_key_usage`",
                      lambda c: c.consume_default_key_usage(user_id=USER, tool_name=TOOL, daily_limit=LIMIT)),
            async_case("check+increment", n, "`AsyncClient.consume_default_key_usage`",
                       make_async(lambda a: a.consume_default_key_usage(user_id=USER, tool_name=TOOL,
                                                                        daily_limit=LIMIT))),
            async_case("check+increment", n, "drop-in `check_default_key_limit` + `increment_default_key_usage`",
                       make_dropin(dropin_check_incr)),
            async_case("check+increment", n, "original stand-in check (`GET`) + increment (`INCR`+`EXPIRE`)",
                       make_standin(standin_check_incr), standin=True),
        ]
    return cases


def setup(svc: Services) -> None:
    """Stores the same user key and pool keys for apikeyd, the baseline and the stand-in."""
    import redis

    with Client(svc.socket) as admin:
        admin.set_user_api_key(user_id=USER, service=SERVICE, key=USER_KEY)
        have = {k.get("key_id") for k in admin.list_pool_keys(service=POOL)["keys"]}
        if not have:
            for k in POOL_KEYS:
                admin.add_pool_key(service=POOL, key=k)
        assert admin.get_user_api_key(user_id=USER, service=SERVICE)["key"] == USER_KEY
        assert admin.get_pool_api_key(service=POOL)["key"] in POOL_KEYS
    r = redis.Redis(unix_socket_path=svc.redis)
    r.hset(BASELINE_HASH, SERVICE, USER_KEY)
    pool_hash = f"{original_standin.PREFIX}:global_api_pool:{POOL}"
    r.delete(pool_hash)
    r.hset(pool_hash, mapping={f"k{i}": k for i, k in enumerate(POOL_KEYS)})
    r.close()
    from cryptography.fernet import Fernet

    original_standin.open_store(os.path.join(svc.tmp, "original-standin.sqlite3"), Fernet.generate_key())
    original_standin.store_user_key(USER, SERVICE, USER_KEY)

    async def check() -> None:
        import redis.asyncio as aredis

        ar = aredis.Redis(unix_socket_path=svc.redis)
        assert await original_standin.get_user_api_key(USER, SERVICE, redis_client=ar) == USER_KEY
        assert await original_standin.get_pool_api_key(POOL, redis_client=ar) in POOL_KEYS
        assert await dropin.get_user_api_key(USER, SERVICE) == USER_KEY
        assert await dropin.get_pool_api_key(POOL) in POOL_KEYS
        await ar.aclose()

    dropin.configure(socket=svc.socket)
    asyncio.run(check())


def describe(svc: Services, args: argparse.Namespace) -> List[str]:
    import cryptography
    import redis

    with Client(svc.socket) as c:
        version = c.ping()["version"]
        store = c.stats()["store"]
    r = redis.Redis(unix_socket_path=svc.redis)
    redis_version = r.info("server")["redis_version"]
    r.close()
    mode = {"redis": "Redis mode", "embedded": "embedded mode"}.get(store["mode"], f"{store['mode']} mode")
    if store["mode"] == "redis":
        mode += f" on the bench's redis-server (user keys in {store.get('user_keys')})"
    parser = "hiredis" if importlib.util.find_spec("hiredis") else "pure-Python parser"
    command = os.environ.get("BENCH_COMMAND") or " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    return [
        f"command: `{command}`",
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{os.cpu_count()} CPUs; load average at start {_loadavg()}",
        f"daemon: apikeyd {version} ({svc.daemon_bin}), {mode}; redis-server {redis_version}",
        f"python {sys.version.split()[0]}, apikeyd client {apikeyd.__version__} "
        f"({os.path.relpath(os.path.dirname(apikeyd.__file__))}), "
        f"redis-py {redis.__version__} ({parser}), cryptography {cryptography.__version__}",
        f"{args.rounds} round{'s' if args.rounds != 1 else ''} of {args.seconds:g} s per case; {args.callers} callers = threads (sync) "
        f"or tasks (asyncio); AsyncClient connections={args.connections}",
    ]


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(cases: List[Case], samples: List[List[float]]) -> List[str]:
    med = [statistics.median(s) for s in samples]

    def base_of(i: int) -> Optional[int]:
        c = cases[i]
        for j, b in enumerate(cases):
            # reads share the HGET rows of "user key"
            same_op = b.op == c.op or (b.op == "user key" and c.op == "pool key")
            if b.baseline and same_op and b.callers == c.callers and b.sync == c.sync:
                return j
        return None

    def standin_of(i: int) -> Optional[int]:
        c = cases[i]
        for j, b in enumerate(cases):
            if b.standin and b.op == c.op and b.callers == c.callers:
                return j
        return None

    def ratio(i: int, j: Optional[int]) -> str:
        return "–" if j is None or med[j] == 0 else f"{med[i] / med[j]:.2f}×"

    out = ["| operation | callers | measured | min calls/s | median | max | vs redis-py | vs original stand-in |",
           "|---|---:|---|---:|---:|---:|---:|---:|"]
    for i, c in enumerate(cases):
        kind = "threads" if c.sync else "tasks"
        callers = f"{c.callers} {kind[:-1] if c.callers == 1 else kind}"
        base = base_of(i)
        vs_redis = f"{ratio(i, base)} ({'sync' if c.sync else 'asyncio'})" if base is not None else "–"
        out.append(f"| {c.op} | {callers} | {c.who} | {min(samples[i]):,.0f} | {med[i]:,.0f} | "
                   f"{max(samples[i]):,.0f} | {vs_redis} | {ratio(i, standin_of(i))} |")
    return out


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.py", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--socket", help="a running daemon's socket (default: start one)")
    ap.add_argument("--redis", help="a running redis-server's Unix socket (default: start one)")
    ap.add_argument("--mode", choices=("redis", "embedded"), default="redis",
                    help="the started daemon's store: Redis mode on the bench's redis-server, as the "
                         "original used Redis (default), or embedded mode (SQLite only)")
    ap.add_argument("--apikeyd-bin", help="daemon binary to start (default: $APIKEYD_BIN, PATH, target/)")
    ap.add_argument("--seconds", type=float, default=1.0, help="measuring time per case and round (default 1)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all cases; min/median/max are shown, ratios of medians (default 3)")
    ap.add_argument("--callers", type=int, default=64, help="concurrent callers besides 1 (default 64)")
    ap.add_argument("--connections", type=int, default=2, help="AsyncClient connections (default 2)")
    ap.add_argument("--only", action="append", metavar="TEXT",
                    help="measure only the cases whose operation or name contains TEXT (repeatable; "
                         "a ratio whose reference case was left out shows –)")
    args = ap.parse_args(argv)
    try:
        import cryptography  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        sys.exit("bench: redis-py and cryptography are needed: run clients/python/bench/run.sh, "
                 "or pip install redis cryptography (bench only)")
    started = time.monotonic()
    svc = Services(args)
    try:
        setup(svc)
        header = describe(svc, args)
        cases = [c for c in build_cases(svc, args)
                 if not args.only or any(t in c.op or t in c.who for t in args.only)]
        samples: List[List[float]] = [[] for _ in cases]
        for _ in range(args.rounds):
            for i, case in enumerate(cases):
                samples[i].append(case.measure())
    finally:
        original_standin.close_store()
        svc.close()
    header.append(f"load average at end {_loadavg()}; the run took {time.monotonic() - started:.0f} s")
    print("\n".join(header))
    print()
    print("\n".join(table(cases, samples)))


if __name__ == "__main__":
    main()
