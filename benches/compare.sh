#!/usr/bin/env bash
# Reproduces every figure of docs/performance.md on this machine: a private
# redis-server and the release daemon on Unix sockets in a temp dir, measured by
# `apikeyd-bench` in one run, then a closing table of every figure against its target.
# Usage: bash benches/compare.sh [seconds per run]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-5}"
cargo build --release --locked -q --bin apikeyd --bin apikeyd-bench
BIN="$PWD/target/release/apikeyd"
BENCH="$PWD/target/release/apikeyd-bench"
W="$(mktemp -d /tmp/apikeyd-bench.XXXXXX)"

# Only what this script started is stopped, by the pids it recorded: daemons in
# $W/NAME/pid, redis-server in $W/redis.pid.
cleanup() {
  for f in "$W"/*/pid; do
    [ -f "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
  done
  [ -f "$W/redis.pid" ] && kill "$(cat "$W/redis.pid")" 2>/dev/null || true
}
trap cleanup EXIT
redis-server --port 0 --unixsocket "$W/redis.sock" --unixsocketperm 700 --save "" --appendonly no \
  --dir "$W" --daemonize yes --pidfile "$W/redis.pid" >/dev/null
RS="$W/redis.sock"

start() {  # start NAME EXTRA-CONFIG: a fresh daemon folder; waits until it answers
  local dir="$W/$1"; mkdir -p "$dir"
  printf 'log.level = "warn"\n%b\n' "$2" > "$dir/config.toml"
  "$BIN" serve --config "$dir/config.toml" >"$dir/log.txt" 2>&1 &
  echo $! > "$dir/pid"
  for _ in $(seq 200); do "$BIN" call --config "$dir/config.toml" '{"op":"ping"}' >/dev/null 2>&1 && return; sleep 0.05; done
  echo "daemon $1 did not start"; cat "$dir/log.txt"; exit 1
}
stop() {  # stop NAME: SIGTERM to that daemon's pid, and wait until it has exited
  local pid; pid="$(cat "$W/$1/pid")"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$W/$1/pid"
}
bench() {  # bench LABEL ARGS...: one measurement, its output kept for the closing table
  local label="$1"; shift
  "$BENCH" --duration "$SECS" --warmup 1 "$@" | tee "$W/out-$label.txt"
}
rss() { grep VmRSS "/proc/$(cat "$W/$1/pid")/status" | awk '{print $2}'; }
figure() { printf '%s\t%s\n' "$1" "$2" >> "$W/figures.tsv"; }

populate() {  # populate NAME KEYS EXTRA-CONFIG [--redis SOCKET]: keys stored before the daemon starts
  local dir="$W/$1"; mkdir -p "$dir"
  printf 'log.level = "warn"\n%b\n' "$3" > "$dir/config.toml"
  "$BENCH" --config "$dir/config.toml" --populate --keys "$2" --duration 0 "${@:4}"
}

echo "== cached user keys (embedded), vs HGET"
populate emb 1000 "" --redis "$RS"
start emb ""
bench user-8x1 --config "$W/emb/config.toml" --keys 1000 --connections 8 --pipeline 1 --redis "$RS"
bench user-8x32 --config "$W/emb/config.toml" --keys 1000 --connections 8 --pipeline 32 --redis "$RS"
echo "== one connection, no pipelining (a bot asking for one key at a time), vs HGET"
bench user-1x1 --config "$W/emb/config.toml" --keys 1000 --connections 1 --pipeline 1 --redis "$RS"
echo "== latency at a fixed offered load: 25% and 50% of redis-server's closed-loop maximum above (8 paced connections)"
redis_max="$(awk '$1 == "redis" {print int($6); exit}' "$W/out-user-8x1.txt")"
# Three alternating runs per rate: a stall of the VM (several ms, seen by both servers
# alike) decides a single run's p99; the table compares the median p99 of each.
for share in 25 50; do
  rate=$((redis_max * share / 100)); figure "paced-$share-rate" "$rate"
  for i in 1 2 3; do
    bench "paced-$share-$i" --config "$W/emb/config.toml" --keys 1000 --connections 8 --rate "$rate" --redis "$RS"
  done
done
echo "== latency vs throughput sweep -> docs/latency.svg"
bench sweep --config "$W/emb/config.toml" --keys 1000 --connections 8 --redis "$RS" --plot docs/latency.svg
stop emb

echo "== cached pool keys (redis mode), vs HGET"
start pool "redis.url = \"redis+unix://$RS\""
bench pool-8x1 --config "$W/pool/config.toml" --preset pool --connections 8 --pipeline 1 --redis "$RS"
bench pool-8x32 --config "$W/pool/config.toml" --preset pool --connections 8 --pipeline 32 --redis "$RS"
echo "== cached pool keys, half of the pool cooling down (redis mode), vs HGET"
bench cool-8x1 --config "$W/pool/config.toml" --preset pool-cooling --connections 8 --pipeline 1 --redis "$RS"
bench cool-8x32 --config "$W/pool/config.toml" --preset pool-cooling --connections 8 --pipeline 32 --redis "$RS"
echo "== quotas (redis mode): check and consume vs EVALSHA of the same script"
bench check --config "$W/pool/config.toml" --preset check --connections 8 --redis "$RS" --redis-cmd consume
bench consume --config "$W/pool/config.toml" --preset consume --connections 8 --redis "$RS" --redis-cmd consume
stop pool

echo "== cached user keys in redis mode (keystore.user_keys = \"redis\"), vs HGET"
# Own prefix: the pool daemon above wrote its fleet's check values under the default.
UK="redis.url = \"redis+unix://$RS\"\nredis.prefix = \"benchusers\""
populate ukeys 1000 "$UK\nkeystore.user_keys = \"local\"" --redis "$RS"
"$BIN" migrate-user-keys --to redis --config "$W/ukeys/config.toml" | tail -1
start ukeys "$UK"
bench ukeys-redis --config "$W/ukeys/config.toml" --keys 1000 --connections 8 --pipeline 1 --redis "$RS"
stop ukeys
echo "== cold user keys in redis mode (cache off: one HGET round trip and a decrypt each)"
start ukeys "$UK\n[cache]\nuser_key_ttl_s = 0"
bench ukeys-cold --config "$W/ukeys/config.toml" --keys 1000 --connections 8 --pipeline 1 --redis "$RS"
stop ukeys

echo "== cold keys: 500,000 users, cache of 100,000"
populate cold 500000 "[cache]\nmax_entries = 100000"
start cold "[cache]\nmax_entries = 100000"
bench cold --config "$W/cold/config.toml" --keys 500000 --connections 8
stop cold

echo "== memory"
start mem ""
idle="$(rss mem)"; figure rss-idle-kb "$idle"
echo "RSS idle: $idle kB"
stop mem
populate mem100k 100000 ""
start mem100k ""
bench mem100k --config "$W/mem100k/config.toml" --keys 100000 --connections 8 --pipeline 32 >/dev/null
full="$(rss mem100k)"; figure rss-100k-kb "$full"
echo "RSS with 100,000 cached keys: $full kB ($("$BIN" call --config "$W/mem100k/config.toml" '{"op":"stats"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["result"]["cache"]["entries"])') entries)"
stop mem100k

echo "== start-up with 1,000,000 keys in the keystore"
populate big 1000000 ""
python3 - "$BIN" "$W/big/config.toml" "$W/figures.tsv" <<'PY'
import socket, subprocess, sys, time, os
binary, config, figures = sys.argv[1], sys.argv[2], sys.argv[3]
sock = os.path.join(os.path.dirname(config), "run/apikeyd.sock")
def start():
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "serve", "--config", config], stderr=subprocess.DEVNULL)
    while True:
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(sock)
            s.sendall(b'{"op":"ping"}\n'); s.recv(100); break
        except OSError:
            time.sleep(0.001)
    ms = 1000 * (time.monotonic() - t0)
    p.terminate(); p.wait()
    return ms
first, again = start(), start()
print(f"first start (full integrity check): ready after {first:.0f} ms")
print(f"restart after a clean stop: ready after {again:.0f} ms")
with open(figures, "a") as f:
    f.write(f"ready-first-ms\t{first:.0f}\nready-clean-ms\t{again:.0f}\n")
PY

echo
echo "== every figure against its target (docs/performance.md; issue 15 for the ratios)"
python3 - "$W" <<'PY'
import os, re, sys
w = sys.argv[1]
line_re = re.compile(r"^(apikeyd|redis)\s+conns\s+\d+\s+pipeline\s+\d+\s+([\d.]+) req/s\s+p50\s+([\d.]+) µs\s+p90\s+([\d.]+)\s+p99\s+([\d.]+)")

def run(label):
    """The first (closed-loop, or the one paced) apikeyd and redis lines of a run."""
    out = {}
    path = os.path.join(w, f"out-{label}.txt")
    for line in open(path, encoding="utf-8") if os.path.exists(path) else []:
        m = line_re.match(line)
        if m and m.group(1) not in out:
            out[m.group(1)] = {"rps": float(m.group(2)), "p99": float(m.group(5))}
    return out

figures = {}
if os.path.exists(os.path.join(w, "figures.tsv")):
    for line in open(os.path.join(w, "figures.tsv")):
        k, v = line.rstrip("\n").split("\t")
        figures[k] = float(v)

rows = []
def ratio(what, label, at_least, redis_name="HGET"):
    r = run(label)
    if "apikeyd" in r and "redis" in r:
        x = r["apikeyd"]["rps"] / r["redis"]["rps"]
        rows.append((what, f"{r['apikeyd']['rps']:,.0f} vs {r['redis']['rps']:,.0f} req/s ({redis_name})",
                     f"{x:.2f}×", f"≥ {at_least}×", x >= at_least))
    else:
        rows.append((what, "not measured", "—", f"≥ {at_least}×", None))
def tail(what, labels, at_most):
    """The median p99 of each server over the runs `labels`."""
    runs = [r for r in map(run, labels) if "apikeyd" in r and "redis" in r]
    if runs:
        median = lambda xs: sorted(xs)[len(xs) // 2]
        a = median([r["apikeyd"]["p99"] for r in runs])
        b = median([r["redis"]["p99"] for r in runs])
        rows.append((what, f"median p99 {a:,.0f} vs {b:,.0f} µs", f"{a / b:.2f}×", f"≤ {at_most}×", a / b <= at_most))
    else:
        rows.append((what, "not measured", "—", f"≤ {at_most}×", None))
def absolute(what, value, shown, target, ok):
    rows.append((what, shown if value is not None else "not measured", "—", target,
                 None if value is None else ok(value)))

ratio("cached user key, 8 connections", "user-8x1", 1.0)
ratio("cached user key, 8 × 32 pipelined", "user-8x32", 0.6)
ratio("cached user key, 1 connection", "user-1x1", 1.0)
ratio("cached pool key (Redis mode), 8 connections", "pool-8x1", 1.0)
ratio("cached pool key (Redis mode), 8 × 32 pipelined", "pool-8x32", 0.6)
ratio("pool key, half the pool cooling, 8 connections", "cool-8x1", 1.0)
ratio("cached user key, user keys in Redis, 8 connections", "ukeys-redis", 1.0)
ratio("check_default_key_limit (Redis mode)", "check", 0.8, "EVALSHA")
ratio("consume_default_key_usage (Redis mode)", "consume", 0.8, "EVALSHA")
for share in (25, 50):
    rate = figures.get(f"paced-{share}-rate", 0)
    tail(f"p99 at {share}% of redis-server's maximum ({rate:,.0f} req/s offered), 8 paced connections",
         [f"paced-{share}-{i}" for i in (1, 2, 3)], 2.0)
cold = run("cold").get("apikeyd", {}).get("rps")
absolute("cold keys (500,000 users, cache 100,000)", cold, f"{cold or 0:,.0f} req/s", "≥ 50,000 req/s", lambda v: v >= 50000)
idle = figures.get("rss-idle-kb")
absolute("RSS idle", idle, f"{idle or 0:,.0f} kB", "≤ 20 MiB", lambda v: v <= 20 * 1024)
full = figures.get("rss-100k-kb")
absolute("RSS with 100,000 cached keys", full, f"{full or 0:,.0f} kB", "≤ 64 MiB", lambda v: v <= 64 * 1024)
for key, what in (("ready-clean-ms", "ready with 1,000,000 keys, after a clean stop"),
                  ("ready-first-ms", "ready with 1,000,000 keys, first start")):
    v = figures.get(key)
    absolute(what, v, f"{v or 0:.0f} ms", "≤ 100 ms", lambda v: v <= 100)

widths = [max(len(r[i]) for r in rows) for i in range(4)]
for what, shown, x, target, ok in rows:
    verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
    print(f"{what:<{widths[0]}}  {shown:<{widths[1]}}  {x:>{widths[2]}}  {target:<{widths[3]}}  {verdict}")
met = sum(1 for r in rows if r[4] is True)
missed = sum(1 for r in rows if r[4] is False)
print(f"{met} met, {missed} missed, {len(rows) - met - missed} not measured")
PY
