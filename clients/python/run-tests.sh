#!/usr/bin/env bash
# Runs the Python client's tests against the real daemon binary.
#   VENV          virtualenv to create/reuse (default: <repo>/target/python-venv)
#   APIKEYD_BIN   daemon binary (default: target/debug/apikeyd, else target/release/apikeyd)
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
exit "$rc"
