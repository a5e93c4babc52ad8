#!/usr/bin/env bash
# The cost of an idempotency record on consume, in Redis mode, two ways:
#  1. alternating runs of plain consume and consume with a unique idempotency_key
#     (apikeyd-bench --preset consume --connections 8 [--idempotency]) on one daemon,
#     each with its CPU per request (daemon + redis-server) and Redis's command stats;
#  2. instructions per request (valgrind's callgrind, which counts instructions, so
#     a busy shared machine does not move the figure): redis-server and then the
#     daemon run under callgrind for one plain and one keyed run each.
# Usage: bash benches/idempotency_cost.sh [rounds] [seconds per run]
# Needs redis-server, redis-cli and (for part 2) valgrind. Stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"; SECS="${2:-3}"
cargo build --release --locked -q --bin apikeyd --bin apikeyd-bench
BIN="$PWD/target/release/apikeyd"; BENCH="$PWD/target/release/apikeyd-bench"
W="$(mktemp -d /tmp/apikeyd-idem.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT
echo "== $(date -u '+%F %H:%M UTC'), commit $(git rev-parse --short HEAD), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# start_pair DIR [valgrind-for-redis] [valgrind-for-daemon]: a redis-server and a
# Redis-mode daemon on sockets in DIR; sets RPID and DPID.
start_pair() {
  local dir="$1" vr="${2:-}" vd="${3:-}"; mkdir -p "$dir"
  $vr redis-server --port 0 --unixsocket "$dir/redis.sock" --unixsocketperm 700 --save "" \
    --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
  RPID=$!; PIDS+=("$RPID")
  for _ in $(seq 300); do redis-cli -s "$dir/redis.sock" ping >/dev/null 2>&1 && break; sleep 0.1; done
  printf 'log.level = "warn"\nredis.url = "redis+unix://%s"\n' "$dir/redis.sock" > "$dir/config.toml"
  $vd "$BIN" serve --config "$dir/config.toml" >"$dir/log.txt" 2>&1 &
  DPID=$!; PIDS+=("$DPID")
  for _ in $(seq 600); do "$BIN" call --config "$dir/config.toml" '{"op":"ping"}' >/dev/null 2>&1 && return; sleep 0.1; done
  echo "daemon did not start"; cat "$dir/log.txt"; exit 1
}
run() {  # run DIR SECS [--idempotency]: one measured run
  "$BENCH" --duration "$2" --warmup 1 --config "$1/config.toml" --server-pid "$DPID" \
    --server-pid "$RPID" --redis-pid "$RPID" --preset consume --connections 8 "${@:3}"
}

echo "== 1. alternating runs, ${SECS} s each (CPU per request: daemon + redis-server)"
start_pair "$W/ab"
for i in $(seq "$ROUNDS"); do
  for mode in plain keyed; do
    redis-cli -s "$W/ab/redis.sock" config resetstat >/dev/null
    printf '%-6s %s  ' "$mode" "$i"
    if [ "$mode" = keyed ]; then run "$W/ab" "$SECS" --idempotency; else run "$W/ab" "$SECS"; fi | grep 'req/s' | sed -E 's/ +p50.*errors 0 //'
    redis-cli -s "$W/ab/redis.sock" info commandstats | grep -E '^cmdstat_evalsha:' | sed -E 's/,rejected.*//; s/^/       /'
  done
done
echo "records held: $(redis-cli -s "$W/ab/redis.sock" dbsize) keys, $(redis-cli -s "$W/ab/redis.sock" info memory | sed -n 's/^used_memory_human://p' | tr -d '\r')"
kill "$DPID" "$RPID"; wait "$DPID" "$RPID" 2>/dev/null || true

if ! command -v valgrind >/dev/null; then echo "== 2. skipped: install valgrind"; exit 0; fi
echo "== 2. instructions per request under callgrind (plain, then keyed; one process at a time)"
for who in redis-server apikeyd; do
  dir="$W/cg-$who"; mkdir -p "$dir"
  vg="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$dir/cg.%p"
  if [ "$who" = redis-server ]; then start_pair "$dir" "$vg" ""; target="$RPID"; else start_pair "$dir" "" "$vg"; target="$DPID"; fi
  for mode in plain keyed; do
    extra=(); [ "$mode" = keyed ] && extra=(--idempotency)
    "$BENCH" --duration 1 --warmup 0 --config "$dir/config.toml" --preset consume --connections 8 "${extra[@]}" >/dev/null
    callgrind_control -z "$target" >/dev/null; callgrind_control -i on "$target" >/dev/null
    rate=$("$BENCH" --duration 4 --warmup 0 --config "$dir/config.toml" --preset consume --connections 8 "${extra[@]}" | sed -nE 's/.* ([0-9]+) req\/s.*/\1/p')
    callgrind_control -i off "$target" >/dev/null; callgrind_control -d "$target" >/dev/null
    sleep 0.5
    ir=$(cat "$dir"/cg.* | awk '/^totals:/ {t += $2} END {print t + 0}')
    rm -f "$dir"/cg.*
    echo "$who $mode: $((rate * 4)) requests, $((ir / (rate * 4))) instructions per request"
  done
  kill "$DPID" "$RPID"; wait "$DPID" "$RPID" 2>/dev/null || true
done
