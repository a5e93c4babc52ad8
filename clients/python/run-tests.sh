#!/usr/bin/env bash
# Runs the Python client's tests against the real daemon binary.
#   VENV          virtualenv to create/reuse (default: <repo>/target/python-venv)
#   APIKEYD_BIN   daemon binary (default: target/debug/apikeyd, else target/release/apikeyd)
#   BENCH_SMOKE   0 skips the bench's smoke run (a few seconds, after the tests)
# Extra arguments go to pytest. Exits non-zero on any failure, and when no test ran.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VENV:-$repo/target/python-venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install 'pytest>=7,<10' 'hypothesis>=6,<7' 'mypy>=1.8,<2'
cd "$repo"
# --force-reinstall --no-deps: the same version number with new code must replace the old copy;
# setuptools' build/ would otherwise keep files since removed from the package.
rm -rf "$here/build"
"${pip[@]}" install --force-reinstall --no-deps ./clients/python

args=(-p no:cacheprovider)
export APIKEYD_BIN="${APIKEYD_BIN:-}"
[ -n "$APIKEYD_BIN" ] || unset APIKEYD_BIN
set +e
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest -q "${args[@]}" "$here/tests" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "run-tests.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
# The bench (clients/python/bench, outside the package, in a virtualenv of its own)
# still runs every case against this daemon and client: one short round, no figures kept.
if [ "$rc" -eq 0 ] && [ "${BENCH_SMOKE:-1}" != 0 ]; then
    if ! out="$(bash "$here/bench/run.sh" --rounds 1 --seconds 0.05 2>&1)"; then
        printf '%s\n' "$out" >&2
        echo "run-tests.sh: the bench's smoke run (clients/python/bench/run.sh) failed" >&2
        exit 1
    fi
    echo "bench smoke run: $(grep -cE '^\| (user key|pool key|check\+increment) \|' <<<"$out") cases measured"
fi
exit "$rc"
