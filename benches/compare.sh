#!/usr/bin/env bash
# Reproduces every figure of docs/performance.md on this machine: a private
# redis-server and the release daemon on Unix sockets in a temp dir, measured by
# `apikeyd bench` in one run. Usage: bash benches/compare.sh [seconds per run]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-5}"
cargo build --release --locked -q
BIN="$PWD/target/release/apikeyd"
W="$(mktemp -d /tmp/apikeyd-bench.XXXXXX)"
trap 'pkill -f "apikeyd serve --config $W" || true; [ -f "$W/redis.pid" ] && kill "$(cat "$W/redis.pid")" 2>/dev/null || true' EXIT
redis-server --port 0 --unixsocket "$W/redis.sock" --unixsocketperm 700 --save "" --appendonly no \
  --dir "$W" --daemonize yes --pidfile "$W/redis.pid" >/dev/null
RS="$W/redis.sock"

start() {  # start NAME EXTRA-CONFIG: a fresh daemon folder; waits until it answers
  local dir="$W/$1"; mkdir -p "$dir"
  printf 'log.level = "warn"\n%b\n' "$2" > "$dir/config.toml"
  ( "$BIN" serve --config "$dir/config.toml" >"$dir/log.txt" 2>&1 & )
  for _ in $(seq 200); do "$BIN" call --config "$dir/config.toml" '{"op":"ping"}' >/dev/null 2>&1 && return; sleep 0.05; done
  echo "daemon $1 did not start"; cat "$dir/log.txt"; exit 1
}
stop() { pkill -f "apikeyd serve --config $W/$1/" || true; sleep 0.3; }
bench() { "$BIN" bench --duration "$SECS" --warmup 1 "$@"; }
rss() { grep VmRSS "/proc/$(pgrep -f "apikeyd serve --config $W/$1/" | head -1)/status" | awk '{print $2}'; }

populate() {  # populate NAME KEYS EXTRA-CONFIG [--redis SOCKET]: keys stored before the daemon starts
  local dir="$W/$1"; mkdir -p "$dir"
  printf 'log.level = "warn"\n%b\n' "$3" > "$dir/config.toml"
  "$BIN" bench --config "$dir/config.toml" --populate --keys "$2" --duration 0 "${@:4}"
}

echo "== cached user keys (embedded), vs HGET"
populate emb 1000 "" --redis "$RS"
start emb ""
bench --config "$W/emb/config.toml" --keys 1000 --connections 8 --pipeline 1 --redis "$RS"
bench --config "$W/emb/config.toml" --keys 1000 --connections 8 --pipeline 32 --redis "$RS"
echo "== latency at a fixed offered load (8 paced connections; from ~60k req/s the paced client saturates 2 cores)"
for rate in 20000 40000 100000; do
  bench --config "$W/emb/config.toml" --keys 1000 --connections 8 --rate "$rate" --redis "$RS"
done
echo "== latency vs throughput sweep -> docs/latency.svg"
bench --config "$W/emb/config.toml" --keys 1000 --connections 8 --redis "$RS" --plot docs/latency.svg
stop emb

echo "== cached pool keys (redis mode), vs HGET"
start pool "redis.url = \"redis+unix://$RS\""
bench --config "$W/pool/config.toml" --preset pool --connections 8 --pipeline 1 --redis "$RS"
bench --config "$W/pool/config.toml" --preset pool --connections 8 --pipeline 32 --redis "$RS"
echo "== cached pool keys, half of the pool cooling down (redis mode), vs HGET"
bench --config "$W/pool/config.toml" --preset pool-cooling --connections 8 --pipeline 1 --redis "$RS"
bench --config "$W/pool/config.toml" --preset pool-cooling --connections 8 --pipeline 32 --redis "$RS"
echo "== quotas (redis mode): check and consume vs EVALSHA of the same script"
bench --config "$W/pool/config.toml" --preset check --connections 8 --redis "$RS" --redis-cmd consume
bench --config "$W/pool/config.toml" --preset consume --connections 8 --redis "$RS" --redis-cmd consume
stop pool

echo "== cached user keys in redis mode (keystore.user_keys = \"redis\"), vs HGET"
# Own prefix: the pool daemon above wrote its fleet's check values under the default.
UK="redis.url = \"redis+unix://$RS\"\nredis.prefix = \"benchusers\""
populate ukeys 1000 "$UK\nkeystore.user_keys = \"local\"" --redis "$RS"
"$BIN" migrate-user-keys --to redis --config "$W/ukeys/config.toml" | tail -1
start ukeys "$UK"
bench --config "$W/ukeys/config.toml" --keys 1000 --connections 8 --pipeline 1 --redis "$RS"
stop ukeys
echo "== cold user keys in redis mode (cache off: one HGET round trip and a decrypt each)"
start ukeys "$UK\n[cache]\nuser_key_ttl_s = 0"
bench --config "$W/ukeys/config.toml" --keys 1000 --connections 8 --pipeline 1 --redis "$RS"
stop ukeys

echo "== cold keys: 500,000 users, cache of 100,000"
populate cold 500000 "[cache]\nmax_entries = 100000"
start cold "[cache]\nmax_entries = 100000"
bench --config "$W/cold/config.toml" --keys 500000 --connections 8
stop cold

echo "== memory"
start mem ""
echo "RSS idle: $(rss mem) kB"
stop mem
populate mem100k 100000 ""
start mem100k ""
bench --config "$W/mem100k/config.toml" --keys 100000 --connections 8 --pipeline 32 >/dev/null
echo "RSS with 100,000 cached keys: $(rss mem100k) kB ($("$BIN" call --config "$W/mem100k/config.toml" '{"op":"stats"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["result"]["cache"]["entries"])') entries)"
stop mem100k

echo "== start-up with 1,000,000 keys in the keystore"
populate big 1000000 ""
python3 - "$BIN" "$W/big/config.toml" <<'PY'
import socket, subprocess, sys, time, os
binary, config = sys.argv[1], sys.argv[2]
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
print(f"first start (full integrity check): ready after {start():.0f} ms")
print(f"restart after a clean stop: ready after {start():.0f} ms")
PY
