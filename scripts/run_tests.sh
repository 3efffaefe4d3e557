#!/usr/bin/env bash
# The test suite. Fails on any failure, and also when no test ran (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check . || exit 1
# The tests run in parallel on a machine with 2 cores or more (pytest-xdist, one worker a
# core; conftest.py gives each worker its share of torch's threads), measured on the 2-core
# CI machine: see README's Testing. A file's tests stay on one worker (--dist loadfile), so
# its module fixtures (a tiny run, a served model) are built once; the slowest files go
# first (conftest.py's SLOW_FILES). RECLORA_TEST_WORKERS=1 runs them in this process;
# arguments after the script's name go to pytest.
workers=${RECLORA_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
xdist=()
if [ "$workers" -gt 1 ]; then
  xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "${xdist[@]}" "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run_tests: no test ran" >&2
  exit 1
fi
exit "$status"
