#!/usr/bin/env bash
# Runs clients/python/bench/bench.py in a virtualenv of its own, with the bench-only
# dependencies (redis-py, cryptography) and this checkout's client package.
#   BENCH_VENV    virtualenv to create/reuse (default: <repo>/target/python-bench-venv)
#   APIKEYD_BIN   daemon binary (default: target/release/apikeyd, else what bench.py finds)
# Arguments go to bench.py (--rounds 3 --seconds 1 by default; --help lists them).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
venv="${BENCH_VENV:-$repo/target/python-bench-venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install 'redis>=5,<9' 'cryptography>=42,<51'
cd "$repo"
rm -rf "$here/../build"
"${pip[@]}" install --force-reinstall --no-deps ./clients/python
rm -rf "$here/../build"
if [ -z "${APIKEYD_BIN:-}" ] && [ -x target/release/apikeyd ]; then
    export APIKEYD_BIN="$repo/target/release/apikeyd"
fi
BENCH_COMMAND="bash clients/python/bench/run.sh${*:+ $*}" PYTHONDONTWRITEBYTECODE=1 \
    exec "$venv/bin/python" "$here/bench.py" "$@"
