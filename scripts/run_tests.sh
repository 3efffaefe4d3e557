#!/usr/bin/env bash
# The test suite. Fails on any failure, and also when no test ran (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check . || exit 1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "run_tests: no test ran" >&2
  exit 1
fi
exit "$status"
