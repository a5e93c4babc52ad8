#!/usr/bin/env bash
# Runs clients/python/bench/bench.py in a virtualenv of its own holding only the
# bench's dependencies (redis-py, cryptography: never the package's), against this
# checkout's client (clients/python/src on PYTHONPATH, so nothing is installed).
#   BENCH_VENV    virtualenv to create/reuse (default: <repo>/target/python-bench-venv)
#   APIKEYD_BIN   daemon binary (default: target/release/apikeyd, else what bench.py finds)
# Arguments go to bench.py (defaults: --rounds 3 --seconds 1 --mode redis; --help lists all).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
venv="${BENCH_VENV:-$repo/target/python-bench-venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import redis, cryptography' >/dev/null 2>&1; then
    "$venv/bin/python" -m pip -q --disable-pip-version-check install 'redis>=5,<9' 'cryptography>=42,<51'
fi
cd "$repo"
if [ -z "${APIKEYD_BIN:-}" ] && [ -x target/release/apikeyd ]; then
    export APIKEYD_BIN="$repo/target/release/apikeyd"
fi
export PYTHONPATH="$repo/clients/python/src${PYTHONPATH:+:$PYTHONPATH}"
BENCH_COMMAND="bash clients/python/bench/run.sh${*:+ $*}" PYTHONDONTWRITEBYTECODE=1 \
    exec "$venv/bin/python" "$here/bench.py" "$@"
